import torch

from prunekit.gates import BinaryGate, EpsilonGate, ScaleGate, strict_identity_factor


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
    assert abs(gate.discarded_average.item() - 0.01 * 0.99) < 1e-7
    assert abs(gate.peak_average.item() - (0.01 * 0.5 * 0.99 + 0.01 * 3.0)) < 1e-7  # max |F(x)|, averaged


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


def test_scale_gate_multiplies_channels():
    gate = ScaleGate(3)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([0.0, 2.0, -1.0]))
    x = torch.ones(2, 3, 1, 1)
    assert gate(x)[:, :, 0, 0].tolist() == [[0.0, 2.0, -1.0]] * 2
