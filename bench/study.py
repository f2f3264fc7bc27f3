"""FM-R20 study (issues: protocols, budget): every method steered to a MACs budget, compressed and
fine-tuned; the same pruned spec trained from scratch (E and B); Torch-Pruning at the same budget.

Protocol (issue "protocols"), read from recipes/fmnist-METHOD.yaml: ResNet-20 on Fashion-MNIST, first
20k training images, full test set, SGD Nesterov 0.9, one-cycle LR 0.1, wd 5e-4, batch 128, pad-2 crop + flip.
Sparse training from scratch with `target_macs = 1 - reduction` (2 epochs, the budget reached by the first),
compress, retrain (LR rewinding on a whole 20-epoch one-cycle), or with --rewind 0 the same epochs of cosine from
0.01; the recipes rank by magnitude, SSS's on the inner channels only, ISTA's and binary gates' with the
residual stream.
Torch-Pruning trains the plain ResNet-20 with its pruner's regularizer for the epochs of the SSS recipe, prunes
globally in small steps until the MACs reach the budget, then retrains as that recipe does. --epochs,
--finetune-epochs and --rewind set every row's; --budget-rank magnitude ranks by |factor| alone, unsteered.
Latency: batch 64, 1×28×28, dense and pruned interleaved in one process, median of 3 rounds.

    python bench/study.py --out runs/study --methods sss,ista-bn --reductions 0.3,0.5,0.7 \
        [--scratch sss] [--torch-pruning bn-scale,group-norm] [--seed 1] [--deadline 0.2] [--budget-rule paper] \
        [--stream-channels] [--rewind 0] [--finetune-epochs 10] [--budget-freeze deadline] [--from-dense 5] \
        [--budget-rank magnitude|normalized] [--sss-structures channels] [--model resnet56]

Rows are appended to OUT/rows.jsonl as they finish; a row already there (same seed and deadline) is not run again.
With several seeds of a row, the table is followed by their mean and range.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from prunekit.compress import CompressionError, compress_run
from prunekit.config import SPARSE_ONLY, Config, resolve
from prunekit.distributed import DistContext, pick_device
from prunekit.engine import Callback, Trainer
from prunekit.measure import count_macs, count_params, measure_latency, spec_cost
from prunekit.methods import build_method
from prunekit.models import build
from prunekit.protocols import export_accuracy, finetune, finetune_config, scratch, evaluate_accuracy
from prunekit.runner import input_size, make_loaders, model_spec, train
from prunekit.schedule import make_policy

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
OVERRIDES: dict = {}  # command-line changes to the recipes' protocol (smoke runs)
SSS_DEFAULT = Config.sss_structures
TORCH_PRUNING_REG = {"bn-scale": 1e-4, "group-norm": 1e-4}  # the anchor: slimming with reg 1e-4


def protocol(method: str, **changes):
    """The Config of recipes/fmnist-METHOD.yaml with the command line's and `changes` on top (the dense
    baseline, which prunes nothing, without the sparse-only --stream-channels, --budget-rank and --penalty)."""
    overrides = {**OVERRIDES, **changes}
    if method == "none":
        for name in SPARSE_ONLY:
            overrides.pop(name, None)
    return resolve(RECIPES / f"fmnist-{method}.yaml", overrides)


def retraining(method: str) -> str:
    """The name in the rows of the retraining that `method`'s protocol asks for: LR rewinding (the recipes'
    `rewind`) or, with --rewind 0, cosine fine-tuning; with the retraining epochs where --finetune-epochs set them."""
    rewind = protocol(method).rewind
    name = f"LR rewind {rewind}" if rewind else "fine-tune"
    epochs = OVERRIDES.get("finetune_epochs")
    return name + (f", {epochs} epoch{'s' * (epochs != 1)}" if epochs else "")


def latency_speedup(model: torch.nn.Module, size: tuple[int, ...], rounds: int = 3) -> tuple[float, float]:
    """(pruned ms, dense ms / pruned ms) at batch 64, the dense ResNet-20 timed alternately with `model`."""
    dense = build(model_spec(protocol("none"))).eval()
    pruned_ms, ratios = [], []
    for _ in range(rounds):
        d = measure_latency(dense, size, 64).median_ms
        p = measure_latency(model, size, 64).median_ms
        pruned_ms.append(p)
        ratios.append(d / p)
    return statistics.median(pruned_ms), statistics.median(ratios)


def dense_start(epochs: int, out: Path) -> tuple[dict, float]:
    """(weights, test accuracy) of the recipes' dense ResNet-20 trained `epochs` epochs on its own one-cycle, in
    OUT/dense-EPOCHS[-seedS]: trained once per seed and shared by the rows that start from it (a finished run is
    resumed with no epoch left; one of another configuration is refused, not reused)."""
    config = protocol("none", epochs=epochs, rewind=None)
    where = out / f"dense-{epochs}" if not config.seed else out / f"dense-{epochs}-seed{config.seed}"
    dense = train(config, where, resume=True)
    return dense["model"].state_dict(), dense["history"][-1]["test_acc"]


def prunekit_row(method: str, reduction: float, out: Path, tag: str = "", dense_epochs: int = 0) -> dict:
    """Sparse training to the budget, compression and retraining. With `dense_epochs`, sparse training starts
    from the dense weights of `dense_start` and takes that many epochs fewer, on its own one-cycle, so that
    dense + sparse + retraining epochs equal the row from scratch."""
    config = protocol(method, target_macs=round(1 - reduction, 4))
    start = time.perf_counter()
    if dense_epochs:
        weights, dense_acc = dense_start(dense_epochs, out.parent)
        sparse = train(dataclasses.replace(config, epochs=config.epochs - dense_epochs, rewind=None),
                       out / "sparse", force=True, initial_weights=weights)
    else:
        sparse = train(config, out / "sparse", force=True)
    try:
        card = compress_run(out / "sparse", out / "compressed")
    except CompressionError as exc:  # e.g. a penalty that killed everything: a row that says so
        return {"method": method, "protocol": f"{retraining(method)}{tag}", "reduction_target": reduction,
                "seed": config.seed, "refused": str(exc).split(": ", 1)[-1],
                "sparse_acc": sparse["history"][-1]["test_acc"],
                "minutes": (time.perf_counter() - start) / 60}
    compressed_acc = export_accuracy(out / "compressed", config)
    tuned = finetune(out / "compressed", config, out / "finetune", force=True)
    ms, speedup = latency_speedup(tuned["model"].cpu(), input_size(config))
    return {"method": method, "protocol": f"{retraining(method)}{tag}", "reduction_target": reduction,
            "seed": config.seed,
            "reduction": 1 - card["macs_after"] / card["macs_before"], "sparse_acc": sparse["history"][-1]["test_acc"],
            "compressed_acc": compressed_acc, "final_acc": tuned["history"][-1]["test_acc"],
            "params": card["params_after"], "macs": card["macs_after"], "latency_ms_b64": ms, "speedup_b64": speedup,
            "max_logit_difference": card["max_logit_difference"], "minutes": (time.perf_counter() - start) / 60,
            **({"dense_start_acc": dense_acc} if dense_epochs else {})}


def scratch_row(method: str, reduction: float, budget: str, out: Path, tag: str = "") -> dict:
    """Scratch-E or -B of the spec that `prunekit_row` compressed into out/compressed."""
    config = protocol("none")
    start = time.perf_counter()
    result = scratch(out / "compressed", config, out / f"scratch-{budget}", budget=budget, force=True)
    size = input_size(config)
    ms, speedup = latency_speedup(result["model"].cpu(), size)
    cost, dense = spec_cost(result["spec"], size[1:]), spec_cost(model_spec(config), size[1:])
    return {"method": method, "protocol": f"scratch-{budget}{tag} ({len(result['history'])} epochs)",
            "reduction_target": reduction, "seed": config.seed, "reduction": 1 - cost.macs / dense.macs,
            "sparse_acc": None, "compressed_acc": None, "final_acc": result["history"][-1]["test_acc"],
            "params": cost.params, "macs": cost.macs, "latency_ms_b64": ms, "speedup_b64": speedup,
            "max_logit_difference": None, "minutes": (time.perf_counter() - start) / 60}


class Regularize(Callback):
    """Torch-Pruning's sparsity regularizer, applied to the gradients before every step."""

    def __init__(self, pruner):
        self.pruner = pruner

    def after_backward(self, trainer):
        self.pruner.regularize(trainer.model)


