"""`prunekit` command line: train, eval, info, compress, finetune, scratch, stages, report, export, run."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import fields
from pathlib import Path

from . import spec as specs
from .config import MAX_LR, Config, ConfigError, resolve
from .errors import MAX_NESTING, check_nesting, one_line

MAX_IMAGE_SIZE = 4096  # info and export build a zero input of this side

OPTION_HELP = {
    "model": "zoo name (resnet20, preresnet110, resnet50, resnext29_8x64d, vgg16, cnn4, ...), a spec .json file, "
             "or torchvision:NAME (resnet18–152, resnext50_32x4d, resnext101_32x8d, wide_resnet50_2/101_2)",
    "weights": "initial weights: a state_dict file, .pth (loaded with weights_only) or .safetensors, e.g. "
               "torchvision's; a classifier for another class count is left out",
    "teacher": "distil from this run or export (Hinton KD on the logits) during training",
    "kd_weight": "weight of the distillation term (with --teacher)",
    "kd_temperature": "softmax temperature of the distillation term (with --teacher)",
    "rewind": "LR rewinding (Renda et al.): follow the last --epochs epochs of the schedule of a run of this many "
              "epochs",
    "compile": "torch.compile the training forward pass",
    "channels_last": "NHWC activations and weights (default on; FM-R20 on a 2-core CPU: 1.2–1.4× faster; always on with CUDA)",
    "amp": "mixed precision: bf16 autocast (fp16 with a loss scaler on GPUs without bf16); on a CPU without "
           "AVX-512 bf16 it is ~10× slower",
    "num_workers": "image-folder loader processes (default: the cores this process may use, minus one, at most 16)",
    "sync_bn": "under torchrun: synchronise BatchNorm statistics across processes",
    "batch_size": "per process: under torchrun the global batch is this × the number of processes (logged)",
    "data": "fashion-mnist, mnist, cifar10, cifar100, svhn, digits or imagenet",
    "method": "none, sss, binary-gate, ista-bn, slimming or epsilon-resnet",
    "penalty": "the method's L1 strength (APG γ, ISTA ρ, slimming s)",
    "lr": f"peak learning rate, at most {MAX_LR:g}",
    "sss_structures": "what SSS gates: channels, blocks, groups (ResNeXt) or a '+' join (default channels+blocks)",
    "discard_rule": "ε-ResNet: average (moving average reads 1, the authors' code) or weights (also decayed to "
                    "within --discard-tolerance)",
    "budget_rule": "with a target: exact (penalty per structure ∝ its cost, the freeze ranks |factor|/cost) or "
                   "paper (only the paper's knob is steered: γ, ρ with Ye's c_l, ε; what dies is the paper's rule, "
                   "a final freeze ranks by |factor|)",
    "stage_penalties": "stages: ρ (the method's penalty) per stage; 0 fine-tunes",
    "stage_epochs": "stages: epochs per stage",
    "stage_lrs": "stages: learning rate per stage",
    "weight_average": "ISTA: keep an exponential moving average of the weights with this decay (Ye et al.: "
                      "0.999) and end training on it, dead channels chosen by the raw γ = 0",
    "extra_data": "SVHN: train on train_32x32.mat + extra_32x32.mat (as ε-ResNet's authors)",
    "init": "start from the weights of a run (its final model) or a compressed export (give its spec as --model)",
    "epsilon_start_epoch": "ε-ResNet: ε is 0 before this epoch (the authors' CIFAR code: 150)",
}


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other prunekit error (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def json_mapping(text: str) -> dict:
    """A JSON mapping given on the command line (e.g. --lr-schedule '{"0": 0.1}')."""
    try:
        value = json.loads(text)
        check_nesting(value)
    except (ValueError, RecursionError):
        raise argparse.ArgumentTypeError(f"not a JSON mapping nested at most {MAX_NESTING} deep: {text[:40]!r}")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON mapping: {text[:40]!r}")
    return value


def bounded(cast, low: float, high: float):
    """An argparse type: `cast` of the text, finite and within [low, high]."""
    def parse(text: str):
        value = cast(text)
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"{text!r} is not within [{low:g}, {high:g}]")
        return value
    parse.__name__ = cast.__name__
    return parse


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field; unset flags leave the recipe's value alone."""
    parser.add_argument("--recipe", help="YAML recipe; flags given here override its values")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind.startswith("bool"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=OPTION_HELP.get(f.name))
        elif kind.startswith("list"):
            parser.add_argument(flag, dest=f.name, type=float, nargs="*", default=None, help=OPTION_HELP.get(f.name))
        elif kind.startswith("dict"):
            parser.add_argument(flag, dest=f.name, type=json_mapping, default=None, help="JSON mapping")
        else:
            cast = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, dest=f.name, type=cast, default=None, help=OPTION_HELP.get(f.name))


