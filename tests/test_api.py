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
              "method": method, **options}
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
