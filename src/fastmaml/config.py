"""Typed run configuration: dataclasses, YAML presets, and ``key=value`` overrides.

One dataclass per concern; an unknown key or a value of the wrong type is an error that names
the key, so a typo never silently runs the default. The resolved config is saved in each run
directory and is what ``eval``, ``plot`` and ``--resume`` read back.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

PRESET_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass(frozen=True)
class AtLeast:
    """A value range: ``>= low`` (``> low`` when ``strict``); floats must also be finite."""

    low: float
    strict: bool = False

    def allows(self, value: float) -> bool:
        return math.isfinite(value) and (value > self.low if self.strict else value >= self.low)

    def describe(self, base: type) -> str:
        kind = "an integer" if base is int else "a finite number"
        return f"{kind} {'>' if self.strict else '>='} {self.low:g}"


@dataclass(frozen=True)
class Matches:
    """A string matching ``pattern`` (described by ``what``)."""

    pattern: str
    what: str

    def allows(self, value: str) -> bool:
        return re.fullmatch(self.pattern, value) is not None

    def describe(self, base: type) -> str:  # noqa: ARG002
        return self.what


PositiveInt = Annotated[int, AtLeast(1)]
NonNegativeInt = Annotated[int, AtLeast(0)]
PositiveFloat = Annotated[float, AtLeast(0, strict=True)]
NonNegativeFloat = Annotated[float, AtLeast(0)]
Device = Annotated[str, Matches(r"cpu|cuda(:\d+)?|mps", "cpu, cuda or cuda:N")]


@dataclass
class TaskConfig:
    name: Literal["sinusoid", "omniglot", "miniimagenet", "cifar_fs", "fc100", "folder", "table", "python"] = (
        "sinusoid")
    """Task family: sinusoid | omniglot | miniimagenet | cifar_fs | fc100 (CIFAR-100 archive) | folder (images
    in ImageFolder layout) | table (a CSV, one task per group) | python (task.factory builds the sources)."""
    ways: PositiveInt = 5
    """Classes per task (N); ignored for regression."""
    shots: PositiveInt = 10
    """Support examples per class (K) in meta-training."""
    queries: PositiveInt = 10
    """Query examples per class in meta-training."""
    rotation: Literal["per_task", "classes", "none"] = "per_task"
    """Omniglot rotation protocol: per_task (original code) | classes (rotations as new classes) | none."""
    data_root: str = ""
    """Folder with the data set files; empty means the FASTMAML_DATA environment variable."""
    cache_dir: str = ""
    """Where decoded data sets are cached; empty means FASTMAML_CACHE or ~/.cache/fastmaml."""
    split: Literal["paper", "background", "vinyals"] = "paper"
    """Omniglot class split: paper (the MAML code's 1100/100/423) | background (Lake et al.: the 30 background
    alphabets train and validate, the 20 evaluation alphabets test) | vinyals (Vinyals et al. 2016, rotations as
    classes: needs rotation=classes)."""
    split_file: str = ""
    """folder / table: a YAML or JSON file with train, val and test lists of class (group) names; empty means a
    seeded split of 64/16/20% of the classes (groups)."""
    split_seed: NonNegativeInt = 0
    """folder / table: seed of the class (group) split when no split_file is given."""
    image_size: NonNegativeInt = 0
    """folder: images are resized to this square size (0 = 84)."""
    channels: Literal[0, 1, 3] = 0
    """folder: 1 (grey) or 3 (RGB) channels (0 = 3)."""
    path: str = ""
    """table: the CSV file."""
    group: str = ""
    """table: the column whose values define the tasks (e.g. a sensor or a patient)."""
    target: str = ""
    """table: the column to predict."""
    features: list[str] = field(default_factory=list)
    """table: the feature columns (empty = every other numeric column)."""
    kind: Literal["auto", "classification", "regression"] = "auto"
    """Loss and metrics: classification (cross-entropy, accuracy) or regression (MSE); auto = regression for
    sinusoid and table, classification for the rest (set it for task.name=python)."""
    factory: str = ""
    """python: "module:function" returning the task source of a split: function(config, split, shots, queries,
    device) (see fastmaml.tasks.protocol)."""
    max_classes: NonNegativeInt = 0
    """Use only the first N meta-train classes (0 = all); for quick tests and demos."""


@dataclass
class ModelConfig:
    name: Literal["sinusoid_mlp", "conv", "resnet12", "bn_mlp", "mlp", "python"] = "sinusoid_mlp"
    """Network: sinusoid_mlp | conv (4 blocks, sized to the task's images) | resnet12 (widths filters x 1, 2.5, 5,
    10: 64 gives MetaOptNet's 64-160-320-640) | bn_mlp | mlp (two hidden layers, sized to the task's features) |
    python (model.factory builds it)."""
    hidden: PositiveInt = 40
    """Hidden width of sinusoid_mlp and mlp."""
    factory: str = ""
    """python: "module:function" returning an nn.Module: function(config) (see fastmaml.tasks.protocol)."""
    filters: PositiveInt = 64
    """Conv filters per block (64 Omniglot, 32 MiniImagenet); resnet12: the first block's width."""
    init: Literal["torch", "paper"] = "torch"
    """Initialisation: torch (PyTorch defaults) | paper (the original code's)."""
    bn_scale: bool = True
    """conv / bn_mlp: BatchNorm with a learned scale (PyTorch) or, false, offset only (the original
    code's TensorFlow batch_norm default)."""


