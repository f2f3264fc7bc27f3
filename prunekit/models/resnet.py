"""ResNets built from a `ResNetSpec`: CIFAR (post- and pre-activation, basic and bottleneck) and
ImageNet ResNets whose parameter names match torchvision's, so its state_dicts load unchanged."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..gates import GateConfig, gated_batch_norm, is_gate
from ..spec import BlockSpec, ResNetSpec, stream_segments

FEW_CHANNELS = 8  # a strided 1x1 conv shortcut with fewer inputs reads every stride-th pixel at stride 1


@dataclass
class ChannelGroup:
    """Channels produced by `conv`, normalised by `bn`, scaled by `gate` and read by `consumer`.

    These are the channels that can be pruned: slicing `conv` outputs, the `through` layers, `bn` and
    `consumer` inputs together keeps the network consistent. A channel whose γ is 0 emits `activation(β)`.
    """

    name: str
    conv: nn.Conv2d
    bn: nn.BatchNorm2d
    gate: nn.Module
    consumer: nn.Module
    conv_stencil: tuple[nn.Module, str] | None = None  # (module, attribute) of conv's ConstantInputBias slot
    consumer_stencil: tuple[nn.Module, str] | None = None  # the same for the consumer (None for a Linear)
    through: tuple[nn.Module, ...] = ()  # per-channel layers between conv and bn (MobileNetV2: a BN, a depthwise conv)
    activation: Callable[[torch.Tensor], torch.Tensor] = F.relu


@dataclass
class CardinalityGroups:
    """The cardinality groups of a ResNeXt block: conv1's outputs and the grouped conv2's in/outputs of
    group k are one structure, scaled by `gate` (one factor per group) after bn2, as in SSS."""

    name: str
    block: nn.Module
    gate: nn.Module

    @property
    def count(self) -> int:
        return self.block.conv2.groups

    @property
    def bn(self) -> nn.BatchNorm2d:
        """The BN of the grouped conv's output, which the group factors scale."""
        return getattr(self.block, "bn3" if self.block.preact else "bn2")


@dataclass
class StreamGroup:
    """Residual-stream channels of one segment (the stem's or a conv or zero-pad shortcut's output, and
    every block up to the next such shortcut) that no earlier segment carries in: one factor each in
    `gate`. Every writer of the segment (stem BN, the last BN of each branch, the shortcut's BN) is
    scaled by the segment's factors, so a channel whose factor is 0 is 0 throughout the segment and is
    read as 0 by every block, the next zero-pad shortcut and the classifier: it can go everywhere.
    A channel carried in by a zero-pad shortcut shares the factor of the channel it carries (one
    coupled group across stages)."""

    name: str
    gate: nn.Module
    segment: int
    root: bool  # the segment carries no channel in: at least one of these channels must stay

    @property
    def width(self) -> int:
        return self.gate.weight.numel()


