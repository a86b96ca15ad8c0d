"""The paper's networks, and the BatchNorm that MAML needs.

MAML's BatchNorm normalises with the statistics of the current batch, always (the paper and its
code keep no running statistics). :class:`TaskBatchNorm` does that with torch's fused kernel where
it is exact and from elementary ops under ``vmap``: the fused kernel's batching rules gave
second-order meta-gradients 7e-3 to 3e-2 (relative, float64) away from the per-task loop in torch
2.13, while outside ``vmap`` it is exact and 1.2-1.6x faster per meta-step on CPU than the
elementary ops (see :meth:`TaskBatchNorm.forward`). ``torch.nn.BatchNorm2d`` itself would also
update running statistics in place once per task.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmaml.context import current_step, inside_vmap


class TaskBatchNorm(nn.Module):
    """BatchNorm over the current batch only (no running statistics), channel dimension 1.

    ``steps > 1`` gives MAML++'s per-step weights: one (weight, bias) pair per inner-loop
    trajectory point, chosen by :func:`fastmaml.context.current_step` (points past the last reuse
    it). Statistics are the current batch's at every step, so they are per step by construction.
    ``scale=False`` keeps the learned offset but no learned scale: TensorFlow's
    ``tf.contrib.layers.batch_norm`` default, which the original MAML code used.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, steps: int = 1,
                 scale: bool = True) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.num_features = num_features
        self.eps = eps
        self.steps = steps
        shape = (num_features,) if steps == 1 else (steps, num_features)
        self.weight = nn.Parameter(torch.ones(shape)) if affine and scale else None
        self.bias = nn.Parameter(torch.zeros(shape)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"TaskBatchNorm({self.num_features}) got input of shape {tuple(x.shape)}")
        weight, bias = self.weight, self.bias
        if self.steps > 1:
            index = min(current_step(), self.steps - 1)
            weight = None if weight is None else weight[index]
            bias = None if bias is None else bias[index]
        if not inside_vmap() and all(p is None or p.dtype == x.dtype for p in (weight, bias)):
            # torch's fused kernel: one pass for the statistics, one for the output, and fused
            # backward passes (double backward is composite); exact outside vmap.
            if weight is None and bias is not None:
                # torch 2.13's double backward fails on a bias without a weight ("Expected a proper
                # Tensor but got None"); a constant unit scale is the same function.
                weight = torch.ones_like(bias)
            return F.batch_norm(x, None, None, weight, bias, training=True, eps=self.eps)
        dims = [0, *range(2, x.dim())]
        # Statistics in float32 even under bfloat16 autocast (as cuDNN's BatchNorm): a mean rounded
        # to 8 bits would be cancelled against x, losing precision where |mean| >> std.
        stats_input = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        # Two passes (mean, then mean squared deviation: the numerically stable textbook form)
        # rather than torch.var_mean, whose Welford kernel was 7x slower on CPU at these shapes.
        # Sums times 1/n rather than means: a mean's backward divides a full-size gradient, a sum's
        # only expands it (5% of an Omniglot 20-way meta-step on CPU).
        inverse_count = 1.0 / (x.numel() // x.shape[1])
        mean = stats_input.sum(dim=dims, keepdim=True) * inverse_count
        centred = stats_input - mean
        scale = torch.rsqrt((centred * centred).sum(dim=dims, keepdim=True) * inverse_count + self.eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        out = centred * (scale if weight is None else scale * weight.view(shape))
        return out if bias is None else out + bias.view(shape)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, affine={self.bias is not None}, steps={self.steps}, "
                f"scale={self.weight is not None}")


def per_step_batchnorm(model: nn.Module, steps: int) -> nn.Module:
    """A copy of ``model`` whose :class:`TaskBatchNorm` layers have ``steps`` weight sets (MAML++).

    Each set starts from the layer's current weights.
    """
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, TaskBatchNorm) and child.steps == 1:
                replacement = TaskBatchNorm(child.num_features, child.eps, child.bias is not None, steps,
                                            scale=child.weight is not None)
                for name in ("weight", "bias"):
                    old, new = getattr(child, name), getattr(replacement, name)
                    if old is not None:
                        new.data = old.data.expand(steps, -1).clone()
                setattr(module, child_name, replacement)
    return model


def convert_batchnorm(model: nn.Module) -> nn.Module:
    """Return a copy of ``model`` with every ``nn.BatchNorm*d`` replaced by :class:`TaskBatchNorm`.

    Affine weights are kept; running statistics are dropped (MAML uses current-batch statistics).
    """
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                replacement = TaskBatchNorm(child.num_features, eps=child.eps, affine=child.affine)
                if child.affine:
                    replacement = replacement.to(device=child.weight.device, dtype=child.weight.dtype)
                    replacement.weight.data.copy_(child.weight.data)
                    replacement.bias.data.copy_(child.bias.data)
                setattr(module, child_name, replacement)
    return model


