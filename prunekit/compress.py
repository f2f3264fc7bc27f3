"""Lossless compression: fold gates into weights, cut dead channels, groups and residual branches, export.

(gated model, spec, dead set) → (smaller spec, plain state_dict). Gate factors are folded into the
BN (or last conv) they scale. A removed BN-γ channel whose γ is 0 still emits the constant relu(β);
its contribution is folded exactly into what reads it: the classifier's bias, or the consumer conv's
`ConstantInputBias` (per output channel its k×k tap sums, applied as a convolution of a ones map, so
zero-padded borders are exact too). In MobileNetV2 the γ is the depthwise BN's, so the constant
relu6(β) reaches the 1x1 projection. A removed channel that is not constant (γ ≠ 0) cannot be
folded: the equivalence check then refuses the compression.
"""
from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import spec as specs
from .checkpoint import atomic_write_json, atomic_write_text, load_weights, save_weights
from .errors import FileFormatError, one_line, read_json
from .gates import BinaryGate, ScaleGate
from .methods import DeadSet, dead_structures, stream_groups, zero_gammas
from .models import MobileNetV2, build
from .models.resnet import ResNet


class CompressionError(RuntimeError):
    """Compression would be wrong (e.g. outputs differ beyond tolerance, or nothing would be left)."""


@dataclass
class Compressed:
    spec: specs.Spec
    state_dict: dict
    model: nn.Module


def _cardinality_groups(model: nn.Module):
    return getattr(model, "cardinality_groups", lambda: [])()


