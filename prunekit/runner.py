"""From a Config to a finished run directory: data, model, method, trainer, final artifacts.

Run directory layout:
    .lock              held (flock) by the one process writing the run; holds its PID
    config.json        resolved configuration, versions, git revision
    metrics.jsonl      one JSON object per epoch
    checkpoints/       epoch-NNNN/{model.safetensors,state.pt} and `latest` (resume point)
    final/             spec.json, gates.json, model.safetensors: the trained (gated) model
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import pickle
import platform
import shutil
import subprocess
import typing
from dataclasses import asdict
from pathlib import Path

import torch

from . import spec as specs
from .budget import budget_callbacks
from .checkpoint import atomic_write_json, load_weights, remove_partial_writes, save_weights
from .config import (Config, ConfigError, check_type, comparable, make_config, with_round_to,
                     without_inert_options)
from .data import DATASET_STATS, BatchLoader, DataError, dataset_info, load_dataset, make_loader, split_validation
from .distributed import DistContext, init_distributed, wait_for_all
from .engine import Trainer
from .errors import FileFormatError, one_line, read_json
from .gates import GateConfig
from .methods import Distillation, build_method, gate_config, side_head_position
from .models import CLASSIFIERS, build, zoo_spec
from .schedule import make_policy


LOCK = ".lock"
ARTIFACTS = ("final", "compressed", "checkpoints", "metrics.jsonl", "config.json")  # what --force clears


class RunDirError(RuntimeError):
    """The output directory holds something else; the message says how to proceed."""


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold DIR/.lock, an exclusive flock with the holder's PID in it, while writing into DIR: a second
    writer is refused, naming that PID. The kernel releases the lock when its holder exits, even killed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirError(f"{run_dir}: in use by another prunekit process (PID {holder}); wait for it to end "
                          f"or stop it") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def main_rank_lock(run_dir: Path, ctx: DistContext):
    """`run_lock` held by the process that writes: the main rank (under torchrun the others write nothing)."""
    return run_lock(run_dir) if ctx.is_main else contextlib.nullcontext()


def check_device(preference: str) -> None:
    """Refuse a device this machine does not have, before anything is built on it."""
    kind, _, index = preference.partition(":")
    if kind == "cuda" and int(index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device: {preference} asked for, but this machine has {torch.cuda.device_count()} "
                          f"CUDA GPUs")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device: mps asked for, but this machine has no Apple GPU")


TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                      "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2", "mobilenet_v2")


def read_state_dict(path: str | Path, num_classes: int) -> dict:
    """A state_dict file (.pth/.pt with weights_only=True, or .safetensors), e.g. torchvision's weights; a
    classifier (`fc`, MobileNetV2's `classifier.1`) for another class count is left out, so the run's head
    starts fresh for its own data."""
    path = Path(path)
    try:
        weights = (load_weights(path) if path.suffix == ".safetensors"
                   else torch.load(path, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"{path}: not a readable state_dict ({one_line(exc, 200)})") from None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ConfigError(f"{path}: not a state_dict (a mapping of names to tensors)")
    for head in CLASSIFIERS:
        weight = weights.get(f"{head}.weight")
        if weight is not None and weight.shape[0] != num_classes:
            weights = {k: v for k, v in weights.items() if not k.startswith(f"{head}.")}
    return weights


def model_spec(config: Config) -> specs.Spec:
    """The spec named by `config.model`: a zoo name or a spec JSON file, fitted to the dataset (an image
    folder's class count is its class folders')."""
    info = dataset_info(config.data, config.data_dir)
    if config.model.startswith("torchvision:"):
        name = config.model.split(":", 1)[1]
        if name not in TORCHVISION_MODELS:
            raise ConfigError(f"model: {config.model!r}: torchvision models prunekit imports are "
                              f"{', '.join('torchvision:' + n for n in TORCHVISION_MODELS)}")
        spec = zoo_spec(name, num_classes=info["num_classes"], in_channels=info["in_channels"])
    elif config.model.endswith(".json"):
        spec = specs.load(config.model)
        if spec.in_channels != info["in_channels"] or spec.num_classes != info["num_classes"]:
            raise ConfigError(f"{config.model}: spec has {spec.in_channels} input channels and {spec.num_classes} "
                              f"classes; {config.data} needs {info['in_channels']} and {info['num_classes']}")
    else:
        spec = zoo_spec(config.model, num_classes=info["num_classes"], in_channels=info["in_channels"])
    try:
        specs.check_input_size(spec, info["image_size"])
    except specs.SpecError as exc:
        raise specs.SpecError(f"{config.model} on {config.data}: {exc}") from None
    return spec


def input_size(config: Config) -> tuple[int, int, int]:
    info = dataset_info(config.data)
    return (info["in_channels"], info["image_size"], info["image_size"])


def default_augmentation(config: Config) -> tuple[int, bool]:
    """Pad-and-crop and flip unless the recipe says otherwise (no flips for digits or SVHN)."""
    small = dataset_info(config.data)["image_size"]
    pad = config.pad if config.pad is not None else (4 if small >= 32 else 2 if small >= 28 else 0)
    flip = config.flip if config.flip is not None else config.data not in ("digits", "svhn", "mnist")
    return pad, flip


def loader_workers() -> int:
    """Image-folder loader processes by default: every core this process may use but one, at most 16."""
    return max(1, min(len(os.sched_getaffinity(0)) - 1, 16))


def make_loaders(config: Config, ctx: DistContext):
    """Training loader and evaluation loaders ({'test': ..., 'val': ...})."""
    pad, flip = default_augmentation(config)
    common = {"device": ctx.device, "seed": config.seed, "rank": ctx.rank, "world_size": ctx.world_size,
              "channels_last": config.channels_last}
    if config.data == "imagenet":
        workers = config.num_workers if config.num_workers is not None else loader_workers()
        if ctx.device.type == "cuda":  # JPEGs decoded and augmented on the GPU (prunekit.jpeg)
            from .jpeg import DeviceJpegLoader as folder_loader
        else:
            folder_loader = functools.partial(make_loader, "imagenet")
        train = folder_loader(config.data_dir, "train", config.batch_size, train=True, subset=config.train_subset,
                              num_workers=workers, **common)
        test = folder_loader(config.data_dir, "val", config.batch_size, train=False, num_workers=workers, **common)
        return train, {"test": test}
    mean, std = DATASET_STATS[config.data]
    train_set = load_dataset(config.data, config.data_dir, "train")
    if config.extra_data:
        train_set = train_set.concat(load_dataset(config.data, config.data_dir, "extra"))
    if config.train_subset:
        train_set = train_set.subset(min(config.train_subset, len(train_set)))
    loaders = {}
    if config.val_split >= len(train_set):
        raise ConfigError(f"val_split: {config.val_split} would leave no training images (the training set has "
                          f"{len(train_set)})")
    if config.val_split:
        train_set, val_set = split_validation(train_set, config.val_split, config.seed)
        loaders["val"] = BatchLoader(val_set, config.batch_size, train=False, mean=mean, std=std, **common)
    test_set = load_dataset(config.data, config.data_dir, "test")
    loaders["test"] = BatchLoader(test_set, config.batch_size, train=False, mean=mean, std=std, **common)
    train = BatchLoader(train_set, config.batch_size, train=True, mean=mean, std=std, pad=pad, flip=flip, **common)
    return train, loaders


def real_batch(config: Config, size: int = 32) -> torch.Tensor | None:
    """The first `size` test images of the run's data, normalised as in training (for compression's
    equivalence check), or None when the data cannot be read here."""
    try:
        _, loaders = make_loaders(dataclasses.replace(config, batch_size=size, val_split=0), DistContext())
    except (DataError, ConfigError, OSError):
        return None
    return next(iter(loaders["test"]))[0]


def environment() -> dict:
    """Versions and git revision recorded with every run, for reproducibility."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {"python": platform.python_version(), "torch": torch.__version__, "git_revision": rev,
            "threads": torch.get_num_threads()}


