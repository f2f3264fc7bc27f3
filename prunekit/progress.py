"""Live progress of a training run, from numbers the host already has.

Off a terminal: a line about every `PROGRESS_SECONDS` (step, loss, LR, images/s, ETA). On a terminal: one
bar per epoch carrying the same numbers, kept when the epoch ends, and a bar per evaluation. Either way,
RUN/steps.jsonl records the LR of every step and the loss and speed at each of the trainer's device
reads, and RUN/tb holds the same scalars for TensorBoard when it is installed. Nothing here reads the
device: the loss comes from the trainer's reads every `check_every` steps, the LR from its host-side
policy, the time from the host clock.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from .checkpoint import atomic_write_text

PROGRESS_SECONDS = 30.0  # off a terminal, a progress line at the first device read this long after the last
STEPS_FILE, TENSORBOARD_DIR = "steps.jsonl", "tb"
BAR = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"  # tqdm's, less the steps/s


def duration(seconds: float) -> str:
    """`1:02:03` or `2:03`: hours only when there are some."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def read_steps(run_dir: Path) -> list[dict]:
    """RUN/steps.jsonl, without the lines a killed append left unfinished (or any other damaged line)."""
    path = Path(run_dir) / STEPS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and all(type(record.get(key)) in (int, float) for key in ("step", "epoch", "lr")):
            records.append(record)
    return records


