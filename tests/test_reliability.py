"""The promises of README "Guarantees", checked end to end on tiny Fashion-MNIST-format data.

1. A kill at any moment loses at most the current epoch, and `--resume` ends with the same weights.
2. Bad input gives one line naming the file or field, exit status 2, and touches nothing written.
3. Loading never executes code (the CIFAR unpickler's own test is
   tests/test_data.py::test_cifar_malicious_pickle_is_refused).
4. Numerical faults are reported, never exported silently.
5. The same seed and recipe give the same metrics, and a run records what produced it.

Trainings use a two-stage ResNet small enough that importing torch is most of a subprocess's time,
and one thread everywhere, so that killed subprocesses and in-process resumes compute bit-identically.
"""
import contextlib
import copy
import errno
import gzip
import io
import json
import os
import pickle
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import prunekit
from prunekit import checkpoint
from prunekit import spec as specs
from prunekit.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from prunekit.cli import main
from prunekit.compress import EXPORT_FILES, export
from prunekit.config import CHOICES, Config, ConfigError, make_config, resolve, with_round_to
from prunekit.methods import METHODS
from prunekit.models import build
from prunekit.runner import LOCK, run_lock

TINY_SPEC = {"family": "resnet", "block": "basic", "stem": 8, "in_channels": 1, "num_classes": 10,
             "stages": [[{"inner": [8], "out": 8}, {"inner": [8], "out": 8}],
                        [{"inner": [16], "out": 16, "stride": 2, "shortcut": "conv"}]]}
OTHER_SPEC = {**TINY_SPEC, "stem": 4,
              "stages": [[{"inner": [4], "out": 4}], [{"inner": [8], "out": 8, "stride": 2, "shortcut": "conv"}]]}
EPOCHS = 3
TIMING_FIELDS = ("train_images_per_s", "epoch_time_s")
INTERRUPTED = "prunekit train: interrupted; resume with --resume"


# --- runs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Match the subprocesses' OMP_NUM_THREADS=1, so in-process and subprocess arithmetic agree."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("specs") / "tiny.json"
    path.write_text(json.dumps(TINY_SPEC))
    return path


@pytest.fixture(scope="module")
def train_args(spec_file, tiny_fmnist):
    """`prunekit train` arguments for the tiny run into `out`, with `extra` flags appended."""
    def args(out, *extra):
        return ["train", "--model", spec_file, "--epochs", EPOCHS, "--batch-size", 16, "--data-dir", tiny_fmnist,
                "--out", out, *extra]
    return args


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def reference(one_thread, train_args, tmp_path_factory):
    """An uninterrupted run, the yardstick for every resumed one."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_cli(*train_args(out)) == 0
    return out


@pytest.fixture(scope="module")
def diverged(one_thread, train_args, tmp_path_factory):
    """An SSS run whose penalty is so strong that every gate reaches zero."""
    out = tmp_path_factory.mktemp("diverged") / "run"
    assert run_cli(*train_args(out), "--epochs", 2, "--method", "sss", "--penalty", 1000, "--schedule", "constant") == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


def metrics_of(run: Path) -> list[dict]:
    """metrics.jsonl without the timing fields, which no two runs share."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in lines]


def files_of(directory: Path) -> dict:
    """Every file under `directory` with its bytes, to show that a refused command wrote nothing (the lock
    file aside: a refused writer may have held it, and it records the PID of its last holder)."""
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != LOCK}


def assert_sound_run_dir(run: Path, epochs: int = EPOCHS) -> None:
    """Every file is complete and parses, one metrics line per epoch, no temporaries left behind."""
    for path in sorted(run.rglob("*")):
        assert not path.name.startswith(".") or path == run / LOCK, f"left-over temporary {path}"
        if path.is_dir():
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(path)
        elif path.name == "state.pt":
            torch.load(path, map_location="cpu", weights_only=True)
        elif path == run / LOCK:
            assert path.read_text().strip().isdigit(), "the lock holds its last holder's PID"
        elif path == run / "steps.jsonl":  # each step once, whatever kills and resumes came before
            steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
            assert steps == list(range(1, len(steps) + 1)) and len(steps) % epochs == 0, steps
        elif path.parent == run / "tb":  # TensorBoard's event files
            continue
        elif path.name != "latest" and path.name != "metrics.jsonl":
            raise AssertionError(f"unexpected file {path}")
    epochs_logged = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs_logged == list(range(1, epochs + 1))
    assert latest_checkpoint(run).name == f"epoch-{epochs:04d}"
    assert load_checkpoint(latest_checkpoint(run))[1]["epoch"] == epochs


def assert_same_run(run: Path, reference: Path) -> None:
    """Bit-identical final weights and the same metrics as the reference run."""
    final = load_file(run / "final" / "model.safetensors")
    expected = load_file(reference / "final" / "model.safetensors")
    assert final.keys() == expected.keys()
    for name in expected:
        assert torch.equal(final[name], expected[name]), name
    assert metrics_of(run) == metrics_of(reference)


def latest_epoch(run: Path) -> int:
    """Epochs a resume would keep: those of the checkpoint `latest` names (0 without one)."""
    path = latest_checkpoint(run) if run.exists() else None
    return load_checkpoint(path)[1]["epoch"] if path else 0


# --- 1. a kill at any moment -----------------------------------------------------------------

FAULTS = Path(prunekit.__file__).parents[1] / "bench" / "faults.py"  # its `child` mode injects the faults


