"""Hand-computed checks of the proximal optimizers in prunekit.optim."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.utils._python_dispatch
from torch.testing import assert_close

from prunekit.optim import APG, ISTA, add_l1_subgradient, ista_cost_weight, soft_threshold


def _param(values):
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))


def _set_grad(param, values):
    param.grad = torch.tensor(values, dtype=torch.float64)


def test_soft_threshold_zeroes_small_values_and_shrinks_the_rest():
    x = torch.tensor([1.0, -1.0, 0.25, -0.25, 0.0], dtype=torch.float64)
    assert_close(soft_threshold(x, 0.5), torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0], dtype=torch.float64))


def _apg_first_step(nonnegative):
    scale = _param([1.0, 0.004, -0.3, 0.5])
    optimizer = APG([scale], lr=0.1, momentum=0.9, penalty=0.05, nonnegative=nonnegative)
    _set_grad(scale, [0.2, 0.0, 0.1, -1.0])
    optimizer.step()
    return scale, optimizer


def test_apg_first_step_matches_hand_computation():
    scale, optimizer = _apg_first_step(nonnegative=True)
    # threshold lr·γ = 0.1·0.05 = 0.005; mom starts at 0
    # z before threshold = [1.0-0.02, 0.004-0, -0.3-0.01, 0.5+0.1] = [0.98, 0.004, -0.31, 0.6]
    # z = S(., 0.005)    = [0.975, 0.0, -0.305, 0.595]   (0.004 < 0.005 -> exact 0; sign kept for -0.31)
    # mom = z - λ + 0    = [-0.025, -0.004, -0.005, 0.095]
    # λ = z + 0.9·mom    = [0.9525, -0.0036, -0.3095, 0.6805] -> clamp at 0 -> [0.9525, 0, 0, 0.6805]
    assert_close(scale.data, torch.tensor([0.9525, 0.0, 0.0, 0.6805], dtype=torch.float64))
    assert scale[1].item() == 0.0 and scale[2].item() == 0.0
    assert_close(
        optimizer.state[scale]["mom"], torch.tensor([-0.025, -0.004, -0.005, 0.095], dtype=torch.float64)
    )


def test_apg_second_step_carries_momentum():
    scale, optimizer = _apg_first_step(nonnegative=True)
    _set_grad(scale, [0.5, 0.0, 0.0, 0.0])
    optimizer.step()
    # mom = 0.9·[-0.025, -0.004, -0.005, 0.095] = [-0.0225, -0.0036, -0.0045, 0.0855]
    # z = S([0.9525-0.05, 0, 0, 0.6805], 0.005) = [0.8975, 0.0, 0.0, 0.6755]
    # mom = z - λ + mom = [0.8975-0.9525-0.0225, -0.0036, -0.0045, 0.6755-0.6805+0.0855]
    #                   = [-0.0775, -0.0036, -0.0045, 0.0805]
    # λ = z + 0.9·mom   = [0.8975-0.06975, -0.00324, -0.00405, 0.6755+0.07245] -> clamp
    #                   = [0.82775, 0, 0, 0.74795]
    # The last entry has zero gradient yet grows 0.6805 -> 0.74795: that is the momentum term.
    assert_close(scale.data, torch.tensor([0.82775, 0.0, 0.0, 0.74795], dtype=torch.float64))
    assert_close(
        optimizer.state[scale]["mom"], torch.tensor([-0.0775, -0.0036, -0.0045, 0.0805], dtype=torch.float64)
    )


def test_apg_without_nonnegative_keeps_negative_values():
    scale, _ = _apg_first_step(nonnegative=False)
    assert_close(scale.data, torch.tensor([0.9525, -0.0036, -0.3095, 0.6805], dtype=torch.float64))


def test_apg_skips_params_without_grad_and_returns_closure_loss():
    with_grad = _param([1.0])
    without_grad = _param([2.0])
    optimizer = APG([with_grad, without_grad], lr=0.1, penalty=0.0, momentum=0.0)

    def closure():
        with_grad.grad = torch.tensor([1.0], dtype=torch.float64)
        return torch.tensor(3.0)

    loss = optimizer.step(closure)
    assert loss.item() == 3.0
    assert_close(with_grad.data, torch.tensor([0.9], dtype=torch.float64))
    assert without_grad.item() == 2.0
    assert without_grad not in optimizer.state


def _two_cost_ista():
    cheap = _param([0.5, -0.02, 0.005])
    costly = _param([0.5, -0.2, 0.03])
    optimizer = ISTA([{"params": [cheap]}, {"params": [costly], "cost": 4.0}], lr=0.1, penalty=0.1)
    return cheap, costly, optimizer


def test_ista_step_uses_per_group_cost_and_keeps_no_state():
    cheap, costly, optimizer = _two_cost_ista()
    _set_grad(cheap, [0.1, 0.0, 0.0])
    _set_grad(costly, [0.0, 0.1, 0.0])
    optimizer.step()
    # cheap:  threshold 0.1·0.1·1 = 0.01; γ - lr·g = [0.49, -0.02, 0.005] -> [0.48, -0.01, 0.0]
    # costly: threshold 0.1·0.1·4 = 0.04; γ - lr·g = [0.5, -0.21, 0.03]  -> [0.46, -0.17, 0.0]
    assert_close(cheap.data, torch.tensor([0.48, -0.01, 0.0], dtype=torch.float64))
    assert_close(costly.data, torch.tensor([0.46, -0.17, 0.0], dtype=torch.float64))
    assert cheap[2].item() == 0.0 and costly[2].item() == 0.0
    assert len(optimizer.state) == 0


def test_ista_reads_penalty_every_step():
    cheap, costly, optimizer = _two_cost_ista()
    _set_grad(cheap, [0.1, 0.0, 0.0])
    _set_grad(costly, [0.0, 0.1, 0.0])
    optimizer.step()
    for group in optimizer.param_groups:
        group["penalty"] = 0.2
    _set_grad(cheap, [0.0, 0.0, 0.0])
    _set_grad(costly, [0.0, 0.0, 0.0])
    optimizer.step()
    # cheap:  threshold 0.1·0.2·1 = 0.02; [0.48, -0.01, 0.0] -> [0.46, 0.0, 0.0]
    # costly: threshold 0.1·0.2·4 = 0.08; [0.46, -0.17, 0.0] -> [0.38, -0.09, 0.0]
    assert_close(cheap.data, torch.tensor([0.46, 0.0, 0.0], dtype=torch.float64))
    assert_close(costly.data, torch.tensor([0.38, -0.09, 0.0], dtype=torch.float64))
    assert cheap[1].item() == 0.0


def test_ista_cost_weight_formula():
    # (8·8 + 3·3·16)/64 = (64 + 144)/64 = 3.25; next layer 32·3·3/64 = 288/64 = 4.5
    assert ista_cost_weight(h_out=8, w_out=8, k_h=3, k_w=3, c_in=16, hw_in=64) == 3.25
    assert ista_cost_weight(8, 8, 3, 3, 16, 64, c_out_next=32, k_next=3) == 7.75


def test_add_l1_subgradient_adds_scaled_sign():
    weighted = _param([2.0, -0.5, 0.0])
    untouched = _param([1.0])
    _set_grad(weighted, [0.1, 0.1, 0.1])
    add_l1_subgradient([weighted, untouched], 0.01)
    # grad + 0.01·sign(p) = [0.1+0.01, 0.1-0.01, 0.1+0] = [0.11, 0.09, 0.1]
    assert_close(weighted.grad, torch.tensor([0.11, 0.09, 0.1], dtype=torch.float64))
    assert untouched.grad is None


def _make_apg(params):
    return APG(params, lr=0.1, momentum=0.9, penalty=0.05)


def _make_ista(params):
    return ISTA(params, lr=0.1, penalty=0.05)


def _gradient_at(step):
    return [torch.tensor([0.3, -0.2, 0.05, 0.0]) * (step + 1), torch.tensor([0.1, -0.4]) / (step + 1)]


def _run(params, optimizer, steps):
    for step in steps:
        for param, grad in zip(params, _gradient_at(step)):
            param.grad = grad.clone()
        optimizer.param_groups[0]["lr"] = 0.1 / (step + 1)
        optimizer.param_groups[0]["penalty"] = 0.05 + 0.01 * step
        optimizer.step()


@pytest.mark.parametrize("make_optimizer", [_make_apg, _make_ista])
def test_state_dict_round_trip_continues_bit_identically(make_optimizer):
    initial = [torch.tensor([0.8, 0.6, -0.4, 0.2]), torch.tensor([0.3, 0.9])]

    straight = [torch.nn.Parameter(t.clone()) for t in initial]
    straight_optimizer = make_optimizer(straight)
    _run(straight, straight_optimizer, range(5))

    interrupted = [torch.nn.Parameter(t.clone()) for t in initial]
    interrupted_optimizer = make_optimizer(interrupted)
    _run(interrupted, interrupted_optimizer, range(2))
    saved_params = [p.detach().clone() for p in interrupted]
    saved_state = copy.deepcopy(interrupted_optimizer.state_dict())

    resumed = [torch.nn.Parameter(t) for t in saved_params]
    resumed_optimizer = make_optimizer(resumed)
    resumed_optimizer.load_state_dict(saved_state)
    assert resumed_optimizer.param_groups[0]["penalty"] == pytest.approx(0.06)
    _run(resumed, resumed_optimizer, range(2, 5))

    for resumed_param, straight_param in zip(resumed, straight):
        assert torch.equal(resumed_param, straight_param)


def test_ista_cost_weights_of_resnet20_are_yes():
    """Ye et al.'s c_l for the first conv of each CIFAR ResNet-20 block (their code's 'memory' cost, 32×32
    input): (H·W + k²·C_in + C_next·k²) / 1024, e.g. 1312/1024 in stage 1; the fake sparsity of a dense
    network with block 1's channels all at γ = 0 is 20.5 / 345."""
    from prunekit.methods import ista_costs, sparsity_metrics
    from prunekit.models import create

    model = create("resnet20", gates=None)
    costs = ista_costs(model, (3, 32, 32))
    assert [round(c * 1024) for c in costs.values()] == [1312] * 3 + [688, 832, 832] + [928, 1216, 1216]
    with torch.no_grad():
        model.layer1[0].bn1.weight.zero_()
    metrics = sparsity_metrics(model, "ista-bn", costs)
    assert metrics["fake_sparsity"] == pytest.approx(20.5 / 345)
    assert metrics["group_lasso"] == pytest.approx(345 - 20.5)


