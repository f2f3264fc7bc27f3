import pytest
import torch
import torchvision

from prunekit.gates import GateConfig
from prunekit.measure import count_flops_torch, count_macs, count_params, spec_cost
from prunekit.models import ZOO, build, create, zoo_spec

SMALL = [n for n in ZOO if not any(big in n for big in ("101", "152", "16x64d", "wide"))]


@pytest.mark.parametrize("name", SMALL)
def test_every_zoo_model_runs_forward_and_backward(name):
    model = create(name, num_classes=7, in_channels=1)
    logits = model(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_torchvision_weights_load_with_identical_outputs(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)().eval()
    ours = create(name, num_classes=1000).eval()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)


def test_resnext_specs_have_the_published_sizes():
    """ResNeXt-29 8x64d has 34.4M parameters (Xie et al. 2017, Table 7); torchvision's resnext50_32x4d 25.0M."""
    assert round(spec_cost(zoo_spec("resnext29_8x64d"), (32, 32)).params / 1e6, 1) == 34.4
    assert spec_cost(zoo_spec("resnext50_32x4d", num_classes=1000), (224, 224)).params == 25_028_904
    block = zoo_spec("resnext50_32x4d").stages[0][0]
    assert (block.inner, block.groups, block.out) == ([128, 128], 32, 256)


@pytest.mark.parametrize("kind", ["scale", "binary", "epsilon", "bn"])
def test_gate_free_model_equals_plain_model(kind):
    torch.manual_seed(0)
    plain = create("resnet20").eval()
    gated = create("resnet20", gates=GateConfig(kind, channels=True, blocks=True)).eval()
    gated.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(gated(x), plain(x))
    assert count_params(create("resnet20", gates=GateConfig())) == count_params(plain)
    assert set(create("resnet20", gates=GateConfig()).state_dict()) == set(plain.state_dict())


@pytest.mark.parametrize("name, size", [("resnet20", 28), ("preresnet110", 32), ("preresnet164", 32),
                                        ("resnet50", 64), ("vgg16", 32), ("cnn4", 28), ("resnet18", 33),
                                        ("resnext29_8x64d", 16), ("stencils", 15)])
def test_spec_cost_matches_hook_counts_and_torch_flop_counter(name, size):
    spec = zoo_spec("resnet20" if name == "stencils" else name)
    if name == "stencils":  # constant-input biases: parameters, but a bias map per batch, not per-image MACs
        for stage in spec.stages:
            stage[0].stencil = True
    model = build(spec)
    cost = spec_cost(spec, (size, size))
    assert cost.params == count_params(model)
    assert cost.macs == count_macs(model, (3, size, size))
    bias_maps = sum(16 * 2 ** s * 9 * (-(-size // 2 ** s)) ** 2 for s in range(3)) if name == "stencils" else 0
    assert 2 * count_macs(model, (3, size, size), include_bn=False) + 2 * bias_maps == count_flops_torch(model, (3, size, size))


def test_resnet20_parameter_count():
    assert count_params(create("resnet20", shortcut="pad")) == 269_722


@pytest.mark.parametrize("name, weights", [("resnet18", {}), ("resnet50", {"num_classes": 7}),
                                           ("resnext50_32x4d", {}), ("wide_resnet50_2", {})])
def test_from_torchvision_gives_the_spec_and_equal_outputs(name, weights):
    from prunekit.models.imports import from_torchvision

    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(**weights).eval()
    ours, spec = from_torchvision(reference)
    assert spec == zoo_spec(name, num_classes=weights.get("num_classes", 1000))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)


def test_an_unsupported_module_is_one_line_naming_what_cannot_be_represented():
    from prunekit.models.imports import from_torchvision
    from prunekit.spec import SpecError

    with pytest.raises(SpecError, match="^from_torchvision: MobileNetV2: only torchvision's ResNet family"):
        from_torchvision(torchvision.models.mobilenet_v2())
    odd = torchvision.models.resnet18()
    odd.layer2[1].conv2 = torch.nn.Conv2d(128, 128, 3, padding=2, dilation=2, bias=False)
    with pytest.raises(SpecError, match=r"^from_torchvision: layer2\.1\.conv2: expected a bias-free 3x3 conv") as error:
        from_torchvision(odd)
    assert "\n" not in str(error.value)
