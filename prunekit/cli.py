"""`prunekit` command line: train, eval, info, compress, finetune, scratch, stages, report, export, run."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import json
import math
import sys
from dataclasses import fields
from pathlib import Path

from . import spec as specs
from .config import CHOICES, DATASETS, MAX_LR, Config, ConfigError, resolve
from .errors import MAX_NESTING, check_nesting, one_line

MAX_IMAGE_SIZE = 4096  # info and export build a zero input of this side
CONFIG_DEFAULTS = Config().to_dict()
FINETUNE_FLAGS = {"epochs": "finetune_epochs", "lr": "finetune_lr"}  # `prunekit finetune --epochs E --lr L`
ALIASES = {"batch_size": ("-b",), "num_workers": ("-j", "--workers")}  # as torchvision's reference scripts

OPTION_HELP = {
    "model": "zoo name (resnet20, preresnet110, resnet50, resnext29_8x64d, mobilenet_v2, mobilenet_v2_cifar, vgg16, "
             "cnn4, ...), a spec .json file, or torchvision:NAME (resnet18–152, resnext50_32x4d, resnext101_32x8d, "
             "wide_resnet50_2/101_2, mobilenet_v2)",
    "weights": "initial weights: a state_dict file, .pth (loaded with weights_only) or .safetensors, e.g. "
               "torchvision's; a classifier for another class count is left out (default: none)",
    "teacher": "distil from this run or export (Hinton KD on the logits) during training (default: none)",
    "kd_weight": "weight of the distillation term (with --teacher)",
    "kd_temperature": "softmax temperature of the distillation term (with --teacher)",
    "rewind": "LR rewinding (Renda et al.): follow the last --epochs epochs of the schedule (--schedule, peak --lr) "
              "of a run of this many epochs; fine-tuning then replays the original run's schedule instead of "
              "cosine decay from --finetune-lr; a run from scratch keeps it for fine-tuning its exports; 0: no "
              "rewinding",
    "compile": "torch.compile the training forward pass",
    "channels_last": "NHWC activations and weights (default on; FM-R20 on a 2-core CPU: 1.2–1.4× faster; always on with CUDA)",
    "amp": "mixed precision: bf16 autocast (fp16 with a loss scaler on GPUs without bf16); on a CPU without "
           "AVX-512 bf16 it is ~10× slower",
    "num_workers": "image-folder loader processes (default: the cores this process may use, minus one, at most 16)",
    "sync_bn": "under torchrun: synchronise BatchNorm statistics across processes",
    "batch_size": "per process: under torchrun the global batch is this × the number of processes (logged)",
    "data": "dataset: Fashion-MNIST or MNIST idx files, CIFAR-10/100 python pickles, SVHN .mat files, "
            "scikit-learn's digits, or ImageNet-style class folders (imagenet: DIR/{train,val}/CLASS/IMAGE, "
            "any number of classes); finetune and scratch default to the data of the run the export came from",
    "data_dir": "directory holding the dataset's files (default: /usr/share/datasets/fashion-mnist for "
                "Fashion-MNIST; digits needs none; any other dataset needs one)",
    "train_subset": "train on this many training images only: a seeded draw across the classes of an image "
                    "folder, the first N of the other datasets (default: all)",
    "val_split": "hold out this many training images (a seeded draw) as a validation set scored every epoch",
    "pad": "pad-and-crop augmentation: zero padding in pixels (default: 4 for 32×32 images, 2 for 28×28, else 0)",
    "flip": "random horizontal flips (default: on, except for digits, SVHN and MNIST)",
    "epochs": "training epochs",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum",
    "weight_decay": "L2 weight decay",
    "schedule": "learning-rate schedule: one-cycle, cosine, step (×--lr-gamma at each of --milestones), constant, "
                "or piecewise (--lr-schedule with ε-ResNet's restarts)",
    "milestones": "step schedule: the epochs at which the learning rate is multiplied by --lr-gamma",
    "lr_gamma": "step schedule: the factor applied at each milestone",
    "warmup_epochs": "linear learning-rate warm-up (cosine, step and constant schedules)",
    "label_smoothing": "label smoothing of the cross-entropy loss",
    "seed": "random seed of the initial weights, the shuffles and the augmentation",
    "device": "auto (CUDA when there is a GPU, else the CPU), cpu, mps, cuda or cuda:N",
    "on_nan": "on a non-finite loss: stop the run (the last checkpoint stays), or skip the step",
    "method": "sparsity method: none (dense), sss (Huang & Wang), binary-gate, ista-bn (Ye et al.), slimming "
              "(Liu et al.) or epsilon-resnet (Yu et al.)",
    "penalty": "the method's L1 strength (APG γ, ISTA ρ, slimming s) (default: the method's own)",
    "gate_momentum": "SSS and binary gates: momentum of the APG gate optimizer",
    "epsilon": "ε-ResNet: a residual branch whose outputs all lie within ε of zero is discarded",
    "discard_tolerance": "ε-ResNet --discard-rule weights: how near zero a discarded branch's decayed weights must be",
    "threshold": "binary-gate: a gate whose float value is below this is off",
    "side_weight": "ε-ResNet: weight of the side classifier's cross-entropy",
    "lr_schedule": "piecewise schedule: a JSON mapping of epoch to learning rate, e.g. '{\"0\": 0.1, \"80\": 0.01}' "
                   "(default: --lr throughout)",
    "lr_restart_schedule": "piecewise schedule: the JSON mapping followed, from the next epoch, once more blocks "
                           "are discarded (default: --lr-schedule)",
    "prune_percent": "slimming: prune the channels whose |γ| lies below this global percentile (default: the "
                     "percentile that meets --target-macs, if given)",
    "gamma_rescale": "ISTA: Ye et al.'s function-preserving γ-W rescaling by this factor before training",
    "target_macs": "budget: the MACs to land on, a fraction of the dense model's (≤ 1) or a count (> 1); "
                   "without this or --target-params, no budget",
    "target_params": "budget: the parameters to land on, a fraction of the dense model's (≤ 1) or a count (> 1)",
    "target_epoch_fraction": "budget: the share of the epochs by which the target is met; the dead set is then "
                             "frozen",
    "sparse_epochs": "run: epochs of sparse training",
    "finetune_epochs": "run: epochs of fine-tuning",
    "finetune_lr": "run: learning rate of fine-tuning",
    "lr": f"peak learning rate, at most {MAX_LR:g}",
    "sss_structures": "what SSS gates: channels, blocks, groups (ResNeXt) or a '+' join",
    "discard_rule": "ε-ResNet: average (moving average reads 1, the authors' code), weights (also decayed to "
                    "within --discard-tolerance) or majority (ours: average ≥ 0.5, no evaluation dips while it "
                    "climbs to 1)",
    "budget_rule": "with a target: exact (penalty per structure ∝ its cost, the freeze ranks |factor|/cost) or "
                   "paper (only the paper's knob is steered: γ, ρ with Ye's c_l, ε; what dies is the paper's rule, "
                   "a final freeze ranks by |factor|)",
    "budget_freeze": "with a target: freeze the dead set as soon as the target is met (target) or keep steering the "
                     "penalty along its ramp, structures free to come back, until --target-epoch-fraction (deadline)",
    "budget_rank": "with a target and the exact rule, for sss, binary-gate and ista-bn: cost (each structure's "
                   "penalty, steered, and freeze rank weighted by the MACs it saves: fast, shallower networks) or "
                   "magnitude (the method's own penalty, unsteered; the freeze at the deadline ranks |factor| alone, "
                   "as slimming does: every stage keeps width and depth) or normalized (magnitude, each |factor| "
                   "over its layer's mean, as Torch-Pruning's GroupNorm ranks: channels from every layer)",
    "round_to": "kept widths are multiples of N (or the full width); the budget counts the rounded widths "
                "(default: 8 on a CUDA device, 1 elsewhere)",
    "stream_channels": "also prune residual-stream channels (one factor per channel, shared by every block of its "
                       "stretch of the stream and by zero-pad shortcuts; post-activation ResNets; sss, binary-gate, "
                       "ista-bn, slimming)",
    "stage_penalties": "stages: ρ (the method's penalty) per stage; 0 fine-tunes",
    "stage_epochs": "stages: epochs per stage",
    "stage_lrs": "stages: learning rate per stage",
    "weight_average": "ISTA: keep an exponential moving average of the weights with this decay (Ye et al.: "
                      "0.999) and end training on it, dead channels chosen by the raw γ = 0",
    "extra_data": "SVHN: train on train_32x32.mat + extra_32x32.mat (as ε-ResNet's authors)",
    "init": "start from the weights of a run (its final model) or a compressed export (give its spec as --model) "
            "(default: a fresh initialisation)",
    "epsilon_start_epoch": "ε-ResNet: ε is 0 before this epoch (the authors' CIFAR code: 150)",
}


def _shown(value) -> str:
    """A default as --help shows it (a list as it is typed, a None as 'none')."""
    if isinstance(value, list):
        value = " ".join(f"{v:g}" for v in value) or None
    return ("none" if value is None else str(value)).replace("%", "%%")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default. A Config flag is None until given (a recipe's value stands),
    so it shows the subcommand's own default, `defaults()` over Config's; a plain switch (--force) shows none."""

    def __init__(self, prog: str, defaults=dict, **kwargs):  # defaults: called only when help is shown
        super().__init__(prog, **kwargs)
        self.defaults = defaults

    def _get_help_string(self, action: argparse.Action) -> str:
        default, config_field = action.default, getattr(action, "config_field", False)
        if config_field:
            default = {**CONFIG_DEFAULTS, **self.defaults()}[action.dest]
        if (not action.option_strings or default is argparse.SUPPRESS or "(default" in action.help
                or isinstance(action, argparse._StoreTrueAction) or default is None and not config_field):
            return action.help
        return f"{action.help} (default: {_shown(default)})"


