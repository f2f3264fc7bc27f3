"""Fault campaign: every way a run can be hurt, tried on tiny data; prints category → tried → clean → failures.

    OMP_NUM_THREADS=1 .venv/bin/python bench/faults.py [--out runs/faults] [--seed 0]

A trial is clean when prunekit keeps its promises:
- kill -9 during training or inside a checkpoint write: `--resume` ends with the weights and metrics of
  an uninterrupted run, bit for bit, and no temporary is left;
- a corrupt or truncated file, a bad option or recipe: exit status 2 and one line naming the file or
  field (with nothing written changed), or, for an option or recipe that is fine, a trained run;
- a full disk (a tmpfs this small; mounting needs root, else the category is skipped): exit 2 and one
  line, the last checkpoint loadable, and once the disk grows `--resume` ends as an uninterrupted run;
- a divergence: exit 2 and one line, or exit 0; no file written holds NaN or inf either way, and eval
  and compress of what was written succeed or refuse in one line;
- concurrent starts: one writer runs, every other gets one line naming it (or that its run is there).

`python bench/faults.py child FAULT ARGS...` runs `prunekit ARGS` with FAULT injected (tests/test_reliability.py
starts its killed runs this way):
    kill-before-rename:NAME@K   SIGKILL just before the K-th rename onto a file or folder called NAME
    kill-mid-write:E            SIGKILL with half of epoch E's training state written
    stall-in-epoch:E            touch $PRUNEKIT_STALLED at the start of epoch E and wait there (120 s)
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

CHILD_ENV = {"OMP_NUM_THREADS": "1"}
EPOCHS = 3
TINY_SPEC = {"family": "resnet", "block": "basic", "stem": 8, "in_channels": 1, "num_classes": 10,
             "stages": [[{"inner": [8], "out": 8}, {"inner": [8], "out": 8}],
                        [{"inner": [16], "out": 16, "stride": 2, "shortcut": "conv"}]]}
TIMING_FIELDS = ("train_images_per_s", "epoch_time_s")


# --- the child: prunekit with one fault injected ---------------------------------------------


def inject(fault: str) -> None:
    """Patch this process so that `fault` happens (see the module docstring)."""
    import torch

    from prunekit import engine

    kind, _, where = fault.partition(":")

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kind == "kill-before-rename":
        name, count = where.split("@")
        renamed, real_replace = [], os.replace

        def replace(source, destination):
            if Path(destination).name == name:
                renamed.append(destination)
                if len(renamed) == int(count):
                    die()
            real_replace(source, destination)

        os.replace = replace  # prunekit renames through os.replace
    elif kind == "kill-mid-write":
        real_save = torch.save

        def save(obj, path, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("epoch") == int(where):
                buffer = io.BytesIO()
                real_save(obj, buffer)
                with open(path, "wb") as f:
                    f.write(buffer.getvalue()[: buffer.tell() // 2])
                    f.flush()
                    os.fsync(f.fileno())
                die()
            real_save(obj, path, *args, **kwargs)

        torch.save = save
    elif kind == "stall-in-epoch":
        real_train_epoch = engine.Trainer.train_epoch

        def train_epoch(self):
            if self.epoch + 1 == int(where):
                Path(os.environ["PRUNEKIT_STALLED"]).touch()
                time.sleep(120)
            return real_train_epoch(self)

        engine.Trainer.train_epoch = train_epoch
    elif kind:
        raise SystemExit(f"unknown fault {fault!r}")


def child(fault: str, args: list[str]) -> int:
    from prunekit.cli import main

    # A shell starts background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt
    # handler; restore it so that Ctrl-C reaches prunekit as it does in a terminal.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    inject(fault)
    return main(args)


# --- the campaign ----------------------------------------------------------------------------


def write_idx(path: Path, array, magic: int) -> None:
    """An idx file (the MNIST format), gzipped."""
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype("uint8").tobytes())


def write_tiny_fashion_mnist(root: Path) -> None:
    """96 training and 48 test images in Fashion-MNIST's files, each class a bright band at its own height."""
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("t10k", 48)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28))
        for i, y in enumerate(labels):
            images[i, 2 * y:2 * y + 6, 4:24] = 250
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images, 0x803)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels, 0x801)


