"""An exponential moving average of the trainable weights (``train.ema_decay``): validation, early
stopping and ``best/`` use the averaged weights, training steps the raw ones.

Averaging the weights a run passes through acts like a cheap ensemble of its recent states (on
Amazon Sports the only gains measured beyond the recipe's plateau were ensembles of seeds:
benchmarks/README.md, "Next-period"). Only trainable tensors are averaged: a LoRA run's frozen
backbone is not copied (``torch.optim.swa_utils.AveragedModel`` deep-copies the whole module,
frozen weights included, which is why it is not used here). The update is one fused
``torch._foreach_lerp_`` over all tensors, with the usual warm-up ``min(decay, (1 + n) / (10 +
n))`` so the first average is not dominated by the initial weights.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from trainer.errors import ConfigError


class WeightAverage:
    """The running average of ``model``'s trainable parameters (names as in ``named_parameters``)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"train.ema_decay {decay}: use a value in (0, 1), e.g. 0.999 (0 turns it off)")
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.average = [params[n].detach().clone() for n in self.names]
        self.updates = 0

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        return [params[n].detach() for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One optimizer step taken: move the average towards the current weights."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, self._params(model), 1.0 - decay)
        self.updates += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self, model: nn.Module):
        """``model`` holds the averaged weights inside the block, its own again after it."""
        params = self._params(model)
        own = [p.clone() for p in params]
        torch._foreach_copy_(params, self.average)
        try:
            yield model
        finally:
            torch._foreach_copy_(params, own)

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "average": dict(zip(self.names, self.average, strict=True)),
        }

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state["average"])
        if missing:
            raise ConfigError(f"the checkpoint's weight average lacks {sorted(missing)[:3]}: was the model changed?")
        self.updates = int(state["updates"])
        with torch.no_grad():
            torch._foreach_copy_(self.average, [state["average"][n] for n in self.names])
