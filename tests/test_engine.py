import math
import os
import subprocess
import sys

import pytest
import torch

from prunekit.checkpoint import latest_checkpoint, load_checkpoint
from prunekit.config import make_config
from prunekit.data import ArrayDataset, BatchLoader
from prunekit.distributed import DistContext
from prunekit.engine import Callback, Trainer, TrainingError
from prunekit.methods import build_method, gate_config, side_head_position
from prunekit.models import build
from prunekit.schedule import make_policy
from prunekit.spec import ConvLayerSpec, ConvNetSpec, cifar_resnet_spec


TINY_CONVNET = ConvNetSpec([ConvLayerSpec(8), ConvLayerSpec(8, pool="max2")], num_classes=4, in_channels=1)
TINY_RESNET = cifar_resnet_spec(8, num_classes=4, in_channels=1)  # ε-ResNet gates residual branches


def tiny_setup(tmp_path, method="sss", epochs=3, callbacks=(), images=64, device="cpu", **overrides):
    """A trainer of `method` on `device` with `images` learnable 8x8 images, 16 a batch."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(images) % 4
    pixels = torch.randint(0, 50, (images, 1, 8, 8), generator=g, dtype=torch.uint8)
    for i, y in enumerate(labels):
        pixels[i, 0, 2 * y:2 * y + 2, :] = 250
    data = ArrayDataset(pixels, labels, 4, "tiny")
    config = make_config({"method": method, "epochs": epochs, "lr": 0.05, "batch_size": 16, **overrides})
    residual = method == "epsilon-resnet" or config.stream_channels or "sss_structures" in overrides  # blocks matter
    spec = TINY_RESNET if residual else TINY_CONVNET
    model = build(spec, gate_config(method, config), side_head_position(spec) if method == "epsilon-resnet" else None)
    parts = build_method(model, config, (1, 8, 8))
    train = BatchLoader(data, 16, train=True, mean=(0.2,), std=(0.3,), pad=1, flip=True, seed=0, device=device)
    test = BatchLoader(data, 16, train=False, mean=(0.2,), std=(0.3,), device=device)
    return Trainer(model, parts.optimizers, make_policy(config), train, {"test": test}, epochs=epochs,
                   run_dir=tmp_path, callbacks=list(parts.callbacks) + list(callbacks), amp=config.amp,
                   on_nan=config.on_nan, ctx=DistContext(device=torch.device(device)), log=lambda m: None)


def test_training_lowers_the_loss(tmp_path):
    history = tiny_setup(tmp_path, method="none", epochs=4).fit()
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_acc"] > 0.4  # chance is 0.25


class StopAt(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_start(self, trainer, epoch):
        if epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.parametrize("method", ["none", "sss", "binary-gate", "ista-bn", "slimming", "epsilon-resnet"])
def test_interrupted_then_resumed_run_ends_with_identical_weights(tmp_path, method):
    straight = tiny_setup(tmp_path / "a", method)
    straight.fit()
    interrupted = tiny_setup(tmp_path / "b", method, callbacks=[StopAt(2)])
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    assert latest_checkpoint(tmp_path / "b").name == "epoch-0002"
    resumed = tiny_setup(tmp_path / "b", method)
    resumed.fit(resume=True)
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


class PoisonLoss(Callback):
    """A NaN loss term in the given steps of epoch 2 (0-based; every step by default)."""

    def __init__(self, steps=None):
        self.steps = steps

    def loss_terms(self, trainer, logits, targets):
        poisoned = trainer.epoch == 1 and (self.steps is None or trainer.step_in_epoch in self.steps)
        return {"poison": torch.tensor(float("nan"))} if poisoned else {}


class CountSteps(Callback):
    def __init__(self):
        self.steps = 0

    def after_step(self, trainer):
        self.steps += 1


def test_nan_loss_stops_naming_step_and_last_checkpoint(tmp_path):
    trainer = tiny_setup(tmp_path, "none", callbacks=[PoisonLoss()])
    with pytest.raises(TrainingError, match=r"epoch 2, step 1; last good checkpoint: .*epoch-0001"):
        trainer.fit()


@pytest.mark.parametrize("check_every, steps_run", [(50, 8), (2, 6)])
def test_nan_loss_is_found_at_the_next_read_and_named_by_its_first_step(tmp_path, check_every, steps_run):
    """The device is read every `check_every` steps and at the epoch end: the run stops at the first
    read after the NaN (here after step 2 of 4, or at the epoch end), naming the step where it began."""
    counter = CountSteps()
    trainer = tiny_setup(tmp_path, "none", callbacks=[PoisonLoss(steps={1, 2}), counter])
    trainer.check_every = check_every
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 2, step 2; last good checkpoint: .*epoch-0001"):
        trainer.fit()
    assert counter.steps == steps_run
    assert latest_checkpoint(tmp_path).name == "epoch-0001"
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_nan_loss_steps_can_be_skipped(tmp_path):
    trainer = tiny_setup(tmp_path, "none", callbacks=[PoisonLoss(steps={0, 2})], on_nan="skip")
    trainer.fit()
    assert trainer.skipped_steps == 2 and len(trainer.history) == 3
    assert [h["skipped_steps"] for h in trainer.history] == [0, 2, 0]
    assert all(math.isfinite(h["train_loss"]) and h["train_loss"] > 0 for h in trainer.history)


def test_an_epoch_with_every_step_skipped_stops_instead_of_logging_nothing(tmp_path):
    trainer = tiny_setup(tmp_path, "none", callbacks=[PoisonLoss()], on_nan="skip")
    with pytest.raises(TrainingError, match="every step of epoch 2 had a non-finite loss"):
        trainer.fit()
    assert trainer.skipped_steps == 4 and len(trainer.history) == 1


def test_skipped_steps_leave_the_bn_statistics_as_they_were(tmp_path):
    """Every step of epoch 2 is skipped: the statistics end as epoch 1's checkpoint holds them."""
    trainer = tiny_setup(tmp_path, "none", callbacks=[PoisonLoss()], on_nan="skip")
    with pytest.raises(TrainingError):
        trainer.fit()
    saved, _ = load_checkpoint(latest_checkpoint(tmp_path))
    for name, buffer in trainer.model.named_buffers():
        assert torch.equal(buffer, saved[name]), name


