"""Run configuration: one flat record, read from a YAML recipe and overridden from the command line."""
from __future__ import annotations

import difflib
import json
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from .errors import MAX_NESTING, FileFormatError, check_nesting, one_line, utf8_text


class ConfigError(ValueError):
    """A recipe or option that cannot be used; the message names the file and field."""


@dataclass
class Config:
    """Everything a run needs. Defaults are the Fashion-MNIST ResNet-20 recipe."""

    # model and data
    model: str = "resnet20"
    data: str = "fashion-mnist"
    data_dir: str | None = None
    train_subset: int | None = None
    extra_data: bool = False
    val_split: int = 0
    pad: int | None = None
    flip: bool | None = None
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    milestones: list[float] = field(default_factory=list)
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    init: str | None = None
    weights: str | None = None
    teacher: str | None = None
    kd_weight: float = 1.0
    kd_temperature: float = 4.0
    rewind: int | None = None  # 0 or None: no rewinding
    # execution
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    channels_last: bool = True  # FM-R20 on this 2-core CPU: 366 vs 296 img/s dense, 444 vs 319 SSS
    num_workers: int | None = None
    compile: bool = False
    sync_bn: bool = False
    on_nan: str = "stop"
    # sparsity method
    method: str = "none"
    penalty: float | None = None
    gate_momentum: float = 0.9
    sss_structures: str = "channels+blocks"
    epsilon: float = 2.5
    epsilon_start_epoch: int = 0
    discard_rule: str = "average"
    discard_tolerance: float = 1e-4
    threshold: float = 0.5
    side_weight: float = 0.1
    lr_schedule: dict[str, float] | None = None
    lr_restart_schedule: dict[str, float] | None = None
    prune_percent: float | None = None
    gamma_rescale: float = 1.0
    weight_average: float = 0.0
    stage_penalties: list[float] = field(default_factory=list)
    stage_epochs: list[float] = field(default_factory=list)
    stage_lrs: list[float] = field(default_factory=list)
    # budget
    target_macs: float | None = None
    target_params: float | None = None
    target_epoch_fraction: float = 0.6
    budget_rule: str = "exact"
    budget_freeze: str = "target"  # freeze the dead set once the target is met, or only at the deadline
    budget_rank: str = "cost"  # exact rule: penalty and freeze rank weighted by each structure's cost, or not
    # kept widths are multiples of round_to (or the full width); None: decided when a run starts (with_round_to)
    round_to: int | None = None
    stream_channels: bool = False  # also prune residual-stream channels (channel methods; post-activation ResNets)
    # pipeline and retraining
    sparse_epochs: int = 3
    finetune_epochs: int = 5
    finetune_lr: float = 0.01

    def to_dict(self) -> dict:
        return asdict(self)


SCHEDULES = ("onecycle", "cosine", "step", "constant", "piecewise")
SSS_STRUCTURES = ("channels", "blocks", "groups")
METHODS = ("none", "sss", "binary-gate", "ista-bn", "slimming", "epsilon-resnet")  # = prunekit.methods.METHODS
DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "digits", "imagenet")  # = prunekit.data's
CHOICES = {"schedule": SCHEDULES, "on_nan": ("stop", "skip"), "discard_rule": ("average", "weights", "majority"),
           "budget_rule": ("exact", "paper"), "budget_freeze": ("target", "deadline"),
           "budget_rank": ("cost", "magnitude", "normalized"), "method": METHODS,
           "data": DATASETS}
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d{1,2})?")

MAX_EPOCHS = 100_000
MAX_SEED = 2**24  # loaders derive per-epoch and per-batch seeds (seed · 1000003² + ...) within torch's 64 bits
MAX_LR = 1e3  # 10⁴ × the recipes' largest (0.1); far larger rates overflow float32 arithmetic within a step
MAX_FACTOR = 1e6  # penalties, decays, ε and other multipliers: times MAX_LR, still far below float32's 3e38