def batchnorm_parameter_names(model: nn.Module) -> list[str]:
    """Names of the :class:`TaskBatchNorm` parameters of ``model`` (to keep them out of the inner
    loop, as MAML++ and the original MAML code do)."""
    return [f"{module_name}.{name}" if module_name else name
            for module_name, module in model.named_modules() if isinstance(module, TaskBatchNorm)
            for name, _ in module.named_parameters(recurse=False)]


def check_meta_learnable(model: nn.Module) -> None:
    """Refuse modules that would give silently wrong meta-gradients, naming the fix."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"module {name!r} is torch.nn.{type(module).__name__}: its running statistics would be "
                "updated in place per task and its fused kernel gives inexact second-order meta-gradients "
                "under vmap. Use `model = fastmaml.convert_batchnorm(model)` (current-batch statistics, "
                "as in the MAML paper) or build the model with fastmaml.TaskBatchNorm."
            )


def sinusoid_mlp(hidden: int = 40, init: str = "torch") -> nn.Sequential:
    """The paper's regression network: 1-40-40-1 with ReLU (:func:`mlp` with one input and output)."""
    return mlp(1, hidden, 1, init)


def mlp(in_features: int, hidden: int = 40, out_features: int = 1, init: str = "torch") -> nn.Sequential:
    """The paper's regression network for any width: in-hidden-hidden-out with ReLU.

    ``init="paper"`` follows the original code (weights ~ truncated normal, std 0.01; zero
    biases) instead of PyTorch's default; the starting point shapes what MAML converges to.
    """
    model = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, out_features))
    if init == "paper":
        for layer in model:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.01, a=-0.02, b=0.02)
                nn.init.zeros_(layer.bias)
    elif init != "torch":
        raise ValueError(f"unknown init {init!r}; use 'torch' or 'paper'")
    return model


class ConvNet(nn.Module):
    """The paper's 4-block conv net: 3x3 conv, TaskBatchNorm, ReLU, then stride 2 or 2x2 max-pool.

    Omniglot: ``filters=64, pool=False`` (stride-2 convs, features averaged over space as the
    original code). MiniImagenet: ``filters=32, pool=True`` (max-pool, features flattened).
    """

    def __init__(self, ways: int, in_channels: int = 1, filters: int = 64, pool: bool = False, image_size: int = 28,
                 bn_scale: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(4):
            stride = 1 if pool else 2
            conv = nn.Conv2d(channels, filters, 3, stride=stride, padding=1)
            layers += [conv, TaskBatchNorm(filters, scale=bn_scale), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2))
            channels = filters
        self.features = nn.Sequential(*layers)
        self.pool = pool
        size = image_size
        for _ in range(4):
            size = size // 2 if pool else (size + 1) // 2
        self.head = nn.Linear(filters * size * size if pool else filters, ways)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        h = h.flatten(1) if self.pool else h.mean(dim=(2, 3))
        return self.head(h)


class ResNet12(nn.Module):
    """ResNet-12, the backbone of most few-shot papers after MAML (Oreshkin et al. 2018; Lee et al. 2019).

    Four residual blocks, each three 3x3 conv -> TaskBatchNorm -> LeakyReLU(0.1) (the last
    activation after the 1x1-conv shortcut is added), then 2x2 max-pooling; features averaged
    over space, then a linear head. ``widths`` (64, 160, 320, 640) as MetaOptNet; TADAM uses
    (64, 128, 256, 512). BatchNorm normalises with the current batch, as everywhere in fastmaml;
    DropBlock is left out (it would make the inner loop stochastic).
    """

    def __init__(self, ways: int, in_channels: int = 3, widths: tuple[int, ...] = (64, 160, 320, 640),
                 bn_scale: bool = True):
        super().__init__()
        blocks, channels = [], in_channels
        for width in widths:
            blocks.append(_ResidualBlock(channels, width, bn_scale))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, ways)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x).mean(dim=(2, 3)))


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int, width: int, bn_scale: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.bn1 = TaskBatchNorm(width, scale=bn_scale)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = TaskBatchNorm(width, scale=bn_scale)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn3 = TaskBatchNorm(width, scale=bn_scale)
        self.shortcut = nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), TaskBatchNorm(width, scale=bn_scale))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        h = F.leaky_relu(self.bn2(self.conv2(h)), 0.1)
        h = self.bn3(self.conv3(h))
        return self.pool(F.leaky_relu(h + self.shortcut(x), 0.1))


class BatchNormMLP(nn.Module):
    """The paper's non-convolutional Omniglot network: 256-128-64-64 with TaskBatchNorm and ReLU."""

    def __init__(self, ways: int, in_features: int = 784, hidden: tuple[int, ...] = (256, 128, 64, 64),
                 bn_scale: bool = True):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), TaskBatchNorm(size, scale=bn_scale), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, ways))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
