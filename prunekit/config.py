"""Run configuration: one flat record, read from a YAML recipe and overridden from the command line."""
from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml


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
    # execution
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    channels_last: bool = False
    num_workers: int = 2
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
    # pipeline and retraining
    sparse_epochs: int = 3
    finetune_epochs: int = 5
    finetune_lr: float = 0.01

    def to_dict(self) -> dict:
        return asdict(self)


SCHEDULES = ("onecycle", "cosine", "step", "constant", "piecewise")
SSS_STRUCTURES = ("channels", "blocks", "groups")
CHOICES = {"schedule": SCHEDULES, "on_nan": ("stop", "skip"), "discard_rule": ("average", "weights"),
           "budget_rule": ("exact", "paper")}


def _field_types() -> dict[str, object]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def _check_type(value, hint, where: str):
    """Coerce ints to floats where a float is expected; reject anything else of the wrong type."""
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
                return _check_type(value, option, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        _, item = typing.get_args(hint)
        return {str(k): _check_type(v, item, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 2**1023:  # float() would raise OverflowError
            raise ConfigError(f"{where}: {value} is too large for a float")
        return float(value)
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return value


def make_config(values: dict, source: str = "config") -> Config:
    """Validate a mapping of options (unknown keys get a suggestion) and build a Config."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of options, got {type(values).__name__}")
    known = _field_types()
    checked = {}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
        checked[key] = _check_type(value, known[key], f"{source}: {key}")
        if key in CHOICES and checked[key] not in CHOICES[key]:
            raise ConfigError(f"{source}: {key} must be one of {CHOICES[key]}, got {checked[key]!r}")
    config = Config(**checked)
    structures = config.sss_structures.split("+")
    if not structures or any(s not in SSS_STRUCTURES for s in structures) or len(set(structures)) < len(structures):
        raise ConfigError(f"{source}: sss_structures must join {', '.join(SSS_STRUCTURES)} with '+' "
                          f"(e.g. channels+blocks), got {config.sss_structures!r}")
    stages = (config.stage_penalties, config.stage_epochs, config.stage_lrs)
    if any(stages) and not (len(config.stage_penalties) == len(config.stage_epochs) == len(config.stage_lrs) > 0
                            and all(e >= 1 and e == int(e) for e in config.stage_epochs)):
        raise ConfigError(f"{source}: stage_penalties, stage_epochs (whole epochs ≥ 1) and stage_lrs need one "
                          f"value per stage each, got {len(config.stage_penalties)}, {len(config.stage_epochs)} "
                          f"and {len(config.stage_lrs)}")
    if not 0 <= config.weight_average < 1:
        raise ConfigError(f"{source}: weight_average must be in [0, 1) (0: off; Ye et al.: 0.999), "
                          f"got {config.weight_average}")
    if config.extra_data and config.data != "svhn":
        raise ConfigError(f"{source}: extra_data: only SVHN has an extra split, not {config.data}")
    for key in ("epochs", "batch_size"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{source}: {key} must be at least 1, got {getattr(config, key)}")
    for key in ("lr", "weight_decay", "label_smoothing", "momentum"):
        if getattr(config, key) < 0:
            raise ConfigError(f"{source}: {key} must not be negative, got {getattr(config, key)}")
    return config


def load_recipe(path: str | Path) -> dict:
    """Read a YAML recipe with the safe loader (no object construction, ever)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read recipe ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of options, got {type(data).__name__}")
    return data


def resolve(recipe: str | Path | None, overrides: dict, defaults: dict | None = None) -> Config:
    """`defaults`, then the recipe's values, then command-line overrides (those not None) on top."""
    values = load_recipe(recipe) if recipe else {}
    source = str(recipe) if recipe else "options"
    make_config(values, source)
    values = {**(defaults or {}), **values, **{k: v for k, v in overrides.items() if v is not None}}
    return make_config(values, source)
