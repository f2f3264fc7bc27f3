"""The model zoo: every model is `build(spec)`; `create(name)` looks the spec up by name."""
from __future__ import annotations

import re

from torch import nn

from ..gates import GateConfig
from ..spec import (IMAGENET_DEPTHS, ConvNetSpec, MobileNetV2Spec, ResNetSpec, Spec, SpecError, cifar_resnet_spec,
                    cifar_resnext_spec, cnn4_spec, imagenet_resnet_spec, mobilenet_v2_spec, vgg_spec)
from .convnet import ConvNet
from .mobilenet import MobileNetV2
from .resnet import ChannelGroup, ResNet

__all__ = ["build", "create", "zoo_spec", "ZOO", "CLASSIFIERS", "ChannelGroup", "ResNet", "ConvNet", "MobileNetV2"]

ZOO = ("resnet20", "resnet32", "resnet56", "resnet110", "preresnet110", "preresnet164",
       "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "imagenet-preresnet50",
       "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
       "resnext29_8x64d", "resnext29_16x64d", "vgg16", "vgg19", "cnn4", "mobilenet_v2", "mobilenet_v2_cifar")
CLASSIFIERS = ("fc", "classifier.1")  # the classifier's name in the ResNet and plain families, and in MobileNetV2


def zoo_spec(name: str, *, num_classes: int = 10, in_channels: int = 3, shortcut: str | None = None) -> Spec:
    """The spec of a zoo network.

    `resnetD` is a CIFAR ResNet (6n+2) or, for D in 18/34/50/101/152, torchvision's ImageNet ResNet;
    `resnextD_CxWd` is torchvision's ResNeXt (D in 50/101/152) or a CIFAR ResNeXt (D = 9n+2);
    `wide_resnetD_K` torchvision's wide ResNet; `preresnetD` is a pre-activation CIFAR ResNet with option-A shortcuts (basic 6n+2; bottleneck
    for 164, as He et al.); `imagenet-preresnetD` is the pre-activation ImageNet ResNet of ε-ResNet;
    `vggD` a CIFAR VGG with BatchNorm; `cnn4` the 4-layer CNN of Ye et al.; `mobilenet_v2` torchvision's
    MobileNetV2 and `mobilenet_v2_cifar` its variant for 28–32 px images (see `spec.mobilenet_v2_spec`).
    """
    kw = {"num_classes": num_classes, "in_channels": in_channels}
    if name in ("mobilenet_v2", "mobilenet_v2_cifar"):
        return mobilenet_v2_spec(cifar=name.endswith("cifar"), **kw)
    grouped = re.fullmatch(r"resnext(\d+)_(\d+)x(\d+)d|wide_resnet(\d+)_(\d+)", name)
    if grouped:
        depth, cardinality, width, wide_depth, factor = grouped.groups()
        if wide_depth:
            return imagenet_resnet_spec(int(wide_depth), width_per_group=64 * int(factor), **kw)
        if int(depth) in IMAGENET_DEPTHS:
            return imagenet_resnet_spec(int(depth), groups=int(cardinality), width_per_group=int(width), **kw)
        return cifar_resnext_spec(int(depth), int(cardinality), int(width), **kw)
    match = re.fullmatch(r"(imagenet-pre|pre)?resnet(\d+)|vgg(\d+)|cnn4", name)
    if not match:
        raise SpecError(f"unknown model {name!r}; known: {', '.join(ZOO)} (and other depths of each family)")
    prefix, depth, vgg_depth = match.group(1), match.group(2), match.group(3)
    if name == "cnn4":
        return cnn4_spec(**kw)
    if vgg_depth:
        return vgg_spec(int(vgg_depth), **kw)
    depth = int(depth)
    if prefix == "imagenet-pre":
        return imagenet_resnet_spec(depth, preact=True, **kw)
    if prefix == "pre":
        return cifar_resnet_spec(depth, preact=True, bottleneck=depth == 164, shortcut=shortcut or "pad", **kw)
    if depth in (18, 34, 50, 101, 152):
        return imagenet_resnet_spec(depth, **kw)
    return cifar_resnet_spec(depth, shortcut=shortcut or "conv", **kw)


def build(spec: Spec, gates: GateConfig | None = None, side_head: tuple[int, int] | None = None) -> nn.Module:
    """The only way a model comes to be: a network exactly as its spec describes it."""
    if isinstance(spec, ResNetSpec):
        return ResNet(spec, gates, side_head)
    if side_head is not None:
        raise SpecError("side_head: only ResNets have a side classifier")
    if isinstance(spec, ConvNetSpec):
        return ConvNet(spec, gates)
    if isinstance(spec, MobileNetV2Spec):
        return MobileNetV2(spec, gates)
    raise SpecError(f"not a spec: {type(spec).__name__}")


def create(name: str, *, num_classes: int = 10, in_channels: int = 3, gates: GateConfig | None = None,
           shortcut: str | None = None, side_head: tuple[int, int] | None = None) -> nn.Module:
    """Build a zoo network by name."""
    return build(zoo_spec(name, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut), gates, side_head)