@dataclass(frozen=True)
class Range:
    """The values a numeric option (or each item of a list or mapping option) may take."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        def show(x):
            return "∞" if x == math.inf else f"{x:g}" if isinstance(x, float) else str(x)
        closing = ")" if self.high_open or self.high == math.inf else "]"
        return f"{'(' if self.low_open else '['}{show(self.low)}, {show(self.high)}{closing}"


EPOCHS, LR, FACTOR, FRACTION = Range(1, MAX_EPOCHS), Range(0, MAX_LR), Range(0, MAX_FACTOR), Range(0, 1, high_open=True)
RANGES = {
    "train_subset": Range(1, math.inf), "val_split": Range(0, math.inf), "pad": Range(0, 64),
    "epochs": EPOCHS, "batch_size": Range(1, 65536), "lr": LR, "momentum": FRACTION, "weight_decay": FACTOR,
    "milestones": Range(0, MAX_EPOCHS), "lr_gamma": Range(0, 1, low_open=True), "warmup_epochs": Range(0, MAX_EPOCHS),
    "label_smoothing": FRACTION, "seed": Range(0, MAX_SEED, high_open=True), "num_workers": Range(0, 256),
    "penalty": FACTOR, "gate_momentum": FRACTION, "epsilon": FACTOR, "epsilon_start_epoch": Range(0, MAX_EPOCHS),
    "discard_tolerance": FACTOR, "threshold": Range(0, MAX_FACTOR, low_open=True), "side_weight": FACTOR,
    "lr_schedule": LR, "lr_restart_schedule": LR, "prune_percent": Range(0, 100),
    "gamma_rescale": Range(1 / MAX_FACTOR, MAX_FACTOR), "weight_average": FRACTION, "stage_penalties": FACTOR,
    "stage_epochs": EPOCHS, "stage_lrs": LR, "target_macs": Range(0, math.inf, low_open=True),
    "target_params": Range(0, math.inf, low_open=True), "target_epoch_fraction": Range(0, 1, low_open=True),
    "sparse_epochs": EPOCHS, "finetune_epochs": EPOCHS, "finetune_lr": LR, "kd_weight": FACTOR,
    "kd_temperature": Range(0, 1000, low_open=True), "rewind": Range(0, MAX_EPOCHS), "round_to": Range(1, 1024),
}
SCHEDULE_EPOCHS = Range(0, MAX_EPOCHS)  # the keys of lr_schedule and lr_restart_schedule


def _show(value) -> str:
    """A short repr: a recipe may hold megabytes or thousands of levels where a number belongs."""
    return reprlib.repr(value)


def _field_types() -> dict[str, object]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def check_type(value, hint, where: str):
    """`value` as type `hint` (ints become floats where floats are expected; floats must be finite,
    strings fit for file names); anything else is a ConfigError naming `where`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return check_type(value, option, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)
        return [check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        _, item = typing.get_args(hint)
        return {str(k): check_type(v, item, f"{where}.{_show(k)}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 2**1023:  # float() would raise OverflowError
            raise ConfigError(f"{where}: {_show(value)} is too large for a float")
        return float(value)
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {_show(value)}")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if hint is str and not _is_path_text(value):
        raise ConfigError(f"{where}: {_show(value)} holds a NUL or a character no file name can hold")
    return value


def _is_path_text(text: str) -> bool:
    """Whether a file name can hold `text` (no NUL; encodable for the file system)."""
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return "\0" not in text


def _check_range(key: str, value, where: str) -> None:
    """`value` (a number, or each item of a list or mapping) lies in RANGES[key]."""
    allowed = RANGES.get(key)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
    for item in items if allowed else ():
        if item is not None and item not in allowed:
            raise ConfigError(f"{where} must be in {allowed}, got {_show(item)}")
    if isinstance(value, dict):
        for epoch in value:
            try:
                number = float(epoch)
            except ValueError:
                number = math.nan
            if number not in SCHEDULE_EPOCHS:
                raise ConfigError(f"{where}: {_show(epoch)} is not an epoch number in {SCHEDULE_EPOCHS}")


def check_values(values, source: str) -> dict:
    """Each option on its own: a known key, of its type, within its range or choices. Returns the
    values with ints made floats where floats are expected."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of options, got {type(values).__name__}")
    known = _field_types()
    checked = {}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown key {_show(key)}{hint}")
        checked[key] = check_type(value, known[key], f"{source}: {key}")
        if key in CHOICES and checked[key] not in CHOICES[key]:
            raise ConfigError(f"{source}: {key} must be one of {CHOICES[key]}, got {_show(checked[key])}")
        _check_range(key, checked[key], f"{source}: {key}")
    if "device" in checked and not DEVICE.fullmatch(checked["device"]):
        raise ConfigError(f"{source}: device must be auto, cpu, mps, cuda or cuda:N, got {_show(checked['device'])}")
    if "model" in checked and not checked["model"]:
        raise ConfigError(f"{source}: model must name a zoo model or a spec .json file, got ''")
    return checked


def make_config(values: dict, source: str = "config") -> Config:
    """Validate a mapping of options (unknown keys get a suggestion) and build a Config."""
    config = Config(**check_values(values, source))
    structures = config.sss_structures.split("+")
    if not structures or any(s not in SSS_STRUCTURES for s in structures) or len(set(structures)) < len(structures):
        raise ConfigError(f"{source}: sss_structures must join {', '.join(SSS_STRUCTURES)} with '+' "
                          f"(e.g. channels+blocks), got {_show(config.sss_structures)}")
    stages = (config.stage_penalties, config.stage_epochs, config.stage_lrs)
    if any(stages) and not (len(config.stage_penalties) == len(config.stage_epochs) == len(config.stage_lrs) > 0
                            and all(e == int(e) for e in config.stage_epochs)):
        raise ConfigError(f"{source}: stage_penalties, stage_epochs (whole epochs ≥ 1) and stage_lrs need one "
                          f"value per stage each, got {len(config.stage_penalties)}, {len(config.stage_epochs)} "
                          f"and {len(config.stage_lrs)}")
    if config.stream_channels and config.method in ("none", "epsilon-resnet"):
        raise ConfigError(f"{source}: stream_channels: a channel method prunes the stream (sss, binary-gate, ista-bn, "
                          f"slimming), not {_show(config.method)}")
    if config.budget_rank != "cost" and (config.budget_rule == "paper"
                                         or config.method not in ("sss", "binary-gate", "ista-bn")):
        raise ConfigError(f"{source}: budget_rank: {config.budget_rank} applies to the exact rule's sss, binary-gate "
                          f"and ista-bn (slimming ranks by magnitude already, the paper rule by its own knob), not "
                          f"{_show(config.method)} with the {config.budget_rule} rule")
    if config.budget_rank == "normalized" and config.method == "sss" and config.sss_structures != "channels":
        raise ConfigError(f"{source}: budget_rank: normalized ranks channels within their layer; it needs "
                          f"sss_structures: channels, not {_show(config.sss_structures)} (a block or group is alone "
                          f"in its kind, so its normalized factor says nothing)")
    if config.extra_data and config.data != "svhn":
        raise ConfigError(f"{source}: extra_data: only SVHN has an extra split, not {_show(config.data)}")
    if config.nesterov and config.momentum == 0:
        raise ConfigError(f"{source}: nesterov needs a momentum above 0; give --no-nesterov (nesterov: false) "
                          f"for plain SGD")
    return config


SPARSE_ONLY = ("penalty", "stream_channels", "budget_rank")  # options that only a sparsity method reads


def dense_config(config: Config) -> Config:
    """`config` with no sparsity (dense baselines, fine-tuning, scratch runs): method none, no target, and the
    sparse-only options at their defaults, so that its record reads back as a valid config."""
    return replace(config, method="none", target_macs=None, target_params=None,
                   **{name: Config.__dataclass_fields__[name].default for name in SPARSE_ONLY})


def without_inert_options(values: dict) -> dict:
    """A recorded config less the sparse-only options of a run with method none: records written before
    `dense_config` (fine-tuning of a stream recipe) carried them, and they prune nothing there."""
    if values.get("method", "none") != "none":
        return values
    return {key: value for key, value in values.items() if key not in SPARSE_ONLY}


def comparable(values: dict) -> dict:
    """A config mapping as resuming compares it: every field present (a record from before a field existed ran
    with its default) and the options its method does not read left out."""
    return without_inert_options({**json.loads(json.dumps(Config().to_dict())), **values})


def with_round_to(config: Config, device_type: str, recorded: int | None = None) -> Config:
    """`config` with its width rounding decided: as given; else as the run being resumed recorded it; else 8 on a
    CUDA device (an H100 ran half-MACs networks 1.1-1.6× faster with widths at multiples of 8 than without:
    bench/README.md, "GPU figures") and 1 elsewhere (8 was 3-9% faster on this project's CPU, within its load)."""
    if config.round_to is not None:
        return config
    return replace(config, round_to=recorded if recorded is not None else 8 if device_type == "cuda" else 1)


def load_recipe(path: str | Path) -> dict:
    """Read a YAML recipe with the safe loader (no object construction, ever); libyaml's where installed,
    which is fast and refuses nesting deeper than 1000 levels by itself."""
    try:
        data = yaml.load(utf8_text(path), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        check_nesting(data)
    except FileFormatError as exc:
        raise ConfigError(f"{path}: not a readable recipe (the file {exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({one_line(exc, 300)})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not a readable recipe (the file is nested more than {MAX_NESTING} levels "
                          f"deep)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of options, got {type(data).__name__}")
    return data


def resolve(recipe: str | Path | None, overrides: dict, defaults: dict | None = None) -> Config:
    """`defaults`, then the recipe's values, then command-line overrides (those not None) on top. Each
    value is checked where it was given (the recipe's file or "options"), their combination last."""
    values = check_values(load_recipe(recipe), str(recipe)) if recipe else {}
    given = check_values({k: v for k, v in overrides.items() if v is not None}, "options")
    return make_config({**(defaults or {}), **values, **given}, f"{recipe} with the options" if recipe else "options")
