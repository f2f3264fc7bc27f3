"""Retraining protocols for a pruned architecture: fine-tune, scratch-E, scratch-B, multi-stage ISTA.

Scratch-E and scratch-B are the baselines of Liu et al. (ICLR 2019, "Rethinking the value of network
pruning"): train the pruned spec from a fresh initialization for the original epochs (E) or for the
original compute, epochs × FLOPs_base / FLOPs_pruned (B). Multi-stage training is Ye et al.'s (ICLR 2018)
warm-up → sparsify → fine-tune procedure, each stage compressed and exported as a numbered version.

Scratch-B arithmetic: epochs become R(epochs·ratio) and each LR stage (the span between consecutive
decays) R(span·ratio), with R truncation. With the MAC ratios of SSS's pruned ResNet-50s (spec_cost
at 224², 1.178 / 1.451 / 1.796) this gives the seed's whole table, 100 [30, 60, 90] → 117 [35, 70, 105],
145 [43, 86, 129], 179 [53, 106, 159]; rounding half up would not (ResNet-41: 118 epochs).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from . import spec as specs
from .checkpoint import atomic_write_json
from .compress import compress_run, load
from .config import Config, ConfigError, dense_config
from .distributed import DistContext, init_distributed, pick_device, wait_for_all
from .engine import Trainer
from .measure import spec_cost
from .runner import input_size, make_loaders, model_spec, train
from .schedule import LRPolicy

DEFAULT_DECAY_FRACTIONS = (0.5, 0.75)  # the rethinking CIFAR code: decays at 50% and 75% of the epochs
ROUNDINGS = {"int": math.floor, "round": lambda x: math.floor(x + 0.5)}


def scratch_b_schedule(epochs: int, milestones: list[float] | None, ratio: float, *, rounding: str = "int",
                       cap: int | None = None, cap_step: int | None = None) -> tuple[int, list[int]]:
    """Scratch-B (epochs, decays) for the compute of `epochs` at `ratio` = FLOPs_base / FLOPs_pruned.

    Each LR stage stretches by `ratio`, truncated ("int") or rounded half up ("round"); with
    `milestones=None` the decays fall at 50% and 75% of the new epochs (the rethinking CIFAR rule).
    A budget of at least `cap` epochs (ImageNet: 180) trains `cap`, decaying every `cap_step` (60)
    or, without a step, at the decays scaled to fit `cap`.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {tuple(ROUNDINGS)}, got {rounding!r}")
    if ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    to_int = ROUNDINGS[rounding]
    if cap is not None and epochs * ratio >= cap:
        if cap_step is not None:
            return cap, list(range(cap_step, cap, cap_step))
        return scratch_b_schedule(epochs, milestones, cap / epochs, rounding=rounding)
    new_epochs = to_int(epochs * ratio)
    if milestones is None:
        return new_epochs, [to_int(new_epochs * f) for f in DEFAULT_DECAY_FRACTIONS]
    scaled, previous, total = [], 0.0, 0
    for milestone in sorted(milestones):
        total += to_int((milestone - previous) * ratio)
        scaled.append(total)
        previous = milestone
    return new_epochs, scaled


def finetune_config(config: Config) -> Config:
    """Fine-tuning: no sparsity, the fine-tune epochs, and either cosine decay from the fine-tune LR or, with
    `rewind`, LR rewinding: the last fine-tune epochs of the original schedule and LR over `rewind` epochs."""
    retrain = dataclasses.replace(dense_config(config), epochs=config.finetune_epochs)
    if config.rewind:
        return retrain
    return dataclasses.replace(retrain, lr=config.finetune_lr, schedule="cosine", warmup_epochs=0.0)


def _keeps_step_schedule(config: Config) -> bool:
    """Scratch runs follow the original schedule: step decays when it had them, else its own shape."""
    return config.schedule == "step" or bool(config.milestones)


def scratch_e_config(config: Config) -> Config:
    """Scratch-E: a dense run of the original length and schedule (step decays at 50%/75% if none given),
    from its start (no rewinding)."""
    dense = dataclasses.replace(dense_config(config), rewind=None)
    if not _keeps_step_schedule(config):
        return dense
    milestones = config.milestones or [float(math.floor(config.epochs * f)) for f in DEFAULT_DECAY_FRACTIONS]
    return dataclasses.replace(dense, schedule="step", milestones=list(milestones))


def scratch_b_config(config: Config, ratio: float, *, rounding: str = "int", cap: int | None = None,
                     cap_step: int | None = None) -> Config:
    """Scratch-B: scratch-E with epochs (and step decays) stretched by `ratio` (see `scratch_b_schedule`);
    a one-cycle or cosine schedule keeps its shape over the longer run."""
    epochs, milestones = scratch_b_schedule(config.epochs, config.milestones or None, ratio,
                                            rounding=rounding, cap=cap, cap_step=cap_step)
    if not _keeps_step_schedule(config):
        return dataclasses.replace(scratch_e_config(config), epochs=epochs)
    return dataclasses.replace(scratch_e_config(config), schedule="step", epochs=epochs,
                               milestones=[float(m) for m in milestones])


