"""Lossless compression: fold gates into weights, cut dead channels and residual branches, export.

(gated model, spec, dead set) → (smaller spec, plain state_dict). Gate factors are folded into the
BN (or last conv) they scale. A channel whose BN γ is 0 still emits relu(β); its constant
contribution is folded into what follows the consumer (the next BN's running mean, or the
classifier's bias). That fold is exact away from zero-padded borders; on borders of a padded
consumer conv it is not, so such channels are cut only where `exact_borders=False` (the default
for BN-γ methods, whose card then reports the measured logit difference), and otherwise kept.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import spec as specs
from .checkpoint import atomic_write_json, atomic_write_text, load_weights, save_weights
from .errors import one_line
from .gates import BinaryGate, ScaleGate
from .methods import EXACT_METHODS, DeadSet, dead_structures
from .models import build
from .models.resnet import ResNet


class CompressionError(RuntimeError):
    """Compression would be wrong (e.g. outputs differ beyond tolerance, or nothing would be left)."""


@dataclass
class Compressed:
    spec: specs.Spec
    state_dict: dict
    model: nn.Module


def _fold_gates(model: nn.Module) -> None:
    """Multiply every gate's factor into the weights it scales (the gates themselves are not exported)."""
    with torch.no_grad():
        for g in model.channel_groups():
            if isinstance(g.gate, (ScaleGate, BinaryGate)):
                f = g.gate.factor()
                g.bn.weight.mul_(f)
                g.bn.bias.mul_(f)
        for _, _, block in getattr(model, "residual_blocks", lambda: [])():
            gate = getattr(block, "gate", None)
            if isinstance(gate, (ScaleGate, BinaryGate)):
                f = gate.factor()
                if block.preact:
                    getattr(block, f"conv{block.num_convs}").weight.mul_(f)
                else:
                    last_bn = getattr(block, f"bn{block.num_convs}")
                    last_bn.weight.mul_(f)
                    last_bn.bias.mul_(f)


def _follower(model: nn.Module, group) -> nn.Module | None:
    """The module right after the consumer that can absorb a constant: a BN or the classifier."""
    if isinstance(group.consumer, nn.Linear):
        return group.consumer
    for _, _, block in getattr(model, "residual_blocks", lambda: [])():
        for i in range(1, block.num_convs + 1):
            if getattr(block, f"conv{i}") is group.consumer:
                name = f"bn{i + 1}" if block.preact else f"bn{i}"
                return getattr(block, name, None)
    for layer in getattr(model, "features", []):
        if layer.conv is group.consumer:
            return layer.bn
    return None


