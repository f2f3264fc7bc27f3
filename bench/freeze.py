"""Time of a budget freeze and of `compress` on ImageNet ResNet-50 (issue: gpu, "budget work at ImageNet
scale"): SSS gates on channels and blocks with random factors, half of them at zero, frozen at half the MACs.

    OMP_NUM_THREADS=1 python bench/freeze.py [--device cuda] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from prunekit.budget import BudgetController
from prunekit.compress import compress
from prunekit.config import make_config
from prunekit.methods import build_method, dead_structures, gate_config
from prunekit.models import build, zoo_spec


def gated_resnet50(device: str, seed: int):
    """ResNet-50 with SSS gates: each channel and block factor uniform in [0, 1), a random half set to 0."""
    torch.manual_seed(seed)
    spec = zoo_spec("resnet50", num_classes=1000)
    config = make_config({"method": "sss", "penalty": 0.01})
    model = build(spec, gate_config("sss", config)).to(device)
    with torch.no_grad():
        for p in (m.weight for m in model.modules() if hasattr(m, "multiplier")):
            p.copy_(torch.rand_like(p) * (torch.rand_like(p) < 0.5))
    return spec, config, model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    freezes, compressions = [], []
    for seed in range(args.repeats):
        spec, config, model = gated_resnet50(args.device, seed)
        optimizers = build_method(model, config, (3, 224, 224)).optimizers
        trainer = SimpleNamespace(model=model, optimizers=optimizers)
        controller = BudgetController(spec, "sss", (224, 224), 0, "macs", 0.6, 0.01)
        controller.target = controller.dense // 2
        start = time.perf_counter()
        controller.freeze(trainer)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        freezes.append(time.perf_counter() - start)
        dead = dead_structures(model, "sss")
        start = time.perf_counter()
        compress(model, spec, dead)
        compressions.append(time.perf_counter() - start)
        print(f"seed {seed}: freeze {freezes[-1]:.2f} s (projected {controller.projected / controller.dense:.3f} of "
              f"the dense MACs), compress {compressions[-1]:.2f} s", flush=True)
    print(f"ResNet-50 on {args.device}, threads {torch.get_num_threads()}: freeze median "
          f"{statistics.median(freezes):.2f} s, compress median {statistics.median(compressions):.2f} s")


if __name__ == "__main__":
    main()
