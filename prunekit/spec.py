"""Architecture specs: every network is built from one of these small, JSON-serializable records.

A pruned network is the same type with smaller widths and fewer blocks, so pruning is a function
from (spec, weights) to (smaller spec, sliced weights).
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import FileFormatError, read_json

MAX_WIDTH = 65536
MAX_LAYERS = 4096
MAX_PARAMS = 10**9  # 4 GB of float32 weights, several times the largest ImageNet network
SHORTCUTS = ("identity", "conv", "pad")
BLOCK_TYPES = ("basic", "bottleneck")
POOLS = (None, "max2", "max3s2")


class SpecError(ValueError):
    """A spec that cannot describe a network; the message names the offending field."""


@dataclass
class BlockSpec:
    """One residual block: branch widths (empty when only the shortcut is left) and output width."""

    inner: list[int]
    out: int
    stride: int = 1
    shortcut: str = "identity"
    groups: int = 1  # cardinality of a bottleneck's 3x3 conv (ResNeXt)
    stencil: bool = False  # convs after the first carry a constant-input bias (see models.resnet.ConstantInputBias)
    # a zero-padding shortcut's output position of each input channel (None: channel i to position i);
    # set by compression when residual-stream channels are pruned
    pad_index: list[int] | None = None

    @property
    def has_branch(self) -> bool:
        return len(self.inner) > 0


@dataclass
class ResNetSpec:
    """A ResNet: stem, then stages of basic or bottleneck blocks, then global pool and a linear head.

    `imagenet_stem` selects the 7x7/2 conv + 3x3/2 max-pool stem; `preact` the pre-activation
    blocks of He et al. (2016) with a final BN-ReLU before pooling.
    """

    block: str
    stem: int
    stages: list[list[BlockSpec]]
    num_classes: int = 10
    in_channels: int = 3
    preact: bool = False
    imagenet_stem: bool = False
    family: str = "resnet"

    def blocks(self):
        """Yield (stage index, block index, block) for every block."""
        for s, stage in enumerate(self.stages):
            for b, block in enumerate(stage):
                yield s, b, block


@dataclass
class ConvLayerSpec:
    """One conv-BN-ReLU layer of a plain network, optionally followed by max-pooling."""

    width: int
    kernel: int = 3
    padding: int | None = None
    pool: str | None = None
    stencil: bool = False  # the conv carries a constant-input bias (see models.resnet.ConstantInputBias)

    @property
    def pad(self) -> int:
        return self.kernel // 2 if self.padding is None else self.padding


@dataclass
class ConvNetSpec:
    """A plain conv network (VGG, cnn4): conv layers, global average pool, linear head."""

    layers: list[ConvLayerSpec]
    num_classes: int = 10
    in_channels: int = 3
    family: str = "convnet"


@dataclass
class InvertedResidualSpec:
    """One MobileNetV2 block: 1x1 expansion to `inner[0]` channels, 3x3 depthwise conv, linear 1x1
    projection to `out`. Without `expand` the depthwise conv reads the input (inner[0] is its width)."""

    inner: list[int]
    out: int
    stride: int = 1
    shortcut: str = "none"  # "identity" (stride 1, out == input width) or "none"
    expand: bool = True
    stencil: bool = False  # the projection carries a constant-input bias (see models.resnet.ConstantInputBias)

    @property
    def has_branch(self) -> bool:
        """Always: a removed block leaves the spec (only blocks with an identity shortcut can go)."""
        return True


@dataclass
class MobileNetV2Spec:
    """MobileNetV2 (Sandler et al. 2018) in torchvision's layout: 3x3 conv-BN-ReLU6 stem with stride
    `stem_stride`, stages of inverted-residual blocks, 1x1 conv-BN-ReLU6 to `head` channels, global
    pool, dropout, linear classifier."""

    stem: int
    stages: list[list[InvertedResidualSpec]]
    head: int
    num_classes: int = 10
    in_channels: int = 3
    stem_stride: int = 2
    dropout: float = 0.2
    family: str = "mobilenetv2"

    def blocks(self):
        """Yield (stage index, block index, block) for every block."""
        for s, stage in enumerate(self.stages):
            for b, block in enumerate(stage):
                yield s, b, block


Spec = ResNetSpec | ConvNetSpec | MobileNetV2Spec


def _without_default_pad_index(items: list[tuple[str, object]]) -> dict:
    return {key: value for key, value in items if not (key == "pad_index" and value is None)}


def to_dict(spec: Spec) -> dict:
    """The spec as plain JSON-ready data (a block's `pad_index` only where compression set one)."""
    return asdict(spec, dict_factory=_without_default_pad_index)


def to_json(spec: Spec) -> str:
    return json.dumps(to_dict(spec), indent=1)


def save(spec: Spec, path: str | Path) -> None:
    Path(path).write_text(to_json(spec))


def load(path: str | Path) -> Spec:
    """Read a spec file; any problem is a SpecError naming the file."""
    try:
        data = read_json(path)
    except FileFormatError as exc:
        raise SpecError(f"{path}: not a readable JSON spec (the file {exc})") from None
    try:
        return from_dict(data)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None


def _expect(value, types, where: str):
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise SpecError(f"{where}: expected {_type_name(types)}, got a boolean")
    if not isinstance(value, types):
        raise SpecError(f"{where}: expected {_type_name(types)}, got {type(value).__name__}")
    return value


def _type_name(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


def _width(value, where: str, minimum: int = 1) -> int:
    _expect(value, int, where)
    if not minimum <= value <= MAX_WIDTH:
        raise SpecError(f"{where}: width must be between {minimum} and {MAX_WIDTH}, got {value}")
    return value


def _keys(data: dict, allowed: set[str], where: str) -> None:
    _expect(data, dict, where)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SpecError(f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _block_from_dict(data, where: str, block_type: str) -> BlockSpec:
    _keys(data, {"inner", "out", "stride", "shortcut", "groups", "stencil", "pad_index"}, where)
    if "inner" not in data or "out" not in data:
        raise SpecError(f"{where}: 'inner' and 'out' are required")
    inner = _expect(data["inner"], list, f"{where}.inner")
    depth = 1 if block_type == "basic" else 2
    if len(inner) not in (0, depth):
        raise SpecError(f"{where}.inner: a {block_type} block has {depth} inner widths (or 0), got {len(inner)}")
    inner = [_width(w, f"{where}.inner[{i}]") for i, w in enumerate(inner)]
    stride = _expect(data.get("stride", 1), int, f"{where}.stride")
    if stride not in (1, 2):
        raise SpecError(f"{where}.stride: must be 1 or 2, got {stride}")
    shortcut = data.get("shortcut", "identity")
    if shortcut not in SHORTCUTS:
        raise SpecError(f"{where}.shortcut: must be one of {SHORTCUTS}, got {shortcut!r}")
    groups = _width(data.get("groups", 1), f"{where}.groups")
    if groups > 1 and (block_type != "bottleneck" or (inner and (inner[0] != inner[1] or inner[0] % groups))):
        raise SpecError(f"{where}.groups: grouped convs need a bottleneck block whose two inner widths are equal "
                        f"and divisible by {groups}, got {inner}")
    stencil = _expect(data.get("stencil", False), bool, f"{where}.stencil")
    pad_index = data.get("pad_index")
    if pad_index is not None:
        pad_index = [_width(i, f"{where}.pad_index[{k}]", minimum=0)
                     for k, i in enumerate(_expect(pad_index, list, f"{where}.pad_index"))]
    return BlockSpec(inner, _width(data["out"], f"{where}.out"), stride, shortcut, groups, stencil, pad_index)


def _inverted_from_dict(data, where: str) -> InvertedResidualSpec:
    _keys(data, {"inner", "out", "stride", "shortcut", "expand", "stencil"}, where)
    if "inner" not in data or "out" not in data:
        raise SpecError(f"{where}: 'inner' and 'out' are required")
    inner = _expect(data["inner"], list, f"{where}.inner")
    if len(inner) != 1:
        raise SpecError(f"{where}.inner: an inverted-residual block has 1 inner width, got {len(inner)}")
    stride = _expect(data.get("stride", 1), int, f"{where}.stride")
    if stride not in (1, 2):
        raise SpecError(f"{where}.stride: must be 1 or 2, got {stride}")
    shortcut = data.get("shortcut", "none")
    if shortcut not in ("identity", "none"):
        raise SpecError(f"{where}.shortcut: must be 'identity' or 'none', got {shortcut!r}")
    return InvertedResidualSpec([_width(inner[0], f"{where}.inner[0]")], _width(data["out"], f"{where}.out"), stride,
                                shortcut, _expect(data.get("expand", True), bool, f"{where}.expand"),
                                _expect(data.get("stencil", False), bool, f"{where}.stencil"))


def _stages_from_dict(data, parse_block) -> list[list]:
    stages = _expect(data["stages"], list, "spec.stages")
    if not 1 <= len(stages) <= 16:
        raise SpecError(f"spec.stages: expected 1 to 16 stages, got {len(stages)}")
    parsed = []
    for s, stage in enumerate(stages):
        _expect(stage, list, f"spec.stages[{s}]")
        parsed.append([parse_block(b, f"spec.stages[{s}][{i}]") for i, b in enumerate(stage)])
    if sum(map(len, parsed)) > MAX_LAYERS:
        raise SpecError(f"spec.stages: more than {MAX_LAYERS} blocks")
    return parsed


def from_dict(data) -> Spec:
    """Parse and validate a spec from JSON data; errors name the field (e.g. `stages[1][0].out`)."""
    _expect(data, dict, "spec")
    family = data.get("family")
    common = {"num_classes", "in_channels", "family"}
    if family == "resnet":
        _keys(data, common | {"block", "stem", "stages", "preact", "imagenet_stem"}, "spec")
        for key in ("block", "stem", "stages"):
            if key not in data:
                raise SpecError(f"spec.{key}: required for a resnet spec")
        if data["block"] not in BLOCK_TYPES:
            raise SpecError(f"spec.block: must be one of {BLOCK_TYPES}, got {data['block']!r}")
        parsed = _stages_from_dict(data, lambda b, where: _block_from_dict(b, where, data["block"]))
        spec = ResNetSpec(
            block=data["block"], stem=_width(data["stem"], "spec.stem"), stages=parsed,
            num_classes=_width(data.get("num_classes", 10), "spec.num_classes"),
            in_channels=_width(data.get("in_channels", 3), "spec.in_channels"),
            preact=_expect(data.get("preact", False), bool, "spec.preact"),
            imagenet_stem=_expect(data.get("imagenet_stem", False), bool, "spec.imagenet_stem"),
        )
    elif family == "convnet":
        _keys(data, common | {"layers"}, "spec")
        layers = _expect(data.get("layers"), list, "spec.layers")
        if not 1 <= len(layers) <= MAX_LAYERS:
            raise SpecError(f"spec.layers: expected 1 to {MAX_LAYERS} layers, got {len(layers)}")
        parsed = []
        for i, layer in enumerate(layers):
            where = f"spec.layers[{i}]"
            _keys(layer, {"width", "kernel", "padding", "pool", "stencil"}, where)
            kernel = _expect(layer.get("kernel", 3), int, f"{where}.kernel")
            if not 1 <= kernel <= 15:
                raise SpecError(f"{where}.kernel: must be between 1 and 15, got {kernel}")
            padding = layer.get("padding")
            if padding is not None and not (isinstance(padding, int) and not isinstance(padding, bool) and 0 <= padding <= kernel):
                raise SpecError(f"{where}.padding: must be an integer between 0 and the kernel size, got {padding!r}")
            if layer.get("pool") not in POOLS:
                raise SpecError(f"{where}.pool: must be one of {POOLS}, got {layer.get('pool')!r}")
            parsed.append(ConvLayerSpec(_width(layer.get("width"), f"{where}.width"), kernel, padding, layer.get("pool"),
                                        _expect(layer.get("stencil", False), bool, f"{where}.stencil")))
        spec = ConvNetSpec(parsed, _width(data.get("num_classes", 10), "spec.num_classes"),
                           _width(data.get("in_channels", 3), "spec.in_channels"))
    elif family == "mobilenetv2":
        _keys(data, common | {"stem", "stages", "head", "stem_stride", "dropout"}, "spec")
        for key in ("stem", "stages", "head"):
            if key not in data:
                raise SpecError(f"spec.{key}: required for a mobilenetv2 spec")
        stem_stride = _expect(data.get("stem_stride", 2), int, "spec.stem_stride")
        if stem_stride not in (1, 2):
            raise SpecError(f"spec.stem_stride: must be 1 or 2, got {stem_stride}")
        dropout = _expect(data.get("dropout", 0.2), (float, int), "spec.dropout")
        if not 0 <= dropout < 1:
            raise SpecError(f"spec.dropout: must be at least 0 and below 1, got {dropout}")
        spec = MobileNetV2Spec(_width(data["stem"], "spec.stem"), _stages_from_dict(data, _inverted_from_dict),
                               _width(data["head"], "spec.head"),
                               _width(data.get("num_classes", 10), "spec.num_classes"),
                               _width(data.get("in_channels", 3), "spec.in_channels"), stem_stride, float(dropout))
    else:
        raise SpecError(f"spec.family: must be 'resnet', 'convnet' or 'mobilenetv2', got {family!r}")
    validate(spec)
    from .measure import spec_cost  # measure imports this module

    params = spec_cost(spec, (32, 32)).params
    if params > MAX_PARAMS:  # refused before building would try to allocate it
        raise SpecError(f"spec: describes {params:,} parameters, more than {MAX_PARAMS:,}; is a width mistyped?")
    return spec


def validate(spec: Spec) -> None:
    """Check that consecutive layers fit together (shortcut kinds, widths through identities)."""
    if isinstance(spec, ConvNetSpec):
        return
    width = spec.stem
    for s, b, block in spec.blocks():
        where = f"spec.stages[{s}][{b}]"
        if isinstance(block, InvertedResidualSpec) and not block.expand and block.inner[0] != width:
            raise SpecError(f"{where}.inner: a block without expansion has its input's width ({width}), "
                            f"got {block.inner[0]}")
        if block.shortcut == "identity" and (block.stride != 1 or block.out != width):
            raise SpecError(f"{where}.shortcut: an identity shortcut needs stride 1 and out == input width "
                            f"({width}), got stride {block.stride}, out {block.out}")
        if block.shortcut == "pad" and block.out < width:
            raise SpecError(f"{where}.shortcut: a zero-padding shortcut cannot shrink {width} to {block.out} channels")
        index = getattr(block, "pad_index", None)
        if index is not None and (block.shortcut != "pad" or len(index) != width or len(set(index)) != len(index)
                                  or max(index, default=0) >= block.out):
            raise SpecError(f"{where}.pad_index: a zero-padding shortcut's {width} distinct output positions below "
                            f"{block.out}, got {index if len(index) <= 8 else index[:8] + ['...']}")
        if not block.has_branch and block.shortcut == "identity":
            raise SpecError(f"{where}.inner: a block without a branch and with an identity shortcut is a no-op; drop it")
        width = block.out


def check_input_size(spec: Spec, size: int) -> None:
    """Refuse a plain network whose kernels or pools do not fit a `size`×`size` input (e.g. VGG's five
    2×2 pools on 28×28 images). A ResNet's or MobileNetV2's strided convs and pools are padded: never
    below 1×1."""
    if not isinstance(spec, ConvNetSpec):
        return
    side = size
    for i, layer in enumerate(spec.layers):
        where = f"spec.layers[{i}]"
        if layer.kernel > side + 2 * layer.pad:
            raise SpecError(f"{where}.kernel: a {layer.kernel}×{layer.kernel} kernel does not fit its {side}×{side} "
                            f"input with padding {layer.pad} ({size}×{size} images)")
        side = side + 2 * layer.pad - layer.kernel + 1
        if layer.pool == "max2":
            if side < 2:
                raise SpecError(f"{where}.pool: a 2×2 pool leaves nothing of its {side}×{side} input "
                                f"({size}×{size} images)")
            side //= 2
        elif layer.pool == "max3s2":  # 3×3, stride 2, padding 1
            side = (side - 1) // 2 + 1


def feature_width(spec: Spec) -> int:
    """Channels entering the classifier."""
    if isinstance(spec, ConvNetSpec):
        return spec.layers[-1].width
    if isinstance(spec, MobileNetV2Spec):
        return spec.head
    width = spec.stem
    for _, _, block in spec.blocks():
        width = block.out
    return width


# --- zoo specs ------------------------------------------------------------------------------


def cifar_resnet_spec(depth: int, *, preact: bool = False, bottleneck: bool = False,
                      shortcut: str = "conv", num_classes: int = 10, in_channels: int = 3) -> ResNetSpec:
    """CIFAR ResNet of He et al.: 3 stages of 16/32/64 (x4 for bottleneck outputs), depth 6n+2 or 9n+2."""
    per_block = 3 if bottleneck else 2
    if depth < per_block * 3 + 2 or (depth - 2) % (3 * per_block):
        raise SpecError(f"depth {depth}: a CIFAR {'bottleneck' if bottleneck else 'basic'} ResNet has depth "
                        f"{3 * per_block}n+2")
    n = (depth - 2) // (3 * per_block)
    expansion = 4 if bottleneck else 1
    stages, width = [], 16
    for s, base in enumerate((16, 32, 64)):
        out = base * expansion
        blocks = []
        for b in range(n):
            stride = 2 if (s > 0 and b == 0) else 1
            needs_projection = stride != 1 or width != out
            inner = [base, base] if bottleneck else [base]
            blocks.append(BlockSpec(inner, out, stride, shortcut if needs_projection else "identity"))
            width = out
        stages.append(blocks)
    return ResNetSpec("bottleneck" if bottleneck else "basic", 16, stages, num_classes, in_channels, preact)


IMAGENET_DEPTHS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]),
                   50: ("bottleneck", [3, 4, 6, 3]), 101: ("bottleneck", [3, 4, 23, 3]),
                   152: ("bottleneck", [3, 8, 36, 3])}


