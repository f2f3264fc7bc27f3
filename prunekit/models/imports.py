"""Importing a torchvision network means producing its spec: the structure is read off the module, and
its state_dict then loads unchanged into `build(spec)` (same parameter names, same outputs)."""
from __future__ import annotations

from torch import nn

from ..spec import BlockSpec, InvertedResidualSpec, MobileNetV2Spec, ResNetSpec, Spec, SpecError
from . import build


def _expect(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise SpecError(f"from_torchvision: {where}: {what}; prunekit cannot represent it")


def _conv(module, where: str, kernel: int) -> nn.Conv2d:
    _expect(isinstance(module, nn.Conv2d) and module.kernel_size == (kernel, kernel) and module.bias is None
            and module.padding == (kernel // 2, kernel // 2) and module.dilation == (1, 1),
            where, f"expected a bias-free {kernel}x{kernel} conv with padding {kernel // 2}, got {module!r}")
    return module


def _block(block: nn.Module, where: str, kind: str) -> BlockSpec:
    """The spec of one torchvision BasicBlock or Bottleneck."""
    _expect(type(block).__name__ == kind, where, f"expected a {kind} like the others, got {type(block).__name__}")
    kernels = [3, 3] if kind == "BasicBlock" else [1, 3, 1]
    convs = [_conv(getattr(block, f"conv{i + 1}"), f"{where}.conv{i + 1}", k) for i, k in enumerate(kernels)]
    for i in range(len(convs)):
        _expect(isinstance(getattr(block, f"bn{i + 1}", None), nn.BatchNorm2d), f"{where}.bn{i + 1}", "expected a BatchNorm2d")
    strided = convs[0] if kind == "BasicBlock" else convs[1]
    shortcut = "identity"
    if block.downsample is not None:
        parts = list(block.downsample)
        _expect(len(parts) == 2 and isinstance(parts[0], nn.Conv2d) and parts[0].kernel_size == (1, 1)
                and isinstance(parts[1], nn.BatchNorm2d), f"{where}.downsample", "expected 1x1 conv + BatchNorm2d")
        shortcut = "conv"
    return BlockSpec([c.out_channels for c in convs[:-1]], convs[-1].out_channels, strided.stride[0], shortcut,
                     convs[1].groups if kind == "Bottleneck" else 1)


def _resnet_spec(module: nn.Module) -> ResNetSpec:
    """The spec of a torchvision ResNet, ResNeXt or wide ResNet (any depth, widths and class count)."""
    stem = module.conv1
    _expect(isinstance(stem, nn.Conv2d) and stem.kernel_size == (7, 7) and stem.stride == (2, 2), "conv1",
            f"expected torchvision's 7x7/2 stem, got {stem!r}")
    _expect(isinstance(module.maxpool, nn.MaxPool2d), "maxpool", f"expected a MaxPool2d, got {module.maxpool!r}")
    _expect(isinstance(module.fc, nn.Linear), "fc", f"expected a Linear classifier, got {module.fc!r}")
    layers = [module.layer1, module.layer2, module.layer3, module.layer4]
    kind = type(layers[0][0]).__name__
    _expect(kind in ("BasicBlock", "Bottleneck"), "layer1.0", f"expected a BasicBlock or Bottleneck, got {kind}")
    stages = [[_block(block, f"layer{s + 1}.{b}", kind) for b, block in enumerate(layer)]
              for s, layer in enumerate(layers)]
    return ResNetSpec("basic" if kind == "BasicBlock" else "bottleneck", stem.out_channels, stages,
                      num_classes=module.fc.out_features, in_channels=stem.in_channels, imagenet_stem=True)


def _kinds(layer: nn.Module) -> str:
    """The layer's type, or its parts' types for a Sequential: a one-line name for error messages."""
    return ", ".join(type(part).__name__ for part in layer) if isinstance(layer, nn.Sequential) else type(layer).__name__


def _conv_bn_relu6(layer: nn.Module, where: str, kernel: int, depthwise: bool = False) -> nn.Conv2d:
    """The conv of a torchvision Conv2dNormActivation (conv, BatchNorm2d, ReLU6)."""
    parts = list(layer) if isinstance(layer, nn.Sequential) else []
    _expect(len(parts) == 3 and isinstance(parts[1], nn.BatchNorm2d) and isinstance(parts[2], nn.ReLU6), where,
            f"expected Conv2d, BatchNorm2d, ReLU6, got {_kinds(layer)}")
    conv = _conv(parts[0], f"{where}.0", kernel)
    groups = conv.in_channels if depthwise else 1
    _expect(conv.groups == groups and (not depthwise or conv.out_channels == groups)
            and conv.stride in ((1, 1), (2, 2)), f"{where}.0",
            f"expected a {'depthwise' if depthwise else 'dense'} conv with stride 1 or 2, got {conv!r}")
    return conv


def _inverted_residual(block: nn.Module, where: str) -> InvertedResidualSpec:
    """The spec of one torchvision InvertedResidual."""
    _expect(type(block).__name__ == "InvertedResidual", where,
            f"expected an InvertedResidual, got {type(block).__name__}")
    layers = list(block.conv)
    _expect(len(layers) in (3, 4), f"{where}.conv", f"expected 3 or 4 layers, got {_kinds(block.conv)}")
    expand = len(layers) == 4
    if expand:
        _conv_bn_relu6(layers[0], f"{where}.conv.0", 1)
    depthwise = _conv_bn_relu6(layers[-3], f"{where}.conv.{len(layers) - 3}", 3, depthwise=True)
    project = _conv(layers[-2], f"{where}.conv.{len(layers) - 2}", 1)
    _expect(project.groups == 1, f"{where}.conv.{len(layers) - 2}", f"expected a dense 1x1 projection, got {project!r}")
    _expect(isinstance(layers[-1], nn.BatchNorm2d), f"{where}.conv.{len(layers) - 1}",
            f"expected a BatchNorm2d, got {_kinds(layers[-1])}")
    return InvertedResidualSpec([depthwise.out_channels], project.out_channels, depthwise.stride[0],
                                "identity" if block.use_res_connect else "none", expand)


def _mobilenet_v2_spec(module: nn.Module) -> MobileNetV2Spec:
    """The spec of a torchvision MobileNetV2 (any width multiplier and class count); a new stage starts at
    each stride 2 or change of width."""
    features = list(module.features)
    stem = _conv_bn_relu6(features[0], "features.0", 3)
    head = _conv_bn_relu6(features[-1], f"features.{len(features) - 1}", 1)
    classifier = list(module.classifier)
    _expect(len(classifier) == 2 and isinstance(classifier[0], nn.Dropout) and isinstance(classifier[1], nn.Linear),
            "classifier", f"expected Dropout, Linear, got {_kinds(module.classifier)}")
    stages, width = [], stem.out_channels
    for k, block in enumerate(features[1:-1], start=1):
        spec = _inverted_residual(block, f"features.{k}")
        if not stages or spec.stride == 2 or spec.out != width:
            stages.append([])
        stages[-1].append(spec)
        width = spec.out
    return MobileNetV2Spec(stem.out_channels, stages, head.out_channels, classifier[1].out_features,
                           stem.in_channels, stem.stride[0], classifier[0].p)


def torchvision_spec(module: nn.Module) -> Spec:
    """The spec of a torchvision ResNet-family network or MobileNetV2."""
    import torchvision

    if isinstance(module, torchvision.models.ResNet):
        return _resnet_spec(module)
    _expect(isinstance(module, torchvision.models.MobileNetV2), type(module).__name__,
            "only torchvision's ResNet family (resnet18–152, resnext50_32x4d/101_32x8d, wide_resnet50_2/101_2) "
            "and mobilenet_v2 are supported")
    return _mobilenet_v2_spec(module)


def from_torchvision(module: nn.Module) -> tuple[nn.Module, Spec]:
    """A prunekit model and its spec, equal to a torchvision `module` (its weights loaded unchanged)."""
    spec = torchvision_spec(module)
    model = build(spec)
    model.load_state_dict(module.state_dict(), strict=True)
    return model.train(module.training), spec
