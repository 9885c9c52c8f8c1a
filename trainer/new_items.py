"""Vectors for items a trained model has never seen, from their text and attributes: what lets a
server recommend an item the moment it is posted (``POST /v1/items``), before any retrain.

A new item's vector is built as the trained item encoder (trainer.model.ItemEncoder) builds every
vector: an id part, plus the learned projection of its text vector (the same frozen text encoder:
the LLM tower or MiniLM), plus the mean embedding of its known attribute values. Its id part is
the learned "unknown item" row for a model trained with id dropout (what its features were
learned beside), zero for a model that reads text (the text carries it), else the mean id row
(as ``bgpt retrain`` grows a table). Attribute values the model never saw are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from data_sharding.vocab import NUM_RESERVED_ITEMS, UNK_ITEM
from trainer import text_tower
from trainer.errors import ConfigError
from trainer.item_features import parse_attributes

TEXT_MODES = ("llm", "minilm")


@dataclass
class ItemWriter:
    """What a trained model needs to place new items (built once per model; kept in exports)."""

    id_row: torch.Tensor
    """(H,) the id part of every new item."""
    text: dict | None = None
    """How the model's text vectors are made: {"mode": llm|minilm, and for llm "text_model",
    "pooling", "max_tokens", "layers", and "tuned" (trainer.text_tuning.TowerSpec) for a tower
    fine-tuned with the model}; None when the model reads no text."""
    text_proj: torch.Tensor | None = None
    """(H, D) the trained projection of text vectors."""
    text_stats: tuple[torch.Tensor, torch.Tensor] | None = None
    """The LLM tower's standardisation (mean, std) of the trained catalogue."""
    attribute_vocab: dict[str, int] | None = None
    attribute_table: torch.Tensor | None = None
    """(A, H) the trained attribute embeddings (row 0: no attribute)."""
    tower_weights: dict[str, torch.Tensor] | None = None
    """A tuned tower's LoRA adapters (its frozen weights come from ``text["text_model"]``)."""
    _tower: object = field(default=None, repr=False)
    """The LLM tower, loaded at the first new item and kept (trainer.text_tower.load_tower)."""

    @classmethod
    def from_model(cls, model) -> ItemWriter | None:
        """The writer of a trained BehaviorGPT (None when it cannot build new items: a sharded
        table, or text made from the backbone's own token table)."""
        items, cfg = model.items, model.cfg
        if items.sharded is not None:
            return None
        ids = items.ids.weight.detach()
        text = None
        if items.text_proj is not None:
            if items.text_mode not in TEXT_MODES:
                return None
            text = {"mode": items.text_mode}
            if items.text_mode == "llm":
                text.update(text_model=cfg.text_model, pooling=cfg.text_pooling, max_tokens=cfg.text_max_tokens)
                text["layers"] = cfg.text_tower_layers
        if items.id_dropout > 0:
            id_row = ids[UNK_ITEM].clone()
        elif text is not None:
            id_row = torch.zeros(ids.shape[1])
        else:
            id_row = ids[NUM_RESERVED_ITEMS:].mean(dim=0)
        table = items.attributes.weight.detach().clone() if items.attributes is not None else None
        proj = items.text_proj.weight.detach().clone() if text is not None else None
        stats = items.text_stats if text is not None and text["mode"] == "llm" else None
        writer = cls(id_row, text, proj, stats, items.attribute_vocab if table is not None else None, table)
        if text is not None and items.tower is not None:  # new items read through the tuned tower
            text["tuned"] = items.tower.spec.to_json()
            writer.tower_weights = {
                n: p.detach().clone() for n, p in items.tower.model.named_parameters() if p.requires_grad
            }
            writer._tower = items.tower
        return writer

    def vectors(self, titles: list[str | None], attributes: list[str | None]) -> torch.Tensor:
        """(n, H) vectors of new items from their titles and ``name=v1|v2; other=w`` attributes."""
        out = self.id_row.expand(len(titles), -1).clone()
        if self.text is not None:
            out += self._text_vectors(titles, attributes) @ self.text_proj.T
        if self.attribute_table is not None:
            ids, offsets, _ = parse_attributes(attributes, dict(self.attribute_vocab))
            bags = torch.nn.functional.embedding_bag(
                torch.from_numpy(ids), self.attribute_table, torch.from_numpy(offsets), mode="mean", padding_idx=0
            )
            out += bags
        return out

    def _text_vectors(self, titles: list[str | None], attributes: list[str | None]) -> torch.Tensor:
        if self.text["mode"] == "minilm":
            from trainer.factory import minilm_text

            return minilm_text(titles)
        if self._tower is None:
            self._tower = self._load_tower()
        texts = [text_tower.item_text(t, a) for t, a in zip(titles, attributes, strict=True)]
        # Rows of reserved ids come first (no flag there), so each new item's flag says "no text".
        padded = [None] * NUM_RESERVED_ITEMS + texts
        vectors, _ = text_tower.encode(padded, self._tower, self.text["pooling"], self.text["max_tokens"])
        if self.text_stats is None:
            raise ConfigError("this model's LLM text statistics are missing (an export from before they were kept?)")
        return text_tower.standardize(vectors[NUM_RESERVED_ITEMS:], self.text_stats)[0]

    # ----- exports ---------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON metadata) for an export; :meth:`from_state` reads them back."""
        tensors = {"new_item.id_row": self.id_row}
        if self.text_proj is not None:
            tensors["new_item.text_proj"] = self.text_proj
        if self.text_stats is not None:
            tensors["new_item.text_mean"], tensors["new_item.text_std"] = self.text_stats
        if self.attribute_table is not None:
            tensors["new_item.attributes"] = self.attribute_table
        for name, value in (self.tower_weights or {}).items():
            tensors[f"new_item.tower.{name}"] = value
        return tensors, {"text": self.text, "attribute_vocab": self.attribute_vocab}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict | None) -> ItemWriter | None:
        if meta is None or "new_item.id_row" not in tensors:
            return None
        stats = None
        if "new_item.text_mean" in tensors:
            stats = tensors["new_item.text_mean"], tensors["new_item.text_std"]
        prefix = "new_item.tower."
        tower = {n[len(prefix) :]: v for n, v in tensors.items() if n.startswith(prefix)}
        return cls(
            tensors["new_item.id_row"],
            meta.get("text"),
            tensors.get("new_item.text_proj"),
            stats,
            meta.get("attribute_vocab"),
            tensors.get("new_item.attributes"),
            tower or None,
        )

    def _load_tower(self):
        """The tower this model read text with: frozen, or rebuilt with its tuned adapters."""
        path = text_tower.tower_path(self.text["text_model"])
        if "tuned" not in self.text:
            return text_tower.load_tower(path, self.text.get("layers"))
        from trainer.text_tuning import TowerSpec, build_tower

        tower = build_tower(TowerSpec(**self.text["tuned"]), path)
        missing = {n for n, p in tower.model.named_parameters() if p.requires_grad} - set(self.tower_weights or {})
        if missing:
            raise ConfigError(f"this model's tuned text tower lacks its adapters ({sorted(missing)[:2]}...)")
        tower.model.load_state_dict(self.tower_weights, strict=False)
        return tower


def split_known(existing: dict[str, int], items: list[str]) -> tuple[list[int], list[str]]:
    """(positions of the ``items`` that are new, the ids already known); an id twice is refused."""
    if len(set(items)) != len(items):
        raise ConfigError("the same item id appears twice in the request")
    return [i for i, item in enumerate(items) if item not in existing], [item for item in items if item in existing]
