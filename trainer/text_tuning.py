"""The LLM item-text tower fine-tuned with the user model (``model.text_tuning=lora``), as HLLM
(Chen et al. 2024, bytedance/HLLM) trains its item LLM: LoRA adapters on the tower train on the
next-item loss, through the pooled item vectors.

Encoding the whole catalogue through the tower at every step is what a frozen tower avoids, so a
step re-encodes only the items it reads (the batch's items, and its sampled negatives under a
sampled softmax; at most ``model.text_tuned_items`` of them, chosen at random) with gradients,
and every other item reads a cached table of vectors. The cache:

- starts as the frozen tower's vectors (the adapters' B matrices start at zero, so the tuned
  tower equals the frozen one at step 0; trainer.factory caches those per vocabulary);
- takes each re-encoded item's new vector at once;
- is recomputed in full every ``model.text_refresh_every`` training steps (0: never in training),
  and before the model is read for evaluation, prediction or export when the adapters changed
  since the last full pass (``dirty``), so a model is always evaluated with the table its
  weights give;
- is saved in checkpoints with the flag and the step count, so a resumed run continues with the
  exact table it stopped with.

The statistics that standardise the vectors (trainer.text_tower.standardize) stay those of the
frozen tower's first encoding: the projection learns that scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from trainer import text_tower
from trainer.errors import ConfigError

if TYPE_CHECKING:
    from trainer.backbone import Backbone

TUNINGS = ("frozen", "lora")


@dataclass
class TowerSpec:
    """What builds a tuned tower again: the tower, its blocks, how it reads text, its adapters."""

    text_model: str
    layers: int | None
    pooling: str
    max_tokens: int
    r: int
    alpha: int
    dropout: float
    target_modules: list[str]

    def to_json(self) -> dict:
        return asdict(self)


def build_tower(spec: TowerSpec, path) -> Backbone:
    """The tower at ``path`` (a model directory), cut to ``spec.layers`` blocks, with LoRA adapters
    (only they train)."""
    tower = text_tower.load_tower(path, spec.layers)
    tower.model = add_lora(tower.model, spec, "the text tower")
    return tower


def add_lora(module: nn.Module, cfg, what: str) -> nn.Module:
    """``module`` with LoRA adapters (``cfg``: r, alpha, dropout, target_modules) that alone train
    in it; ``what`` names it in the error when no target module is there."""
    from peft import LoraConfig, inject_adapter_in_model

    present = {name.rsplit(".", 1)[-1] for name, _ in module.named_modules()}
    targets = [t for t in cfg.target_modules if t in present]
    if not targets:
        raise ConfigError(f"lora.target_modules {cfg.target_modules} match no module of {what}")
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets)
    module = inject_adapter_in_model(config, module)
    for name, param in module.named_parameters():
        param.requires_grad = "lora_" in name
    return module


class TunedTower(nn.Module):
    """The tower and every item's tokens; :meth:`read` gives the text vectors a step uses."""

    def __init__(
        self,
        tower,
        spec: TowerSpec,
        texts: list[str | None],
        stats: tuple[torch.Tensor, torch.Tensor],
        refresh_every: int = 0,
        max_items: int = 0,
    ) -> None:
        super().__init__()
        self.model, self.tokenizer, self.spec = tower.model, tower.tokenizer, spec
        # Each block's activations are recomputed in the backward pass instead of kept: what a
        # step's re-encoded items cost in memory is one block's, not the tower's. (transformers
        # renamed the switch; the old name is deprecated.)
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        elif hasattr(self.model, "gradient_checkpointing_enable"):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.hidden_size = tower.hidden_size
        self.refresh_every, self.max_items = refresh_every, max_items
        present = [i for i, t in enumerate(texts) if t]
        pad = text_tower.pad_id(tower.tokenizer)
        batch, _ = text_tower.tokenize(tower.tokenizer, [texts[i] for i in present], spec.pooling, spec.max_tokens, pad)
        width = batch["input_ids"].shape[1] if present else 1
        tokens = torch.full((len(texts), width), pad, dtype=torch.long)
        mask = torch.zeros(len(texts), width, dtype=torch.long)
        if present:
            tokens[present], mask[present] = batch["input_ids"], batch["attention_mask"]
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("has_text", mask.sum(1) > 0, persistent=False)
        self.register_buffer("mean", stats[0].float(), persistent=False)
        self.register_buffer("std", stats[1].float(), persistent=False)
        # Saved with the cache in checkpoints (trainer.checkpoint.trainable_state).
        self.register_buffer("dirty", torch.tensor(False))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    checkpoint_buffers = ("dirty", "steps")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(n, D + 1) standardised vectors of items ``ids`` (all with text), the no-text flag 0."""
        mask = self.mask[ids]
        width = max(1, int(mask.sum(1).max())) if len(ids) else 1
        mask = mask[:, :width]
        tokens = self.tokens[ids, :width]
        hidden = self.model(input_ids=tokens, attention_mask=mask, use_cache=False).last_hidden_state
        pooled = text_tower.pool(hidden.float(), mask, self.spec.pooling)
        vectors = text_tower.standardized(pooled, (self.mean, self.std))
        return torch.cat([vectors, vectors.new_zeros(len(ids), 1)], dim=1)

    @torch.no_grad()
    def refresh(self, cache: torch.Tensor, batch_size: int = 64) -> None:
        """Every item with text encoded again into ``cache`` (adapter dropout off)."""
        was_training = self.model.training
        self.model.eval()
        ids = torch.nonzero(self.has_text).flatten()
        # Longest first: batches of similar lengths pad little.
        ids = ids[torch.argsort(self.mask[ids].sum(1), descending=True, stable=True)]
        for start in range(0, len(ids), batch_size):
            rows = ids[start : start + batch_size]
            cache[rows] = self(rows)
        self.model.train(was_training)
        self.dirty.fill_(False)

    def read(
        self, cache: torch.Tensor, ids: torch.Tensor | None, touched: torch.Tensor | None, tuning: bool
    ) -> torch.Tensor:
        """Text vectors of ``ids`` (all items when None). ``tuning`` (a training step): the items
        of ``ids`` (or of ``touched``, when every item is read) are encoded afresh with gradients,
        the rest read ``cache``; otherwise the cache alone, refreshed first when it is stale."""
        if not tuning:
            if bool(self.dirty):
                self.refresh(cache)
            return cache if ids is None else cache[ids]
        self.steps += 1
        if self.refresh_every and int(self.steps) % self.refresh_every == 0:
            self.refresh(cache)
        source = ids if ids is not None else touched
        if source is None:
            raise ConfigError("a tuned text tower needs the items a training step reads")
        unique, inverse = torch.unique(source, return_inverse=True)
        picked = unique[self.has_text[unique]]
        if self.max_items and len(picked) > self.max_items:
            picked = picked[torch.randperm(len(picked), device=picked.device)[: self.max_items]]
        if not len(picked):  # no item with text among them
            return cache if ids is None else cache[ids]
        fresh = self(picked)
        if ids is None:
            out = cache.index_copy(0, picked, fresh)
        else:
            out = cache[unique].index_copy(0, torch.searchsorted(unique, picked), fresh)[inverse]
        with torch.no_grad():
            cache[picked] = fresh.detach()
        self.dirty.fill_(True)  # the optimizer step will move the adapters
        return out