def _config(args, defaults: dict | None = None) -> Config:
    overrides = {f.name: getattr(args, f.name) for f in fields(Config)}
    return resolve(args.recipe, overrides, defaults)


def cmd_train(args) -> int:
    from .runner import train

    result = train(_config(args), args.out, resume=args.resume, force=args.force)
    last = result["history"][-1] if result["history"] else {}
    print(f"trained {args.out}: test accuracy {last.get('test_acc', float('nan')):.4f}")
    return 0


def cmd_eval(args) -> int:
    from .compress import load_any
    from .config import make_config
    from .distributed import DistContext, pick_device
    from .engine import Trainer, TrainingError
    from .runner import check_device, make_loaders
    from .schedule import LRPolicy

    config = make_config({"data": args.data, "data_dir": args.data_dir, "batch_size": args.batch_size,
                          "device": args.device}, "options")
    check_device(config.device)
    model, _ = load_any(args.path)
    ctx = DistContext(device=pick_device(config.device))
    _, loaders = make_loaders(config, ctx)
    trainer = Trainer(model, [], LRPolicy(0.0, 1), None, loaders, epochs=0, ctx=ctx)
    result = trainer.evaluate(loaders["test"])
    if not math.isfinite(result["loss"]):
        raise TrainingError(f"{args.path}: the test loss is not finite (the model's outputs overflow: its training "
                            f"diverged)")
    print(json.dumps({"path": str(args.path), "test_loss": result["loss"], "test_acc": result["acc"]}))
    return 0


def cmd_info(args) -> int:
    from .measure import spec_cost
    from .models import zoo_spec

    spec = specs.load(args.model) if args.model.endswith(".json") else zoo_spec(
        args.model, num_classes=args.num_classes, in_channels=args.in_channels)
    specs.check_input_size(spec, args.image_size)
    cost = spec_cost(spec, (args.image_size, args.image_size))
    print(json.dumps({"spec": specs.to_dict(spec)}) if args.json else specs.to_json(spec))
    print(f"layers {specs.count_layers(spec)}  params {cost.params:,}  MACs {cost.macs:,} "
          f"(input {spec.in_channels}x{args.image_size}x{args.image_size})")
    return 0


def cmd_compress(args) -> int:
    from .compress import compress_run

    card = compress_run(args.path, args.out, method=args.method, prune_percent=args.prune_percent,
                        tolerance=args.tolerance, data=args.data, data_dir=args.data_dir, force=args.force)
    print(json.dumps(card, indent=1))
    return 0


def cmd_run(args) -> int:
    from .pipeline import MAIN_JOB, run_pipeline
    from .runner import run_lock

    config = _config(args, MAIN_JOB)
    with run_lock(Path(args.out)):
        run_pipeline(config, args.out, resume=args.resume, force=args.force)
    return 0


def cmd_finetune(args) -> int:
    from .protocols import finetune

    # `prunekit finetune --epochs E --lr L` means the fine-tuning's own epochs and LR
    explicit = {"finetune_epochs": args.epochs, "finetune_lr": args.lr}  # validated as --epochs and --lr
    config = dataclasses.replace(_config(args), **{k: v for k, v in explicit.items() if v is not None})
    result = finetune(args.path, config, args.out, resume=args.resume, force=args.force)
    print(f"fine-tuned {args.out}: test accuracy {result['history'][-1]['test_acc']:.4f}")
    return 0


def cmd_scratch(args) -> int:
    from .protocols import scratch

    result = scratch(args.path, _config(args), args.out, budget=args.budget, resume=args.resume, force=args.force)
    print(f"scratch-{args.budget} {args.out}: {result['history'][-1]['epoch']} epochs, "
          f"test accuracy {result['history'][-1]['test_acc']:.4f}")
    return 0


def cmd_stages(args) -> int:
    from .protocols import multi_stage
    from .runner import run_lock

    config = _config(args)
    with run_lock(Path(args.out)):
        summary = multi_stage(config, args.out, resume=args.resume, force=args.force)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    print(write_report(args.paths, args.out))
    return 0


