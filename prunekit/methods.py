"""Sparsity-learning methods: each is gates + optimizers + callbacks + a rule that names dead structures.

| method          | gate on                  | optimizer for the factors         | dead when                        |
|-----------------|--------------------------|-----------------------------------|----------------------------------|
| none            | -                        | -                                 | never                            |
| sss             | channels, groups, blocks | APG, soft-threshold γ·lr          | λ == 0                           |
| binary-gate     | inner channels           | APG on the float gate             | float gate < threshold           |
| ista-bn         | BN γ of inner channels   | ISTA, threshold lr·ρ·c_l          | γ == 0                           |
| slimming        | BN γ of inner channels   | SGD + L1 subgradient s·sign(γ)    | |γ| ≤ global percentile          |
| epsilon-resnet  | residual branches        | none (weight decay)               | moving average of discard == 1   |

With `stream_channels` the four channel methods also gate the residual stream (`models.resnet.StreamGroup`):
SSS and binary gates with their own gate kind, ISTA and slimming with a scale factor per stream channel
that they treat as one more γ.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError
from .engine import Callback
from .gates import BinaryGate, EpsilonGate, GateConfig, ScaleGate, gate_parameters
from .optim import APG, ISTA, add_l1_subgradient, ista_cost_weight
from .spec import ResNetSpec

METHODS = ("none", "sss", "binary-gate", "ista-bn", "slimming", "epsilon-resnet")
DEFAULT_PENALTY = {"sss": 0.01, "binary-gate": 0.01, "ista-bn": 0.005, "slimming": 1e-5}


def gate_config(method: str, config) -> GateConfig:
    """Which gates a method's model is built with."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if method == "sss":
        structures = config.sss_structures.split("+")
        return GateConfig("scale", channels="channels" in structures, blocks="blocks" in structures,
                          groups="groups" in structures, stream=config.stream_channels)
    if method == "binary-gate":
        return GateConfig("binary", channels=True, threshold=config.threshold, stream=config.stream_channels)
    if method == "epsilon-resnet":
        return GateConfig("epsilon", blocks=True, epsilon=config.epsilon)
    if method in ("ista-bn", "slimming"):
        return GateConfig("bn", channels=True, stream=config.stream_channels)
    return GateConfig()


def penalty_of(config) -> float:
    return config.penalty if config.penalty is not None else DEFAULT_PENALTY.get(config.method, 0.0)


# --- dead structures -------------------------------------------------------------------------


@dataclass
class DeadSet:
    """What compression removes: a dead-channel mask per channel group and dead residual branches."""

    channels: dict[str, torch.Tensor] = field(default_factory=dict)
    blocks: set[tuple[int, int]] = field(default_factory=set)
    groups: dict[str, torch.Tensor] = field(default_factory=dict)  # dead cardinality groups per ResNeXt block

    def count_channels(self) -> int:
        return int(sum(int(m.sum()) for m in self.channels.values()))

    def count_groups(self) -> int:
        return int(sum(int(m.sum()) for m in self.groups.values()))


def stream_groups(model: nn.Module) -> list:
    """The model's residual-stream groups (`models.resnet.StreamGroup`); none for models without stream gates."""
    return getattr(model, "stream_groups", lambda: [])()


def channel_widths(model: nn.Module) -> dict[str, int]:
    """The number of channels of every prunable channel set by name: the channel groups, and the
    residual-stream groups (the channels each segment does not carry in)."""
    widths = {g.name: g.bn.num_features for g in model.channel_groups()}
    widths.update({sg.name: sg.width for sg in stream_groups(model)})
    return widths


def channel_factor(group) -> torch.Tensor:
    """The factor a channel group is judged by: its gate's factor, or its BN γ."""
    if isinstance(group.gate, (ScaleGate, BinaryGate)):
        return group.gate.factor()
    return group.bn.weight.detach()


def gamma_factors(model: nn.Module) -> list[torch.Tensor]:
    """The factors the BN-γ methods act on: every prunable BN γ, and the residual-stream factors (one
    per stream channel, in the role of a γ shared by its writers)."""
    return [g.bn.weight for g in model.channel_groups()] + \
        [sg.gate.weight for sg in stream_groups(model)]


def slimming_threshold(model: nn.Module, percent: float) -> float:
    """Network slimming's global threshold: the `percent` percentile of all prunable |γ| (and stream factors)."""
    values = torch.cat([f.detach().abs().flatten() for f in gamma_factors(model)])
    k = int(round(percent / 100 * values.numel()))
    return float(values.sort().values[k - 1]) if k > 0 else -1.0


