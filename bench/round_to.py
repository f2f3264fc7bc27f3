"""Hardware-aligned widths (issue #17 item 5): does keeping widths at multiples of N make a network
compressed to half the MACs faster? FM-R20 (zoo resnet20, 1 input channel, 28x28) with SSS channel
gates of random factors (none zero) is frozen at 0.5 of the dense MACs by the budget code, once per N,
counting rounded widths, then compressed with round_to N; batch-64 latency is the median over
interleaved rounds of `measure_latency` medians.

    OMP_NUM_THREADS=1 python bench/round_to.py [--device cpu] [--rounds 7] [--repeats 20]
"""
from __future__ import annotations

import argparse
import copy
import statistics
from types import SimpleNamespace

import torch

from prunekit.budget import BudgetController
from prunekit.compress import compress
from prunekit.gates import GateConfig
from prunekit.measure import measure_latency, spec_cost
from prunekit.methods import dead_structures
from prunekit.models import build, zoo_spec

INPUT = (1, 28, 28)


def compressed_at_half(round_to: int, seed: int = 0):
    """The FM-R20 spec and plain model that a freeze at half the MACs and `compress(round_to)` give."""
    spec = zoo_spec("resnet20", in_channels=1)
    torch.manual_seed(seed)
    model = build(spec, GateConfig("scale", channels=True, blocks=False)).eval()
    with torch.no_grad():
        for g in model.channel_groups():
            g.gate.weight.copy_(torch.rand(g.gate.weight.shape) + 0.05)
    dense = spec_cost(spec, INPUT[1:]).macs
    controller = BudgetController(spec, "sss", INPUT[1:], dense // 2, "macs", 0.6, 0.0, round_to=round_to)
    controller.freeze(SimpleNamespace(model=model, optimizers=[]))
    result = compress(model, spec, dead_structures(model, "sss"), round_to=round_to)
    return result.spec, result.model, dense


def widths(spec) -> str:
    return " ".join("/".join(str(w) for w in block.inner) for stage in spec.stages for block in stage)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    args = parser.parse_args()
    models, macs = {}, {}
    for n in args.sizes:
        spec, model, dense = compressed_at_half(n)
        models[n], macs[n] = model, spec_cost(spec, INPUT[1:]).macs
        print(f"round_to {n:>2}: {macs[n] / dense:.3f} of the dense MACs, widths {widths(spec)}", flush=True)
    models["dense"] = build(zoo_spec("resnet20", in_channels=1)).eval()
    macs["dense"] = dense
    times = {key: [] for key in models}
    for _ in range(args.rounds):  # interleaved: drift from the other benchmarks spreads over all N
        for key, model in models.items():
            times[key].append(measure_latency(model, INPUT, 64, device=args.device, repeats=args.repeats).median_ms)
    print(f"\nFM-R20 batch 64 on {args.device}, threads {torch.get_num_threads()}, median of {args.rounds} rounds "
          f"of {args.repeats}-run medians:\n")
    first = args.sizes[0]
    print(f"| round_to | MACs | MACs / dense | latency ms | spread (min-max) ms | paired ratio to {first} "
          f"(median) | rounds faster than {first} |")
    print("|---|---|---|---|---|---|---|")
    for key in models:
        ratios = [t / b for t, b in zip(times[key], times[first])]  # same round: same background load
        faster = sum(r < 1 for r in ratios)
        print(f"| {key} | {macs[key] / 1e6:.2f}M | {macs[key] / dense:.3f} | {statistics.median(times[key]):.2f} | "
              f"{min(times[key]):.2f}-{max(times[key]):.2f} | {statistics.median(ratios):.3f} | {faster}/{len(ratios)} |")


if __name__ == "__main__":
    main()
