"""`prunekit report` on real tiny runs: every plot is written, from the numbers the runs recorded."""
import json
import struct

import pytest

from prunekit.cli import main
from prunekit.progress import read_steps
from prunekit.report import lr_per_step, pareto_front, pareto_points, read_metrics, write_report

TINY = ["--model", "resnet20", "--epochs", "2", "--batch-size", "32", "--lr", "0.05"]  # 96 images: 3 steps an epoch


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_fmnist):
    """A dense run, and an SSS run driven to 60% of the MACs and compressed."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", *TINY, "--data-dir", str(tiny_fmnist), "--out", str(root / "dense")]) == 0
    assert main(["train", *TINY, "--data-dir", str(tiny_fmnist), "--method", "sss", "--target-macs", "0.6",
                 "--schedule", "constant", "--out", str(root / "sss")]) == 0
    assert main(["compress", str(root / "sss")]) == 0
    return root


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_every_plot_is_written_and_linked(runs, tmp_path):
    written = write_report([runs / "dense", runs / "sss"], tmp_path).read_text()
    names = ["pareto.png", "curves.png", "structure.png", "signatures.png", "kept.png", "budget.png",
             "gates-runs0-dense.png", "gates-runs0-sss.png"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(names)
    assert [line.split("(")[1][:-1] for line in written.splitlines() if line.startswith("![")] == names
    for name in names:
        width, height = png_size(tmp_path / name)
        assert width >= 600 and height >= 400, name


def test_the_lr_is_drawn_per_step(runs):
    epochs, rates, per_step = lr_per_step(runs / "sss")
    assert epochs == pytest.approx([0, 1 / 3, 2 / 3, 1, 4 / 3, 5 / 3], abs=1e-6) and rates == [0.05] * 6  # constant
    epochs, rates, per_step = lr_per_step(runs / "dense")
    assert per_step
    assert len(set(rates)) == 6  # one-cycle: each step its own rate
    assert rates == [s["lr"] for s in read_steps(runs / "dense")]


def test_a_run_without_steps_jsonl_draws_the_lr_of_each_epoch(runs, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_text((runs / "dense" / "metrics.jsonl").read_text())
    assert lr_per_step(old) == ([1.0, 2.0], [m["lr"] for m in read_metrics(runs / "dense")], False)
    write_report([old], tmp_path / "report")
    assert png_size(tmp_path / "report" / "curves.png")[0] >= 600


def test_the_pareto_front_keeps_the_points_nothing_cheaper_matches():
    points = [(4, 0.9), (2, 0.4), (1, 0.5), (2, 0.7), (3, 0.7), (5, 0.85), (1, 0.3)]
    assert pareto_front(points) == [(1, 0.5), (2, 0.7), (4, 0.9)]


def test_pareto_points_of_a_pipeline_and_of_a_compressed_run(runs):
    row = {"dense_acc": 0.9, "compressed_acc": 0.6, "final_acc": 0.88, "macs_dense": 40e6, "macs_final": 20e6,
           "latency_ms_b64_dense": 30.0, "latency_ms_b64_final": 18.0}
    points = pareto_points([(runs / "pipeline", row)], [runs / "dense", runs / "sss"])
    card = json.loads((runs / "sss" / "compressed" / "card.json").read_text())
    assert [(p["source"].name, p["kind"], p["acc"], p["macs"], p["latency"]) for p in points] == [
        ("pipeline", "dense", 0.9, 40e6, 30.0), ("pipeline", "compressed", 0.6, 20e6, 18.0),
        ("pipeline", "final", 0.88, 20e6, 18.0),
        ("sss", "run", read_metrics(runs / "sss")[-1]["test_acc"], card["macs_after"], None)]
