"""The CLI end to end on tiny data in the real Fashion-MNIST format."""
import json

import pytest

from prunekit.cli import main
from prunekit.compress import load_any
from prunekit.measure import spec_cost
from prunekit.methods import dead_structures, sparsity_metrics
from prunekit.models import zoo_spec

TINY = ["--model", "resnet20", "--epochs", "2", "--batch-size", "32", "--lr", "0.05"]


def run_cli(*args):
    return main([str(a) for a in args])


# Gates are driven to a budget: on tiny data a fixed strong penalty kills every gate, which compress refuses.
@pytest.mark.parametrize("method, extra", [
    ("sss", ["--target-macs", "0.5", "--schedule", "constant"]),
    ("binary-gate", ["--target-macs", "0.5", "--schedule", "constant"]),
    ("ista-bn", ["--penalty", "4", "--schedule", "constant"]),
    ("slimming", ["--penalty", "1e-3", "--prune-percent", "40"]),
    ("epsilon-resnet", ["--epsilon", "0.05", "--schedule", "piecewise", "--lr-schedule", '{"0": 0.05}'])])
def test_each_method_trains_and_logged_counts_match_the_gates(tmp_path, tiny_fmnist, method, extra):
    out = tmp_path / method
    assert run_cli("train", *TINY, "--data-dir", tiny_fmnist, "--method", method, *extra, "--out", out) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    model, _ = load_any(out)
    recomputed = sparsity_metrics(model, method, prune_percent=40 if method == "slimming" else None)
    last = metrics[-1]
    for key in ("alive_channels", "dead_channels", "alive_blocks", "dead_blocks", "gate_ones", "gate_zeros"):
        if key in recomputed:
            assert last[key] == recomputed[key], key
    if method in ("sss", "ista-bn", "binary-gate"):
        assert last["dead_channels"] > 0, "a strong penalty must produce exact zeros"
    if method == "ista-bn":
        assert 0 < last["fake_sparsity"] <= 1 and last["group_lasso"] >= 0
    if method == "epsilon-resnet":
        assert "discarded_blocks" in last
        assert last["branch_peak"] == recomputed["branch_peak"] and all(p > 0 for p in last["branch_peak"])
    assert run_cli("compress", out) == 0
    card = json.loads((out / "compressed" / "card.json").read_text())
    assert card["macs_after"] <= card["macs_before"]
    assert card["max_logit_difference"] < 1e-4 and card["checked_on"] == ["data", "random"]


@pytest.mark.parametrize("method", ["ista-bn", "slimming"])
def test_bn_gamma_methods_at_a_budget_compress_exactly_and_score_what_they_export(tmp_path, tiny_fmnist, method):
    """The cut is exact at zero-padded borders (constant-input biases), and slimming's prune step happens
    before the last evaluation, so the run's final accuracy is the compressed network's."""
    out = tmp_path / method
    assert run_cli("train", *TINY, "--data-dir", tiny_fmnist, "--method", method, "--target-macs", "0.6",
                   "--schedule", "constant", "--out", out) == 0
    assert run_cli("compress", out) == 0
    card = json.loads((out / "compressed" / "card.json").read_text())
    assert card["dead_channels"] > 0 and card["max_logit_difference"] < 1e-4
    assert run_cli("eval", out / "compressed", "--data-dir", tiny_fmnist) == 0
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    model, _ = load_any(out / "compressed")
    from prunekit.config import make_config
    from prunekit.protocols import evaluate_accuracy

    assert evaluate_accuracy(model, make_config({"data_dir": str(tiny_fmnist)})) == final["test_acc"]


def test_epsilon_resnet_in_paper_mode_discards_blocks_and_exports_them_removed(tmp_path, tiny_fmnist):
    """The issue's run: ε = 1000 puts every branch within ε from the first step; the authors' moving
    average reads 1 after a dozen steps, so compression removes all 9 branches, exactly."""
    out = tmp_path / "eps"
    assert run_cli("train", *TINY, "--data-dir", tiny_fmnist, "--method", "epsilon-resnet", "--epsilon", "1000",
                   "--batch-size", "16", "--out", out) == 0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["dead_blocks"] == 9 and last["discarded_now"] == 9 and last["discarded_blocks"] > 8.9999
    assert run_cli("compress", out) == 0
    card = json.loads((out / "compressed" / "card.json").read_text())
    assert card["dead_blocks"] == 9 and card["max_logit_difference"] < 1e-4
    assert all(not block.has_branch for stage in load_any(out / "compressed")[1].stages for block in stage)


def test_sss_compression_is_exact_from_a_trained_run(tmp_path, tiny_fmnist):
    out = tmp_path / "sss"
    run_cli("train", *TINY, "--data-dir", tiny_fmnist, "--method", "sss", "--target-macs", "0.5",
            "--schedule", "constant", "--out", out)
    model, _ = load_any(out)
    dead = dead_structures(model, "sss")
    assert dead.count_channels() > 0
    run_cli("compress", out)
    card = json.loads((out / "compressed" / "card.json").read_text())
    assert card["exact"] and card["max_logit_difference"] < 1e-4 and card["macs_ratio"] < 1


