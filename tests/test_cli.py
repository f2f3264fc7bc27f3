"""The CLI end to end on tiny data in the real Fashion-MNIST format."""
import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from prunekit.cli import CONFIG_DEFAULTS, DATA_FIELDS, build_parser, main
from prunekit.compress import load_any
from prunekit.measure import spec_cost
from prunekit.methods import dead_structures, sparsity_metrics
from prunekit.models import build, zoo_spec

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


def torchrun_cli(*args) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 prunekit ARGS` on the CPU (gloo), one thread a process."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "prunekit.cli", *map(str, args)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


def test_torchrun_with_two_cpu_processes_trains_leaves_cleanly_and_compresses_exactly(tmp_path, tiny_fmnist):
    """`torchrun --nproc_per_node=2 prunekit train`: both ranks exit 0, having left the process group themselves,
    the global batch is logged once, and the run compresses exactly."""
    out = tmp_path / "ddp"
    done = torchrun_cli("train", *TINY, "--data-dir", tiny_fmnist, "--device", "cpu", "--method", "sss",
                        "--target-macs", "0.5", "--out", out)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("global batch 64 (2 processes × --batch-size 32)") == 1
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert run_cli("compress", out) == 0
    assert json.loads((out / "compressed" / "card.json").read_text())["max_logit_difference"] < 1e-4


def test_torchrun_multi_stage_compresses_each_stage_once_and_trains_the_next_on_every_rank(tmp_path, tiny_fmnist):
    """`torchrun --nproc_per_node=2 prunekit stages`: the main rank holds the lock, compresses each stage and writes
    the summary; every rank trains stage 2 from version 1."""
    out = tmp_path / "stages"
    done = torchrun_cli("stages", *TINY, "--data-dir", tiny_fmnist, "--device", "cpu", "--method", "ista-bn",
                        "--stage-penalties", "0.01", "0", "--stage-epochs", "1", "1", "--stage-lrs", "0.05", "0.01",
                        "--out", out)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["version-1", "version-2"] and done.stdout.count('"version-2"') == 1
    assert json.loads((out / "stage-2" / "config.json").read_text())["config"]["model"].endswith("spec.json")


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


def test_finetune_honours_epochs_and_lr_and_keeps_the_runs_data(tmp_path, tiny_fmnist):
    """No --data/--data-dir: the export is fine-tuned on the data its run trained on."""
    out = tmp_path / "sss"
    assert run_cli("train", *TINY, "--data-dir", tiny_fmnist, "--method", "sss", "--target-macs", "0.6",
                   "--schedule", "constant", "--no-flip", "--out", out) == 0
    assert run_cli("compress", out) == 0
    assert run_cli("finetune", out / "compressed", "--epochs", "3", "--lr", "0.05",
                   "--batch-size", "32", "--out", tmp_path / "ft") == 0
    record = json.loads((tmp_path / "ft" / "config.json").read_text())["config"]
    source = json.loads((out / "config.json").read_text())["config"]
    assert (record["epochs"], record["lr"]) == (3, 0.05)
    assert {k: record[k] for k in DATA_FIELDS} == {k: source[k] for k in DATA_FIELDS}
    assert record["data_dir"] == str(tiny_fmnist) and record["flip"] is False
    assert record["schedule"] == "cosine"
    assert run_cli("finetune", out / "compressed", "--epochs", "1", "--lr", "0.2", "--rewind", "4",
                   "--batch-size", "32", "--out", tmp_path / "rewound") == 0
    rewound = json.loads((tmp_path / "rewound" / "config.json").read_text())["config"]
    assert (rewound["schedule"], rewound["lr"], rewound["rewind"]) == ("constant", 0.2, 4)  # the original's shape


def test_a_runs_retraining_protocol_carries_over_to_fine_tuning_its_export(tmp_path, tiny_fmnist):
    """A recipe's `rewind`: its own run from scratch follows the schedule from the beginning (the same LRs as
    without it); `prunekit finetune` of its export rewinds, for the run's fine-tune epochs, with no flags."""
    common = [*TINY, "--data-dir", tiny_fmnist, "--method", "sss", "--target-macs", "0.6", "--schedule", "onecycle"]
    assert run_cli("train", *common, "--out", tmp_path / "plain") == 0
    assert run_cli("train", *common, "--rewind", "4", "--finetune-epochs", "3", "--out", tmp_path / "src") == 0
    lrs = {name: [json.loads(line)["lr"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
           for name in ("plain", "src")}
    assert lrs["src"] == lrs["plain"]
    assert run_cli("compress", tmp_path / "src") == 0
    assert run_cli("finetune", tmp_path / "src" / "compressed", "--batch-size", "32", "--out", tmp_path / "ft") == 0
    record = json.loads((tmp_path / "ft" / "config.json").read_text())["config"]
    assert (record["rewind"], record["epochs"], record["schedule"], record["lr"]) == (4, 3, "onecycle", 0.05)


def test_report_names_a_damaged_metrics_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n{bad\n')
    assert run_cli("report", run, "--out", tmp_path / "report") == 2
    assert "metrics.jsonl: line 2 is not JSON" in capsys.readouterr().err


# --- a conventional command line (issue #15, item 4) ------------------------------------------------


def subcommands():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, commands.choices


def test_every_option_of_every_subcommand_has_help_its_default_and_its_choices():
    parser, commands = subcommands()
    assert set(commands) == {"train", "eval", "info", "compress", "finetune", "scratch", "stages", "report",
                             "export", "run"}
    for name, command in [("prunekit", parser), *commands.items()]:
        formatter = command._get_formatter()
        text = " ".join(command.format_help().split())
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            for choice in action.choices or ():
                assert str(choice) in text, f"{name} {action.option_strings}: choice {choice} not listed"
            default = action.default
            if getattr(action, "config_field", False):
                default = {**CONFIG_DEFAULTS, **formatter.defaults()}[action.dest]
            shown = formatter._get_help_string(action)
            if action.option_strings and default not in (None, False, argparse.SUPPRESS):
                assert "(default" in shown, f"{name} {action.option_strings} does not show its default"
    train = " ".join(commands["train"].format_help().split())
    assert "--method {none,sss,binary-gate,ista-bn,slimming,epsilon-resnet}" in train
    assert "--data {fashion-mnist,mnist,cifar10,cifar100,svhn,digits,imagenet}" in train
    assert "--epochs EPOCHS training epochs (default: 10)" in train
    assert "--lr LR peak learning rate, at most 1000 (default: 0.1)" in train
    # `run` shows the main job's defaults, `finetune` its --epochs and --lr as the fine-tuning's
    run = " ".join(commands["run"].format_help().split())
    assert "--epochs EPOCHS training epochs (default: 4)" in run and "(default: 0.5)" in run
    finetune = " ".join(commands["finetune"].format_help().split())
    assert "--epochs EPOCHS training epochs (default: 5)" in finetune and "(default: 0.01)" in finetune


def test_torchvision_style_aliases_and_version(tmp_path, capsys):
    parser, _ = subcommands()
    args = parser.parse_args(["train", "-b", "64", "-j", "3", "--output-dir", str(tmp_path)])
    assert (args.batch_size, args.num_workers, args.out) == (64, 3, str(tmp_path))
    assert parser.parse_args(["train", "--workers", "5", "--out", "x"]).num_workers == 5
    assert parser.parse_args(["eval", "run", "-b", "8", "-j", "0"]).batch_size == 8
    assert run_cli("--version") == 0
    assert capsys.readouterr().out.strip() == f"prunekit {importlib.metadata.version('prunekit')}"


@pytest.mark.parametrize("args, message", [
    (["train", "--method", "pruning", "--out", "o"], "argument --method: invalid choice: 'pruning'"),
    (["train", "--device", "tpu", "--out", "o"], "device must be auto, cpu, mps, cuda or cuda:N, got 'tpu'"),
    (["train", "--model", "resnet7x", "--out", "o"], "unknown model 'resnet7x'"),
    (["train", "--model", "torchvision:alexnet", "--out", "o"], "torchvision models prunekit imports are"),
    (["train", "--data", "coco", "--out", "o"], "argument --data: invalid choice: 'coco'"),
    (["train", "--schedule", "weekly", "--out", "o"], "argument --schedule: invalid choice: 'weekly'"),
    (["run", "--budget-rule", "loose"], "argument --budget-rule: invalid choice: 'loose'"),
    (["train", "--method", "slimming", "--budget-rank", "magnitude", "--out", "o"],
     "budget_rank: magnitude applies to the exact rule's sss, binary-gate and ista-bn"),
    (["train", "--method", "sss", "--budget-rule", "paper", "--budget-rank", "magnitude", "--out", "o"],
     "not 'sss' with the paper rule"),
    (["info", "resnet7x"], "unknown model 'resnet7x'"),
    (["info", "resnet20", "--data", "coco"], "argument --data: invalid choice: 'coco'"),
    (["eval", "run", "--device", "tpu", "--data", "mnist"], "device must be"),
    (["compress", "run", "--method", "magic"], "argument --method: invalid choice: 'magic'"),
    (["scratch", "export", "--budget", "C", "--out", "o"], "argument --budget: invalid choice: 'C'"),
    (["export", "export"], "nothing to write: give --onnx FILE, --pt2 FILE or both"),
    (["stages", "--out"], "argument --out/--output-dir: expected one argument"),
])
def test_a_bad_choice_is_one_line_and_exit_status_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    if args[0] in ("eval", "export"):  # something that loads, so that the option is what is refused
        from prunekit.compress import export

        spec = zoo_spec("resnet20", in_channels=1)
        export(tmp_path / args[1], spec, build(spec).state_dict(), {})
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"prunekit {args[0]}: error: ") and message in err, err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def sss_run(tmp_path_factory, tiny_fmnist):
    """A trained SSS run at half the MACs and its compressed export, in RUN/compressed and elsewhere."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert run_cli("train", *TINY, "--data-dir", tiny_fmnist, "--method", "sss", "--target-macs", "0.5",
                   "--schedule", "constant", "--out", out) == 0
    assert run_cli("compress", out) == 0
    assert run_cli("compress", out, "--out", out.parent / "elsewhere") == 0
    return out


def test_eval_scores_a_run_or_export_on_the_data_it_was_trained_on(sss_run, tiny_fmnist, tmp_path, capsys):
    final = json.loads((sss_run / "metrics.jsonl").read_text().splitlines()[-1])
    for path in (sss_run, sss_run / "final", sss_run / "compressed", sss_run.parent / "elsewhere"):
        capsys.readouterr()
        assert run_cli("eval", path) == 0  # no --data, no --data-dir: the run's (the card names the run)
        result = json.loads(capsys.readouterr().out)
        assert result["data"] == "fashion-mnist" and result["test_acc"] == pytest.approx(final["test_acc"])
    capsys.readouterr()
    assert run_cli("eval", sss_run, "--data", "mnist", "--data-dir", tiny_fmnist) == 0  # --data overrides
    assert json.loads(capsys.readouterr().out)["data"] == "mnist"
    assert run_cli("eval", sss_run, "--data", "cifar10", "--data-dir", tmp_path) == 2
    assert "the model takes 1 input channels and has 10 classes; cifar10 has 3 and 10" in capsys.readouterr().err
    lone = tmp_path / "lone"  # an export with no record of its run
    shutil.copytree(sss_run / "compressed", lone)
    (lone / "card.json").write_text("{}")
    assert run_cli("eval", lone) == 2
    assert "no record of the run it came from" in capsys.readouterr().err
    assert run_cli("eval", lone, "--data", "fashion-mnist", "--data-dir", tiny_fmnist) == 0


def last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_info_sizes_the_input_like_the_run_or_the_models_usual_dataset(sss_run, tmp_path, capsys):
    expected = {("resnet56",): "params 855,770 MACs 126,292,608 (input 3x32x32)",  # CIFAR-10
                ("resnet50",): "(input 3x224x224)",  # ImageNet: 1000 classes
                ("mobilenet_v2",): "(input 3x224x224)", ("mobilenet_v2_cifar",): "(input 3x32x32)",
                ("cnn4", "--in-channels", "1"): "(input 1x28x28)",  # one channel: Fashion-MNIST
                ("resnet20", "--data", "imagenet"): "(input 3x224x224)",
                ("resnet20", "--image-size", "40"): "(input 3x40x40)",
                (sss_run,): "(input 1x28x28)", (sss_run / "compressed",): "(input 1x28x28)",
                (sss_run.parent / "elsewhere" / "spec.json",): "(input 1x28x28)"}
    for args, text in expected.items():
        assert run_cli("info", *args) == 0
        assert text in " ".join(last_line(capsys).split()), args
    assert run_cli("info", "resnet50", "--json") == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["spec"]["num_classes"] == 1000
    shutil.copy(sss_run / "compressed" / "spec.json", tmp_path / "spec.json")  # a lone spec: 1 channel
    assert run_cli("info", tmp_path / "spec.json") == 0 and "(input 1x28x28)" in last_line(capsys)
    assert run_cli("info", sss_run, "--num-classes", "5") == 2
    assert "--num-classes and --in-channels size a zoo model" in capsys.readouterr().err


def test_export_writes_onnx_and_a_torch_export_program_that_loads_without_prunekit(sss_run, tmp_path, capsys):
    """onnxruntime and torch.export.load, in a process that cannot import prunekit, give the export's logits
    (within 1e-4 relative), for batches of 1 and 5: the batch is dynamic; the input is the run's 28×28."""
    ort = pytest.importorskip("onnxruntime")
    for source in (sss_run / "compressed", sss_run):  # the compressed export, and the run's gated model
        onnx_file, program = tmp_path / f"{source.name}.onnx", tmp_path / f"{source.name}.pt2"
        assert run_cli("export", source, "--onnx", onnx_file, "--pt2", program) == 0
        assert capsys.readouterr().out.split() == [str(onnx_file), str(program)]
        model, _ = load_any(source)
        inputs = {n: torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(n)) for n in (1, 5)}
        torch.save(inputs, tmp_path / "inputs.pt")
        plain = ("import sys; sys.modules['prunekit'] = None; import torch; "
                 "module = torch.export.load(sys.argv[1]).module(); inputs = torch.load(sys.argv[2]); "
                 "torch.save({n: module(x) for n, x in inputs.items()}, sys.argv[3])")
        subprocess.run([sys.executable, "-c", plain, program, tmp_path / "inputs.pt", tmp_path / "out.pt"],
                       check=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
        loaded = torch.load(tmp_path / "out.pt")
        session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        (image_input,) = session.get_inputs()
        assert image_input.shape[1:] == [1, 28, 28]
        with torch.no_grad():
            for n, x in inputs.items():
                expected = model(x)
                torch.testing.assert_close(loaded[n], expected, rtol=0, atol=0)
                (logits,) = session.run(None, {image_input.name: x.numpy()})
                difference = (torch.from_numpy(logits) - expected).abs().max() / expected.abs().max()
                assert logits.shape == (n, 10) and difference <= 1e-4


def test_an_image_folder_sets_the_class_count(tmp_path, capsys):
    """Three class folders: a zoo model gets a 3-class head (no forced 1000), a 3-class spec trains on a
    subset of them, and eval scores on the folder the run recorded."""
    from PIL import Image

    from prunekit.config import make_config
    from prunekit.runner import model_spec

    for split in ("train", "val"):
        for c, name in enumerate(("ant", "bee", "cow")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(4):
                image = Image.new("RGB", (40 + i, 30), (80 * c, 20 * i, 200 - 60 * c))
                image.save(tmp_path / split / name / f"{i}.png")
    folder = ["--data", "imagenet", "--data-dir", tmp_path]
    config = make_config({"model": "resnet18", "data": "imagenet", "data_dir": str(tmp_path)})
    assert model_spec(config).num_classes == 3
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps({"family": "convnet", "in_channels": 3, "num_classes": 3,
                                "layers": [{"width": 4, "kernel": 7, "pool": "max3s2"}]}))
    out = tmp_path / "run"
    assert run_cli("train", "--model", spec, *folder, "--train-subset", 6, "-j", 0, "-b", 3, "--epochs", 1,
                   "--seed", 1, "--out", out) == 0
    capsys.readouterr()
    assert run_cli("eval", out, "-j", 0) == 0
    assert json.loads(capsys.readouterr().out)["data"] == "imagenet"
