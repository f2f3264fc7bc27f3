"""Batch-64 CPU speed-up of compressed FM-R20 exports over the dense ResNet-20, re-measured on a quiet machine.

bench/study.py times each row as it finishes, often beside other training processes; this times finished
exports again, each in turn with the dense network (bench/study.py's `latency_speedup`, median of the rounds),
so that the speed-ups of one host compare. With --channels-last both networks run in that memory format too:
oneDNN's NHWC kernels take odd channel counts without padding them to its 8- or 16-channel blocks, so a thin
pruned network can gain more from it than the dense one.

    OMP_NUM_THREADS=1 .venv/bin/python bench/latency.py runs/study/*/compressed [--rounds 7] [--channels-last]
"""
from __future__ import annotations

import argparse

from study import latency_speedup

from prunekit.compress import load_any
from prunekit.measure import spec_cost

INPUT = (1, 28, 28)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", help="compressed export directories (spec.json + weights)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--channels-last", action="store_true", help="time dense and pruned in channels_last")
    args = parser.parse_args()
    layout = "channels_last" if args.channels_last else "NCHW"
    print(f"| export | MACs | latency b64 ms ({layout}) | speed-up b64 ({layout}) |\n|---|---|---|---|")
    for path in args.exports:
        model, spec = load_any(path)
        ms, speedup = latency_speedup(model, INPUT, rounds=args.rounds, channels_last=args.channels_last)
        macs = spec_cost(spec, INPUT[1:]).macs
        print(f"| {path} | {macs / 1e6:.2f}M | {ms:.1f} | {speedup:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
