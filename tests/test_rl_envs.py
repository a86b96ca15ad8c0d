"""Meta-RL environments: 2D navigation against its gymnasium form, MuJoCo families against the simulator.

The MuJoCo rewards and observations are checked against a reference written here from scratch: a
plain ``MjData`` per env stepped with ``mj_step`` on a model compiled straight from gymnasium's XML,
and the reward formulas spelled out again. Every test runs in a temporary working directory because
MuJoCo writes ``MUJOCO_LOG.TXT`` into the current one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastmaml.rl import envs as E

REPO = Path(__file__).resolve().parents[1]
MUJOCO_NAMES = ("halfcheetah_vel", "halfcheetah_dir", "ant_vel", "ant_dir")


@pytest.fixture(autouse=True)
def _tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Keep MuJoCo's log out of the repository, and prove it stayed out."""
    log = REPO / "MUJOCO_LOG.TXT"
    before = log.stat().st_mtime_ns if log.exists() else None
    monkeypatch.chdir(tmp_path)
    yield
    after = log.stat().st_mtime_ns if log.exists() else None
    assert after == before, "a test wrote MUJOCO_LOG.TXT into the repository"


@pytest.fixture
def mujoco():
    pytest.importorskip("gymnasium")
    return pytest.importorskip("mujoco")


# --------------------------------------------------------------------------------------------------
# 2D navigation


def test_navigation2d_passes_gymnasium_env_checker():
    gymnasium = pytest.importorskip("gymnasium")
    from gymnasium.envs.registration import EnvSpec
    from gymnasium.utils.env_checker import check_env

    # Through a spec (not registered globally) so the checker can also test render modes and close.
    spec = EnvSpec("fastmaml/Navigation2D-v0", entry_point=E.Navigation2DEnv, max_episode_steps=100)
    env = gymnasium.make(spec)
    check_env(env.unwrapped)
    env.close()


@pytest.mark.parametrize("squared", [False, True])
def test_vector_navigation_matches_single_env_step_by_step(squared: bool):
    pytest.importorskip("gymnasium")
    rng = np.random.default_rng(0)
    vec = E.make_batch_env("navigation2d", squared_distance=squared)
    goals = vec.sample_tasks(rng, 6)
    goals[0] = [0.3, -0.2]  # reachable exactly by the scripted actions below, so one env terminates
    vec.set_tasks(goals)
    singles = [E.Navigation2DEnv(squared_distance=squared) for _ in goals]
    for env, goal in zip(singles, goals):
        env.set_task(goal)
    obs = vec.reset(rng)
    for env, o in zip(singles, obs):
        np.testing.assert_array_equal(env.reset(seed=1)[0], o)
    actions = 2.0 * rng.standard_normal((vec.horizon, 6, 2))  # often outside [-1, 1]: clipping checked
    actions[:3, 0] = [1.0, -2.0 / 3.0]
    saw_done = False
    for t in range(vec.horizon):
        obs, reward, done = vec.step(actions[t])
        assert obs.shape == (6, 2) and reward.shape == (6,) and done.dtype == bool
        for i, env in enumerate(singles):
            o, r, terminated, truncated, _ = env.step(actions[t, i])
            np.testing.assert_allclose(o, obs[i], rtol=0, atol=1e-12)
            assert r == pytest.approx(reward[i], abs=1e-12)
            assert terminated == done[i]
            assert truncated == (t == vec.horizon - 1)
        saw_done |= bool(done[0])
    assert saw_done


def test_navigation_goals_in_range():
    goals = E.make_batch_env("navigation2d").sample_tasks(np.random.default_rng(0), 5000)
    assert goals.shape == (5000, 2) and goals.dtype == np.float64
    assert goals.min() >= -0.5 and goals.max() <= 0.5
    assert goals.min() < -0.49 and goals.max() > 0.49  # spans the square, not a corner of it


