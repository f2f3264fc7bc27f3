"""Reports across runs: the Markdown comparison table and PNG plots (written without a display).

Plots: train/test error and learning rate per epoch (one colour per run; ε-ResNet's restarts marked),
alive channels and blocks over time, each method's own sparsity measure per epoch (ε's averaged
discard count, dead blocks and groups, ISTA's fake sparsity), kept/original widths and blocks of
every compressed run, the budget, the final gate (or BN γ) histogram, and accuracy against MACs.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import torch  # noqa: E402

from .config import ConfigError  # noqa: E402
from .pipeline import load_rows, report_table  # noqa: E402
from .runner import load_final  # noqa: E402


def read_metrics(run: Path) -> list[dict]:
    """The run's metrics.jsonl; a damaged line is a ConfigError naming the file and line."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: line {number} is not JSON ({exc.msg})") from None
    return rows


def _training_runs(directory: Path) -> list[Path]:
    """The training runs inside a pipeline directory (or the directory itself if it is a run)."""
    if (directory / "metrics.jsonl").exists():
        return [directory]
    return [p for p in sorted(directory.iterdir()) if (p / "metrics.jsonl").exists()]


def _label(run: Path) -> str:
    return f"{run.parent.name}/{run.name}"


def _colours(runs: list[Path]) -> dict[Path, str]:
    """One colour per run, the same in every plot."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {run: cycle[i % len(cycle)] for i, run in enumerate(runs)}


def plot_curves(runs: list[Path], out: Path) -> Path:
    """Train (dashed) and test (solid) error and the LR per epoch, one colour per run; markers so that
    one-epoch runs show; vertical lines at ε-ResNet's LR restarts (the discarded count rose)."""
    fig, (err, lr) = plt.subplots(1, 2, figsize=(11, 4))
    colours = _colours(runs)
    for run in runs:
        metrics = read_metrics(run)
        epochs = [m["epoch"] for m in metrics]
        colour = colours[run]
        err.plot(epochs, [1 - m["train_acc"] for m in metrics], "--", marker=".", color=colour)
        err.plot(epochs, [1 - m["test_acc"] for m in metrics], marker="o", color=colour, label=_label(run))
        lr.plot(epochs, [m["lr"] for m in metrics], marker="o", color=colour, label=_label(run))
        counts = [m.get("discarded_blocks") for m in metrics]
        for epoch, before, after in zip(epochs[1:], counts, counts[1:]):
            if before is not None and after - before >= 1:
                lr.axvline(epoch, color=colour, ls=":", lw=0.8)
    err.set(xlabel="epoch", ylabel="error", title="error (dashed: train, solid: test)")
    lr.set(xlabel="epoch", ylabel="learning rate (end of epoch)", title="learning rate (dotted: ε-ResNet restart)",
           yscale="log")
    err.legend(fontsize=7)
    lr.legend(fontsize=7)
    return _save(fig, out / "curves.png")


SIGNATURES = {"discarded_blocks": "ε-ResNet: averaged discarded count", "dead_blocks": "dead residual blocks",
              "dead_groups": "dead ResNeXt groups", "fake_sparsity": "ISTA fake sparsity (cost-weighted)",
              "dead_channels": "dead channels"}


def plot_signatures(runs: list[Path], out: Path) -> Path | None:
    """Each method's own sparsity measure per epoch, one panel per measure, one colour per run."""
    series = {key: [(run, read_metrics(run)) for run in runs
                    if any(m.get(key) for m in read_metrics(run))] for key in SIGNATURES}
    series = {key: value for key, value in series.items() if value}
    if not series:
        return None
    colours = _colours(runs)
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.8), squeeze=False)
    for ax, (key, items) in zip(axes[0], series.items()):
        for run, metrics in items:
            ax.plot([m["epoch"] for m in metrics], [m.get(key, 0) for m in metrics], marker="o",
                    color=colours[run], label=_label(run))
        ax.set(xlabel="epoch", title=SIGNATURES[key])
        ax.legend(fontsize=6)
    return _save(fig, out / "signatures.png")


def plot_kept(runs: list[Path], out: Path) -> Path | None:
    """Kept / original inner width of every residual block (or layer) and blocks kept per stage, for
    each compressed run (RUN/compressed against RUN/final)."""
    from . import spec as specs

    pairs = [(run, specs.load(run / "final" / "spec.json"), specs.load(run / "compressed" / "spec.json"))
             for run in runs if (run / "compressed" / "spec.json").exists() and (run / "final" / "spec.json").exists()]
    if not pairs:
        return None
    colours = _colours(runs)
    fig, (widths, blocks) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    bar = 0.8 / len(pairs)
    for i, (run, before, after) in enumerate(pairs):
        if isinstance(before, specs.ConvNetSpec):
            kept, stage_kept = [a.width / b.width for a, b in zip(after.layers, before.layers)], []
        else:  # surviving branches of each stage, in order, against the stage's original branch width
            kept, stage_kept = [], []
            for stage_before, stage_after in zip(before.stages, after.stages):
                original = [b for b in stage_before if b.has_branch]
                survivors = [b for b in stage_after if b.has_branch]
                kept += [sum(b.inner) / sum(original[0].inner) for b in survivors]
                stage_kept.append(len(survivors) / max(len(original), 1))
        widths.bar([x + i * bar for x in range(len(kept))], kept, bar, color=colours[run], label=_label(run))
        if stage_kept:
            blocks.bar([x + i * bar for x in range(len(stage_kept))], stage_kept, bar, color=colours[run])
    widths.set(xlabel="surviving residual branch, stage by stage (or layer)", ylabel="kept / original inner width",
               ylim=(0, 1.05),
               title="inner widths kept")
    blocks.set(xlabel="stage", ylabel="blocks kept / original", ylim=(0, 1.05), title="residual blocks kept")
    widths.legend(fontsize=7)
    return _save(fig, out / "kept.png")


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
            channels.plot(epochs, [m["alive_channels"][layer] for m in metrics], marker=".",
                          label=f"{_label(run)} group {layer}")
        if "alive_blocks" in metrics[0]:
            for stage in range(len(metrics[0]["alive_blocks"])):
                blocks.plot(epochs, [m["alive_blocks"][stage] for m in metrics], marker="o",
                            label=f"{_label(run)} stage {stage}")
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
    for name, plot in (("structure", plot_structure), ("signatures", plot_signatures), ("kept", plot_kept),
                       ("budget", plot_budget)):
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
