"""The library API: the README's example runs verbatim, and a hand-written loop with the Sparsifier
ends with the weights `prunekit train` gives for the same seed."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prunekit.api import Sparsifier
from prunekit.config import make_config
from prunekit.distributed import DistContext
from prunekit.models import build
from prunekit.runner import make_loaders, model_spec, train
from prunekit.schedule import make_policy

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_example_runs(capsys):
    code = re.search(r"## In your own training loop.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "epoch 2: projected MACs" in out and "stage widths:" in out


@pytest.mark.parametrize("method, options", [("sss", {"target_macs": 0.5}), ("ista-bn", {"penalty": 0.5}),
                                             ("epsilon-resnet", {"epsilon": 0.5, "schedule": "constant"})])
def test_a_loop_with_the_sparsifier_matches_prunekit_train(tmp_path, tiny_fmnist, method, options):
    values = {"model": "resnet20", "data_dir": str(tiny_fmnist), "epochs": 2, "batch_size": 32, "lr": 0.05,
              "method": method, "channels_last": False, **options}  # the loop below feeds NCHW batches
    config = make_config(values)
    cli = train(config, tmp_path / "cli", log=lambda m: None)["model"]

    torch.manual_seed(config.seed)
    model = build(model_spec(config))
    loader, _ = make_loaders(config, DistContext())
    policy = make_policy(config)
    extra = {k: v for k, v in values.items() if k not in ("model", "method", "epochs", "lr", "data_dir")}
    sparsifier = Sparsifier(model, method, input_size=(1, 28, 28), epochs=2, steps_per_epoch=len(loader),
                            lr=0.05, data_dir=str(tiny_fmnist), **extra)
    net = sparsifier.model.train()
    for epoch in range(2):
        loader.set_epoch(epoch)
        for step, (x, y) in enumerate(loader):
            sparsifier.set_lr(policy.lr_at(epoch + step / len(loader)))
            logits = net(x)
            loss = F.cross_entropy(logits, y) + sparsifier.loss(logits, y)
            sparsifier.zero_grad()
            loss.backward()
            sparsifier.after_backward()
            sparsifier.step()
            sparsifier.after_step()
        sparsifier.end_epoch()
    for (name, a), (_, b) in zip(cli.state_dict().items(), net.state_dict().items()):
        assert torch.equal(a, b), name


def test_torchvision_model_and_weights_files_start_a_run(tmp_path):
    """`--model torchvision:resnet18 --weights FILE` on 10-class data: torchvision's .pth or .safetensors
    weights load (its 1000-class head is left out for the data's own), anything else is one line."""
    import torchvision
    from safetensors.torch import save_file

    from prunekit.config import ConfigError
    from prunekit.runner import load_into, read_state_dict

    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    save_file(reference.state_dict(), tmp_path / "r18.safetensors")
    spec = model_spec(make_config({"model": "torchvision:resnet18", "data": "cifar10"}))
    assert (spec.num_classes, spec.in_channels) == (10, 3)
    for name in ("r18.pth", "r18.safetensors"):
        model = build(spec)
        load_into(model, read_state_dict(tmp_path / name, spec.num_classes), optional=("fc.",))
        assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    with pytest.raises(ConfigError, match="torchvision models prunekit imports are"):
        model_spec(make_config({"model": "torchvision:resnet20", "data": "cifar10"}))
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="junk.pth: not a readable state_dict"):
        read_state_dict(tmp_path / "junk.pth", 10)


def test_distillation_and_rewinding_from_the_command_line(tmp_path, tiny_fmnist):
    from prunekit.cli import main

    common = ["--model", "resnet20", "--data-dir", str(tiny_fmnist), "--epochs", "1", "--batch-size", "32"]
    assert main(["train", *common, "--out", str(tmp_path / "teacher")]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "plain"), "--seed", "1"]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "kd"), "--seed", "1", "--teacher", str(tmp_path / "teacher"),
                 "--kd-weight", "5"]) == 0
    loss = {name: float((tmp_path / name / "metrics.jsonl").read_text().split('"train_loss": ')[1].split(",")[0])
            for name in ("plain", "kd")}
    assert loss["kd"] > loss["plain"]  # the same steps, plus 5 · T² · KL to the teacher
    policy = make_policy(make_config({"epochs": 3, "rewind": 10, "schedule": "step", "milestones": [5, 8]}))
    assert [policy.lr_at(e) for e in (0, 1, 2)] == pytest.approx([0.01, 0.001, 0.001])


def test_the_sparsifier_compresses_to_widths_rounded_as_configured():
    from prunekit.models import create

    torch.manual_seed(0)
    sparsifier = Sparsifier(create("resnet20", in_channels=1), "sss", input_size=(1, 28, 28), epochs=1,
                            steps_per_epoch=1, round_to=4)
    with torch.no_grad():
        for group in sparsifier.model.channel_groups():
            group.gate.weight[: group.gate.weight.numel() // 3] = 0  # 5 of 16, 10 of 32, 21 of 64 dead
    model, spec = sparsifier.compress()
    widths = [w for _, _, block in spec.blocks() for w in block.inner]
    assert widths == [12] * 3 + [24] * 3 + [44] * 3  # 11, 22, 43 alive, rounded up to multiples of 4