def recorded_config(run_dir: Path) -> dict:
    """The configuration a run directory's config.json records (a mapping, not yet validated)."""
    record = run_dir / "config.json"
    try:
        data = read_json(record)
    except FileFormatError as exc:
        raise RunDirError(f"{record}: not the record of a run (the file {exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise RunDirError(f"{record}: holds no run configuration (a mapping with a 'config' mapping)")
    return without_inert_options(data["config"])


def resumed_round_to(run_dir: Path) -> int | None:
    """The width rounding the run in `run_dir` recorded, so that it resumes with it on any device (None if
    there is no readable record: `prepare_run_dir` says why)."""
    try:
        return recorded_config(run_dir).get("round_to") if (run_dir / "config.json").exists() else None
    except RunDirError:
        return None


def source_config(path: str | Path) -> Config | None:
    """The configuration of the run a saved model came from: PATH's config.json, the run's holding a
    final/ or compressed/ folder, or the run an export's card.json names as its source; None where
    nothing records it."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    runs = [directory]
    try:
        card = read_json(directory / "card.json") if (directory / "card.json").is_file() else None
    except FileFormatError:
        card = None
    if isinstance(card, dict) and isinstance(card.get("source"), str):
        runs.append(Path(card["source"]))
    if directory.name in ("final", "compressed"):
        runs.append(directory.parent)
    for run in runs:
        if (run / "config.json").is_file():
            return make_config(recorded_config(run), str(run / "config.json"))
    return None


def prepare_run_dir(run_dir: Path, config: Config, *, resume: bool, force: bool,
                    ctx: DistContext = DistContext()) -> None:
    """Refuse to mix two runs in one directory unless resuming the same one; `force` (without `resume`)
    clears the old run's artifacts first. Resuming the same run leaves its record as it was written.
    Under torchrun every rank checks the directory before the main one writes it, so all decide alike."""
    record = run_dir / "config.json"
    same_run = False
    if record.exists() and not force:
        if not resume:
            raise RunDirError(f"{run_dir}: already holds a run; use --resume to continue it or --force to overwrite")
        try:
            previous = recorded_config(run_dir)
        except RunDirError as exc:
            raise RunDirError(f"{exc}; use --force to start the run over") from None
        if comparable(previous) != comparable(json.loads(json.dumps(config.to_dict()))):
            raise RunDirError(f"{run_dir}: holds a run with a different configuration; use --force to overwrite")
        same_run = True
    wait_for_all(ctx)
    if not ctx.is_main:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    if force and not resume:
        for name in ARTIFACTS:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    if resume:
        remove_partial_writes(run_dir)
    if not same_run:
        atomic_write_json(record, {"config": config.to_dict(), "environment": environment()})


def save_final(directory: Path, spec: specs.Spec, gates: GateConfig, model: torch.nn.Module) -> None:
    """The trained model as spec + gate configuration + safetensors weights."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / "spec.json", specs.to_dict(spec))
    atomic_write_json(directory / "gates.json", asdict(gates))
    save_weights(model.state_dict(), directory / "model.safetensors")


def load_final(directory: Path) -> tuple[specs.Spec, GateConfig, dict, tuple[int, int] | None]:
    """(spec, gates, weights, side head position) of a saved gated model."""
    spec = specs.load(directory / "spec.json")
    gates = load_gates(directory / "gates.json")
    weights = load_weights(directory / "model.safetensors")
    side = side_head_position(spec) if any(k.startswith("side_head.") for k in weights) else None
    return spec, gates, weights, side


def load_gates(path: Path) -> GateConfig:
    """A gates.json file, each field of its type (`"blocks": "no"` is not true, a threshold a finite number)."""
    try:
        data = read_json(path)
    except FileFormatError as exc:
        raise ConfigError(f"{path}: not a gate configuration (the file {exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of gate fields, got {type(data).__name__}")
    hints = typing.get_type_hints(GateConfig)
    unknown = sorted(str(k) for k in set(data) - set(hints))
    if unknown:
        raise ConfigError(f"{path}: unknown field {unknown[0][:40]!r} (allowed: {', '.join(hints)})")
    values = {key: check_type(value, hints[key], f"{path}: {key}") for key, value in data.items()}
    try:
        return GateConfig(**values)
    except ValueError as exc:
        raise ConfigError(f"{path}: {one_line(exc, 200)}") from None


def load_into(model: torch.nn.Module, weights: dict, optional: tuple[str, ...] = ()) -> None:
    """Load plain weights into a possibly gated model: only gate (stream gates too) and side-head entries, and
    those whose names start with `optional` (e.g. a classifier left out for another class count), may be missing."""
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:
        raise ConfigError(f"initial weights do not fit the model ({one_line(exc, 200)})") from None
    missing = [k for k in missing if ".gate" not in k and not k.startswith(("side_head.", "stream_gates.", *optional))]
    if missing or unexpected:
        raise ConfigError(f"initial weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def train(config: Config, run_dir: str | Path, *, resume: bool = False, force: bool = False,
          spec: specs.Spec | None = None, initial_weights: dict | None = None, log=None) -> dict:
    """Sparse- or dense-train `config` into `run_dir`; returns the final metrics and paths. Everything is
    checked before the run directory is touched, which one process at a time writes (`run_lock`)."""
    check_device(config.device)
    ctx = init_distributed(config.device)
    run_dir = Path(run_dir)
    config = with_round_to(config, ctx.device.type, resumed_round_to(run_dir) if resume else None)
    torch.manual_seed(config.seed)
    spec = spec or model_spec(config)
    if config.stream_channels and not (isinstance(spec, specs.ResNetSpec) and not spec.preact):
        raise ConfigError(f"stream_channels: {config.model} has no residual stream that can be pruned here (only "
                          f"post-activation ResNets)")
    gates = gate_config(config.method, config)
    side = side_head_position(spec) if config.method == "epsilon-resnet" else None
    model = build(spec, gates, side)
    budget = budget_callbacks(model, spec, config, input_size(config))  # refuses impossible targets up front
    if initial_weights is None and config.init:
        from .compress import load_any

        initial_weights = load_any(config.init)[0].state_dict()
    if initial_weights is None and config.weights:
        initial_weights = read_state_dict(config.weights, spec.num_classes)
    if initial_weights is not None:
        load_into(model, initial_weights, optional=tuple(f"{head}." for head in CLASSIFIERS) if config.weights else ())
    if config.sync_bn and ctx.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    teacher = None
    if config.teacher:
        from .compress import load_any

        teacher = Distillation(load_any(config.teacher)[0], config.kd_weight, config.kd_temperature)
    train_loader, eval_loaders = make_loaders(config, ctx)  # bad data is refused before the run directory is touched
    with main_rank_lock(run_dir, ctx):
        prepare_run_dir(run_dir, config, resume=resume, force=force, ctx=ctx)
        parts = build_method(model, config, input_size(config))
        parts.callbacks.extend(budget + ([teacher] if teacher else []))
        # rewinding retrains given weights; a run from scratch starts its schedule at the beginning and keeps
        # `rewind` in its config for retraining its exports (a recipe's retraining protocol)
        policy = make_policy(config if initial_weights is not None else dataclasses.replace(config, rewind=None))
        trainer = Trainer(model, parts.optimizers, policy, train_loader, eval_loaders,
                          epochs=config.epochs, run_dir=run_dir, callbacks=parts.callbacks, ctx=ctx,
                          amp=config.amp, channels_last=config.channels_last,
                          label_smoothing=config.label_smoothing, on_nan=config.on_nan, log=log,
                          compile=config.compile)
        if ctx.enabled and ctx.is_main:
            trainer.log(f"global batch {config.batch_size * ctx.world_size} ({ctx.world_size} processes × "
                        f"--batch-size {config.batch_size})")
        history = trainer.fit(resume=resume)
        if ctx.is_main:
            save_final(run_dir / "final", spec, gates, trainer.model)
        wait_for_all(ctx)  # every rank returns with final/ written, for the stage that reads it next
    return {"history": history, "spec": spec, "gates": gates, "model": trainer.model, "run_dir": run_dir}
