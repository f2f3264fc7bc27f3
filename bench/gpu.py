"""GPU figures (issue: gpu): training throughput per method and precision, the JPEG pipeline against random
tensors, ResNet-50's budget freeze and compression, and dense vs compressed ResNet-50 and FM-R20 latency.

    python bench/gpu.py [--device cuda] [--jpegs DIR] [--smoke]

`--jpegs DIR`: an ImageNet-style folder (bench/jpeg_folder.py makes one); without it that row is skipped.
`--smoke` shrinks every size so the script can be checked on a CPU in seconds (its figures mean nothing).
Latency is timed by torch.utils.benchmark on CUDA graphs of the eval-mode model (bf16, channels_last), so
kernel launches do not hide the difference between the dense and the compressed network.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from prunekit.budget import BudgetController
from prunekit.compress import compress
from prunekit.config import make_config
from prunekit.methods import METHODS, build_method, dead_structures, gate_config, side_head_position
from prunekit.models import build, zoo_spec
from round_to import INPUT, compressed_at_half


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_images_per_s(method: str, device, *, batch: int, steps: int, bf16: bool, size: int) -> float:
    """Steady-state training images/s of ResNet-20 (1×size², 10 classes) with `method`'s gates and callbacks'
    per-step work (loss terms, after_backward, after_step), through the same calls as the Trainer."""
    from types import SimpleNamespace

    spec = zoo_spec("resnet20", in_channels=1)
    config = make_config({"method": method})
    model = build(spec, gate_config(method, config), side_head_position(spec) if method == "epsilon-resnet" else None)
    model = model.to(device).to(memory_format=torch.channels_last)
    parts = build_method(model, config, (1, size, size))
    trainer = SimpleNamespace(model=model, optimizers=parts.optimizers, epoch=0, epochs=1, step_in_epoch=0,
                              train_loader=range(steps))
    x = torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            for cb in parts.callbacks:
                for term in cb.loss_terms(trainer, logits, y).values():
                    loss = loss + term
        for opt in parts.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for cb in parts.callbacks:
            cb.after_backward(trainer)
        for opt in parts.optimizers:
            opt.step()
        for cb in parts.callbacks:
            cb.after_step(trainer)

    model.train()
    for _ in range(5):
        step()
    sync(device)
    start = time.perf_counter()
    for trainer.step_in_epoch in range(steps):
        step()
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def jpeg_images_per_s(folder: str, device, *, batch: int, steps: int) -> tuple[float, float]:
    """ResNet-50 training images/s fed by the JPEG folder (default loader for the device), and on random tensors."""
    from prunekit.runner import make_loaders

    config = make_config({"data": "imagenet", "data_dir": folder, "batch_size": batch, "device": str(device)})
    from prunekit.distributed import DistContext

    loader, _ = make_loaders(config, DistContext(device=device))
    model = build(zoo_spec("resnet50", num_classes=loader.num_classes)).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    warmup = 1 if steps < 5 else 3

    def timed(batches):
        n, start = 0, None
        for i, (x, y) in enumerate(batches):
            if i == warmup:
                sync(device)
                start, n = time.perf_counter(), 0
            step(x, y)
            n += len(y)
            if i == steps + warmup - 1:
                break
        sync(device)
        return n / (time.perf_counter() - start)

    random = [(torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last),
               torch.randint(0, loader.num_classes, (batch,), device=device))] * (steps + warmup)
    return timed(loader), timed(random)


def latency_ms(model, batch: int, device, shape: tuple[int, int, int]) -> float:
    """Median eval latency (ms) of `model` on `batch` inputs of `shape`, bf16 channels_last; CUDA-graph replay on a
    GPU."""
    from torch.utils import benchmark

    model = model.to(device).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, *shape, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        if device.type == "cuda":
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    model(x)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model(x)
            run = graph.replay
        else:
            def run():
                model(x)
        timer = benchmark.Timer(stmt="run()", globals={"run": run})
        return timer.blocked_autorange(min_run_time=0.5).median * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--jpegs")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    batch, steps, size, r50 = (8, 3, 28, 64) if args.smoke else (128, 50, 28, 224)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}\n")
    print("| figure | value |\n|---|---|")
    dense = {}
    for bf16 in (False, True):
        dense[bf16] = train_images_per_s("none", device, batch=batch, steps=steps, bf16=bf16, size=size)
        print(f"| ResNet-20 FM dense training, batch {batch}, {'bf16' if bf16 else 'fp32'} | {dense[bf16]:,.0f} images/s |")
    print(f"| bf16 vs fp32 step | {dense[True] / dense[False]:.2f}× |")
    for method in METHODS[1:]:
        rate = train_images_per_s(method, device, batch=batch, steps=steps, bf16=True, size=size)
        print(f"| {method} step time vs dense (bf16) | {dense[True] / rate:.2f}× |")
    if args.jpegs:
        fed, random = jpeg_images_per_s(args.jpegs, device, batch=min(batch, 128), steps=steps)
        print(f"| ResNet-50 224² on the JPEG folder, default loader | {fed:,.0f} images/s "
              f"({fed / random:.0%} of the {random:,.0f} on random tensors) |")
    fm_batches = (1, 8) if args.smoke else (64, 1024)
    fm_dense = {b: latency_ms(build(zoo_spec("resnet20", in_channels=1)), b, device, INPUT) for b in fm_batches}
    for round_to in (1, 8):
        _, fm_small, _ = compressed_at_half(round_to)
        for b in fm_batches:
            c = latency_ms(fm_small, b, device, INPUT)
            print(f"| FM-R20 latency batch {b}, dense vs half-MACs SSS channels, round_to {round_to} | "
                  f"{fm_dense[b]:.3f} vs {c:.3f} ms ({fm_dense[b] / c:.2f}×) |")
    spec = zoo_spec("resnet50", num_classes=1000)
    r50_batches = (1, 2) if args.smoke else (1, 64, 256)
    r50_dense = {b: latency_ms(build(spec), b, device, (3, r50, r50)) for b in r50_batches}
    for structures, round_to in (("channels", 1), ("channels", 8), ("channels+blocks", 1), ("channels+blocks", 8)):
        config = make_config({"method": "sss", "sss_structures": structures})
        torch.manual_seed(0)
        model = build(spec, gate_config("sss", config)).to(device)
        with torch.no_grad():  # ranked factors (as after training), none at zero: the freeze picks by rank
            for p in (m.weight for m in model.modules() if hasattr(m, "multiplier")):
                p.copy_(torch.rand_like(p) + 0.05)
        from types import SimpleNamespace

        trainer = SimpleNamespace(model=model, optimizers=build_method(model, config, (3, r50, r50)).optimizers)
        controller = BudgetController(spec, "sss", (r50, r50), 0, "macs", 0.6, 0.01, round_to=round_to)
        controller.target = controller.dense // 2
        start = time.perf_counter()
        controller.freeze(trainer)
        sync(device)
        freeze_s = time.perf_counter() - start
        start = time.perf_counter()
        small = compress(model, spec, dead_structures(model, "sss"), round_to=round_to).model
        compress_s = time.perf_counter() - start
        label = f"{structures}, round_to {round_to}"
        print(f"| ResNet-50 budget freeze at half the MACs ({label}) | {freeze_s:.2f} s, "
              f"{controller.projected / controller.dense:.3f} of the dense MACs |")
        print(f"| compress ResNet-50 ({label}) | {compress_s:.2f} s |")
        for b in r50_batches:
            c = latency_ms(small, b, device, (3, r50, r50))
            print(f"| ResNet-50 latency batch {b}, dense vs half-MACs {label} | {r50_dense[b]:.2f} vs {c:.2f} ms "
                  f"({r50_dense[b] / c:.2f}×) |")


if __name__ == "__main__":
    main()
