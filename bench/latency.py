"""Batch-64 CPU speed-up of compressed FM-R20 exports over the dense ResNet-20, re-measured on a quiet machine,
in both memory formats.

bench/study.py times each row as it finishes, often beside other training processes, in the contiguous (NCHW)
format; this times finished exports again, interleaved with the dense network, in NCHW and in channels_last:
oneDNN's NHWC kernels take odd channel counts without padding them to channel blocks, so a thin pruned network
can gain more from channels_last than the dense one. "Fastest" compares each network in its own faster format,
as a deployment would run it (`prunekit.measure.fastest_latency`, which `prunekit run` reports).

    OMP_NUM_THREADS=1 .venv/bin/python bench/latency.py runs/study/*/compressed [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics

from prunekit.checkpoint import CheckpointError
from prunekit.compress import load_any
from prunekit.config import ConfigError
from prunekit.measure import measure_latency, spec_cost
from prunekit.models import build, zoo_spec
from prunekit.spec import SpecError

INPUT = (1, 28, 28)
LAYOUTS = {"NCHW": False, "channels_last": True}


def medians(networks: dict, rounds: int) -> dict:
    """(network, layout) -> median over `rounds` of each round's median batch-64 latency, all interleaved."""
    times = {(name, layout): [] for name in networks for layout in LAYOUTS}
    for _ in range(rounds):
        for name, network in networks.items():
            for layout, channels_last in LAYOUTS.items():
                times[(name, layout)].append(measure_latency(network, INPUT, 64, channels_last=channels_last).median_ms)
    return {key: statistics.median(values) for key, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", help="compressed export directories (spec.json + weights)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    loaded = {}
    for path in args.exports:  # all read before any timing: a bad one is refused at once, on one line
        try:
            loaded[path] = load_any(path)
        except (SpecError, CheckpointError, ConfigError, OSError) as error:  # as `prunekit` refuses them
            parser.error(f"not a prunekit export or run: {error}")
    dense = build(zoo_spec("resnet20", in_channels=1)).eval()
    print("| export | MACs | dense ms NCHW / channels_last | pruned ms NCHW / channels_last | speed-up NCHW | "
          "speed-up channels_last | fastest vs fastest |\n|---|---|---|---|---|---|---|")
    for path, (model, spec) in loaded.items():
        ms = medians({"dense": dense, "pruned": model}, args.rounds)
        fastest = min(ms[("dense", layout)] for layout in LAYOUTS) / min(ms[("pruned", layout)] for layout in LAYOUTS)
        print(f"| {path} | {spec_cost(spec, INPUT[1:]).macs / 1e6:.2f}M | "
              f"{ms[('dense', 'NCHW')]:.1f} / {ms[('dense', 'channels_last')]:.1f} | "
              f"{ms[('pruned', 'NCHW')]:.1f} / {ms[('pruned', 'channels_last')]:.1f} | "
              + " | ".join(f"{ms[('dense', layout)] / ms[('pruned', layout)]:.2f}x" for layout in LAYOUTS)
              + f" | {fastest:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
