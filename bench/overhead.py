"""Training-step overhead of each sparsity method relative to the dense model (ResNet-20, CPU).

Every method's model is built as a run builds it (gate_config, ε-ResNet's side head) and trained by
the real `Trainer` with the method's optimizers and callbacks, on the same fixed random batches
(batch 128, 1x28x28). A step's time is the time between the trainer asking for consecutive batches:
forward, loss with the callbacks' terms, backward, after_backward, all optimizer steps and after_step.
Both wall time and this process's CPU time are recorded: with one thread, CPU time is what the step
costs even while other processes compete for the cores (wall time then stretches). Methods take turns
in short rounds (the machine is noisy); the first step of every turn is dropped as warm-up. Reported:
median step times over all rounds and the median over rounds of each per-round ratio to the dense
model (target <= 1.10x). Profiled epochs (3 rounds, medians) list the aten ops whose self CPU time
per step exceeds the dense model's by more than 1 ms: where the overhead goes.

    OMP_NUM_THREADS=1 .venv/bin/python bench/overhead.py [--rounds 5] [--steps 10] [--profile-rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from prunekit.config import make_config
from prunekit.engine import Trainer
from prunekit.methods import METHODS, build_method, gate_config, side_head_position
from prunekit.models import build, zoo_spec
from prunekit.schedule import make_policy

INPUT_SIZE = (1, 28, 28)


class TimedBatches:
    """A loader over fixed batches that records wall and CPU time whenever the trainer asks for the next one."""

    def __init__(self, batches):
        self.batches = batches
        self.stamps: list[tuple[float, float]] = []

    def set_epoch(self, epoch: int) -> None:
        """Same batches every epoch."""

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        self.stamps = []
        for batch in self.batches:
            self.stamps.append((time.perf_counter(), time.process_time()))
            yield batch
        self.stamps.append((time.perf_counter(), time.process_time()))

    def step_times_ms(self, clock: int) -> list[float]:
        """Time of each step of the last epoch in milliseconds: clock 0 is wall time, 1 CPU time."""
        return [(b[clock] - a[clock]) * 1000 for a, b in zip(self.stamps, self.stamps[1:])]


def random_batches(steps: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed normal-noise images with random labels."""
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(batch_size, *INPUT_SIZE, generator=generator),
             torch.randint(0, 10, (batch_size,), generator=generator)) for _ in range(steps)]


def make_trainer(method: str, loader: TimedBatches) -> Trainer:
    """A Trainer for `method` on ResNet-20, assembled as a run assembles it."""
    config = make_config({"method": method, "epochs": 1})
    spec = zoo_spec("resnet20", num_classes=10, in_channels=1)
    side = side_head_position(spec) if method == "epsilon-resnet" else None
    torch.manual_seed(0)
    model = build(spec, gate_config(method, config), side)
    parts = build_method(model, config, INPUT_SIZE)
    trainer = Trainer(model, parts.optimizers, make_policy(config), loader, {}, epochs=1,
                      callbacks=parts.callbacks, log=lambda message: None)
    for callback in trainer.callbacks:
        callback.setup(trainer)
        callback.on_epoch_start(trainer, 0)
    return trainer


def op_ms_per_step(trainer: Trainer) -> dict[str, float]:
    """Self CPU time per training step (ms) of each aten op over one profiled epoch."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.train_epoch()
    steps = len(trainer.train_loader)
    return {e.key: e.self_cpu_time_total / steps / 1000 for e in prof.key_averages() if e.key.startswith("aten::")}


def median_profiles(trainers: dict[str, Trainer], rounds: int) -> dict[str, dict[str, float]]:
    """Per method, each op's median over `rounds` profiled epochs (methods in turn) of ms per step."""
    samples = {m: [] for m in trainers}
    for _ in range(rounds):
        for method, trainer in trainers.items():
            samples[method].append(op_ms_per_step(trainer))
    return {m: {op: statistics.median(p.get(op, 0.0) for p in runs) for op in set().union(*runs)}
            for m, runs in samples.items()}


def print_extra_ops(trainers: dict[str, Trainer], threads: int, rounds: int) -> None:
    """Markdown table of the ops that cost a method more than 1 ms per step over the dense model."""
    profiles = median_profiles(trainers, rounds)
    print(f"\nWhere the overhead goes ({rounds} profiled epochs per method, medians, threads={threads}): aten ops "
          "whose self CPU time per step exceeds the dense model's by more than 1 ms.\n")
    print("| method | threads | extra ms/step, by op | total extra ms/step |")
    print("|---|---|---|---|")
    for method, ops in profiles.items():
        if method == "none":
            continue
        extra = {op: ms - profiles["none"].get(op, 0.0) for op, ms in ops.items()}
        listed = sorted(((ms, op) for op, ms in extra.items() if ms > 1), reverse=True)
        print(f"| {method} | {threads} | {', '.join(f'{op} {ms:.1f}' for ms, op in listed) or '-'} | "
              f"{sum(extra.values()):.1f} |")


CLOCKS = ("wall", "cpu")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--profile-rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    threads = torch.get_num_threads()
    loader = TimedBatches(random_batches(args.steps + 1, args.batch_size))
    trainers = {m: make_trainer(m, loader) for m in METHODS}
    times = {(m, c): [] for m in METHODS for c in CLOCKS}
    ratios = {(m, c): [] for m in METHODS for c in CLOCKS}
    for r in range(args.rounds):
        order = METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]
        medians = {}
        for method in order:
            trainers[method].train_epoch()
            for c, clock in enumerate(CLOCKS):
                steps = loader.step_times_ms(c)[1:]
                times[method, clock] += steps
                medians[method, clock] = statistics.median(steps)
        for key in ratios:
            ratios[key].append(medians[key] / medians["none", key[1]])
        print(f"round {r + 1}: threads={threads} " + " ".join(
            f"{m}={medians[m, 'wall']:.0f}/{medians[m, 'cpu']:.0f}ms" for m in METHODS) + " (wall/cpu)", flush=True)
    print(f"\nResNet-20, batch {args.batch_size}, {INPUT_SIZE[0]}x{INPUT_SIZE[1]}x{INPUT_SIZE[2]} random data, "
          f"{args.rounds} rounds x {args.steps} timed steps per method; ratio = median over rounds of "
          f"(method / dense) within the round:\n")
    print("| method | threads | step ms wall | step ms CPU | ratio wall | ratio CPU (min-max over rounds) | "
          "CPU ratio <= 1.10x |")
    print("|---|---|---|---|---|---|---|")
    for m in METHODS:
        wall, cpu = statistics.median(ratios[m, "wall"]), statistics.median(ratios[m, "cpu"])
        print(f"| {m} | {threads} | {statistics.median(times[m, 'wall']):.1f} | {statistics.median(times[m, 'cpu']):.1f} "
              f"| {wall:.3f}x | {cpu:.3f}x ({min(ratios[m, 'cpu']):.3f}-{max(ratios[m, 'cpu']):.3f}) | "
              f"{'yes' if cpu <= 1.10 else 'NO'} |")
    print_extra_ops(trainers, threads, args.profile_rounds)


if __name__ == "__main__":
    main()
