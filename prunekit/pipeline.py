"""`prunekit run`: dense training → sparse training to a budget → compression → fine-tuning → report.

Layout of the pipeline directory:
    dense/        the dense baseline run (see runner.py)
    sparse/       sparse training started from the dense weights, steered to the MACs target
    compressed/   spec.json, model.safetensors, card.json/.md
    finetune/     fine-tuning of the compressed spec
    result.json   every figure of the report
    report.md     the figures as a table and the plots (*.png) of `prunekit report`
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .checkpoint import atomic_write_json, load_weights
from .compress import compress_run
from .config import Config, dense_config
from .distributed import init_distributed, wait_for_all
from .measure import fastest_latency, spec_cost
from .protocols import export_accuracy, finetune, finetune_config
from .report import report_table, write_report
from .runner import input_size, train
from .schedule import make_policy

DEFAULT_TARGET_MACS = 0.5
# `prunekit run` with no options: ResNet-20 on all of Fashion-MNIST on a 2-core CPU: dense 4 epochs, sparse 1
# (from the dense weights), then 6 epochs of LR rewinding on a whole 6-epoch one-cycle at 0.1 (Renda et al.): the
# epochs go to the kept half-cost network, which trains about 2x faster than the gated one; no distillation.
# The measurements behind it: bench/README.md, "Short sparse training, long retraining".
MAIN_JOB = {"model": "resnet20", "data": "fashion-mnist", "method": "sss", "epochs": 4, "sparse_epochs": 1,
            "finetune_epochs": 6, "rewind": 6, "kd_weight": 0.0, "target_macs": DEFAULT_TARGET_MACS}


def sparse_config(config: Config) -> Config:
    """The sparse stage: the method at its target (half the MACs unless told), `sparse_epochs` long, on its own
    schedule (`rewind` is for fine-tuning)."""
    target = config.target_macs if config.target_macs is not None or config.target_params is not None \
        else DEFAULT_TARGET_MACS
    return dataclasses.replace(config, epochs=config.sparse_epochs, target_macs=target, rewind=None)


def distilled(config: Config, out: Path) -> Config:
    """Sparse training and fine-tuning distil from the dense stage (Hinton KD, `kd_weight`, `kd_temperature`)
    unless another `teacher` is given or `kd_weight` is 0."""
    if config.teacher is None and config.kd_weight > 0:
        return dataclasses.replace(config, teacher=str(out / "dense"))
    return config


def latency_figures(which: str, latency) -> dict:
    """A report row's batch-64 latency of the dense or final network, in the faster memory format, named."""
    return {f"latency_ms_b64_{which}": latency.median_ms,
            f"latency_layout_{which}": "channels_last" if latency.channels_last else "NCHW"}


def run_pipeline(config: Config, out: str | Path, *, resume: bool = False, force: bool = False, log=None) -> dict:
    """Run every stage into `out` and return the report row. Under torchrun every rank trains and fine-tunes;
    the main one alone compresses, measures and writes the report, and the others return an empty row."""
    out = Path(out)
    ctx = init_distributed(config.device)
    say = (log or (lambda msg: print(msg, flush=True))) if ctx.is_main else (lambda msg: None)
    start = time.perf_counter()
    make_policy(finetune_config(config))  # a fine-tuning schedule that cannot be built fails before the dense stage
    say(f"[1/4] dense training ({config.model}, {config.epochs} epochs) → {out / 'dense'}")
    dense = train(dataclasses.replace(dense_config(config), rewind=None),
                  out / "dense", resume=resume, force=force, log=log)
    say(f"[2/4] sparse training ({config.method}, {config.sparse_epochs} epochs) → {out / 'sparse'}")
    retrain = distilled(config, out)
    sparse = train(sparse_config(retrain), out / "sparse", resume=resume, force=force,
                   initial_weights=load_weights(out / "dense" / "final" / "model.safetensors"), log=log)
    say(f"[3/4] compressing → {out / 'compressed'}")
    if ctx.is_main:
        card = compress_run(out / "sparse", out / "compressed")
        compressed_acc = export_accuracy(out / "compressed", config)
    wait_for_all(ctx)  # every rank fine-tunes the export the main one wrote
    say(f"[4/4] fine-tuning the compressed model ({config.finetune_epochs} epochs) → {out / 'finetune'}")
    tuned = finetune(out / "compressed", retrain, out / "finetune", resume=resume, force=force, log=log)
    if not ctx.is_main:
        return {}
    size = input_size(config)
    row = {"method": config.method, "model": config.model,
           "dense_acc": dense["history"][-1]["test_acc"], "sparse_acc": sparse["history"][-1]["test_acc"],
           "compressed_acc": compressed_acc, "final_acc": tuned["history"][-1]["test_acc"],
           "params_dense": spec_cost(dense["spec"], size[1:]).params, "params_final": card["params_after"],
           "macs_dense": card["macs_before"], "macs_final": card["macs_after"],
           **latency_figures("dense", fastest_latency(dense["model"].cpu(), size, 64)),
           **latency_figures("final", fastest_latency(tuned["model"].cpu(), size, 64)),
           "max_logit_difference": card["max_logit_difference"], "minutes": (time.perf_counter() - start) / 60}
    atomic_write_json(out / "result.json", row)
    say(report_table([row]))
    say(f"report and plots: {write_report([out], out)}")
    return row
