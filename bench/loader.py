"""Loader throughput vs training throughput: can BatchLoader keep a CPU training loop fed?

Measures, on the full Fashion-MNIST training set (batch 128, pad-2 crop + flip), the images/s of
iterating `BatchLoader` alone for one epoch and the images/s of dense ResNet-20 training steps
(forward, cross-entropy, backward, SGD step) on the loader's first batches. The two are measured in
alternating rounds of one process and the ratio is taken per round (the machine is shared and noisy);
the target is loading >= 10x faster than training.

    OMP_NUM_THREADS=1 .venv/bin/python bench/loader.py [--rounds 3] [--steps 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from prunekit.data import DATASET_STATS, BatchLoader, load_dataset
from prunekit.models import create


def make_loader() -> BatchLoader:
    """The training loader of the FM-R20 recipe: full train split, batch 128, pad 2, flip."""
    mean, std = DATASET_STATS["fashion-mnist"]
    dataset = load_dataset("fashion-mnist", split="train")
    return BatchLoader(dataset, 128, train=True, mean=mean, std=std, pad=2, flip=True)


def loader_images_per_s(loader: BatchLoader, epoch: int) -> float:
    """Images/s of one full epoch of the loader, consuming each batch and nothing more."""
    loader.set_epoch(epoch)
    seen = 0
    start = time.perf_counter()
    for x, _ in loader:
        seen += x.shape[0]
    return seen / (time.perf_counter() - start)


def training_images_per_s(model, optimizer, batches) -> float:
    """Images/s of dense training steps (forward, loss, backward, SGD step) over `batches`."""
    model.train()
    start = time.perf_counter()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return sum(len(y) for _, y in batches) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    loader = make_loader()
    batches = [b for _, b in zip(range(args.steps), loader)]
    model = create("resnet20", num_classes=10, in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    training_images_per_s(model, optimizer, batches[:3])  # warm-up: allocator, kernel selection
    rows = []
    for r in range(args.rounds):
        load = loader_images_per_s(loader, r)
        train = training_images_per_s(model, optimizer, batches)
        rows.append((load, train))
        print(f"round {r + 1}: threads={torch.get_num_threads()} loader={load:,.0f} img/s "
              f"training={train:,.0f} img/s ratio={load / train:.1f}x", flush=True)
    load = statistics.median(r[0] for r in rows)
    train = statistics.median(r[1] for r in rows)
    ratio = statistics.median(r[0] / r[1] for r in rows)
    print(f"\nResNet-20, Fashion-MNIST train ({len(loader)} batches of 128, pad 2 + flip), "
          f"training over {args.steps} batches, {args.rounds} rounds, medians:\n")
    print("| threads | loader img/s | training img/s | loader / training | target |")
    print("|---|---|---|---|---|")
    print(f"| {torch.get_num_threads()} | {load:,.0f} | {train:,.0f} | {ratio:.1f}x | >= 10x "
          f"{'met' if ratio >= 10 else 'NOT met'} |")


if __name__ == "__main__":
    main()
