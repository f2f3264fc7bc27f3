"""The training loop, with narrow extension points so that methods never edit it.

A `Callback` may add loss terms, act after `backward()` (e.g. an L1 subgradient) and after the
optimizer steps (e.g. freezing dead structures), and report extra metrics each epoch. Several
optimizers (one per parameter group, e.g. SGD for weights and APG for gates) share one LR policy.

A training step never waits for the GPU: losses, correct counts and the non-finite flag add up on the
device, and the host reads them every `check_every` steps and at the end of the epoch
(tests/test_device.py counts these reads). Live progress (`progress.Progress`) shows only those reads.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (CheckpointError, NonFiniteError, atomic_write_text, latest_checkpoint, load_checkpoint,
                         may_be_infinite, save_checkpoint)
from .distributed import DistContext, all_reduce
from .errors import one_line
from .progress import Progress
from .schedule import LRPolicy


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names where and what is saved."""


class Callback:
    """Extension points of the loop; every method is optional."""

    def setup(self, trainer: "Trainer") -> None:
        """Called once before the first epoch (also on resume)."""

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        """Called before each epoch's first step (e.g. to follow an ε schedule)."""

    def loss_terms(self, trainer: "Trainer", logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra loss terms, added to the cross-entropy (e.g. side supervision)."""
        return {}

    def after_backward(self, trainer: "Trainer") -> None:
        """Gradients are final and unscaled; optimizers have not stepped yet."""

    def after_step(self, trainer: "Trainer") -> None:
        """All optimizers have stepped."""

    def on_epoch_end(self, trainer: "Trainer", epoch: int) -> None:
        """Called after the epoch's evaluation, before any callback's metrics (e.g. to act on the epoch)."""

    def epoch_metrics(self, trainer: "Trainer", epoch: int) -> dict:
        """Extra metrics logged for the epoch that just ended."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved."""


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device computes it natively (CPU, Ampere and later GPUs), which needs no loss
    scaling; fp16 on older GPUs, whose GradScaler reads its overflow flag every step."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


class Trainer:
    """Trains `model` for `epochs`, evaluating and checkpointing after every epoch.

    On CUDA it lets cuDNN pick the fastest convolution algorithms and keeps activations channels-last
    (`channels_last` asks for that layout on other devices). With `on_nan="stop"` a non-finite loss is
    found at the next read of the device (every `check_every` steps and at the epoch end) and named by
    its step; with `on_nan="skip"` the host must know before the optimizers step, so each step is read,
    and a skipped step's forward leaves no trace in the BN statistics either. Non-finite weights or
    statistics are never checkpointed: the run stops at that epoch's end (see `checkpoint`).
    """

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer], policy: LRPolicy,
                 train_loader, eval_loaders: dict, *, epochs: int, run_dir: str | Path | None = None,
                 callbacks=(), ctx: DistContext | None = None, amp: bool = False, channels_last: bool = False,
                 label_smoothing: float = 0.0, on_nan: str = "stop", check_every: int = 50, log=None,
                 compile: bool = False, progress: Progress | None = None):
        self.ctx = ctx or DistContext()
        on_cuda = self.ctx.device.type == "cuda"
        if on_cuda:
            torch.backends.cudnn.benchmark = True
        channels_last = channels_last or on_cuda
        self.model = model.to(self.ctx.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward_model = self.model
        if self.ctx.enabled:
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            self.forward_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if compile:  # the training forward only; evaluation and callbacks use the eager model
            self.forward_model = torch.compile(self.forward_model)
        self.optimizers, self.policy = optimizers, policy
        self.train_loader, self.eval_loaders = train_loader, eval_loaders
        self.epochs, self.callbacks = epochs, list(callbacks)
        self.run_dir = Path(run_dir) if run_dir else None
        self.amp, self.channels_last = amp, channels_last
        self.label_smoothing, self.on_nan, self.check_every = label_smoothing, on_nan, check_every
        self.amp_dtype = autocast_dtype(self.ctx.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp and self.amp_dtype == torch.float16)
        self.history: list[dict] = []
        self.epoch = 0
        self.step_in_epoch = 0
        self.skipped_steps = 0
        self.log = log or (lambda msg: print(msg, flush=True))
        self.progress = progress or Progress(epochs, self.log, run_dir=self.run_dir, enabled=self.ctx.is_main)

    # --- state -------------------------------------------------------------------------------

    def state(self) -> dict:
        return {"epoch": self.epoch, "optimizers": [o.state_dict() for o in self.optimizers],
                "policy": self.policy.state_dict(), "callbacks": [c.state_dict() for c in self.callbacks],
                "history": self.history, "scaler": self.scaler.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "skipped_steps": self.skipped_steps}

    def load_state(self, state: dict) -> None:
        """Restore what `state()` saved; the weights are loaded separately."""
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):  # a state of another run fails here
            opt.load_state_dict(s)
        self.policy.load_state_dict(state["policy"])
        for cb, s in zip(self.callbacks, state["callbacks"]):
            cb.load_state_dict(s)
        self.history = list(state["history"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if torch.cuda.is_available():  # a checkpoint written on a CPU has no GPU states; a CPU ignores them
            for index, rng in enumerate(state.get("cuda_rng", [])[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(rng, index)
        self.epoch, self.skipped_steps = state["epoch"], state.get("skipped_steps", 0)

    def resume(self) -> bool:
        """Continue from the run directory's latest checkpoint, if there is one."""
        path = latest_checkpoint(self.run_dir) if self.run_dir else None
        if path is None:
            return False
        weights, state = load_checkpoint(path)
        try:
            self.model.load_state_dict(weights)
        except RuntimeError as exc:
            raise CheckpointError(f"{path / 'model.safetensors'}: does not fit this model ({one_line(exc, 200)})") from None
        try:
            self.load_state(state)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path / 'state.pt'}: does not fit this run ({one_line(exc, 200)})") from None
        self.log(f"resumed from {path} (epoch {self.epoch} of {self.epochs})")
        return True

    def checkpoint(self) -> None:
        """Save the finished epoch; a state holding NaN or inf (e.g. BN statistics overflowed by a huge
        step whose loss was still finite) stops the run instead, the previous checkpoint kept."""
        if self.run_dir is None or not self.ctx.is_main:
            return
        try:
            save_checkpoint(self.run_dir, self.epoch, self.model.state_dict(), self.state())
        except NonFiniteError as exc:  # refused before anything was written: `latest` names the last good one
            last = latest_checkpoint(self.run_dir)
            raise TrainingError(f"non-finite weights or statistics after epoch {self.epoch} ({exc.tensors}); last "
                                f"good checkpoint: {last if last else 'none written yet'} (lower the learning rate "
                                f"or penalty, or use --on-nan skip)") from None
        lines = "".join(_json_line(m) for m in self.history)
        atomic_write_text(self.run_dir / "metrics.jsonl", lines)

    # --- loop --------------------------------------------------------------------------------

    def set_lr(self, epoch_float: float) -> float:
        lr = self.policy.lr_at(epoch_float)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def _autocast(self):
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def _prepare(self, x, y):
        x, y = x.to(self.ctx.device, non_blocking=True), y.to(self.ctx.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def _zero(self) -> torch.Tensor:
        """A float64 accumulator on the device (exact for counts below 2**53)."""
        return torch.zeros((), dtype=torch.float64, device=self.ctx.device)

    def train_epoch(self) -> dict:
        self.model.train()
        self.train_loader.set_epoch(self.epoch)
        steps = len(self.train_loader)
        if steps == 0:
            raise TrainingError("the training set is smaller than one batch; lower the batch size or use more data")
        loss_sum, correct = self._zero(), self._zero()
        clean = torch.ones((), dtype=torch.bool, device=self.ctx.device)  # no non-finite loss yet this epoch
        clean_steps = self._zero()  # steps before the first non-finite loss
        seen, skipped_before = 0, self.skipped_steps
        start = time.perf_counter()
        self.progress.start_epoch(self.epoch, steps)
        skip = self.on_nan == "skip"
        named = list(self.model.named_buffers()) if skip else []  # BN statistics: a skipped step must not move them
        buffers, checked = [b for _, b in named], [b for name, b in named if not may_be_infinite(name)]
        for self.step_in_epoch, (x, y) in enumerate(self.train_loader):
            x, y = self._prepare(x, y)
            lr = self.set_lr(self.epoch + self.step_in_epoch / steps)
            self.progress.step(self.step_in_epoch, lr)
            before = [b.clone() for b in buffers]
            with self._autocast():
                logits = self.forward_model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
                for term in (t for cb in self.callbacks for t in cb.loss_terms(self, logits, y).values()):
                    loss = loss + term
            finite = torch.isfinite(loss.detach())
            if skip and not all_reduce((finite & _all_finite(checked, finite)).double(), self.ctx, "min"):  # each step
                for buffer, saved in zip(buffers, before):
                    buffer.copy_(saved)
                self.skipped_steps += 1
                continue
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
            for cb in self.callbacks:
                cb.after_backward(self)
            for opt in self.optimizers:
                self.scaler.step(opt)
            self.scaler.update()
            for cb in self.callbacks:
                cb.after_step(self)
            loss_sum.add_(loss.detach(), alpha=y.numel())
            correct.add_((logits.detach().argmax(1) == y).sum())
            clean.logical_and_(finite)
            clean_steps.add_(clean)
            seen += y.numel()
            if (self.step_in_epoch + 1) % self.check_every == 0 and self.step_in_epoch + 1 < steps:
                running_loss, running_seen = self._read(steps, clean, clean_steps, loss_sum, seen)
                self.progress.read(self.step_in_epoch + 1, running_loss / max(running_seen, 1), running_seen)
        loss_sum, seen, correct = self._read(steps, clean, clean_steps, loss_sum, seen, correct)
        if seen == 0:
            raise TrainingError(f"every step of epoch {self.epoch + 1} had a non-finite loss: training has "
                                f"diverged; lower the learning rate or penalty and rerun")
        elapsed = time.perf_counter() - start
        metrics = {"lr": lr, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                   "train_images_per_s": seen / elapsed, "epoch_time_s": elapsed}
        if self.on_nan == "skip":
            metrics["skipped_steps"] = self.skipped_steps - skipped_before
        self.progress.end_training(metrics)
        return metrics

    def _read(self, steps: int, clean, clean_steps, loss_sum, seen: int, *more) -> list[float]:
        """The epoch's running loss sum, images seen and `more` summed over ranks, in one read of the
        device; stops the run if any rank has had a non-finite loss this epoch."""
        first_bad = all_reduce(torch.where(clean, steps, clean_steps).view(1), self.ctx, "min")
        totals = all_reduce(torch.stack([loss_sum, torch.full_like(loss_sum, seen), *more]), self.ctx)
        first_bad, *totals = torch.cat([first_bad, totals]).tolist()
        if first_bad < steps:
            last = latest_checkpoint(self.run_dir) if self.run_dir else None
            raise TrainingError(f"non-finite loss at epoch {self.epoch + 1}, step {int(first_bad) + 1}; last good "
                                f"checkpoint: {last if last else 'none written yet'} (resume with --resume, or "
                                f"use --on-nan skip)")
        return totals

    @torch.no_grad()
    def evaluate(self, loader, name: str = "evaluation") -> dict:
        """Mean loss and accuracy over the loader (reduced over ranks), read from the device once."""
        self.model.eval()
        loss_sum, correct = self._zero(), self._zero()
        seen = 0
        for x, y in self.progress.evaluation(loader, name):
            x, y = self._prepare(x, y)
            with self._autocast():
                logits = self.model(x)
            loss_sum.add_(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct.add_((logits.argmax(1) == y).sum())
            seen += y.numel()
        loss_sum, correct, seen = all_reduce(torch.stack([loss_sum, correct, torch.full_like(loss_sum, seen)]),
                                             self.ctx).tolist()
        return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1)}

    def fit(self, resume: bool = False) -> list[dict]:
        """Run the remaining epochs; with `resume`, continue from the latest checkpoint."""
        if resume:
            self.resume()
        for cb in self.callbacks:
            cb.setup(self)
        self.progress.open(self.epoch, len(self.train_loader))
        try:
            while self.epoch < self.epochs:
                for cb in self.callbacks:
                    cb.on_epoch_start(self, self.epoch)
                metrics = {"epoch": self.epoch + 1, **self.train_epoch()}
                for name, loader in self.eval_loaders.items():
                    for key, value in self.evaluate(loader, name).items():
                        metrics[f"{name}_{key}"] = value
                for cb in self.callbacks:
                    cb.on_epoch_end(self, self.epoch)
                for cb in self.callbacks:
                    metrics.update(cb.epoch_metrics(self, self.epoch))
                self.policy.on_epoch_end(self.epoch, metrics)
                self.history.append(metrics)
                self.epoch += 1
                self.progress.end_epoch(metrics)  # steps.jsonl first: a resume drops what the checkpoint lacks
                self.checkpoint()
                if self.ctx.is_main:
                    self.log(format_metrics(metrics))
        finally:
            self.progress.close()
        return self.history


def _all_finite(tensors: list[torch.Tensor], true: torch.Tensor) -> torch.Tensor:
    """One device flag: no floating-point tensor of `tensors` holds NaN or inf (`true` when there are none)."""
    floats = [t.reshape(-1).float() for t in tensors if t.is_floating_point()]
    return torch.cat(floats).isfinite().all() if floats else true


def _json_line(metrics: dict) -> str:
    return json.dumps(metrics, sort_keys=False, default=float) + "\n"


def format_metrics(metrics: dict) -> str:
    """One human line per epoch: the scalar metrics, rounded."""
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float) and math.isfinite(value):
            parts.append(f"{key}={value:.4g}")
        elif isinstance(value, (int, str)):
            parts.append(f"{key}={value}")
    return " ".join(parts)
