"""fastmaml: fast, correct Model-Agnostic Meta-Learning for PyTorch."""

from fastmaml.core import adapt, evaluate_trajectory, meta_objective, task_objective
from fastmaml.episode import Episode
from fastmaml.learners import (
    ANIL,
    FOMAML,
    LSLR,
    MAML,
    AdaptedModel,
    MAMLPlusPlus,
    MAMLPlusPlusSchedule,
    MetaOutput,
    MetaSGD,
)
from fastmaml.losses import make_loss
from fastmaml.models import (
    BatchNormMLP,
    ConvNet,
    ResNet12,
    TaskBatchNorm,
    batchnorm_parameter_names,
    convert_batchnorm,
    mlp,
    per_step_batchnorm,
    sinusoid_mlp,
)
from fastmaml.rules import SGD, InnerRule, PerLayerPerStepLR, PerParameterLR
from fastmaml.tasks.protocol import TaskSource

__version__ = "0.1.0"

__all__ = [
    "MAML",
    "FOMAML",
    "MetaSGD",
    "LSLR",
    "ANIL",
    "MAMLPlusPlus",
    "MAMLPlusPlusSchedule",
    "AdaptedModel",
    "MetaOutput",
    "Episode",
    "InnerRule",
    "SGD",
    "PerParameterLR",
    "PerLayerPerStepLR",
    "adapt",
    "task_objective",
    "meta_objective",
    "evaluate_trajectory",
    "make_loss",
    "TaskBatchNorm",
    "batchnorm_parameter_names",
    "convert_batchnorm",
    "per_step_batchnorm",
    "sinusoid_mlp",
    "mlp",
    "ConvNet",
    "ResNet12",
    "BatchNormMLP",
    "TaskSource",
    "fit",
    "load",
    "evaluate_tasks",
]


def __getattr__(name: str):  # noqa: ANN202 - the training shell loads on first use (tqdm, TensorBoard, data)
    if name == "fit":
        from fastmaml.train import fit

        return fit
    if name in ("evaluate_tasks", "load"):
        from fastmaml import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module 'fastmaml' has no attribute {name!r}")
