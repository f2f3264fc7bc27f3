"""The GPU path end to end: every method trained, compressed, fine-tuned and evaluated on CUDA through
the CLI; runs killed and resumed on a GPU, and moved between a GPU and a CPU machine mid-run.

Every test needs a CUDA GPU and is skipped without one (`pytest -m cuda` runs only these). A "CPU
machine" is a subprocess that sees no GPU (CUDA_VISIBLE_DEVICES empty).
"""
import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
from test_device import EPOCH_READS
from test_engine import tiny_setup

from prunekit.checkpoint import latest_checkpoint, load_checkpoint
from prunekit.cli import main
from prunekit.methods import METHODS

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = ["--model", "resnet20", "--batch-size", "32", "--lr", "0.05"]
METHOD_OPTIONS = {  # strengths that leave some structures alive on tiny data (as tests/test_cli.py)
    "none": [],
    "sss": ["--target-macs", "0.5", "--schedule", "constant"],
    "binary-gate": ["--target-macs", "0.5", "--schedule", "constant"],
    "ista-bn": ["--penalty", "4", "--schedule", "constant"],
    "slimming": ["--penalty", "1e-3", "--prune-percent", "40"],
    "epsilon-resnet": ["--epsilon", "0.05", "--schedule", "piecewise", "--lr-schedule", '{"0": 0.05}'],
}
RESUME_EPOCHS = 8
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def metrics_of(run) -> list[dict]:
    """metrics.jsonl without the timing fields."""
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return [{k: v for k, v in json.loads(line).items() if k not in ("train_images_per_s", "epoch_time_s")}
            for line in lines]


def train_args(out, data_dir, device: str) -> list[str]:
    return ["train", *TINY, "--epochs", RESUME_EPOCHS, "--data-dir", data_dir, "--device", device, "--out", out]


def killed_after_first_checkpoint(args: list, env: dict) -> list[dict]:
    """Run `prunekit ARGS` in a subprocess, SIGKILL it once a checkpoint exists; the metrics it left."""
    out = args[args.index("--out") + 1]
    latest = out / "checkpoints" / "latest"
    process = subprocess.Popen([sys.executable, "-m", "prunekit.cli", *map(str, args)],
                               env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while not latest.exists():
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.002)
    finally:
        process.kill()
        process.wait()
    return metrics_of(out)


def assert_resumed(out, before: list[dict]) -> None:
    """Every epoch logged once, and the epochs logged before the kill kept as they were."""
    after = metrics_of(out)
    assert [m["epoch"] for m in after] == list(range(1, RESUME_EPOCHS + 1))
    assert after[:len(before)] == before
    assert load_checkpoint(latest_checkpoint(out))[1]["epoch"] == RESUME_EPOCHS


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_compresses_finetunes_and_evaluates_on_the_gpu(tmp_path, tiny_fmnist, capsys, method):
    out, tuned = tmp_path / method, tmp_path / f"{method}-finetuned"
    common = ["--data-dir", tiny_fmnist, "--device", "cuda"]
    assert run_cli("train", *TINY, "--epochs", 2, *common, "--method", method, *METHOD_OPTIONS[method],
                   "--out", out) == 0
    assert all(m["train_loss"] > 0 for m in metrics_of(out))
    assert run_cli("compress", out) == 0  # refuses unless the compressed logits equal the gated model's
    card = json.loads((out / "compressed" / "card.json").read_text())
    assert card["macs_after"] <= card["macs_before"]
    assert run_cli("finetune", out / "compressed", *TINY, "--finetune-epochs", 2, *common, "--out", tuned) == 0
    capsys.readouterr()
    assert run_cli("eval", tuned, "--data-dir", tiny_fmnist, "--device", "cuda") == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    # Another batch size may pick other cuDNN kernels: at most one of the 48 test images may change class.
    assert result["test_acc"] == pytest.approx(metrics_of(tuned)[-1]["test_acc"], abs=1 / 48 + 1e-9)


