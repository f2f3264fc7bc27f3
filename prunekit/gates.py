"""Structure gates: a learnable or computed factor multiplying a channel's or a residual branch's output.

Kinds: `scale` (SSS factor λ), `binary` (0/1 forward, straight-through gradient), `epsilon`
(ε-ResNet strict identity on a whole branch) and `bn` (the BatchNorm γ itself is the factor, so no
module is added). A model built without gates gets `nn.Identity` in every gate slot, which has no
parameters and leaves outputs untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

GATE_KINDS = ("scale", "binary", "epsilon", "bn")
EPSILON_SLOPE = 1e6  # the L of ε-ResNet's sparsity-promoting function


def _broadcast(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return factor.view(1, -1, *([1] * (x.dim() - 2)))


class ScaleGate(nn.Module):
    """SSS scaling factor λ per structure (initialised to 1; trained by APG, no weight decay)."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def multiplier(self) -> torch.Tensor:
        """The differentiable per-structure factor applied in the forward pass."""
        return self.weight

    def forward(self, x):
        return x * _broadcast(self.multiplier(), x)

    def factor(self) -> torch.Tensor:
        """The multiplier this gate applies now (what compression folds into the weights)."""
        return self.weight.detach()


class GroupScaleGate(ScaleGate):
    """SSS factor per cardinality group of a ResNeXt block: λ_k scales the `per_group` contiguous
    channels of group k (as the authors' `repeat(lambda_group, C/groups)`)."""

    def __init__(self, groups: int, per_group: int):
        super().__init__(groups)
        self.per_group = per_group

    def multiplier(self) -> torch.Tensor:
        return self.weight.repeat_interleave(self.per_group)

    def factor(self) -> torch.Tensor:
        return self.multiplier().detach()