@pytest.fixture
def start(tmp_path):
    """Start `prunekit ARGS` with a fault injected (bench/faults.py child), output to files in tmp_path;
    killed if left running."""
    processes = []

    def launch(args: list, fault: str = "", **env) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
        with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
            processes.append(subprocess.Popen([sys.executable, FAULTS, "child", fault, *map(str, args)], env=env,
                                              stdout=stdout, stderr=stderr))
        return processes[-1]

    yield launch
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for(condition, process: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Poll every 2 ms until `condition()` holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "timed out waiting for the subprocess"
        time.sleep(0.002)
    return True


@pytest.mark.parametrize("fault, epochs_kept", [
    ("kill-before-rename:epoch-0001@1", 0),  # first checkpoint complete, still under its temporary name
    ("kill-before-rename:latest@2", 1),  # epoch-0002 in place, `latest` still names epoch-0001
    ("kill-before-rename:metrics.jsonl@2", 2),  # `latest` moved on, metrics.jsonl not yet rewritten
    ("kill-before-rename:model.safetensors@1", 3),  # training done, final/ half written
    ("kill-mid-write:2", 1),  # half of epoch 2's state.pt on disk
])
def test_killed_while_writing_then_resumed_equals_an_uninterrupted_run(start, tmp_path, train_args, reference,
                                                                      fault, epochs_kept):
    out = tmp_path / "run"
    process = start(train_args(out), fault)
    assert process.wait(timeout=60) == -signal.SIGKILL, (tmp_path / "stderr").read_text()
    assert latest_epoch(out) == epochs_kept
    assert run_cli(*train_args(out), "--resume") == 0
    assert_sound_run_dir(out)
    assert_same_run(out, reference)


def test_killed_right_after_the_first_checkpoint_then_resumed(start, tmp_path, train_args, reference):
    out = tmp_path / "run"
    process = start(train_args(out))
    wait_for((out / "checkpoints" / "latest").exists, process)
    process.kill()
    process.wait(timeout=60)
    assert latest_epoch(out) >= 1
    assert run_cli(*train_args(out), "--resume") == 0
    assert_sound_run_dir(out)
    assert_same_run(out, reference)


@pytest.mark.parametrize("seed", [1, 5])
def test_killed_at_a_random_time_then_resumed(start, tmp_path, train_args, reference, seed):
    out = tmp_path / "run"
    delay = random.Random(seed).uniform(0.0, 2.0)  # training takes about 2 s after config.json appears
    process = start(train_args(out))
    if wait_for((out / "config.json").exists, process):
        time.sleep(delay)
        process.kill()
    process.wait(timeout=60)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
    context = f"killed {delay:.3f} s into training, leaving {left}; its stderr: {(tmp_path / 'stderr').read_text()!r}"
    assert run_cli(*train_args(out), "--resume") == 0, context
    try:
        assert_sound_run_dir(out)
        assert_same_run(out, reference)
    except AssertionError as exc:
        raise AssertionError(f"{exc} ({context})") from exc


def test_ctrl_c_says_how_to_resume_and_keeps_the_last_finished_epoch(start, tmp_path, train_args, reference):
    out, stalled = tmp_path / "run", tmp_path / "stalled"
    process = start(train_args(out), "stall-in-epoch:2", PRUNEKIT_STALLED=str(stalled))
    assert wait_for(stalled.exists, process), (tmp_path / "stderr").read_text()
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert (tmp_path / "stderr").read_text().splitlines() == [INTERRUPTED]
    assert latest_checkpoint(out).name == "epoch-0001" and latest_epoch(out) == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert run_cli(*train_args(out), "--resume") == 0
    assert_sound_run_dir(out)
    assert_same_run(out, reference)


# --- 2. bad input ----------------------------------------------------------------------------


def assert_refused(capsys, args: list, *fragments, untouched: Path | None = None) -> str:
    """Exit status 2, one line on stderr holding every fragment, and no file under `untouched` changed."""
    before = files_of(untouched) if untouched else None
    capsys.readouterr()
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"prunekit {args[0]}: error: "), err
    for fragment in fragments:
        assert str(fragment) in lines[0], err
    if untouched:
        assert files_of(untouched) == before
    return lines[0]


def test_missing_dataset_directory_writes_nothing(tmp_path, capsys, train_args, reference):
    missing = tmp_path / "nowhere"
    out = tmp_path / "fresh"
    assert_refused(capsys, [*train_args(out), "--data-dir", missing], missing, "dataset directory not found")
    assert not out.exists()
    run = copy_run(reference, tmp_path)
    assert_refused(capsys, [*train_args(run), "--data-dir", missing, "--force"], missing, untouched=run)