@dataclass
class MetaConfig:
    algorithm: Literal["maml", "metasgd", "anil", "mamlpp", "pretrain"] = "maml"
    """maml | metasgd | anil | mamlpp | pretrain (the paper's baseline: one model, no inner loop)."""
    inner_lr: NonNegativeFloat = 0.01
    """Inner step size alpha."""
    inner_steps: NonNegativeInt = 1
    """Inner steps in meta-training."""
    first_order: bool = False
    """First-order MAML (drop second derivatives)."""
    reduction: Literal["mean", "sum_over_classes"] = "mean"
    """Inner-loss scale: mean (PyTorch) | sum_over_classes (the original TensorFlow code)."""
    adapt_batchnorm: bool = True
    """maml / metasgd: adapt BatchNorm's parameters in the inner loop, or, false, meta-learn them
    only (the original code, whose batch_norm variables were outside the adapted weights; mamlpp
    and anil never adapt them)."""
    strategy: Literal["auto", "vmap", "loop"] = "auto"
    """Execution over the tasks of a meta-batch: auto (per model, data shape and device; see
    fastmaml.core.choose_strategy) | vmap | loop."""
    chunk_size: NonNegativeInt = 0
    """Tasks per vmapped chunk to bound memory (0 = all at once)."""
    backward_chunk: NonNegativeInt = 0
    """Backpropagate the meta-batch this many tasks at a time (0 = all at once): same gradient, the
    peak memory of one chunk's graph."""
    checkpoint: bool = False
    """Recompute inner steps in the backward pass: memory flat in the number of steps (strategy loop)."""
    task_threads: NonNegativeInt = 0
    """CPU threads running strategy auto's backward chunks at once, one intra-op thread each (0 = the
    plan's choice for torch's thread count, train.threads; 1 = one chunk after another)."""
    compile: bool = False
    """torch.compile the vmapped meta-objective (first iteration compiles; not with per-step BatchNorm)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode: default | reduce-overhead (CUDA graphs on GPU) | max-autotune[-no-cudagraphs]."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32 | bf16 (bfloat16 autocast of the model's forward; parameters, updates and losses stay float32)."""
    msl_iterations: NonNegativeInt = 0
    """mamlpp: iterations over which the multi-step loss anneals to the final step (0 = final only)."""
    first_order_iterations: NonNegativeInt = 0
    """mamlpp: iterations of first-order training before second order (derivative-order annealing)."""
    per_step_bn: bool = True
    """mamlpp: one BatchNorm weight set per inner step."""
    learn_inner_lr: bool = True
    """mamlpp: learned per-layer per-step inner step sizes (LSLR)."""


@dataclass
class TrainConfig:
    iterations: PositiveInt = 70000
    """Meta-training iterations (outer updates)."""
    meta_batch: PositiveInt = 25
    """Tasks per meta-batch."""
    outer_lr: NonNegativeFloat = 0.001
    """Adam learning rate beta."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Meta learning-rate schedule: constant | cosine (MAML++: annealed to min_outer_lr)."""
    min_outer_lr: NonNegativeFloat = 0.0
    """Final learning rate of the cosine schedule."""
    grad_clip: NonNegativeFloat = 0.0
    """Clip the meta-gradient norm (0 = off)."""
    seed: NonNegativeInt = 0
    """Seed for initialisation and the task stream."""
    device: Device = "cpu"
    """cpu | cuda | cuda:N."""
    log_every: PositiveInt = 100
    """Iterations between metric lines."""
    val_every: NonNegativeInt = 1000
    """Iterations between validations (0 = off)."""
    val_tasks: PositiveInt = 200
    """Held-out tasks per validation."""
    val_steps: NonNegativeInt = 0
    """Inner steps before validation scores the query sets (0 = meta.inner_steps, as in training):
    e.g. 3 to pick best.pt at the step count the paper tests Omniglot with (trained with 1)."""
    checkpoint_every: PositiveInt = 1000
    """Iterations between checkpoints (one is always written at the end)."""
    threads: NonNegativeInt = 0
    """torch CPU threads (0 = torch's default)."""
    reuse_freed_memory: bool = False
    """On CPU (Linux, glibc): keep freed memory in the process instead of page-faulting it in again
    every step (fastmaml.runtime; MiniImagenet first order 1.6x faster per step). Opt-in: it is a
    process-wide change, not yet proven safe everywhere (see fastmaml.runtime)."""