class Campaign:
    """Tiny data, a tiny spec, the reference run, and the tally of trials by category."""

    def __init__(self, out: Path, seed: int):
        self.out, self.rng = out, random.Random(seed)
        shutil.rmtree(out, ignore_errors=True)
        self.data, self.spec = out / "data", out / "tiny.json"
        write_tiny_fashion_mnist(self.data)
        self.spec.write_text(json.dumps(TINY_SPEC))
        self.tally: dict[str, list] = {}
        self.count = 0
        self.reference = self.fresh("reference")
        status, lines = cli(*self.train_args(self.reference))
        assert status == 0, lines

    def fresh(self, name: str) -> Path:
        """A new directory for one trial's run."""
        self.count += 1
        return self.out / "trials" / f"{self.count:03d}-{name}"

    def train_args(self, run: Path, *extra) -> list:
        return ["train", "--model", self.spec, "--epochs", EPOCHS, "--batch-size", 16, "--data-dir", self.data,
                "--out", run, *extra]

    def copy_reference(self, name: str) -> Path:
        return Path(shutil.copytree(self.reference, self.fresh(name)))

    def trial(self, category: str, name: str, check) -> None:
        """Run `check()`: None when prunekit kept its promise, else what went wrong."""
        results = self.tally.setdefault(category, [])
        try:
            failure = check()
        except Exception as exc:  # noqa: BLE001  (a broken trial is a failure to report, not a crash)
            failure = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        results.append((name, failure))
        print(f"  {category} / {name}: {'clean' if failure is None else failure}", flush=True)

    def same_as_reference(self, run: Path) -> str | None:
        """None when `run` is sound and ends bit for bit as the reference run, else the difference."""
        import torch
        from safetensors.torch import load_file

        from prunekit.checkpoint import latest_checkpoint

        left = [p for p in run.rglob(".*") if p.name != ".lock"]
        if left:
            return f"temporaries left: {[str(p.relative_to(run)) for p in left]}"
        if latest_checkpoint(run).name != f"epoch-{EPOCHS:04d}":
            return f"latest is {latest_checkpoint(run).name}"
        final, expected = (load_file(r / "final" / "model.safetensors") for r in (run, self.reference))
        if final.keys() != expected.keys() or not all(torch.equal(final[k], expected[k]) for k in expected):
            return "final weights differ from the uninterrupted run's"
        if metrics(run) != metrics(self.reference):
            return "metrics differ from the uninterrupted run's"
        return None

    def spawn(self, args: list, fault: str = "", logs: Path | None = None, **env) -> subprocess.Popen:
        """`prunekit ARGS` in a child process with `fault` injected; its stderr goes to `logs`."""
        logs = logs or self.out / "logs" / f"{self.count:03d}.stderr"
        logs.parent.mkdir(parents=True, exist_ok=True)
        with open(logs, "w") as stderr:
            return subprocess.Popen([sys.executable, __file__, "child", fault, *map(str, args)],
                                    env={**os.environ, **CHILD_ENV, **env}, stdout=subprocess.DEVNULL, stderr=stderr)

    def table(self) -> str:
        lines = ["| category | tried | clean | failures |", "|---|---|---|---|"]
        for category, results in self.tally.items():
            failures = [f"{name}: {failure}" for name, failure in results if failure is not None]
            clean = len(results) - len(failures)
            lines.append(f"| {category} | {len(results)} | {clean} | {'; '.join(failures) or 'none'} |")
        return "\n".join(lines)


def cli(*args) -> tuple[int | str, list[str]]:
    """`prunekit ARGS` in this process: (exit status, stderr lines); an exception escaping is a traceback."""
    from prunekit.cli import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = main([str(a) for a in args])
    except BaseException as exc:  # noqa: BLE001  (what a user would see as a traceback)
        return f"traceback ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})", []
    return status, err.getvalue().splitlines()


def refused(result: tuple, *fragments) -> str | None:
    """None when the command exited 2 with one `prunekit ...: error:` line holding every fragment."""
    status, lines = result
    if status != 2 or len(lines) != 1 or not lines[0].startswith("prunekit ") or ": error: " not in lines[0]:
        return f"exit {status}, stderr {lines[:3]}"
    missing = [str(f) for f in fragments if str(f) not in lines[0]]
    return f"{lines[0]!r} does not name {missing}" if missing else None


def accepted_or_refused(result: tuple) -> str | None:
    """None for exit 0, or for a refusal in one line."""
    return None if result[0] == 0 else refused(result)


def metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in lines]


def files_of(directory: Path) -> dict:
    """Every file with its bytes (the lock aside: a refused writer may have held it)."""
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}


