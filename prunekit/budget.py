"""Budgets: the cost of the network compression would produce, and a controller that steers the
penalty so that sparse training lands on a MACs or parameter target.

Control law (every `check_every` steps until the target is reached or `reach_fraction` of the
training has passed): with p the projected cost and r(t) a ramp from the dense cost at t=0 to the
target at t = reach_fraction, both as fractions of the dense cost, the penalty is multiplied by
exp(gain · (p − r(t))), clipped to [1/4, 4] per check and kept within [1/bound, bound] × the starting
penalty (anti-windup: while p runs ahead of the ramp the penalty falls, but never so far that it
cannot rise again within a few checks once p falls behind). When p ≤ target + margin, or at the
deadline, the dead set is chosen exactly: structures are ranked by |factor| / cost weight and taken in
that order, skipping any whose removal would overshoot the target by more than the margin, until the
target is met; they are zeroed and every other structure is kept alive (revived at a small value if
it had reached zero). From then on the dead set is frozen (re-zeroed after every step), the penalty
is 0, and the remaining structures keep training. With `budget_freeze="deadline"` (ours) meeting the
target does not freeze: the penalty keeps following the ramp (falling while p is below it, so that
structures the proximal step zeroed can come back) and the dead set is chosen at the deadline, from
factors that trained longer than the first epoch in which an aggressive penalty met the target.

That is `budget_rule="exact"` with `budget_rank="cost"`. With `budget_rank="magnitude"` (ours) the penalty is
the method's own, one value for every structure (no cost weight, no Ye c_l) and not steered, and the freeze at
the deadline (or when the method's own rule meets the target) ranks by |factor| alone, as network slimming's
global threshold does: channels go where they matter least, not where they save the most, so every stage keeps
width and the network keeps its depth, as Torch-Pruning leaves it. (Steered, a uniform penalty empties the first
stage first: FM-R20 SSS froze in epoch 1 with inner widths 0 2 0 | 0 5 32 | 64 64 64.)
`budget_rank="normalized"` (ours) is the magnitude rank with each |factor| divided by the mean |factor| of its
own layer (channel group or stream group), as Torch-Pruning's GroupNormPruner normalizes each group's importance
by its mean before its global ranking: a layer whose factors are all small is not emptied first, and the budget
takes channels from every layer in proportion to how uneven the layer's factors are.

With `budget_rule="paper"` the controller steers only the paper's own knob (γ for
SSS and binary gates, ρ with Ye's per-layer c_l for ISTA, ε for ε-ResNet): every structure shares
one penalty, what the paper's rule kills (factor 0, gate off, branch discarded) stays dead, and the
freeze only adds structures by ascending |factor| when the target is not met yet (ε-ResNet: the
freeze just stops steering ε). It lands near the target, not on it.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from . import spec as specs
from .compress import host_rows, kept_channels, pruned_spec, rounded_width
from .config import ConfigError, with_round_to
from .engine import Callback
from .gates import BinaryGate, EpsilonGate, ScaleGate
from .measure import spec_cost
from .methods import DeadSet, channel_widths, dead_structures, stream_groups


def projected_spec(model: nn.Module, spec: specs.Spec, dead: DeadSet, round_to: int = 1) -> specs.Spec:
    """The spec compression would produce from the current gate state, without a forward pass
    (with `round_to` N: channel widths rounded up to multiples of N, as compression keeps them)."""
    return pruned_spec(model, spec, dead, kept_channels(model, dead, round_to))


def projected_cost(model, spec, method, input_hw, prune_percent=None, round_to: int = 1):
    dead = dead_structures(model, method, prune_percent=prune_percent)
    return spec_cost(projected_spec(model, spec, dead, round_to), input_hw)


def resolve_target(value: float, dense: int, what: str) -> int:
    """A target given as a fraction of the dense cost (≤ 1) or as an absolute count (> 1)."""
    if value <= 0:
        raise ConfigError(f"target_{what}: must be positive, got {value}")
    return int(value * dense) if value <= 1 else int(value)


def minimum_cost(spec: specs.Spec, input_hw, metric: str, remove_blocks: bool, round_to: int = 1,
                 stream: bool = False) -> int:
    """The cheapest network pruning could reach: one channel (`round_to` channels) per group, removable
    branches gone; with `stream`, one (`round_to`) residual-stream channel."""
    smallest = copy.deepcopy(spec)
    if stream:
        smallest.stem = min(round_to, smallest.stem)
        for _, _, block in smallest.blocks():
            block.out, block.pad_index = min(round_to, block.out), None
    if isinstance(smallest, specs.ConvNetSpec):
        for layer in smallest.layers:
            layer.width = min(round_to, layer.width)
    elif isinstance(smallest, specs.MobileNetV2Spec):  # a block without expansion keeps its input's width
        smallest.head = min(round_to, smallest.head)
        smallest.stages = [[block for block in stage if not (remove_blocks and block.shortcut == "identity")]
                           for stage in smallest.stages]
        for _, _, block in smallest.blocks():
            block.inner = [min(round_to, block.inner[0])] if block.expand else block.inner
    else:
        for s, stage in enumerate(smallest.stages):
            kept = []
            for block in stage:
                if remove_blocks:
                    if block.shortcut == "identity":
                        continue
                    block.inner = []
                else:
                    block.inner = [min(round_to, width) for width in block.inner]
                kept.append(block)
            smallest.stages[s] = kept
    return getattr(spec_cost(smallest, input_hw), metric)


def _structures(model: nn.Module):
    """(kind, key, index, tensor holding the factor) for every prunable structure."""
    for g in model.channel_groups():
        owner = g.gate.weight if isinstance(g.gate, (ScaleGate, BinaryGate)) else g.bn.weight
        for c in range(g.bn.num_features):
            yield "channel", g.name, c, owner
    for sg in stream_groups(model):
        for c in range(sg.width):
            yield "channel", sg.name, c, sg.gate.weight
    for cg in getattr(model, "cardinality_groups", lambda: [])():
        if isinstance(cg.gate, ScaleGate):
            for k in range(cg.count):
                yield "group", cg.name, k, cg.gate.weight
    for s, b, block in getattr(model, "residual_blocks", lambda: [])():
        if isinstance(getattr(block, "gate", None), (ScaleGate, BinaryGate)):
            yield "block", (s, b), 0, block.gate.weight


def cost_weights(model: nn.Module, spec: specs.Spec, input_hw, metric: str = "macs") -> dict:
    """MACs (or params) saved by removing one channel of each group or one whole block, normalised
    so that the mean channel weight is 1 — a cost-aware generalisation of Ye et al.'s c_l.

    A residual-stream channel's saving is divided by half the number of layers it couples (ours): its
    one factor stands for all of them, as an inner channel's factor stands for its conv and consumer,
    so it is weighed as DepGraph weighs a group, importance summed over the group against its cost.
    Without that, the stream, the costliest channels, is what a budget cuts first (a binary-gate run
    lost its whole first stretch within an epoch and trained blind)."""
    base = getattr(spec_cost(spec, input_hw), metric)
    weights = {}
    empty = DeadSet()
    for name, width in channel_widths(model).items():
        dead = DeadSet({name: torch.arange(width, device="cpu") == 0})
        reduced = pruned_spec(model, spec, dead, kept_channels(model, dead))
        weights[name] = base - getattr(spec_cost(reduced, input_hw), metric)
    stream = stream_groups(model)
    if stream:  # per layer it couples, as an inner channel's cost is over its 2 (see `cost_weights`)
        layers = model.stream_layers()
        for sg in stream:
            weights[sg.name] /= layers[sg.segment] / 2
    for cg in getattr(model, "cardinality_groups", lambda: [])():
        dead = DeadSet(groups={cg.name: torch.arange(cg.count, device="cpu") == 0})
        weights[cg.name] = base - getattr(spec_cost(projected_spec(model, spec, dead), input_hw), metric)
    for s, b, block in getattr(model, "residual_blocks", lambda: [])():
        if isinstance(getattr(block, "gate", None), (ScaleGate, BinaryGate)):  # the blocks `_structures` yields
            reduced = pruned_spec(model, spec, DeadSet(blocks={(s, b)}), kept_channels(model, empty))
            weights[(s, b)] = base - getattr(spec_cost(reduced, input_hw), metric)
    groups = list(channel_widths(model)) or [cg.name for cg in getattr(model, "cardinality_groups", lambda: [])()]
    mean = sum(weights[n] for n in groups) / max(len(groups), 1) or 1.0
    return {k: max(v, 1) / mean for k, v in weights.items()}


def _chunks(model: nn.Module, ranked: list, round_to: int, score) -> list[list]:
    """`ranked` regrouped into the units a rounded freeze removes: each channel group's channels, in
    rank order, in runs of `round_to` (the first run holding its width's remainder, if any), so that
    every prefix leaves multiples of N alive; other structures stay single. Units are ranked by their
    mean score."""
    widths = channel_widths(model)
    units, by_group = [], {}
    for c in ranked:
        if c[1] in widths:
            by_group.setdefault(c[1], []).append(c)
        else:
            units.append([c])
    for name, channels in by_group.items():
        first = widths[name] % round_to or round_to
        units.append(channels[:first])
        units += [channels[i:i + round_to] for i in range(first, len(channels), round_to)]
    return sorted(units, key=lambda unit: sum(map(score, unit)) / len(unit))


def _block_of_channel_groups(model: nn.Module) -> dict:
    """Channel group name -> the (stage, block) of the gated residual block holding it: removing the
    block removes the group, so once the block is chosen its channels cost nothing more."""
    owner = {id(m): (s, b) for s, b, block in getattr(model, "residual_blocks", lambda: [])()
             if isinstance(getattr(block, "gate", None), (ScaleGate, BinaryGate)) for m in block.modules()}
    return {g.name: owner[id(g.bn)] for g in model.channel_groups() if id(g.bn) in owner}


def _revive_rounded(model: nn.Module, chosen: list, value, round_to: int) -> list:
    """`chosen` less, in each channel group, the highest-|factor| channels that compression with
    `round_to` would keep anyway: they stay alive and train, and the projected cost is unchanged."""
    widths = channel_widths(model)
    by_group: dict = {}
    for c in chosen:
        if c[1] in widths:
            by_group.setdefault(c[1], []).append(c)
    revived = set()
    for name, dead in by_group.items():
        alive = widths[name] - len(dead)
        extra = rounded_width(max(alive, 1), widths[name], round_to) - alive
        revived.update(id(c) for c in sorted(dead, key=lambda c: -abs(value(c)))[:max(extra, 0)])
    return [c for c in chosen if id(c) not in revived]


class BudgetController(Callback):
    """Steers a proximal method's penalty to a MACs/params target, then freezes the dead set."""

    def __init__(self, spec, method: str, input_hw, target: int, metric: str, reach_fraction: float,
                 penalty: float, check_every: int = 20, gain: float = 8.0, margin: float = 0.005,
                 bound: float = 100.0, rule: str = "exact", tail: int = 64, round_to: int = 1,
                 freeze_at: str = "target", rank: str = "cost"):
        self.spec, self.method, self.input_hw, self.rule, self.tail = spec, method, input_hw, rule, tail
        self.rank = rank
        self.freeze_at = freeze_at
        self.round_to = round_to
        self.target, self.metric, self.reach_fraction = target, metric, reach_fraction
        self.penalty, self.check_every, self.gain, self.margin = penalty, check_every, gain, margin
        self.limits = (penalty / bound, penalty * bound)
        self.dense = getattr(spec_cost(spec, input_hw), metric)
        self.frozen = False
        self.fixed: list = []
        self.restored_fixed = None
        self.projected = None

    # --- helpers -----------------------------------------------------------------------------

    def _project(self, model) -> int:
        return getattr(projected_cost(model, self.spec, self.method, self.input_hw, round_to=self.round_to),
                       self.metric)

    def _weights(self, model) -> dict:
        """Each structure's weight in the penalty and the freeze rank: its cost weight, or 1 (`rank` magnitude and
        normalized, which need no cost projection; normalized divides by the layer's mean |factor| at the freeze)."""
        if self.rank != "cost":
            return dict.fromkeys((key for _, key, _, _ in _structures(model)), 1.0)
        return cost_weights(model, self.spec, self.input_hw, self.metric)

    def _set_penalty(self, trainer, value: float) -> None:
        self.penalty = value
        for opt in trainer.optimizers[1:]:
            for group in opt.param_groups:
                if "penalty" in group:
                    group["penalty"] = value * group.get("budget_weight", 1.0)

    def setup(self, trainer):
        """`exact`: each structure's penalty is scaled by its cost weight, or by 1 with `rank` magnitude (either
        replaces ISTA's c_l); `paper`: the method's own per-group weights stay (Ye's c_l for ISTA, one γ for every
        SSS factor)."""
        weights = self._weights(trainer.model)
        owners = {id(tensor): key for _, key, _, tensor in _structures(trainer.model)}
        for opt in trainer.optimizers[1:]:
            for group in opt.param_groups:
                key = owners.get(id(group["params"][0]))
                if key is not None and self.rule == "exact" and "budget_weight" not in group:  # resumed: restored
                    group["budget_weight"] = weights[key]
                    if "cost" in group:
                        group["cost"] = 1.0
        if self.restored_fixed is not None:  # the freeze's masks and floors, as checkpointed
            tensors = list({id(t): t for _, _, _, t in _structures(trainer.model)}.values())
            self.fixed = [(t, mask.to(t.device), floor, binary)
                          for t, (mask, floor, binary) in zip(tensors, self.restored_fixed, strict=True)]
            self.restored_fixed = None
        self._set_penalty(trainer, 0.0 if self.frozen else self.penalty)

    # --- control -----------------------------------------------------------------------------

    def after_step(self, trainer):
        if self.frozen:
            self._rezero(trainer.model)
            return
        steps = len(trainer.train_loader)
        if (trainer.step_in_epoch + 1) % self.check_every and trainer.step_in_epoch + 1 != steps:
            return
        t = (trainer.epoch + (trainer.step_in_epoch + 1) / steps) / trainer.epochs
        self.projected = self._project(trainer.model)
        reached = self.projected <= self.target + self.margin * self.dense and self.freeze_at == "target"
        if reached or t >= self.reach_fraction:
            self.freeze(trainer)
            return
        if self.rank != "cost":  # not steered: a steered uniform penalty zeroes the first stage first
            return
        ramp = 1 - (1 - self.target / self.dense) * min(t / self.reach_fraction, 1.0)
        error = self.projected / self.dense - ramp
        step = math.exp(max(min(self.gain * error, math.log(4)), -math.log(4)))
        self._set_penalty(trainer, min(max(self.penalty * step, self.limits[0]), self.limits[1]))

    @torch.no_grad()
    def freeze(self, trainer) -> None:
        """Choose the dead set that meets the target, zero it, and stop the penalty. `exact` ranks every
        structure by |factor| / cost weight (`rank` magnitude: by |factor|; normalized: by |factor| / its layer's
        mean); `paper` keeps what the paper's rule killed (factor 0, or a binary gate off) and, if the target is not
        met yet, adds structures by ascending |factor|.

        The factors are read from the device once. The cost of removing a ranked prefix only falls as
        the prefix grows, so the shortest prefix that meets the target is found by bisection; if its
        last structure overshoots by more than the margin, it stays and up to `tail` later ones that
        fit are taken instead (ResNet-50: about 20 cost projections instead of one per channel); channels
        of a block already taken are free and not counted. If the tail ends above the target, the nearer
        of that and the overshoot is kept (with `round_to`, the overshoot: rounded freezes meet the target)."""
        model = trainer.model
        structures = list(_structures(model))
        tensors = list({id(t): t for *_, t in structures}.values())
        values = dict(zip(map(id, tensors), host_rows([t.detach() for t in tensors])))
        thresholds = {id(m.weight): m.threshold for m in model.modules() if isinstance(m, BinaryGate)}

        def value(c):
            return float(values[id(c[3])][c[2]])

        def removed_by_paper(c):
            return value(c) == 0 or value(c) < thresholds.get(id(c[3]), -math.inf)

        if self.rule == "paper":
            forced = [c for c in structures if removed_by_paper(c)]
            def score(c):
                return abs(value(c))

            ranked = sorted((c for c in structures if not removed_by_paper(c)), key=score)
        else:
            if self.rank == "normalized":  # each layer's mean |factor| (0: the layer is dead already, score 0)
                layers: dict = {}
                for c in structures:
                    layers.setdefault(c[1], []).append(abs(value(c)))
                weights = {key: sum(factors) / len(factors) or 1.0 for key, factors in layers.items()}
            else:
                weights = self._weights(model)

            def score(c):
                return abs(value(c)) / weights[c[1]]

            forced, ranked = [], sorted(structures, key=score)

        def cost_of(chosen):
            dead = DeadSet({name: torch.zeros(width, dtype=torch.bool, device="cpu")
                            for name, width in channel_widths(model).items()},
                           groups={cg.name: torch.zeros(cg.count, dtype=torch.bool, device="cpu")
                                   for cg in getattr(model, "cardinality_groups", lambda: [])()})
            for kind, key, index, _ in chosen:
                if kind == "channel":
                    dead.channels[key][index] = True
                elif kind == "group":
                    dead.groups[key][index] = True
                else:
                    dead.blocks.add(key)
            return getattr(spec_cost(projected_spec(model, self.spec, dead, self.round_to), self.input_hw),
                           self.metric)

        units = _chunks(model, ranked, self.round_to, score) if self.round_to > 1 else [[c] for c in ranked]

        def prefix(n):
            return forced + [c for unit in units[:n] for c in unit]

        low, high = 0, len(units)  # cost_of(prefix(high)) is the cheapest reachable
        if cost_of(forced) > self.target:
            while high - low > 1:
                middle = (low + high) // 2
                if cost_of(prefix(middle)) <= self.target:
                    high = middle
                else:
                    low = middle
        else:
            high = 0
        chosen = prefix(high)
        cost = cost_of(chosen)
        if high and cost < self.target - self.margin * self.dense:  # its last structure overshoots
            best = (cost, chosen)  # the cheapest overshoot: the nearest the target from below
            chosen, cost = prefix(high - 1), cost_of(prefix(high - 1))
            inside = _block_of_channel_groups(model)
            gone, tried = {c[1] for c in chosen if c[0] == "block"}, 0
            for candidate in units[high:]:
                if all(inside.get(c[1]) in gone for c in candidate):  # channels of a removed block: no cost
                    chosen += candidate
                    continue
                if tried == self.tail:
                    break
                tried += 1
                trial = cost_of(chosen + candidate)
                if trial < self.target - self.margin * self.dense:
                    if best[0] < trial <= self.target:
                        best = (trial, chosen + candidate)
                    continue  # removing it would overshoot the target: it stays
                chosen += candidate
                gone.update(c[1] for c in candidate if c[0] == "block")
                cost = trial
                if cost <= self.target:
                    break
            # the tail did not reach the target: rounded, take the nearest overshoot so that the target is met;
            # otherwise whichever is nearer the target, that overshoot or what is left above it
            if cost > self.target and (self.round_to > 1 or self.target - best[0] < cost - self.target):
                cost, chosen = best
        if self.round_to > 1 and self.rule == "exact":  # `paper`: what the rule killed stays dead
            chosen = _revive_rounded(model, chosen, value, self.round_to)
        self._fix(model, [(t, i) for _, _, i, t in chosen])
        self.frozen = True
        self._set_penalty(trainer, 0.0)
        self._rezero(model)
        self.projected = cost

    def _fix(self, model, dead: list[tuple[torch.Tensor, int]]) -> None:
        """Record, per factor tensor, which entries are dead and the floor that keeps the rest alive."""
        thresholds = {id(m.weight): m.threshold for m in model.modules() if isinstance(m, BinaryGate)}
        tensors = {id(t): t for _, _, _, t in _structures(model)}
        self.fixed = []
        for key, tensor in tensors.items():
            mask = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
            for t, i in dead:
                if t is tensor:
                    mask[i] = True
            alive = tensor.detach().abs().view(-1)[~mask]
            floor = thresholds.get(key, float(alive.max()) * 1e-2 if alive.numel() and alive.max() > 0 else 1e-2)
            self.fixed.append((tensor, mask, floor, key in thresholds))

    @torch.no_grad()
    def _rezero(self, model):
        """Dead entries back to 0; alive entries kept off 0 (and binary gates on): no change of the set."""
        for tensor, mask, floor, binary in self.fixed:
            flat = tensor.view(-1)
            if binary:
                flat.copy_(torch.where(mask, torch.zeros_like(flat), flat.clamp(min=floor)))
            else:
                revived = torch.where(flat == 0, torch.full_like(flat, floor), flat)
                flat.copy_(torch.where(mask, torch.zeros_like(flat), revived))

    def epoch_metrics(self, trainer, epoch):
        projected = self._project(trainer.model)
        return {"penalty": self.penalty, f"projected_{self.metric}": projected, f"target_{self.metric}": self.target,
                "budget_frozen": self.frozen}

    def state_dict(self):
        return {"penalty": self.penalty, "frozen": self.frozen,
                "fixed": [(mask.cpu(), floor, binary) for _, mask, floor, binary in self.fixed]}

    def load_state_dict(self, state):
        self.penalty, self.frozen = state["penalty"], state["frozen"]
        self.restored_fixed = state["fixed"] if self.frozen else None


class EpsilonBudget(Callback):
    """ε-ResNet under a budget. After each epoch ε is scaled by the penalty's law, steered by the cost
    projected from the blocks discarded in the last step, until that meets the target or the deadline.
    Then the dead set is frozen: blocks are taken in the order (discarded now, smallest moving-average
    max |F(x)|) and the prefix whose cost is nearest the target is discarded for good (ε = ∞, moving
    average 1, so compression's rule removes them); every other block keeps ε = 0 and can no longer be
    discarded. Only whole blocks go, so the target is met to within one block's cost.

    The configured ε is set by `EpsilonSchedule` at each epoch start; this callback, which runs after
    it, multiplies it by its learned scale (or restores the frozen per-block values).
    """

    def __init__(self, spec, input_hw, target: int, metric: str, reach_fraction: float, gain: float = 4.0,
                 rule: str = "exact", freeze_at: str = "target"):
        self.spec, self.input_hw, self.target, self.metric, self.rule = spec, input_hw, target, metric, rule
        self.freeze_at = freeze_at
        self.reach_fraction, self.gain = reach_fraction, gain
        self.dense = getattr(spec_cost(spec, input_hw), metric)
        self.scale, self.frozen_epsilons = 1.0, None

    @property
    def frozen(self) -> bool:
        return self.frozen_epsilons is not None

    def on_epoch_start(self, trainer, epoch):
        gates, _ = self._gated_blocks(trainer.model)
        for i, gate in enumerate(gates):
            gate.epsilon.fill_(self.frozen_epsilons[i] if self.frozen else float(gate.epsilon) * self.scale)

    @staticmethod
    def _gated_blocks(model):
        """(gates, their (stage, block) positions) of the residual blocks with a branch."""
        pairs = [(blk.gate, (s, b)) for s, b, blk in model.residual_blocks()
                 if blk.spec.has_branch and isinstance(blk.gate, EpsilonGate)]
        return [g for g, _ in pairs], [p for _, p in pairs]

    def _cost(self, model, blocks) -> int:
        return getattr(spec_cost(projected_spec(model, self.spec, DeadSet(blocks=set(blocks))), self.input_hw),
                       self.metric)

    def _freeze(self, model) -> None:
        """`exact`: discard for good the prefix of blocks nearest the target; `paper`: only stop steering
        (each block keeps its ε, and the discard rule alone decides what goes)."""
        gates, positions = self._gated_blocks(model)
        if self.rule == "paper":
            self.frozen_epsilons = [float(gate.epsilon) for gate in gates]
            return
        order = sorted(range(len(gates)),
                       key=lambda i: (-float(gates[i].is_discarded), float(gates[i].peak_average)))
        costs = [self._cost(model, [positions[i] for i in order[:k]]) for k in range(len(order) + 1)]
        chosen = set(order[:min(range(len(costs)), key=lambda k: (abs(costs[k] - self.target), k))])
        for i, gate in enumerate(gates):
            gate.epsilon.fill_(math.inf if i in chosen else 0.0)
            gate.dropped.fill_(i in chosen)
            gate.discarded_average.fill_(1.0 if i in chosen else 0.0)
            gate.is_discarded.fill_(1.0 if i in chosen else 0.0)
        self.frozen_epsilons = [float(gate.epsilon) for gate in gates]

    def on_epoch_end(self, trainer, epoch):
        """One control step: scale ε by the law, or freeze at the target or the deadline."""
        if self.frozen:
            return
        model = trainer.model
        gates, positions = self._gated_blocks(model)
        now = self._cost(model, [p for g, p in zip(gates, positions) if float(g.is_discarded) == 1.0])
        t = (epoch + 1) / trainer.epochs
        if (now <= self.target and self.freeze_at == "target") or t >= self.reach_fraction:
            self._freeze(model)
            return
        ramp = 1 - (1 - self.target / self.dense) * min(t / self.reach_fraction, 1.0)
        factor = math.exp(max(min(self.gain * (now / self.dense - ramp), math.log(2)), -math.log(2)))
        self.scale *= factor
        for gate in gates:
            gate.epsilon.mul_(factor)

    def epoch_metrics(self, trainer, epoch):
        projected = getattr(projected_cost(trainer.model, self.spec, "epsilon-resnet", self.input_hw), self.metric)
        return {"epsilon_scale": self.scale, f"projected_{self.metric}": projected,
                f"target_{self.metric}": self.target, "budget_frozen": self.frozen}

    def state_dict(self):
        return {"scale": self.scale, "frozen_epsilons": self.frozen_epsilons}

    def load_state_dict(self, state):
        self.scale, self.frozen_epsilons = state["scale"], state["frozen_epsilons"]


def slimming_percent_for_target(model, spec, input_hw, target: int, metric: str = "macs", round_to: int = 1) -> float:
    """The smallest global |γ| percentile whose pruning meets the target (network slimming)."""
    low, high = 0.0, 100.0
    for _ in range(30):
        mid = (low + high) / 2
        cost = getattr(projected_cost(model, spec, "slimming", input_hw, prune_percent=mid, round_to=round_to), metric)
        if cost <= target:
            high = mid
        else:
            low = mid
    return high


def budget_callbacks(model, spec, config, input_size) -> list[Callback]:
    """The budget controller a config asks for (none without a target); impossible targets are refused. Width
    rounding left undecided is decided by the model's device (`with_round_to`)."""
    if config.target_macs is None and config.target_params is None:
        return []
    config = with_round_to(config, next(model.parameters()).device.type)
    metric = "macs" if config.target_macs is not None else "params"
    value = config.target_macs if metric == "macs" else config.target_params
    input_hw = tuple(input_size[1:])
    dense = getattr(spec_cost(spec, input_hw), metric)
    target = resolve_target(value, dense, metric)
    if config.method == "none":
        raise ConfigError(f"target_{metric}: the dense method prunes nothing; choose a sparsity method")
    removes_blocks = config.method in ("sss", "epsilon-resnet")
    floor = minimum_cost(spec, input_hw, metric, removes_blocks, config.round_to, config.stream_channels)
    if config.method == "epsilon-resnet":
        floor = minimum_cost(spec, input_hw, metric, True)
    if target < floor:
        raise ConfigError(f"target_{metric}: {target:,} is below the {floor:,} that {config.method} can reach on "
                          f"this model (stem, head and what cannot be removed); the dense model has {dense:,}")
    if config.method == "slimming":
        from .methods import SlimmingPrune

        return [SlimmingPrune(lambda model: slimming_percent_for_target(model, spec, input_hw, target, metric,
                                                                        config.round_to))]
    if config.method == "epsilon-resnet":
        return [EpsilonBudget(spec, input_hw, target, metric, config.target_epoch_fraction, rule=config.budget_rule,
                              freeze_at=config.budget_freeze)]
    from .methods import penalty_of

    return [BudgetController(spec, config.method, input_hw, target, metric, config.target_epoch_fraction,
                             penalty_of(config), rule=config.budget_rule, round_to=config.round_to,
                             freeze_at=config.budget_freeze, rank=config.budget_rank)]