def test_a_stream_groups_ista_cost_is_the_mean_c_l_of_its_segments_blocks():
    """Ours (Ye et al. leave the stream alone): with projection shortcuts the stretches are the stages,
    so (1312, (688 + 832 + 832) / 3, (928 + 1216 + 1216) / 3) / 1024."""
    from prunekit.gates import GateConfig
    from prunekit.methods import ista_costs, stream_costs
    from prunekit.models import create

    model = create("resnet20", gates=GateConfig("bn", channels=True, stream=True))
    costs = stream_costs(model, ista_costs(model, (3, 32, 32)))
    assert [c * 1024 for c in costs.values()] == pytest.approx([1312, 2352 / 3, 3360 / 3])


def test_weight_average_follows_tensorflows_decay_and_ends_on_the_average():
    """Decay 1/10 at step 0, 2/11 at step 1, then min(0.999, ...); at the last step the model takes the
    average, with γ = 0 kept where the raw γ was 0."""
    from types import SimpleNamespace

    from prunekit.methods import WeightAverage
    from prunekit.models import build
    from prunekit.spec import ConvLayerSpec, ConvNetSpec

    model = build(ConvNetSpec([ConvLayerSpec(2)], num_classes=2, in_channels=1))
    bn = model.features[0].bn
    trainer = SimpleNamespace(model=model, epoch=0, epochs=2, step_in_epoch=0, train_loader=[0, 0])
    average = WeightAverage(0.999)
    average.setup(trainer)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([3.0, 0.0]))
    average.after_step(trainer)  # shadow = 0.1·1 + 0.9·[3, 0]
    torch.testing.assert_close(average.shadow[1], torch.tensor([2.8, 0.1]))
    trainer.epoch, trainer.step_in_epoch = 1, 1
    average.after_step(trainer)  # last step: shadow = 2/11·[2.8, 0.1] + 9/11·[3, 0], then applied
    torch.testing.assert_close(bn.weight.detach(), torch.tensor([2.8 * 2 / 11 + 27 / 11, 0.0]))
    assert average.state_dict()["updates"] == 2


