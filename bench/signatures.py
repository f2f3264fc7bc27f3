"""Each method's signature behaviour on Fashion-MNIST, in paper mode (no budget), end to end through
the CLI: train, compress (exactness checked on real and random inputs), report.

- ε-ResNet with the authors' adaptive LR (restart whenever the discarded count rises) discards blocks;
- SSS on residual blocks only (the paper's ResNet experiments) removes whole blocks;
- SSS on a narrowed ResNeXt-29 (4 groups per block) removes cardinality groups;
- ISTA on BN γ with ρ raised in stages: fake sparsity rises to a plateau in each stage.

    OMP_NUM_THREADS=1 .venv/bin/python bench/signatures.py --out runs/signatures [--only eps,sss-blocks]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prunekit.cli import main as cli

COMMON = ["--model", "resnet20", "--train-subset", "20000", "--pad", "2", "--flip"]
RUNS = {
    # the authors' CIFAR recipe scaled to 12 epochs: SGD 0.9 without Nesterov, wd 2e-4, piecewise LR with
    # restarts; ε = 5 sits inside the 4.3-7.2 max |F(x)| range measured on FM-R20 (bench/README.md)
    "eps": COMMON + ["--method", "epsilon-resnet", "--epsilon", "5", "--epochs", "12", "--schedule", "piecewise",
                     "--lr-schedule", '{"0": 0.1, "6": 0.01, "9": 0.001}',
                     "--lr-restart-schedule", '{"0": 0.1, "3": 0.01, "5": 0.001}',
                     "--no-nesterov", "--weight-decay", "2e-4"],
    # ε = 6: above the 4.8 and 5.8 moving-average max |F(x)| of two blocks at the end of the ε = 5 run
    "eps6": COMMON + ["--method", "epsilon-resnet", "--epsilon", "6", "--epochs", "8", "--schedule", "piecewise",
                      "--lr-schedule", '{"0": 0.1, "4": 0.01, "6": 0.001}',
                      "--lr-restart-schedule", '{"0": 0.1, "2": 0.01, "3": 0.001}',
                      "--no-nesterov", "--weight-decay", "2e-4"],
    "sss-blocks": COMMON + ["--method", "sss", "--sss-structures", "blocks", "--penalty", "0.1", "--epochs", "10"],
    "sss-resnext": COMMON + ["--model", "recipes/specs/resnext29-4x4d-narrow.json", "--method", "sss",
                             "--sss-structures", "groups+blocks", "--penalty", "0.02", "--epochs", "5",
                             "--train-subset", "5000"],
}
ISTA_STAGES = [0.03, 0.04, 0.05]  # ρ per stage, 3 epochs each on 5k images, each from the previous stage's weights
# (0.005–0.02 left every γ alive: 117 steps × LR 0.1 × ρ ≪ |γ|; 0.05–0.2 killed 57–94% and the accuracy;
# 0.02, 0.04, 0.08: 0 → 25% → 86% fake sparsity, stage 3 at 10% accuracy)


def summarize(run: Path) -> dict:
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    card = json.loads((run / "compressed" / "card.json").read_text())
    keys = ("test_acc", "dead_blocks", "dead_channels", "discarded_blocks", "fake_sparsity", "lr")
    return {"run": run.name, "per_epoch": [{k: m[k] for k in keys if k in m} for m in metrics],
            "macs_ratio": card["macs_ratio"], "dead_blocks": card["dead_blocks"], "dead_groups": card["dead_groups"],
            "dead_channels": card["dead_channels"], "max_logit_difference": card["max_logit_difference"],
            "checked_on": card["checked_on"]}


def ista_stages(out: Path) -> list[Path]:
    runs, init = [], []
    for number, rho in enumerate(ISTA_STAGES, start=1):
        run = out / f"ista-stage-{number}"
        cli(["train", *COMMON, "--train-subset", "5000", "--method", "ista-bn", "--penalty", str(rho), "--epochs", "3",
             "--schedule", "constant", "--lr", "0.1", *init, "--out", str(run), "--force"])
        cli(["compress", str(run)])
        init = ["--init", str(run)]
        runs.append(run)
    return runs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/signatures")
    parser.add_argument("--only", default="eps,sss-blocks,sss-resnext,ista")
    args = parser.parse_args()
    out = Path(args.out)
    done = []
    for name in args.only.split(","):
        start = time.perf_counter()
        if name == "ista":
            runs = ista_stages(out)
        else:
            run = out / name
            cli(["train", *RUNS[name], "--out", str(run), "--force"])
            cli(["compress", str(run)])
            runs = [run]
        for run in runs:
            row = {**summarize(run), "minutes": (time.perf_counter() - start) / 60}
            print(json.dumps(row), flush=True)
            with open(out / "rows.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            done.append(run)
    cli(["report", *map(str, done), "--out", str(out / "report")])


if __name__ == "__main__":
    main()
