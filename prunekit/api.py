"""A prunekit method inside the user's own training loop: the calls `prunekit train` makes, one by one.

    sparsifier = prunekit.Sparsifier(model, method="sss", target_macs=0.5, input_size=(1, 28, 28),
                                     epochs=10, steps_per_epoch=len(loader))
    model = sparsifier.model                       # the gated network, with the user's weights
    for epoch in range(10):
        for x, y in loader:
            sparsifier.set_lr(lr_at(epoch))         # or drive sparsifier.optimizers' LR yourself
            logits = model(x)
            loss = F.cross_entropy(logits, y) + sparsifier.loss(logits, y)
            sparsifier.zero_grad(); loss.backward()
            sparsifier.after_backward(); sparsifier.step(); sparsifier.after_step()
        sparsifier.end_epoch()
    small, spec = sparsifier.compress()            # the plain smaller network, equal to the gated one
"""
from __future__ import annotations

import torch
from torch import nn

from .budget import budget_callbacks
from .compress import CompressionError, compress, relative_logit_difference
from .config import make_config, with_round_to
from .methods import build_method, dead_structures, gate_config, side_head_position, zero_gammas
from .models import build
from .models.imports import torchvision_spec
from .runner import load_into
from .spec import Spec


class Sparsifier:
    """Gates, optimizers, callbacks and budget of `method` around a model (a prunekit model, or a
    torchvision ResNet-family module); `options` are any `Config` fields (penalty, sss_structures, ...).

    It plays the part of the Trainer for the method's callbacks: it counts steps and epochs, so budgets,
    freezes and end-of-training rules run exactly as in `prunekit train`.
    """

    def __init__(self, model: nn.Module, method: str = "sss", *, input_size: tuple[int, int, int], epochs: int,
                 steps_per_epoch: int, lr: float = 0.1, target_macs: float | None = None,
                 target_params: float | None = None, **options):
        self.config = make_config({"method": method, "epochs": epochs, "lr": lr, "target_macs": target_macs,
                                   "target_params": target_params, **options}, "Sparsifier")
        self.config = with_round_to(self.config, next(model.parameters()).device.type)
        self.spec: Spec = model.spec if hasattr(model, "spec") else torchvision_spec(model)
        side = side_head_position(self.spec) if method == "epsilon-resnet" else None
        with torch.random.fork_rng(devices=[]):  # what the user's weights leave (a side head) as `prunekit train`
            torch.manual_seed(self.config.seed)
            self.model = build(self.spec, gate_config(method, self.config), side)
        self.model.to(next(model.parameters()).device)
        load_into(self.model, model.state_dict())
        parts = build_method(self.model, self.config, input_size)
        self.optimizers, self.callbacks = parts.optimizers, parts.callbacks
        self.callbacks += budget_callbacks(self.model, self.spec, self.config, input_size)
        self.input_size = input_size
        self.epoch, self.epochs, self.step_in_epoch = 0, epochs, 0
        self.train_loader = range(steps_per_epoch)  # the callbacks read len(trainer.train_loader)
        for cb in self.callbacks:
            cb.setup(self)
        self._start_epoch()

    def _start_epoch(self) -> None:
        for cb in self.callbacks:
            cb.on_epoch_start(self, self.epoch)

    def set_lr(self, lr: float) -> None:
        """The learning rate of every optimizer (gate optimizers' soft-threshold scales with it)."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | float:
        """The method's extra loss terms (ε-ResNet's side supervision), to add to the task loss."""
        return sum((t for cb in self.callbacks for t in cb.loss_terms(self, logits, targets).values()), 0.0)

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def after_backward(self) -> None:
        for cb in self.callbacks:
            cb.after_backward(self)

    def step(self) -> None:
        """Step every optimizer: SGD for the weights, the method's proximal optimizer for its factors."""
        for opt in self.optimizers:
            opt.step()

    def after_step(self) -> None:
        for cb in self.callbacks:
            cb.after_step(self)
        self.step_in_epoch += 1

    def end_epoch(self) -> dict:
        """Close the epoch (budget control steps, ε decisions) and return the method's metrics."""
        self.step_in_epoch -= 1  # callbacks see the epoch's last step, as after the Trainer's loop
        for cb in self.callbacks:
            cb.on_epoch_end(self, self.epoch)
        metrics = {}
        for cb in self.callbacks:
            metrics.update(cb.epoch_metrics(self, self.epoch))
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self._start_epoch()
        return metrics

    def compress(self) -> tuple[nn.Module, Spec]:
        """The smaller plain network and its spec; refuses (CompressionError) if it would not equal the
        gated network on random inputs to 1e-4 (relative)."""
        gated = self.model.eval()
        dead = dead_structures(gated, self.config.method, prune_percent=self.config.prune_percent)
        if self.config.method == "slimming":
            zero_gammas(gated, dead)
        result = compress(gated, self.spec, dead, round_to=self.config.round_to)
        device = next(gated.parameters()).device
        x = torch.randn(4, *self.input_size, generator=torch.Generator().manual_seed(0)).to(device)
        difference = relative_logit_difference(gated, result.model.to(device), x)
        result.model.cpu()
        if not difference <= 1e-4:
            raise CompressionError(f"Sparsifier.compress: logits differ by {difference:.3g} (relative) > 1e-4")
        return result.model, result.spec
