"""Atomic files and resumable checkpoints.

A checkpoint is a directory `checkpoints/epoch-NNNN/` holding `model.safetensors` (weights) and
`state.pt` (optimizers, LR policy, callbacks, CPU and GPU generator states, history; loaded with
`weights_only=True`). It is written under a temporary name and renamed into place, then
`checkpoints/latest` is replaced atomically, so a kill at any moment leaves either the old or the new
checkpoint, never a mix. Both files load onto the CPU and the trainer moves what it restores onto its
own device, so a checkpoint written on a GPU resumes on a CPU and the other way round.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import FileFormatError, one_line, utf8_text

CHECKPOINT_NAME = re.compile(r"epoch-\d{4,}")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


class NonFiniteError(CheckpointError):
    """Weights or statistics holding NaN or inf: a diverged model is never written or used as a trained one.
    `tensors` names them ("bn1.running_var and 3 more tensors")."""

    def __init__(self, message: str, tensors: str):
        super().__init__(message)
        self.tensors = tensors


def host_tensors(state_dict: dict) -> dict:
    """Contiguous CPU copies of a state dict's tensors (what a file holds)."""
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def may_be_infinite(name: str) -> bool:
    """ε-ResNet's per-block ε (`gates.EpsilonGate.epsilon`) is +inf where a budget discards the block for good."""
    return name == "gate.epsilon" or name.endswith(".gate.epsilon")


def non_finite(tensors: dict) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf (NaN only, for those `may_be_infinite`)."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(
        (v.isnan().logical_not() & v.ne(-torch.inf) if may_be_infinite(k) else v.isfinite()).all())]


def _describe(names: list[str]) -> str:
    return names[0] + (f" and {len(names) - 1} more tensors" if len(names) > 1 else "")


def check_finite(tensors: dict, path: str | Path) -> None:
    """Refuse to write host `tensors` to `path` when any holds NaN or inf."""
    bad = non_finite(tensors)
    if bad:
        raise NonFiniteError(f"{path}: not written: {_describe(bad)} hold NaN or inf (the training diverged; "
                             f"lower the learning rate or penalty)", _describe(bad))


def free_space(path: str | Path) -> str:
    """The room left on the disk holding `path`, for write errors: it tells a full disk from other failures
    (torch reports a full disk as "unexpected pos 6336 vs 6256")."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stats = os.statvfs(path)
    except OSError:
        return "free space unknown"
    return f"{stats.f_bavail * stats.f_frsize // 1024} KiB free on its disk"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:  # e.g. a full disk: name the file meant, not the temporary
        Path(tmp).unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False) + "\n")


def save_weights(state_dict: dict, path: str | Path, metadata: dict | None = None) -> None:
    """Weights as safetensors (contiguous CPU copies), written atomically, and only when all are finite."""
    tensors = host_tensors(state_dict)
    check_finite(tensors, path)

    def write(tmp):
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as exc:  # e.g. a full disk, reported from safetensors' Rust side
            raise CheckpointError(f"{path}: cannot be written ({one_line(exc, 200)}; {free_space(path)})") from None

    atomic_write(path, write)


def load_weights(path: str | Path) -> dict:
    """A safetensors file's tensors; refused when any holds NaN or inf."""
    try:
        weights = load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weights file not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({one_line(exc, 200)})") from None
    bad = non_finite(weights)
    if bad:
        raise NonFiniteError(f"{path}: {_describe(bad)} hold NaN or inf: the model diverged and is not used",
                             _describe(bad))
    return weights


def save_checkpoint(run_dir: str | Path, epoch: int, model_state: dict, state: dict, keep: int = 2) -> Path:
    """Write checkpoint `epoch` (number of finished epochs) and point `latest` at it."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{epoch:04d}"
    tensors = host_tensors(model_state)
    check_finite(tensors, final)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".epoch-{epoch:04d}."))
    try:
        save_file(tensors, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except (OSError, RuntimeError, SafetensorError) as exc:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        reason = " ".join((getattr(exc, "strerror", None) or str(exc)).split())[:200]
        raise CheckpointError(f"{final}: cannot be written ({reason}; {free_space(root)}); the previous checkpoint "
                              f"is intact") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", final.name + "\n")
    old = sorted(p for p in root.glob("epoch-*") if p.is_dir() and p != final)
    for p in old[:max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def remove_partial_writes(run_dir: str | Path) -> None:
    """Delete the temporaries of writes a killed process never finished (they are never read)."""
    run_dir = Path(run_dir)
    for partial in (run_dir / "checkpoints").glob(".epoch-*"):
        shutil.rmtree(partial, ignore_errors=True)
    for partial in run_dir.rglob(".*.tmp"):
        partial.unlink(missing_ok=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `checkpoints/latest` names, or None before the first one."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    try:
        name = utf8_text(pointer).strip()
    except FileFormatError as exc:
        raise CheckpointError(f"{pointer}: names no checkpoint (the file {exc}); start over with --force") from None
    if not CHECKPOINT_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer}: names no checkpoint (expected epoch-NNNN, got {name[:40]!r}); write the "
                              f"newest checkpoints/epoch-NNNN name into it, or start over with --force")
    path = pointer.parent / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer}: points at missing checkpoint {path.name}")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(model state_dict, training state) of a checkpoint directory, never unpickling objects."""
    path = Path(path)
    weights = load_weights(path / "model.safetensors")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path / 'state.pt'}: training state not found") from None
    except Exception as exc:  # torch raises several types for truncated or unsafe files
        reason = one_line(exc, 200)
        raise CheckpointError(f"{path / 'state.pt'}: not a loadable training state ({reason})") from None
    return weights, state
