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


def test_restart_watches_the_moving_average_count_and_a_rise_of_one():
    """The authors' LearningRateSetter reads the logged moving average of discarded_cnt: [3.0, 4.0] restarts,
    [3.0, 3.99] does not, nor does a fall [4.0, 3.0]; the authors' SVHN schedule after a restart at epoch 60
    (1-based 61–70 at 0.1, 71 at 0.01, 75 at 0.001, 86 at 1e-4)."""
    for counts, restarts in (([3.0, 4.0], [2]), ([3.0, 3.99], []), ([4.0, 3.0], [])):
        policy = AdaptiveRestartPolicy(CIFAR, RESTART, epochs=400)
        for epoch, count in enumerate(counts):
            policy.on_epoch_end(epoch, {"discarded_blocks": count})
        assert policy.restarts == restarts
    svhn = AdaptiveRestartPolicy({1: 0.1, 20: 0.01, 28: 0.001, 50: 1e-4}, {1: 0.1, 10: 0.01, 14: 0.001, 25: 1e-4}, 200)
    assert [svhn.lr_at(e) for e in (19, 20, 28, 50)] == [0.1, 0.01, 0.001, 1e-4]  # 1-based epochs 20, 21, 29, 51
    svhn.on_epoch_end(58, {"discarded_blocks": 0.0})
    svhn.on_epoch_end(59, {"discarded_blocks": 1.0})  # the end of 1-based epoch 60
    assert [svhn.lr_at(e) for e in (60, 69, 70, 74, 85)] == [0.1, 0.1, 0.01, 0.001, 1e-4]


def test_rewound_policy_replays_the_end_of_the_original_schedule():
    """Rewinding 3 epochs of a 10-epoch step schedule (decays at 5 and 8): epochs 7, 8 and 9 of the original."""
    from prunekit.schedule import RewoundPolicy

    rewound = RewoundPolicy(StepPolicy(0.1, 10, [5, 8]), 3)
    assert [rewound.lr_at(e) for e in (0, 0.99, 1, 2.5)] == pytest.approx([0.01, 0.01, 0.001, 0.001])
    cycle = RewoundPolicy(OneCyclePolicy(0.1, 10), 10)
    assert [cycle.lr_at(e) for e in (0, 3, 10)] == pytest.approx([0.004, 0.1, 1e-5])