def imagenet_resnet_spec(depth: int, *, preact: bool = False, num_classes: int = 1000, in_channels: int = 3,
                         groups: int = 1, width_per_group: int = 64) -> ResNetSpec:
    """ImageNet ResNet with torchvision's layout (stride in the 3x3 conv, projection shortcuts); with
    `groups`/`width_per_group` torchvision's ResNeXt (32, 4: resnext50_32x4d) and wide ResNet (1, 128)."""
    if depth not in IMAGENET_DEPTHS:
        raise SpecError(f"depth {depth}: ImageNet ResNets have depth {sorted(IMAGENET_DEPTHS)}")
    block, counts = IMAGENET_DEPTHS[depth]
    if block == "basic" and (groups != 1 or width_per_group != 64):
        raise SpecError(f"depth {depth}: grouped or wide ResNets need bottleneck blocks (depth ≥ 50)")
    expansion = 4 if block == "bottleneck" else 1
    stages, width = [], 64
    for s, count in enumerate(counts):
        base = 64 * 2 ** s
        inner = base * width_per_group // 64 * groups
        out = base * expansion
        blocks = []
        for b in range(count):
            stride = 2 if (s > 0 and b == 0) else 1
            shortcut = "conv" if (stride != 1 or width != out) else "identity"
            blocks.append(BlockSpec([inner] * (2 if block == "bottleneck" else 1), out, stride, shortcut, groups))
            width = out
        stages.append(blocks)
    return ResNetSpec(block, 64, stages, num_classes, in_channels, preact, imagenet_stem=True)


