"""GPU properties of the training loop, proved on the CPU.

- No step waits for the device: every call that makes the host wait for a GPU (a read of a value, a
  copy to the CPU, a data-dependent shape) is counted, and an epoch of 8 steps makes exactly as many as
  one of 4: the reads `Trainer._read` does once per epoch (and every `check_every` steps).
- No tensor is made on the wrong device: with the default device set to "meta", a tensor created
  without an explicit device cannot be combined with the model's, as a CPU tensor could not with a
  GPU model's.
- Checkpoints carry every generator's state, and a resume restores it.
"""
import sys
import traceback

import pytest
import torch
from test_engine import StopAt, tiny_setup
from torch.overrides import TorchFunctionMode

from prunekit.checkpoint import latest_checkpoint, load_checkpoint
from prunekit.engine import Callback, autocast_dtype
from prunekit.methods import METHODS

EPOCH_READS = 1  # Trainer._read at the epoch end: loss sum, images seen, correct count and non-finite flag
EVAL_READS = 1  # Trainer.evaluate: loss sum, correct count and images seen

HOST_READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
              torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
              torch.Tensor.nonzero, torch.nonzero, torch.Tensor.equal, torch.equal, torch.Tensor.allclose,
              torch.allclose}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


def _is_mask(index) -> bool:
    """A boolean-tensor index selects a data-dependent number of elements: the host must count them."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _line(frame: traceback.FrameSummary) -> str:
    folder, name = frame.filename.rsplit("/", 2)[-2:]
    return f"{folder}/{name}:{frame.lineno} ({frame.name})"


def _where() -> str:
    """The innermost line outside torch that made the call and, if elsewhere, the prunekit line that
    led to it."""
    outside = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename]
    own = [f for f in outside if "/prunekit/" in f.filename]
    return _line(outside[-1]) + (f" via {_line(own[-1])}" if own and own[-1] is not outside[-1] else "")


class count_syncs(TorchFunctionMode):
    """Records each call that makes the host wait for a GPU, with where it was made (`.calls`)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS or (func in INDEXING and _is_mask(args[1])):
            self.calls.append(f"{func.__name__} at {_where()}")
        return func(*args, **(kwargs or {}))


def epoch_reads(tmp_path, method: str, images: int, **options) -> list[str]:
    """The waits of one training epoch of `method` on `images` images (16 a batch)."""
    trainer = tiny_setup(tmp_path / f"{method}-{images}", method, images=images, **options)
    with count_syncs() as syncs:
        trainer.train_epoch()
    return syncs.calls


def test_the_counter_sees_every_kind_of_wait():
    x, mask = torch.arange(4.0), torch.tensor([True, False, True, False])
    with count_syncs() as syncs:
        x.sum().item(), bool(x[0]), float(x[1]), int(x[2]), x.tolist(), x.cpu(), x.numpy(), x.nonzero()
        x[mask], x[1:], x[torch.tensor([0, 1])]
        x[mask] = 0.0
        if x.max() > 0:
            pass
    assert [c.split(" at ")[0] for c in syncs.calls] == [
        "item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy", "nonzero", "__getitem__",
        "__setitem__", "__bool__"]
    assert all("test_device.py" in c for c in syncs.calls)


@pytest.mark.parametrize("method", METHODS)
def test_no_training_step_waits_for_the_device(tmp_path, method):
    """8 steps wait exactly as often as 4: only the epoch's own reads remain."""
    four, eight = epoch_reads(tmp_path, method, 64), epoch_reads(tmp_path, method, 128)
    assert len(eight) == len(four) == EPOCH_READS, "\n".join(eight)


