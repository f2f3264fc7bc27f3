import json
"""Retraining protocols: scratch-B arithmetic against the published schedules, and each protocol end to end."""
import pytest

from prunekit import spec as S
from prunekit.compress import compress_run, load
from prunekit.config import make_config
from prunekit.measure import count_params, spec_cost
from prunekit.models import zoo_spec
from prunekit.protocols import (finetune, macs_ratio, multi_stage, scratch, scratch_b_config,
                                scratch_b_schedule, scratch_e_config)
from prunekit.runner import train

SSS_UNITS = {"resnet41": [(0, False), (4, True), (6, True), (3, True)],
             "resnet32": [(1, False), (4, True), (4, True), (1, True)],
             "resnet26": [(0, False), (2, False), (5, False), (1, True)]}
SSS_SCRATCH_B = {"resnet41": (117, [35, 70, 105]), "resnet32": (145, [43, 86, 129]),
                 "resnet26": (179, [53, 106, 159])}


def sss_ratio(name):
    base = zoo_spec("resnet50", num_classes=1000)
    pruned = S.apply_units(base, SSS_UNITS[name])
    return spec_cost(base, (224, 224)).macs / spec_cost(pruned, (224, 224)).macs


@pytest.mark.parametrize("name", sorted(SSS_SCRATCH_B))
def test_scratch_b_reproduces_the_sss_table_from_measured_flops(name):
    assert scratch_b_schedule(100, [30, 60, 90], sss_ratio(name)) == SSS_SCRATCH_B[name]


def test_sss_ratios_lie_in_the_ranges_the_table_implies():
    """int(100·r) and int(30·r) of the table pin r to [1.17, 1.18), [1.45, 1.46), [1.79, 1.80)."""
    ratios = [sss_ratio(n) for n in ("resnet41", "resnet32", "resnet26")]
    assert [round(r, 4) for r in ratios] == [1.1782, 1.4513, 1.7958]
    assert [int(100 * r) for r in ratios] == [117, 145, 179]


def test_rounding_half_up_does_not_reproduce_the_table():
    assert scratch_b_schedule(100, [30, 60, 90], sss_ratio("resnet41"), rounding="round") == (118, [35, 70, 105])
    assert scratch_b_schedule(100, [30, 60, 90], sss_ratio("resnet26"), rounding="round") == (180, [54, 108, 162])


@pytest.mark.parametrize("ratio", [1.0, 1.245, 1.5, 2.37, 3.3])
def test_rethinking_cifar_rule(ratio):
    epochs = int(160 * ratio)
    assert scratch_b_schedule(160, None, ratio) == (epochs, [int(epochs * 0.5), int(epochs * 0.75)])


def test_imagenet_cap():
    assert scratch_b_schedule(90, [30, 60], 2.5, cap=180, cap_step=60) == (180, [60, 120])
    assert scratch_b_schedule(90, [30, 60], 2.0, cap=180, cap_step=60) == (180, [60, 120])
    assert scratch_b_schedule(90, [30, 60], 1.5, cap=180, cap_step=60) == (135, [45, 90])
    assert scratch_b_schedule(90, [30, 60], 4.0, cap=180) == (180, [60, 120])


def test_schedule_rejects_unknown_rounding():
    with pytest.raises(ValueError, match="rounding"):
        scratch_b_schedule(100, [30], 1.5, rounding="ceil")


def test_scratch_configs():
    config = make_config({"method": "sss", "penalty": 0.01, "epochs": 100, "milestones": [30, 60, 90]})
    e = scratch_e_config(config)
    assert (e.method, e.penalty, e.schedule, e.epochs, e.milestones) == ("none", None, "step", 100, [30, 60, 90])
    b = scratch_b_config(config, sss_ratio("resnet32"))
    assert (b.method, b.schedule, b.epochs, b.milestones) == ("none", "step", 145, [43, 86, 129])
    assert scratch_e_config(make_config({"epochs": 10, "schedule": "step"})).milestones == [5, 7]
    onecycle = make_config({"epochs": 10, "schedule": "onecycle", "method": "sss"})
    assert (scratch_e_config(onecycle).schedule, scratch_e_config(onecycle).epochs) == ("onecycle", 10)
    stretched = scratch_b_config(onecycle, 2.0)
    assert (stretched.method, stretched.schedule, stretched.epochs, stretched.milestones) == ("none", "onecycle", 20, [])


NARROW_RESNET = {"family": "resnet", "block": "basic", "stem": 8, "in_channels": 1, "num_classes": 10,
                 "stages": [[{"inner": [8], "out": 8}] * 2,
                            [{"inner": [16], "out": 16, "stride": 2, "shortcut": "conv"}, {"inner": [16], "out": 16}],
                            [{"inner": [32], "out": 32, "stride": 2, "shortcut": "conv"}, {"inner": [32], "out": 32}]]}


def quiet(message):
    """Training logs are not part of what these tests check."""


@pytest.fixture(scope="module")
def narrow_resnet(tmp_path_factory):
    """A ResNet-14 with widths 8/16/32, as a spec file: small enough to train in a second on a CPU."""
    path = tmp_path_factory.mktemp("spec") / "narrow.json"
    S.save(S.from_dict(NARROW_RESNET), path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_fmnist, narrow_resnet):
    """A one-epoch config on the tiny Fashion-MNIST files, with extra options on top."""
    def make(**values):
        return make_config({"model": str(narrow_resnet), "data": "fashion-mnist", "data_dir": str(tiny_fmnist),
                            "batch_size": 32, "epochs": 1, "device": "cpu", "num_workers": 0, **values})
    return make


