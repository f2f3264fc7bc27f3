"""The compressed model's outputs equal the gated model's, for every family and awkward pattern."""
import subprocess
import sys

import pytest
import torch
from torch import nn

from prunekit import spec as S
from prunekit.compress import channel_factor, channel_strength, compress, export, kept_channels, load
from prunekit.gates import GateConfig
from prunekit.measure import count_params, spec_cost
from prunekit.methods import DeadSet, dead_structures
from prunekit.models import build, zoo_spec

FAMILIES = [("resnet20", 28, 1), ("preresnet110", 32, 3), ("preresnet164", 16, 3), ("resnet50", 64, 3),
            ("vgg16", 32, 3), ("cnn4", 28, 1), ("mobilenet_v2_cifar", 28, 1)]


def randomize_bn(model, generator):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=generator)
                m.running_var.uniform_(0.5, 2, generator=generator)
                m.weight.normal_(1, 0.2, generator=generator)
                m.bias.normal_(0, 0.2, generator=generator)


def gated_model(name, cin, kind, pattern="random", seed=0):
    spec = zoo_spec(name, in_channels=cin)
    torch.manual_seed(seed)
    model = build(spec, GateConfig(kind, channels=True, blocks=kind != "bn"))
    g = torch.Generator().manual_seed(seed)
    randomize_bn(model, g)
    with torch.no_grad():
        for i, group in enumerate(model.channel_groups()):
            n = group.bn.num_features
            dead = torch.rand(n, generator=g) < 0.5
            if pattern == "all-but-one" and i == 0:
                dead = torch.ones(n, dtype=torch.bool)
                dead[n // 2] = False
            if pattern == "all" and i == 0:
                dead = torch.ones(n, dtype=torch.bool)
            if kind == "bn":
                group.bn.weight.masked_fill_(dead, 0.0)
            else:
                group.gate.weight.copy_(torch.where(dead, torch.zeros(n), torch.rand(n, generator=g) + 0.6))
        for s, b, block in getattr(model, "residual_blocks", lambda: [])():
            if kind == "bn" or not hasattr(getattr(block, "gate", None), "weight"):  # MobileNetV2: identity blocks only
                continue
            kill = (pattern == "whole-stage" and s == 1) or (pattern == "first-block" and b == 0) or \
                   (pattern == "random" and torch.rand(1, generator=g).item() < 0.4)
            if kill:
                block.gate.weight.fill_(0.0)
    return spec, model.eval()


def check_equivalent(spec, model, kind, size, cin):
    method = {"scale": "sss", "binary": "binary-gate", "bn": "ista-bn"}[kind]
    dead = dead_structures(model, method)
    result = compress(model, spec, dead)
    x = torch.randn(4, cin, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-4)
    assert count_params(result.model) == spec_cost(result.spec, (size, size)).params
    return result, dead


@pytest.mark.parametrize("name, size, cin", FAMILIES)
@pytest.mark.parametrize("kind", ["scale", "binary", "bn"])
def test_compressed_equals_gated_for_every_family(name, size, cin, kind):
    spec, model = gated_model(name, cin, kind)
    result, dead = check_equivalent(spec, model, kind, size, cin)
    assert spec_cost(result.spec, (size, size)).macs < spec_cost(spec, (size, size)).macs
    if kind != "bn" and isinstance(spec, S.ConvNetSpec):
        alive = [max(int((~dead.channels[g.name]).sum()), 1) for g in model.channel_groups()]
        assert [layer.width for layer in result.spec.layers] == alive


@pytest.mark.parametrize("pattern", ["whole-stage", "first-block", "all-but-one", "all"])
@pytest.mark.parametrize("name, size, cin", [("resnet20", 28, 1), ("preresnet110", 16, 3), ("resnet50", 32, 3)])
def test_awkward_patterns(name, size, cin, pattern):
    spec, model = gated_model(name, cin, "scale", pattern)
    result, _ = check_equivalent(spec, model, "scale", size, cin)
    if pattern == "whole-stage":
        stage = result.spec.stages[1]
        assert sum(b.has_branch for b in stage) == 0
        assert all(b.shortcut != "identity" for b in stage)
    if pattern == "first-block":
        assert all(not stage[0].has_branch for stage in result.spec.stages[1:])
    if pattern == "all-but-one":
        assert result.model.channel_groups()[0].bn.num_features == 1


def test_zero_gamma_with_nonzero_beta_folds_into_classifier_exactly():
    spec, model = gated_model("cnn4", 1, "bn")
    with torch.no_grad():
        last = model.channel_groups()[-1]
        last.bn.weight[:100] = 0
        last.bn.bias[:100] = torch.linspace(0.1, 1.0, 100)
    result, _ = check_equivalent(spec, model, "bn", 28, 1)
    assert result.spec.layers[-1].width <= spec.layers[-1].width - 100


def test_constant_channels_fold_exactly_at_zero_padded_borders():
    """Removed γ = 0 channels with β > 0 feed their consumer a constant; its k×k tap sums go into a
    ConstantInputBias, exact on the borders too: 3×3 border pixels see 4 or 6 taps, not 9."""
    spec, model = gated_model("resnet20", 1, "bn")
    result, dead = check_equivalent(spec, model, "bn", 28, 1)
    assert all(g.bn.num_features == int((~dead.channels[g.name]).sum()) for g in result.model.channel_groups())
    assert all(block.stencil for stage in result.spec.stages for block in stage if block.has_branch)
    one = build(S.ConvNetSpec([S.ConvLayerSpec(2), S.ConvLayerSpec(1)], num_classes=2, in_channels=1)).eval()
    with torch.no_grad():
        one.features[0].bn.weight.copy_(torch.tensor([1.0, 0.0]))
        one.features[0].bn.bias.copy_(torch.tensor([0.0, 0.5]))
        one.features[1].conv.weight.fill_(0.1)
    small = compress(one, one.spec, DeadSet({"features.0": torch.tensor([False, True]), "features.1": torch.tensor([False])}))
    taps = small.model.features[1].stencil(torch.zeros(1, 1, 5, 5))[0, 0]
    torch.testing.assert_close(taps[2, 2], torch.tensor(0.45))  # 9 taps × 0.1 × relu(0.5)
    torch.testing.assert_close(taps[0, 0], torch.tensor(0.2))  # a corner: 4 taps
    torch.testing.assert_close(taps[0, 2], torch.tensor(0.3))  # an edge: 6 taps
    x = torch.randn(3, 1, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(small.model(x), one(x))


def test_grouped_blocks_lose_whole_groups_exactly():
    spec = zoo_spec("resnext29_8x64d", in_channels=3)
    for stage in spec.stages:  # narrowed for a CPU test: 4 groups of 4 channels
        for block in stage:
            block.groups, block.inner = 4, [16, 16]
    torch.manual_seed(0)
    model = build(spec, GateConfig("scale", groups=True, blocks=True)).eval()
    randomize_bn(model, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, cg in enumerate(model.cardinality_groups()):
            cg.gate.weight.copy_(torch.tensor([0.0, 1.3, 0.0, 0.7]) if i % 2 else torch.tensor([0.5, 0.0, 0.0, 0.0]))
        model.layer2[1].gate.weight.zero_()
    dead = dead_structures(model, "sss")
    assert dead.count_groups() == 5 * 3 + 4 * 2 and dead.blocks == {(1, 1)}
    result = compress(model, spec, dead)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-4)
    assert [b.groups for b in result.spec.stages[0]] == [1, 2, 1]
    assert result.spec.stages[0][1].inner == [8, 8] and len(result.spec.stages[1]) == 2
    assert count_params(result.model) == spec_cost(result.spec, (16, 16)).params


def test_export_loads_in_a_fresh_process_with_same_outputs(tmp_path):
    spec, model = gated_model("resnet20", 1, "scale", "first-block")
    result, _ = check_equivalent(spec, model, "scale", 28, 1)
    export(tmp_path / "export", result.spec, result.state_dict, {"method": "sss"})
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(result.model(x), tmp_path / "expected.pt")
    code = ("import torch, prunekit; m = prunekit.load(r'%s'); x = torch.load(r'%s');"
            "torch.testing.assert_close(m(x), torch.load(r'%s'), rtol=0, atol=0); print('same')"
            % (tmp_path / "export", tmp_path / "x.pt", tmp_path / "expected.pt"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "same", out.stderr
    loaded = load(tmp_path / "export")
    assert S.to_dict(S.load(tmp_path / "export" / "spec.json")) == S.to_dict(result.spec)
    assert count_params(loaded) == count_params(result.model)


def test_compressed_model_trains_further():
    spec, model = gated_model("resnet20", 1, "scale", "whole-stage")
    result, _ = check_equivalent(spec, model, "scale", 28, 1)
    net = result.model.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x, y = torch.randn(16, 1, 28, 28), torch.arange(16) % 10
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.shape == p.shape for p in net.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_weights_that_do_not_fit_the_spec_are_refused(tmp_path):
    spec = zoo_spec("resnet20")
    model = build(spec)
    export(tmp_path / "e", spec, model.state_dict(), {})
    smaller = zoo_spec("resnet20")
    smaller.stages[0][0].inner = [8]
    S.save(smaller, tmp_path / "e" / "spec.json")
    with pytest.raises(S.SpecError, match="model.safetensors: weights do not fit spec.json"):
        load(tmp_path / "e")


def test_onnx_export_of_a_compressed_model(tmp_path):
    onnx = pytest.importorskip("onnx")
    from prunekit.cli import main

    spec, model = gated_model("resnet20", 1, "scale", "first-block")
    result, _ = check_equivalent(spec, model, "scale", 28, 1)
    export(tmp_path / "e", result.spec, result.state_dict, {})
    assert main(["export", str(tmp_path / "e"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    graph = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(graph)
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in result.model.modules())


@pytest.mark.parametrize("method", ["sss", "binary-gate", "ista-bn", "slimming", "epsilon-resnet"])
def test_mobilenet_v2_compresses_exactly_for_every_method(method):
    """Dead expansion channels leave the expansion conv, its BN, the depthwise conv and BN and the projection's
    inputs; dead head channels the classifier's; a dead block (identity shortcut) leaves entirely. BN-γ
    channels emit relu6(β), clipped at 6, folded into the projection or the classifier's bias."""
    from prunekit.config import make_config
    from prunekit.methods import gate_config, zero_gammas

    spec = zoo_spec("mobilenet_v2_cifar", in_channels=1)
    torch.manual_seed(0)
    model = build(spec, gate_config(method, make_config({"method": method})))
    g = torch.Generator().manual_seed(0)
    randomize_bn(model, g)
    with torch.no_grad():
        model.classifier[1].weight.mul_(100)  # logits of order 1
        for i, group in enumerate(model.channel_groups()):
            n = group.bn.num_features
            dead = torch.rand(n, generator=g) < 0.5
            if i == 1:
                dead = torch.arange(n) != n // 2  # every channel but one
            if method in ("ista-bn", "slimming"):
                group.bn.weight.copy_(torch.where(dead, torch.zeros(n), group.bn.weight.abs() + 0.1))
                group.bn.bias.masked_fill_(dead & (torch.arange(n) % 3 == 0), 7.0)  # relu6 clips: 6 reaches the consumer
            elif method != "epsilon-resnet":
                group.gate.weight.copy_(torch.where(dead, torch.zeros(n), torch.rand(n, generator=g) + 0.6))
        if method == "sss":
            model.features[5].gate.weight.zero_()  # stage 2, block 2
        if method == "epsilon-resnet":
            model.features[5].gate.dropped.fill_(True)
    model.eval()
    dead = dead_structures(model, method, prune_percent=40.0 if method == "slimming" else None)
    if method == "slimming":
        zero_gammas(model, dead)
    result = compress(model, spec, dead)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
        assert reference.abs().max() > 0.5
        torch.testing.assert_close(result.model(x), reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    assert count_params(result.model) == spec_cost(result.spec, (28, 28)).params
    blocks = sum(map(len, result.spec.stages))
    assert blocks == (16 if method in ("sss", "epsilon-resnet") else 17)
    assert len(result.spec.stages[2]) == 3 - (blocks == 16)
    if method != "epsilon-resnet":
        alive = [max(int((~dead.channels[g.name]).sum()), 1) for g in model.channel_groups()]
        widths = [b.inner[0] for _, _, b in result.spec.blocks() if b.expand]
        assert widths[1] == 1 and result.spec.head == alive[-1] < 1280
        assert sum(widths) == sum(alive[:-1]) - (alive[3] if method == "sss" else 0)
    if method in ("ista-bn", "slimming"):
        assert any(b.stencil for _, _, b in result.spec.blocks())


def channel_widths(spec):
    """The width of every prunable channel group of a spec, in model order."""
    if isinstance(spec, S.ConvNetSpec):
        return [layer.width for layer in spec.layers]
    if isinstance(spec, S.MobileNetV2Spec):
        return [block.inner[0] for _, _, block in spec.blocks() if block.expand] + [spec.head]
    return [width for stage in spec.stages for block in stage for width in block.inner]


@pytest.mark.parametrize("name, size, cin", [("resnet20", 28, 1), ("cnn4", 28, 1), ("mobilenet_v2_cifar", 28, 1)])
@pytest.mark.parametrize("kind", ["scale", "bn"])
@pytest.mark.parametrize("round_to", [4, 8])
def test_round_to_keeps_multiples_and_equal_logits(name, size, cin, kind, round_to):
    """Each group keeps the smallest multiple of N ≥ its alive count (capped at its width), adding its
    highest-|factor| dead channels; kept dead BN-γ channels emit relu(β) through the kept weights."""
    spec, model = gated_model(name, cin, kind, seed=5)
    dead = dead_structures(model, "sss" if kind == "scale" else "ista-bn")
    exact, rounded = kept_channels(model, dead, 1), kept_channels(model, dead, round_to)
    kept_constant = 0
    for g in model.channel_groups():
        alive = (~dead.channels[g.name]).nonzero().flatten()
        assert exact[g.name].tolist() == (alive.tolist() or [int(channel_strength(g).argmax())])
        width = g.bn.num_features
        assert len(rounded[g.name]) == min(-(-len(exact[g.name]) // round_to) * round_to, width)
        added = sorted(set(rounded[g.name].tolist()) - set(exact[g.name].tolist()))
        left = sorted(set(range(width)) - set(rounded[g.name].tolist()))
        factor = channel_factor(g)
        if added and left:
            assert factor[added].min() >= factor[left].max()
        kept_constant += int((g.bn.bias.detach()[added] > 0).sum()) if kind == "bn" else 0
    assert kind == "scale" or kept_constant > 0
    result = compress(model, spec, dead, round_to=round_to)
    assert all(w % round_to == 0 for w in channel_widths(result.spec)), channel_widths(result.spec)
    assert channel_widths(result.spec) != channel_widths(compress(model, spec, dead).spec)
    x = torch.randn(4, cin, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-4)
    assert count_params(result.model) == spec_cost(result.spec, (size, size)).params


def test_a_run_with_round_to_meets_its_target_with_multiples(tiny_fmnist, tmp_path):
    """`--target-macs 0.5 --round-to 4` end to end: trained under the budget (ISTA on BN γ), compressed
    exactly to at most half the MACs with every inner width a multiple of 4; the card records N."""
    from prunekit.compress import compress_run
    from prunekit.config import make_config
    from prunekit.runner import train

    spec = S.cifar_resnet_spec(14, num_classes=10, in_channels=1)
    S.save(spec, tmp_path / "spec.json")
    config = make_config({"model": str(tmp_path / "spec.json"), "data": "fashion-mnist", "data_dir": str(tiny_fmnist),
                          "batch_size": 32, "epochs": 1, "device": "cpu", "num_workers": 0, "method": "ista-bn",
                          "penalty": 0.01, "target_macs": 0.5, "round_to": 4})
    train(config, tmp_path / "run", log=lambda message: None)
    card = compress_run(tmp_path / "run", tmp_path / "run" / "compressed")
    widths = channel_widths(S.load(tmp_path / "run" / "compressed" / "spec.json"))
    assert card["round_to"] == 4 and all(w % 4 == 0 for w in widths), widths
    assert 0.45 <= card["macs_ratio"] <= 0.5 and card["max_logit_difference"] <= 1e-4



def test_round_to_left_out_is_decided_by_the_device_recorded_and_kept_on_resume(tiny_fmnist, tmp_path):
    """No round_to: 8 on a CUDA device, 1 elsewhere, recorded in the run's config. A run resumed on another
    device keeps what it recorded: one recorded with 4 resumes on the CPU with round_to left out."""
    from prunekit.config import make_config, with_round_to
    from prunekit.runner import recorded_config, train

    values = {"model": "resnet20", "data": "fashion-mnist", "data_dir": str(tiny_fmnist), "batch_size": 32,
              "epochs": 1, "device": "cpu", "num_workers": 0, "method": "sss", "target_macs": 0.5}
    config = make_config(values)
    assert config.round_to is None
    assert with_round_to(config, "cuda").round_to == 8 and with_round_to(config, "cpu").round_to == 1
    assert with_round_to(config, "cpu", recorded=4).round_to == 4
    assert with_round_to(make_config({"round_to": 2}), "cuda", recorded=4).round_to == 2
    train(config, tmp_path / "cpu", log=lambda message: None)
    assert recorded_config(tmp_path / "cpu")["round_to"] == 1
    train(make_config({**values, "round_to": 4}), tmp_path / "moved", log=lambda message: None)
    train(config, tmp_path / "moved", resume=True, log=lambda message: None)  # refused if it decided 1 here
    assert recorded_config(tmp_path / "moved")["round_to"] == 4


# --- residual-stream channels ----------------------------------------------------------------------


def stream_model(spec, kind, seed=0, dead_fraction=0.4):
    """A model of `spec` with stream, inner-channel and block gates, a random `dead_fraction` of each zero."""
    torch.manual_seed(seed)
    model = build(spec, GateConfig(kind, channels=True, blocks=True, stream=True))
    g = torch.Generator().manual_seed(seed)
    randomize_bn(model, g)
    with torch.no_grad():
        factors = [group.bn.weight if kind == "bn" else group.gate.weight for group in model.channel_groups()]
        for factor in factors + [sg.gate.weight for sg in model.stream_groups()]:
            n = factor.numel()
            alive = torch.rand(n, generator=g) >= dead_fraction
            factor.copy_(torch.where(alive, torch.rand(n, generator=g) + 0.6, torch.zeros(n)))
    return model.eval()


def stream_widths(spec):
    return [spec.stem] + [block.out for _, _, block in spec.blocks()]


@pytest.mark.parametrize("kind", ["scale", "binary", "bn"])
@pytest.mark.parametrize("name, shortcut, size", [("resnet20", "conv", 28), ("resnet20", "pad", 28),
                                                   ("resnet18", None, 32), ("resnet50", None, 32),
                                                   ("resnext29_8x64d", None, 16)])
def test_stream_channels_compress_exactly(name, shortcut, size, kind):
    """Dead stream channels leave every writer and reader of their segment: the compressed network is
    narrower in the stream and equal to the gated one; its MACs are what the spec says."""
    spec = zoo_spec(name, in_channels=1, shortcut=shortcut)
    model = stream_model(spec, kind)
    method = {"scale": "sss", "binary": "binary-gate", "bn": "ista-bn"}[kind]
    dead = dead_structures(model, method)
    result = compress(model, spec, dead)
    assert sum(stream_widths(result.spec)) < sum(stream_widths(spec))
    factors = [g.bn.weight if kind == "bn" else g.gate.factor() for g in model.channel_groups()]
    factors += [sg.gate.factor() for sg in model.stream_groups()]
    assert dead.count_channels() == sum(int((f == 0).sum()) for f in factors)
    x = torch.randn(4, 1, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-4)
    assert count_params(result.model) == spec_cost(result.spec, (size, size)).params
    from prunekit.measure import count_macs

    assert count_macs(result.model, (1, size, size)) == spec_cost(result.spec, (size, size)).macs


def test_a_stream_channel_carried_by_zero_pad_shortcuts_goes_from_every_stage():
    """ResNet-20 with option-A shortcuts: stage 1's channel 3 is carried into stages 2 and 3 at position 3,
    so one factor decides it in all three (15/31/63 wide); stage 2's own channel 16 (its factor's index 0)
    is carried into stage 3 only (15/30/62). Every pad shortcut still carries a prefix: no gather."""
    spec = zoo_spec("resnet20", in_channels=1, shortcut="pad")
    model = stream_model(spec, "scale", dead_fraction=0.0)
    groups = model.stream_groups()
    assert [(sg.width, sg.root) for sg in groups] == [(16, True), (16, False), (32, False)]
    with torch.no_grad():
        groups[0].gate.weight[3] = 0
    result = compress(model, spec, dead_structures(model, "sss"))
    assert stream_widths(result.spec) == [15] * 4 + [31] * 3 + [63] * 3
    with torch.no_grad():
        groups[1].gate.weight[0] = 0
    result = compress(model, spec, dead_structures(model, "sss"))
    assert stream_widths(result.spec) == [15] * 4 + [30] * 3 + [62] * 3
    assert all(block.pad_index is None for _, _, block in result.spec.blocks())
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-4)


def test_a_zero_pad_shortcut_with_an_index_places_each_channel_and_prunes_exactly():
    """`pad_index` [5, 0, 2, 7]: input channel i lands at output index[i], the rest are zero. Pruned again
    with stream gates, the index is remapped to the kept positions and the result stays exact."""
    from prunekit.models.resnet import ZeroPadShortcut

    x = torch.randn(2, 4, 6, 6)
    out = ZeroPadShortcut(4, 8, 2, [5, 0, 2, 7])(x)
    pooled = torch.nn.functional.avg_pool2d(x, 2, ceil_mode=True)
    torch.testing.assert_close(out[:, [5, 0, 2, 7]], pooled)
    assert out[:, [1, 3, 4, 6]].abs().max() == 0

    spec = zoo_spec("resnet20", in_channels=1, shortcut="pad")
    spec.stages[1][0].pad_index = list(range(31, 15, -1))  # stage 1's channels land reversed at the end
    S.validate(spec)
    model = stream_model(spec, "scale", seed=3)
    result = compress(model, spec, dead_structures(model, "sss"))
    index = result.spec.stages[1][0].pad_index
    assert index is not None and index == sorted(index, reverse=True)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-4)
    assert S.from_dict(S.to_dict(result.spec)) == result.spec


def test_stream_channels_are_refused_where_they_cannot_be_cut(tmp_path):
    from prunekit.config import ConfigError, make_config
    from prunekit.runner import train

    with pytest.raises(ValueError, match="post-activation"):
        build(zoo_spec("preresnet110"), GateConfig("scale", stream=True))
    with pytest.raises(ConfigError, match="stream_channels: a channel method prunes the stream"):
        make_config({"method": "epsilon-resnet", "stream_channels": True})
    config = make_config({"model": "cnn4", "method": "sss", "stream_channels": True, "device": "cpu"})
    with pytest.raises(ConfigError, match="stream_channels: cnn4 has no residual stream"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value", [("pad_index", [0, 0] + list(range(2, 16))), ("pad_index", [40] * 16),
                                          ("pad_index", [0, 1])])
def test_a_malformed_pad_index_names_the_field(field, value):
    data = S.to_dict(zoo_spec("resnet20", shortcut="pad"))
    data["stages"][1][0][field] = value
    with pytest.raises(S.SpecError, match=r"spec.stages\[1\]\[0\].pad_index"):
        S.from_dict(data)


@pytest.mark.parametrize("method", ["sss", "slimming"])
def test_a_run_with_stream_channels_meets_its_target_and_narrows_the_stream(tiny_fmnist, tmp_path, method):
    """`--stream-channels --target-macs 0.5` end to end: the budget ranks stream channels with the rest
    (SSS), or slimming's percentile covers the stream factors; compression cuts them exactly to at most
    half the MACs."""
    from prunekit.compress import compress_run
    from prunekit.config import make_config
    from prunekit.runner import train

    spec = S.cifar_resnet_spec(14, num_classes=10, in_channels=1, shortcut="pad")
    S.save(spec, tmp_path / "spec.json")
    config = make_config({"model": str(tmp_path / "spec.json"), "data": "fashion-mnist", "data_dir": str(tiny_fmnist),
                          "batch_size": 32, "epochs": 1, "device": "cpu", "num_workers": 0, "method": method,
                          "sss_structures": "channels", "stream_channels": True, "target_macs": 0.5})
    train(config, tmp_path / "run", log=lambda message: None)
    card = compress_run(tmp_path / "run", tmp_path / "run" / "compressed")
    compressed = S.load(tmp_path / "run" / "compressed" / "spec.json")
    assert sum(stream_widths(compressed)) < sum(stream_widths(spec))
    assert 0.45 <= card["macs_ratio"] <= 0.5 and card["max_logit_difference"] <= 1e-4


@pytest.mark.parametrize("round_to", [4, 8])
def test_round_to_rounds_every_stretch_of_the_stream_exactly(round_to):
    """With option-A shortcuts a stretch is what it carries in plus its own rounded channels: every
    stream width is a multiple of N, and the logits are unchanged."""
    spec = zoo_spec("resnet20", in_channels=1, shortcut="pad")
    model = stream_model(spec, "scale", seed=5)
    dead = dead_structures(model, "sss")
    result = compress(model, spec, dead, round_to=round_to)
    widths = stream_widths(result.spec)
    assert all(w % round_to == 0 for w in widths) and widths != stream_widths(compress(model, spec, dead).spec)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-4)