class Progress:
    """What a run shows and records while it trains; `enabled=False` (ranks other than the first) shows
    and writes nothing. `terminal` defaults to whether `stream` (stderr) is one; `clock` is injectable."""

    def __init__(self, epochs: int, log, *, run_dir: str | Path | None = None, enabled: bool = True,
                 terminal: bool | None = None, stream=None, every_s: float = PROGRESS_SECONDS,
                 clock=time.perf_counter):
        self.epochs, self.log, self.enabled = epochs, log, enabled
        self.run_dir = Path(run_dir) if run_dir is not None and enabled else None
        self.stream = stream or sys.stderr
        self.terminal = enabled and (self.stream.isatty() if terminal is None else terminal)
        self.every_s, self.clock = every_s, clock
        self.writer, self.tensorboard, self.purge_step = None, True, None
        self.epoch, self.steps, self.records, self.bar, self.shown = 0, 1, [], None, {}
        self.last_line = None  # clock time of the last progress line
        self.eval_s, self.eval_so_far = 0.0, 0.0  # evaluation time of the last epoch, and of this one so far

    # --- the run -----------------------------------------------------------------------------

    def open(self, epoch: int, steps: int) -> None:
        """Before training from `epoch` (0-based): a fresh run starts its records over; a resumed one drops
        what the epochs after its checkpoint left, and TensorBoard hides their events (purge_step)."""
        if self.run_dir is None:
            return
        path = self.run_dir / STEPS_FILE
        if epoch == 0:
            path.unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / TENSORBOARD_DIR, ignore_errors=True)
        else:
            if path.exists():
                kept = [r for r in read_steps(self.run_dir) if r["epoch"] < epoch]
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
            self.purge_step = epoch * steps + 1  # the epoch's own scalars sit at step epoch * steps

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _scalars(self, prefix: str, values: dict, step: int) -> None:
        """`values` under `prefix/` in RUN/tb, when tensorboard is installed (silently nothing otherwise)."""
        if self.run_dir is None or not self.tensorboard:
            return
        if self.writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.tensorboard = False
                return
            self.writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=self.purge_step,
                                        flush_secs=30)
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    # --- an epoch ----------------------------------------------------------------------------

    def start_epoch(self, epoch: int, steps: int) -> None:
        """Epoch `epoch` (0-based) of `steps` steps begins: its clock starts and, on a terminal, its bar."""
        self.epoch, self.steps, self.records, self.shown = epoch, steps, [], {}
        self.started = self.last_read_time = self.clock()
        self.last_read_images = 0
        self.eval_so_far = 0.0
        if self.terminal:
            from tqdm import tqdm
            self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{self.epochs}", bar_format=BAR, file=self.stream,
                            dynamic_ncols=True)

    def global_step(self, step_in_epoch: int) -> int:
        """Steps done in the run once step `step_in_epoch` (0-based) of this epoch is done."""
        return self.epoch * self.steps + step_in_epoch + 1

    def step(self, step_in_epoch: int, lr: float) -> None:
        """A step is about to run at `lr`."""
        if not self.enabled:
            return
        self.records.append({"step": self.global_step(step_in_epoch),
                             "epoch": round(self.epoch + step_in_epoch / self.steps, 6), "lr": lr})
        if self.bar is not None:
            self._show({"lr": f"{lr:.4g}"})
            self.bar.update(1)

    def eta(self, done: int) -> float:
        """Seconds left in the run at this epoch's speed so far, with the last epoch's evaluation time
        for each evaluation still to come."""
        per_step = (self.clock() - self.started) / max(done, 1)
        steps_left = self.steps - done + (self.epochs - self.epoch - 1) * self.steps
        return steps_left * per_step + (self.epochs - self.epoch) * self.eval_s

    def read(self, done: int, loss: float, images: float) -> None:
        """The trainer read the device after `done` steps of this epoch: `loss` is the epoch's mean so
        far and `images` the images seen so far (over every rank)."""
        if not self.enabled:
            return
        now = self.clock()
        speed = (images - self.last_read_images) / max(now - self.last_read_time, 1e-9)
        self.last_read_time, self.last_read_images = now, images
        record = self.records[-1]
        record.update(loss=loss, images_per_s=speed)
        numbers = {"loss": f"{loss:.4g}", "lr": f"{record['lr']:.4g}", "images/s": f"{speed:.0f}",
                   "eta": duration(self.eta(done))}
        if self.bar is not None:
            self._show(numbers)
        elif self.last_line is None or now - self.last_line >= self.every_s:
            self.last_line = now
            self.log(f"epoch {self.epoch + 1}/{self.epochs} step {done}/{self.steps} "
                     + " ".join(f"{key}={value}" for key, value in numbers.items()))
        self._scalars("train", {"loss": loss, "lr": record["lr"], "images_per_s": speed}, record["step"])

    def end_training(self, metrics: dict) -> None:
        """The epoch's training is over (`metrics` as the trainer logs them): its bar shows the epoch's
        loss and speed and stays."""
        if self.bar is not None:
            self.shown = {}
            self._show({"loss": f"{metrics['train_loss']:.4g}", "lr": f"{metrics['lr']:.4g}",
                        "images/s": f"{metrics['train_images_per_s']:.0f}"})
            self.bar.close()
            self.bar = None

    def _show(self, numbers: dict[str, str]) -> None:
        """Update the bar's numbers (drawn at its next refresh), in the order of the progress lines."""
        self.shown.update(numbers)
        self.bar.set_postfix_str(" ".join(f"{key}={self.shown[key]}" for key in ("loss", "lr", "images/s", "eta")
                                          if key in self.shown), refresh=False)

    def evaluation(self, loader, name: str):
        """Iterate `loader` under a bar (on a terminal), timing it for the ETA."""
        start = self.clock()
        batches = loader
        if self.terminal:
            from tqdm import tqdm
            batches = tqdm(loader, total=len(loader), desc=name, bar_format=BAR, file=self.stream, leave=False,
                           dynamic_ncols=True)
        yield from batches
        self.eval_so_far += self.clock() - start

    def end_epoch(self, metrics: dict) -> None:
        """After the epoch's evaluation: append its steps to RUN/steps.jsonl and its scalar metrics to
        TensorBoard (under `epoch/`, at the run's step count)."""
        if not self.enabled:
            return
        self.eval_s = self.eval_so_far
        if self.run_dir is not None and self.records:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / STEPS_FILE, "a") as file:
                file.write("".join(json.dumps(r) + "\n" for r in self.records))
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._scalars("epoch", scalars, (self.epoch + 1) * self.steps)