def test_distillation_term_is_hintons_kl_at_temperature():
    """weight · T² · KL(softmax(t/T) ‖ softmax(s/T)) by hand for one sample, 0 when student equals teacher."""
    from types import SimpleNamespace

    from prunekit.methods import Distillation

    teacher = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(torch.eye(2))
    student = torch.nn.Linear(2, 2, bias=False)
    kd = Distillation(teacher, weight=0.5, temperature=2.0)
    kd.setup(SimpleNamespace(model=student))
    x = torch.tensor([[2.0, 0.0]])
    logits = student(x)
    term = kd.loss_terms(None, logits, None)["distillation"]
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)  # teacher logits / T
    q = torch.softmax(logits.detach()[0] / 2, 0)
    assert term.item() == pytest.approx(0.5 * 4 * float((p * (p / q).log()).sum()), rel=1e-5)
    assert kd.loss_terms(None, teacher(x), None)["distillation"].item() == pytest.approx(0.0, abs=1e-7)


class _AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ATen operators dispatched inside it (each is a kernel launch, or more, on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make", [
    lambda ps: APG([{"params": [p], "penalty": 0.01 * (i + 1)} for i, p in enumerate(ps)], lr=0.1),
    lambda ps: ISTA([{"params": [p], "cost": 1.0 + i} for i, p in enumerate(ps)], lr=0.1, penalty=0.1),
    lambda ps: SimpleNamespace(step=lambda: add_l1_subgradient(ps, 0.01))])
def test_a_step_dispatches_as_many_operators_for_16_factor_tensors_as_for_4(make):
    """Multi-tensor kernels: one step over every gate of a network costs a fixed number of launches on a GPU
    (ResNet-20's 18 SSS factor tensors: 16 ATen operators instead of 254), not a few per tensor."""
    counts = []
    for n in (4, 16):
        params = [torch.randn(8, requires_grad=True) for _ in range(n)]
        for p in params:
            p.grad = torch.randn(8)
        optimizer = make(params)
        optimizer.step()  # creates APG's momentum buffers
        with _AtenOps() as ops:
            optimizer.step()
        counts.append(ops.count)
    assert counts[0] == counts[1] <= 16, counts
