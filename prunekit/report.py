"""Reports across runs: the Markdown comparison table and PNG plots (written without a display).

Plots, one colour per run and markers wherever a run has few points: train/test error per epoch and the
learning rate per step (ε-ResNet's restarts marked), alive channels and blocks over time, each method's
own sparsity measure per epoch (ε's averaged discard count, dead blocks and groups, ISTA's fake
sparsity), kept/original widths and blocks of every compressed run, the budget, the final gate (or BN
γ) histogram, and accuracy against MACs and against measured latency with the Pareto front.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402
import torch  # noqa: E402

from .config import ConfigError  # noqa: E402
from .progress import read_steps  # noqa: E402
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


def lr_per_step(run: Path) -> tuple[list[float], list[float], bool]:
    """(epoch, LR) of every step from RUN/steps.jsonl, and True; a run without one (older than it) gives
    the LR at each epoch's end from metrics.jsonl, and False."""
    steps = read_steps(run)
    if steps:
        return [s["epoch"] for s in steps], [s["lr"] for s in steps], True
    metrics = read_metrics(run)
    return [float(m["epoch"]) for m in metrics], [m["lr"] for m in metrics], False


def _epoch_axis(ax) -> None:
    """Label the x axis in epochs, ticks at whole epochs only."""
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _marks(points: int) -> dict:
    """A marker on every point of a short series, so that a run of one epoch (or a few steps) shows."""
    return {"marker": "o", "markersize": 4} if points <= 30 else {}


def plot_curves(runs: list[Path], out: Path) -> Path:
    """Train (dashed) and test (solid) error per epoch and the LR per step (x in epochs), one colour per
    run; vertical lines at ε-ResNet's LR restarts (the discarded count rose)."""
    fig, (err, lr) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours, notes = _colours(runs), set()
    for run in runs:
        metrics = read_metrics(run)
        epochs = [m["epoch"] for m in metrics]
        colour = colours[run]
        err.plot(epochs, [1 - m["train_acc"] for m in metrics], "--", color=colour, **_marks(len(epochs)))
        err.plot(epochs, [1 - m["test_acc"] for m in metrics], color=colour, label=_label(run), **_marks(len(epochs)))
        at, rates, per_step = lr_per_step(run)
        lr.plot(at, rates, "-" if per_step else "--", color=colour, label=_label(run), lw=1.2, **_marks(len(at)))
        if not per_step:
            notes.add("dashed: at each epoch's end (no steps.jsonl)")
        counts = [m.get("discarded_blocks") for m in metrics]
        for epoch, before, after in zip(epochs[1:], counts, counts[1:]):
            if before is not None and after - before >= 1:
                notes.add("dotted: ε-ResNet restart")
                lr.axvline(epoch, color=colour, ls=":", lw=0.8)  # epoch N's count rose: N is where steps restart
    err.set(ylabel="error", title="error (dashed: train, solid: test)")
    lr.set(ylabel="learning rate", title="\n".join(["learning rate per step", *sorted(notes)]))
    _epoch_axis(err)
    _epoch_axis(lr)
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
            ax.plot([m["epoch"] for m in metrics], [m.get(key, 0) for m in metrics], color=colours[run],
                    label=_label(run), **_marks(len(metrics)))
        ax.set(title=SIGNATURES[key])
        _epoch_axis(ax)
        if all(isinstance(m.get(key, 0), int) for _, metrics in items for m in metrics):  # counts
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=6)
    return _save(fig, out / "signatures.png")


def compressed_exports(runs: list[Path]) -> list[tuple[Path, Path]]:
    """(training run, its export) for every compressed run: RUN/compressed, or for a pipeline's sparse/
    run the pipeline's compressed/."""
    pairs = []
    for run in runs:
        candidates = [run / "compressed"] + ([run.parent / "compressed"] if run.name == "sparse" else [])
        export = next((c for c in candidates if (c / "spec.json").exists()), None)
        if export is not None and (run / "final" / "spec.json").exists():
            pairs.append((run, export))
    return pairs


