"""Learning-rate policies: a function of fractional epoch that may react to training events.

The trainer asks `lr_at(epoch + step / steps_per_epoch)` before every step and reports each epoch's
metrics to `on_epoch_end`, so a policy such as ε-ResNet's adaptive restart can change course.
"""
from __future__ import annotations

import dataclasses
import math

from .config import ConfigError


class LRPolicy:
    """Base policy: a fixed learning-rate curve that ignores events."""

    def __init__(self, base_lr: float, epochs: int, warmup_epochs: float = 0.0):
        self.base_lr, self.epochs, self.warmup_epochs = base_lr, epochs, warmup_epochs

    def lr_at(self, epoch: float) -> float:
        if epoch < self.warmup_epochs:
            return self.base_lr * (epoch + 1e-3) / self.warmup_epochs
        return self.curve(epoch)

    def curve(self, epoch: float) -> float:
        return self.base_lr

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        """React to the metrics of the epoch that just ended (0-based)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved."""


class StepPolicy(LRPolicy):
    """Multiply by `gamma` at each milestone epoch (after warm-up)."""

    def __init__(self, base_lr, epochs, milestones, gamma=0.1, warmup_epochs=0.0):
        super().__init__(base_lr, epochs, warmup_epochs)
        self.milestones, self.gamma = sorted(milestones), gamma

    def curve(self, epoch):
        return self.base_lr * self.gamma ** sum(epoch >= m for m in self.milestones)


class CosinePolicy(LRPolicy):
    """Cosine annealing from the base rate to zero over the run, after a linear warm-up."""

    def curve(self, epoch):
        span = max(self.epochs - self.warmup_epochs, 1e-9)
        return 0.5 * self.base_lr * (1 + math.cos(math.pi * min((epoch - self.warmup_epochs) / span, 1.0)))


class OneCyclePolicy(LRPolicy):
    """One-cycle (Smith 2018): cosine rise from lr/25 to lr over the first 30%, cosine fall to lr/1e4."""

    start_div, final_div, rise = 25.0, 1e4, 0.3

    def curve(self, epoch):
        t = min(epoch / self.epochs, 1.0)
        low, high, end = self.base_lr / self.start_div, self.base_lr, self.base_lr / self.final_div
        if t < self.rise:
            return low + (high - low) * 0.5 * (1 - math.cos(math.pi * t / self.rise))
        return end + (high - end) * 0.5 * (1 + math.cos(math.pi * (t - self.rise) / (1 - self.rise)))


def _piecewise(schedule: dict[float, float], epoch: float) -> float:
    lr = None
    for start in sorted(schedule):
        if epoch >= start:
            lr = schedule[start]
    return lr if lr is not None else schedule[min(schedule)]


class AdaptiveRestartPolicy(LRPolicy):
    """ε-ResNet's LearningRateSetter: follow `schedule` ({epoch: lr}) until the watched count (discarded
    blocks) rises over an epoch; then restart at `restart_schedule` shifted to start at the next epoch."""

    def __init__(self, schedule: dict, restart_schedule: dict | None, epochs: int, watch: str = "discarded_blocks"):
        schedule = {float(k): float(v) for k, v in schedule.items()}
        super().__init__(schedule[min(schedule)], epochs)
        self.schedule = schedule
        self.restart_schedule = {float(k): float(v) for k, v in (restart_schedule or schedule).items()}
        self.watch = watch
        self.restarted_at: float | None = None
        self.last_count: float | None = None
        self.restarts: list[int] = []

    def curve(self, epoch):
        if self.restarted_at is None:
            return _piecewise(self.schedule, epoch)
        return _piecewise(self.restart_schedule, epoch - self.restarted_at)

    def on_epoch_end(self, epoch, metrics):
        count = metrics.get(self.watch)
        if count is None:
            return
        if self.last_count is not None and count - self.last_count >= 1:
            self.restarted_at = float(epoch + 1)
            self.restarts.append(epoch + 1)
        self.last_count = count

    def state_dict(self):
        return {"restarted_at": self.restarted_at, "last_count": self.last_count, "restarts": list(self.restarts)}

    def load_state_dict(self, state):
        self.restarted_at, self.last_count = state["restarted_at"], state["last_count"]
        self.restarts = list(state["restarts"])


class RewoundPolicy(LRPolicy):
    """Learning-rate rewinding (Renda et al., ICLR 2020): retrain for `epochs` epochs on the last `epochs`
    of the original run's schedule (`original`, over its own epochs), not a small constant LR."""

    def __init__(self, original: LRPolicy, epochs: int):
        super().__init__(original.base_lr, epochs)
        self.original, self.offset = original, original.epochs - epochs

    def lr_at(self, epoch: float) -> float:
        return self.original.lr_at(self.offset + epoch)


def make_policy(config) -> LRPolicy:
    """The policy a Config asks for; with `config.rewind`, the last `epochs` of that schedule over `rewind` epochs."""
    if config.rewind:
        if config.rewind < config.epochs:
            raise ConfigError(f"rewind: the original schedule's {config.rewind} epochs cannot hold a "
                              f"{config.epochs}-epoch rewound run; give --rewind {config.epochs} or more")
        original = make_policy(dataclasses.replace(config, epochs=config.rewind, rewind=None))
        return RewoundPolicy(original, config.epochs)
    if config.schedule == "onecycle":
        return OneCyclePolicy(config.lr, config.epochs)
    if config.schedule == "cosine":
        return CosinePolicy(config.lr, config.epochs, config.warmup_epochs)
    if config.schedule == "step":
        return StepPolicy(config.lr, config.epochs, config.milestones, config.lr_gamma, config.warmup_epochs)
    if config.schedule == "piecewise":
        return AdaptiveRestartPolicy(config.lr_schedule or {0: config.lr}, config.lr_restart_schedule, config.epochs)
    return LRPolicy(config.lr, config.epochs, config.warmup_epochs)