def _main_job_defaults() -> dict:
    from .pipeline import MAIN_JOB  # only when `prunekit run --help` is shown: it imports torch

    return MAIN_JOB


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other prunekit error (exit status 2), and
    whose --help shows defaults."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

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
    parser.add_argument("--recipe", help="YAML recipe; flags given here override its values (default: none)")
    for f in fields(Config):
        flags = sorted(["--" + f.name.replace("_", "-"), *ALIASES.get(f.name, ())],
                       key=lambda flag: flag.startswith("--"))  # -b, --batch-size
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        options = {"dest": f.name, "default": None, "help": OPTION_HELP[f.name]}
        if kind.startswith("bool"):
            options["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("list"):
            options.update(type=float, nargs="*")
        elif kind.startswith("dict"):
            options["type"] = json_mapping
        else:
            options["type"] = int if kind.startswith("int") else float if kind.startswith("float") else str
            options["choices"] = CHOICES.get(f.name)
        parser.add_argument(*flags, **options).config_field = True


def _add_out(parser: argparse.ArgumentParser, help: str, **options) -> None:
    parser.add_argument("--out", "--output-dir", dest="out", help=help, **options)


def _config(args, defaults: dict | None = None) -> Config:
    overrides = {f.name: getattr(args, f.name) for f in fields(Config)}
    return resolve(args.recipe, overrides, defaults)


DATA_FIELDS = ("data", "data_dir", "train_subset", "extra_data", "pad", "flip")  # what a retraining inherits
SCHEDULE_FIELDS = ("lr", "schedule", "warmup_epochs", "milestones", "lr_gamma")  # what LR rewinding replays
RETRAIN_FIELDS = ("finetune_epochs", "finetune_lr", "rewind")  # a recipe's retraining protocol


def _source_data(path, fields: tuple[str, ...] = DATA_FIELDS) -> dict:
    """The data fields of the run an export (or a spec) came from, as defaults for retraining it: a
    compressed Fashion-MNIST model is fine-tuned on Fashion-MNIST unless a recipe or flag says otherwise."""
    from .runner import source_config

    recorded = source_config(path)
    return {k: getattr(recorded, k) for k in fields} if recorded else {}


def cmd_train(args) -> int:
    from .runner import train

    result = train(_config(args), args.out, resume=args.resume, force=args.force)
    last = result["history"][-1] if result["history"] else {}
    print(f"trained {args.out}: test accuracy {last.get('test_acc', float('nan')):.4f}")
    return 0


def usual_dataset(spec: specs.Spec) -> str:
    """The dataset a network of this shape is usually trained on, which sizes its input where no run
    records one: ImageNet for an ImageNet stem (ResNet's 7×7/2 and pool, MobileNetV2's stride 2), else
    Fashion-MNIST for one input channel, CIFAR-10 for more."""
    if (isinstance(spec, specs.ResNetSpec) and spec.imagenet_stem
            or isinstance(spec, specs.MobileNetV2Spec) and spec.stem_stride == 2):
        return "imagenet"
    return "fashion-mnist" if spec.in_channels == 1 else "cifar10"


def saved_image_size(path: str | Path, spec: specs.Spec, data: str | None = None) -> int:
    """The input side of a saved model: `data`'s if given, else its run's (config.json, or the run an
    export's card.json names), else its usual dataset's."""
    from .data import dataset_info
    from .runner import input_size, source_config

    recorded = None if data else source_config(path)
    if recorded is not None:
        return input_size(recorded)[1]
    return dataset_info(data or usual_dataset(spec))["image_size"]


def cmd_eval(args) -> int:
    from .compress import load_any
    from .config import make_config
    from .data import dataset_info
    from .distributed import DistContext, pick_device
    from .engine import Trainer, TrainingError
    from .runner import check_device, make_loaders, source_config
    from .schedule import LRPolicy

    model, spec = load_any(args.path)
    recorded = source_config(args.path)
    if recorded is None and args.data is None:
        raise ConfigError(f"{args.path}: no record of the run it came from (its config.json, or the run an export's "
                          f"card.json names); give --data")
    run = recorded.to_dict() if recorded else {}
    data = args.data or run["data"]
    given = {"data": data, "data_dir": args.data_dir or (run.get("data_dir") if data == run.get("data") else None),
             "batch_size": args.batch_size, "device": args.device, "val_split": 0}
    if args.num_workers is not None:
        given["num_workers"] = args.num_workers
    config = make_config({**run, **given}, "options")
    check_device(config.device)
    info = dataset_info(config.data, config.data_dir)
    if (spec.in_channels, spec.num_classes) != (info["in_channels"], info["num_classes"]):
        raise ConfigError(f"{args.path}: the model takes {spec.in_channels} input channels and has "
                          f"{spec.num_classes} classes; {config.data} has {info['in_channels']} and "
                          f"{info['num_classes']}")
    ctx = DistContext(device=pick_device(config.device))
    _, loaders = make_loaders(config, ctx)
    trainer = Trainer(model, [], LRPolicy(0.0, 1), None, loaders, epochs=0, ctx=ctx)
    result = trainer.evaluate(loaders["test"])
    if not math.isfinite(result["loss"]):
        raise TrainingError(f"{args.path}: the test loss is not finite (the model's outputs overflow: its training "
                            f"diverged)")
    print(json.dumps({"path": str(args.path), "data": config.data, "test_loss": result["loss"],
                      "test_acc": result["acc"]}))
    return 0


def _saved_spec(path: Path) -> specs.Spec:
    """The spec of a spec file, a run directory (its final/ model) or an export."""
    if path.is_dir():
        path = path / "final" / "spec.json" if (path / "final").is_dir() else path / "spec.json"
    return specs.load(path)


def cmd_info(args) -> int:
    from .data import dataset_info
    from .measure import spec_cost
    from .models import zoo_spec

    saved = args.model.endswith(".json") or Path(args.model).is_dir()
    if saved:
        if args.num_classes or args.in_channels:
            raise ConfigError(f"{args.model}: --num-classes and --in-channels size a zoo model; a saved spec has "
                              f"its own")
        spec = _saved_spec(Path(args.model))
        size = args.image_size or saved_image_size(args.model, spec, args.data)
    else:
        probe = zoo_spec(args.model, num_classes=args.num_classes or 10, in_channels=args.in_channels or 3)
        info = dataset_info(args.data or usual_dataset(probe))
        spec = zoo_spec(args.model, num_classes=args.num_classes or info["num_classes"],
                        in_channels=args.in_channels or info["in_channels"])
        size = args.image_size or info["image_size"]
    specs.check_input_size(spec, size)
    cost = spec_cost(spec, (size, size))
    print(json.dumps({"spec": specs.to_dict(spec)}) if args.json else specs.to_json(spec))
    print(f"layers {specs.count_layers(spec)}  params {cost.params:,}  MACs {cost.macs:,} "
          f"(input {spec.in_channels}x{size}x{size})")
    return 0


def cmd_compress(args) -> int:
    from .compress import compress_run

    card = compress_run(args.path, args.out, method=args.method, prune_percent=args.prune_percent,
                        tolerance=args.tolerance, data=args.data, data_dir=args.data_dir, force=args.force)
    print(json.dumps(card, indent=1))
    return 0


def cmd_run(args) -> int:
    from .distributed import init_distributed
    from .pipeline import MAIN_JOB, run_pipeline
    from .runner import main_rank_lock

    config = _config(args, MAIN_JOB)
    with main_rank_lock(Path(args.out), init_distributed(config.device)):
        run_pipeline(config, args.out, resume=args.resume, force=args.force)
    return 0


def cmd_finetune(args) -> int:
    from .protocols import finetune

    config = _config(args, _source_data(args.path, DATA_FIELDS + SCHEDULE_FIELDS + RETRAIN_FIELDS))
    explicit = {field: getattr(args, flag) for flag, field in FINETUNE_FLAGS.items()}  # validated as the flags
    if config.rewind:  # rewinding replays the original schedule: --lr is its peak
        explicit["lr"] = explicit.pop("finetune_lr")
    config = dataclasses.replace(config, **{k: v for k, v in explicit.items() if v is not None})
    result = finetune(args.path, config, args.out, resume=args.resume, force=args.force)
    print(f"fine-tuned {args.out}: test accuracy {result['history'][-1]['test_acc']:.4f}")
    return 0


def cmd_scratch(args) -> int:
    from .protocols import scratch

    result = scratch(args.path, _config(args, _source_data(args.path)), args.out, budget=args.budget,
                     resume=args.resume, force=args.force)
    print(f"scratch-{args.budget} {args.out}: {result['history'][-1]['epoch']} epochs, "
          f"test accuracy {result['history'][-1]['test_acc']:.4f}")
    return 0


def cmd_stages(args) -> int:
    from .distributed import init_distributed
    from .protocols import multi_stage
    from .runner import main_rank_lock

    config = _config(args)
    ctx = init_distributed(config.device)
    with main_rank_lock(Path(args.out), ctx):
        summary = multi_stage(config, args.out, resume=args.resume, force=args.force)
    if ctx.is_main:
        print(json.dumps(summary, indent=1))
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    print(write_report(args.paths, args.out))
    return 0


def cmd_export(args) -> int:
    import torch

    from .compress import load_any

    if not (args.onnx or args.pt2):
        raise ConfigError("nothing to write: give --onnx FILE, --pt2 FILE or both")
    if args.onnx:
        try:
            import onnx  # noqa: F401  (torch.onnx needs it to write the file)
        except ImportError:
            raise ConfigError("ONNX export needs the onnx package: pip install 'prunekit[onnx]'") from None
    model, spec = load_any(args.path)
    side = args.image_size or saved_image_size(args.path, spec)
    specs.check_input_size(spec, side)
    example = torch.zeros(2, spec.in_channels, side, side)  # batch 2: a batch of 1 would be specialised
    if args.onnx:
        torch.onnx.export(model.eval(), example, args.onnx, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        print(args.onnx)
    if args.pt2:
        program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, args.pt2)
        print(args.pt2)
    return 0


def _version() -> str:
    try:
        return importlib.metadata.version("prunekit")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="prunekit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do (prunekit COMMAND --help lists its options)")
    run_options = {"resume": "continue the run in the output directory from its last checkpoint",
                   "force": "overwrite a different run in the output directory"}

    def add_run_flags(p: argparse.ArgumentParser) -> None:
        for name, text in run_options.items():
            p.add_argument(f"--{name}", action="store_true", help=text)

    p = sub.add_parser("train", help="train (dense or sparse) into a run directory")
    _add_config_options(p)
    _add_out(p, "run directory", required=True)
    add_run_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="test accuracy of a run directory, a saved gated model or an export")
    p.add_argument("path", help="run directory (its final/ model), saved gated model or compressed export")
    p.add_argument("--data", choices=DATASETS, help="dataset to score on (default: the one its run was trained on)")
    p.add_argument("--data-dir", help="the dataset's directory (default: its run's, for the run's dataset)")
    p.add_argument("-b", "--batch-size", type=bounded(int, 1, 65536), default=256, help="evaluation batch size")
    p.add_argument("-j", "--workers", "--num-workers", dest="num_workers", type=bounded(int, 0, 256),
                   help=f"{OPTION_HELP['num_workers'][:-1]}; the run's if it set one)")
    p.add_argument("--device", default="auto", help=OPTION_HELP["device"])
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="spec, layers, parameters and MACs of a zoo model, spec file, run or export")
    p.add_argument("model", help="zoo name (resnet20, resnet50, vgg16, cnn4, ...), spec .json file, run directory "
                                 "or compressed export")
    p.add_argument("--data", choices=DATASETS,
                   help="size the model for this dataset: its input channels, classes and image size (default: "
                        "the run's; for a zoo name or a lone spec the model's usual dataset: ImageNet for an "
                        "ImageNet stem, else CIFAR-10, or Fashion-MNIST for one input channel)")
    p.add_argument("--num-classes", type=bounded(int, 1, specs.MAX_WIDTH),
                   help="classes of a zoo model's head (default: the dataset's)")
    p.add_argument("--in-channels", type=bounded(int, 1, specs.MAX_WIDTH),
                   help="input channels of a zoo model (default: the dataset's)")
    p.add_argument("--image-size", type=bounded(int, 1, MAX_IMAGE_SIZE),
                   help="input side the MACs are counted at (default: the dataset's, or the run's)")
    p.add_argument("--json", action="store_true", help="print the spec as one line of JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("compress", help="cut dead structures out of a trained run; export spec + weights")
    p.add_argument("path", help="run directory (its final/ model) or a directory with spec.json, gates.json, model.safetensors")
    _add_out(p, "export directory (default: RUN/compressed)")
    p.add_argument("--method", choices=CHOICES["method"], help="selection rule (default: the run's method)")
    p.add_argument("--prune-percent", type=bounded(float, 0, 100),
                   help="slimming: global percentile of |γ| to remove (default: the run's)")
    p.add_argument("--tolerance", type=bounded(float, 0, 1), default=1e-4,
                   help="max relative logit difference (compressed vs gated) before compression refuses")
    p.add_argument("--data", choices=DATASETS, help="check equivalence on this dataset's test images (default: the "
                                                    "run's)")
    p.add_argument("--data-dir", help="the dataset's directory (default: the run's)")
    p.add_argument("--force", action="store_true", help="write into the output directory even if it holds something "
                                                       "other than an export of this run")
    p.set_defaults(func=cmd_compress)

    for name, func, text in (("finetune", cmd_finetune, "fine-tune a compressed export"),
                             ("scratch", cmd_scratch, "train a pruned spec from scratch (scratch-E or scratch-B)")):
        own = {flag: CONFIG_DEFAULTS[field] for flag, field in FINETUNE_FLAGS.items()} if name == "finetune" else {}
        formatter = functools.partial(HelpFormatter, defaults=functools.partial(dict, own))
        p = sub.add_parser(name, help=text, formatter_class=formatter)
        p.add_argument("path", help="compressed export directory" + ("" if name == "finetune" else " or spec .json"))
        _add_config_options(p)
        _add_out(p, "run directory", required=True)
        add_run_flags(p)
        if name == "scratch":
            p.add_argument("--budget", choices=("E", "B"), default="E", help="same epochs (E) or same compute (B)")
        p.set_defaults(func=func)

    p = sub.add_parser("stages", help="multi-stage training (Ye et al.): one run and compressed version per "
                                      "stage_penalties/stage_epochs/stage_lrs entry, each from the previous version")
    _add_config_options(p)
    _add_out(p, "directory for stage-N runs, version-N exports and summary.json", required=True)
    add_run_flags(p)
    p.set_defaults(func=cmd_stages)

    p = sub.add_parser("report", help="Markdown table and PNG plots for pipeline or training runs")
    p.add_argument("paths", nargs="+", help="pipeline or run directories")
    _add_out(p, "report directory", default="report")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="export a model for plain torch (torch.export) or ONNX")
    p.add_argument("path", help="compressed export or run directory")
    p.add_argument("--onnx", help="write an ONNX file here (dynamic batch)")
    p.add_argument("--pt2", help="write a torch.export program here (dynamic batch; loads with torch.export.load, "
                                 "no prunekit needed)")
    p.add_argument("--image-size", type=bounded(int, 1, MAX_IMAGE_SIZE),
                   help="input side (default: the run's, else the model's usual dataset's)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="the main job: dense → sparse to a budget → compress → fine-tune → report",
                       formatter_class=functools.partial(HelpFormatter, defaults=_main_job_defaults))
    _add_config_options(p)
    _add_out(p, "pipeline directory", default="runs/main")
    add_run_flags(p)
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; known errors become one line on stderr and exit status 2."""
    try:
        args, extra = build_parser().parse_known_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error, already printed on one line (2)
        return exc.code
    if extra:
        print(f"prunekit {args.command}: error: unrecognized arguments: {' '.join(extra)}", file=sys.stderr)
        return 2
    from .checkpoint import CheckpointError  # after parsing: --help and usage errors need no torch
    from .compress import CompressionError
    from .data import DataError
    from .distributed import leave_process_group
    from .engine import TrainingError
    from .runner import RunDirError

    finished = False
    try:
        status = args.func(args)
        finished = True
        return status
    except (ConfigError, specs.SpecError, DataError, CheckpointError, TrainingError, RunDirError,
            CompressionError, OSError) as exc:  # OSError: a full disk or a permission problem, the file and why
        print(f"prunekit {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prunekit {args.command}: interrupted; resume with --resume", file=sys.stderr)
        return 130
    finally:
        leave_process_group(wait=finished)


if __name__ == "__main__":
    sys.exit(main())
