"""Proximal optimizers that drive structure gates (channel scales, BatchNorm gammas) to exact zeros.

An L1 penalty's gradient never makes a weight exactly zero; a proximal step (soft-threshold after
the gradient step) does, so the structures it zeroes can be cut out afterwards without changing
the network's output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer


def soft_threshold(x: Tensor, threshold: float) -> Tensor:
    """Proximal operator of threshold·|x|: S(x, t) = sign(x)·max(|x| − t, 0).

    Values with |x| ≤ t become exactly zero, the rest shrink towards zero by t.
    """
    return soft_threshold_each([x], [threshold])[0]


def soft_threshold_each(xs: list[Tensor], thresholds: list[float]) -> list[Tensor]:
    """`soft_threshold(x, t)` of each tensor with its own threshold, in five multi-tensor kernels instead of
    five per tensor: a step over every gate of a network then costs a handful of launches on a GPU."""
    shrunk = torch._foreach_abs(xs)
    torch._foreach_sub_(shrunk, thresholds)
    torch._foreach_clamp_min_(shrunk, 0.0)
    return torch._foreach_mul(torch._foreach_sign(xs), shrunk)


def _with_grads(groups: list[dict]) -> list[tuple[dict, Tensor]]:
    """(group, parameter) for every parameter that has a gradient, in order."""
    return [(group, param) for group in groups for param in group["params"] if param.grad is not None]


def _check_non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _evaluate(closure: Callable[[], Tensor] | None) -> Tensor | None:
    """The optional closure's loss, computed with gradients enabled (the torch.optim convention)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class APG(Optimizer):
    """Accelerated proximal gradient for scaling factors λ (Huang & Wang, ECCV 2018, Sparse Structure Selection).

    Per step, with γ = group["penalty"] and μ = group["momentum"] (the paper's Eq. 10 in its
    modified-Nesterov form): mom ← μ·mom; z ← S(λ − lr·g, lr·γ); mom ← z − λ + mom; λ ← z + μ·mom.
    With nonnegative=True λ is then clamped at 0. No weight decay is applied to λ.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        penalty: float = 0.01,
        nonnegative: bool = True,
    ) -> None:
        _check_non_negative("lr", lr)
        _check_non_negative("penalty", penalty)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        defaults = dict(lr=lr, momentum=momentum, penalty=penalty, nonnegative=nonnegative)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Take one proximal Nesterov step on every parameter that has a gradient (all of them at once, with
        multi-tensor kernels); returns closure's loss."""
        loss = _evaluate(closure)
        pairs = _with_grads(self.param_groups)
        if not pairs:
            return loss
        params = [param for _, param in pairs]
        moms = []
        for param in params:
            state = self.state[param]
            if "mom" not in state:
                state["mom"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            moms.append(state["mom"])
        lrs = [group["lr"] for group, _ in pairs]
        momentums = [group["momentum"] for group, _ in pairs]
        torch._foreach_mul_(moms, momentums)
        z = soft_threshold_each(torch._foreach_sub(params, torch._foreach_mul([p.grad for p in params], lrs)),
                                [group["lr"] * group["penalty"] for group, _ in pairs])
        torch._foreach_add_(moms, torch._foreach_sub(z, params))
        torch._foreach_copy_(params, torch._foreach_add(z, torch._foreach_mul(moms, momentums)))
        clamped = [param for group, param in pairs if group["nonnegative"]]
        if clamped:
            torch._foreach_clamp_min_(clamped, 0.0)
        return loss


class ISTA(Optimizer):
    """Iterative shrinkage-thresholding on BatchNorm γ (Ye et al., ICLR 2018, "Rethinking the smaller-norm-less-informative assumption").

    Per step, with ρ = group["penalty"] and c = group["cost"] (the per-layer c_l, default 1.0):
    γ ← S(γ − lr·g, lr·ρ·c). No momentum, so the optimizer keeps no per-parameter state.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        penalty: float = 0.005,
    ) -> None:
        _check_non_negative("lr", lr)
        _check_non_negative("penalty", penalty)
        defaults = dict(lr=lr, penalty=penalty, cost=1.0)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Take one gradient step plus cost-weighted soft-threshold on every parameter with a gradient (all of
        them at once, with multi-tensor kernels)."""
        loss = _evaluate(closure)
        pairs = _with_grads(self.param_groups)
        if not pairs:
            return loss
        for lr in dict.fromkeys(group["lr"] for group, _ in pairs):  # the groups share one lr unless scaled
            same = [param for group, param in pairs if group["lr"] == lr]
            torch._foreach_add_(same, [param.grad for param in same], alpha=-lr)
        params = [param for _, param in pairs]
        torch._foreach_copy_(params, soft_threshold_each(
            params, [group["lr"] * group["penalty"] * group["cost"] for group, _ in pairs]))
        return loss


def ista_cost_weight(
    h_out: int,
    w_out: int,
    k_h: int,
    k_w: int,
    c_in: int,
    hw_in: int,
    c_out_next: int = 0,
    k_next: int = 0,
) -> float:
    """Per-layer penalty weight c_l of Ye et al. (ICLR 2018): the compute one channel of layer l costs.

    c_l = (H_out·W_out + k_h·k_w·C_in)/HW_in + (C_out_next·k_next²)/HW_in, where HW_in is the
    input image's H·W; leave c_out_next and k_next at 0 for the last layer (no second term).
    """
    own_cost = h_out * w_out + k_h * k_w * c_in
    next_layer_cost = c_out_next * k_next * k_next
    return (own_cost + next_layer_cost) / hw_in


@torch.no_grad()
def add_l1_subgradient(params: Iterable[Tensor], strength: float) -> None:
    """Add the L1 subgradient s·sign(p) to each p.grad in place (Liu et al., ICCV 2017, network slimming).

    Call after backward and before the optimizer step; parameters without a gradient are skipped.
    """
    with_grads = [param for param in params if param.grad is not None]
    if with_grads:
        torch._foreach_add_([param.grad for param in with_grads], torch._foreach_sign(with_grads), alpha=strength)