class ConstantInputBias(nn.Module):
    """What a conv outputs for a constant input under zero padding: per output channel, its k×k tap
    sums (`weight`, shape C_out×1×k×k), applied as a convolution of a ones map so that borders are
    exact. Compression puts here the constant relu(β) of removed BN-γ channels (exact folding)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.stride, self.padding = conv.stride, conv.padding
        self.weight = nn.Parameter(torch.zeros(conv.out_channels, 1, *conv.kernel_size))

    def forward(self, conv_input):
        ones = conv_input.new_ones(1, 1, *conv_input.shape[2:])
        return F.conv2d(ones, self.weight, None, self.stride, self.padding)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: average-pool to the new resolution and zero-pad the new channels. With
    `index`, input channel i lands at output position index[i] (a pruned residual stream)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, index: list[int] | None = None):
        super().__init__()
        self.extra, self.stride = out_channels - in_channels, stride
        source = None
        if index is not None and index != list(range(in_channels)):
            source = torch.empty(out_channels, dtype=torch.long)  # padded channel each output position takes
            source[torch.tensor(index, dtype=torch.long)] = torch.arange(in_channels)
            free = torch.ones(out_channels, dtype=torch.bool)
            free[torch.tensor(index, dtype=torch.long)] = False
            source[free] = torch.arange(in_channels, out_channels)
        self.register_buffer("gather", source, persistent=False)

    def forward(self, x):
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, ceil_mode=True)
        x = F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x
        return x if self.gather is None else x.index_select(1, self.gather)


def _conv(cin, cout, kernel, stride=1, groups=1):
    return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False, groups=groups)


class ResidualBlock(nn.Module):
    """A basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1) block, post- or pre-activation.

    Post-activation layers are named as torchvision's (conv1, bn1, ..., downsample.0/.1); inner
    channel gates sit after the BN of each inner conv, the block gate on the branch output. In a
    grouped (ResNeXt) block the 3x3 conv has `spec.groups` groups; its inner channels are pruned
    only as whole groups, whose factor sits after the grouped conv's BN (gate2).
    """

    def __init__(self, in_channels: int, spec: BlockSpec, block: str, preact: bool, gates: GateConfig):
        super().__init__()
        self.preact, self.spec = preact, spec
        widths = [in_channels, *spec.inner, spec.out]
        kernels = [3, 3] if block == "basic" else [1, 3, 1]
        self.num_convs = len(spec.inner) + 1 if spec.has_branch else 0
        if preact and (spec.has_branch or spec.shortcut == "conv"):
            self.bn1 = nn.BatchNorm2d(in_channels)
        for i in range(self.num_convs):
            stride = spec.stride if (kernels[i] == 3 and (block == "basic") == (i == 0)) else 1
            groups = spec.groups if kernels[i] == 3 else 1
            setattr(self, f"conv{i + 1}", _conv(widths[i], widths[i + 1], kernels[i], stride, groups))
            if spec.stencil and i > 0:
                setattr(self, f"stencil{i + 1}", ConstantInputBias(getattr(self, f"conv{i + 1}")))
            bn_index = i + 2 if preact else i + 1
            if not (preact and i == self.num_convs - 1):
                setattr(self, f"bn{bn_index}", nn.BatchNorm2d(widths[i + 1]))
            if i < self.num_convs - 1:
                if spec.groups == 1:
                    gate = gates.channel_gate(widths[i + 1])
                else:
                    gate = gates.group_gate(spec.groups, widths[i + 1] // spec.groups) if i == 1 else nn.Identity()
                setattr(self, f"gate{i + 1}", gate)
        if spec.has_branch:
            self.gate = gates.block_gate()
        if spec.shortcut == "conv":
            self.gathers_stride = spec.stride > 1 and in_channels < FEW_CHANNELS
            conv = nn.Conv2d(in_channels, spec.out, 1, 1 if self.gathers_stride else spec.stride, bias=False)
            self.downsample = nn.Sequential(conv) if preact else nn.Sequential(conv, nn.BatchNorm2d(spec.out))
        elif spec.shortcut == "pad":
            self.downsample = ZeroPadShortcut(in_channels, spec.out, spec.stride, spec.pad_index)

    def gated_branch(self, x, pre=None, stream=None):
        """The residual function F(x) times its block gate (pre-activated input `pre` for pre-activation)
        and, post-activation, the residual-stream factors `stream`."""
        out = pre if self.preact else x
        for i in range(1, self.num_convs + 1):
            conv_input = out
            out = getattr(self, f"conv{i}")(out)
            if i > 1 and self.spec.stencil:
                out = out + getattr(self, f"stencil{i}")(conv_input)
            if i < self.num_convs:
                bn = getattr(self, f"bn{i + 1 if self.preact else i}")
                out = F.relu(gated_batch_norm(bn, getattr(self, f"gate{i}"), out))
            elif not self.preact:
                return gated_batch_norm(getattr(self, f"bn{i}"), self.gate, out, stream)
        return self.gate(out)

    def forward(self, x, stream=None):
        """`stream`: this block's segment factors (post-activation ResNets with stream gates)."""
        pre = F.relu(self.bn1(x)) if hasattr(self, "bn1") and self.preact else None
        if self.spec.shortcut == "identity":
            shortcut = x
        elif self.spec.shortcut == "conv" and self.preact:
            shortcut = self.downsample(self._every_stride_pixel(pre))
        elif self.spec.shortcut == "conv" and stream is not None:
            shortcut = self.downsample[0](self._every_stride_pixel(x))
            shortcut = gated_batch_norm(self.downsample[1], None, shortcut, stream)
        elif self.spec.shortcut == "conv":
            shortcut = self.downsample(self._every_stride_pixel(x))
        else:
            shortcut = self.downsample(x)
        out = shortcut if not self.spec.has_branch else self.gated_branch(x, pre, stream) + shortcut
        return out if self.preact else F.relu(out)

    def _every_stride_pixel(self, x):
        """With fewer than FEW_CHANNELS inputs, the pixels a strided 1x1 conv reads, for the conv shortcut to
        read them at stride 1: the same function. (oneDNN's channels_last weight gradient of a strided 1x1
        conv with 2 to 7 input channels corrupts the heap on an AVX2 CPU with torch 2.14.1; a pruned stream
        gets there.) Wider shortcuts keep the strided conv, bit-identical to torchvision's."""
        return x[:, :, ::self.spec.stride, ::self.spec.stride] if self.gathers_stride else x

    def branch_convs(self) -> list[nn.Conv2d]:
        return [getattr(self, f"conv{i}") for i in range(1, self.num_convs + 1)]

    def gated_layer(self) -> nn.Module:
        """The layer whose output the block gate scales (compression folds the gate into it): the last
        BN, or the last conv of a pre-activation block."""
        return getattr(self, f"conv{self.num_convs}" if self.preact else f"bn{self.num_convs}")

    def add_stencils(self) -> None:
        """A zero constant-input bias on every conv after the first that has none yet."""
        for i in range(2, self.num_convs + 1):
            if not hasattr(self, f"stencil{i}"):
                setattr(self, f"stencil{i}", ConstantInputBias(getattr(self, f"conv{i}")))

    def channel_groups(self, prefix: str) -> list[ChannelGroup]:
        """Inner channels pruned one by one (none in a grouped block, whose channels go by whole groups)."""
        groups = []
        if self.spec.groups > 1:
            return groups
        for i in range(1, self.num_convs):
            bn = getattr(self, f"bn{i + 1 if self.preact else i}")
            groups.append(ChannelGroup(f"{prefix}.conv{i}", getattr(self, f"conv{i}"), bn,
                                       getattr(self, f"gate{i}"), getattr(self, f"conv{i + 1}"),
                                       (self, f"stencil{i}") if i > 1 else None, (self, f"stencil{i + 1}")))
        return groups


