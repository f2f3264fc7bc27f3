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
    return torch.sign(x) * torch.clamp(x.abs() - threshold, min=0)


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
        """Take one proximal Nesterov step on every parameter that has a gradient; returns closure's loss."""
        loss = _evaluate(closure)
        for group in self.param_groups:
            lr = group["lr"]
            momentum = group["momentum"]
            threshold = lr * group["penalty"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "mom" not in state:
                    state["mom"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                mom = state["mom"]
                mom.mul_(momentum)
                z = soft_threshold(param - lr * param.grad, threshold)
                mom.add_(z - param)
                param.copy_(z + momentum * mom)
                if group["nonnegative"]:
                    param.clamp_(min=0)
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
        """Take one gradient step plus cost-weighted soft-threshold on every parameter with a gradient."""
        loss = _evaluate(closure)
        for group in self.param_groups:
            lr = group["lr"]
            threshold = lr * group["penalty"] * group["cost"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                param.add_(param.grad, alpha=-lr)
                param.copy_(soft_threshold(param, threshold))
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
    for param in params:
        if param.grad is None:
            continue
        param.grad.add_(torch.sign(param), alpha=strength)