def fit(model, config, run_dir: Path, callbacks) -> list[dict]:
    """Train a plain nn.Module (no spec) with prunekit's loop, loaders and SGD for `config`."""
    ctx = DistContext(device=pick_device(config.device))
    train_loader, eval_loaders = make_loaders(config, ctx)
    optimizers = build_method(model, config, input_size(config)).optimizers
    trainer = Trainer(model, optimizers, make_policy(config), train_loader, eval_loaders, epochs=config.epochs,
                      run_dir=run_dir, callbacks=callbacks, ctx=ctx)
    return trainer.fit()


def torch_pruning_row(pruner_name: str, reduction: float, out: Path, tag: str) -> dict:
    import torch_pruning as tp

    sss = protocol("sss")  # the epochs and retraining of the default method's rows, so that they compare at equal cost
    config = dataclasses.replace(protocol("none"), epochs=sss.epochs, finetune_epochs=sss.finetune_epochs,
                                 rewind=sss.rewind)
    size = input_size(config)
    torch.manual_seed(config.seed)
    model = build(model_spec(config))
    importance = (tp.importance.BNScaleImportance() if pruner_name == "bn-scale"
                  else tp.importance.GroupMagnitudeImportance(p=2))
    pruner_class = tp.pruner.BNScalePruner if pruner_name == "bn-scale" else tp.pruner.GroupNormPruner
    example = torch.randn(1, *size)
    pruner = pruner_class(model, example, importance=importance, reg=TORCH_PRUNING_REG[pruner_name],
                          global_pruning=True, pruning_ratio=1.0, iterative_steps=400, ignored_layers=[model.fc])
    start = time.perf_counter()
    sparse = fit(model, dataclasses.replace(config, rewind=None), out / "sparse", [Regularize(pruner)])  # scratch
    base = count_macs(model, size)
    while count_macs(model, size) > (1 - reduction) * base:  # Torch-Pruning's own recipe for a FLOPs target
        pruner.step()
    pruned_acc = evaluate_accuracy(model, config)
    tuned = fit(model, finetune_config(config), out / "finetune", [])
    torch.save(model.cpu(), out / "finetune" / "pruned-model.pt")  # whole: no spec describes it (bench/latency.py)
    ms, speedup = latency_speedup(model, size)
    macs = count_macs(model, size)
    return {"method": f"torch-pruning {pruner_name}", "protocol": retraining("sss") + tag,
            "reduction_target": reduction,
            "seed": config.seed,
            "reduction": 1 - macs / base, "sparse_acc": sparse[-1]["test_acc"],
            "compressed_acc": pruned_acc, "final_acc": tuned[-1]["test_acc"], "params": count_params(model),
            "macs": macs, "latency_ms_b64": ms, "speedup_b64": speedup,
            "max_logit_difference": None, "minutes": (time.perf_counter() - start) / 60}