@pytest.mark.parametrize("method", ["sss", "binary-gate", "ista-bn", "slimming"])
def test_stream_gates_add_no_wait_and_no_stray_tensor_in_paper_mode(tmp_path, method):
    """Stream-gated training without a budget: 8 steps wait as often as 4, and it runs with "meta" as
    the default device."""
    four = epoch_reads(tmp_path / "a", method, 64, stream_channels=True)
    eight = epoch_reads(tmp_path / "b", method, 128, stream_channels=True)
    assert len(eight) == len(four) == EPOCH_READS, "\n".join(eight)
    trainer = tiny_setup(tmp_path / "meta", method, epochs=1, stream_channels=True)
    trainer.train_loader = DrawnOnCPU(trainer.train_loader)
    trainer.eval_loaders = {name: DrawnOnCPU(loader) for name, loader in trainer.eval_loaders.items()}
    with torch.device("meta"):
        assert trainer.fit()[0]["train_loss"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_evaluation_reads_the_device_once(tmp_path, method):
    trainer = tiny_setup(tmp_path, method, images=128)
    with count_syncs() as syncs:
        trainer.evaluate(trainer.eval_loaders["test"])
    assert len(syncs.calls) == EVAL_READS, "\n".join(syncs.calls)


@pytest.mark.parametrize("terminal", [False, True])
def test_the_device_is_read_every_check_every_steps_and_the_progress_bar_adds_no_read(tmp_path, monkeypatch,
                                                                                    terminal):
    """Progress lines (one at every read here), bars, steps.jsonl and TensorBoard use the reads there are."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    trainer = tiny_setup(tmp_path, "sss", images=128)
    trainer.check_every, trainer.progress.every_s, lines = 3, 0, []
    trainer.progress.log = lines.append
    with count_syncs() as syncs:
        trainer.progress.open(0, 8)
        trainer.train_epoch()
        trainer.progress.end_epoch({"train_loss": 1.0})
        trainer.progress.close()
    assert len(syncs.calls) == 2 + EPOCH_READS, "\n".join(syncs.calls)  # after steps 3 and 6 of 8, and the end
    assert len(lines) == (0 if terminal else 2) and (tmp_path / "tb").is_dir()


def test_skipping_non_finite_steps_reads_each_step(tmp_path):
    """Skipping an optimizer step needs the host to know, before it steps, that the loss is finite."""
    four, eight = epoch_reads(tmp_path, "none", 64, on_nan="skip"), epoch_reads(tmp_path, "none", 128, on_nan="skip")
    assert len(four) == 4 + EPOCH_READS and len(eight) == 8 + EPOCH_READS, "\n".join(eight)


class DrawnOnCPU:
    """A loader whose batches are drawn before the code under test runs, outside its default device."""

    def __init__(self, loader):
        self.loader = loader

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        with torch.device("cpu"):
            return iter(list(self.loader))


@pytest.mark.parametrize("method", METHODS)
def test_no_tensor_is_created_off_the_model_device(tmp_path, method):
    """Training, evaluation, every callback and the checkpoint with "meta" as the default device: a
    tensor made without `device=` would be a meta tensor meeting the model's CPU tensors, and fail."""
    trainer = tiny_setup(tmp_path, method, epochs=2)
    trainer.train_loader = DrawnOnCPU(trainer.train_loader)
    trainer.eval_loaders = {name: DrawnOnCPU(loader) for name, loader in trainer.eval_loaders.items()}
    with torch.device("meta"):  # what torch.set_default_device("meta") sets, for this block only
        history = trainer.fit()
    assert len(history) == 2 and all(h["train_loss"] > 0 for h in history)
    assert all(p.device.type == "cpu" for p in trainer.model.parameters())


@pytest.mark.parametrize("method, options", [("sss", {"stream_channels": True}),
                                             ("binary-gate", {"stream_channels": True}),
                                             ("ista-bn", {"stream_channels": True}), ("ista-bn", {"round_to": 4}),
                                             ("sss", {"stream_channels": True, "round_to": 4}),
                                             ("binary-gate", {"stream_channels": True, "budget_rank": "magnitude"}),
                                             ("ista-bn", {"stream_channels": True, "budget_rank": "magnitude"}),
                                             ("sss", {"sss_structures": "channels", "budget_rank": "magnitude"}),
                                             ("ista-bn", {"stream_channels": True, "budget_rank": "normalized"})])
def test_budgeted_stream_or_rounded_training_stays_on_the_device(tmp_path, method, options):
    """A budget with stream channels or rounded widths, frozen in its first epoch, under "meta" as the
    default device; once frozen, an epoch waits for the device no more than an unbudgeted one."""
    from prunekit.budget import budget_callbacks
    from prunekit.config import make_config

    trainer = tiny_setup(tmp_path, method, epochs=2, penalty=0.05, **options)
    config = make_config({"method": method, "target_macs": 0.5, "penalty": 0.05, **options})
    (controller,) = budget_callbacks(trainer.model, trainer.model.spec, config, (1, 8, 8))
    controller.check_every, controller.reach_fraction = 1, 0.5
    trainer.callbacks.append(controller)
    trainer.train_loader = DrawnOnCPU(trainer.train_loader)
    trainer.eval_loaders = {name: DrawnOnCPU(loader) for name, loader in trainer.eval_loaders.items()}
    with torch.device("meta"):
        history = trainer.fit()
    assert history[0]["budget_frozen"] and controller.frozen
    trainer.train_loader = trainer.train_loader.loader
    with count_syncs() as syncs:
        trainer.train_epoch()
    assert len(syncs.calls) == EPOCH_READS, "\n".join(syncs.calls)


class DrawEachEpoch(Callback):
    """Draws from the global generator at each epoch's start, as dropout or random erasing would."""

    def __init__(self):
        self.draws = []

    def on_epoch_start(self, trainer, epoch):
        self.draws.append(torch.rand(4))


def test_a_resumed_run_draws_the_same_random_numbers(tmp_path):
    straight = DrawEachEpoch()
    tiny_setup(tmp_path / "a", "none", callbacks=[straight]).fit()
    with pytest.raises(KeyboardInterrupt):
        tiny_setup(tmp_path / "b", "none", callbacks=[DrawEachEpoch(), StopAt(2)]).fit()
    resumed = DrawEachEpoch()
    trainer = tiny_setup(tmp_path / "b", "none", callbacks=[resumed])
    torch.manual_seed(1234)  # another process: the generator is wherever it happens to be
    trainer.fit(resume=True)
    assert torch.equal(resumed.draws[0], straight.draws[2])


def test_gpu_generator_states_are_saved_and_restored_on_the_gpus_a_machine_has(tmp_path, monkeypatch):
    """Two GPUs' states are saved; a one-GPU machine restores the first; a CPU-only one ignores both."""
    states = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state.tolist(), device)))
    with pytest.raises(KeyboardInterrupt):
        tiny_setup(tmp_path, "none", callbacks=[StopAt(1)]).fit()
    saved = load_checkpoint(latest_checkpoint(tmp_path))[1]["cuda_rng"]
    assert [s.tolist() for s in saved] == [[1, 2], [3, 4]]
    with pytest.raises(KeyboardInterrupt):
        tiny_setup(tmp_path, "none", callbacks=[StopAt(2)]).fit(resume=True)
    assert restored == [([1, 2], 0)]
    monkeypatch.undo()
    trainer = tiny_setup(tmp_path, "none")
    assert trainer.fit(resume=True)[-1]["epoch"] == 3 and restored == [([1, 2], 0)]


def test_mixed_precision_is_bf16_without_loss_scaling_where_the_device_has_it(tmp_path, monkeypatch):
    trainer = tiny_setup(tmp_path, "sss", epochs=1, amp=True)
    with trainer._autocast():
        assert trainer.model(torch.zeros(2, 1, 8, 8)).dtype == torch.bfloat16
    assert not trainer.scaler.is_enabled()
    assert trainer.fit()[-1]["train_loss"] > 0
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: including_emulation)
    assert autocast_dtype(torch.device("cuda")) == torch.float16  # bf16 only emulated: fp16 and a GradScaler
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: True)
    assert autocast_dtype(torch.device("cuda")) == torch.bfloat16
    assert autocast_dtype(torch.device("cpu")) == torch.bfloat16
