"""Reports across runs: the Markdown comparison table and PNG plots (written without a display).

Plots: train/test error and learning rate per epoch (ε-ResNet restarts show in the LR curve),
alive channels and blocks over time, the final gate (or BN γ) value histogram, and accuracy against
MACs across pipeline runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import torch  # noqa: E402

from .pipeline import load_rows, report_table  # noqa: E402
from .runner import load_final  # noqa: E402


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _training_runs(directory: Path) -> list[Path]:
    """The training runs inside a pipeline directory (or the directory itself if it is a run)."""
    if (directory / "metrics.jsonl").exists():
        return [directory]
    return [p for p in sorted(directory.iterdir()) if (p / "metrics.jsonl").exists()]


def plot_curves(runs: list[Path], out: Path) -> Path:
    """Train/test error and LR per epoch for every training run."""
    fig, (err, lr) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        metrics = read_metrics(run)
        epochs = [m["epoch"] for m in metrics]
        label = f"{run.parent.name}/{run.name}"
        err.plot(epochs, [1 - m["train_acc"] for m in metrics], "--", label=f"{label} train")
        err.plot(epochs, [1 - m["test_acc"] for m in metrics], label=f"{label} test")
        lr.plot(epochs, [m["lr"] for m in metrics], marker=".", label=label)
    err.set(xlabel="epoch", ylabel="error", title="error")
    lr.set(xlabel="epoch", ylabel="learning rate (end of epoch)", title="learning rate", yscale="log")
    err.legend(fontsize=7)
    lr.legend(fontsize=7)
    return _save(fig, out / "curves.png")


def plot_structure(runs: list[Path], out: Path) -> Path | None:
    """Alive channels and blocks over epochs."""
    series = [(run, read_metrics(run)) for run in runs]
    series = [(run, m) for run, m in series if m and "alive_channels" in m[0]]
    if not series:
        return None
    fig, (channels, blocks) = plt.subplots(1, 2, figsize=(11, 4))
    for run, metrics in series:
        epochs = [m["epoch"] for m in metrics]
        for layer in range(len(metrics[0]["alive_channels"])):
            channels.plot(epochs, [m["alive_channels"][layer] for m in metrics], label=f"group {layer}")
        if "alive_blocks" in metrics[0]:
            for stage in range(len(metrics[0]["alive_blocks"])):
                blocks.plot(epochs, [m["alive_blocks"][stage] for m in metrics], marker="o", label=f"stage {stage}")
    channels.set(xlabel="epoch", ylabel="alive channels", title="channels per group")
    blocks.set(xlabel="epoch", ylabel="alive blocks", title="residual blocks per stage")
    channels.legend(fontsize=6, ncol=2)
    blocks.legend(fontsize=7)
    return _save(fig, out / "structure.png")


def plot_budget(runs: list[Path], out: Path) -> Path | None:
    """The budget controller per epoch: projected cost against the target, and the penalty (or ε scale)."""
    series = [(run, read_metrics(run)) for run in runs]
    series = [(run, m, metric) for run, m in series for metric in ("macs", "params")
              if m and f"target_{metric}" in m[0]]
    if not series:
        return None
    fig, (cost, control) = plt.subplots(1, 2, figsize=(11, 4))
    for run, metrics, metric in series:
        label = f"{run.parent.name}/{run.name}"
        epochs = [m["epoch"] for m in metrics]
        line, = cost.plot(epochs, [m[f"projected_{metric}"] / metrics[0][f"target_{metric}"] for m in metrics],
                          marker="o", label=f"{label} ({metric})")
        frozen = [m["epoch"] for m in metrics if m["budget_frozen"]]
        if frozen:
            cost.axvline(frozen[0], color=line.get_color(), ls=":", lw=0.8)
        knob = "penalty" if "penalty" in metrics[0] else "epsilon_scale"
        control.plot(epochs, [m[knob] for m in metrics], marker="o", color=line.get_color(), label=f"{label} {knob}")
    cost.axhline(1.0, color="r", lw=0.8)
    cost.set(xlabel="epoch", ylabel="projected cost / target", title="budget (dotted: frozen from)")
    control.set(xlabel="epoch", ylabel="value at the end of the epoch", title="penalty / ε scale")
    control.set_yscale("symlog", linthresh=1e-6)  # the penalty spans decades and is 0 once frozen
    cost.legend(fontsize=7)
    control.legend(fontsize=7)
    return _save(fig, out / "budget.png")


def plot_gate_histogram(run: Path, out: Path) -> Path | None:
    """Histogram of the final gate factors (or the prunable BN γ) of a run."""
    if not (run / "final" / "gates.json").exists():
        return None
    _, gates, weights, _ = load_final(run / "final")
    keys = [k for k in weights if ".gate" in k and k.endswith("weight")]
    if not keys:
        keys = [k for k in weights if ".bn" in k and k.endswith("weight")]
    values = torch.cat([weights[k].flatten() for k in keys]).numpy()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(values, bins=60)
    ax.set(xlabel="factor value", ylabel="count", title=f"{run.name}: {gates.kind or 'BN γ'} values "
                                                         f"({int((values == 0).sum())} exactly zero)")
    return _save(fig, out / f"gates-{run.parent.name}-{run.name}.png")


def plot_accuracy_vs_macs(rows: list[dict], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["macs_final"] / 1e6, r["final_acc"], label=f"{r['method']} final")
        ax.scatter(r["macs_dense"] / 1e6, r["dense_acc"], marker="x", color="k")
    ax.set(xlabel="MACs (millions)", ylabel="test accuracy", title="accuracy vs MACs (x: dense)")
    ax.legend(fontsize=7)
    return _save(fig, out / "accuracy-vs-macs.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(directories: list[str | Path], out: str | Path) -> Path:
    """report.md (table + plots) for pipeline directories or single training runs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    directories = [Path(d) for d in directories]
    runs = [run for d in directories for run in _training_runs(d)]
    lines = ["# prunekit report", ""]
    rows = load_rows([d for d in directories if (d / "result.json").exists()])
    if rows:
        lines += [report_table(rows), f"![accuracy vs MACs]({plot_accuracy_vs_macs(rows, out).name})", ""]
    lines.append(f"![curves]({plot_curves(runs, out).name})")
    for name, plot in (("structure", plot_structure), ("budget", plot_budget)):
        path = plot(runs, out)
        if path:
            lines.append(f"![{name}]({path.name})")
    for run in runs:
        histogram = plot_gate_histogram(run, out)
        if histogram:
            lines.append(f"![gates]({histogram.name})")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