def cifar_resnext_spec(depth: int, cardinality: int, width_per_group: int, *, num_classes: int = 10,
                       in_channels: int = 3) -> ResNetSpec:
    """CIFAR ResNeXt of Xie et al. (2017): 64-wide 3x3 stem, 3 stages of (depth − 2)/9 bottleneck blocks,
    group width `width_per_group`·2^stage, outputs 256/512/1024, projection shortcuts where shapes change."""
    if depth < 11 or (depth - 2) % 9:
        raise SpecError(f"depth {depth}: a CIFAR ResNeXt has depth 9n+2")
    stages, width = [], 64
    for s in range(3):
        inner, out = cardinality * width_per_group * 2 ** s, 256 * 2 ** s
        blocks = []
        for b in range((depth - 2) // 9):
            stride = 2 if (s > 0 and b == 0) else 1
            shortcut = "conv" if (stride != 1 or width != out) else "identity"
            blocks.append(BlockSpec([inner, inner], out, stride, shortcut, cardinality))
            width = out
        stages.append(blocks)
    return ResNetSpec("bottleneck", 64, stages, num_classes, in_channels, family="resnet")


VGG_LAYOUTS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def vgg_spec(depth: int, *, num_classes: int = 10, in_channels: int = 3) -> ConvNetSpec:
    """CIFAR VGG with BatchNorm (as in network slimming): 3x3 convs, 2x2 max-pools, one linear head."""
    if depth not in VGG_LAYOUTS:
        raise SpecError(f"depth {depth}: VGG depths are {sorted(VGG_LAYOUTS)}")
    layers: list[ConvLayerSpec] = []
    for item in VGG_LAYOUTS[depth]:
        if item == "M":
            layers[-1].pool = "max2"
        else:
            layers.append(ConvLayerSpec(item))
    return ConvNetSpec(layers, num_classes, in_channels)


def cnn4_spec(*, num_classes: int = 10, in_channels: int = 3) -> ConvNetSpec:
    """The 4-layer CNN of Ye et al. (2018): 5x5/96, 5x5/192, 3x3/192 with 3x3/2 pools, then a 4x4 'fc' conv/384."""
    return ConvNetSpec([ConvLayerSpec(96, 5, pool="max3s2"), ConvLayerSpec(192, 5, pool="max3s2"),
                        ConvLayerSpec(192, 3, pool="max3s2"), ConvLayerSpec(384, 4, padding=0)],
                       num_classes, in_channels)


def _round_to_8(width: float) -> int:
    """A width rounded to the nearest multiple of 8, never below 8 nor 10% below `width` (as MobileNet's
    reference code rounds scaled widths)."""
    rounded = max(8, int(width + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * width else rounded


# (expansion t, output width c, blocks n, first stride s) of each stage: Sandler et al. (2018), Table 2
MOBILENET_V2_STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1)]


def mobilenet_v2_spec(*, cifar: bool = False, width_mult: float = 1.0, num_classes: int = 1000,
                      in_channels: int = 3) -> MobileNetV2Spec:
    """MobileNetV2 as torchvision builds it (widths × `width_mult`, rounded to multiples of 8; head 1280,
    or more when widened). `cifar`: for 28–32 px images the stem and the second stage's first block
    have stride 1 instead of 2, so the last feature map is 4×4 at 32 px (8× down, not 32×)."""
    stem = _round_to_8(32 * width_mult)
    stages, width = [], stem
    for s, (t, c, n, first_stride) in enumerate(MOBILENET_V2_STAGES):
        out = _round_to_8(c * width_mult)
        blocks = []
        for b in range(n):
            stride = 1 if (b > 0 or (cifar and s == 1)) else first_stride
            shortcut = "identity" if stride == 1 and width == out else "none"
            blocks.append(InvertedResidualSpec([int(round(width * t))], out, stride, shortcut, expand=t != 1))
            width = out
        stages.append(blocks)
    return MobileNetV2Spec(stem, stages, _round_to_8(1280 * max(1.0, width_mult)), num_classes, in_channels,
                           stem_stride=1 if cifar else 2)


def apply_units(spec: ResNetSpec, units: list[tuple[int, bool]]) -> ResNetSpec:
    """Prune whole blocks with the compact per-stage form `[(blocks_kept, first_block_kept), ...]`.

    A stage whose first block (the one with the projection shortcut) is pruned keeps that shortcut
    as a branch-less block, so shapes still hold; kept non-first blocks are taken in order.
    """
    if len(units) != len(spec.stages):
        raise SpecError(f"units: {len(units)} entries for {len(spec.stages)} stages")
    pruned = copy.deepcopy(spec)
    for s, (unit, stage) in enumerate(zip(units, pruned.stages)):
        if not (isinstance(unit, (list, tuple)) and len(unit) == 2 and isinstance(unit[0], int)
                and not isinstance(unit[0], bool) and isinstance(unit[1], bool)):
            raise SpecError(f"units[{s}]: expected (blocks_kept, first_block_kept), got {unit!r}")
        kept, first_kept = unit
        rest_kept = kept - 1 if first_kept else kept
        if kept < 0 or kept > len(stage) or (first_kept and kept == 0) or rest_kept > len(stage) - 1:
            raise SpecError(f"units[{s}]: cannot keep {kept} blocks (first kept: {first_kept}) of {len(stage)}")
        first = stage[0]
        if not first_kept:
            first = BlockSpec([], first.out, first.stride, first.shortcut) if first.shortcut != "identity" else None
        pruned.stages[s] = ([first] if first is not None else []) + stage[1:1 + rest_kept]
    validate(pruned)
    return pruned


def count_layers(spec: Spec) -> int:
    """Weighted layers as papers count them: convs on residual branches plus stem and classifier."""
    if isinstance(spec, ConvNetSpec):
        return len(spec.layers) + 1
    if isinstance(spec, MobileNetV2Spec):  # stem, head conv and classifier; 2 or 3 convs per block
        return 3 + sum(2 + block.expand for _, _, block in spec.blocks())
    return 2 + sum(len(block.inner) + (1 if block.has_branch else 0) for _, _, block in spec.blocks())


@dataclass
class StreamSegment:
    """A stretch of a ResNet's residual stream at one width: from the stem, or from a block with a conv
    or zero-pad shortcut, to the next such block. `carried`: for a zero-pad start, the position each
    channel of the previous segment lands at (its other channels start at zero)."""

    width: int
    blocks: list[tuple[int, int]]
    carried: list[int] | None = None

    @property
    def own(self) -> list[int]:
        """The positions of the channels this segment does not carry in."""
        carried = set(self.carried or ())
        return [c for c in range(self.width) if c not in carried]


def stream_segments(spec: ResNetSpec) -> list[StreamSegment]:
    """The residual stream's segments, the stem's first."""
    segments = [StreamSegment(spec.stem, [])]
    for s, b, block in spec.blocks():
        if block.shortcut != "identity":
            previous = segments[-1].width
            carried = None if block.shortcut == "conv" else (block.pad_index or list(range(previous)))
            segments.append(StreamSegment(block.out, [], carried))
        segments[-1].blocks.append((s, b))
    return segments


def stage_table(spec: Spec) -> list[dict]:
    """One row per stage (ResNet) or layer (plain net) with the blocks and widths kept."""
    if isinstance(spec, ConvNetSpec):
        return [{"layer": i, "width": layer.width} for i, layer in enumerate(spec.layers)]
    return [{"stage": s, "blocks": sum(b.has_branch for b in stage),
             "inner": [b.inner for b in stage if b.has_branch], "out": stage[-1].out if stage else None}
            for s, stage in enumerate(spec.stages)]