def cmd_export(args) -> int:
    import torch

    from .compress import load_any

    model, spec = load_any(args.path)
    specs.check_input_size(spec, args.image_size)
    try:
        import onnx  # noqa: F401  (torch.onnx needs it to write the file)
    except ImportError:
        raise ConfigError("ONNX export needs the onnx package: pip install 'prunekit[onnx]'") from None
    size = (spec.in_channels, args.image_size, args.image_size)
    torch.onnx.export(model.eval(), torch.zeros(1, *size), args.onnx, input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    print(args.onnx)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="prunekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (dense or sparse) into a run directory")
    _add_config_options(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--force", action="store_true", help="overwrite a different run in --out")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run directory, compressed export or checkpoint")
    p.add_argument("path")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-dir")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu, mps, cuda or cuda:N")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="spec, parameters and MACs of a zoo model or spec file")
    p.add_argument("model")
    p.add_argument("--num-classes", type=bounded(int, 1, specs.MAX_WIDTH), default=10)
    p.add_argument("--in-channels", type=bounded(int, 1, specs.MAX_WIDTH), default=3)
    p.add_argument("--image-size", type=bounded(int, 1, MAX_IMAGE_SIZE), default=32)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("compress", help="cut dead structures out of a trained run; export spec + weights")
    p.add_argument("path", help="run directory (its final/ model) or a directory with spec.json, gates.json, model.safetensors")
    p.add_argument("--out", help="export directory (default: RUN/compressed)")
    p.add_argument("--method", help="selection rule (default: the run's method)")
    p.add_argument("--prune-percent", type=bounded(float, 0, 100), help="slimming: global percentile of |γ| to remove")
    p.add_argument("--tolerance", type=bounded(float, 0, 1), default=1e-4,
                   help="max relative logit difference (compressed vs gated) before compression refuses")
    p.add_argument("--data", help="evaluate before/after on this dataset (default: the run's)")
    p.add_argument("--data-dir")
    p.add_argument("--force", action="store_true", help="write into --out even if it holds something other than "
                                                       "an export of this run")
    p.set_defaults(func=cmd_compress)

    for name, func, text in (("finetune", cmd_finetune, "fine-tune a compressed export"),
                             ("scratch", cmd_scratch, "train a pruned spec from scratch (scratch-E or scratch-B)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("path", help="compressed export directory (or, for scratch, a spec .json)")
        _add_config_options(p)
        p.add_argument("--out", required=True)
        p.add_argument("--resume", action="store_true")
        p.add_argument("--force", action="store_true")
        if name == "scratch":
            p.add_argument("--budget", choices=("E", "B"), default="E", help="same epochs (E) or same compute (B)")
        p.set_defaults(func=func)

    p = sub.add_parser("stages", help="multi-stage training (Ye et al.): one run and compressed version per "
                                      "stage_penalties/stage_epochs/stage_lrs entry, each from the previous version")
    _add_config_options(p)
    p.add_argument("--out", required=True, help="directory for stage-N runs, version-N exports and summary.json")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_stages)

    p = sub.add_parser("report", help="Markdown table and PNG plots for pipeline or training runs")
    p.add_argument("paths", nargs="+")
    p.add_argument("--out", default="report")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="export a model to ONNX")
    p.add_argument("path", help="compressed export or run directory")
    p.add_argument("--onnx", required=True, help="output .onnx file")
    p.add_argument("--image-size", type=bounded(int, 1, MAX_IMAGE_SIZE), default=28)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="the main job: dense → sparse to a budget → compress → fine-tune → report")
    _add_config_options(p)
    p.add_argument("--out", default="runs/main", help="pipeline directory")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; known errors become one line on stderr and exit status 2."""
    from .checkpoint import CheckpointError
    from .compress import CompressionError
    from .data import DataError
    from .engine import TrainingError
    from .runner import RunDirError

    try:
        args, extra = build_parser().parse_known_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error, already printed on one line (2)
        return exc.code
    if extra:
        print(f"prunekit {args.command}: error: unrecognized arguments: {' '.join(extra)}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ConfigError, specs.SpecError, DataError, CheckpointError, TrainingError, RunDirError,
            CompressionError, OSError) as exc:  # OSError: a full disk or a permission problem, the file and why
        print(f"prunekit {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prunekit {args.command}: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
