import pytest
import torch
import torchvision

from prunekit.gates import GateConfig
from prunekit.measure import count_flops_torch, count_macs, count_params, spec_cost
from prunekit.models import ZOO, build, create, zoo_spec

SMALL = [n for n in ZOO if n not in ("resnet101", "resnet152")]


@pytest.mark.parametrize("name", SMALL)
def test_every_zoo_model_runs_forward_and_backward(name):
    model = create(name, num_classes=7, in_channels=1)
    logits = model(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_torchvision_resnet50_weights_load_with_identical_outputs():
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    ours = create("resnet50", num_classes=1000).eval()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)


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
                                        ("resnet50", 64), ("vgg16", 32), ("cnn4", 28), ("resnet18", 33)])
def test_spec_cost_matches_hook_counts_and_torch_flop_counter(name, size):
    spec = zoo_spec(name)
    model = build(spec)
    cost = spec_cost(spec, (size, size))
    assert cost.params == count_params(model)
    assert cost.macs == count_macs(model, (3, size, size))
    assert 2 * count_macs(model, (3, size, size), include_bn=False) == count_flops_torch(model, (3, size, size))


def test_resnet20_parameter_count():
    assert count_params(create("resnet20", shortcut="pad")) == 269_722
