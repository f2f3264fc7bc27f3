"""Budgets: the cost of the network compression would produce, and a controller that steers the
penalty so that sparse training lands on a MACs or parameter target."""
from __future__ import annotations

from torch import nn

from . import spec as specs
from .compress import kept_channels, pruned_spec
from .methods import DeadSet


def projected_spec(model: nn.Module, spec: specs.Spec, dead: DeadSet, exact_borders: bool = True) -> specs.Spec:
    """The spec compression would produce from the current gate state, without a forward pass."""
    return pruned_spec(model, spec, dead, kept_channels(model, dead, exact_borders))