DISCARD_AVERAGE = 0.999995  # the authors prune a block whose logged average prints as "1" ('{:.5g}')


def epsilon_dropped(block: nn.Module, rule: str = "average", tolerance: float = 1e-4) -> torch.Tensor:
    """ε-ResNet's discard rule for one block, as a device boolean (no host sync).

    `average` (the authors' compressModel.py): the moving average of is_discarded reads 1 to five
    significant digits (≥ 0.999995). `weights` (their README's wording): that, and every conv weight
    of the branch has also decayed to within `tolerance` of zero. `majority` (ours, not the paper's):
    the branch was discarded in most recent steps (average ≥ 0.5), so evaluation does not bring back a
    branch the network has mostly trained without while its average climbs to 1.
    """
    if rule == "majority":
        return block.gate.discarded_average >= 0.5
    dropped = block.gate.discarded_average >= DISCARD_AVERAGE
    if rule == "weights":
        convs = [conv.weight.detach() for conv in block.branch_convs()]
        dropped = dropped & (torch.stack([w.abs().max() for w in convs]).max() <= tolerance)
    return dropped


def dead_structures(model: nn.Module, method: str, *, prune_percent: float | None = None) -> DeadSet:
    """The structures a method's selection rule declares dead, read from the current model state."""
    dead = DeadSet()
    if method == "none":
        return dead
    if method == "slimming":
        threshold = 0.0 if prune_percent is None else slimming_threshold(model, prune_percent)
        for g in model.channel_groups():
            dead.channels[g.name] = g.bn.weight.detach().abs() <= threshold
        for sg in stream_groups(model):
            dead.channels[sg.name] = sg.gate.weight.detach().abs() <= threshold
    elif method != "epsilon-resnet":
        for g in model.channel_groups():  # BN γ for ista-bn; SSS and binary gates only where channels are gated
            if method == "ista-bn" or isinstance(g.gate, (ScaleGate, BinaryGate)):
                dead.channels[g.name] = channel_factor(g) == 0
        for cg in getattr(model, "cardinality_groups", lambda: [])():
            if isinstance(cg.gate, ScaleGate):
                dead.groups[cg.name] = cg.gate.weight.detach() == 0
        for sg in stream_groups(model):
            dead.channels[sg.name] = sg.gate.factor() == 0
    for s, b, block in getattr(model, "residual_blocks", lambda: [])():
        gate = getattr(block, "gate", None)
        if isinstance(gate, EpsilonGate) and bool(gate.dropped):
            dead.blocks.add((s, b))
        elif isinstance(gate, (ScaleGate, BinaryGate)) and float(gate.factor()) == 0:
            dead.blocks.add((s, b))
    return dead


def zero_gammas(model: nn.Module, dead: DeadSet) -> None:
    """Set γ = 0 on the dead channels: a BN-γ channel cut by a threshold then emits only relu(β), which
    compression folds exactly (network slimming's prune step); a dead stream channel's factor to 0."""
    with torch.no_grad():
        for g in model.channel_groups():
            if g.name in dead.channels:
                g.bn.weight.masked_fill_(dead.channels[g.name].to(g.bn.weight.device), 0.0)
        for sg in stream_groups(model):
            sg.gate.weight.masked_fill_(dead.channels[sg.name].to(sg.gate.weight.device), 0.0)


# --- monitoring ------------------------------------------------------------------------------


def ista_costs(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, float]:
    """Ye et al.'s per-layer cost weight c_l for each channel group, from one shape-probing pass."""
    shapes = {}
    hooks = [g.conv.register_forward_hook(lambda m, i, o, name=g.name: shapes.__setitem__(name, o.shape))
             for g in model.channel_groups()]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    model.train(was_training)
    for h in hooks:
        h.remove()
    hw_in = input_size[1] * input_size[2]
    costs = {}
    for g in model.channel_groups():
        _, _, h_out, w_out = shapes[g.name]
        kh, kw = g.conv.kernel_size
        if isinstance(g.consumer, nn.Conv2d):
            c_next, k_next = g.consumer.out_channels, g.consumer.kernel_size[0]
        else:
            c_next, k_next = g.consumer.out_features, 1
        costs[g.name] = ista_cost_weight(h_out, w_out, kh, kw, g.conv.in_channels, hw_in, c_next, k_next)
    return costs