def _constant_contribution(group, channels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """What the consumer outputs per position from constant relu(β) on `channels` (zero elsewhere)."""
    value = torch.zeros_like(group.bn.bias)
    value[channels] = F.relu(group.bn.bias.detach()[channels])
    if isinstance(group.consumer, nn.Linear):
        return group.consumer.weight.detach() @ value
    x = value.view(1, -1, 1, 1).expand(1, -1, *size)
    return F.conv2d(x, group.consumer.weight.detach(), None, group.consumer.stride, group.consumer.padding)[0]


def _consumer_input_sizes(model: nn.Module, input_size) -> dict[int, tuple[int, int]]:
    sizes = {}
    hooks = [g.consumer.register_forward_hook(lambda m, i, o: sizes.__setitem__(id(m), tuple(i[0].shape[2:])))
             for g in model.channel_groups() if isinstance(g.consumer, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, *input_size))
    for h in hooks:
        h.remove()
    return sizes


def _fold_is_exact(consumer: nn.Module) -> bool:
    """A constant input folds exactly unless a padded conv sees zeros on the border."""
    return isinstance(consumer, nn.Linear) or all(p == 0 for p in consumer.padding)


def _emits_constant(group, mask: torch.Tensor) -> torch.Tensor:
    """Which channels of `mask` would still emit a constant relu(β) > 0 once declared dead.

    A gated channel is dead because its factor is 0, so it emits nothing; a BN-γ channel emits β.
    """
    if isinstance(group.gate, (ScaleGate, BinaryGate)):
        return torch.zeros_like(mask)
    return mask & (group.bn.bias.detach() > 0)


def kept_channels(model: nn.Module, dead: DeadSet, exact_borders: bool = True) -> dict[str, torch.Tensor]:
    """Indices of the channels compression keeps in each group (read-only; no forward pass).

    A dead channel still emitting relu(β) > 0 is kept when its constant cannot be folded forward
    (no BN or classifier after the consumer, or a padded consumer when `exact_borders`); at least
    one channel per group is always kept.
    """
    keep = {}
    for g in model.channel_groups():
        mask = dead.channels.get(g.name, torch.zeros(g.bn.num_features, dtype=torch.bool)).clone()
        constant = _emits_constant(g, mask)
        if constant.any() and (_follower(model, g) is None or (exact_borders and not _fold_is_exact(g.consumer))):
            mask &= ~constant
        if mask.all():
            mask[channel_strength(g).argmax()] = False
        keep[g.name] = (~mask).nonzero().flatten()
    return keep


def pruned_spec(model: nn.Module, spec: specs.Spec, dead: DeadSet, keep: dict[str, torch.Tensor]) -> specs.Spec:
    """The spec of the compressed network: kept widths, dead branches dropped or reduced to shortcuts."""
    new_spec = copy.deepcopy(spec)
    if isinstance(spec, specs.ConvNetSpec):
        for layer, g in zip(new_spec.layers, model.channel_groups()):
            layer.width = len(keep[g.name])
        return new_spec
    new_spec.stages = []
    for s, stage in enumerate(model.stages):
        blocks = []
        for b, block in enumerate(stage):
            block_spec = copy.deepcopy(spec.stages[s][b])
            if (s, b) in dead.blocks or not block_spec.has_branch:
                if block_spec.shortcut == "identity":
                    continue
                block_spec.inner = []
            else:
                block_spec.inner = [len(keep[g.name]) for g in block.channel_groups(f"layer{s + 1}.{b}")]
            blocks.append(block_spec)
        new_spec.stages.append(blocks)
    specs.validate(new_spec)
    return new_spec


def _fold_constants(model: nn.Module, dead: DeadSet, keep: dict[str, torch.Tensor], input_size) -> None:
    """Add the constant relu(β) output of removed channels to what follows their consumer."""
    sizes = _consumer_input_sizes(model, input_size)
    with torch.no_grad():
        for g in model.channel_groups():
            removed = torch.ones(g.bn.num_features, dtype=torch.bool)
            removed[keep[g.name]] = False
            constant = removed & (g.bn.bias.detach() > 0)
            if not constant.any():
                continue
            follower = _follower(model, g)
            contribution = _constant_contribution(g, constant, sizes.get(id(g.consumer), (1, 1)))
            if isinstance(follower, nn.Linear):
                follower.bias.add_(contribution)
            else:
                follower.running_mean.sub_(contribution[:, contribution.shape[1] // 2, contribution.shape[2] // 2])


def channel_strength(group) -> torch.Tensor:
    return group.bn.weight.detach().abs()


def _slice_group(g, idx: torch.Tensor) -> None:
    with torch.no_grad():
        g.conv.weight = nn.Parameter(g.conv.weight[idx].clone())
        g.conv.out_channels = len(idx)
        for name in ("weight", "bias"):
            setattr(g.bn, name, nn.Parameter(getattr(g.bn, name)[idx].clone()))
        g.bn.running_mean = g.bn.running_mean[idx].clone()
        g.bn.running_var = g.bn.running_var[idx].clone()
        g.bn.num_features = len(idx)
        g.consumer.weight = nn.Parameter(g.consumer.weight[:, idx].clone())
        if isinstance(g.consumer, nn.Conv2d):
            g.consumer.in_channels = len(idx)
        else:
            g.consumer.in_features = len(idx)


def compress(model: nn.Module, spec: specs.Spec, dead: DeadSet, input_size: tuple[int, ...], *,
             exact_borders: bool = True) -> Compressed:
    """The smaller plain network equal to the gated one with `dead` structures removed."""
    model = copy.deepcopy(model).cpu().eval()
    keep = kept_channels(model, dead, exact_borders)
    new_spec = pruned_spec(model, spec, dead, keep)
    _fold_gates(model)
    _fold_constants(model, dead, keep, input_size)
    for g in model.channel_groups():
        if len(keep[g.name]) < g.bn.num_features:
            _slice_group(g, keep[g.name])
    if isinstance(model, ResNet):
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(("layer", "side_head"))}
        for s, stage in enumerate(model.stages):
            new_index = 0
            for b, block in enumerate(stage):
                block_spec = spec.stages[s][b]
                branch_dead = (s, b) in dead.blocks or not block_spec.has_branch
                if branch_dead and block_spec.shortcut == "identity":
                    continue
                kept = {k: v for k, v in block.state_dict().items() if not k.startswith("gate") and (
                    not branch_dead or k.startswith("downsample")
                    or (k.startswith("bn1.") and block.preact and block_spec.shortcut == "conv"))}
                state.update({f"layer{s + 1}.{new_index}.{k}": v for k, v in kept.items()})
                new_index += 1
    else:
        state = {k: v for k, v in model.state_dict().items() if ".gate." not in k}
    compressed = build(new_spec)
    compressed.load_state_dict(state, strict=True)
    return Compressed(new_spec, compressed.state_dict(), compressed.eval())


def max_logit_difference(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute logit difference of two models in eval mode on batch `x`."""
    a_mode, b_mode = a.training, b.training
    a.eval(), b.eval()
    with torch.no_grad():
        diff = float((a(x) - b(x)).abs().max())
    a.train(a_mode), b.train(b_mode)
    return diff


# --- export and loading ----------------------------------------------------------------------


def export(directory: str | Path, spec: specs.Spec, state_dict: dict, card: dict) -> Path:
    """spec.json + model.safetensors + card.json/card.md: loads with `prunekit.load`, no pickle."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(state_dict, directory / "model.safetensors")
    atomic_write_json(directory / "spec.json", specs.to_dict(spec))
    atomic_write_json(directory / "card.json", card)
    atomic_write_text(directory / "card.md", card_markdown(card))
    return directory


def card_markdown(card: dict) -> str:
    lines = ["# Compressed model", "", "| field | value |", "|---|---|"]
    for key, value in card.items():
        if not isinstance(value, (dict, list)):
            lines.append(f"| {key} | {value} |")
    return "\n".join(lines) + "\n"


def load(directory: str | Path) -> nn.Module:
    """A compressed export as a ready plain model: `build(spec)` + `load_state_dict`."""
    directory = Path(directory)
    spec = specs.load(directory / "spec.json")
    model = build(spec)
    load_fitting(model, load_weights(directory / "model.safetensors"), directory / "model.safetensors")
    return model.eval()


def load_fitting(model: nn.Module, weights: dict, source: Path) -> None:
    """`load_state_dict(strict=True)`, with weights that do not fit the spec named as a SpecError."""
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = one_line(exc, 300)
        raise specs.SpecError(f"{source}: weights do not fit spec.json ({first})") from None


def load_any(path: str | Path) -> tuple[nn.Module, specs.Spec]:
    """A model from a run directory (its final/ gated model), a saved gated model or an export."""
    from .runner import load_final

    path = Path(path)
    if (path / "final").is_dir():
        path = path / "final"
    if (path / "gates.json").exists():
        spec, gates, weights, side = load_final(path)
        model = build(spec, gates, side)
        load_fitting(model, weights, path / "model.safetensors")
        return model.eval(), spec
    model = load(path)
    return model, specs.load(path / "spec.json")


def entirely_dead(model: nn.Module, dead: DeadSet) -> str | None:
    """Which kind of structure the selection rule found dead everywhere (nothing learned would be left), or None."""
    groups = [g.name for g in model.channel_groups() if g.name in dead.channels]
    if groups and all(bool(dead.channels[name].all()) for name in groups):
        return f"every channel of every group ({', '.join(groups[:3])}{', ...' if len(groups) > 3 else ''})"
    branches = [(s, b) for s, b, block in getattr(model, "residual_blocks", lambda: [])() if block.spec.has_branch]
    if branches and all(branch in dead.blocks for branch in branches):
        return f"every residual branch ({len(branches)} of them)"
    return None


def compress_run(path: str | Path, out: str | Path | None = None, *, method: str | None = None,
                 prune_percent: float | None = None, tolerance: float = 1e-3, data: str | None = None,
                 data_dir: str | None = None, batch: torch.Tensor | None = None) -> dict:
    """Compress a trained run's final model, check equivalence, export, and return its card."""
    from .config import make_config
    from .measure import count_params, spec_cost
    from .runner import input_size, load_final

    run = Path(path)
    recorded = json.loads((run / "config.json").read_text())["config"] if (run / "config.json").exists() else {}
    config = make_config({**recorded, **{k: v for k, v in {"data": data, "data_dir": data_dir}.items() if v}})
    method = method or config.method
    prune_percent = prune_percent if prune_percent is not None else config.prune_percent
    saved = run / "final" if (run / "final").is_dir() else run
    spec, gates, weights, side = load_final(saved)
    gated = build(spec, gates, side)
    load_fitting(gated, weights, saved / "model.safetensors")
    gated.eval()
    size = input_size(config)
    if method == "slimming" and prune_percent is None and config.target_macs is not None:
        from .budget import resolve_target, slimming_percent_for_target

        dense = spec_cost(spec, size[1:]).macs
        prune_percent = slimming_percent_for_target(gated, spec, size[1:], resolve_target(config.target_macs, dense, "macs"))
    dead = dead_structures(gated, method, prune_percent=prune_percent)
    everything = entirely_dead(gated, dead)
    if everything:
        raise CompressionError(f"{run}: {everything} is dead: the penalty diverged; train again with a lower "
                               f"--penalty (or a larger budget)")
    exact = method in EXACT_METHODS
    result = compress(gated, spec, dead, size, exact_borders=exact)
    if batch is None:
        batch = torch.randn(8, *size, generator=torch.Generator().manual_seed(0))
    difference = max_logit_difference(gated, result.model, batch)
    if exact and difference > tolerance:
        raise CompressionError(f"{run}: compressed logits differ by {difference:.3g} > tolerance {tolerance}")
    before, after = spec_cost(spec, size[1:]), spec_cost(result.spec, size[1:])
    assert count_params(result.model) == after.params
    card = {"source": str(run), "method": method, "params_before": before.params, "params_after": after.params,
            "macs_before": before.macs, "macs_after": after.macs, "macs_ratio": after.macs / before.macs,
            "max_logit_difference": difference, "exact": exact, "dead_channels": dead.count_channels(),
            "dead_blocks": len(dead.blocks), "prune_percent": prune_percent, "stages": specs.stage_table(result.spec)}
    export(out or run / "compressed", result.spec, result.state_dict, card)
    return card