@pytest.mark.parametrize("corrupt, message", [
    (lambda raw: raw[: len(raw) // 2], "corrupt gzip file"),
    (lambda raw: gzip.compress(gzip.decompress(raw)[:-100]), "truncated idx file"),
    (lambda raw: b"not gzip at all", "corrupt gzip file"),
])
def test_corrupt_dataset_files_are_named(tmp_path, capsys, train_args, tiny_fmnist, corrupt, message):
    data = Path(shutil.copytree(tiny_fmnist, tmp_path / "data"))
    bad = data / "train-images-idx3-ubyte.gz"
    bad.write_bytes(corrupt(bad.read_bytes()))
    out = tmp_path / "run"
    assert_refused(capsys, [*train_args(out), "--data-dir", data], bad, message)
    assert not out.exists()


def with_block(**changes) -> dict:
    """TINY_SPEC with fields of its first block changed."""
    spec = copy.deepcopy(TINY_SPEC)
    spec["stages"][0][0].update(changes)
    return spec


BAD_SPECS = {
    "negative width": (with_block(inner=[-8]), "spec.stages[0][0].inner[0]: width must be between 1"),
    "zero width": ({**TINY_SPEC, "stem": 0}, "spec.stem: width must be between 1"),
    "a billion channels": (with_block(out=10**9), "spec.stages[0][0].out: width must be between 1"),
    "154 GB of weights": ({"family": "convnet", "in_channels": 1, "layers": [{"width": 65536}, {"width": 65536}]},
                             "parameters"),
    "unknown block type": ({**TINY_SPEC, "block": "wide"}, "spec.block: must be one of"),
    "string for a width": ({**TINY_SPEC, "stem": "8"}, "spec.stem: expected int, got str"),
    "mapping for stages": ({**TINY_SPEC, "stages": {}}, "spec.stages: expected list, got dict"),
    "boolean for a width": (with_block(out=True), "spec.stages[0][0].out: expected int, got a boolean"),
    "missing stages": ({k: v for k, v in TINY_SPEC.items() if k != "stages"}, "spec.stages: required"),
    "not a mapping": ([TINY_SPEC], "spec: expected dict, got list"),
}


@pytest.mark.parametrize("command", ["info", "train"])
@pytest.mark.parametrize("case", BAD_SPECS)
def test_bad_specs_are_refused_fast(tmp_path, capsys, train_args, command, case):
    content, message = BAD_SPECS[case]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(content))
    out = tmp_path / "run"
    args = ["info", bad] if command == "info" else [*train_args(out), "--model", bad]
    start_time = time.perf_counter()
    assert_refused(capsys, args, bad, message)
    assert time.perf_counter() - start_time < 5, "refused only after building the network"
    assert not out.exists()


def test_unreadable_spec_file_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"family": "resnet", ')
    assert_refused(capsys, ["info", bad], bad, "not a readable JSON spec")


@pytest.mark.parametrize("content, message", [
    ("batchsize: 16\n", "unknown key 'batchsize'; did you mean 'batch_size'?"),
    ("penality: 0.1\n", "unknown key 'penality'; did you mean 'penalty'?"),
    ("epochs: 2.5\n", "epochs: expected int, got float 2.5"),
    ("milestones: 3\n", "milestones: expected a list, got int"),
    ("on_nan: ignore\n", "on_nan must be one of ('stop', 'skip'), got 'ignore'"),
    ("lr: .nan\n", "lr: expected a finite number, got nan"),
    ("penalty: -.inf\n", "penalty: expected a finite number, got -inf"),
    ("method: magic\n", "method must be one of ('none', 'sss', 'binary-gate', 'ista-bn', 'slimming', "
                        "'epsilon-resnet'), got 'magic'"),
    ("target_epoch_fraction: -2\n", "target_epoch_fraction must be in (0, 1], got -2.0"),
    ("lr_schedule: {abc: 0.1}\n", "lr_schedule: 'abc' is not an epoch number in [0, 100000]"),
    ("momentum: 0\n", "nesterov needs a momentum above 0"),
    (b"lr: \xff\xfe 0.1\n", "not a readable recipe (the file is not UTF-8 text (byte 4: b'\\xff'))"),
    ("lr_schedule: " + "[" * 900 + "]" * 900, "not a readable recipe (the file is nested more than 16 levels deep)"),
    ("lr_schedule: " + "{a: " * 900 + "1" + "}" * 900, "nested more than 16 levels deep"),
    ("lr_schedule: " + "[" * 100000 + "]" * 100000, "recipe.yaml: not "),  # valid YAML (libyaml), or readable
    ("milestones: " + "[" * 17 + "]" * 17, "nested more than 16 levels deep"),
])
def test_bad_recipes_name_the_file_and_field(tmp_path, capsys, train_args, content, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "run"
    assert_refused(capsys, [*train_args(out), "--recipe", recipe], recipe, message)
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--lr", "--penalty", "--target-macs"])
def test_a_non_finite_number_on_the_command_line_is_refused(tmp_path, capsys, train_args, flag):
    out = tmp_path / "run"
    assert_refused(capsys, [*train_args(out), flag, "nan"], flag.lstrip("-").replace("-", "_"), "finite number")
    assert not out.exists()


@pytest.mark.parametrize("option, message", [
    (["--method", "bogus"], "argument --method: invalid choice: 'bogus' (choose from 'none', 'sss', "),
    (["--train-subset", -5], "options: train_subset must be in [1, ∞), got -5"),
    (["--train-subset", 0], "options: train_subset must be in [1, ∞), got 0"),
    (["--val-split", -1], "options: val_split must be in [0, ∞), got -1"),
    (["--val-split", 999999], "val_split: 999999 would leave no training images (the training set has 96)"),
    (["--val-split", 96], "val_split: 96 would leave no training images"),
    (["--pad", -1], "options: pad must be in [0, 64], got -1"),
    (["--seed", "1e30"], "argument --seed: invalid int value: '1e30'"),
    (["--seed", -1], "options: seed must be in [0, 16777216), got -1"),
    (["--label-smoothing", 5], "options: label_smoothing must be in [0, 1), got 5.0"),
    (["--penalty", -1], "options: penalty must be in [0, 1e+06], got -1.0"),
    (["--prune-percent", 150], "options: prune_percent must be in [0, 100], got 150.0"),
    (["--lr", "1e308"], "options: lr must be in [0, 1000], got 1e+308"),
    (["--device", "bogus"], "options: device must be auto, cpu, mps, cuda or cuda:N, got 'bogus'"),
    (["--device", "cuda:99"], "device: cuda:99 asked for, but this machine has"),
    (["--data", "bogus"], "argument --data: invalid choice: 'bogus' (choose from 'fashion-mnist', "),
    (["--model", "bogus"], "unknown model 'bogus'"),
    (["--model", "vgg16"], "vgg16 on fashion-mnist: spec.layers[12].pool: a 2×2 pool leaves nothing of its 1×1"),
    (["--target-epoch-fraction", -2], "options: target_epoch_fraction must be in (0, 1], got -2.0"),
    (["--warmup-epochs", -5], "options: warmup_epochs must be in [0, 100000], got -5.0"),
    (["--epsilon-start-epoch", -9], "options: epsilon_start_epoch must be in [0, 100000], got -9"),
    (["--lr-schedule", "[" * 50000], "argument --lr-schedule: not a JSON mapping nested at most 16 deep"),
    (["--lr-schedule", '{"0": 1e30}'], "options: lr_schedule must be in [0, 1000], got 1e+30"),
    (["--data-dir", "a\0b"], "options: data_dir: 'a\\x00b' holds a NUL"),
    (["--epochs"], "argument --epochs: expected one argument"),
])
def test_bad_options_are_refused_in_one_line_before_the_run_directory_exists(tmp_path, capsys, train_args, option,
                                                                             message):
    out = tmp_path / "run"
    assert_refused(capsys, [*train_args(out), *option], message)
    assert not out.exists()


@pytest.mark.parametrize("command", ["info", "train", "export"])
@pytest.mark.parametrize("layers, message", [
    ([{"width": 4, "pool": "max2"}] * 6, "spec.layers[4].pool: a 2×2 pool leaves nothing of its 1×1 input"),
    ([{"width": 4, "kernel": 15, "padding": 0}] * 3, "spec.layers[1].kernel: a 15×15 kernel does not fit its 14×14 "
                                                     "input with padding 0"),
])
def test_a_convnet_that_does_not_fit_its_images_is_refused_before_building(tmp_path, capsys, train_args, command,
                                                                            layers, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"family": "convnet", "in_channels": 1, "layers": layers}))
    out = tmp_path / "run"
    args = {"info": ["info", bad, "--image-size", 28], "train": [*train_args(out), "--model", bad],
            "export": ["export", tmp_path / "export", "--onnx", out, "--image-size", 28]}[command]
    if command == "export":  # an export of the spec (writing one checks no image size), then an ONNX at 28×28
        spec = specs.load(bad)
        export(tmp_path / "export", spec, build(spec).state_dict(), {})
    assert_refused(capsys, args, message, "(28×28 images)")
    assert not out.exists()