class BinaryGate(nn.Module):
    """Float gate kept for learning, binarised to 0/1 in the forward pass; the gradient passes straight
    through to the float value (as in quantisation-aware training). With `keep_one` the strongest gate
    stays on when every one is off (a residual stream's first segment: the network's only input path)."""

    def __init__(self, size: int, threshold: float = 0.5, keep_one: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.threshold, self.keep_one = threshold, keep_one

    def _on(self) -> torch.Tensor:
        on = self.weight.detach() >= self.threshold
        if self.keep_one:
            strongest = F.one_hot(self.weight.detach().argmax(), on.numel()).bool()
            on = on | (strongest & ~on.any())
        return on

    def multiplier(self) -> torch.Tensor:
        """0/1 in value, identity in gradient (straight-through estimator)."""
        binary = self._on().to(self.weight.dtype)
        return binary + self.weight - self.weight.detach()

    def forward(self, x):
        return x * _broadcast(self.multiplier(), x)

    def factor(self) -> torch.Tensor:
        return self._on().to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"size={self.weight.numel()}, threshold={self.threshold}" + (", keep_one" if self.keep_one else "")


def branch_peak(branch: torch.Tensor) -> torch.Tensor:
    """max |l| over the whole batch tensor (and over DDP ranks, so replicas agree): the branch is
    discarded exactly when this is ≤ ε. One min/max pass over the activation."""
    low, high = torch.aminmax(branch)
    peak = torch.maximum(high, -low)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak


def strict_identity_factor(branch: torch.Tensor, epsilon: float | torch.Tensor,
                           peak: torch.Tensor | None = None) -> torch.Tensor:
    """ε-ResNet's sparsity-promoting function, built from ReLUs only (Yu et al. 2018, eq. 3-4).

    s = max over the whole batch tensor of relu(l − ε) + relu(−l − ε); w = relu(1 − L·relu(1 − L·s)).
    w is 0 exactly when every |element| ≤ ε, else 1 (for s ≥ 1/L). `peak`: `branch_peak(branch)` if
    already computed.
    """
    # relu(l − ε) + relu(−l − ε) = relu(|l| − ε) elementwise, and relu is monotone, so the max over
    # the tensor is relu(max|l| − ε).
    s = F.relu((branch_peak(branch) if peak is None else peak) - epsilon)
    return F.relu(F.relu(s * -EPSILON_SLOPE + 1) * -EPSILON_SLOPE + 1)


class EpsilonGate(nn.Module):
    """Zeroes a residual branch whose whole output is within ±ε; no gradient flows through the factor,
    so weight decay alone drives a discarded branch to zero.

    In training it tracks `is_discarded` (this step) and its moving average as the authors' code
    does (tensorpack's ExponentialMovingAverage(0.95, num_updates=step): decay min(0.95, (1+n)/(10+n))
    at update n, from 0), kept in float64 so that it really reaches the 1 the discard rule asks for.
    `dropped` is the selection rule's decision (`methods.EpsilonDiscardRule`); evaluation applies it —
    a dropped branch is a strict identity, every other branch is kept — so the network evaluated is
    exactly the one compression exports (the authors re-gate each test batch instead).
    """

    def __init__(self, epsilon: float = 2.5, ema_decay: float = 0.95):
        super().__init__()
        self.ema_decay = ema_decay
        self.register_buffer("epsilon", torch.tensor(float(epsilon)))  # a buffer: a budget's per-block ε is saved
        self.register_buffer("is_discarded", torch.zeros(()))
        self.register_buffer("discarded_average", torch.zeros((), dtype=torch.float64))
        self.register_buffer("peak_average", torch.zeros(()))  # moving average of max |F(x)|: how far from ε
        self.register_buffer("updates", torch.zeros((), dtype=torch.float64))
        self.register_buffer("dropped", torch.zeros((), dtype=torch.bool))

    def forward(self, x):
        if not self.training:
            return x * self.factor().to(x.dtype)
        with torch.no_grad():
            peak = branch_peak(x.detach().float())
            w = strict_identity_factor(x, self.epsilon, peak)
            self.is_discarded.copy_((w == 0).float())
            decay = torch.clamp((1 + self.updates) / (10 + self.updates), max=self.ema_decay)
            self.discarded_average.mul_(decay).add_((1 - decay) * self.is_discarded.double())
            self.peak_average.mul_(decay.float()).add_((1 - decay.float()) * peak)
            self.updates.add_(1)
        return x * w.to(x.dtype)

    def factor(self) -> torch.Tensor:
        """1 for a kept branch, 0 for a dropped one: what evaluation and compression apply."""
        return (~self.dropped).float()

    def extra_repr(self) -> str:
        return f"epsilon={float(self.epsilon)}"


@dataclass
class GateConfig:
    """Which structures carry a gate, and of which kind. `kind=None` builds the plain model."""

    kind: str | None = None
    channels: bool = False
    blocks: bool = False
    groups: bool = False
    stream: bool = False  # residual-stream channels (ResNets), one factor per channel shared by its segment
    epsilon: float = 2.5
    threshold: float = 0.5

    def __post_init__(self):
        if self.kind is not None and self.kind not in GATE_KINDS:
            raise ValueError(f"gate kind must be one of {GATE_KINDS}, got {self.kind!r}")

    def channel_gate(self, channels: int) -> nn.Module:
        if self.channels and self.kind == "scale":
            return ScaleGate(channels)
        if self.channels and self.kind == "binary":
            return BinaryGate(channels, self.threshold)
        return nn.Identity()

    def group_gate(self, groups: int, per_group: int) -> nn.Module:
        if self.groups and self.kind == "scale":
            return GroupScaleGate(groups, per_group)
        return nn.Identity()

    def stream_gate(self, channels: int, root: bool = False) -> nn.Module:
        """A learnable factor per residual-stream channel: the method's own gate for SSS and binary gates,
        a scaling factor that the BN-γ methods penalise as they do γ. A `root` segment (nothing carried
        in) keeps a binary gate on, as compression keeps a channel."""
        if self.stream and self.kind == "binary":
            return BinaryGate(channels, self.threshold, keep_one=root)
        if self.stream and self.kind in ("scale", "bn"):
            return ScaleGate(channels)
        return nn.Identity()

    def block_gate(self) -> nn.Module:
        if self.blocks and self.kind == "scale":
            return ScaleGate(1)
        if self.blocks and self.kind == "binary":
            return BinaryGate(1, self.threshold)
        if self.blocks and self.kind == "epsilon":
            return EpsilonGate(self.epsilon)
        return nn.Identity()


GATE_TYPES = (ScaleGate, BinaryGate, EpsilonGate)


def gated_batch_norm(bn: nn.BatchNorm2d, gate: nn.Module | None, x: torch.Tensor,
                     stream: torch.Tensor | None = None) -> torch.Tensor:
    """`gate(bn(x))`, times the residual-stream factor per channel `stream` when given, in one
    batch-norm call when the factors are per channel (g): BN's affine becomes (γ·g, β·g), saving a
    full pass over the activation in both directions."""
    if isinstance(gate, (ScaleGate, BinaryGate)):
        g = gate.multiplier()
    elif gate is None or isinstance(gate, nn.Identity):
        g = None
    else:  # a computed gate (ε-ResNet) sees the normalised output
        out = gate(bn(x))
        return out if stream is None else out * _broadcast(stream, out)
    if stream is not None:
        g = stream if g is None else g * stream
    if g is None:
        return bn(x)
    if g.numel() == 1:
        g = g.expand(bn.num_features)
    if isinstance(bn, nn.SyncBatchNorm):  # a synchronised BN computes its statistics itself
        return bn(x) * _broadcast(g, x)
    if bn.training:
        bn.num_batches_tracked.add_(1)
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight * g, bn.bias * g,
                        bn.training, bn.momentum, bn.eps)


def is_gate(module: nn.Module) -> bool:
    return isinstance(module, GATE_TYPES)


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable gate factors of a model (the parameters a proximal optimizer owns)."""
    return [m.weight for m in model.modules() if isinstance(m, (ScaleGate, BinaryGate))]