def plot_kept(runs: list[Path], out: Path) -> Path | None:
    """Kept / original width of every layer, or inner width of every surviving residual branch (each
    stage's survivors from its left, so that stages line up across runs), and blocks kept per stage, for
    each compressed run (its export against RUN/final)."""
    from . import spec as specs

    pairs = [(run, specs.load(run / "final" / "spec.json"), specs.load(export / "spec.json"))
             for run, export in compressed_exports(runs)]
    if not pairs:
        return None
    resnets = [(before, after) for _, before, after in pairs if not isinstance(before, specs.ConvNetSpec)]
    slots = [max(sum(b.has_branch for b in before.stages[s]) for before, _ in resnets if s < len(before.stages))
             for s in range(max((len(before.stages) for before, _ in resnets), default=0))]
    colours = _colours(runs)
    fig, (widths, blocks) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    bar = 0.8 / len(pairs)
    for i, (run, before, after) in enumerate(pairs):
        if isinstance(before, specs.ConvNetSpec):
            xs, kept, stage_kept = list(range(len(before.layers))), [a.width / b.width for a, b in
                                                                     zip(after.layers, before.layers)], []
        else:
            xs, kept, stage_kept = [], [], []
            for s, (stage_before, stage_after) in enumerate(zip(before.stages, after.stages)):
                original = [b for b in stage_before if b.has_branch]
                survivors = [b for b in stage_after if b.has_branch]
                xs += [sum(slots[:s]) + j for j in range(len(survivors))]
                # only identity blocks can go, and a stage's identity blocks share their widths: the first
                # survivor is the stage's first block, any other stands for one of its later blocks
                kept += [sum(b.inner) / sum((original[0] if j == 0 else original[-1]).inner)
                         for j, b in enumerate(survivors)]
                stage_kept.append(len(survivors) / max(len(original), 1))
        widths.bar([x + (i - (len(pairs) - 1) / 2) * bar for x in xs], kept, bar, color=colours[run],
                   label=_label(run))
        if stage_kept:
            blocks.bar([x + (i - (len(pairs) - 1) / 2) * bar for x in range(len(stage_kept))], stage_kept, bar,
                       color=colours[run])
    if resnets:
        edges = [sum(slots[:s]) - 0.5 for s in range(1, len(slots))]
        for edge in edges:
            widths.axvline(edge, color="0.6", lw=0.8)
        widths.set_xticks([sum(slots[:s]) + (slots[s] - 1) / 2 for s in range(len(slots))],
                          [f"stage {s + 1}" for s in range(len(slots))])
        widths.set_xlim(-0.5, sum(slots) - 0.5)
        widths.set(xlabel="surviving residual branches of each stage, in order (removed ones leave the stage's "
                          "right end empty)", ylabel="kept / original inner width")
        blocks.set_xticks(range(len(slots)), [str(s + 1) for s in range(len(slots))])
    else:
        widths.set(xlabel="layer", ylabel="kept / original width")
    widths.set(ylim=(0, 1.1 + 0.07 * math.ceil(len(pairs) / 4)), title="widths kept")  # room for the legend
    blocks.set(xlabel="stage", ylabel="blocks kept / original", ylim=(0, 1.05), title="residual blocks kept")
    widths.legend(fontsize=7, loc="upper left", ncol=4)
    return _save(fig, out / "kept.png")


def plot_structure(runs: list[Path], out: Path) -> Path | None:
    """The fraction of prunable channels alive and the residual blocks alive in each stage per epoch, one
    panel per stage, one colour per run."""
    series = [(run, read_metrics(run)) for run in runs]
    series = [(run, m) for run, m in series if m and ("alive_channels" in m[0] or "alive_blocks" in m[0])]
    if not series:
        return None
    stages = max(len(m[0].get("alive_blocks", [])) for _, m in series)
    colours = _colours(runs)
    fig, axes = plt.subplots(1, 1 + stages, figsize=(3.8 * (1 + stages), 3.8), squeeze=False)
    channels, blocks = axes[0][0], axes[0][1:]
    tops = [0] * stages  # the most blocks alive in each stage, for a y axis from 0
    for run, metrics in series:
        epochs, style = [m["epoch"] for m in metrics], {"color": colours[run], **_marks(len(metrics))}
        if metrics[0].get("total_channels"):  # ResNeXt's SSS gates groups, not channels: none to count
            channels.plot(epochs, [sum(m["alive_channels"]) / m["total_channels"] for m in metrics],
                          label=_label(run), **style)
        for stage, ax in enumerate(blocks[:len(metrics[0].get("alive_blocks", []))]):
            alive = [m["alive_blocks"][stage] for m in metrics]
            ax.plot(epochs, alive, label=_label(run), **style)
            tops[stage] = max(tops[stage], *alive)
    channels.set(ylabel="alive / prunable channels", ylim=(0, 1.05), title="channels alive")
    for stage, ax in enumerate(blocks):
        ax.set(ylabel="alive blocks", title=f"residual blocks alive, stage {stage + 1}", ylim=(-0.2, tops[stage] + 0.4))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[0]:
        _epoch_axis(ax)
    channels.legend(handles=[plt.Line2D([], [], color=colours[run], marker="o", markersize=4, label=_label(run))
                             for run, _ in series], fontsize=7, loc="lower left")
    return _save(fig, out / "structure.png")


