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


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2"])
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
                                        ("resnext29_8x64d", 16), ("stencils", 15), ("mobilenet_v2", 67),
                                        ("mobilenet_v2_cifar", 28), ("mobilenet_v2_stencils", 30)])
def test_spec_cost_matches_hook_counts_and_torch_flop_counter(name, size):
    spec = zoo_spec({"stencils": "resnet20", "mobilenet_v2_stencils": "mobilenet_v2_cifar"}.get(name, name))
    bias_maps = 0  # constant-input biases: parameters, but a bias map per batch, not per-image MACs
    if name == "stencils":
        for stage in spec.stages:
            stage[0].stencil = True
        bias_maps = sum(16 * 2 ** s * 9 * (-(-size // 2 ** s)) ** 2 for s in range(3))
    if name == "mobilenet_v2_stencils":  # 1x1 projections: one bias map of each block's output size
        side = size
        for _, _, block in spec.blocks():
            side = -(-side // block.stride)
            block.stencil = True
            bias_maps += block.out * side * side
    model = build(spec)
    cost = spec_cost(spec, (size, size))
    assert cost.params == count_params(model)
    assert cost.macs == count_macs(model, (3, size, size))
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


@pytest.mark.parametrize("options", [{}, {"width_mult": 0.5, "num_classes": 7}, {"width_mult": 1.4, "dropout": 0.5}])
def test_mobilenet_v2_from_torchvision_gives_the_spec_and_equal_outputs(options):
    """Random weights and trained-looking BN statistics, in eval mode: the same logits, bit for bit."""
    from prunekit.models.imports import from_torchvision
    from prunekit.spec import mobilenet_v2_spec

    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2(**options)
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2), m.bias.normal_(0, 0.2)
    ours, spec = from_torchvision(reference.eval())
    expected = mobilenet_v2_spec(width_mult=options.get("width_mult", 1.0), num_classes=options.get("num_classes", 1000))
    expected.dropout = options.get("dropout", 0.2)
    assert spec == expected and not ours.training
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)
    loaded = build(spec).eval()
    loaded.load_state_dict(reference.state_dict())
    torch.testing.assert_close(loaded(x), reference(x), rtol=0, atol=0)


def test_mobilenet_v2_specs_have_the_published_sizes(capsys):
    """torchvision's mobilenet_v2: 3,504,872 parameters, 300.8M MACs at 224 (ours add 6.7M for the BNs)."""
    from prunekit.cli import main

    assert main(["info", "mobilenet_v2", "--num-classes", "1000", "--image-size", "224"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "layers 53  params 3,504,872  MACs 307,452,384 (input 3x224x224)"
    spec = zoo_spec("mobilenet_v2", num_classes=1000)
    cost = spec_cost(spec, (224, 224))
    assert cost.params == 3_504_872 and count_params(torchvision.models.mobilenet_v2()) == cost.params
    assert count_macs(build(spec), (3, 224, 224), include_bn=False) == 300_774_272
    assert [len(stage) for stage in spec.stages] == [1, 2, 3, 4, 3, 3, 1]
    assert sum(b.shortcut == "identity" for _, _, b in spec.blocks()) == 10
    cifar = zoo_spec("mobilenet_v2_cifar", in_channels=1)
    assert (cifar.stem_stride, cifar.stages[1][0].stride, cifar.head) == (1, 1, 1280)
    assert build(cifar).features(torch.zeros(1, 1, 32, 32)).shape == (1, 1280, 4, 4)


def test_an_unsupported_module_is_one_line_naming_what_cannot_be_represented():
    from prunekit.models.imports import from_torchvision
    from prunekit.spec import SpecError

    with pytest.raises(SpecError, match="^from_torchvision: MobileNetV3: only torchvision's ResNet family"):
        from_torchvision(torchvision.models.mobilenet_v3_small())
    odd_mobilenet = torchvision.models.mobilenet_v2()
    odd_mobilenet.features[5].conv[1][2] = torch.nn.ReLU()
    with pytest.raises(SpecError, match=r"^from_torchvision: features\.5\.conv\.1: expected Conv2d, BatchNorm2d, "
                                        r"ReLU6, got Conv2d, BatchNorm2d, ReLU;") as error:
        from_torchvision(odd_mobilenet)
    assert "\n" not in str(error.value)
    odd = torchvision.models.resnet18()
    odd.layer2[1].conv2 = torch.nn.Conv2d(128, 128, 3, padding=2, dilation=2, bias=False)
    with pytest.raises(SpecError, match=r"^from_torchvision: layer2\.1\.conv2: expected a bias-free 3x3 conv") as error:
        from_torchvision(odd)
    assert "\n" not in str(error.value)


def test_prunekit_train_starts_from_torchvision_mobilenet_v2_weights(tmp_path, tiny_fmnist):
    """`--model torchvision:mobilenet_v2 --weights FILE`: the 10 classes are the data's, torchvision's
    1000-class head is left out, every other tensor loads (here a 1-channel stem, as for Fashion-MNIST)."""
    from prunekit.cli import main
    from prunekit.runner import load_final

    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2()
    reference.features[0][0] = torch.nn.Conv2d(1, 32, 3, 2, 1, bias=False)
    torch.save(reference.state_dict(), tmp_path / "mobilenet_v2.pth")
    assert main(["train", "--model", "torchvision:mobilenet_v2", "--weights", str(tmp_path / "mobilenet_v2.pth"),
                 "--data-dir", str(tiny_fmnist), "--epochs", "1", "--batch-size", "48", "--lr", "0",
                 "--weight-decay", "0", "--out", str(tmp_path / "run")]) == 0
    spec, _, weights, _ = load_final(tmp_path / "run" / "final")
    assert spec == zoo_spec("mobilenet_v2", num_classes=10, in_channels=1)
    trained = {k: v for k, v in weights.items() if "running" not in k and "num_batches" not in k}
    assert weights["classifier.1.weight"].shape == (10, 1280)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in trained.items() if not k.startswith("classifier"))


def test_a_narrow_conv_shortcut_trains_in_channels_last():
    """A pruned stream can leave a strided conv shortcut 2 to 7 input channels, where oneDNN's
    channels_last weight gradient of a strided 1x1 conv corrupted the heap (torch 2.14.1, AVX2): the
    shortcut reads every stride-th pixel at stride 1 instead, the same function as the strided conv."""
    import torch
    from torch import nn

    from prunekit.models import build
    from prunekit.spec import cifar_resnet_spec

    spec = cifar_resnet_spec(8, in_channels=1)
    spec.stem = spec.stages[0][0].out = 4
    spec.stages[0][0].inner = [4]
    model = build(spec).to(memory_format=torch.channels_last)
    x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    block = model.layer2[0]
    strided = nn.Conv2d(4, block.spec.out, 1, 2, bias=False)
    strided.weight = block.downsample[0].weight
    h = torch.randn(2, 4, 15, 15)
    torch.testing.assert_close(block.downsample[0](block._every_stride_pixel(h)), strided(h))


def test_fastest_latency_times_both_memory_formats_and_leaves_the_model_as_it_was(monkeypatch):
    """`fastest_latency` returns the faster of NCHW and channels_last (here channels_last, made faster by a stub
    clock that charges NCHW passes 3 ms and channels_last ones 1 ms) and the model keeps its contiguous weights."""
    from prunekit import measure

    model = build(zoo_spec("resnet20", in_channels=1))
    now = [0.0]

    def clock():
        return now[0]

    real_forward = type(model).forward

    def forward(self, x):
        weight = max((p for p in self.parameters() if p.dim() == 4), key=torch.Tensor.numel)  # 64x64x3x3
        now[0] += 1e-3 if not weight.is_contiguous() else 3e-3  # a 1-channel input is both formats at once
        return real_forward(self, x)

    monkeypatch.setattr(measure.time, "perf_counter", clock)
    monkeypatch.setattr(type(model), "forward", forward)
    latency = measure.fastest_latency(model, (1, 8, 8), 2, warmup=1, repeats=3)
    assert latency.channels_last and latency.median_ms == pytest.approx(1.0)
    assert measure.measure_latency(model, (1, 8, 8), 2, warmup=1, repeats=3).median_ms == pytest.approx(3.0)
    assert all(p.is_contiguous() for p in model.parameters())
