import pytest

from prunekit.config import make_config
from prunekit.schedule import AdaptiveRestartPolicy, OneCyclePolicy, StepPolicy, make_policy

CIFAR = {0: 0.1, 82: 0.01, 123: 0.001, 300: 0.0002}
RESTART = {0: 0.1, 41: 0.01, 61: 0.001, 150: 0.0002}


def test_adaptive_policy_keeps_schedule_until_a_block_is_lost_then_restarts_shifted():
    policy = AdaptiveRestartPolicy(CIFAR, RESTART, epochs=400)
    for epoch in range(90):
        policy.on_epoch_end(epoch, {"discarded_blocks": 0})
    assert policy.lr_at(85) == 0.01
    policy.on_epoch_end(90, {"discarded_blocks": 1})
    assert policy.restarts == [91]
    assert policy.lr_at(91) == 0.1 and policy.lr_at(131.9) == 0.1
    assert policy.lr_at(132) == 0.01 and policy.lr_at(152) == 0.001 and policy.lr_at(241) == 0.0002
    policy.on_epoch_end(91, {"discarded_blocks": 1})
    assert policy.restarts == [91]
    policy.on_epoch_end(150, {"discarded_blocks": 3})
    assert policy.restarts == [91, 151] and policy.lr_at(151) == 0.1


def test_adaptive_policy_state_round_trip():
    a = AdaptiveRestartPolicy(CIFAR, RESTART, epochs=400)
    a.on_epoch_end(0, {"discarded_blocks": 0})
    a.on_epoch_end(1, {"discarded_blocks": 2})
    b = AdaptiveRestartPolicy(CIFAR, RESTART, epochs=400)
    b.load_state_dict(a.state_dict())
    assert [b.lr_at(e) for e in range(0, 100, 7)] == [a.lr_at(e) for e in range(0, 100, 7)]


def test_step_and_onecycle_curves():
    step = StepPolicy(0.1, 100, [30, 60, 90])
    assert [step.lr_at(e) for e in (0, 29.9, 30, 60, 95)] == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.0001])
    cycle = OneCyclePolicy(0.1, 10)
    assert cycle.lr_at(0) == pytest.approx(0.004)
    assert cycle.lr_at(3) == pytest.approx(0.1)
    assert cycle.lr_at(10) == pytest.approx(1e-5)


def test_make_policy_uses_config():
    config = make_config({"schedule": "piecewise", "lr_schedule": {"0": 0.1, "20": 0.01},
                          "lr_restart_schedule": {"0": 0.1, "10": 0.01}})
    policy = make_policy(config)
    assert isinstance(policy, AdaptiveRestartPolicy) and policy.lr_at(25) == 0.01
