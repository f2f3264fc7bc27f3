"""`prunekit run` end to end on tiny data, and `prunekit report` on its output."""
import json
import math
import struct

from prunekit.cli import main
from prunekit.progress import read_steps
from prunekit.report import read_metrics
from test_cli import torchrun_cli


def test_run_then_report(tmp_path, tiny_fmnist):
    out = tmp_path / "main"
    assert main(["run", "--data-dir", str(tiny_fmnist), "--epochs", "1", "--sparse-epochs", "2",
                 "--finetune-epochs", "1", "--batch-size", "16", "--lr", "0.05", "--kd-weight", "1",
                 "--out", str(out)]) == 0
    for part in ("dense", "sparse", "compressed", "finetune"):
        assert (out / part).is_dir()
    row = json.loads((out / "result.json").read_text())
    for key in ("dense_acc", "sparse_acc", "compressed_acc", "final_acc", "params_dense", "params_final",
                "macs_dense", "macs_final", "latency_ms_b64_dense", "latency_ms_b64_final"):
        assert key in row, key
    assert {row["latency_layout_dense"], row["latency_layout_final"]} <= {"NCHW", "channels_last"}
    assert abs(row["macs_final"] / row["macs_dense"] - 0.5) <= 0.02
    assert row["max_logit_difference"] < 1e-3
    written = (out / "report.md").read_text()  # `prunekit run` ends with the report and its plots
    assert "| method | model | dense acc | sparse acc | compressed acc | final acc" in written
    plots = {"pareto.png", "curves.png", "structure.png", "kept.png", "budget.png"}
    assert {p.name for p in out.glob("*.png")} >= plots
    assert all(f"]({name})" in written for name in plots)
    report = tmp_path / "report"
    assert main(["report", str(out), "--out", str(report)]) == 0
    pngs = sorted(report.glob("*.png"))
    assert {p.name for p in pngs} >= plots
    assert "![budget](budget.png)" in (report / "report.md").read_text()
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 400 and height >= 300
    assert "| sss | resnet20 |" in (report / "report.md").read_text()
    for part in ("dense", "sparse", "finetune"):  # every run recorded each step's LR
        assert len(read_steps(out / part)) == len(read_metrics(out / part)) * 6  # 96 images, 16 a batch
    teachers = {part: json.loads((out / part / "config.json").read_text())["config"]["teacher"]
                for part in ("dense", "sparse", "finetune")}
    assert teachers == {"dense": None, "sparse": str(out / "dense"), "finetune": str(out / "dense")}


def test_run_under_torchrun_with_two_cpu_processes_writes_one_report(tmp_path, tiny_fmnist):
    """`torchrun --nproc_per_node=2 prunekit run` (gloo): one process holds the run's lock and writes the export
    and the report, both ranks train every stage, and both exit 0."""
    out = tmp_path / "main"
    done = torchrun_cli("run", "--data-dir", tiny_fmnist, "--device", "cpu", "--epochs", 1, "--sparse-epochs", 1,
                        "--finetune-epochs", 1, "--batch-size", 16, "--kd-weight", 0, "--out", out)
    assert done.returncode == 0, done.stderr[-4000:]
    row = json.loads((out / "result.json").read_text())
    assert abs(row["macs_final"] / row["macs_dense"] - 0.5) <= 0.02 and row["max_logit_difference"] < 1e-3
    assert done.stdout.count("| method | model | dense acc") == done.stdout.count("[1/4] dense training") == 1
    for part in ("dense", "sparse", "finetune"):  # 96 images: 3 steps of 2 × 16 an epoch
        assert len(read_steps(out / part)) == len(read_metrics(out / part)) * 3, part


def test_run_with_stream_channels_starts_the_sparse_stage_from_the_dense_weights(tmp_path, tiny_fmnist):
    """The dense stage's plain weights load into the stream-gated model (its stream factors start at 1)."""
    out = tmp_path / "main"
    assert main(["run", "--data-dir", str(tiny_fmnist), "--epochs", "1", "--sparse-epochs", "1", "--finetune-epochs",
                 "1", "--batch-size", "16", "--stream-channels", "--kd-weight", "0", "--out", str(out)]) == 0
    row = json.loads((out / "result.json").read_text())
    assert abs(row["macs_final"] / row["macs_dense"] - 0.5) <= 0.02 and row["max_logit_difference"] < 1e-3


def test_the_pipeline_distils_from_its_dense_stage_unless_told_otherwise(tmp_path):
    from prunekit.config import make_config
    from prunekit.pipeline import distilled

    from prunekit.pipeline import MAIN_JOB

    assert distilled(make_config({}), tmp_path).teacher == str(tmp_path / "dense")
    assert distilled(make_config(MAIN_JOB), tmp_path).teacher is None  # the main job's default: no distillation
    assert distilled(make_config({"kd_weight": 0.0}), tmp_path).teacher is None
    assert distilled(make_config({"teacher": "elsewhere"}), tmp_path).teacher == "elsewhere"


def test_lr_rewinding_in_the_pipeline_is_for_fine_tuning_only():
    """`run --rewind 5 --finetune-epochs 3`: dense and sparse stages on their own schedules, fine-tuning on the
    last 3 of 5 epochs of the one-cycle at peak 0.1 (epoch 2 of 5: ½ · 0.1 · (1 + cos(π · 0.1/0.7)) ≈ 0.095)."""
    import pytest

    from prunekit.config import ConfigError, make_config
    from prunekit.protocols import finetune_config
    from prunekit.pipeline import sparse_config
    from prunekit.schedule import make_policy

    config = make_config({"epochs": 5, "sparse_epochs": 2, "finetune_epochs": 3, "rewind": 5})
    assert sparse_config(config).rewind is None
    policy = make_policy(finetune_config(config))
    assert policy.lr_at(0) == pytest.approx(1e-5 + (0.1 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.1 / 0.7)))
    with pytest.raises(ConfigError, match="cannot hold a 10-epoch rewound run; give --rewind 10 or more"):
        make_policy(make_config({"epochs": 10, "rewind": 5}))  # `train --init RUN --epochs 10 --rewind 5`


def test_a_fine_tuning_schedule_that_cannot_be_built_stops_the_run_before_the_dense_stage(tmp_path, capsys):
    assert main(["run", "--data", "digits", "--epochs", "9", "--finetune-epochs", "6", "--rewind", "5",
                 "--out", str(tmp_path / "run")]) == 2
    assert "original schedule's 5 epochs cannot hold a 6-epoch rewound run" in capsys.readouterr().err
    assert not (tmp_path / "run" / "dense").exists()