@pytest.mark.parametrize("squared", [False, True])
def test_navigation_reward_and_termination(squared: bool):
    env = E.make_batch_env("navigation2d", squared_distance=squared)
    env.set_tasks(np.array([[0.3, -0.2], [0.0, 0.5], [0.105, 0.0]]))
    np.testing.assert_array_equal(env.reset(np.random.default_rng(0)), np.zeros((3, 2)))
    obs, reward, done = env.step(np.array([[5.0, -5.0], [0.0, 1.0], [1.0, 0.0]]))  # clipped to +-1
    np.testing.assert_allclose(obs, [[0.1, -0.1], [0.0, 0.1], [0.1, 0.0]])
    dist2 = np.array([0.2**2 + 0.1**2, 0.4**2, 0.005**2])
    np.testing.assert_allclose(reward, -dist2 if squared else -np.sqrt(dist2), rtol=1e-12)
    # Env 2 is within 0.01 of its goal in both coordinates: terminated; the others are not.
    np.testing.assert_array_equal(done, [False, False, True])
    for _ in range(2):
        obs, reward, done = env.step(np.array([[1.0, -0.5], [0.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(obs[0], [0.3, -0.2], atol=1e-12)
    assert done[0] and reward[0] == pytest.approx(0.0, abs=1e-12)
    # Close in x only is not enough.
    env.set_tasks(np.array([[0.1, 0.05]]))
    env.reset(np.random.default_rng(0))
    assert not env.step(np.array([[1.0, 0.0]]))[2][0]


def test_navigation_is_deterministic_from_the_rng():
    def run(seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        env = E.make_batch_env("navigation2d")
        env.set_tasks(env.sample_tasks(rng, 4))
        out = [env.reset(rng)]
        for _ in range(5):
            out.extend(env.step(rng.uniform(-1, 1, (4, 2)))[:2])
        return out

    for a, b in zip(run(3), run(3)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(run(3)[2], run(4)[2])


def test_navigation2d_needs_neither_gymnasium_nor_mujoco():
    code = (
        "import sys, numpy as np\n"
        "from fastmaml.rl.envs import make_batch_env\n"
        "env = make_batch_env('navigation2d')\n"
        "env.set_tasks(env.sample_tasks(np.random.default_rng(0), 2))\n"
        "env.reset(np.random.default_rng(0)); env.step(np.zeros((2, 2)))\n"
        "assert 'gymnasium' not in sys.modules and 'mujoco' not in sys.modules, 'imported eagerly'\n"
    )
    environ = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ)
    assert result.returncode == 0, result.stderr


def test_unknown_name_and_misplaced_options_are_errors():
    with pytest.raises(ValueError, match="navigation2d, halfcheetah_vel, halfcheetah_dir, ant_vel, ant_dir"):
        E.make_batch_env("cheetah")
    with pytest.raises(ValueError, match="frame_skip"):
        E.make_batch_env("navigation2d", frame_skip=5)
    with pytest.raises(ValueError, match="squared_distance"):
        E.make_batch_env("ant_vel", squared_distance=True)
    env = E.make_batch_env("navigation2d")
    with pytest.raises(ValueError, match="tasks must have shape"):
        env.set_tasks(np.zeros((3, 1)))
    env.set_tasks(np.zeros((3, 2)))
    env.reset(np.random.default_rng(0))
    with pytest.raises(ValueError, match="actions must have shape"):
        env.step(np.zeros((2, 2)))


# --------------------------------------------------------------------------------------------------
# MuJoCo: an independent reference


def reference_step(mujoco, model, data, action: np.ndarray, frame_skip: int, name: str, task: float):
    """One policy step of one env, reward and observation from the raw simulator state."""
    a = np.clip(action, -1.0, 1.0)  # both models' actuators have ctrlrange [-1, 1]
    x_before = data.qpos[0]
    data.ctrl[:] = a
    mujoco.mj_step(model, data, frame_skip)
    mujoco.mj_rnePostConstraint(model, data)
    v = (data.qpos[0] - x_before) / (model.opt.timestep * frame_skip)
    forward = -abs(v - task) if name.endswith("_vel") else task * v
    if name.startswith("halfcheetah"):
        reward = forward - 0.05 * np.sum(a**2)
        obs = np.concatenate([data.qpos[1:], data.qvel])
        done = False
    else:
        forces = np.clip(data.cfrc_ext, -1.0, 1.0)
        bonus = 1.0 if name == "ant_vel" else 0.0
        reward = forward + bonus - 0.005 * np.sum(a**2) - 0.0005 * np.sum(forces**2) + 0.05
        obs = np.concatenate([data.qpos[2:], data.qvel, forces[1:].ravel()])
        state = np.concatenate([data.qpos, data.qvel])
        done = not (np.isfinite(state).all() and 0.2 <= data.qpos[2] <= 1.0)
    return obs, reward, done


@pytest.mark.parametrize("name", MUJOCO_NAMES)
@pytest.mark.parametrize("frame_skip", [None, 1])
def test_mujoco_reward_and_obs_match_the_simulator(mujoco, name: str, frame_skip: int | None):
    env = E.make_batch_env(name, frame_skip=frame_skip)
    skip = 5 if frame_skip is None else frame_skip
    assert env.dt == pytest.approx(0.01 * skip) and env.horizon == 200
    rng = np.random.default_rng(1)
    n = 3
    env.set_tasks(env.sample_tasks(rng, n))
    obs = env.reset(rng)
    assert obs.shape == (n, env.observation_dim) and obs.dtype == np.float64
    assert env.observation_dim == (17 if name.startswith("halfcheetah") else 105)
    model = mujoco.MjModel.from_xml_path(E.gymnasium_asset(env.xml_file))  # gymnasium's own way to load
    datas = []
    for i in range(n):
        data = mujoco.MjData(model)
        data.qpos[:], data.qvel[:] = env.qpos[i], env.qvel[i]
        mujoco.mj_forward(model, data)
        datas.append(data)
    for _ in range(8):
        actions = 1.5 * rng.standard_normal((n, env.action_dim))  # partly outside [-1, 1]
        obs, reward, done = env.step(actions)
        assert reward.shape == (n,) and done.shape == (n,) and done.dtype == bool
        for i, data in enumerate(datas):
            ref_obs, ref_reward, ref_done = reference_step(mujoco, model, data, actions[i], skip, name, env.tasks[i, 0])
            np.testing.assert_array_equal(obs[i], ref_obs)  # bit for bit: same simulator, same state
            assert reward[i] == pytest.approx(ref_reward, rel=1e-12, abs=1e-12)
            assert not done[i] and not ref_done  # 8 steps of random actions keep the ant up


@pytest.mark.parametrize("name", MUJOCO_NAMES)
def test_mujoco_tasks_in_range(mujoco, name: str):
    env = E.make_batch_env(name)
    tasks = env.sample_tasks(np.random.default_rng(0), 4000)
    assert tasks.shape == (4000, 1) and tasks.dtype == np.float64
    if name.endswith("_dir"):
        assert set(np.unique(tasks)) == {-1.0, 1.0}
        assert abs(np.mean(tasks)) < 0.1  # equal odds
    else:
        high = 2.0 if name.startswith("halfcheetah") else 3.0
        assert tasks.min() >= 0.0 and tasks.max() <= high
        assert tasks.min() < 0.01 * high and tasks.max() > 0.99 * high


@pytest.mark.parametrize("name", ["halfcheetah_vel", "ant_dir"])
def test_mujoco_is_deterministic_from_the_rng(mujoco, name: str):
    def run(rng: np.random.Generator) -> list[np.ndarray]:
        env = E.make_batch_env(name)
        env.set_tasks(env.sample_tasks(rng, 3))
        out = [env.reset(rng)]
        for _ in range(4):
            out.extend(env.step(rng.uniform(-1, 1, (3, env.action_dim)))[:2])
        return out

    first = run(np.random.default_rng(7))
    for a, b in zip(first, run(np.random.default_rng(7))):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], run(np.random.default_rng(8))[0])
    # A saved generator state resumes exactly: the reset noise comes from the rng alone.
    env = E.make_batch_env(name)
    rng = np.random.default_rng(9)
    env.set_tasks(env.sample_tasks(rng, 3))
    env.reset(rng)
    saved = rng.bit_generator.state
    expected = env.reset(rng)
    resumed = np.random.default_rng(0)
    resumed.bit_generator.state = saved
    np.testing.assert_array_equal(env.reset(resumed), expected)


def test_ant_termination_rule_and_frozen_envs(mujoco):
    qpos = np.zeros((6, 15))
    qpos[:, 2] = [0.19, 0.2, 0.6, 1.0, 1.01, 0.6]
    qvel = np.zeros((6, 14))
    qvel[5, 3] = np.nan
    np.testing.assert_array_equal(E.ant_terminated(qpos, qvel), [True, False, False, False, True, True])

    env = E.make_batch_env("ant_vel")
    rng = np.random.default_rng(0)
    env.set_tasks(env.sample_tasks(rng, 2))
    env.reset(rng)
    qpos, qvel = env.qpos, env.qvel
    qpos[0, 2] = 1.6  # dropped from high above the healthy range: still above 1.0 after one step
    env.set_state(qpos, qvel)
    obs, reward, done = env.step(np.zeros((2, env.action_dim)))
    np.testing.assert_array_equal(done, [True, False])
    assert env.qpos[0, 2] > 1.0
    # A terminated env is frozen: same observation, zero reward, still done; the other one moves on.
    frozen_qpos = env.qpos[0]
    obs2, reward2, done2 = env.step(np.ones((2, env.action_dim)))
    np.testing.assert_array_equal(obs2[0], obs[0])
    np.testing.assert_array_equal(env.qpos[0], frozen_qpos)
    assert reward2[0] == 0.0 and done2[0] and not done2[1]
    assert not np.array_equal(obs2[1], obs[1])
    env.reset(rng)
    assert not env.done.any()


@pytest.mark.parametrize("name", ["halfcheetah_vel", "ant_dir"])
def test_diverging_physics_ends_the_episode(mujoco, name: str):
    env = E.make_batch_env(name)
    rng = np.random.default_rng(0)
    env.set_tasks(env.sample_tasks(rng, 3))
    env.reset(rng)
    qpos, qvel = env.qpos, env.qvel
    qvel[1, 0] = 1e11  # beyond MuJoCo's limit: it resets that simulation and logs a warning
    env.set_state(qpos, qvel)
    _, reward, done = env.step(np.zeros((3, env.action_dim)))  # first step: caught by the warning counters
    np.testing.assert_array_equal(done, [False, True, False])
    assert reward[1] == 0.0
    assert Path("MUJOCO_LOG.TXT").exists()  # in the test's temporary directory
    env.reset(rng)
    env.step(np.zeros((3, env.action_dim)))
    env._state[2, env._qvel.start] = 1e11  # mid-episode (white box: set_state would restart the clock)
    _, reward, done = env.step(np.zeros((3, env.action_dim)))  # caught by the simulation clock
    np.testing.assert_array_equal(done, [False, False, True])
    assert reward[2] == 0.0 and np.isfinite(reward).all()


@pytest.mark.parametrize(
    "name, gym_module, gym_class",
    [("halfcheetah_dir", "half_cheetah_v5", "HalfCheetahEnv"), ("ant_dir", "ant_v5", "AntEnv")],
)
def test_physics_matches_gymnasium_v5(mujoco, name: str, gym_module: str, gym_class: str):
    import importlib

    gym_env = getattr(importlib.import_module(f"gymnasium.envs.mujoco.{gym_module}"), gym_class)()
    env = E.make_batch_env(name)
    rng = np.random.default_rng(3)
    env.set_tasks(np.array([[1.0]]))
    env.reset(rng)
    gym_env.reset(seed=0)
    gym_env.set_state(env.qpos[0], env.qvel[0])
    assert gym_env.dt == env.dt
    for _ in range(20):
        action = rng.uniform(-1.0, 1.0, env.action_dim)
        x_before = gym_env.data.qpos[0]
        gym_obs, _, _, _, _ = gym_env.step(action)
        obs, reward, _ = env.step(action[None])
        np.testing.assert_array_equal(obs[0], gym_obs)
        if name.startswith("halfcheetah"):  # with d = +1, the reward is gymnasium's minus half its control cost
            v = (gym_env.data.qpos[0] - x_before) / gym_env.dt
            assert reward[0] == pytest.approx(v - 0.05 * np.sum(action**2), abs=1e-10)
    gym_env.close()


def test_loaded_model_is_gymnasiums(mujoco):
    for xml in ("half_cheetah.xml", "ant.xml"):
        ours, theirs = E.load_model(xml), mujoco.MjModel.from_xml_path(E.gymnasium_asset(xml))
        for field in ("body_mass", "body_inertia", "body_ipos", "dof_invweight0", "actuator_gear", "geom_size"):
            np.testing.assert_array_equal(getattr(ours, field), getattr(theirs, field), err_msg=field)


def test_mujoco_misuse_is_an_error(mujoco):
    env = E.make_batch_env("halfcheetah_vel")
    with pytest.raises(RuntimeError, match="set_tasks"):
        env.reset(np.random.default_rng(0))
    env.set_tasks(np.ones((2, 1)))
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros((2, 6)))
    env.reset(np.random.default_rng(0))
    with pytest.raises(ValueError, match="actions must have shape"):
        env.step(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="frame_skip"):
        E.make_batch_env("ant_dir", frame_skip=0)


@pytest.mark.parametrize("name", ["navigation2d", "halfcheetah_vel", "ant_dir"])
def test_set_task_gives_one_env_with_that_task(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    if name != "navigation2d":
        pytest.importorskip("mujoco")
    env = E.make_batch_env(name)
    rng = np.random.default_rng(0)
    task = env.sample_tasks(rng, 1)[0]
    env.set_task(task)
    obs = env.reset(rng)
    assert env.num_envs == 1 and obs.shape == (1, env.observation_dim)
    _, reward, done = env.step(np.zeros((1, env.action_dim)))
    assert reward.shape == (1,) and done.shape == (1,)
