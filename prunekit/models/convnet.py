"""Plain conv networks (VGG with BatchNorm, cnn4) built from a `ConvNetSpec`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..gates import GateConfig, gated_batch_norm
from ..spec import ConvNetSpec
from .resnet import ChannelGroup, ConstantInputBias, _init_weights

POOL_LAYERS = {"max2": lambda: nn.MaxPool2d(2, 2), "max3s2": lambda: nn.MaxPool2d(3, 2, 1)}


class ConvLayer(nn.Module):
    """conv → BN → gate → ReLU → optional max-pool."""

    def __init__(self, in_channels, layer, gates: GateConfig):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, layer.width, layer.kernel, 1, layer.pad, bias=False)
        if layer.stencil:
            self.stencil = ConstantInputBias(self.conv)
        self.bn = nn.BatchNorm2d(layer.width)
        self.gate = gates.channel_gate(layer.width)
        self.pool = POOL_LAYERS[layer.pool]() if layer.pool else nn.Identity()

    def forward(self, x):
        out = self.conv(x) + self.stencil(x) if hasattr(self, "stencil") else self.conv(x)
        return self.pool(F.relu(gated_batch_norm(self.bn, self.gate, out)))

    def add_stencils(self) -> None:
        """A zero constant-input bias on the conv, if it has none yet."""
        if not hasattr(self, "stencil"):
            self.stencil = ConstantInputBias(self.conv)


class ConvNet(nn.Module):
    """Conv layers, then global average pooling and one linear classifier."""

    def __init__(self, spec: ConvNetSpec, gates: GateConfig | None = None):
        super().__init__()
        gates = gates or GateConfig()
        self.spec = spec
        widths = [spec.in_channels] + [layer.width for layer in spec.layers]
        self.features = nn.Sequential(*[ConvLayer(widths[i], layer, gates) for i, layer in enumerate(spec.layers)])
        self.fc = nn.Linear(widths[-1], spec.num_classes)
        _init_weights(self)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))

    def channel_groups(self) -> list[ChannelGroup]:
        """Every layer's output channels are prunable; the last layer's feed the classifier."""
        layers = list(self.features)
        last = len(layers) - 1
        return [ChannelGroup(f"features.{i}", layer.conv, layer.bn, layer.gate,
                             layers[i + 1].conv if i < last else self.fc,
                             (layer, "stencil") if i > 0 else None, (layers[i + 1], "stencil") if i < last else None)
                for i, layer in enumerate(layers)]