def stream_costs(model: nn.Module, costs: dict[str, float]) -> dict[str, float]:
    """The c_l of each residual-stream group (ours; Ye et al. leave the stream alone): the mean c_l of
    the inner channels of its segment's blocks, which run at its resolution (all groups' mean if none)."""
    result = {}
    for sg in stream_groups(model):
        blocks = {f"layer{s + 1}.{b}." for s, b in model.segments[sg.segment].blocks}
        inner = [c for name, c in costs.items() if name[:name.rindex(".") + 1] in blocks] or list(costs.values())
        result[sg.name] = sum(inner) / len(inner)
    return result


def sparsity_metrics(model: nn.Module, method: str, costs: dict[str, float] | None = None,
                     prune_percent: float | None = None) -> dict:
    """Alive channels per group and blocks per stage, dead counts, and the ISTA monitors."""
    if method == "none":
        return {}
    dead = dead_structures(model, method, prune_percent=prune_percent)
    groups = model.channel_groups()
    metrics = {"alive_channels": [int((~dead.channels[g.name]).sum()) if g.name in dead.channels else g.bn.num_features
                                  for g in groups],
               "dead_channels": dead.count_channels(), "total_channels": sum(channel_widths(model).values())}
    stream = stream_groups(model)
    if stream:
        metrics["alive_stream"] = [int((~dead.channels[sg.name]).sum()) for sg in stream]
    blocks = list(getattr(model, "residual_blocks", lambda: [])())
    if blocks:
        stages = max(s for s, _, _ in blocks) + 1
        metrics["alive_blocks"] = [sum(1 for s, b, blk in blocks if s == st and blk.spec.has_branch
                                       and (s, b) not in dead.blocks) for st in range(stages)]
        metrics["dead_blocks"] = len(dead.blocks)
    cardinality = getattr(model, "cardinality_groups", lambda: [])()
    if cardinality:
        metrics["alive_groups"] = [int((~dead.groups[cg.name]).sum()) if cg.name in dead.groups else cg.count
                                   for cg in cardinality]
        metrics["dead_groups"] = dead.count_groups()
    if method == "epsilon-resnet":  # MobileNetV2: only blocks with an identity shortcut carry an ε gate
        gates = [blk.gate for _, _, blk in blocks if blk.spec.has_branch and isinstance(blk.gate, EpsilonGate)]
        # the authors' discarded_cnt, as logged and read by their LR policy: the moving average of the count
        metrics["discarded_blocks"] = float(sum(g.discarded_average for g in gates)) if gates else 0.0
        metrics["discarded_now"] = int(sum(float(g.is_discarded) for g in gates))
        metrics["branch_peak"] = [round(float(g.peak_average), 4) for g in gates]
    if costs:
        factors = {g.name: channel_factor(g) for g in groups}
        metrics["group_lasso"] = sum(costs[n] * float(f.abs().sum()) for n, f in factors.items())
        metrics["fake_sparsity"] = (sum(costs[n] * int((f == 0).sum()) for n, f in factors.items())
                                    / sum(costs[n] * f.numel() for n, f in factors.items()))
    if method == "binary-gate":
        metrics["gate_ones"] = [int(g.gate.factor().sum()) for g in groups]
        metrics["gate_zeros"] = [int((g.gate.factor() == 0).sum()) for g in groups]
    return metrics


# --- callbacks -------------------------------------------------------------------------------


class SparsityLogger(Callback):
    """Logs the method's structure counts after every epoch."""

    def __init__(self, method: str, costs: dict[str, float] | None, prune_percent: float | None):
        self.method, self.costs, self.prune_percent = method, costs, prune_percent

    def epoch_metrics(self, trainer, epoch):
        return sparsity_metrics(trainer.model, self.method, self.costs, self.prune_percent)


class L1Subgradient(Callback):
    """Network slimming: γ.grad += s·sign(γ) on every prunable BN after backward."""

    def __init__(self, params, strength_of):
        self.params, self.strength_of = params, strength_of

    def after_backward(self, trainer):
        add_l1_subgradient(self.params, self.strength_of())


class SlimmingPrune(Callback):
    """Network slimming's prune step at the end of training: γ = 0 on the channels at or below the
    global |γ| percentile (`percent_of(model)`), before the last evaluation, so the final accuracy is
    that of the network compression exports (their constant relu(β) is folded exactly)."""

    def __init__(self, percent_of):
        self.percent_of = percent_of

    def after_step(self, trainer):
        if trainer.epoch + 1 == trainer.epochs and trainer.step_in_epoch + 1 == len(trainer.train_loader):
            zero_gammas(trainer.model, dead_structures(trainer.model, "slimming",
                                                       prune_percent=self.percent_of(trainer.model)))


