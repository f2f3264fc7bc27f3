"""Methods benchmark (FM-R20): each method at several penalties on Fashion-MNIST ResNet-20.

Protocol: first 20k training images, full test set, 10 epochs, SGD Nesterov 0.9, one-cycle LR 0.1,
wd 5e-4, batch 128, pad-2 crop + flip. Prints and writes a Markdown table: test accuracy and the
fraction of inner channels, blocks and MACs found dead (MACs of the network compression would give).

    python bench/methods.py --out runs/bench-methods [--epochs 10] [--only sss,ista-bn]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prunekit.config import make_config
from prunekit.measure import spec_cost
from prunekit.methods import dead_structures
from prunekit.budget import projected_spec
from prunekit.runner import train

GRID = {"none": [None], "sss": [0.001, 0.003], "binary-gate": [0.001, 0.003], "ista-bn": [0.005, 0.01],
        "slimming": [1e-5, 1e-4], "epsilon-resnet": [1.5, 2.5]}


def run_one(method, strength, out: Path, epochs: int) -> dict:
    values = {"model": "resnet20", "train_subset": 20000, "epochs": epochs, "method": method, "pad": 2, "flip": True}
    if method == "epsilon-resnet":
        values["epsilon"] = strength
    elif method == "slimming":
        values.update(penalty=strength, prune_percent=50.0)
    elif strength is not None:
        values["penalty"] = strength
    config = make_config(values)
    start = time.perf_counter()
    result = train(config, out, force=True, log=lambda m: None)
    model, spec = result["model"].cpu().eval(), result["spec"]
    dead = dead_structures(model, method, prune_percent=config.prune_percent)
    dense = spec_cost(spec, (28, 28)).macs
    pruned = spec_cost(projected_spec(model, spec, dead), (28, 28)).macs
    total_channels = sum(g.bn.num_features for g in model.channel_groups())
    return {"method": method, "strength": strength, "test_acc": result["history"][-1]["test_acc"],
            "dead_channels": dead.count_channels() / total_channels, "dead_blocks": len(dead.blocks) / 9,
            "dead_macs": 1 - pruned / dense, "minutes": (time.perf_counter() - start) / 60}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/bench-methods")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--only", default=",".join(GRID))
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for method in args.only.split(","):
        for strength in GRID[method]:
            row = run_one(method, strength, out / f"{method}-{strength}", args.epochs)
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(out / "rows.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    print("| method | penalty / ε | test acc | dead channels | dead blocks | dead MACs | minutes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['strength']} | {r['test_acc']:.4f} | {r['dead_channels']:.1%} | "
              f"{r['dead_blocks']:.1%} | {r['dead_macs']:.1%} | {r['minutes']:.1f} |")


if __name__ == "__main__":
    main()
