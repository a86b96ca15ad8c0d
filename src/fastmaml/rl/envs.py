"""Task families for meta-reinforcement learning as in MAML (Finn et al. 2017, section 5.3).

Every family implements :class:`BatchEnv`: ``num_envs`` copies of one environment, each with its own
task, stepped as one array call. The sampler owns episode length (``horizon``) and ignores an env's
outputs once it reported ``done``; ``done`` means terminated, never the time limit. All randomness
comes from the ``numpy.random.Generator`` passed in (``sample_tasks``, ``reset``), so a run that
saves its generator state resumes exactly. ``make_batch_env`` builds one by name.

Families and how they follow / differ from the original code (cbfinn/maml_rl on rllab, MuJoCo 1.31
through mujoco-py):

- ``navigation2d`` (``point_env_randgoal.py`` behind rllab's ``normalize``): point starts at the
  origin, goal ~ U[-0.5, 0.5]^2, action clipped to [-1, 1] and scaled by 0.1, reward = minus the
  Euclidean distance to the goal after the move (``squared_distance=True``: minus its square, as the
  paper's text), terminated when both coordinates are within 0.01 of the goal, horizon 100. Same as
  the original. Numpy only; a terminated env keeps moving if stepped (its outputs are ignored).
- ``halfcheetah_vel`` / ``halfcheetah_dir`` (``half_cheetah_env_rand[_direc].py``): target speed
  v* ~ U[0, 2] / direction d = +-1; reward -|v - v*| - 0.05 |a|^2 / d v - 0.05 |a|^2. Never terminates.
- ``ant_vel`` / ``ant_dir`` (``ant_env_rand[_direc].py``): v* ~ U[0, 3] / d = +-1; reward
  F - 0.005 |a|^2 - 0.0005 sum(clip(cfrc_ext, -1, 1)^2) + 0.05 (survive), with forward term
  F = -|v - v*| + 1.0 (``ant_vel``: the original has this +1.0, "make it happy, not suicidal"; kept) or
  F = d v (``ant_dir``). Terminated when qpos, qvel are not finite or the torso height qpos[2] leaves
  [0.2, 1.0], as the original.
- Either robot's episode also ends (reward 0 for that step) if the physics diverges: MuJoCo then resets
  the simulation and writes a warning to ``MUJOCO_LOG.TXT``, where the original's state went non-finite.
  A terminated MuJoCo env is frozen: later steps leave it in place and return its last observation,
  reward 0 and done.

Differences from the original, all deliberate:

- Physics: MuJoCo 3/4 with gymnasium's v5 models (``half_cheetah.xml``, ``ant.xml``), not the rllab
  models on MuJoCo 1.31. The ant's actuators take [-1, 1] with gear 150 where rllab's took [-150, 150]
  with gear 1 and divided by 150 in the control cost: the same. Its initial pose is the model's own
  (torso at 0.75), not rllab's ``init_qpos`` numeric.
- Time step: ``frame_skip`` physics steps (default 5, gymnasium's) per policy step; both models have
  a 0.01 s physics step, so dt = 0.05 s by default. ``frame_skip=1`` gives dt = 0.01 s, the original
  cheetah's; the original ant ran one RK4 step of 0.02 s, which ``frame_skip=2`` matches in dt.
- Velocity v: the finite difference (x_after - x_before) / dt of the torso's x (``qpos[0]``: the
  cheetah's ``rootx`` slider, the ant's free joint) over the policy step, as gymnasium's
  HalfCheetah-v5. The original read an instantaneous velocity of the torso after the step (mujoco-py's
  ``body_comvels`` through ``get_body_comvel``); gymnasium's Ant-v5 differences ``data.xpos``, which
  lags a physics step behind ``qpos``.
- Observation: gymnasium v5's. Cheetah (17): qpos[1:], qvel. Ant (105): qpos[2:], qvel and the
  contact forces clip(cfrc_ext[1:], -1, 1) (Ant-v5's default; ``include_contact_forces=False`` gives
  27). The original appended the torso's centre of mass (cheetah) and also the full qpos, all 14
  bodies' forces, the torso's orientation matrix and centre of mass (ant).
- Initial state: gymnasium's noise, qpos + U[-0.1, 0.1], qvel + 0.1 N(0, 1), from the rng given to
  ``reset`` (the original drew qpos noise as 0.01 N(0, 1) from numpy's global generator).
- Actions are clipped to the action space before the physics and the control cost, as rllab's
  ``normalize`` did.

The MuJoCo batch envs run one ``MjModel`` and one ``MjData`` on one thread: each step swaps every
env's full physics state (including the solver warm start and the control) in and out with
``mj_setState`` / ``mj_getState``. That is bit-for-bit the same as stepping separate ``MjData``
(and as gymnasium's env for the same state and actions), about 15% faster than a loop over one
``MjData`` per env (the one data stays in cache), and within a few percent of ``mujoco.rollout``
called once per policy step, which restarts the solver's warm start every call and cannot return
the ant's contact forces. ``benchmarks/rl_env_speed.py`` measures all three.

gymnasium and mujoco are imported only when a MuJoCo env or :class:`Navigation2DEnv` (a
``gymnasium.Env``, built on first access) is used, so ``navigation2d`` needs numpy alone.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np

ENV_NAMES = ("navigation2d", "halfcheetah_vel", "halfcheetah_dir", "ant_vel", "ant_dir")


class BatchEnv(Protocol):
    """What the sampler steps: ``num_envs`` envs, one task each, as arrays."""

    observation_dim: int
    action_dim: int
    horizon: int

    def sample_tasks(self, rng: np.random.Generator, n: int) -> np.ndarray: ...

    def set_tasks(self, tasks: np.ndarray) -> None: ...

    def reset(self, rng: np.random.Generator) -> np.ndarray: ...

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def make_batch_env(name: str, frame_skip: int | None = None, squared_distance: bool = False) -> BatchEnv:
    """Build a task family by name, so configs and the sampler need not import the classes."""
    if name not in ENV_NAMES:
        raise ValueError(f"unknown env {name!r}; valid names: {', '.join(ENV_NAMES)}")
    if name == "navigation2d":
        if frame_skip is not None:
            raise ValueError("frame_skip applies to the MuJoCo envs only, not navigation2d")
        return VectorNavigation2D(squared_distance=squared_distance)
    if squared_distance:
        raise ValueError(f"squared_distance applies to navigation2d only, not {name}")
    robot, task = name.rsplit("_", 1)
    skip = 5 if frame_skip is None else frame_skip
    if robot == "halfcheetah":
        return HalfCheetahBatchEnv(task, frame_skip=skip)
    return AntBatchEnv(task, frame_skip=skip)


def _as_tasks(tasks: np.ndarray, task_dim: int) -> np.ndarray:
    """Validate a task array once at set_tasks, so a wrong shape fails there and not mid-rollout."""
    array = np.asarray(tasks, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != task_dim or array.shape[0] < 1:
        raise ValueError(f"tasks must have shape [num_envs >= 1, {task_dim}], got {array.shape}")
    return array.copy()


def _as_actions(actions: np.ndarray, num_envs: int, action_dim: int) -> np.ndarray:
    """Check the action batch shape; a silent broadcast here would hide a sampler bug."""
    array = np.asarray(actions, dtype=np.float64)
    if array.shape != (num_envs, action_dim):
        raise ValueError(f"actions must have shape {(num_envs, action_dim)}, got {array.shape}")
    return array


# --------------------------------------------------------------------------------------------------
# 2D navigation


NAV_GOAL_LOW, NAV_GOAL_HIGH = -0.5, 0.5
NAV_ACTION_SCALE = 0.1
NAV_GOAL_TOLERANCE = 0.01
NAV_HORIZON = 100


def _nav_sample_goals(rng: np.random.Generator, n: int) -> np.ndarray:
    """Goals uniform in the square [-0.5, 0.5]^2, as the original ``sample_goals``."""
    return rng.uniform(NAV_GOAL_LOW, NAV_GOAL_HIGH, size=(n, 2))


class VectorNavigation2D:
    """2D point navigation to a per-env goal, all envs as one numpy array (the batch form)."""

    observation_dim = 2
    action_dim = 2
    task_dim = 2
    horizon = NAV_HORIZON

    def __init__(self, squared_distance: bool = False) -> None:
        self.squared_distance = squared_distance
        self.num_envs = 0
        self.goals = np.zeros((0, 2))
        self.position = np.zeros((0, 2))

    def sample_tasks(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` goals [n, 2]."""
        return _nav_sample_goals(rng, n)

    def set_tasks(self, tasks: np.ndarray) -> None:
        """One goal per env; sets ``num_envs``. Call ``reset`` next."""
        self.goals = _as_tasks(tasks, self.task_dim)
        self.num_envs = len(self.goals)
        self.position = np.zeros((self.num_envs, 2))

    def set_task(self, task: np.ndarray) -> None:
        """One env with ``task`` (the single-task form of :meth:`set_tasks`). Call ``reset`` next."""
        self.set_tasks(np.asarray(task, dtype=float).reshape(1, -1))

    def reset(self, rng: np.random.Generator) -> np.ndarray:
        """Put every point at the origin (no noise: ``rng`` is unused, kept for the protocol)."""
        self.position = np.zeros((self.num_envs, 2))
        return self.position.copy()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Move by 0.1 * clip(action, -1, 1); reward and termination from the new position."""
        moves = np.clip(_as_actions(actions, self.num_envs, 2), -1.0, 1.0) * NAV_ACTION_SCALE
        self.position = self.position + moves
        offset = self.position - self.goals
        squared = np.sum(offset**2, axis=1)
        reward = -squared if self.squared_distance else -np.sqrt(squared)
        done = np.all(np.abs(offset) < NAV_GOAL_TOLERANCE, axis=1)
        return self.position.copy(), reward, done


def _build_navigation2d_env() -> type:
    """Define the gymnasium form on first use, so importing this module does not need gymnasium."""
    import gymnasium
    from gymnasium import spaces

    class Navigation2DEnv(gymnasium.Env):
        """One 2D navigation env as a ``gymnasium.Env``: the reference the vector form is tested against.

        Truncates after ``horizon`` (100) steps; ``set_task`` fixes the goal for later episodes.
        """

        metadata: dict[str, Any] = {"render_modes": []}
        horizon = NAV_HORIZON

        def __init__(self, goal: np.ndarray | None = None, squared_distance: bool = False) -> None:
            # Within an episode the point moves at most 0.1 per coordinate per step: |x| <= 10, plus slack
            # for rounding. Finite bounds, not the original's infinite ones, which gymnasium warns about.
            bound = NAV_ACTION_SCALE * (NAV_HORIZON + 1)
            self.observation_space = spaces.Box(-bound, bound, shape=(2,), dtype=np.float64)
            self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float64)
            self.squared_distance = squared_distance
            self._goal = np.zeros(2) if goal is None else np.asarray(goal, dtype=np.float64).reshape(2)
            self._position = np.zeros(2)
            self._steps = 0

        @staticmethod
        def sample_tasks(rng: np.random.Generator, n: int) -> np.ndarray:
            """Draw ``n`` goals [n, 2]."""
            return _nav_sample_goals(rng, n)

        def set_task(self, task: np.ndarray) -> None:
            """Set the goal used from the next step on."""
            self._goal = np.asarray(task, dtype=np.float64).reshape(2).copy()

        @property
        def goal(self) -> np.ndarray:
            """The current goal (a copy)."""
            return self._goal.copy()

        def reset(
            self, *, seed: int | None = None, options: dict[str, Any] | None = None
        ) -> tuple[np.ndarray, dict[str, Any]]:
            """Back to the origin; ``options={"task": goal}`` also sets the goal."""
            super().reset(seed=seed)
            if options is not None and "task" in options:
                self.set_task(options["task"])
            self._position = np.zeros(2)
            self._steps = 0
            return self._position.copy(), {"goal": self._goal.copy()}

        def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
            """Move by 0.1 * clip(action, -1, 1); reward and termination as the original."""
            move = np.clip(np.asarray(action, dtype=np.float64).reshape(2), -1.0, 1.0) * NAV_ACTION_SCALE
            self._position = self._position + move
            self._steps += 1
            dx, dy = self._position - self._goal
            squared = dx * dx + dy * dy
            reward = float(-squared if self.squared_distance else -np.sqrt(squared))
            terminated = bool(abs(dx) < NAV_GOAL_TOLERANCE and abs(dy) < NAV_GOAL_TOLERANCE)
            truncated = self._steps >= self.horizon
            return self._position.copy(), reward, terminated, truncated, {"goal": self._goal.copy()}

    return Navigation2DEnv


_LAZY: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """Build ``Navigation2DEnv`` (which subclasses ``gymnasium.Env``) only when it is asked for."""
    if name == "Navigation2DEnv":
        if name not in _LAZY:
            _LAZY[name] = _build_navigation2d_env()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------
# MuJoCo locomotion

MUJOCO_HORIZON = 200


def gymnasium_asset(xml_file: str) -> str:
    """Path of one of gymnasium's MuJoCo models, so the physics is exactly gymnasium v5's."""
    import gymnasium

    path = os.path.join(os.path.dirname(gymnasium.__file__), "envs", "mujoco", "assets", xml_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"gymnasium's MuJoCo model {xml_file} not found at {path}")
    return path


def load_model(xml_file: str) -> Any:
    """Compile a gymnasium model without MuJoCo's ``settotalmass`` deprecation warning.

    The warning would go to stderr and ``MUJOCO_LOG.TXT`` on every build. Applying the total mass
    after compiling (``mj_setTotalmass`` + ``mj_setConst``) gives a bit-identical model.
    """
    import mujoco

    path = gymnasium_asset(xml_file)
    if not hasattr(mujoco, "MjSpec"):  # mujoco < 3.2: compile as is, warning included
        return mujoco.MjModel.from_xml_path(path)
    spec = mujoco.MjSpec.from_file(path)
    total_mass = spec.compiler.settotalmass
    if total_mass <= 0:
        return spec.compile()
    spec.compiler.settotalmass = -1.0
    model = spec.compile()
    mujoco.mj_setTotalmass(model, total_mass)
    mujoco.mj_setConst(model, mujoco.MjData(model))
    return model


def _state_slice(mujoco: Any, model: Any, spec: int, element: int) -> slice:
    """Where one element of a ``mj_getState`` vector lies: elements come in ``mjtState`` bit order."""
    start = mujoco.mj_stateSize(model, spec & (element - 1))
    return slice(start, start + mujoco.mj_stateSize(model, element))


class _MujocoBatchEnv:
    """Shared physics of the locomotion families: one model, one data, states swapped per env."""

    xml_file = ""
    task_dim = 1
    horizon = MUJOCO_HORIZON
    ctrl_cost_weight = 0.0
    task_kinds = ("vel", "dir")
    vel_range = (0.0, 0.0)

    def __init__(self, task: str, frame_skip: int = 5, reset_noise_scale: float = 0.1) -> None:
        import mujoco

        if task not in self.task_kinds:
            raise ValueError(f"task must be one of {self.task_kinds}, got {task!r}")
        if int(frame_skip) < 1:
            raise ValueError(f"frame_skip must be >= 1, got {frame_skip}")
        self._mujoco = mujoco
        self.task = task
        self.model = load_model(self.xml_file)
        self._data = mujoco.MjData(self.model)
        self.frame_skip = int(frame_skip)
        self.dt = float(self.model.opt.timestep) * self.frame_skip
        self.reset_noise_scale = reset_noise_scale
        self.action_dim = int(self.model.nu)
        self.action_low = self.model.actuator_ctrlrange[:, 0].copy()
        self.action_high = self.model.actuator_ctrlrange[:, 1].copy()
        self.init_qpos = self._data.qpos.copy()
        self.init_qvel = self._data.qvel.copy()
        S = mujoco.mjtState
        self._spec = int(S.mjSTATE_FULLPHYSICS) | int(S.mjSTATE_WARMSTART) | int(S.mjSTATE_CTRL)
        self._state_size = mujoco.mj_stateSize(self.model, self._spec)
        self._time = _state_slice(mujoco, self.model, self._spec, int(S.mjSTATE_TIME)).start
        self._qpos = _state_slice(mujoco, self.model, self._spec, int(S.mjSTATE_QPOS))
        self._qvel = _state_slice(mujoco, self.model, self._spec, int(S.mjSTATE_QVEL))
        self._ctrl = _state_slice(mujoco, self.model, self._spec, int(S.mjSTATE_CTRL))
        W = mujoco.mjtWarning
        self._divergence_kinds = (W.mjWARN_BADQPOS, W.mjWARN_BADQVEL, W.mjWARN_BADQACC)
        self.num_envs = 0
        self.tasks = np.zeros((0, 1))
        self._state: np.ndarray | None = None
        self._done = np.zeros(0, dtype=bool)

    # ---- protocol ----------------------------------------------------------------------------

    def sample_tasks(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Target speeds U[vel_range] ("vel") or directions +-1 with equal odds ("dir"), [n, 1]."""
        if self.task == "vel":
            return rng.uniform(*self.vel_range, size=(n, 1))
        return np.where(rng.random((n, 1)) < 0.5, -1.0, 1.0)

    def set_tasks(self, tasks: np.ndarray) -> None:
        """One task per env; sets ``num_envs``. Call ``reset`` next."""
        self.tasks = _as_tasks(tasks, self.task_dim)
        self.num_envs = len(self.tasks)
        self._state = None
        self._done = np.zeros(self.num_envs, dtype=bool)

    def set_task(self, task: np.ndarray) -> None:
        """One env with ``task`` (the single-task form of :meth:`set_tasks`). Call ``reset`` next."""
        self.set_tasks(np.asarray(task, dtype=float).reshape(1, -1))

    def reset(self, rng: np.random.Generator) -> np.ndarray:
        """Initial states with gymnasium's noise drawn from ``rng``: qpos + U[-s, s], qvel + s N(0, 1)."""
        if self.num_envs == 0:
            raise RuntimeError("call set_tasks before reset")
        s = self.reset_noise_scale
        qpos = self.init_qpos + rng.uniform(-s, s, size=(self.num_envs, self.model.nq))
        qvel = self.init_qvel + s * rng.standard_normal((self.num_envs, self.model.nv))
        self.set_state(qpos, qvel)
        return self._observe()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Advance every live env by ``frame_skip`` physics steps; terminated envs stay frozen."""
        if self._state is None:
            raise RuntimeError("call reset before step")
        mujoco, model, data, spec = self._mujoco, self.model, self._data, self._spec
        action = np.clip(_as_actions(actions, self.num_envs, self.action_dim), self.action_low, self.action_high)
        state = self._state
        frozen = self._done.copy()
        x_before = state[:, self._qpos.start].copy()
        time_before = state[:, self._time].copy()
        state[:, self._ctrl] = action
        # MuJoCo answers a diverging simulation (bad qpos, qvel or qacc) by resetting it, clock included,
        # and logging a warning; such an env's step ends its episode with reward 0, as a non-finite state
        # did in the original. The clock shows it, except on an episode's first step, where the warning
        # counters are read instead (they cost 2 us per read, too much for every step).
        first = (time_before == 0.0).tolist()
        diverged = np.zeros(self.num_envs, dtype=bool)
        for i in np.flatnonzero(~frozen).tolist():
            mujoco.mj_setState(model, data, state[i], spec)
            if first[i]:
                warnings_before = self._divergence_warnings()
            mujoco.mj_step(model, data, self.frame_skip)
            if first[i]:
                diverged[i] = self._divergence_warnings() != warnings_before
            self._after_physics(i)
            mujoco.mj_getState(model, data, state[i], spec)
        velocity = (state[:, self._qpos.start] - x_before) / self.dt
        reward = self._reward(velocity, action)
        clock_ok = state[:, self._time] > time_before + (self.frame_skip - 0.5) * self.model.opt.timestep
        diverged |= ~frozen & ~clock_ok
        reward[frozen | diverged] = 0.0
        self._done = frozen | diverged | self._terminated()
        return self._observe(), reward, self._done.copy()

    # ---- state access (tests, evaluation) ----------------------------------------------------

    @property
    def qpos(self) -> np.ndarray:
        """Joint positions [num_envs, nq] (a copy)."""
        return self._require_state()[:, self._qpos].copy()

    @property
    def qvel(self) -> np.ndarray:
        """Joint velocities [num_envs, nv] (a copy)."""
        return self._require_state()[:, self._qvel].copy()

    @property
    def done(self) -> np.ndarray:
        """Which envs have terminated since the last reset (a copy)."""
        return self._done.copy()

    def set_state(self, qpos: np.ndarray, qvel: np.ndarray) -> None:
        """Start every env from the given joint state, as gymnasium's ``set_state`` (reset, set, forward)."""
        mujoco, model, data, spec = self._mujoco, self.model, self._data, self._spec
        qpos = np.asarray(qpos, dtype=np.float64).reshape(self.num_envs, model.nq)
        qvel = np.asarray(qvel, dtype=np.float64).reshape(self.num_envs, model.nv)
        self._state = np.empty((self.num_envs, self._state_size))
        self._init_buffers()
        for i in range(self.num_envs):
            mujoco.mj_resetData(model, data)
            data.qpos[:] = qpos[i]
            data.qvel[:] = qvel[i]
            mujoco.mj_forward(model, data)
            self._after_physics(i)
            mujoco.mj_getState(model, data, self._state[i], spec)
        self._done = np.zeros(self.num_envs, dtype=bool)

    def _divergence_warnings(self) -> int:
        warning = self._data.warning
        return sum(warning[int(kind)].number for kind in self._divergence_kinds)

    def _require_state(self) -> np.ndarray:
        if self._state is None:
            raise RuntimeError("call reset first")
        return self._state

    # ---- per-robot hooks ---------------------------------------------------------------------

    @property
    def observation_dim(self) -> int:
        """Length of one observation."""
        raise NotImplementedError

    def _init_buffers(self) -> None:
        """Allocate per-env buffers filled by ``_after_physics`` (none by default)."""

    def _after_physics(self, i: int) -> None:
        """Read what the state vector lacks from the shared data right after env ``i`` moved."""

    def _observe(self) -> np.ndarray:
        raise NotImplementedError

    def _reward(self, velocity: np.ndarray, action: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _terminated(self) -> np.ndarray:
        return np.zeros(self.num_envs, dtype=bool)

    def _forward_reward(self, velocity: np.ndarray) -> np.ndarray:
        target = self.tasks[:, 0]
        if self.task == "vel":
            return -np.abs(velocity - target)
        return target * velocity

    def _ctrl_cost(self, action: np.ndarray) -> np.ndarray:
        return self.ctrl_cost_weight * np.sum(action**2, axis=1)


class HalfCheetahBatchEnv(_MujocoBatchEnv):
    """HalfCheetah with a target speed ("vel", v* ~ U[0, 2]) or direction ("dir", d = +-1)."""

    xml_file = "half_cheetah.xml"
    vel_range = (0.0, 2.0)
    ctrl_cost_weight = 0.5 * 1e-1

    @property
    def observation_dim(self) -> int:
        """qpos[1:] and qvel: 17."""
        return self.model.nq - 1 + self.model.nv

    def _observe(self) -> np.ndarray:
        state = self._require_state()
        return np.concatenate([state[:, self._qpos][:, 1:], state[:, self._qvel]], axis=1)

    def _reward(self, velocity: np.ndarray, action: np.ndarray) -> np.ndarray:
        return self._forward_reward(velocity) - self._ctrl_cost(action)


class AntBatchEnv(_MujocoBatchEnv):
    """Ant with a target speed along x ("vel", v* ~ U[0, 3]) or direction ("dir", d = +-1)."""

    xml_file = "ant.xml"
    vel_range = (0.0, 3.0)
    ctrl_cost_weight = 0.5 * 1e-2
    contact_cost_weight = 0.5 * 1e-3
    survive_reward = 0.05
    vel_bonus = 1.0
    healthy_z_range = (0.2, 1.0)

    def __init__(
        self, task: str, frame_skip: int = 5, reset_noise_scale: float = 0.1, include_contact_forces: bool = True
    ) -> None:
        super().__init__(task, frame_skip=frame_skip, reset_noise_scale=reset_noise_scale)
        self.include_contact_forces = include_contact_forces
        self._cfrc_ext = np.zeros((0, self.model.nbody, 6))

    @property
    def observation_dim(self) -> int:
        """qpos[2:], qvel and (by default) the 13 non-world bodies' clipped contact forces: 105 or 27."""
        forces = 6 * (self.model.nbody - 1) if self.include_contact_forces else 0
        return self.model.nq - 2 + self.model.nv + forces

    @property
    def cfrc_ext(self) -> np.ndarray:
        """External (contact) forces on each body after the last step, [num_envs, nbody, 6] (a copy)."""
        self._require_state()
        return self._cfrc_ext.copy()

    def _init_buffers(self) -> None:
        self._cfrc_ext = np.zeros((self.num_envs, self.model.nbody, 6))

    def _after_physics(self, i: int) -> None:
        # mj_step does not compute cfrc_ext; this does, from the last physics step (as gymnasium).
        self._mujoco.mj_rnePostConstraint(self.model, self._data)
        self._cfrc_ext[i] = self._data.cfrc_ext

    def _observe(self) -> np.ndarray:
        state = self._require_state()
        parts = [state[:, self._qpos][:, 2:], state[:, self._qvel]]
        if self.include_contact_forces:
            parts.append(np.clip(self._cfrc_ext[:, 1:], -1.0, 1.0).reshape(self.num_envs, -1))
        return np.concatenate(parts, axis=1)

    def _reward(self, velocity: np.ndarray, action: np.ndarray) -> np.ndarray:
        forward = self._forward_reward(velocity) + (self.vel_bonus if self.task == "vel" else 0.0)
        contact = self.contact_cost_weight * np.sum(np.clip(self._cfrc_ext, -1.0, 1.0) ** 2, axis=(1, 2))
        return forward - self._ctrl_cost(action) - contact + self.survive_reward

    def _terminated(self) -> np.ndarray:
        return ant_terminated(self._state[:, self._qpos], self._state[:, self._qvel], self.healthy_z_range)


def ant_terminated(
    qpos: np.ndarray, qvel: np.ndarray, z_range: tuple[float, float] = AntBatchEnv.healthy_z_range
) -> np.ndarray:
    """The original's rule: done unless the state is finite and the torso height is within ``z_range``."""
    finite = np.all(np.isfinite(qpos), axis=1) & np.all(np.isfinite(qvel), axis=1)
    with np.errstate(invalid="ignore"):
        height_ok = (qpos[:, 2] >= z_range[0]) & (qpos[:, 2] <= z_range[1])
    return ~(finite & height_ok)