def plot_budget(runs: list[Path], out: Path) -> Path | None:
    """The budget controller per epoch: projected cost against the target, and the penalty (or ε scale)."""
    series = [(run, read_metrics(run)) for run in runs]
    series = [(run, m, metric) for run, m in series for metric in ("macs", "params")
              if m and f"target_{metric}" in m[0]]
    if not series:
        return None
    colours = _colours(runs)
    fig, (cost, control) = plt.subplots(1, 2, figsize=(11, 4))
    for run, metrics, metric in series:
        epochs, style = [m["epoch"] for m in metrics], {"color": colours[run], **_marks(len(metrics))}
        cost.plot(epochs, [m[f"projected_{metric}"] / metrics[0][f"target_{metric}"] for m in metrics],
                  label=f"{_label(run)} ({metric})", **style)
        frozen = [m["epoch"] for m in metrics if m["budget_frozen"]]
        if frozen:
            cost.axvline(frozen[0], color=colours[run], ls=":", lw=0.8)
        knob = "penalty" if "penalty" in metrics[0] else "epsilon_scale"
        control.plot(epochs, [m[knob] for m in metrics], label=f"{_label(run)} {knob}", **style)
    cost.axhline(1.0, color="r", lw=0.8)
    cost.set(ylabel="projected cost / target", title="budget (dotted: frozen from)")
    control.set(ylabel="value at the end of the epoch", title="penalty / ε scale")
    _epoch_axis(cost)
    _epoch_axis(control)
    control.set_yscale("symlog", linthresh=1e-6)  # the penalty spans decades and is 0 once frozen
    control.set_ylim(bottom=0, top=max(1e-5, control.get_ylim()[1]))  # neither knob is ever negative
    cost.legend(fontsize=7)
    control.legend(fontsize=7)
    return _save(fig, out / "budget.png")


def plot_gate_histogram(run: Path, out: Path, colour: str) -> Path | None:
    """Histogram of the final gate factors (or the prunable BN γ) of a run."""
    if not (run / "final" / "gates.json").exists():
        return None
    _, gates, weights, _ = load_final(run / "final")
    keys = [k for k in weights if ".gate" in k and k.endswith("weight")]
    if not keys:
        keys = [k for k in weights if ".bn" in k and k.endswith("weight")]
    values = torch.cat([weights[k].flatten() for k in keys]).numpy()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(values, bins=60, color=colour)
    factors = "BN γ" if gates.kind in (None, "bn") else f"{gates.kind} gate"
    ax.set(xlabel="factor value", ylabel="count",
           title=f"{_label(run)}: {factors} values ({int((values == 0).sum())} exactly zero)")
    return _save(fig, out / f"gates-{run.parent.name}-{run.name}.png")


PARETO_KINDS = {"dense": ("s", "dense"), "compressed": ("^", "compressed, before fine-tuning"),
                "final": ("o", "compressed and fine-tuned"), "run": ("D", "compressed run (its test accuracy)")}


