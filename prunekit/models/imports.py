"""Importing a torchvision network means producing its spec: the structure is read off the module, and
its state_dict then loads unchanged into `build(spec)` (same parameter names, same outputs)."""
from __future__ import annotations

from torch import nn

from ..spec import BlockSpec, ResNetSpec, SpecError
from .resnet import ResNet


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


def torchvision_spec(module: nn.Module) -> ResNetSpec:
    """The spec of a torchvision ResNet, ResNeXt or wide ResNet (any depth, widths and class count)."""
    import torchvision

    _expect(isinstance(module, torchvision.models.ResNet), type(module).__name__,
            "only torchvision's ResNet family (resnet18–152, resnext50_32x4d/101_32x8d, wide_resnet50_2/101_2) "
            "is supported")
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


def from_torchvision(module: nn.Module) -> tuple[ResNet, ResNetSpec]:
    """A prunekit model and its spec, equal to a torchvision `module` (its weights loaded unchanged)."""
    spec = torchvision_spec(module)
    model = ResNet(spec)
    model.load_state_dict(module.state_dict(), strict=True)
    return model.train(module.training), spec