def test_a_spec_nested_thousands_deep_is_refused(tmp_path, capsys, train_args):
    bad = tmp_path / "deep.json"
    bad.write_text("[" * 100000 + "]" * 100000)
    for args in (["info", bad], [*train_args(tmp_path / "run"), "--model", bad]):
        assert_refused(capsys, args, bad, "not a readable JSON spec (the file is nested more than 16 levels deep)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, message", [
    (b"", "not the record of a run (the file is empty)"),
    (b"\xff\xfe{", "not the record of a run (the file is not UTF-8 text (byte 0"),
    (b'{"config": 3}', "holds no run configuration"),
])
def test_a_damaged_run_record_is_named_on_resume_and_compress(tmp_path, capsys, train_args, reference, content,
                                                               message):
    run = copy_run(reference, tmp_path)
    (run / "config.json").write_bytes(content)
    assert_refused(capsys, [*train_args(run), "--resume"], run / "config.json", message,
                   "use --force to start the run over", untouched=run)
    assert_refused(capsys, ["compress", run], run / "config.json", message, untouched=run)


@pytest.mark.parametrize("content, message", [
    (b"", "names no checkpoint (expected epoch-NNNN, got '')"),
    (b"\xff\xfe", "names no checkpoint (the file is not UTF-8 text (byte 0"),
    (b"../../elsewhere\n", "names no checkpoint (expected epoch-NNNN, got '../../elsewhere')"),
])
def test_a_damaged_latest_pointer_is_named_on_resume(tmp_path, capsys, train_args, reference, content, message):
    run = copy_run(reference, tmp_path)
    latest = run / "checkpoints" / "latest"
    latest.write_bytes(content)
    assert_refused(capsys, [*train_args(run), "--resume"], latest, message, untouched=run)


@pytest.fixture(scope="module")
def gated(one_thread, train_args, tmp_path_factory):
    """A one-epoch binary-gate run: its final/gates.json has every field, a threshold among them."""
    out = tmp_path_factory.mktemp("gated") / "run"
    assert run_cli(*train_args(out), "--epochs", 1, "--method", "binary-gate", "--schedule", "constant") == 0
    return out


@pytest.mark.parametrize("field, text, message", [
    ("threshold", '"abc"', "threshold: expected float, got str 'abc'"),
    ("threshold", "NaN", "not a gate configuration (the file holds NaN where a number belongs)"),
    ("threshold", "-Infinity", "not a gate configuration (the file holds -Infinity where a number belongs)"),
    ("threshold", "1e400", "threshold: expected a finite number, got inf"),
    ("channels", '"no"', "channels: expected bool, got str 'no'"),
    ("blocks", '"no"', "blocks: expected bool, got str 'no'"),
    ("kind", '"magic"', "gate kind must be one of"),
    ("colour", "1", "unknown field 'colour'"),
])
def test_a_bad_gates_file_is_named_by_eval_and_compress(tmp_path, capsys, tiny_fmnist, gated, field, text, message):
    run = copy_run(gated, tmp_path)
    gates = run / "final" / "gates.json"
    data = json.loads(gates.read_text())
    gates.write_text(json.dumps({**data, field: "PLACEHOLDER"}).replace('"PLACEHOLDER"', text))
    for args in (["eval", run, "--data-dir", tiny_fmnist], ["compress", run]):
        assert_refused(capsys, args, gates, message, untouched=run)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def weights_of_another_spec(path: Path) -> None:
    save_file(build(specs.from_dict(OTHER_SPEC)).state_dict(), path)


@pytest.mark.parametrize("file, damage, message", [
    ("state.pt", truncate, "not a loadable training state"),
    ("model.safetensors", truncate, "not a valid safetensors file"),
    ("model.safetensors", weights_of_another_spec, "does not fit"),
    ("state.pt", "from the diverged run", "does not fit"),
])
def test_unusable_checkpoints_are_named_on_resume(tmp_path, capsys, train_args, reference, diverged, file, damage,
                                                  message):
    run = copy_run(reference, tmp_path)
    target = run / "checkpoints" / f"epoch-{EPOCHS:04d}" / file
    if callable(damage):
        damage(target)
    else:
        shutil.copy(diverged / "checkpoints" / "epoch-0002" / file, target)
    assert_refused(capsys, [*train_args(run), "--resume"], target, message, untouched=run)