class WeightAverage(Callback):
    """Ye et al.'s moving average of the trainable weights (TF's ExponentialMovingAverage(decay, step):
    decay min(decay, (1+t)/(10+t)) at step t). Training ends on the averaged weights, before the last
    evaluation, with γ = 0 wherever the raw γ is 0 (Ye et al. select dead channels by the raw γ), so
    the evaluated and exported network is the averaged one and its cut stays exact."""

    def __init__(self, decay: float):
        self.decay, self.updates, self.shadow = decay, 0, None

    def setup(self, trainer):
        params = list(trainer.model.parameters())
        self.shadow = ([p.detach().clone() for p in params] if self.shadow is None
                       else [s.to(p.device) for s, p in zip(self.shadow, params, strict=True)])

    @torch.no_grad()
    def after_step(self, trainer):
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        torch._foreach_lerp_(self.shadow, [p.detach() for p in trainer.model.parameters()], 1 - decay)
        if trainer.epoch + 1 == trainer.epochs and trainer.step_in_epoch + 1 == len(trainer.train_loader):
            factors = gamma_factors(trainer.model)
            raw_zero = [f == 0 for f in factors]
            for p, s in zip(trainer.model.parameters(), self.shadow):
                p.copy_(s)
            for f, zero in zip(factors, raw_zero):
                f.masked_fill_(zero, 0.0)

    def state_dict(self):
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state):
        self.updates, self.shadow = state["updates"], state["shadow"]


class Distillation(Callback):
    """Logit distillation from a frozen teacher (Hinton et al. 2015): weight · T² · KL(softmax(teacher/T) ‖
    softmax(student/T)), batch mean. The student's input is caught by a forward pre-hook, so the loop
    needs no change."""

    def __init__(self, teacher: nn.Module, weight: float, temperature: float):
        self.teacher, self.weight, self.temperature = teacher.eval(), weight, temperature
        self.inputs = None
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def setup(self, trainer):
        self.teacher.to(next(trainer.model.parameters()).device)
        trainer.model.register_forward_pre_hook(lambda module, args: setattr(self, "inputs", args[0]))

    def loss_terms(self, trainer, logits, targets):
        with torch.no_grad():
            teacher = self.teacher(self.inputs).float()
        t = self.temperature
        kl = nn.functional.kl_div(nn.functional.log_softmax(logits.float() / t, 1),
                                  nn.functional.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True)
        return {"distillation": self.weight * t * t * kl}


class SideSupervision(Callback):
    """ε-ResNet: cross-entropy of the side classifier, weighted, added to the loss."""

    def __init__(self, weight: float):
        self.weight = weight

    def loss_terms(self, trainer, logits, targets):
        side = getattr(trainer.model, "side_logits", None)  # only ResNets have a side classifier
        if side is None:
            return {}
        trainer.model.side_logits = None
        return {"side": self.weight * nn.functional.cross_entropy(side, targets)}


class EpsilonSchedule(Callback):
    """ε = 0 until `start_epoch`, then the configured ε (as the authors' later code)."""

    def __init__(self, epsilon: float, start_epoch: int):
        self.epsilon, self.start_epoch = epsilon, start_epoch

    def on_epoch_start(self, trainer, epoch):
        for m in trainer.model.modules():
            if isinstance(m, EpsilonGate):
                m.epsilon.fill_(self.epsilon if epoch >= self.start_epoch else 0.0)


class EpsilonDiscardRule(Callback):
    """After each epoch's last step, records every block's discard decision (`epsilon_dropped`) in its
    gate, before evaluation: the epoch's test accuracy is that of the network compression exports."""

    def __init__(self, rule: str, tolerance: float):
        self.rule, self.tolerance = rule, tolerance

    def after_step(self, trainer):
        if trainer.step_in_epoch + 1 == len(trainer.train_loader):
            for _, _, block in trainer.model.residual_blocks():
                if isinstance(getattr(block, "gate", None), EpsilonGate):
                    block.gate.dropped.copy_(epsilon_dropped(block, self.rule, self.tolerance))


# --- assembling a method ---------------------------------------------------------------------


@dataclass
class MethodParts:
    optimizers: list[torch.optim.Optimizer]
    callbacks: list[Callback]