class OverflowStatistics(Callback):
    """Sets a running variance to inf in the forward of the given steps of epoch 2, under a finite loss
    (as a huge step does), or at the end of epoch 2 when `steps` is None."""

    def __init__(self, steps=None):
        self.steps = steps

    def loss_terms(self, trainer, logits, targets):
        if trainer.epoch == 1 and self.steps is not None and trainer.step_in_epoch in self.steps:
            trainer.model.features[0].bn.running_var[0] = float("inf")
        return {}

    def on_epoch_end(self, trainer, epoch):
        if epoch == 1 and self.steps is None:
            trainer.model.features[1].bn.running_var[0] = float("inf")


def test_a_step_overflowing_the_statistics_under_a_finite_loss_is_skipped(tmp_path):
    trainer = tiny_setup(tmp_path, "none", callbacks=[OverflowStatistics(steps={1})], on_nan="skip")
    trainer.fit()
    assert [h["skipped_steps"] for h in trainer.history] == [0, 1, 0]
    assert all(torch.isfinite(b).all() for b in trainer.model.buffers() if b.is_floating_point())


def test_non_finite_statistics_are_never_checkpointed(tmp_path):
    trainer = tiny_setup(tmp_path, "none", callbacks=[OverflowStatistics()])
    with pytest.raises(TrainingError, match=r"non-finite weights or statistics after epoch 2 "
                                            r"\(features.1.bn.running_var\); last good checkpoint: .*epoch-0001"):
        trainer.fit()
    assert latest_checkpoint(tmp_path).name == "epoch-0001"
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_two_process_gloo_ddp_reduces_metrics_and_keeps_gates_identical(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_WORKER)
    env = {**os.environ, "TESTS_DIR": os.path.dirname(__file__), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "--tee", "3", str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-6000:]  # the ranks' own output (--tee) before torchrun's summary
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for key in r0["gates"]:
        assert torch.equal(r0["gates"][key], r1["gates"][key])
    assert r0["history"] == r1["history"]
    assert r0["test_seen"] == 64.0


DDP_WORKER = r"""
import os, sys, torch
sys.path.insert(0, os.environ["TESTS_DIR"])
from pathlib import Path
from test_engine import tiny_setup
from prunekit.data import BatchLoader
from prunekit.distributed import all_reduce, init_distributed, leave_process_group
from prunekit.engine import Trainer
ctx = init_distributed("cpu")
base = tiny_setup(Path(sys.argv[1]) / f"rank{ctx.rank}", "sss", epochs=2)
data = base.train_loader
from prunekit.data import ArrayDataset
dataset = ArrayDataset(data.images, data.labels, 4, "tiny")
train = BatchLoader(dataset, 16, train=True, mean=(0.2,), std=(0.3,), pad=1, flip=True, seed=0,
                    rank=ctx.rank, world_size=ctx.world_size)
test = BatchLoader(dataset, 16, train=False, mean=(0.2,), std=(0.3,), rank=ctx.rank, world_size=ctx.world_size)
trainer = Trainer(base.model, base.optimizers, base.policy, train, {"test": test}, epochs=2, ctx=ctx,
                  callbacks=base.callbacks, log=lambda m: None)
history = trainer.fit()
seen = all_reduce(torch.tensor(float(len(test.labels[ctx.rank::ctx.world_size]))), ctx).item()
gates = {k: v for k, v in trainer.model.state_dict().items() if "gate" in k}
keep = [{k: v for k, v in h.items() if k not in ("train_images_per_s", "epoch_time_s")} for h in history]
torch.save({"gates": gates, "history": keep, "test_seen": seen}, Path(sys.argv[1]) / f"rank{ctx.rank}.pt")
leave_process_group(wait=True)
"""