def untouched_after(directory: Path, command) -> tuple:
    """Run `command()`, and turn its result into a failure if any file under `directory` changed."""
    before = files_of(directory)
    status, lines = command()
    if files_of(directory) != before:
        return f"{status} (and it changed files under {directory.name})", lines
    return status, lines


def non_finite_files(run: Path) -> list[str]:
    """The weight and state files under `run` holding NaN or inf."""
    import torch
    from safetensors.torch import load_file

    from prunekit.checkpoint import non_finite

    bad = []
    for path in run.rglob("*.safetensors"):
        if non_finite(load_file(path)):
            bad.append(str(path.relative_to(run)))
    for path in run.rglob("state.pt"):
        tensors, stack = {}, [torch.load(path, map_location="cpu", weights_only=True)]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                tensors[str(len(tensors))] = item
            elif isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
        if non_finite(tensors):
            bad.append(str(path.relative_to(run)))
    return bad


# --- categories ------------------------------------------------------------------------------


def kills_during_training(c: Campaign, trials: int) -> None:
    for i in range(trials):
        delay = c.rng.uniform(0.0, 2.0)  # training takes about 2 s once config.json is written

        def check(delay=delay):
            run = c.fresh("killed")
            process = c.spawn(c.train_args(run))
            while not (run / "config.json").exists() and process.poll() is None:
                time.sleep(0.002)
            time.sleep(delay)
            process.kill()
            process.wait()
            status, lines = cli(*c.train_args(run), "--resume")
            return f"resume: exit {status} {lines}" if status != 0 else c.same_as_reference(run)

        c.trial("kill -9 during training", f"at {delay:.2f} s", check)


KILL_POINTS = ["kill-before-rename:config.json@1", "kill-before-rename:epoch-0001@1", "kill-before-rename:latest@1",
               "kill-before-rename:latest@2", "kill-before-rename:metrics.jsonl@2", "kill-before-rename:epoch-0003@1",
               "kill-before-rename:spec.json@1", "kill-before-rename:gates.json@1",
               "kill-before-rename:model.safetensors@1", "kill-mid-write:1", "kill-mid-write:3"]