def test_weights_that_do_not_fit_the_spec_are_named(tmp_path, capsys, tiny_fmnist, reference):
    wrong = build(specs.from_dict(OTHER_SPEC)).state_dict()
    exported = export(tmp_path / "export", specs.from_dict(TINY_SPEC), wrong, {})
    assert_refused(capsys, ["eval", exported, "--data-dir", tiny_fmnist], exported / "model.safetensors",
                   "weights do not fit", untouched=exported)
    run = copy_run(reference, tmp_path)
    save_file(wrong, run / "final" / "model.safetensors")
    for args in (["eval", run, "--data-dir", tiny_fmnist], ["compress", run]):
        assert_refused(capsys, args, run / "final" / "model.safetensors", "do not fit", untouched=run)


def test_a_directory_holding_another_run_is_refused(tmp_path, capsys, train_args, reference):
    run = copy_run(reference, tmp_path)
    assert_refused(capsys, train_args(run), run, "already holds a run", untouched=run)
    assert_refused(capsys, [*train_args(run), "--lr", 0.05, "--resume"], "different configuration", untouched=run)
    assert run_cli(*train_args(run), "--lr", 0.05, "--force") == 0
    assert json.loads((run / "config.json").read_text())["config"]["lr"] == 0.05
    assert_sound_run_dir(run)


def test_a_record_from_an_older_version_resumes_and_reads_back(tmp_path, capsys, train_args, reference, tiny_fmnist):
    """A dense run's record without a field added since (budget_rank: it ran with the default) and carrying a
    sparse stage's stream_channels (fine-tuning records of stream recipes did, before `dense_config`) still
    resumes as the same run, and `eval` reads it; a changed value is still a different configuration."""
    run = copy_run(reference, tmp_path)
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["method"] == "none"
    del record["config"]["budget_rank"]
    record["config"]["stream_channels"] = True
    (run / "config.json").write_text(json.dumps(record))
    assert run_cli(*train_args(run), "--resume") == 0
    assert run_cli("eval", run, "--data-dir", tiny_fmnist) == 0
    assert_refused(capsys, [*train_args(run), "--lr", 0.05, "--resume"], "different configuration", untouched=run)


def test_force_clears_the_old_runs_artifacts_first(tmp_path, train_args, reference):
    run = copy_run(reference, tmp_path)
    assert run_cli("compress", run) == 0
    assert run_cli(*train_args(run), "--lr", 0.05, "--epochs", 2, "--force") == 0
    assert not (run / "compressed").exists(), "the old run's export outlived it"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002", "latest"]
    assert_sound_run_dir(run, epochs=2)


def test_a_second_writer_is_refused_naming_the_first(start, tmp_path, capsys, train_args):
    out, stalled = tmp_path / "run", tmp_path / "stalled"
    process = start(train_args(out), "stall-in-epoch:2", PRUNEKIT_STALLED=str(stalled))
    assert wait_for(stalled.exists, process), (tmp_path / "stderr").read_text()
    message = f"{out}: in use by another prunekit process (PID {process.pid})"
    assert_refused(capsys, [*train_args(out), "--resume"], message, untouched=out)
    assert_refused(capsys, [*train_args(out), "--force"], message, untouched=out)
    process.kill()
    process.wait(timeout=60)
    assert run_cli(*train_args(out), "--resume") == 0, "the kernel releases a killed holder's lock"


@pytest.mark.parametrize("command", ["stages", "run", "finetune", "scratch"])
def test_every_command_that_writes_a_run_takes_its_lock(tmp_path, capsys, train_args, reference, command):
    out = tmp_path / "out"
    exported = tmp_path / "export"
    assert run_cli("compress", copy_run(reference, tmp_path), "--out", exported) == 0
    common = [*train_args(out)[1:], "--epochs", 1]
    args = {"stages": ["stages", *common, "--method", "ista-bn", "--stage-penalties", 0, "--stage-epochs", 1,
                       "--stage-lrs", 0.1],
            "run": ["run", *common],
            "finetune": ["finetune", exported, *common],
            "scratch": ["scratch", exported, *common]}[command]
    with run_lock(out):
        assert_refused(capsys, args, f"{out}: in use by another prunekit process (PID {os.getpid()})")
    assert [p.name for p in out.iterdir()] == [LOCK]


@pytest.mark.parametrize("fault", ["kill-before-rename:model.safetensors@1", "kill-before-rename:card.json@1"])
def test_an_export_killed_while_renaming_is_redone_by_the_next_compress(start, tmp_path, tiny_fmnist, reference,
                                                                        fault):
    """A killed export leaves its staging folder (and, before its card, some new files): the next compress
    of the same run writes it whole."""
    run = copy_run(reference, tmp_path)
    process = start(["compress", run], fault)
    assert process.wait(timeout=60) == -signal.SIGKILL, (tmp_path / "stderr").read_text()
    assert run_cli("compress", run) == 0
    assert sorted(p.name for p in (run / "compressed").iterdir()) == sorted(EXPORT_FILES)
    assert run_cli("eval", run / "compressed", "--data-dir", tiny_fmnist) == 0


def test_compress_writes_only_over_an_export_of_the_same_run(tmp_path, capsys, reference, diverged):
    run = copy_run(reference, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_refused(capsys, ["compress", run, "--out", other], other, f"holds something other than an export of {run}",
                   "--force", untouched=other)
    assert run_cli("compress", run, "--out", other, "--force") == 0
    assert json.loads((other / "card.json").read_text())["source"] == str(run)
    assert (other / "notes.txt").read_text() == "mine", "--force writes the export's files, never deletes others"
    exported = tmp_path / "exported"
    assert run_cli("compress", run, "--out", exported) == 0
    assert run_cli("compress", run, "--out", exported) == 0, "an export of the same run may be replaced"
    another = copy_run(diverged, tmp_path / "another")
    assert_refused(capsys, ["compress", another, "--out", exported], "holds something other than an export of "
                   f"{another} (card.json)", untouched=exported)
    (tmp_path / "file").write_text("")
    assert_refused(capsys, ["compress", run, "--out", tmp_path / "file"], "is a file, not an export directory")


def full_disk_in_epoch_2(save):
    """`torch.save` that, for epoch 2's training state, writes half of it and fails as a full disk does."""
    def save_or_fail(obj, path, *args, **kwargs):
        if not (isinstance(obj, dict) and obj.get("epoch") == 2):
            return save(obj, path, *args, **kwargs)
        buffer = io.BytesIO()
        save(obj, buffer, *args, **kwargs)
        Path(path).write_bytes(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save_or_fail


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    weights, state = {"w": torch.arange(4.0)}, {"epoch": 1}
    save_checkpoint(tmp_path, 1, weights, state)
    monkeypatch.setattr(checkpoint.torch, "save", full_disk_in_epoch_2(torch.save))
    with pytest.raises(CheckpointError, match="epoch-0002.*No space left on device"):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(4)}, {"epoch": 2})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-0001", "latest"]
    kept_weights, kept_state = load_checkpoint(latest_checkpoint(tmp_path))
    assert torch.equal(kept_weights["w"], weights["w"]) and kept_state == state