def _is_decayed(name: str, param: nn.Parameter, method: str) -> bool:
    """Weight decay on weights, not biases; ε-ResNet, as its authors' code, decays only conv and FC
    weights (BN γ and β stay undecayed), since decay is what drives a discarded branch to zero."""
    if method == "epsilon-resnet":
        return param.dim() > 1
    return param.dim() > 1 or not name.endswith("bias")


def rescale_gamma(model: nn.Module, alpha: float) -> None:
    """Ye et al.'s γ-W rescaling, function-preserving: γ, β ×α and the consumer's weights ×1/α. Refused
    where ReLU6 follows the BN (MobileNetV2): relu6(αx) ≠ α·relu6(x)."""
    clipped = [g.name for g in model.channel_groups() if g.activation is not F.relu]
    if clipped:
        raise ConfigError(f"gamma_rescale: the rescaling preserves the function only through a ReLU; {clipped[0]} is "
                          f"followed by ReLU6; use gamma_rescale 1")
    with torch.no_grad():
        for g in model.channel_groups():
            g.bn.weight.mul_(alpha)
            g.bn.bias.mul_(alpha)
            g.consumer.weight.div_(alpha)


def build_method(model: nn.Module, config, input_size: tuple[int, ...]) -> MethodParts:
    """Optimizers and callbacks for `config.method` on a model built with `gate_config(...)`."""
    method, penalty = config.method, penalty_of(config)
    gates = gate_parameters(model)
    special = {id(p) for p in gates}
    callbacks: list[Callback] = []
    optimizers: list[torch.optim.Optimizer] = []
    costs = None
    stream = stream_groups(model)
    if method == "ista-bn":
        if config.gamma_rescale != 1.0:
            rescale_gamma(model, config.gamma_rescale)
        costs = ista_costs(model, input_size)
        groups = model.channel_groups()
        special |= {id(g.bn.weight) for g in groups}
        stream_cost = stream_costs(model, costs)
        optimizers.append(ISTA([{"params": [g.bn.weight], "cost": costs[g.name]} for g in groups] +
                               [{"params": [sg.gate.weight], "cost": stream_cost[sg.name]} for sg in stream],
                               lr=config.lr, penalty=penalty))
    elif method == "slimming":  # the stream factors train with SGD, like γ, under the L1 subgradient
        special -= {id(sg.gate.weight) for sg in stream}
    elif gates:
        optimizers.append(APG([{"params": [p]} for p in gates], lr=config.lr, momentum=config.gate_momentum,
                              penalty=penalty))
    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in special]
    decay = [p for n, p in rest if _is_decayed(n, p, method)]
    no_decay = [p for n, p in rest if not _is_decayed(n, p, method)]
    optimizers.insert(0, torch.optim.SGD([{"params": decay, "weight_decay": config.weight_decay},
                                          {"params": no_decay, "weight_decay": 0.0}],
                                         lr=config.lr, momentum=config.momentum, nesterov=config.nesterov))
    if method == "slimming":
        callbacks.append(L1Subgradient(gamma_factors(model), lambda: penalty_of(config)))
        if config.prune_percent is not None:
            callbacks.append(SlimmingPrune(lambda _: config.prune_percent))
    if method == "ista-bn" and config.weight_average:
        callbacks.append(WeightAverage(config.weight_average))
    if method == "epsilon-resnet":
        callbacks.append(SideSupervision(config.side_weight))
        callbacks.append(EpsilonSchedule(config.epsilon, config.epsilon_start_epoch))
        callbacks.append(EpsilonDiscardRule(config.discard_rule, config.discard_tolerance))
    callbacks.append(SparsityLogger(method, costs, config.prune_percent))
    return MethodParts(optimizers, callbacks)


def side_head_position(model_spec) -> tuple[int, int] | None:
    """ε-ResNet's side classifier, where the authors' code puts it: in stage 2 after block n//2 (CIFAR,
    n blocks per stage); for 4-stage ImageNet nets in stage 3 after block sum(blocks)//2 − (blocks of
    stages 1–2) − 1 (ResNet-101: 8, ResNet-152: 13). Other families have none."""
    stages = model_spec.stages if isinstance(model_spec, ResNetSpec) else None
    if not stages or len(stages) < 2:
        return None
    counts = [len(stage) for stage in stages]
    if len(stages) == 4:
        return (2, min(max(sum(counts) // 2 - counts[0] - counts[1] - 1, 0), counts[2] - 1))
    return (1, min(counts[1] // 2, counts[1] - 1)) if counts[1] else None