def test_epsilon_resnet_budget_freezes_the_blocks_nearest_the_target_and_compresses_exactly(tmp_path, tiny_fmnist):
    """Too short a run for any branch to fall within ε: at the deadline the controller discards, for good,
    the blocks with the smallest max |F(x)|, as many as bring the MACs nearest half."""
    out = tmp_path / "eps"
    assert run_cli("train", *TINY, "--epochs", 3, "--data-dir", tiny_fmnist, "--method", "epsilon-resnet",
                   "--target-macs", "0.5", "--out", out) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    frozen = metrics[-1]
    assert frozen["budget_frozen"] and not metrics[0]["budget_frozen"]
    dense = spec_cost(zoo_spec("resnet20", in_channels=1), (28, 28)).macs
    assert abs(frozen["projected_macs"] / dense - 0.5) < 0.06  # one ResNet-20 block is 11.6% of the MACs
    assert frozen["dead_blocks"] == frozen["discarded_blocks"] > 0
    first_frozen = next(m for m in metrics if m["budget_frozen"])  # the freeze acts before the epoch's metrics
    assert first_frozen["dead_blocks"] == frozen["dead_blocks"]
    assert run_cli("compress", out) == 0
    card = json.loads((out / "compressed" / "card.json").read_text())
    assert card["macs_after"] == frozen["projected_macs"] and card["max_logit_difference"] < 1e-4


def test_train_eval_info(tmp_path, tiny_fmnist, capsys):
    out = tmp_path / "dense"
    assert run_cli("train", *TINY, "--data-dir", tiny_fmnist, "--out", out) == 0
    assert (out / "final" / "model.safetensors").exists() and (out / "config.json").exists()
    capsys.readouterr()
    assert run_cli("eval", out, "--data-dir", tiny_fmnist) == 0
    result = json.loads(capsys.readouterr().out)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert result["test_acc"] == pytest.approx(history[-1]["test_acc"])
    assert run_cli("info", "resnet56") == 0
    assert "params 855,770" in capsys.readouterr().out


def test_recipe_values_are_overridden_by_flags(tmp_path, tiny_fmnist):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: resnet20\nepochs: 3\nbatch_size: 32\nlr: 0.05\nmethod: sss\n")
    out = tmp_path / "run"
    assert run_cli("train", "--recipe", recipe, "--epochs", "1", "--data-dir", tiny_fmnist, "--out", out) == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["epochs"] == 1 and config["method"] == "sss" and config["batch_size"] == 32


@pytest.mark.parametrize("content, message", [
    ("epochz: 3\n", "unknown key 'epochz'; did you mean 'epochs'?"),
    ("epochs: three\n", "epochs: expected int"),
    ("- a list\n", "a recipe is a mapping"),
    ("lr: !!python/object/apply:os.system ['echo hacked']\n", "not valid YAML"),
])
def test_bad_recipes_get_one_line_errors(tmp_path, capsys, content, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(content)
    assert run_cli("train", "--recipe", recipe, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "bad.yaml" in err and len(err.splitlines()) == 1


def test_missing_data_and_existing_run_are_refused(tmp_path, tiny_fmnist, capsys):
    assert run_cli("train", *TINY, "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "a") == 2
    assert "nowhere" in capsys.readouterr().err
    out = tmp_path / "b"
    assert run_cli("train", *TINY, "--epochs", "1", "--data-dir", tiny_fmnist, "--out", out) == 0
    before = (out / "final" / "model.safetensors").read_bytes()
    assert run_cli("train", *TINY, "--epochs", "1", "--data-dir", tiny_fmnist, "--out", out) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "final" / "model.safetensors").read_bytes() == before


def test_finetune_honours_epochs_and_lr(tmp_path, tiny_fmnist):
    out = tmp_path / "sss"
    assert run_cli("train", *TINY, "--data-dir", tiny_fmnist, "--method", "sss", "--target-macs", "0.6",
                   "--schedule", "constant", "--out", out) == 0
    assert run_cli("compress", out) == 0
    assert run_cli("finetune", out / "compressed", "--data-dir", tiny_fmnist, "--epochs", "3", "--lr", "0.05",
                   "--batch-size", "32", "--out", tmp_path / "ft") == 0
    record = json.loads((tmp_path / "ft" / "config.json").read_text())["config"]
    assert (record["epochs"], record["lr"]) == (3, 0.05)


def test_report_names_a_damaged_metrics_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n{bad\n')
    assert run_cli("report", run, "--out", tmp_path / "report") == 2
    assert "metrics.jsonl: line 2 is not JSON" in capsys.readouterr().err