@pytest.mark.parametrize("file, epochs_kept", [("checkpoints/epoch-0002", 1), ("metrics.jsonl", 2)])
def test_full_disk_during_training_is_one_line_and_resumable(tmp_path, capsys, monkeypatch, train_args, reference,
                                                             file, epochs_kept):
    out = tmp_path / "run"
    real_write_text = Path.write_text

    def write_text(path, text):
        """Metrics of two epochs get half written, then the disk is full."""
        if path.name.startswith(".metrics.jsonl.") and text.count("\n") == 2:
            path.write_bytes(text[: len(text) // 2].encode())
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(path, text)

    if file == "metrics.jsonl":
        monkeypatch.setattr(Path, "write_text", write_text)
    else:
        monkeypatch.setattr(checkpoint.torch, "save", full_disk_in_epoch_2(torch.save))
    assert_refused(capsys, train_args(out), out / file, "No space left on device")
    monkeypatch.undo()
    assert latest_epoch(out) == epochs_kept
    assert len(metrics_of(out)) == 1
    assert run_cli(*train_args(out), "--resume") == 0
    assert_sound_run_dir(out)
    assert_same_run(out, reference)


FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors' words


def full_disk_in(folder: str):
    """safetensors' `save_file`, failing as on a full disk for files written into a folder named `folder`*."""
    real_save_file = checkpoint.save_file

    def save_file(tensors, path, *args, **kwargs):
        if Path(path).parent.name.startswith(folder):
            raise SafetensorError(FULL_DISK)
        return real_save_file(tensors, path, *args, **kwargs)
    return save_file


def test_full_disk_while_writing_the_final_model_is_one_line_and_resumable(tmp_path, capsys, monkeypatch,
                                                                           train_args, reference):
    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "save_file", full_disk_in("final"))
    assert_refused(capsys, train_args(out), out / "final" / "model.safetensors", "No space left on device",
                   "KiB free on its disk")
    monkeypatch.undo()
    assert latest_epoch(out) == EPOCHS and not (out / "final" / "model.safetensors").exists()
    assert not [p for p in (out / "final").iterdir() if p.name.startswith(".")], "a temporary was left behind"
    assert run_cli(*train_args(out), "--resume") == 0
    assert_sound_run_dir(out)
    assert_same_run(out, reference)


def test_full_disk_while_exporting_leaves_the_previous_export_whole(tmp_path, capsys, monkeypatch, reference):
    run = copy_run(reference, tmp_path)
    assert run_cli("compress", run) == 0
    monkeypatch.setattr(checkpoint, "save_file", full_disk_in(".export-"))
    assert_refused(capsys, ["compress", run], "model.safetensors: cannot be written", "No space left on device",
                   untouched=run)
    assert sorted(p.name for p in (run / "compressed").iterdir()) == ["card.json", "card.md", "model.safetensors",
                                                                      "spec.json"]


def test_full_disk_while_writing_a_report_is_one_line(tmp_path, capsys, monkeypatch, reference):
    from matplotlib.figure import Figure

    def savefig(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(Figure, "savefig", savefig)
    assert_refused(capsys, ["report", reference, "--out", tmp_path / "report"], "No space left on device",
                   tmp_path / "report", untouched=reference)


EXTREME_VALUES = [0, -1, 2**63, 10**400, -(10**400), float("inf"), float("nan"), "", "resnet", True, None, [], {},
                  [10**400], {"0": 10**400}, [[]]]
JSON_LEAVES = (st.sampled_from(EXTREME_VALUES) | st.none() | st.booleans() | st.integers() | st.floats()
               | st.text(max_size=6))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


def paths_in(value, prefix=()):
    """Every (key or index) path into nested dicts and lists, the root included."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from paths_in(child, (*prefix, key))


@st.composite
def mutations(draw, bases: list, keys: list[str]):
    """A deep copy of one of `bases` with up to three values replaced, deleted or keys added."""
    value = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths_in(value))))
        if not path:
            return draw(JSON_VALUES)
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":  # copies: EXTREME_VALUES holds lists that later mutations would edit
            parent[path[-1]] = copy.deepcopy(draw(JSON_VALUES))
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(keys) | st.text(max_size=6))] = copy.deepcopy(draw(JSON_VALUES))
    return value


VALID_SPECS = [TINY_SPEC, OTHER_SPEC, specs.to_dict(specs.cifar_resnet_spec(20, bottleneck=True)),
               specs.to_dict(specs.cifar_resnext_spec(11, 2, 2)),
               specs.to_dict(specs.cnn4_spec())]
SPEC_KEYS = ["family", "block", "stem", "stages", "inner", "out", "stride", "shortcut", "layers", "width",
             "kernel", "padding", "pool", "num_classes", "in_channels", "preact", "imagenet_stem", "groups",
             "stencil"]
RECIPES = [yaml.safe_load(p.read_text()) for p in sorted(Path(prunekit.__file__).parents[1].glob("recipes/*.yaml"))]
CONFIG_KEYS = [f.name for f in fields(Config)]


@settings(max_examples=200, deadline=None, database=None)
@given(st.one_of(JSON_VALUES, mutations(VALID_SPECS, SPEC_KEYS)))
def test_any_json_is_a_spec_or_a_spec_error(data):
    try:
        spec = specs.from_dict(data)
    except specs.SpecError as exc:
        assert "\n" not in str(exc)
        return
    assert specs.from_dict(specs.to_dict(spec)) == spec


@settings(max_examples=200, deadline=None, database=None)
@given(st.one_of(JSON_VALUES, st.dictionaries(st.sampled_from(CONFIG_KEYS) | st.text(max_size=8), JSON_VALUES),
                 mutations(RECIPES, CONFIG_KEYS)))
def test_any_json_is_a_config_or_a_config_error(data):
    try:
        config = make_config(data, "recipe.yaml")
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("recipe.yaml")
        return
    make_config(config.to_dict())


def replaced(data, path: tuple, value):
    """A deep copy of `data` with the value at `path` replaced."""
    data = copy.deepcopy(data)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return data


def test_every_spec_field_with_every_extreme_value_is_a_spec_error():
    for base in VALID_SPECS:
        for path in filter(None, paths_in(base)):
            for value in EXTREME_VALUES:
                try:
                    specs.from_dict(replaced(base, path, value))
                except specs.SpecError:
                    pass
                except Exception as exc:
                    pytest.fail(f"{path} = {value!r}: {exc!r}")


def test_the_config_layer_knows_every_method():
    """config.py lists the methods itself, so that it imports no model code; the lists must agree."""
    assert CHOICES["method"] == METHODS


def test_every_option_with_every_extreme_value_is_a_config_error():
    for key in CONFIG_KEYS:
        for value in EXTREME_VALUES:
            try:
                make_config({key: value})
            except ConfigError:
                pass
            except Exception as exc:
                pytest.fail(f"{key} = {value!r}: {exc!r}")


def nested(depth: int, key: str) -> str:
    """A YAML recipe whose `key` holds lists `depth` deep."""
    return f"{key}: " + "[" * depth + "]" * depth


RECIPE_DOCUMENTS = st.one_of(
    st.binary(max_size=40),
    st.text(alphabet="[]{}:,-!&*|>'\"#\n abe01.", max_size=60).map(str.encode),
    st.builds(lambda value: yaml.safe_dump(value).encode(), mutations(RECIPES, CONFIG_KEYS)),
    st.builds(nested, st.integers(0, 20000), st.sampled_from(CONFIG_KEYS)).map(str.encode),
)


@settings(max_examples=300, deadline=None, database=None)
@given(RECIPE_DOCUMENTS)
def test_any_recipe_document_is_a_config_or_one_line_naming_the_file(tmp_path_factory, document):
    recipe = tmp_path_factory.getbasetemp() / "fuzzed.yaml"
    recipe.write_bytes(document)
    try:
        resolve(recipe, {})
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(recipe)), exc


OPTION_TEXTS = ["0", "1", "-1", "2", "0.5", "1e30", "1e308", "-1e308", "nan", "inf", "", "abc", "999999", "9" * 30,
                "true", "{}", "[]", '{"0": 0.1}', '{"x": 1}', "[" * 3000, "\0", "\udcff", "sss", "epsilon-resnet",
                "cuda", "cpu", "channels+blocks", "digits", "step"]
# One epoch always, so that a valid value trains fast; compiling takes a minute and has nothing to validate.
CLI_OPTIONS = [f for f in fields(Config) if f.name not in ("epochs", "compile")]


@st.composite
def option_arguments(draw) -> list[str]:
    """One command-line option (other than --epochs) with a value that may be anything."""
    option = draw(st.sampled_from(CLI_OPTIONS))
    flag = "--" + option.name.replace("_", "-")
    if "bool" in str(option.type):
        return [draw(st.sampled_from([flag, flag.replace("--", "--no-", 1)]))]
    return [flag, draw(st.sampled_from(OPTION_TEXTS) | st.text(max_size=6))]


@settings(max_examples=60, deadline=None, database=None)
@given(option_arguments())
def test_any_option_value_trains_or_is_refused_in_one_line(tmp_path_factory, train_args, option):
    """Exit status 0 (and a final model), or 2 with one line on stderr: never a traceback."""
    out = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())) / "run"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        status = run_cli(*train_args(out), *option, "--epochs", 1)
    lines = stderr.getvalue().splitlines()
    if status == 0:
        assert (out / "final" / "model.safetensors").exists(), option
    else:
        assert status == 2 and len(lines) == 1 and lines[0].startswith("prunekit train: error: "), (option, lines)


# --- 3. loading never executes code ----------------------------------------------------------


class RunsShellWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("write", [
    lambda payload, path: path.write_bytes(pickle.dumps(payload, protocol=2)),
    lambda payload, path: torch.save(payload, path),
], ids=["plain pickle", "torch zip"])
def test_a_malicious_training_state_is_refused_without_running(tmp_path, capsys, train_args, reference, write):
    run = copy_run(reference, tmp_path)
    marker = tmp_path / "MARKER"
    target = run / "checkpoints" / f"epoch-{EPOCHS:04d}" / "state.pt"
    write(RunsShellWhenUnpickled(marker), target)
    assert_refused(capsys, [*train_args(run), "--resume"], target, "not a loadable training state", untouched=run)
    assert not marker.exists()


def test_a_recipe_that_constructs_python_objects_is_refused_without_running(tmp_path, capsys, train_args):
    marker = tmp_path / "MARKER"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"epochs: !!python/object/apply:os.system ['touch {marker}']\n")
    assert_refused(capsys, [*train_args(tmp_path / "run"), "--recipe", recipe], recipe, "not valid YAML")
    assert not marker.exists()


# --- 4. numerical faults ---------------------------------------------------------------------

EXPLODING_LR = ["--schedule", "piecewise", "--lr-schedule", '{"0": 0.05, "1": 1000}']  # the largest LR allowed
EXPLODING_DECAY = [*EXPLODING_LR, "--weight-decay", 39]  # weights grow ×39000 a step: the loss overflows in epoch 2


def assert_finite_checkpoint(run: Path, epoch: int) -> None:
    """`latest` names the checkpoint of `epoch`, and every tensor it holds is finite."""
    path = latest_checkpoint(run)
    assert path.name == f"epoch-{epoch:04d}"
    weights = load_file(path / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_non_finite_loss_names_the_step_and_the_last_good_checkpoint(tmp_path, capsys, train_args):
    out = tmp_path / "run"
    line = assert_refused(capsys, [*train_args(out), *EXPLODING_DECAY], "non-finite loss", "at epoch 2, step 6",
                          out / "checkpoints" / "epoch-0001", "--on-nan skip")
    assert latest_epoch(out) == 1 and len(metrics_of(out)) == 1, line
    assert_finite_checkpoint(out, 1)


def test_non_finite_steps_are_skipped_until_a_whole_epoch_diverges(tmp_path, capsys, train_args):
    """Epoch 2 skips its non-finite steps (and their BN statistics) and is logged; in epoch 3 every step is
    non-finite, which stops the run rather than logging an epoch that trained on nothing."""
    out = tmp_path / "run"
    assert_refused(capsys, [*train_args(out), *EXPLODING_DECAY, "--on-nan", "skip"],
                   "every step of epoch 3 had a non-finite loss", "diverged")
    assert [m["skipped_steps"] for m in metrics_of(out)] == [0, 4]
    assert latest_epoch(out) == 2 and load_checkpoint(latest_checkpoint(out))[1]["skipped_steps"] == 4
    assert_finite_checkpoint(out, 2)


def test_statistics_overflowing_under_a_finite_loss_stop_at_the_last_finite_checkpoint(tmp_path, capsys, train_args):
    """At LR 1000 the loss stays finite (BN renormalises) while the running variances overflow: the epoch's
    checkpoint is refused and the one before it named."""
    out = tmp_path / "run"
    assert_refused(capsys, [*train_args(out), *EXPLODING_LR], "non-finite weights or statistics after epoch 2 (",
                   "running_var", f"last good checkpoint: {out / 'checkpoints' / 'epoch-0001'}")
    assert latest_epoch(out) == 1 and len(metrics_of(out)) == 1
    assert_finite_checkpoint(out, 1)


def test_a_diverged_run_writes_no_final_model_and_compress_says_so(tmp_path, capsys, train_args):
    out = tmp_path / "run"
    assert_refused(capsys, [*train_args(out), "--lr", 300, "--schedule", "constant", "--epochs", 1],
                   "non-finite weights or statistics after epoch 1 (layer1.0.bn2.running_var", "none written yet")
    assert not (out / "final").exists() and latest_checkpoint(out) is None
    assert_refused(capsys, ["compress", out], out, "holds no trained model", untouched=out)


def test_skipping_keeps_the_state_finite_and_overflowing_outputs_are_refused(tmp_path, capsys, train_args,
                                                                            tiny_fmnist):
    """--on-nan skip at LR 1000: what is written is finite, but the network's outputs overflow, which
    compress and eval refuse rather than export or print."""
    out = tmp_path / "run"
    assert run_cli(*train_args(out), "--lr", 1000, "--schedule", "constant", "--epochs", 1, "--on-nan", "skip") == 0
    final = load_file(out / "final" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in final.values() if w.is_floating_point())
    assert_refused(capsys, ["compress", out], "logits on random inputs are not finite", untouched=out)
    assert_refused(capsys, ["eval", out, "--data-dir", tiny_fmnist], "the test loss is not finite", untouched=out)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_never_used(tmp_path, capsys, tiny_fmnist, train_args, reference, value):
    run = copy_run(reference, tmp_path)
    weights = run / "final" / "model.safetensors"
    tensors = load_file(weights)
    tensors["layer1.0.bn2.running_var"][0] = value
    save_file(tensors, weights)
    for args in (["eval", run, "--data-dir", tiny_fmnist], ["compress", run],
                 [*train_args(tmp_path / "tuned"), "--init", run]):
        assert_refused(capsys, args, weights, "layer1.0.bn2.running_var hold NaN or inf", untouched=run)
    assert not (run / "compressed").exists() and not (tmp_path / "tuned").exists()


def test_non_finite_weights_are_never_written(tmp_path):
    spec = specs.from_dict(TINY_SPEC)
    state = build(spec).state_dict()
    state["fc.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"model.safetensors: not written: fc.weight hold NaN or inf"):
        export(tmp_path / "export", spec, state, {})
    with pytest.raises(CheckpointError, match=r"epoch-0001: not written: fc.weight hold NaN or inf"):
        save_checkpoint(tmp_path, 1, state, {"epoch": 1})
    assert not list((tmp_path / "export").iterdir()) and not list((tmp_path / "checkpoints").iterdir())


def test_a_diverged_penalty_is_not_exported_as_an_empty_network(tmp_path, capsys, diverged):
    run = copy_run(diverged, tmp_path)
    assert_refused(capsys, ["compress", run], run, "every", "dead", "penalty diverged", untouched=run)
    assert not (run / "compressed").exists()


# --- 5. reproducible -------------------------------------------------------------------------


def test_same_seed_and_recipe_give_identical_metrics_and_a_recorded_environment(tmp_path, train_args, reference,
                                                                              spec_file, tiny_fmnist):
    out = tmp_path / "run"
    assert run_cli(*train_args(out)) == 0
    assert_same_run(out, reference)
    record = json.loads((out / "config.json").read_text())
    expected = with_round_to(make_config({"model": str(spec_file), "epochs": EPOCHS, "batch_size": 16,
                                          "data_dir": str(tiny_fmnist)}), "cpu").to_dict()
    assert record["config"] == expected  # with the width rounding decided for this device: 1
    environment = record["environment"]
    assert environment["python"] == platform.python_version() and environment["torch"] == torch.__version__
    revision = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(prunekit.__file__).parent).stdout.strip() or None
    assert "git_revision" in environment and environment["git_revision"] == revision