class ResNet(nn.Module):
    """A ResNet built only from its spec; `side_head=(stage, block)` adds ε-ResNet's side classifier
    (BN-ReLU, global pool, linear) after that block, whose logits land in `self.side_logits`."""

    def __init__(self, spec: ResNetSpec, gates: GateConfig | None = None, side_head: tuple[int, int] | None = None):
        super().__init__()
        gates = gates or GateConfig()
        self.spec = spec
        if spec.imagenet_stem:
            self.conv1 = nn.Conv2d(spec.in_channels, spec.stem, 7, 2, 3, bias=False)
        else:
            self.conv1 = _conv(spec.in_channels, spec.stem, 3)
        if spec.imagenet_stem or not spec.preact:
            self.bn1 = nn.BatchNorm2d(spec.stem)
        if spec.imagenet_stem:
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        width, self.side_at, self.side_logits = spec.stem, side_head, None
        side_width = None
        for s, stage in enumerate(spec.stages):
            blocks = []
            for b, block in enumerate(stage):
                blocks.append(ResidualBlock(width, block, spec.block, spec.preact, gates))
                width = block.out
                side_width = width if side_head == (s, b) else side_width
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        if side_head is not None and side_width is None:
            raise ValueError(f"side_head {side_head}: no such block in the spec")
        if spec.preact:
            self.final_bn = nn.BatchNorm2d(width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, spec.num_classes)
        _init_weights(self)
        if gates.stream and gates.kind in ("scale", "binary", "bn"):
            self._add_stream_gates(gates)
        if side_head is not None:  # made last: the network's own weights are drawn as without it
            self.side_head = nn.Sequential(nn.BatchNorm2d(side_width), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                           nn.Flatten(), nn.Linear(side_width, spec.num_classes))

    def _add_stream_gates(self, gates: GateConfig) -> None:
        """One gate per segment over the channels it does not carry in (see `StreamGroup`)."""
        if self.spec.preact:
            raise ValueError("stream channels: post-activation ResNets only (a pre-activation block reads the "
                             "stream through a BN, which turns a removed channel into a constant)")
        self.segments = stream_segments(self.spec)
        self.segment_of = {block: k for k, segment in enumerate(self.segments) for block in segment.blocks}
        self.stream_gates = nn.ModuleList()
        for k, segment in enumerate(self.segments):
            own = len(segment.own)
            self.stream_gates.append(gates.stream_gate(own, segment.carried is None) if own else nn.Identity())
            self.register_buffer(f"stream_own{k}", torch.tensor(segment.own, dtype=torch.long), persistent=False)
            if segment.carried is not None:
                self.register_buffer(f"stream_carried{k}", torch.tensor(segment.carried, dtype=torch.long),
                                     persistent=False)

    def stream_factors(self) -> list[torch.Tensor] | None:
        """Each segment's factor per channel, a carried channel's being its carrier's (None without stream gates)."""
        if not hasattr(self, "stream_gates"):
            return None
        factors = []
        for k, (segment, gate) in enumerate(zip(self.segments, self.stream_gates)):
            if segment.carried is None:
                factors.append(gate.multiplier())
                continue
            factor = factors[-1].new_zeros(segment.width).index_copy(0, getattr(self, f"stream_carried{k}"),
                                                                      factors[-1])
            if segment.own:
                factor = factor.index_copy(0, getattr(self, f"stream_own{k}"), gate.multiplier())
            factors.append(factor)
        return factors

    def stream_layers(self) -> list[int]:
        """Per segment, how many weight layers read or write one of its own channels, following it through
        the zero-pad shortcuts that carry it on (an inner channel has 2: its conv and its consumer)."""
        touched = [0 if segment.carried else 1 for segment in self.segments]  # written by the stem or a conv shortcut
        source = 0  # the segment a block reads
        for k, segment in enumerate(self.segments):
            for s, b in segment.blocks:
                block = self.spec.stages[s][b]
                touched[source] += block.has_branch + (block.shortcut == "conv")  # its first conv, its shortcut conv
                touched[k] += block.has_branch  # its last conv
                source = k
        touched[source] += 1  # the classifier
        for k in range(len(self.segments) - 2, -1, -1):  # a carried channel lives on in the next segment
            if self.segments[k + 1].carried is not None:
                touched[k] += touched[k + 1]
        return touched

    def stream_groups(self) -> list[StreamGroup]:
        """The gated residual-stream channels, a group per segment (none without stream gates)."""
        if not hasattr(self, "stream_gates"):
            return []
        return [StreamGroup(f"stream{k}", gate, k, segment.carried is None)
                for k, (segment, gate) in enumerate(zip(self.segments, self.stream_gates)) if is_gate(gate)]

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{s + 1}") for s in range(len(self.spec.stages))]

    def forward(self, x):
        factors = self.stream_factors()
        x = self.conv1(x)
        if hasattr(self, "bn1"):
            x = F.relu(gated_batch_norm(self.bn1, None, x, factors[0] if factors else None))
        if hasattr(self, "maxpool"):
            x = self.maxpool(x)
        for s, stage in enumerate(self.stages):
            for b, block in enumerate(stage):
                x = block(x, factors[self.segment_of[s, b]] if factors else None)
                if self.side_at == (s, b) and self.training:
                    self.side_logits = self.side_head(x)
        if self.spec.preact:
            x = F.relu(self.final_bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def residual_blocks(self):
        """Yield (stage, block index, module) for every block."""
        for s, stage in enumerate(self.stages):
            for b, block in enumerate(stage):
                yield s, b, block

    def channel_groups(self) -> list[ChannelGroup]:
        """Every prunable channel group: the inner widths of the residual branches."""
        return [g for s, b, block in self.residual_blocks() for g in block.channel_groups(f"layer{s + 1}.{b}")]

    def cardinality_groups(self) -> list[CardinalityGroups]:
        """The cardinality groups of every grouped (ResNeXt) block with a branch."""
        return [CardinalityGroups(f"layer{s + 1}.{b}", block, block.gate2) for s, b, block in self.residual_blocks()
                if block.spec.has_branch and block.spec.groups > 1]


def _init_weights(model: nn.Module) -> None:
    """He-normal convs, unit BN, default linear: the standard ResNet initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