def kills_inside_writes(c: Campaign) -> None:
    for fault in KILL_POINTS:
        def check(fault=fault):
            run = c.fresh("killed-writing")
            process = c.spawn(c.train_args(run), fault)
            if process.wait(timeout=300) != -signal.SIGKILL:
                return f"the fault never fired (exit {process.returncode})"
            status, lines = cli(*c.train_args(run), "--resume")
            return f"resume: exit {status} {lines}" if status != 0 else c.same_as_reference(run)

        c.trial("kill -9 inside checkpoint writes", fault.split(":", 1)[1], check)
    for fault in ("kill-before-rename:model.safetensors@1", "kill-before-rename:card.json@1"):
        def check(fault=fault):
            run = c.copy_reference("killed-exporting")
            process = c.spawn(["compress", run], fault)
            if process.wait(timeout=300) != -signal.SIGKILL:
                return f"the fault never fired (exit {process.returncode})"
            status, lines = cli("compress", run)
            if status != 0:
                return f"compress again: exit {status} {lines}"
            left = [p.name for p in (run / "compressed").iterdir() if p.name.startswith(".")]
            if left:
                return f"staging left behind: {left}"
            status, lines = cli("eval", run / "compressed", "--data-dir", c.data)
            return None if status == 0 else f"eval of the export: exit {status} {lines}"

        c.trial("kill -9 inside checkpoint writes", f"compress, {fault.split(':', 1)[1]}", check)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def poison_weights(path: Path) -> None:
    """One NaN written into a weights file, bypassing prunekit's own writer."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, path)


def replace_field(field: str, text: str):
    def damage(path: Path) -> None:
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, field: "PLACEHOLDER"}).replace('"PLACEHOLDER"', text))
    return damage


DAMAGES = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": truncate,
    "not UTF-8": lambda p: p.write_bytes(b"\xff\xfe" + p.read_bytes()),
    "random bytes": lambda p: p.write_bytes(random.Random(p.name).randbytes(200)),
    "nested 50000 deep": lambda p: p.write_text("[" * 50000 + "]" * 50000),
}
# (file in a copy of the reference run, damages, the command that must name it)
CORRUPTIONS = [
    ("config.json", ["empty", "truncated", "not UTF-8", "random bytes", "nested 50000 deep"], "resume"),
    ("config.json", ["empty", "not UTF-8"], "compress"),
    ("checkpoints/latest", ["empty", "not UTF-8", "random bytes", "names epoch-0009"], "resume"),
    ("checkpoints/epoch-0003/state.pt", ["empty", "truncated", "random bytes"], "resume"),
    ("checkpoints/epoch-0003/model.safetensors", ["empty", "truncated", "random bytes", "NaN weights"], "resume"),
    ("final/model.safetensors", ["truncated", "NaN weights"], "eval"),
    ("final/model.safetensors", ["truncated", "NaN weights"], "compress"),
    ("final/gates.json", ["empty", "not UTF-8", "threshold NaN", "threshold 'abc'", "blocks 'no'"], "eval"),
    ("final/spec.json", ["empty", "truncated", "nested 50000 deep"], "compress"),
    ("compressed/spec.json", ["empty", "truncated", "not UTF-8", "nested 50000 deep"], "eval export"),
    ("compressed/model.safetensors", ["empty", "truncated", "NaN weights"], "eval export"),
]
EXTRA_DAMAGES = {"NaN weights": poison_weights, "names epoch-0009": lambda p: p.write_text("epoch-0009\n"), "threshold NaN": replace_field("threshold", "NaN"),
                 "threshold 'abc'": replace_field("threshold", '"abc"'), "blocks 'no'": replace_field("blocks", '"no"')}


def corrupt_files(c: Campaign) -> None:
    for relative, damages, command in CORRUPTIONS:
        for damage in damages:
            def check(relative=relative, damage=damage, command=command):
                run = c.copy_reference("corrupt")
                if command == "eval export" and cli("compress", run)[0] != 0:
                    return "the reference run did not compress"
                target = run / relative
                {**DAMAGES, **EXTRA_DAMAGES}[damage](target)
                args = {"resume": [*c.train_args(run), "--resume"], "compress": ["compress", run],
                        "eval": ["eval", run, "--data-dir", c.data],
                        "eval export": ["eval", run / "compressed", "--data-dir", c.data]}[command]
                return refused(untouched_after(run, lambda: cli(*args)), target)

            c.trial("corrupt or truncated files", f"{relative} {damage} ({command})", check)
    for damage in ("truncated", "not gzip", "empty"):
        def check(damage=damage):
            data = Path(shutil.copytree(c.data, c.fresh("data")))
            target = data / "train-images-idx3-ubyte.gz"
            {"truncated": truncate, "not gzip": lambda p: p.write_bytes(b"not gzip"),
             "empty": lambda p: p.write_bytes(b"")}[damage](target)
            run = c.fresh("bad-data")
            result = refused(cli(*c.train_args(run), "--data-dir", data), target)
            return result or (f"{run.name} was created" if run.exists() else None)

        c.trial("corrupt or truncated files", f"dataset file {damage} (train)", check)


OPTION_TEXTS = ["0", "1", "-1", "2", "0.5", "1e30", "1e308", "-1e308", "nan", "inf", "", "abc", "999999", "9" * 30,
                "true", "{}", "[]", '{"0": 0.1}', '{"x": 1}', "[" * 3000, "\0", "\udcff", "sss", "epsilon-resnet",
                "cuda", "cuda:7", "cpu", "channels+blocks", "digits", "step", "../x.json"]
SLOW_OPTIONS = ("epochs", "compile")  # one epoch always; compiling takes a minute and checks nothing more


def random_text(rng: random.Random) -> str:
    return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 0x2FFF)])) for _ in range(rng.randrange(8)))


def random_recipe(rng: random.Random) -> bytes:
    """Random bytes, YAML-like noise, a repository recipe with one value replaced, or deep nesting."""
    import yaml

    from prunekit.config import Config

    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randrange(60))
    if kind == 1:
        return "".join(rng.choice("[]{}:,-!&*|>'\"#\n abe01.") for _ in range(rng.randrange(80))).encode()
    if kind == 2:
        recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
        recipe = yaml.safe_load(rng.choice(recipes).read_text())
        field = rng.choice([f for f in Config.__dataclass_fields__ if f not in SLOW_OPTIONS])
        recipe[field] = rng.choice([0, -1, 2**63, 1e300, float("nan"), "", "abc", None, [], {}, [[1]], {"a": 1}, True])
        return yaml.safe_dump(recipe).encode()
    depth = rng.choice([17, 500, 999, 1001, 20000, 100000])
    return ("lr_schedule: " + "[" * depth + "]" * depth).encode()


def bad_inputs(c: Campaign, options: int, recipes: int) -> None:
    from dataclasses import fields

    from prunekit.config import Config

    choices = [f for f in fields(Config) if f.name not in SLOW_OPTIONS]
    for _ in range(options):
        option = c.rng.choice(choices)
        flag = "--" + option.name.replace("_", "-")
        if "bool" in str(option.type):
            args = [c.rng.choice([flag, flag.replace("--", "--no-", 1)])]
        else:
            args = [flag, c.rng.choice(OPTION_TEXTS) if c.rng.random() < 0.7 else random_text(c.rng)]

        def check(args=args):
            run = c.fresh("option")
            result = cli(*c.train_args(run), *args, "--epochs", 1)
            if result[0] == 0:
                return None if (run / "final" / "model.safetensors").exists() else "exit 0 without a final model"
            return refused(result)

        c.trial("bad options and recipes", " ".join(map(repr, args))[:60], check)
    for i in range(recipes):
        document = random_recipe(c.rng)

        def check(document=document, i=i):
            recipe = c.out / "recipes" / f"{i:03d}.yaml"
            recipe.parent.mkdir(parents=True, exist_ok=True)
            recipe.write_bytes(document)
            return accepted_or_refused(cli(*c.train_args(c.fresh("recipe")), "--recipe", recipe, "--epochs", 1))

        c.trial("bad options and recipes", f"recipe {document[:24]!r}", check)


def mount(point: Path, size_kib: int, remount: bool = False) -> bool:
    point.mkdir(parents=True, exist_ok=True)
    options = f"{'remount,' if remount else ''}size={size_kib}k"
    command = ["mount", "-o", options, str(point)] if remount else ["mount", "-t", "tmpfs", "-o", options, "tmpfs",
                                                                    str(point)]
    return subprocess.run(command, capture_output=True).returncode == 0


DISK_SIZES_KIB = [4, 16, 40, 76, 100, 136, 160, 196, 216, 228]  # a 3-epoch run peaks at about 232 KiB


def full_disks(c: Campaign) -> None:
    from prunekit.checkpoint import latest_checkpoint, load_checkpoint

    point = c.out / "disk"
    if os.geteuid() != 0 or not mount(point, 4):
        c.tally["full disk (tmpfs)"] = []
        print("  full disk: skipped (mounting a small tmpfs needs root)")
        return
    subprocess.run(["umount", str(point)], check=True)
    for size in DISK_SIZES_KIB:
        def check(size=size):
            mount(point, size)
            try:
                run = point / "run"
                result = cli(*c.train_args(run))
                if result[0] == 0:
                    return f"a {size} KiB disk held the whole run"
                failure = refused(result)
                if failure:
                    return failure
                if run.exists() and latest_checkpoint(run):
                    load_checkpoint(latest_checkpoint(run))  # raises if the last checkpoint is unusable
                mount(point, 8192, remount=True)
                status, lines = cli(*c.train_args(run), "--resume")
                return f"resume: exit {status} {lines}" if status != 0 else c.same_as_reference(run)
            finally:
                subprocess.run(["umount", str(point)], check=True)

        c.trial("full disk (tmpfs)", f"train on {size} KiB", check)
    for command, size in (("compress", 16), ("report", 16)):
        def check(command=command, size=size):
            run = c.copy_reference("full-" + command)
            mount(point, size)
            try:
                args = (["compress", run, "--out", point / "export"] if command == "compress"
                        else ["report", run, "--out", point / "report"])
                failure = refused(untouched_after(run, lambda: cli(*args)))
                left = [p.name for p in point.rglob(".*")]
                return failure or (f"left {left}" if left else None)
            finally:
                subprocess.run(["umount", str(point)], check=True)

        c.trial("full disk (tmpfs)", f"{command} into {size} KiB", check)


EXPLODING_LR = ["--schedule", "piecewise", "--lr-schedule", '{"0": 0.05, "1": 1000}']
DIVERGENCES = {
    "LR 300, constant, 1 epoch": ["--lr", 300, "--schedule", "constant", "--epochs", 1],
    "LR 1000 from epoch 2": EXPLODING_LR,
    "LR 1000 from epoch 2, --on-nan skip": [*EXPLODING_LR, "--on-nan", "skip"],
    "weights ×39000 a step from epoch 2": [*EXPLODING_LR, "--weight-decay", 39],
    "weights ×39000 a step, --on-nan skip": [*EXPLODING_LR, "--weight-decay", 39, "--on-nan", "skip"],
    "LR 1000, --on-nan skip, 1 epoch": ["--lr", 1000, "--schedule", "constant", "--epochs", 1, "--on-nan", "skip"],
    "SSS penalty 1000": ["--method", "sss", "--penalty", 1000, "--schedule", "constant", "--epochs", 2],
    "slimming penalty 1e6": ["--method", "slimming", "--penalty", 1e6, "--epochs", 2],
    "binary gates, LR 1000": ["--method", "binary-gate", "--lr", 1000, "--schedule", "constant", "--epochs", 2],
}


def divergences(c: Campaign) -> None:
    for name, extra in DIVERGENCES.items():
        def check(extra=extra):
            run = c.fresh("diverged")
            result = cli(*c.train_args(run), *extra)
            failure = accepted_or_refused(result)
            bad = non_finite_files(run) if run.exists() else []
            if failure or bad:
                return failure or f"non-finite tensors written: {bad}"
            if result[0] == 0:
                for args in (["eval", run, "--data-dir", c.data], ["compress", run]):
                    failure = accepted_or_refused(cli(*args))
                    if failure:
                        return f"{args[0]}: {failure}"
                bad = non_finite_files(run)
                return f"non-finite tensors exported: {bad}" if bad else None
            return None

        c.trial("divergences", name, check)


def concurrent_starts(c: Campaign) -> None:
    for extra in ([], ["--resume"]):
        def check(extra=extra):
            run = c.fresh("concurrent")
            processes = [c.spawn([*c.train_args(run), *extra], logs=run.parent / f"{run.name}.{i}.stderr")
                         for i in range(2)]
            statuses = [p.wait(timeout=300) for p in processes]
            errors = [(run.parent / f"{run.name}.{i}.stderr").read_text().splitlines() for i in range(2)]
            for i, (status, lines) in enumerate(zip(statuses, errors)):
                other = processes[1 - i].pid  # a refusal names the writer, or finds its finished run
                named = len(lines) == 1 and (f"(PID {other})" in lines[0] or "already holds a run" in lines[0])
                if status not in (0, 2) or (status == 2 and not named):
                    return f"exit statuses {statuses}, stderr {errors}"
            return c.same_as_reference(run) if 0 in statuses else f"neither ran: {errors}"

        c.trial("concurrent starts", f"two at once{' with --resume' if extra else ''}", check)

    def stalled_writer():
        run, stalled = c.fresh("stalled"), c.out / "stalled"
        stalled.unlink(missing_ok=True)
        process = c.spawn(c.train_args(run), "stall-in-epoch:2", PRUNEKIT_STALLED=str(stalled))
        try:
            while not stalled.exists():
                if process.poll() is not None:
                    return f"the first writer ended (exit {process.returncode})"
                time.sleep(0.01)
            for extra in (["--resume"], ["--force"], []):
                failure = refused(untouched_after(run, lambda: cli(*c.train_args(run), *extra)),
                                  f"in use by another prunekit process (PID {process.pid})")
                if failure:
                    return f"{extra}: {failure}"
        finally:
            process.kill()
            process.wait()
        status, lines = cli(*c.train_args(run), "--resume")
        return f"resume: exit {status} {lines}" if status != 0 else c.same_as_reference(run)

    c.trial("concurrent starts", "three writers while one stalls", stalled_writer)


def main() -> None:
    if sys.argv[1:2] == ["child"]:
        sys.exit(child(sys.argv[2], sys.argv[3:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/faults")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=12, help="random kill -9 times during training")
    parser.add_argument("--options", type=int, default=300, help="random option values")
    parser.add_argument("--recipes", type=int, default=300, help="random recipe documents")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # as the children (OMP_NUM_THREADS=1): resumed runs then compute bit-identically
    start = time.perf_counter()
    c = Campaign(Path(args.out), args.seed)
    kills_during_training(c, args.kills)
    kills_inside_writes(c)
    corrupt_files(c)
    bad_inputs(c, args.options, args.recipes)
    full_disks(c)
    divergences(c)
    concurrent_starts(c)
    print()
    print(c.table())
    print(f"\n{sum(map(len, c.tally.values()))} trials in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
