"""`prunekit run`: sparse-train → compress → fine-tune → evaluate, with a Markdown report.

Layout of the pipeline directory:
    sparse/       the sparse-training run (see runner.py)
    compressed/   spec.json, model.safetensors, card.json/.md
    finetune/     the fine-tuning run of the compressed spec
    report.md     accuracy, params, MACs and latency side by side
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from . import spec as specs
from .checkpoint import atomic_write_text
from .compress import compress_run, load
from .config import Config
from .measure import measure_latency, spec_cost
from .runner import input_size, train


def finetune_config(config: Config) -> Config:
    """Fine-tuning: no sparsity, the fine-tune LR and epochs, cosine decay."""
    return dataclasses.replace(config, method="none", epochs=config.finetune_epochs, lr=config.finetune_lr,
                               schedule="cosine", warmup_epochs=0.0, penalty=None)


def run_pipeline(config: Config, out: str | Path, *, resume: bool = False, force: bool = False, log=None) -> dict:
    out = Path(out)
    say = log or (lambda msg: print(msg, flush=True))
    say(f"[1/3] sparse training ({config.method}) → {out / 'sparse'}")
    sparse = train(config, out / "sparse", resume=resume, force=force, log=log)
    say(f"[2/3] compressing → {out / 'compressed'}")
    card = compress_run(out / "sparse", out / "compressed")
    compressed = load(out / "compressed")
    compressed_spec = specs.load(out / "compressed" / "spec.json")
    say(f"[3/3] fine-tuning the compressed model → {out / 'finetune'}")
    tuned = train(finetune_config(config), out / "finetune", resume=resume, force=force,
                  spec=compressed_spec, initial_weights=compressed.state_dict(), log=log)
    size = input_size(config)
    dense_cost = spec_cost(sparse["spec"], size[1:])
    final_cost = spec_cost(compressed_spec, size[1:])
    latency_dense = measure_latency(sparse["model"].cpu(), size, 64).median_ms
    latency_final = measure_latency(tuned["model"].cpu(), size, 64).median_ms
    row = {"method": config.method, "model": config.model,
           "sparse_acc": sparse["history"][-1]["test_acc"] if sparse["history"] else None,
           "final_acc": tuned["history"][-1]["test_acc"] if tuned["history"] else None,
           "params_dense": dense_cost.params, "params_final": final_cost.params,
           "macs_dense": dense_cost.macs, "macs_final": final_cost.macs,
           "latency_ms_b64_gated": latency_dense, "latency_ms_b64_final": latency_final,
           "max_logit_difference": card["max_logit_difference"]}
    (out / "result.json").write_text(json.dumps(row, indent=1))
    atomic_write_text(out / "report.md", report_table([row]))
    say(report_table([row]))
    return row


def report_table(rows: list[dict]) -> str:
    """The side-by-side Markdown table of a list of pipeline results."""
    lines = ["| method | model | sparse acc | final acc | params | MACs | MACs kept | latency b64 (ms) | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['model']} | {r['sparse_acc']:.4f} | {r['final_acc']:.4f} | "
                     f"{r['params_final']:,} / {r['params_dense']:,} | {r['macs_final']:,} / {r['macs_dense']:,} | "
                     f"{r['macs_final'] / r['macs_dense']:.1%} | {r['latency_ms_b64_final']:.1f} | "
                     f"{r['latency_ms_b64_gated'] / r['latency_ms_b64_final']:.2f}x |")
    return "\n".join(lines) + "\n"
