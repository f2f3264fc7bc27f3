"""Parameters, MACs and latency.

MAC convention: a conv counts C_out·H_out·W_out·(C_in/groups)·k_h·k_w, a linear layer in·out, an
eval-mode BatchNorm one multiply-add per output element (its scale and shift); biases, ReLUs, pools
and residual additions are not counted, nor is a constant-input bias (`models.resnet.ConstantInputBias`),
a bias map computed once per batch whatever the images. FLOPs = 2 × MACs of the conv and linear layers, which is
what `torch.utils.flop_counter` reports (it does not count BatchNorm).
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from .spec import ConvNetSpec, MobileNetV2Spec, ResNetSpec, Spec


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, ...], *, include_bn: bool = True) -> int:
    """MACs of one forward pass on a single image of `input_size` (C, H, W), counted with hooks."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, nn.BatchNorm2d) and include_bn:
            total += output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def count_flops_torch(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """FLOPs as `torch.utils.flop_counter` counts them (2 per conv/linear MAC), for cross-checking."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
    return counter.get_total_flops()


@dataclass
class Cost:
    params: int
    macs: int


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def spec_cost(spec: Spec, input_hw: tuple[int, int]) -> Cost:
    """Parameters and MACs of the plain network a spec describes, computed without building it.

    Same convention as `count_macs`; used to project the cost of a compression before doing it.
    """
    h, w = input_hw
    params = macs = 0

    def conv(cin, cout, k, stride, pad, bn=True, groups=1, stencil=False):
        nonlocal params, macs, h, w
        h, w = _conv_out(h, k, stride, pad), _conv_out(w, k, stride, pad)
        params += cin // groups * cout * k * k + (2 * cout if bn else 0) + (cout * k * k if stencil else 0)
        macs += cout * h * w * cin // groups * k * k + (cout * h * w if bn else 0)

    if isinstance(spec, ConvNetSpec):
        cin = spec.in_channels
        for layer in spec.layers:
            conv(cin, layer.width, layer.kernel, 1, layer.pad, stencil=layer.stencil)
            if layer.pool == "max2":
                h, w = h // 2, w // 2
            elif layer.pool == "max3s2":
                h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
            cin = layer.width
    elif isinstance(spec, ResNetSpec):
        if spec.imagenet_stem:
            conv(spec.in_channels, spec.stem, 7, 2, 3)
            h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
        else:
            conv(spec.in_channels, spec.stem, 3, 1, 1, bn=not spec.preact)
        cin = spec.stem
        for _, _, block in spec.blocks():
            h0, w0 = h, w
            if spec.preact and (block.has_branch or block.shortcut == "conv"):
                params += 2 * cin
                macs += cin * h0 * w0
            if block.has_branch:
                widths = [cin, *block.inner, block.out]
                kernels = [3, 3] if spec.block == "basic" else [1, 3, 1]
                for i in range(len(widths) - 1):
                    strided = kernels[i] == 3 and (spec.block == "basic") == (i == 0)
                    conv(widths[i], widths[i + 1], kernels[i], block.stride if strided else 1, kernels[i] // 2,
                         bn=not (spec.preact and i == len(widths) - 2), groups=block.groups if kernels[i] == 3 else 1,
                         stencil=block.stencil and i > 0)
            h, w = _conv_out(h0, 1, block.stride, 0), _conv_out(w0, 1, block.stride, 0)
            if block.shortcut == "conv":
                params += cin * block.out + (0 if spec.preact else 2 * block.out)
                macs += block.out * h * w * cin + (0 if spec.preact else block.out * h * w)
            cin = block.out
        if spec.preact:
            params += 2 * cin
            macs += cin * h * w
    elif isinstance(spec, MobileNetV2Spec):
        conv(spec.in_channels, spec.stem, 3, spec.stem_stride, 1)
        cin = spec.stem
        for _, _, block in spec.blocks():
            inner = block.inner[0]
            if block.expand:
                conv(cin, inner, 1, 1, 0)
            conv(inner, inner, 3, block.stride, 1, groups=inner)
            conv(inner, block.out, 1, 1, 0, stencil=block.stencil)
            cin = block.out
        conv(cin, spec.head, 1, 1, 0)
        cin = spec.head
    else:
        raise TypeError(f"not a spec: {type(spec).__name__}")
    width = spec.layers[-1].width if isinstance(spec, ConvNetSpec) else cin
    params += width * spec.num_classes + spec.num_classes
    macs += width * spec.num_classes
    return Cost(params, macs)


@dataclass
class Latency:
    median_ms: float
    batch_size: int
    device: str
    threads: int
    repeats: int
    channels_last: bool = False


def measure_latency(model: nn.Module, input_size: tuple[int, ...], batch_size: int = 1, *,
                    device: str | torch.device = "cpu", warmup: int = 5, repeats: int = 20,
                    channels_last: bool = False) -> Latency:
    """Median wall time of an eval-mode forward pass after warm-up (CUDA synchronised); `channels_last` times a
    channels_last copy, leaving `model` as it was."""
    device = torch.device(device)
    model = model.to(device).eval()
    x = torch.randn(batch_size, *input_size, device=device)
    if channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return Latency(statistics.median(times), batch_size, str(device), torch.get_num_threads(), repeats, channels_last)


def fastest_latency(model: nn.Module, input_size: tuple[int, ...], batch_size: int = 1, **options) -> Latency:
    """The faster of the two memory formats a deployment chooses between, contiguous (NCHW) and channels_last:
    oneDNN's NHWC kernels take a pruned network's odd widths without padding them to channel blocks: on this
    project's CPU, FM-R20 networks at half the MACs ran up to 1.35x faster in channels_last, others no faster
    (bench/README.md, "Both memory formats")."""
    return min((measure_latency(model, input_size, batch_size, channels_last=layout, **options)
                for layout in (False, True)), key=lambda latency: latency.median_ms)