@dataclass
class EvalConfig:
    tasks: PositiveInt = 600
    """Test tasks per evaluation (the literature uses 600)."""
    steps: NonNegativeInt = 10
    """Evaluate after 0..steps inner updates."""
    shots: list[PositiveInt] = field(default_factory=lambda: [5, 10, 20])
    """Support sizes K to evaluate."""
    queries: PositiveInt = 10
    """Query examples per class at test time."""
    inner_lr: NonNegativeFloat = 0.0
    """Test-time step size (0 = the training inner_lr)."""
    tune_lr: list[PositiveFloat] = field(default_factory=list)
    """Candidate step sizes chosen on validation tasks (the pretrained baseline's tuned step size)."""
    batch: PositiveInt = 100
    """Tasks per evaluation batch."""
    seed: NonNegativeInt = 1234
    """Seed of the test tasks (fixed, so every model sees the same tasks)."""


@dataclass
class Config:
    name: str = "sinusoid"
    """Experiment name (run directory prefix)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_preset(name_or_path: str) -> Path:
    """A YAML path, or the name of a bundled preset (``sinusoid`` -> configs/sinusoid.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if preset.is_file():
        return preset
    available = sorted(str(p.relative_to(PRESET_DIR).with_suffix("")) for p in PRESET_DIR.rglob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a preset; presets: {', '.join(available)}")


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """Load a YAML preset or file, then apply ``section.key=value`` overrides."""
    data, path = read_yaml(name_or_path)
    config = from_dict(data, source=str(path))
    return apply_overrides(config, overrides or [])


def from_dict(data: dict[str, Any], source: str = "config") -> Config:
    return build_config(Config, data, source)


def build_config(root: type, data: dict[str, Any], source: str = "config") -> Any:
    """Build the config dataclass ``root`` from nested dicts, naming any unknown key or bad value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    return _build(root, data, prefix="", source=source)


def read_yaml(name_or_path: str) -> tuple[dict[str, Any], Path]:
    """The mapping in a preset or YAML file, and the file it came from."""
    path = resolve_preset(name_or_path)
    with open(path) as f:
        data = parse_yaml(f.read(), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data, path


def parse_yaml(text: str, source: str) -> Any:
    """Plain YAML values only; a syntax error or a language-specific tag is one line naming where."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(filter(None, (error.context, error.problem))).replace("\n", " ")
        if isinstance(error, yaml.constructor.ConstructorError):
            problem += " (config files hold plain values only: numbers, strings, lists, mappings)"
        raise ConfigError(f"{source}{where}: {problem}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML ({error})") from None


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """``section.key=value`` overrides on any config dataclass (supervised :class:`Config` or RL)."""
    data = dataclasses.asdict(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.iterations=1000")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config key {key!r}: {part!r} is not a section ({_sections(config)})")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key {key!r}; valid keys there: {', '.join(node)}")
        node[parts[-1]] = parse_yaml(raw, f"override {item!r}") if raw.strip() else ""
    return build_config(type(config), data, source="overrides")


def save_config(config: Any, path: Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(config), f, sort_keys=False)


def _sections(config: Any) -> str:
    return ", ".join(f.name for f in dataclasses.fields(config) if f.name != "name")


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        key = prefix + sorted(unknown)[0]
        valid = ", ".join(prefix + n for n in sorted(names))
        raise ConfigError(f"{source}: unknown config key {key!r}; valid keys: {valid}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {prefix + name!r} must be a section (mapping), got {value!r}")
            values[name] = _build(hint, value, prefix=f"{prefix}{name}.", source=source)
        else:
            values[name] = _coerce(value, hint, prefix + name, source)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """``value`` as the field's type, checked against its declared choices or range."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *constraints = typing.get_args(hint)
        value = _coerce(value, base, key, source)
        for constraint in constraints:
            if not constraint.allows(value):
                raise ConfigError(f"{source}: config key {key!r} must be {constraint.describe(base)}, got {value!r}")
        return value
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{source}: config key {key!r} must be one of {', '.join(map(str, choices))}; "
                              f"got {value!r}")
        return value

    def fail() -> ConfigError:
        return ConfigError(f"{source}: config key {key!r} must be {_type_name(hint)}, got {value!r}")

    if hint is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if hint is str:
        if isinstance(value, str):
            return value
        raise fail()
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, item, key, source) for v in value]
    raise fail()


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))