def stream_kept(model: nn.Module, keep: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
    """The kept positions (sorted, on the host) of each residual-stream segment, from the kept indices
    of each segment's own channels in `keep` (None for a model without stream gates). A segment keeps
    what its zero-pad shortcut carries in from the kept channels of the segment before."""
    if not hasattr(model, "stream_gates"):
        return None
    kept = []
    for k, segment in enumerate(model.segments):
        own = torch.tensor(segment.own, dtype=torch.long, device="cpu")
        positions = own[keep[f"stream{k}"]] if f"stream{k}" in keep else own
        if segment.carried is not None:
            positions = torch.cat([torch.tensor(segment.carried, dtype=torch.long, device="cpu")[kept[-1]], positions])
        kept.append(positions.sort().values)
    return kept


def _fold_gates(model: nn.Module) -> None:
    """Multiply every gate's factor into the weights it scales (the gates themselves are not exported)."""
    with torch.no_grad():
        for g in [*model.channel_groups(), *_cardinality_groups(model)]:
            if isinstance(g.gate, (ScaleGate, BinaryGate)):
                f = g.gate.factor()
                g.bn.weight.mul_(f)
                g.bn.bias.mul_(f)
        for _, _, block in getattr(model, "residual_blocks", lambda: [])():
            gate = getattr(block, "gate", None)
            if isinstance(gate, (ScaleGate, BinaryGate)):
                f = gate.factor()
                layer = block.gated_layer()
                layer.weight.mul_(f)
                if isinstance(layer, nn.BatchNorm2d):
                    layer.bias.mul_(f)
        for bn, f in _stream_writers(model):
            bn.weight.mul_(f)
            bn.bias.mul_(f)


def _stream_writers(model: nn.Module) -> list[tuple[nn.BatchNorm2d, torch.Tensor]]:
    """(BN, its segment's stream factors) for every BN writing the residual stream of a model with
    stream gates: the stem's, each branch's last and each conv shortcut's."""
    factors = model.stream_factors() if hasattr(model, "stream_gates") else None
    if factors is None:
        return []
    factors = [f.detach() for f in factors]
    writers = [(model.bn1, factors[0])]
    for s, b, block in model.residual_blocks():
        f = factors[model.segment_of[s, b]]
        if block.spec.has_branch:
            writers.append((block.gated_layer(), f))
        if block.spec.shortcut == "conv":
            writers.append((block.downsample[1], f))
    return writers


def _block_bn(block: nn.Module, conv_index: int) -> nn.BatchNorm2d:
    """The BN that normalises conv `conv_index`'s output in a residual block."""
    return getattr(block, f"bn{conv_index + 1 if block.preact else conv_index}")


def _emits_constant(group, removed: torch.Tensor) -> torch.Tensor:
    """Which `removed` channels emit a nonzero constant relu(β) (or relu6(β)): BN-γ channels (removed
    because γ = 0, or about to be zeroed by a budget's freeze) with β > 0. A gated channel is removed
    because its factor is 0, so it emits nothing."""
    if isinstance(group.gate, (ScaleGate, BinaryGate)):
        return torch.zeros_like(removed)
    return removed & (group.bn.bias.detach() > 0)


def _removed(group, keep: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """The mask of the group's channels not in `keep`."""
    removed = torch.ones(group.bn.num_features, dtype=torch.bool, device=device)
    removed[keep] = False
    return removed


def channel_strength(group) -> torch.Tensor:
    return group.bn.weight.detach().abs()


def host_rows(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Equal-dtype device vectors brought to the host in one transfer (one device read, not one per row)."""
    if not rows:
        return []
    flat = torch.cat([row.reshape(-1).float() for row in rows]).cpu()
    return list(flat.split([row.numel() for row in rows]))


def channel_factor(group) -> torch.Tensor:
    """|factor| of each channel: the gate's for a gated group, the BN γ's otherwise."""
    if isinstance(group.gate, (ScaleGate, BinaryGate)):
        return group.gate.weight.detach().abs().reshape(-1)
    return channel_strength(group)


def rounded_width(alive: int, width: int, round_to: int) -> int:
    """The smallest multiple of `round_to` holding `alive` channels, capped at the group's `width`."""
    return min(-(-alive // round_to) * round_to, width)


def _round_up(removed: torch.Tensor, factor: torch.Tensor, round_to: int) -> torch.Tensor:
    """`removed` less its highest-|factor| channels, so that the kept count is a multiple of `round_to`
    (or the whole group). A kept dead channel changes nothing: a zero-gated one outputs 0, a γ = 0 one
    keeps emitting its constant relu(β) through the kept weights instead of a folded bias."""
    extra = rounded_width(int((~removed).sum()), len(removed), round_to) - int((~removed).sum())
    if extra <= 0:
        return removed
    candidates = removed.nonzero().flatten()
    order = torch.sort(factor[candidates], descending=True, stable=True).indices
    removed = removed.clone()
    removed[candidates[order[:extra]]] = False
    return removed


def kept_channels(model: nn.Module, dead: DeadSet, round_to: int = 1) -> dict[str, torch.Tensor]:
    """Indices (on the host) of the channels, and for grouped blocks the cardinality groups, that
    compression keeps, by structure name; at least one per structure, the strongest, is always kept.
    With `round_to` N > 1 each channel group, and each stream group's own channels (so every stretch
    of the stream), keeps a multiple of N channels (or all of them), adding its highest-|factor| dead
    ones; cardinality groups are not rounded.
    Read-only, no forward pass, one device read (the budget controller projects costs with it)."""
    groups = list(model.channel_groups())
    structures = [(g.name, dead.channels.get(g.name), channel_strength(g)) for g in groups]
    stream = stream_groups(model)
    stream_names = {sg.name for sg in stream}
    carried_in = {sg.name for sg in stream if not sg.root}
    structures += [(sg.name, dead.channels.get(sg.name), sg.gate.weight.detach().abs()) for sg in stream]
    for cg in _cardinality_groups(model):
        strength = cg.gate.weight.detach().abs() if isinstance(cg.gate, ScaleGate) else cg.block.bn1.weight.new_ones(cg.count)
        structures.append((cg.name, dead.groups.get(cg.name), strength))
    rows = []
    for _, mask, strength in structures:
        rows += [strength if mask is None else mask.to(strength.device).float(), strength]
    if round_to > 1:
        rows += [channel_factor(g).to(rows[0].device) for g in groups]
    host = host_rows(rows)
    factors = dict(zip((g.name for g in groups), host[2 * len(structures):])) if round_to > 1 else {}
    keep = {}
    for (name, mask, _), dead_row, strength in zip(structures, host[0::2], host[1::2]):
        removed = dead_row > 0.5 if mask is not None else torch.zeros(len(strength), dtype=torch.bool, device="cpu")
        if removed.all() and name not in carried_in:  # a segment fed by a zero-pad shortcut keeps what it carries
            removed[strength.argmax()] = False
        if name in factors:
            removed = _round_up(removed, factors[name], round_to)
        elif round_to > 1 and name in stream_names:
            removed = _round_up(removed, strength, round_to)  # a stream group's strength is its |factor|
        keep[name] = (~removed).nonzero().flatten()
    return keep


def _stencil_owners(model: nn.Module, keep: dict[str, torch.Tensor]) -> set[int]:
    """ids of the modules (blocks, conv layers) whose consumer convs need a ConstantInputBias: those
    reading a removed BN-γ channel with β > 0 (one device read for all groups)."""
    groups = [g for g in model.channel_groups()
              if g.consumer_stencil is not None and not isinstance(g.gate, (ScaleGate, BinaryGate))]
    positive = host_rows([g.bn.bias.detach() > 0 for g in groups])
    return {id(g.consumer_stencil[0]) for g, pos in zip(groups, positive)
            if bool((pos[_removed(g, keep[g.name])] > 0.5).any())}


def pruned_spec(model: nn.Module, spec: specs.Spec, dead: DeadSet, keep: dict[str, torch.Tensor]) -> specs.Spec:
    """The spec of the compressed network: kept widths and groups, dead branches dropped or reduced to
    shortcuts, constant-input biases where removed constant channels are folded."""
    new_spec = copy.deepcopy(spec)
    stencils = _stencil_owners(model, keep)
    if isinstance(spec, specs.MobileNetV2Spec):  # dead blocks (identity shortcuts only) leave the spec
        new_spec.stages = [[] for _ in spec.stages]
        for k, (s, b, block) in enumerate(model.residual_blocks(), start=1):
            if (s, b) in dead.blocks:
                continue
            block_spec = copy.deepcopy(spec.stages[s][b])
            if block_spec.expand:
                block_spec.inner = [len(keep[f"features.{k}"])]
                block_spec.stencil = block_spec.stencil or id(block) in stencils
            new_spec.stages[s].append(block_spec)
        new_spec.head = len(keep[f"features.{len(model.features) - 1}"])
        specs.validate(new_spec)
        return new_spec
    if isinstance(spec, specs.ConvNetSpec):
        for layer_spec, layer, g in zip(new_spec.layers, model.features, model.channel_groups()):
            layer_spec.width = len(keep[g.name])
            layer_spec.stencil = layer_spec.stencil or id(layer) in stencils
        return new_spec
    new_spec.stages = []
    stream = stream_kept(model, keep)
    if stream is not None:
        new_spec.stem = len(stream[0])
    for s, stage in enumerate(model.stages):
        blocks = []
        for b, block in enumerate(stage):
            block_spec = copy.deepcopy(spec.stages[s][b])
            if stream is not None:
                _prune_stream_spec(block_spec, model, stream, model.segment_of[s, b])
            if (s, b) in dead.blocks or not block_spec.has_branch:
                if block_spec.shortcut == "identity":
                    continue
                block_spec.inner, block_spec.groups, block_spec.stencil = [], 1, False
            elif block_spec.groups > 1:
                per_group = block_spec.inner[0] // block_spec.groups
                block_spec.groups = len(keep[f"layer{s + 1}.{b}"])
                block_spec.inner = [block_spec.groups * per_group] * 2
            else:
                block_spec.inner = [len(keep[g.name]) for g in block.channel_groups(f"layer{s + 1}.{b}")]
                block_spec.stencil = block_spec.stencil or id(block) in stencils
            blocks.append(block_spec)
        new_spec.stages.append(blocks)
    specs.validate(new_spec)
    return new_spec


def _prune_stream_spec(block_spec: specs.BlockSpec, model: nn.Module, stream: list[torch.Tensor], k: int) -> None:
    """A block's kept output width and, for a zero-pad shortcut, where the kept channels it carries land."""
    block_spec.out = len(stream[k])
    segment = model.segments[k]
    if block_spec.shortcut == "pad":  # it starts segment k
        rank = {int(c): i for i, c in enumerate(stream[k])}
        index = [rank[segment.carried[int(c)]] for c in stream[k - 1]]
        block_spec.pad_index = None if index == list(range(len(index))) else index


def _slice_stream(model: nn.Module, stream: list[torch.Tensor]) -> None:
    """Cut the removed residual-stream channels: the writers' outputs (stem, each branch's last conv,
    BN and constant-input bias, conv shortcuts) and the readers' inputs (first convs, conv shortcuts,
    classifier)."""
    with torch.no_grad():
        _slice_out(model.conv1, stream[0])
        _slice_bn(model.bn1, stream[0])
        previous = stream[0]
        for s, b, block in model.residual_blocks():
            kept = stream[model.segment_of[s, b]]
            if block.spec.has_branch:
                block.conv1.weight = nn.Parameter(block.conv1.weight[:, previous].clone())
                last = block.num_convs
                _slice_out(getattr(block, f"conv{last}"), kept)
                if hasattr(block, f"stencil{last}"):
                    _slice_out(getattr(block, f"stencil{last}"), kept)
                _slice_bn(getattr(block, f"bn{last}"), kept)
            if block.spec.shortcut == "conv":
                block.downsample[0].weight = nn.Parameter(block.downsample[0].weight[kept][:, previous].clone())
                _slice_bn(block.downsample[1], kept)
            previous = kept
        model.fc.weight = nn.Parameter(model.fc.weight[:, previous].clone())


def _slice_out(layer: nn.Module, idx: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight[idx].clone())


def _add_stencils(model: nn.Module, owners: set[int]) -> None:
    """Give the consumer convs of `owners` (blocks, conv layers) a zero ConstantInputBias where they have none yet."""
    for module in list(model.modules()):
        if id(module) in owners:
            module.add_stencils()


def _fold_constants(model: nn.Module, keep: dict[str, torch.Tensor]) -> None:
    """Add the constant relu(β) output of removed channels to what reads it (exact when their γ is 0)."""
    with torch.no_grad():
        for g in model.channel_groups():
            constant = _emits_constant(g, _removed(g, keep[g.name], g.bn.weight.device))
            if not constant.any():
                continue
            value = torch.where(constant, g.activation(g.bn.bias.detach()), torch.zeros_like(g.bn.bias))
            if g.consumer_stencil is None:
                g.consumer.bias.add_(g.consumer.weight @ value)
            else:
                owner, name = g.consumer_stencil
                taps = torch.einsum("oikl,i->okl", g.consumer.weight, value)
                getattr(owner, name).weight.add_(taps.unsqueeze(1))


def _slice_group(g, idx: torch.Tensor) -> None:
    with torch.no_grad():
        g.conv.weight = nn.Parameter(g.conv.weight[idx].clone())
        g.conv.out_channels = len(idx)
        for layer in g.through:
            if isinstance(layer, nn.BatchNorm2d):
                _slice_bn(layer, idx)
            else:  # a depthwise conv: one filter per channel
                layer.weight = nn.Parameter(layer.weight[idx].clone())
                layer.in_channels = layer.out_channels = layer.groups = len(idx)
        if g.conv_stencil is not None and hasattr(*g.conv_stencil):
            stencil = getattr(*g.conv_stencil)
            stencil.weight = nn.Parameter(stencil.weight[idx].clone())
        _slice_bn(g.bn, idx)
        g.consumer.weight = nn.Parameter(g.consumer.weight[:, idx].clone())
        if isinstance(g.consumer, nn.Conv2d):
            g.consumer.in_channels = len(idx)
        else:
            g.consumer.in_features = len(idx)


def _slice_bn(bn: nn.BatchNorm2d, idx: torch.Tensor) -> None:
    for name in ("weight", "bias"):
        setattr(bn, name, nn.Parameter(getattr(bn, name)[idx].clone()))
    bn.running_mean = bn.running_mean[idx].clone()
    bn.running_var = bn.running_var[idx].clone()
    bn.num_features = len(idx)


def _slice_cardinality(cg, kept_groups: torch.Tensor) -> None:
    """Keep whole groups of a ResNeXt block: conv1's outputs, the grouped conv2 and conv3's inputs."""
    block = cg.block
    per_group = block.conv2.out_channels // block.conv2.groups
    idx = (kept_groups.view(-1, 1) * per_group + torch.arange(per_group, device=kept_groups.device)).flatten()
    with torch.no_grad():
        block.conv1.weight = nn.Parameter(block.conv1.weight[idx].clone())
        block.conv2.weight = nn.Parameter(block.conv2.weight[idx].clone())
        block.conv3.weight = nn.Parameter(block.conv3.weight[:, idx].clone())
        _slice_bn(_block_bn(block, 1), idx)
        _slice_bn(_block_bn(block, 2), idx)
    block.conv1.out_channels = block.conv2.in_channels = block.conv2.out_channels = block.conv3.in_channels = len(idx)
    block.conv2.groups = len(kept_groups)


def compress(model: nn.Module, spec: specs.Spec, dead: DeadSet, round_to: int = 1) -> Compressed:
    """The smaller plain network equal to the gated one with `dead` structures removed; with `round_to`
    N, every channel group keeps a multiple of N channels (see `kept_channels`)."""
    model = copy.deepcopy(model).cpu().eval()
    keep = kept_channels(model, dead, round_to)
    new_spec = pruned_spec(model, spec, dead, keep)
    _add_stencils(model, _stencil_owners(model, keep))
    _fold_gates(model)
    _fold_constants(model, keep)
    for g in model.channel_groups():
        if len(keep[g.name]) < g.bn.num_features:
            _slice_group(g, keep[g.name])
    for cg in _cardinality_groups(model):
        if len(keep[cg.name]) < cg.count:
            _slice_cardinality(cg, keep[cg.name])
    stream = stream_kept(model, keep)
    if stream is not None:
        _slice_stream(model, stream)
    if isinstance(model, ResNet):
        state = {k: v for k, v in model.state_dict().items()
                 if not k.startswith(("layer", "side_head", "stream_gates"))}
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
    elif isinstance(model, MobileNetV2):  # features renumbered over the dead blocks
        alive = [0] + [k for k, (s, b, _) in enumerate(model.residual_blocks(), start=1) if (s, b) not in dead.blocks]
        renumber = {old: new for new, old in enumerate(alive + [len(model.features) - 1])}
        state = {}
        for key, value in model.state_dict().items():
            if ".gate." in key:
                continue
            if key.startswith("features."):
                _, index, rest = key.split(".", 2)
                if int(index) not in renumber:
                    continue
                key = f"features.{renumber[int(index)]}.{rest}"
            state[key] = value
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


EXPORT_FILES = ("model.safetensors", "spec.json", "card.md", "card.json")
STAGING = ".export-"  # the folder an export is written into before its files are renamed into place


def export(directory: str | Path, spec: specs.Spec, state_dict: dict, card: dict) -> Path:
    """spec.json + model.safetensors + card.json/card.md: loads with `prunekit.load`, no pickle.

    The files are written into a hidden staging folder inside `directory` and renamed into place only
    when all are written, so a full disk (or NaN weights, which are refused) leaves the previous export
    whole. A folder staged by a killed export is removed by the next one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(STAGING + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=STAGING))
    try:
        save_weights(state_dict, staging / "model.safetensors")
        atomic_write_json(staging / "spec.json", specs.to_dict(spec))
        atomic_write_text(staging / "card.md", card_markdown(card))
        atomic_write_json(staging / "card.json", card)
        for name in EXPORT_FILES:  # the card last: an export with a card is complete
            os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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


def relative_logit_difference(gated: nn.Module, compressed: nn.Module, x: torch.Tensor) -> float:
    """max |logit difference| / max |gated logit| on batch `x`, both in eval mode."""
    with torch.no_grad():
        reference = gated.eval()(x)
        return float((compressed.eval()(x) - reference).abs().max() / reference.abs().max().clamp(min=1e-12))


def _check_export_target(directory: Path, run: Path) -> None:
    """An export may replace only an export of the same run (card.json's "source"), one a killed export
    left without its card, or nothing: a directory holding any other file is refused."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise CompressionError(f"{directory}: is a file, not an export directory; choose another --out")
    foreign = [p.name for p in directory.iterdir() if p.name not in EXPORT_FILES and not p.name.startswith(STAGING)]
    source = None
    if (directory / "card.json").exists():
        try:
            card = read_json(directory / "card.json")
        except FileFormatError:
            card = None
        source = card.get("source") if isinstance(card, dict) else None
        if not (isinstance(source, str) and (source == str(run) or Path(source).resolve() == run.resolve())):
            foreign.append("card.json")
    if foreign:
        raise CompressionError(f"{directory}: holds something other than an export of {run} ({foreign[0]}); use "
                               f"--force to write the export there anyway, or choose another --out")


def compress_run(path: str | Path, out: str | Path | None = None, *, method: str | None = None,
                 prune_percent: float | None = None, tolerance: float = 1e-4, data: str | None = None,
                 data_dir: str | None = None, batch: torch.Tensor | None = None, force: bool = False) -> dict:
    """Compress a trained run's final model, check equivalence on random inputs and on a batch of the
    run's test data (when it can be read), export, and return its card. Refuses, with one line, a
    compression whose logits differ from the gated model's by more than `tolerance` (relative), and an
    `out` holding anything but an export of this run unless `force`."""
    from .config import make_config, with_round_to
    from .measure import count_params, spec_cost
    from .runner import input_size, load_final, real_batch, recorded_config

    run = Path(path)
    target = Path(out) if out else run / "compressed"
    if not force:
        _check_export_target(target, run)
    recorded = recorded_config(run) if (run / "config.json").exists() else {}
    config = make_config({**recorded, **{k: v for k, v in {"data": data, "data_dir": data_dir}.items() if v}},
                         str(run / "config.json"))
    config = with_round_to(config, "cpu", recorded=1)  # a run from before round_to kept every alive channel
    method = method or config.method
    prune_percent = prune_percent if prune_percent is not None else config.prune_percent
    saved = run / "final" if (run / "final").is_dir() else run
    if not (saved / "gates.json").exists():
        raise CompressionError(f"{run}: holds no trained model (final/ with gates.json, spec.json and "
                               f"model.safetensors); did its training finish?")
    spec, gates, weights, side = load_final(saved)
    gated = build(spec, gates, side)
    load_fitting(gated, weights, saved / "model.safetensors")
    gated.eval()
    size = input_size(config)
    if method == "slimming" and prune_percent is None and config.target_macs is not None:
        from .budget import resolve_target, slimming_percent_for_target

        dense = spec_cost(spec, size[1:]).macs
        budget = resolve_target(config.target_macs, dense, "macs")
        prune_percent = slimming_percent_for_target(gated, spec, size[1:], budget, round_to=config.round_to)
    dead = dead_structures(gated, method, prune_percent=prune_percent)
    everything = entirely_dead(gated, dead) if method != "epsilon-resnet" else None  # ε may discard every branch
    if everything:
        raise CompressionError(f"{run}: {everything} is dead: the penalty diverged; train again with a lower "
                               f"--penalty (or a larger budget)")
    if method == "slimming":
        zero_gammas(gated, dead)
    result = compress(gated, spec, dead, config.round_to)
    batches = {"random": torch.randn(8, *size, generator=torch.Generator().manual_seed(0))}
    real = batch if batch is not None else real_batch(config)
    if real is not None:
        batches["data"] = real
    differences = {name: relative_logit_difference(gated, result.model, x) for name, x in batches.items()}
    overflowing = [name for name, difference in differences.items() if not math.isfinite(difference)]
    if overflowing:
        raise CompressionError(f"{run}: the model's logits on {overflowing[0]} inputs are not finite (its training "
                               f"diverged); nothing exported")
    worst = max(differences, key=differences.get)
    if not differences[worst] <= tolerance:
        raise CompressionError(f"{run}: compressed logits differ from the gated model's by {differences[worst]:.3g} "
                               f"(relative, on {worst} inputs) > tolerance {tolerance}; nothing exported")
    before, after = spec_cost(spec, size[1:]), spec_cost(result.spec, size[1:])
    assert count_params(result.model) == after.params
    card = {"source": str(run), "method": method, "params_before": before.params, "params_after": after.params,
            "macs_before": before.macs, "macs_after": after.macs, "macs_ratio": after.macs / before.macs,
            "max_logit_difference": max(differences.values()), "checked_on": sorted(differences), "exact": True,
            "dead_channels": dead.count_channels(), "dead_groups": dead.count_groups(),
            "dead_blocks": len(dead.blocks), "prune_percent": prune_percent, "round_to": config.round_to,
            "stages": specs.stage_table(result.spec)}
    export(target, result.spec, result.state_dict, card)
    return card