@pytest.fixture(scope="module")
def compressed(tiny, tmp_path_factory):
    """An SSS-trained, compressed export of the narrow ResNet."""
    run = tmp_path_factory.mktemp("sss")
    train(tiny(method="sss", penalty=0.05), run, log=quiet)
    compress_run(run, run / "compressed")
    return run / "compressed"


def test_finetune_starts_from_the_export(tiny, compressed, tmp_path):
    result = finetune(compressed, tiny(finetune_epochs=1), tmp_path / "ft", log=quiet)
    assert result["spec"] == S.load(compressed / "spec.json")
    assert len(result["history"]) == 1
    assert (tmp_path / "ft" / "final" / "model.safetensors").exists()


def test_finetune_decays_from_its_own_lr_or_rewinds_the_original_schedule():
    """Plain: cosine from finetune_lr over finetune_epochs. Rewound (Renda et al.): the last 3 epochs of the
    10-epoch one-cycle at peak 0.1, so epoch 0 of fine-tuning is epoch 7 of the original:
    1e-5 + (0.1 − 1e-5) · ½ · (1 + cos(π · (0.7 − 0.3) / 0.7)) = 0.038880."""
    from prunekit.protocols import finetune_config
    from prunekit.schedule import make_policy

    config = make_config({"epochs": 10, "lr": 0.1, "schedule": "onecycle", "finetune_epochs": 3,
                          "finetune_lr": 0.01})
    plain = make_policy(finetune_config(config))
    assert [plain.lr_at(e) for e in (0, 1.5, 3)] == pytest.approx([0.01, 0.005, 0.0])
    rewound = make_policy(finetune_config(make_config({**config.to_dict(), "rewind": 10})))
    assert [rewound.lr_at(e) for e in (0, 3)] == pytest.approx([0.038880, 1e-5], abs=1e-6)
    off = make_policy(finetune_config(make_config({**config.to_dict(), "rewind": 0})))  # `run --rewind 0`
    assert [off.lr_at(e) for e in (0, 1.5)] == pytest.approx([0.01, 0.005])


def test_scratch_runs_start_their_schedule_from_the_beginning_even_where_fine_tuning_rewinds():
    config = make_config({"epochs": 10, "schedule": "onecycle", "rewind": 10, "finetune_epochs": 5})
    assert scratch_e_config(config).rewind is None
    b = scratch_b_config(config, 2.0)
    assert (b.rewind, b.epochs, b.schedule) == (None, 20, "onecycle")


def test_scratch_e_trains_the_export_spec_for_the_original_epochs(tiny, compressed, tmp_path):
    result = scratch(compressed, tiny(milestones=[1]), tmp_path / "e", budget="E", log=quiet)
    assert result["spec"] == S.load(compressed / "spec.json")
    assert len(result["history"]) == 1


def test_scratch_b_budget_follows_the_macs_ratio(tiny, narrow_resnet, tmp_path):
    small = S.apply_units(S.load(narrow_resnet), [(1, True), (1, True), (1, True)])
    S.save(small, tmp_path / "small.json")
    config = tiny(milestones=[1])
    assert 2 < macs_ratio(S.load(narrow_resnet), small, config) < 3
    result = scratch(tmp_path / "small.json", config, tmp_path / "b", budget="B", log=quiet)
    assert result["spec"] == small and len(result["history"]) == 2
    same = scratch(tmp_path / "small.json", config, tmp_path / "b1", budget="B", base_spec=small, log=quiet)
    assert len(same["history"]) == 1


def test_multi_stage_exports_a_version_per_stage(tiny, tmp_path):
    """Stage 2's large ρ zeroes γ within its few steps, so version 2 is smaller than version 1; stage 3 (ρ = 0)
    fine-tunes version 2 at its own LR."""
    config = tiny(method="ista-bn", stage_penalties=[0.01, 10.0, 0.0], stage_epochs=[1, 1, 1], stage_lrs=[0.1, 0.1, 0.01])
    summary = multi_stage(config, tmp_path, log=quiet)
    assert list(summary) == ["version-1", "version-2", "version-3"]
    for name, row in summary.items():
        assert (tmp_path / name / "spec.json").exists() and (tmp_path / name / "model.safetensors").exists()
        assert row["params"] == count_params(load(tmp_path / name))
        assert 0.0 <= row["test_acc"] <= 1.0
    assert summary["version-3"]["params"] <= summary["version-2"]["params"] < summary["version-1"]["params"]
    stage3 = json.loads((tmp_path / "stage-3" / "config.json").read_text())["config"]
    assert (stage3["penalty"], stage3["lr"], stage3["epochs"]) == (0.0, 0.01, 1)


@pytest.mark.parametrize("method", ["binary-gate", "ista-bn"])
def test_retraining_configs_drop_the_sparse_only_options_so_their_records_read_back(method):
    """Fine-tuning and scratch runs of a stream, magnitude-rank recipe prune nothing: their configs carry the
    defaults of stream_channels, budget_rank and penalty, and validate again as recorded."""
    from prunekit.protocols import finetune_config, scratch_e_config

    config = make_config({"method": method, "stream_channels": True, "budget_rank": "magnitude", "penalty": 0.02,
                          "target_macs": 0.5, "rewind": 20, "finetune_epochs": 20})
    for retrain in (finetune_config(config), scratch_e_config(config)):
        assert (retrain.method, retrain.stream_channels, retrain.budget_rank, retrain.penalty) == (
            "none", False, "cost", None)
        assert make_config(retrain.to_dict()) == retrain
