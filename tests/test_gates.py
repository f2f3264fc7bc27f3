import torch

from prunekit.gates import BinaryGate, EpsilonGate, GateConfig, ScaleGate, strict_identity_factor


def test_epsilon_factor_is_zero_exactly_when_every_element_is_within_epsilon():
    eps = 2.5
    inside = torch.full((2, 3, 4, 4), -eps)
    inside[0, 0, 0, 0] = eps
    assert strict_identity_factor(inside, eps).item() == 0.0
    outside = inside.clone()
    outside[1, 2, 3, 3] = eps + 0.01
    assert strict_identity_factor(outside, eps).item() == 1.0
    outside[1, 2, 3, 3] = -eps - 0.01
    assert strict_identity_factor(outside, eps).item() == 1.0


def test_epsilon_gate_passes_identity_or_zero_and_blocks_gradient_through_factor():
    gate = EpsilonGate(epsilon=1.0).train()
    x = torch.full((2, 2, 2, 2), 0.5, requires_grad=True)
    y = gate(x)
    assert torch.equal(y, torch.zeros_like(x)) and gate.is_discarded.item() == 1.0
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    x2 = torch.full((2, 2, 2, 2), 3.0, requires_grad=True)
    y2 = gate(x2)
    assert torch.equal(y2, x2) and gate.is_discarded.item() == 0.0
    y2.sum().backward()
    assert torch.equal(x2.grad, torch.ones_like(x2))
    # tensorpack's EMA(0.95, num_updates): decay 1/10 at update 0, 2/11 at update 1
    assert gate.discarded_average.item() == 0.9 * 2 / 11
    assert abs(gate.peak_average.item() - (0.9 * 0.5 * 2 / 11 + 9 / 11 * 3.0)) < 1e-6  # max |F(x)|, averaged


def test_epsilon_moving_average_follows_the_authors_decay_and_reaches_the_discard_rule():
    """The authors' EMA: 0.9, then 0.98182 for two discarded steps; once the decay is 0.95 (update ≥ 170),
    238 consecutive discarded steps make the average read 1 (≥ 0.999995), 237 do not."""
    from prunekit.methods import epsilon_dropped
    from prunekit.models import build
    from prunekit.spec import cifar_resnet_spec

    model = build(cifar_resnet_spec(8), GateConfig("epsilon", blocks=True, epsilon=1.0)).train()
    block = model.layer1[0]
    gate = block.gate
    small, large = torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), 3.0)
    gate(small), gate(small)
    assert abs(gate.discarded_average.item() - 0.98182) < 1e-5
    for _ in range(200):
        gate(large)
    assert gate.discarded_average.item() < 1e-12
    for _ in range(237):
        gate(small)
    assert not epsilon_dropped(block)
    gate(small)
    assert epsilon_dropped(block) and not epsilon_dropped(block, "weights")
    with torch.no_grad():
        block.conv1.weight.zero_(), block.conv2.weight.fill_(1e-5)
    assert epsilon_dropped(block, "weights", tolerance=1e-4)
    for _ in range(14):  # the average falls to 0.95^14 = 0.488 after 14 kept steps, 0.513 after 13
        gate(large)
        assert bool(epsilon_dropped(block, "majority")) == (gate.discarded_average.item() >= 0.5)
    assert not epsilon_dropped(block, "majority") and abs(gate.discarded_average.item() - 0.95 ** 14) < 1e-5


def test_evaluation_applies_the_discard_decision_not_the_batch():
    gate = EpsilonGate(epsilon=1.0).eval()
    x = torch.full((1, 2, 2, 2), 0.5)
    assert torch.equal(gate(x), x)  # below ε, but not dropped: kept
    gate.dropped.fill_(True)
    assert torch.equal(gate(torch.full((1, 2, 2, 2), 7.0)), torch.zeros(1, 2, 2, 2))


def test_epsilon_function_is_built_from_relu_only():
    import inspect

    source = inspect.getsource(strict_identity_factor)
    body = source.split('"""')[-1]
    assert "relu" in body and "where" not in body and ">" not in body.replace("->", "")


def test_binary_gate_binarizes_forward_and_passes_gradient_straight_through():
    gate = BinaryGate(4, threshold=0.5)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([0.2, 0.5, 0.7, -1.0]))
    x = torch.ones(1, 4, 2, 2)
    y = gate(x)
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 1.0, 0.0]
    (y * torch.arange(1.0, 5.0).view(1, 4, 1, 1)).sum().backward()
    assert gate.weight.grad.tolist() == [4.0, 8.0, 12.0, 16.0]