def pct(x) -> str:
    return "–" if x is None else f"{x:.2%}"


def row_key(r: dict) -> tuple:
    """Rows with the same key differ only in their seed (rows written before seeds were recorded: seed 0)."""
    return r["reduction_target"], r["method"].startswith("torch"), r["method"], r["protocol"]


def table(rows: list[dict]) -> str:
    lines = ["| method | protocol | MACs reduction target | seed | achieved | within ±2% | sparse acc | "
             "right after compression | final acc | params | latency b64 ms | speed-up b64 | minutes |",
             "|" + "---|" * 13]
    for r in sorted(rows, key=lambda r: (*row_key(r), r.get("seed", 0))):
        if "refused" in r:
            lines.append(f"| {r['method']} | {r['protocol']} | {r['reduction_target']:.0%} | {r.get('seed', 0)} | "
                         f"compression refused: {r['refused'][:90]} | | {pct(r['sparse_acc'])} |" + " |" * 6 +
                         f" {r['minutes']:.1f} |")
            continue
        within = "yes" if abs(r["reduction"] - r["reduction_target"]) <= 0.02 else "no"
        lines.append(f"| {r['method']} | {r['protocol']} | {r['reduction_target']:.0%} | {r.get('seed', 0)} | "
                     f"{r['reduction']:.1%} | {within} | {pct(r['sparse_acc'])} | {pct(r['compressed_acc'])} | "
                     f"{pct(r['final_acc'])} | {r['params']:,} | {r['latency_ms_b64']:.1f} | "
                     f"{r['speedup_b64']:.2f}x | {r['minutes']:.1f} |")
    return "\n".join(lines)


