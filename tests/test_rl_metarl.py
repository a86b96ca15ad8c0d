"""MAML-RL maths against independent oracles, in float64 on tiny policies (no environment needed)."""

from __future__ import annotations

import pytest
import torch

from fastmaml.rl import baselines, closed_form, metarl, policies, trpo
from fastmaml.rl.sampling import Trajectories

OBS, ACT, T, B, H = 3, 2, 2, 3, 5


def _trajectories(gen: torch.Generator) -> Trajectories:
    obs = torch.randn(T, B, H, OBS, generator=gen, dtype=torch.float64)
    actions = torch.randn(T, B, H, ACT, generator=gen, dtype=torch.float64)
    rewards = torch.randn(T, B, H, generator=gen, dtype=torch.float64)
    mask = torch.ones(T, B, H, dtype=torch.float64)
    mask[0, 1, 3:] = 0  # an episode that terminated early
    mask[1, 2, 2:] = 0
    return Trajectories(obs, actions, rewards, mask)


def _theta(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    theta = policies.init_policy(OBS, ACT, (6,), init_std=0.8, generator=gen, dtype=torch.float64)
    theta["layers.0.bias"] = 0.1 * torch.randn(6, generator=gen, dtype=torch.float64)
    return theta


def _meta_batch(theta: dict, settings: metarl.InnerSettings, seed: int = 1) -> metarl.MetaBatch:
    """A MetaBatch as ``collect`` builds it, from random episodes instead of an environment."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    params = theta
    for lr in settings.lrs:
        traj = _trajectories(gen)
        batch = metarl.pack(traj, baselines.advantages(traj.obs, traj.rewards, traj.mask, settings.gamma))
        batches.append(batch)
        params = {k: v.detach() for k, v in metarl.inner_step(params, batch, lr, settings, OBS).items()}
    post = _trajectories(gen)
    adv = baselines.advantages(post.obs, post.rewards, post.mask, settings.gamma)
    old_logp = torch.func.vmap(policies.log_prob)(params, post.obs, post.actions)
    old_mean = torch.func.vmap(policies.action_mean)(params, post.obs)
    return metarl.MetaBatch(batches, post, adv, old_logp, old_mean, params["log_std"], [])


SETTINGS = {
    "1step": metarl.InnerSettings(lrs=(0.3,)),
    "2steps": metarl.InnerSettings(lrs=(0.3, 0.15)),
    "lvc": metarl.InnerSettings(lrs=(0.3,), estimator="lvc"),
}


def _kl_of_flat(theta: dict, meta: metarl.MetaBatch, settings: metarl.InnerSettings, first_order: bool = False):
    return lambda v: metarl.surrogate_and_kl(trpo.unflatten(v, theta), meta, settings, OBS, first_order)[1]


def test_conjugate_gradient_solves_spd_system() -> None:
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    a = m @ m.T + torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, generator=gen, dtype=torch.float64)
    x = trpo.conjugate_gradient(lambda v: a @ v, b, iterations=8, residual_tol=1e-30)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", list(SETTINGS))
def test_exact_fvp_equals_full_hessian_of_kl_through_inner_steps(case: str) -> None:
    settings = SETTINGS[case]
    theta = _theta()
    meta = _meta_batch(theta, settings)
    base = trpo.flatten(theta)
    hessian = torch.autograd.functional.hessian(_kl_of_flat(theta, meta, settings), base)
    fvp = metarl.fisher_vector_product(theta, meta, settings, OBS, "exact")
    v = torch.randn(base.numel(), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(fvp(v), hessian @ v, rtol=1e-10, atol=1e-12)
    # the adapted policies equal the sampling ones at theta: KL 0, its Hessian is positive semi-definite
    assert _kl_of_flat(theta, meta, settings)(base).abs().item() < 1e-12
    assert torch.linalg.eigvalsh(hessian).min().item() > -1e-10


# LVC's meta-gradient is by design not the derivative of the surrogate's value (its stop-gradient
# keeps the importance ratio at 1 while adding a score-outer-product term), so finite differences
# and gradcheck apply to the REINFORCE estimator; LVC has its own oracle below.
EXACT = ["1step", "2steps"]


@pytest.mark.parametrize("case", EXACT)
def test_finite_difference_fvp_agrees_with_exact(case: str) -> None:
    settings = SETTINGS[case]
    theta = _theta()
    meta = _meta_batch(theta, settings)
    v = torch.randn(trpo.flatten(theta).numel(), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = metarl.fisher_vector_product(theta, meta, settings, OBS, "exact")(v)
    fd = metarl.fisher_vector_product(theta, meta, settings, OBS, "finite-difference", fd_eps=1e-5)(v)
    torch.testing.assert_close(fd, exact, rtol=1e-6, atol=1e-8)


def test_first_order_fvp_ignores_the_inner_jacobian() -> None:
    settings = SETTINGS["1step"]
    theta = _theta()
    meta = _meta_batch(theta, settings)
    base = trpo.flatten(theta)
    v = torch.randn(base.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    first = metarl.fisher_vector_product(theta, meta, settings, OBS, "first-order")(v)
    reference = torch.autograd.functional.hessian(_kl_of_flat(theta, meta, settings, first_order=True), base) @ v
    torch.testing.assert_close(first, reference, rtol=1e-10, atol=1e-12)
    exact = metarl.fisher_vector_product(theta, meta, settings, OBS, "exact")(v)
    assert (first - exact).norm() > 1e-3 * exact.norm()


@pytest.mark.parametrize("case", EXACT)
def test_meta_gradient_passes_gradcheck(case: str) -> None:
    settings = SETTINGS[case]
    theta = _theta()
    meta = _meta_batch(theta, settings)

    def surrogate(v: torch.Tensor) -> torch.Tensor:
        return metarl.surrogate_and_kl(trpo.unflatten(v, theta), meta, settings, OBS)[0]

    assert torch.autograd.gradcheck(surrogate, (trpo.flatten(theta).clone().requires_grad_(True),), eps=1e-6,
                                    atol=1e-7, rtol=1e-5)


def test_inner_step_equals_per_task_autograd_reference() -> None:
    settings = SETTINGS["1step"]
    theta = _theta()
    traj = _trajectories(torch.Generator().manual_seed(7))
    adv = baselines.advantages(traj.obs, traj.rewards, traj.mask, settings.gamma)
    adapted = metarl.inner_step(theta, metarl.pack(traj, adv), 0.3, settings, OBS)
    for i in range(T):
        params = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        logp = policies.log_prob(params, traj.obs[i], traj.actions[i])
        loss = -(logp * adv[i] * traj.mask[i]).sum() / traj.mask[i].sum()
        grads = torch.autograd.grad(loss, list(params.values()))
        for (name, p), g in zip(params.items(), grads):
            torch.testing.assert_close(adapted[name][i], p.detach() - 0.3 * g, rtol=1e-12, atol=1e-14)


def test_lvc_has_the_same_inner_gradient_but_a_different_meta_gradient() -> None:
    theta = _theta()
    traj = _trajectories(torch.Generator().manual_seed(8))
    batch = metarl.pack(traj, baselines.advantages(traj.obs, traj.rewards, traj.mask, 0.99))
    plain = metarl.inner_step(theta, batch, 0.3, SETTINGS["1step"], OBS)
    lvc = metarl.inner_step(theta, batch, 0.3, SETTINGS["lvc"], OBS)
    for name in theta:
        torch.testing.assert_close(lvc[name], plain[name], rtol=1e-12, atol=1e-14)
    meta = _meta_batch(theta, SETTINGS["1step"])
    flat = trpo.flatten(theta).clone().requires_grad_(True)
    grads = [torch.autograd.grad(metarl.surrogate_and_kl(trpo.unflatten(flat, theta), meta, SETTINGS[c], OBS)[0],
                                 flat)[0] for c in ("1step", "lvc")]
    # Oracle: LVC adds alpha * sum_i C_i^T dL/dtheta'_i with C_i = sum_n A_n s_n s_n^T / count_i, s_n the
    # per-sample score d log pi(a_n | s_n) / d theta (from a Jacobian, not from the estimator's graph).
    at_meta = metarl.adapted_policies(theta, meta.batches, SETTINGS["1step"], OBS)
    adapted = {k: v.detach().requires_grad_(True) for k, v in at_meta.items()}
    post_loss, _ = metarl.post_objective(adapted, meta, SETTINGS["1step"])
    post_grads = torch.autograd.grad(post_loss, list(adapted.values()))
    (support,) = meta.batches
    extra = torch.zeros_like(grads[0])
    for i in range(T):
        obs, actions = support.x[i, ..., :OBS], support.x[i, ..., OBS:]
        adv, mask = support.y[i, ..., 0], support.y[i, ..., 1]

        def logp_of(v: torch.Tensor, obs=obs, actions=actions) -> torch.Tensor:  # noqa: ANN001
            return policies.log_prob(trpo.unflatten(v, theta), obs, actions).reshape(-1)

        scores = torch.autograd.functional.jacobian(logp_of, trpo.flatten(theta))
        weights = (adv * mask).reshape(-1) / mask.sum()
        curvature = scores.T @ (weights[:, None] * scores)
        extra += 0.3 * curvature @ trpo.flatten([g[i] for g in post_grads])
    torch.testing.assert_close(grads[1] - grads[0], extra, rtol=1e-9, atol=1e-12)
    assert extra.norm() > 1e-3 * grads[0].norm()


def test_discounted_returns_match_a_hand_loop() -> None:
    traj = _trajectories(torch.Generator().manual_seed(9))
    returns = baselines.discounted_returns(traj.rewards, traj.mask, 0.9)
    for t_idx in range(T):
        for b in range(B):
            length = int(traj.mask[t_idx, b].sum())
            for t in range(length):
                expected = sum(0.9 ** (k - t) * traj.rewards[t_idx, b, k].item() for k in range(t, length))
                assert returns[t_idx, b, t].item() == pytest.approx(expected, rel=1e-12)
            assert returns[t_idx, b, length:].abs().sum().item() == 0


def test_linear_baseline_recovers_a_planted_linear_target() -> None:
    traj = _trajectories(torch.Generator().manual_seed(10))
    features = baselines.baseline_features(traj.obs, traj.mask)
    true = torch.randn(T, features.shape[-1], generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    targets = torch.einsum("tbhf,tf->tbh", features, true)
    fitted = baselines.fit_linear_baseline(features, targets, traj.mask, reg=1e-12)
    torch.testing.assert_close(baselines.predict_baseline(features, fitted) * traj.mask, targets * traj.mask,
                               rtol=1e-6, atol=1e-8)


def test_advantages_are_centred_and_scaled_per_task_over_alive_steps() -> None:
    traj = _trajectories(torch.Generator().manual_seed(12))
    adv = baselines.advantages(traj.obs, traj.rewards, traj.mask, 0.99)
    for i in range(T):
        alive = adv[i][traj.mask[i].bool()]
        assert alive.mean().item() == pytest.approx(0, abs=1e-10)
        assert alive.std(unbiased=False).item() == pytest.approx(1, rel=1e-6)
        assert adv[i][~traj.mask[i].bool()].abs().sum().item() == 0


def test_trpo_step_improves_the_surrogate_within_the_trust_region() -> None:
    settings = SETTINGS["1step"]
    theta = _theta()
    meta = _meta_batch(theta, settings)
    outer = metarl.OuterSettings(max_kl=0.01)
    new_theta, stats = metarl.trpo_step(theta, meta, settings, outer, OBS)
    assert stats["step_accepted"] == 1.0
    loss, kl = metarl.surrogate_and_kl(new_theta, meta, settings, OBS)
    assert -loss.item() > stats["surrogate_before"]
    assert 0 < kl.item() <= 0.01
    assert kl.item() > 0.001  # the step uses the trust region, not a vanishing fraction of it


def test_ppo_step_improves_the_clipped_surrogate() -> None:
    settings = SETTINGS["1step"]
    theta = _theta()
    meta = _meta_batch(theta, settings)
    outer = metarl.OuterSettings(method="ppo", ppo_epochs=5, ppo_lr=1e-2)
    before, _ = metarl.surrogate_and_kl(theta, meta, settings, OBS, clip=0.2)
    state: dict = {}
    new_theta, stats = metarl.ppo_step(theta, meta, settings, outer, OBS, state)
    after, kl = metarl.surrogate_and_kl(new_theta, meta, settings, OBS, clip=0.2)
    assert after.item() < before.item() and kl.item() > 0
    assert state["state"]  # Adam's moments, for the checkpoint


# The closed-form outer step (Gauss-Newton products through the linearised inner steps) against the
# double backward it replaces, in every setting it covers, and its fallback away from the sampling policies.
CLOSED_FORM = {**SETTINGS,
               "tanh": metarl.InnerSettings(lrs=(0.3,), nonlinearity="tanh"),
               "lvc-2steps": metarl.InnerSettings(lrs=(0.3, 0.15), estimator="lvc"),
               "first-order-inner": metarl.InnerSettings(lrs=(0.3,), first_order=True)}


def _meta_batch_for(theta: dict, settings: metarl.InnerSettings, seed: int = 1) -> metarl.MetaBatch:
    """As ``_meta_batch``, with the settings' nonlinearity for the sampling policies' statistics."""
    meta = _meta_batch(theta, settings, seed)
    params = metarl.adapted_policies(theta, meta.batches, settings, OBS)
    nl = settings.nonlinearity
    meta.old_logp = torch.func.vmap(lambda p, o, a: policies.log_prob(p, o, a, nl))(params, meta.post.obs,
                                                                                  meta.post.actions)
    meta.old_mean = torch.func.vmap(lambda p, o: policies.action_mean(p, o, nl))(params, meta.post.obs)
    return meta


@pytest.mark.parametrize("case", list(CLOSED_FORM))
@pytest.mark.parametrize("method", ["exact", "first-order"])
def test_closed_form_fvp_equals_the_double_backward(case: str, method: str) -> None:
    settings = CLOSED_FORM[case]
    theta = _theta()
    meta = _meta_batch_for(theta, settings)
    linear = closed_form.OuterLinearization(theta, meta, settings, OBS)
    assert linear.gauss_newton_exact
    reference = metarl.fisher_vector_product(
        theta, meta, settings, OBS, "exact-double-backward" if method == "exact" else "first-order")
    fvp = metarl.fisher_vector_product(theta, meta, settings, OBS, method)
    for seed in (3, 4):
        v = torch.randn(trpo.flatten(theta).numel(), generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
        expected = metarl._autograd_fisher_vector_product(theta, meta, settings, OBS, "exact-double-backward"
                                                          if method == "exact" else "first-order", 1e-5)(v)
        torch.testing.assert_close(linear.fisher_vector_product(method == "first-order")(v), expected,
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fvp(v), reference(v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", list(CLOSED_FORM))
def test_closed_form_meta_gradient_equals_autograd(case: str) -> None:
    settings = CLOSED_FORM[case]
    theta = _theta()
    meta = _meta_batch_for(theta, settings)
    for point in (theta, {k: v + 0.05 for k, v in theta.items()}):  # also away from the sampling policies
        flat = trpo.flatten(point).clone().requires_grad_(True)
        loss, _ = metarl.surrogate_and_kl(trpo.unflatten(flat, point), meta, settings, OBS)
        (expected,) = torch.autograd.grad(loss, flat)
        linear = closed_form.OuterLinearization(point, meta, settings, OBS)
        torch.testing.assert_close(linear.loss, loss.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(linear.gradient(), expected, rtol=1e-10, atol=1e-12)


def test_fvp_away_from_the_sampling_policies_falls_back_to_the_double_backward() -> None:
    """There the KL's gradient does not vanish and the Gauss-Newton form is not its Hessian."""
    settings = SETTINGS["1step"]
    theta = _theta()
    meta = _meta_batch(theta, settings)
    moved = {k: v + 0.05 for k, v in theta.items()}
    assert not closed_form.OuterLinearization(moved, meta, settings, OBS).gauss_newton_exact
    base = trpo.flatten(moved)
    hessian = torch.autograd.functional.hessian(_kl_of_flat(moved, meta, settings), base)
    v = torch.randn(base.numel(), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    fvp = metarl.fisher_vector_product(moved, meta, settings, OBS, "exact")
    torch.testing.assert_close(fvp(v), hessian @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["1step", "2steps", "lvc"])
def test_trpo_step_matches_the_double_backward_reference(case: str) -> None:
    settings = SETTINGS[case]
    theta = _theta()
    meta = _meta_batch(theta, settings)
    results = [metarl.trpo_step(theta, meta, settings, metarl.OuterSettings(hvp=hvp), OBS)
               for hvp in ("exact", "exact-double-backward")]
    (fast, fast_stats), (reference, reference_stats) = results
    for name in theta:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-9, atol=1e-11)
    assert fast_stats == pytest.approx(reference_stats, rel=1e-8, abs=1e-12)