def _spec_path(pruned: str | Path) -> Path:
    """The spec file of a compressed export directory, or `pruned` itself when it is a spec file."""
    path = Path(pruned)
    return (path / "spec.json" if path.is_dir() else path).resolve()


def finetune(compressed_dir: str | Path, config: Config, out: str | Path, *, resume: bool = False,
             force: bool = False, log=None) -> dict:
    """Fine-tune an exported compressed model from its weights (the `finetune_config` of `config`)."""
    tuned = dataclasses.replace(finetune_config(config), model=str(_spec_path(compressed_dir)))
    weights = load(compressed_dir).state_dict()
    return train(tuned, out, resume=resume, force=force, initial_weights=weights, log=log)


def macs_ratio(base: specs.Spec, pruned: specs.Spec, config: Config) -> float:
    """MACs of `base` over MACs of `pruned` at the dataset's input size: scratch-B's budget factor."""
    hw = input_size(config)[1:]
    return spec_cost(base, hw).macs / spec_cost(pruned, hw).macs


def scratch(pruned: str | Path, config: Config, out: str | Path, *, budget: str = "E",
            base_spec: specs.Spec | None = None, resume: bool = False, force: bool = False, log=None) -> dict:
    """Train a pruned spec (export directory or spec file) from scratch, scratch-E or scratch-B budget.

    For B the ratio is MACs(base) / MACs(pruned), base being `config.model` unless `base_spec` is given.
    """
    path = _spec_path(pruned)
    if budget == "E":
        run_config = scratch_e_config(config)
    elif budget == "B":
        ratio = macs_ratio(base_spec or model_spec(config), specs.load(path), config)
        run_config = scratch_b_config(config, ratio)
    else:
        raise ValueError(f"budget must be 'E' or 'B', got {budget!r}")
    return train(dataclasses.replace(run_config, model=str(path)), out, resume=resume, force=force, log=log)


def evaluate_accuracy(model: torch.nn.Module, config: Config) -> float:
    """Top-1 accuracy of `model` on the test split of `config.data`."""
    ctx = DistContext(device=pick_device(config.device))
    _, loaders = make_loaders(config, ctx)
    evaluator = Trainer(model, [], LRPolicy(0.0, 1), None, loaders, epochs=0, ctx=ctx)
    return evaluator.evaluate(loaders["test"])["acc"]


def export_accuracy(export_dir: str | Path, config: Config) -> float:
    """Top-1 accuracy of an exported model on the test split of `config.data`."""
    return evaluate_accuracy(load(export_dir), config)


def multi_stage(config: Config, out: str | Path, *, resume: bool = False, force: bool = False, log=None) -> dict:
    """Ye et al.'s multi-stage procedure: stage i trains `config.method` with ρ = stage_penalties[i] for
    stage_epochs[i] epochs at LR stage_lrs[i] (ρ = 0: plain fine-tuning) in out/stage-i, from the previous
    stage's compressed export, and is compressed into out/version-i. Returns params, MACs and test
    accuracy per version (also written to out/summary.json; empty on the other ranks under torchrun)."""
    out = Path(out)
    if not config.stage_penalties:
        raise ConfigError("stage_penalties: a multi-stage run needs stage_penalties, stage_epochs and stage_lrs")
    summary, stage_config, weights = {}, config, None
    ctx = init_distributed(config.device)
    stages = zip(config.stage_penalties, config.stage_epochs, config.stage_lrs)
    for number, (penalty, epochs, lr) in enumerate(stages, start=1):
        stage_config = dataclasses.replace(stage_config, penalty=penalty, epochs=int(epochs), lr=lr, rewind=None,
                                           stage_penalties=[], stage_epochs=[], stage_lrs=[])  # each its own LR
        run_dir, version = out / f"stage-{number}", out / f"version-{number}"
        train(stage_config, run_dir, resume=resume, force=force, initial_weights=weights, log=log)
        if ctx.is_main:  # under torchrun one rank compresses; every rank trains the next stage from its export
            card = compress_run(run_dir, version)
            summary[version.name] = {"penalty": penalty, "params": card["params_after"],
                                     "macs": card["macs_after"], "test_acc": export_accuracy(version, stage_config)}
        wait_for_all(ctx)
        # The next stage starts from this export; γ was already rescaled (if asked) in stage 1.
        stage_config = dataclasses.replace(stage_config, model=str(_spec_path(version)), gamma_rescale=1.0, init=None)
        weights = load(version).state_dict()
    if ctx.is_main:
        atomic_write_json(out / "summary.json", summary)
    return summary