def pareto_points(pipelines: list[tuple[Path, dict]], runs: list[Path]) -> list[dict]:
    """Every measured (accuracy, MACs, latency) point, with the directory it comes from: each pipeline's
    dense, compressed and fine-tuned models (`pipelines`: directory and result.json), and each other
    compressed run at its export's MACs with its final test accuracy (exact compression keeps it; no
    latency was measured for it)."""
    points = []
    for directory, r in pipelines:
        points += [{"source": directory, "kind": "dense", "acc": r["dense_acc"], "macs": r["macs_dense"],
                    "latency": r["latency_ms_b64_dense"]},
                   {"source": directory, "kind": "compressed", "acc": r["compressed_acc"], "macs": r["macs_final"],
                    "latency": r["latency_ms_b64_final"]},  # the same spec as the fine-tuned model
                   {"source": directory, "kind": "final", "acc": r["final_acc"], "macs": r["macs_final"],
                    "latency": r["latency_ms_b64_final"]}]
    for run, export in compressed_exports(runs):
        card, metrics = export / "card.json", read_metrics(run)
        if export.parent != run.parent and card.exists() and metrics:  # not a pipeline's sparse run
            points.append({"source": run, "kind": "run", "acc": metrics[-1]["test_acc"],
                           "macs": json.loads(card.read_text())["macs_after"], "latency": None})
    return points


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, accuracy) points that no cheaper-or-equal point matches or beats in accuracy, by cost."""
    front = []
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((cost, acc))
    return front


def plot_pareto(pipelines: list[tuple[Path, dict]], runs: list[Path], out: Path) -> Path | None:
    """Accuracy against MACs and against latency measured on the CPU, one colour per pipeline or run
    (a run's as in every plot), one marker per kind of model, each pipeline's models joined in order,
    the Pareto front dashed."""
    points = pareto_points(pipelines, runs)
    if not points:
        return None
    colours = _colours(runs + [directory for directory, _ in pipelines])
    sources = list(dict.fromkeys(p["source"] for p in points))
    panels = [("macs", "MACs (millions)", 1e6, "accuracy vs MACs")]
    if any(p["latency"] is not None for p in points):
        panels.append(("latency", "latency of a batch of 64 on the CPU (ms, faster memory format)", 1.0,
                       "accuracy vs measured latency"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    for ax, (key, xlabel, unit, title) in zip(axes[0], panels):
        shown = [p for p in points if p[key] is not None]
        for source in sources:
            mine = [p for p in shown if p["source"] == source]
            ax.plot([p[key] / unit for p in mine], [p["acc"] for p in mine], color=colours[source], lw=0.8, alpha=0.6)
            for p in mine:
                hollow = p["kind"] == "compressed"  # drawn larger, so that a fine-tuned point on it shows
                style = {"markerfacecolor": "none", "markersize": 11} if hollow else {"markersize": 7}
                ax.plot(p[key] / unit, p["acc"], PARETO_KINDS[p["kind"]][0], color=colours[source], **style)
        front = pareto_front([(p[key] / unit, p["acc"]) for p in shown])
        right = max(p[key] / unit for p in shown)  # past its last point the front stays at its best accuracy
        ax.step([c for c, _ in front] + [right], [a for _, a in front] + [front[-1][1]], where="post", color="k",
                ls="--", lw=1, zorder=0)
        ax.set(xlabel=xlabel, ylabel="test accuracy", title=title)
        ax.margins(0.08)
    names = [plt.Line2D([], [], color=colours[source], lw=3, label=_label(source)) for source in sources]
    kinds = [plt.Line2D([], [], ls="", marker=marker, color="0.3", label=label, markersize=7,
                        markerfacecolor="none" if kind == "compressed" else "0.3")
             for kind, (marker, label) in PARETO_KINDS.items() if any(p["kind"] == kind for p in points)]
    kinds.append(plt.Line2D([], [], color="k", ls="--", lw=1, label="Pareto front"))
    columns = 2 if len(names) > 4 else 1
    fig.legend(handles=names, loc="lower left", ncol=columns, fontsize=8, frameon=False)
    fig.legend(handles=kinds, loc="lower right", fontsize=8, frameon=False)
    rows = max(math.ceil(len(names) / columns), len(kinds))
    fig.tight_layout(rect=(0, 0.01 + 0.042 * rows, 1, 1))
    return _save(fig, out / "pareto.png", layout=False)


def _save(fig, path: Path, layout: bool = True) -> Path:
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _layout(row: dict, which: str) -> str:
    """' (channels_last)' where the row timed that network faster in channels_last (rows before it: nothing)."""
    layout = row.get(f"latency_layout_{which}")
    return f" ({layout})" if layout and layout != "NCHW" else ""


def report_table(rows: list[dict]) -> str:
    """Accuracy (dense / sparse / compressed / final), params, MACs, latency and speed-up side by side."""
    lines = ["| method | model | dense acc | sparse acc | compressed acc | final acc | params | MACs kept | "
             "latency b64 (ms), faster layout | speed-up over dense in its faster layout |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['model']} | {r['dense_acc']:.4f} | {r['sparse_acc']:.4f} | "
                     f"{r['compressed_acc']:.4f} | {r['final_acc']:.4f} | {r['params_final']:,} / "
                     f"{r['params_dense']:,} | {r['macs_final'] / r['macs_dense']:.1%} | "
                     f"{r['latency_ms_b64_final']:.1f}{_layout(r, 'final')} | "
                     f"{r['latency_ms_b64_dense'] / r['latency_ms_b64_final']:.2f}x |")
    return "\n".join(lines) + "\n"


def write_report(directories: list[str | Path], out: str | Path) -> Path:
    """report.md (table + plots) for pipeline directories or single training runs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    directories = [Path(d) for d in directories]
    runs = [run for d in directories for run in _training_runs(d)]
    pipelines = [(d, json.loads((d / "result.json").read_text())) for d in directories
                 if (d / "result.json").exists()]
    lines = ["# prunekit report", ""]
    if pipelines:
        lines.append(report_table([row for _, row in pipelines]))  # its last newline leaves a blank line
    pareto = plot_pareto(pipelines, runs, out)
    if pareto:
        lines.append(f"![accuracy vs MACs and latency]({pareto.name})")
    lines.append(f"![curves]({plot_curves(runs, out).name})")
    for name, plot in (("structure", plot_structure), ("signatures", plot_signatures), ("kept", plot_kept),
                       ("budget", plot_budget)):
        path = plot(runs, out)
        if path:
            lines.append(f"![{name}]({path.name})")
    colours = _colours(runs)
    for run in runs:
        histogram = plot_gate_histogram(run, out, colours[run])
        if histogram:
            lines.append(f"![gates]({histogram.name})")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
