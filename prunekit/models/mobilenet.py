"""MobileNetV2 built from a `MobileNetV2Spec`, its parameter names those of torchvision's mobilenet_v2,
so torchvision's state_dicts load unchanged.

The prunable structures: a block's expansion channels (the 1x1 expansion conv's outputs, its BN, the
depthwise conv and its BN, the projection's inputs: one structure, scaled after the depthwise BN so
that a dead channel reaches the projection as an exact zero), the head conv's channels, and whole
blocks with an identity shortcut (their branch is gated after the projection's BN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..gates import GateConfig, gated_batch_norm
from ..spec import InvertedResidualSpec, MobileNetV2Spec
from .resnet import ChannelGroup, ConstantInputBias


class ConvBN(nn.Sequential):
    """conv → BN → gate → ReLU6, conv and BN at indices 0 and 1 as in torchvision's Conv2dNormActivation."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 gate: nn.Module | None = None):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))
        self.gate = gate or nn.Identity()

    def forward(self, x):
        return F.relu6(gated_batch_norm(self[1], self.gate, self[0](x)))


class InvertedResidual(nn.Module):
    """1x1 expansion (ConvBN), 3x3 depthwise (ConvBN, gated per channel), linear 1x1 projection + BN
    (gated as a whole where the shortcut is an identity), named as torchvision's `conv.0 ... conv.3`."""

    def __init__(self, in_channels: int, spec: InvertedResidualSpec, gates: GateConfig):
        super().__init__()
        self.spec = spec
        inner = spec.inner[0]
        layers = [ConvBN(in_channels, inner, 1)] if spec.expand else []
        layers.append(ConvBN(inner, inner, 3, spec.stride, groups=inner,
                             gate=gates.channel_gate(inner) if spec.expand else None))
        layers += [nn.Conv2d(inner, spec.out, 1, bias=False), nn.BatchNorm2d(spec.out)]
        self.conv = nn.Sequential(*layers)
        if spec.stencil:
            self.stencil = ConstantInputBias(self.conv[-2])
        self.gate = gates.block_gate() if spec.shortcut == "identity" else nn.Identity()

    def forward(self, x):
        out = x
        for layer in self.conv[:-2]:
            out = layer(out)
        projected = self.conv[-2](out) + self.stencil(out) if hasattr(self, "stencil") else self.conv[-2](out)
        branch = gated_batch_norm(self.conv[-1], self.gate, projected)
        return x + branch if self.spec.shortcut == "identity" else branch

    def branch_convs(self) -> list[nn.Conv2d]:
        return [m for m in self.conv.modules() if isinstance(m, nn.Conv2d)]

    def gated_layer(self) -> nn.Module:
        """The layer whose output the block gate scales (compression folds the gate into it)."""
        return self.conv[-1]

    def add_stencils(self) -> None:
        """A zero constant-input bias on the projection, if it has none yet."""
        if not hasattr(self, "stencil"):
            self.stencil = ConstantInputBias(self.conv[-2])

    def channel_groups(self, prefix: str) -> list[ChannelGroup]:
        """The expansion channels (none without an expansion: those channels are the input's)."""
        if not self.spec.expand:
            return []
        expand, depthwise = self.conv[0], self.conv[1]
        return [ChannelGroup(prefix, expand[0], depthwise[1], depthwise.gate, self.conv[2], None, (self, "stencil"),
                             through=(expand[1], depthwise[0]), activation=F.relu6)]


class MobileNetV2(nn.Module):
    """MobileNetV2 built only from its spec: `features` (stem, blocks, head conv), pooling, `classifier`."""

    def __init__(self, spec: MobileNetV2Spec, gates: GateConfig | None = None):
        super().__init__()
        gates = gates or GateConfig()
        self.spec = spec
        layers: list[nn.Module] = [ConvBN(spec.in_channels, spec.stem, 3, spec.stem_stride)]
        width = spec.stem
        for _, _, block in spec.blocks():
            layers.append(InvertedResidual(width, block, gates))
            width = block.out
        layers.append(ConvBN(width, spec.head, 1, gate=gates.channel_gate(spec.head)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(spec.dropout), nn.Linear(spec.head, spec.num_classes))
        _init_weights(self)

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))

    def residual_blocks(self):
        """Yield (stage, block index, module) for every block, in order (`features[1:-1]`)."""
        blocks = iter(self.features[1:-1])
        for s, b, _ in self.spec.blocks():
            yield s, b, next(blocks)

    def channel_groups(self) -> list[ChannelGroup]:
        """Every block's expansion channels (named by the block's index in `features`), then the head conv's."""
        blocks = enumerate(self.features[1:-1], start=1)
        groups = [g for k, block in blocks for g in block.channel_groups(f"features.{k}")]
        head = self.features[-1]
        return groups + [ChannelGroup(f"features.{len(self.features) - 1}", head[0], head[1], head.gate,
                                      self.classifier[1], activation=F.relu6)]


def _init_weights(model: nn.Module) -> None:
    """As torchvision's MobileNetV2: He-normal (fan-out) convs, unit BN, N(0, 0.01) classifier, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
