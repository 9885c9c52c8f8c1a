"""Per-item side information a model is built with: text vectors, attributes, count tables."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainer.text_tower import attribute_pairs


@dataclass
class ItemFeatures:
    """Per-item side information, aligned with item ids (reserved ids included)."""

    text: torch.Tensor | None = None
    """(num_items, D) fixed text vectors (zeros where an item has no text)."""
    text_stats: tuple[torch.Tensor, torch.Tensor] | None = None
    """(mean, std) the LLM tower's vectors were standardised with (trainer.text_tower.standardize)."""
    tower: object | None = None
    """The tuned LLM tower (trainer.text_tuning.TunedTower) with model.text_tuning=lora; ``text``
    is then its cache."""
    text_mode: str | None = None
    """Which encoder made ``text`` (model.item_text resolved: backbone, minilm or llm)."""
    attribute_ids: torch.Tensor | None = None
    """(num_attribute_links,) attribute ids of every item, concatenated."""
    attribute_offsets: torch.Tensor | None = None
    """(num_items,) start of each item's run in attribute_ids (EmbeddingBag offsets)."""
    num_attributes: int = 0
    attribute_vocab: dict[str, int] | None = None
    """Attribute token (``name=value``) -> id, as parse_attributes numbered them."""
    pairs: dict[str, np.ndarray] | None = None
    """Transition counts (trainer.priors CSR arrays) when the model has a transition prior."""
    item_events: dict[str, np.ndarray] | None = None
    """Items and times of the training events (trainer.trend_prior) when the model has a trend prior."""


def parse_attributes(
    attributes: list[str | None], vocab: dict[str, int] | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """``name=v1|v2; other=w`` strings -> (ids, offsets, vocabulary size); id 0 is "no attribute".
    ``vocab`` (token -> id) is filled as tokens are met; given one already filled (a trained
    model's), tokens it lacks are dropped instead (items first seen after training)."""
    grow = vocab is None or not vocab
    vocab = {} if vocab is None else vocab
    ids: list[int] = []
    offsets = np.zeros(len(attributes), dtype=np.int64)
    for i, text in enumerate(attributes):
        offsets[i] = len(ids)
        tokens = [f"{name}={value}" for name, value in attribute_pairs(text)]
        known = [vocab.setdefault(t, len(vocab) + 1) if grow else vocab.get(t, 0) for t in tokens]
        ids += [t for t in known if t] or [0]
    return np.array(ids, dtype=np.int64), offsets, len(vocab) + 1
