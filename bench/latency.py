"""Batch-64 CPU speed-up of compressed FM-R20 exports over the dense ResNet-20, re-measured on a quiet machine,
in both memory formats.

bench/study.py times each row as it finishes, often beside other training processes, in the contiguous (NCHW)
format; this times finished exports again, interleaved with the dense network, in NCHW and in channels_last:
oneDNN's NHWC kernels take odd channel counts without padding them to channel blocks, so a thin pruned network
can gain more from channels_last than the dense one. "Fastest" compares each network in its own faster format,
as a deployment would run it (`prunekit.measure.fastest_latency`, which `prunekit run` reports). Each speed-up
is the median over rounds of the ratio within a round, with its quartiles in brackets.

    OMP_NUM_THREADS=1 .venv/bin/python bench/latency.py runs/study/*/compressed [--rounds 7]
"""
from __future__ import annotations

import argparse
import pickle
import statistics

import torch

from prunekit.checkpoint import CheckpointError
from prunekit.compress import load_any
from prunekit.config import ConfigError
from prunekit.measure import count_macs, measure_latency
from prunekit.models import build, zoo_spec
from prunekit.spec import SpecError

INPUT = (1, 28, 28)
LAYOUTS = {"NCHW": False, "channels_last": True}


def load_module(path: str) -> torch.nn.Module:
    """A whole model pickled with `torch.save(model)` (Torch-Pruning's rows: no spec describes its network). Only
    for files this project's benchmarks wrote: unpickling runs code."""
    model = torch.load(path, weights_only=False, map_location="cpu")
    if not isinstance(model, torch.nn.Module):
        raise pickle.UnpicklingError(f"{path}: holds a {type(model).__name__}, not a model")
    return model.eval()


def round_times(networks: dict, rounds: int) -> list[dict]:
    """Per round, (network, layout) -> median batch-64 latency, every network and layout interleaved."""
    return [{(name, layout): measure_latency(network, INPUT, 64, channels_last=channels_last).median_ms
             for name, network in networks.items() for layout, channels_last in LAYOUTS.items()}
            for _ in range(rounds)]


def paired(rounds: list[dict], speedup) -> str:
    """Median and quartiles over rounds of `speedup(round)`: each ratio is taken within one round, so that a
    machine slowing down between rounds moves dense and pruned alike."""
    ratios = [speedup(r) for r in rounds]
    low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return f"{statistics.median(ratios):.2f}x ({low:.2f}–{high:.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", help="compressed export directories (spec.json + weights), or "
                                                   "Torch-Pruning rows' pruned-model.pt (bench/study.py)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    loaded = {}
    for path in args.exports:  # all read before any timing: a bad one is refused at once, on one line
        try:
            loaded[path] = load_module(path) if path.endswith(".pt") else load_any(path)[0]
        except (SpecError, CheckpointError, ConfigError, OSError, pickle.UnpicklingError) as error:
            parser.error(f"not a prunekit export or run, nor a whole pickled model: {error}")
    dense = build(zoo_spec("resnet20", in_channels=1)).eval()
    print("| export | MACs | dense ms NCHW / channels_last | pruned ms NCHW / channels_last | speed-up NCHW | "
          "speed-up channels_last | fastest vs fastest |\n|---|---|---|---|---|---|---|")
    for path, model in loaded.items():
        rounds = round_times({"dense": dense, "pruned": model}, args.rounds)
        ms = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        print(f"| {path} | {count_macs(model, INPUT) / 1e6:.2f}M | "
              f"{ms[('dense', 'NCHW')]:.1f} / {ms[('dense', 'channels_last')]:.1f} | "
              f"{ms[('pruned', 'NCHW')]:.1f} / {ms[('pruned', 'channels_last')]:.1f} | "
              + " | ".join(paired(rounds, lambda r, layout=layout: r[("dense", layout)] / r[("pruned", layout)])
                           for layout in LAYOUTS)
              + " | " + paired(rounds, lambda r: min(r[("dense", layout)] for layout in LAYOUTS)
                               / min(r[("pruned", layout)] for layout in LAYOUTS)) + " |", flush=True)


if __name__ == "__main__":
    main()