def test_a_keep_one_binary_gate_keeps_its_strongest_gate_on_only_when_all_are_off():
    gate = BinaryGate(4, threshold=0.5, keep_one=True)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([0.2, 0.45, 0.1, -1.0]))
    assert gate.factor().tolist() == [0.0, 1.0, 0.0, 0.0]
    y = gate(torch.ones(1, 4, 1, 1))
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 0.0, 0.0]
    y.sum().backward()
    assert gate.weight.grad.tolist() == [1.0, 1.0, 1.0, 1.0]  # still straight through
    with torch.no_grad():
        gate.weight[3] = 0.6
    assert gate.factor().tolist() == [0.0, 0.0, 0.0, 1.0]


def test_scale_gate_multiplies_channels():
    gate = ScaleGate(3)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([0.0, 2.0, -1.0]))
    x = torch.ones(2, 3, 1, 1)
    assert gate(x)[:, :, 0, 0].tolist() == [[0.0, 2.0, -1.0]] * 2


def test_side_head_sits_where_the_authors_put_it():
    """CIFAR: stage 2 after block n//2 (n = 18: res2.9); ImageNet: stage 3 after block
    sum(blocks)//2 − (stages 1–2) − 1 (ResNet-101: 8, ResNet-152: 13)."""
    from prunekit.methods import side_head_position
    from prunekit.models import zoo_spec

    assert side_head_position(zoo_spec("preresnet110")) == (1, 9)
    assert side_head_position(zoo_spec("preresnet164")) == (1, 9)
    assert side_head_position(zoo_spec("preresnet20")) == (1, 1)
    assert side_head_position(zoo_spec("imagenet-preresnet101")) == (2, 8)
    assert side_head_position(zoo_spec("imagenet-preresnet152")) == (2, 13)


def test_epsilon_resnet_decays_conv_and_fc_weights_only():
    """The authors' regularize_cost('.*/W'): conv and FC weights (the side head's too), never BN γ/β or biases."""
    from prunekit.config import make_config
    from prunekit.methods import build_method, gate_config, side_head_position
    from prunekit.models import build
    from prunekit.spec import cifar_resnet_spec

    spec = cifar_resnet_spec(8, preact=True, shortcut="pad")
    config = make_config({"method": "epsilon-resnet", "weight_decay": 2e-4})
    model = build(spec, gate_config("epsilon-resnet", config), side_head_position(spec))
    decayed, undecayed = build_method(model, config, (3, 8, 8)).optimizers[0].param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 2e-4 and undecayed["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decayed["params"]) == sorted(
        n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1)
    assert "side_head.4.weight" in {names[id(p)] for p in decayed["params"]}
    assert all(p.dim() == 1 for p in undecayed["params"])


def test_epsilon_gates_sit_on_the_mobilenet_blocks_with_an_identity_shortcut(tmp_path, monkeypatch):
    """ε-ResNet on MobileNetV2: a strict identity for the blocks that have one, no side classifier; a block
    the rule discards leaves the compressed network, whose logits equal the gated network's."""
    import test_engine
    from test_budget import TINY_MOBILENET

    from prunekit.compress import compress
    from prunekit.methods import dead_structures, side_head_position

    monkeypatch.setattr(test_engine, "TINY_RESNET", TINY_MOBILENET)
    trainer = test_engine.tiny_setup(tmp_path, "epsilon-resnet", epochs=2, epsilon=0.5)
    blocks = [block for _, _, block in trainer.model.residual_blocks()]
    assert [type(block.gate).__name__ for block in blocks] == ["EpsilonGate", "Identity", "EpsilonGate", "Identity",
                                                                "EpsilonGate"]
    assert side_head_position(TINY_MOBILENET) is None
    history = trainer.fit()
    assert len(history[-1]["branch_peak"]) == 3 and "side" not in history[-1]
    blocks[2].gate.dropped.fill_(True)
    model = trainer.model.eval()
    result = compress(model, TINY_MOBILENET, dead_structures(model, "epsilon-resnet"))
    assert [len(stage) for stage in result.spec.stages] == [1, 1, 2]
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-6)


def test_gamma_rescaling_is_refused_where_relu6_follows_the_bn():
    """Ye et al.'s γ-W rescaling relies on relu(αx) = α·relu(x); relu6 clips, so MobileNetV2 refuses it."""
    import pytest

    from prunekit.config import ConfigError, make_config
    from prunekit.methods import build_method, gate_config
    from prunekit.models import create

    config = make_config({"method": "ista-bn", "gamma_rescale": 0.5})
    model = create("mobilenet_v2_cifar", gates=gate_config("ista-bn", config))
    with pytest.raises(ConfigError, match="^gamma_rescale: .* features.2 is followed by ReLU6; use gamma_rescale 1$"):
        build_method(model, config, (3, 32, 32))