def test_a_run_killed_on_the_gpu_resumes_on_the_gpu(tmp_path, tiny_fmnist):
    out = tmp_path / "run"
    before = killed_after_first_checkpoint(train_args(out, tiny_fmnist, "cuda"), {})
    assert run_cli(*train_args(out, tiny_fmnist, "cuda"), "--resume") == 0
    assert_resumed(out, before)


def test_a_gpu_checkpoint_resumes_on_a_cpu_machine(tmp_path, tiny_fmnist):
    out = tmp_path / "run"
    before = killed_after_first_checkpoint(train_args(out, tiny_fmnist, "auto"), {})
    assert len(load_checkpoint(latest_checkpoint(out))[1]["cuda_rng"]) == torch.cuda.device_count()
    resumed = subprocess.run([sys.executable, "-m", "prunekit.cli", *map(str, train_args(out, tiny_fmnist, "auto")),
                              "--resume"], env={**os.environ, "OMP_NUM_THREADS": "1", **NO_GPU},
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_resumed(out, before)


def test_a_cpu_checkpoint_resumes_on_a_gpu(tmp_path, tiny_fmnist):
    out = tmp_path / "run"
    before = killed_after_first_checkpoint(train_args(out, tiny_fmnist, "auto"), NO_GPU)
    assert load_checkpoint(latest_checkpoint(out))[1]["cuda_rng"] == []
    assert run_cli(*train_args(out, tiny_fmnist, "auto"), "--resume") == 0
    assert_resumed(out, before)


def test_the_gpu_trainer_autotunes_cudnn_keeps_channels_last_and_uses_bf16_without_scaling(tmp_path):
    trainer = tiny_setup(tmp_path, "sss", epochs=1, device="cuda", amp=True)
    assert torch.backends.cudnn.benchmark and trainer.channels_last
    convs = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    if torch.cuda.is_bf16_supported(including_emulation=False):
        assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    else:
        assert trainer.amp_dtype == torch.float16 and trainer.scaler.is_enabled()
    assert trainer.fit()[-1]["train_loss"] > 0


def synchronizations(tmp_path, method: str, images: int) -> list[str]:
    """The synchronizing CUDA calls torch reports during the second training epoch on `images` images
    (the first one autotunes cuDNN and creates the libraries' handles)."""
    trainer = tiny_setup(tmp_path / f"{method}-{images}", method, images=images, device="cuda")
    trainer.train_epoch()
    trainer.epoch += 1
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_epoch()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # the first use in a process also warns that the debug mode is a prototype: not a synchronization
    return [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]


@pytest.mark.parametrize("method", METHODS)
def test_no_training_step_synchronizes_the_gpu(tmp_path, method):
    """torch's own sync detector agrees with tests/test_device.py: 8 steps synchronize as often as 4."""
    four, eight = synchronizations(tmp_path, method, 64), synchronizations(tmp_path, method, 128)
    assert len(eight) == len(four) >= EPOCH_READS, "\n".join(eight)


@pytest.mark.parametrize("method", ["sss", "epsilon-resnet"])
def test_torchrun_on_every_gpu_trains_and_compresses(tmp_path, tiny_fmnist, method):
    """`torchrun --nproc_per_node=<GPUs>`, then an exact compression. With two GPUs or more: NCCL, DDP and
    synchronised BN, and the global batch logged. With one (NCCL refuses two ranks on one GPU): WORLD_SIZE 1 runs
    alone, as without torchrun, on that GPU."""
    gpus = torch.cuda.device_count()
    out = tmp_path / "ddp"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", "-m",
                           "prunekit.cli",
                           *map(str, ["train", *TINY, "--epochs", 2, "--data-dir", tiny_fmnist, "--device", "cuda",
                                      "--method", method, *METHOD_OPTIONS[method], "--sync-bn", "--out", out])],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (f"global batch {32 * gpus} ({gpus} processes × --batch-size 32)" in done.stdout) == (gpus > 1)
    assert [m["epoch"] for m in metrics_of(out)] == [1, 2]
    assert run_cli("compress", out) == 0