def seed_summary(rows: list[dict]) -> str:
    """Mean and range over seeds of the final accuracy and speed-up, for rows run with more than one seed."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(row_key(r), []).append(r)
    lines = ["| method | protocol | MACs reduction target | seeds | final acc mean | final acc range | "
             "speed-up b64 mean |", "|" + "---|" * 7]
    for key in sorted(k for k, group in groups.items() if len(group) > 1):
        group = groups[key]
        final = [r["final_acc"] for r in group]
        lines.append(f"| {group[0]['method']} | {group[0]['protocol']} | {key[0]:.0%} | "
                     f"{', '.join(str(r.get('seed', 0)) for r in group)} | {pct(statistics.mean(final))} | "
                     f"{pct(min(final))}–{pct(max(final))} | "
                     f"{statistics.mean(r['speedup_b64'] for r in group):.2f}x |")
    return "\n".join(lines) if len(lines) > 2 else ""


def row_naming(method: str, args, total: int) -> tuple[str, str]:
    """(directory suffix, label tag) of a method's rows: the command line's changes, and the residual stream and the
    rank that its resolved protocol prunes with (its recipe's own, or --stream-channels / --budget-rank)."""
    config = protocol(method)
    stream, rank, paper = config.stream_channels, config.budget_rank, args.budget_rule == "paper"
    rank = rank if rank != "cost" else ""
    structures = config.sss_structures if method == "sss" and config.sss_structures != SSS_DEFAULT else ""
    suffix = (f"-{args.model}" if args.model else "") + (f"-by{args.deadline}" if args.deadline else "") + \
        (f"-seed{args.seed}" if args.seed else "") + ("-paper" if paper else "") + ("-stream" if stream else "") + \
        ("-deadline" if args.budget_freeze == "deadline" else "") + (f"-{rank}" if rank else "") + \
        (f"-{structures}" if structures else "") + (f"-penalty{args.penalty:g}" if args.penalty is not None else "") + \
        (f"-dense{args.from_dense}-{total}" if args.from_dense else "") + \
        ({None: "", 0: "-cosine"}.get(args.rewind, f"-rewind{args.rewind}")) + \
        (f"-ft{args.finetune_epochs}" if args.finetune_epochs else "") + \
        (f"-e{args.epochs}" if args.epochs and not args.from_dense else "")
    tag = sparse_label(args, total) + (f", budget by {args.deadline:.0%}" if args.deadline else "") + \
        (", paper rule" if paper else "") + (", stream" if stream else "") + \
        (", frozen at deadline" if args.budget_freeze == "deadline" else "") + \
        (f", {rank} rank" if rank else "") + (f", SSS on {structures}" if structures else "") + \
        (f", penalty {args.penalty:g}" if args.penalty is not None else "")
    return suffix, tag


def sparse_label(args, total: int) -> str:
    """The rows' note on the model and the sparse epochs set by the command line (--model, --from-dense, --epochs)."""
    return (f", {args.model}" if args.model else "") + \
        (f", dense {args.from_dense} + sparse {total - args.from_dense}" if args.from_dense else
         f", sparse {args.epochs}" if args.epochs else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/study")
    parser.add_argument("--methods", default="sss,ista-bn,slimming,binary-gate,epsilon-resnet")
    parser.add_argument("--reductions", default="0.5", help="MACs reductions, comma-separated (0.5: half the MACs)")
    parser.add_argument("--scratch", default="", help="methods whose pruned spec is also trained scratch-E and -B")
    parser.add_argument("--torch-pruning", default="", help="bn-scale and/or group-norm (needs the 'bench' extra)")
    parser.add_argument("--table", action="store_true", help="only print the table of OUT/rows.jsonl")
    parser.add_argument("--epochs", type=int, help="sparse epochs instead of the recipes' (a smoke run: 1)")
    parser.add_argument("--finetune-epochs", type=int, help="retraining epochs instead of the recipes'")
    parser.add_argument("--train-subset", type=int, help="instead of the recipes' 20000")
    parser.add_argument("--seed", type=int, default=0, help="initialization and data order (the recipes': 0)")
    parser.add_argument("--model", help="a zoo model instead of the recipes' resnet20 (e.g. resnet56), for every row "
                                        "and the dense network the speed-ups are measured against")
    parser.add_argument("--budget-rule", choices=("exact", "paper"),
                        help="the controller's rule (recipes: exact); paper rows carry ', paper rule' in their "
                             "protocol")
    parser.add_argument("--stream-channels", action="store_true",
                        help="also prune residual-stream channels (sss, slimming; the recipes of ista-bn and "
                             "binary-gate do already); rows whose protocol prunes the stream carry ', stream'")
    parser.add_argument("--rewind", type=int,
                        help="LR rewinding on the last --finetune-epochs of a schedule this many epochs long (the "
                             "recipes': 20; rows say 'LR rewind N'); 0: cosine fine-tuning from 0.01 ('fine-tune')")
    parser.add_argument("--deadline", type=float,
                        help="target_epoch_fraction: reach the budget by this fraction of the epochs (recipes: 0.5)")
    parser.add_argument("--from-dense", type=int, default=0, metavar="D",
                        help="sparse training starts from a dense run of D epochs (shared by the rows of a seed) "
                             "and lasts D epochs fewer than --epochs; rows carry ', dense D + sparse E'")
    parser.add_argument("--penalty", type=float, help="the methods' penalty instead of their defaults; rows carry "
                                                      "', penalty P'")
    parser.add_argument("--budget-rank", choices=("cost", "magnitude", "normalized"),
                        help="the exact rule's weighting (recipes: magnitude, except slimming's and ε-ResNet's, which "
                             "have none); rows whose protocol ranks by magnitude carry ', magnitude rank' "
                             "(normalized: ', normalized rank')")
    parser.add_argument("--budget-freeze", choices=("target", "deadline"),
                        help="freeze the dead set once the target is met (recipes) or only at the deadline; "
                             "deadline rows carry ', frozen at deadline'")
    parser.add_argument("--sss-structures", help="what SSS gates instead of its recipe's channels (e.g. channels+blocks); "
                                                 f"rows whose SSS gates other than {SSS_DEFAULT} carry ', SSS on S'")
    args = parser.parse_args()
    OVERRIDES.update(epochs=args.epochs, finetune_epochs=args.finetune_epochs, train_subset=args.train_subset,
                     seed=args.seed, target_epoch_fraction=args.deadline, budget_rule=args.budget_rule,
                     stream_channels=args.stream_channels or None, rewind=args.rewind,
                     budget_freeze=args.budget_freeze, budget_rank=args.budget_rank, penalty=args.penalty,
                     sss_structures=args.sss_structures, model=args.model)
    methods = list(filter(None, args.methods.split(",")))
    lengths = {protocol(method).epochs for method in methods} or {protocol("none").epochs}
    total = max(lengths)  # dense and sparse epochs of a --from-dense row together
    if args.from_dense and (len(lengths) > 1 or not 0 < args.from_dense < total):
        parser.error(f"--from-dense {args.from_dense}: needs one length of more epochs for every method's sparse "
                     f"training (the recipes give {sorted(lengths)}; set --epochs)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "rows.jsonl"
    done = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    if not args.table:
        jobs = []
        for reduction in map(float, args.reductions.split(",")):
            for method in methods:
                suffix, tag = row_naming(method, args, total)
                where = out / f"{method}-{reduction}{suffix}"
                jobs.append((method, reduction, f"{retraining(method)}{tag}",
                             partial(prunekit_row, method, reduction, where, tag, args.from_dense)))
                if method in args.scratch.split(","):
                    jobs += [(method, reduction, f"scratch-{b}{tag}",
                              partial(scratch_row, method, reduction, b, where, tag)) for b in "EB"]
            for name in filter(None, args.torch_pruning.split(",")):  # at the SSS recipe's epochs and retraining
                # named as the dense protocol: without the stream, rank and structures of a method's recipe
                sparse_epochs, tp_suffix = sparse_label(args, total), row_naming("none", args, total)[0]
                jobs.append((f"torch-pruning {name}", reduction, retraining("sss") + sparse_epochs,
                             partial(torch_pruning_row, name, reduction, out / f"tp-{name}-{reduction}{tp_suffix}",
                                     sparse_epochs)))
        for method, reduction, label, job in jobs:
            if any(r["method"] == method and r["reduction_target"] == reduction and r.get("seed", 0) == args.seed
                   and r["protocol"].split(" (")[0] == label for r in done):
                continue
            row = job()
            done.append(row)
            print(json.dumps(row), flush=True)
            with open(rows_file, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(table(done))
    summary = seed_summary(done)
    if summary:
        print("\n" + summary)


if __name__ == "__main__":
    main()
