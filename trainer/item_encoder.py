"""The item encoder: each item's vector = a trainable id row + a projection of its fixed text
vector + the mean of its attribute embeddings (each part where the run has it). The same vectors
embed the input events and score the next item (tied output embeddings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data_sharding.vocab import NUM_RESERVED_ITEMS, UNK_ITEM
from trainer.errors import ConfigError
from trainer.item_features import ItemFeatures
from trainer.item_rows import RowTable


class ItemEncoder(nn.Module):
    """Item id -> vector: id embedding (+ projected text vector) (+ mean attribute embedding).
    In training, ``id_dropout`` of the rows read their id part from the UNK row instead.
    ``sharded``: the id rows live in a TorchRec table split over the ranks (trainer.sharded_table);
    ``table(needed)`` then returns the needed rows alone (trainer.item_rows.RowTable)."""

    def __init__(
        self, num_items: int, hidden: int, features: ItemFeatures, id_dropout: float = 0.0, sharded: bool = False
    ) -> None:
        super().__init__()
        self.id_dropout = id_dropout
        self.cold_from: int | None = None
        """With id dropout: ids from here on were never trained (a run validated on a newer
        generation's items): they always read the UNK id row (trainer.factory.mark_cold_items)."""
        # With text, start near the text geometry: id rows 0.1x, so projected vectors dominate.
        scale = 0.1 if features.text is not None else 1.0
        self.ids, self.sharded = None, None
        if sharded:
            from trainer.sharded_table import ShardedItemTable

            if id_dropout > 0:
                raise ConfigError("model.id_dropout reads the UNK row for dropped items: not built for a sharded table")
            self.sharded = ShardedItemTable(num_items, hidden, init_std=hidden**-0.5 * scale)
        else:
            self.ids = nn.Embedding(num_items, hidden, padding_idx=0)
            nn.init.normal_(self.ids.weight, std=hidden**-0.5)
            if scale != 1.0:
                with torch.no_grad():
                    self.ids.weight.mul_(scale)
        self.text_proj = None
        self.text_mode = features.text_mode  # these three place new items (trainer.new_items)
        self.text_stats = features.text_stats
        self.attribute_vocab = features.attribute_vocab
        self.tower = features.tower
        """The tuned LLM tower (model.text_tuning=lora): ``text`` is its cache, saved in checkpoints."""
        if features.text is not None:
            self.register_buffer("text", features.text.float(), persistent=self.tower is not None)
            self.text_proj = nn.Linear(features.text.shape[1], hidden, bias=False)
        self.attributes = None
        self.register_buffer("attribute_bags", None, persistent=False)
        if features.attribute_ids is not None and features.num_attributes > 1:
            self.register_buffer("attribute_ids", features.attribute_ids, persistent=False)
            self.register_buffer("attribute_offsets", features.attribute_offsets, persistent=False)
            ends = torch.cat([features.attribute_offsets[1:], torch.tensor([len(features.attribute_ids)])])
            lengths = ends - features.attribute_offsets
            self.register_buffer("attribute_lengths", lengths, persistent=False)
            self.attribute_bags = _padded_bags(features.attribute_ids, lengths)
            self.attributes = nn.EmbeddingBag(features.num_attributes, hidden, mode="mean", padding_idx=0)
            nn.init.normal_(self.attributes.weight, std=hidden**-0.5)

    @property
    def checkpoint_buffers(self) -> tuple[str, ...]:
        """Buffers a checkpoint keeps beside the trainable weights: a tuned tower's cache."""
        return ("text",) if self.tower is not None else ()

    def table(self, needed: torch.Tensor | None = None, touched: torch.Tensor | None = None) -> torch.Tensor:
        """(num_items, H) vectors of every item. ``needed`` (ids, repeats allowed): only those rows
        are complete (the others hold their id embedding alone), for a step that reads no other
        row (a sampled softmax): the text and attribute parts then cost the batch's items, not the
        catalogue's. A sharded table returns the ``needed`` rows alone (a RowTable, indexed by item
        id; its ``needed`` must be unique). ``touched``: the items a training step reads when it
        reads every row (a full softmax): a tuned text tower encodes those afresh."""
        if self.sharded is not None:
            return self._sharded_rows(needed)
        table = self.ids.weight
        dropping = self.id_dropout > 0 and (self.training or self.cold_from is not None)
        if needed is None:
            if dropping:
                dropped = self._dropped(torch.arange(len(table), device=table.device))
                table = torch.where(dropped.unsqueeze(1), table[UNK_ITEM], table)
            if self.text_proj is not None:
                table = table + self.text_proj(self._text(None, touched))
            if self.attributes is not None:
                table = table + self.attributes(self.attribute_ids, self.attribute_offsets)
            return table
        parts = []
        if dropping:  # a dropped row's id part becomes the UNK row's: add the difference
            parts.append(self._dropped(needed).unsqueeze(1) * (table[UNK_ITEM] - table[needed]))
        if self.text_proj is not None:
            parts.append(self.text_proj(self._text(needed)))
        if self.attributes is not None:
            parts.append(self._attribute_rows(needed))
        if not parts:
            return table
        # Each id's parts are added once: its first occurrence carries them (no unique(), whose
        # output size would make the host wait for the device).
        return table.index_add(0, needed, sum(parts) * _first_occurrences(needed)[:, None])

    def _text(self, ids: torch.Tensor | None, touched: torch.Tensor | None = None) -> torch.Tensor:
        """Text vectors of ``ids`` (every item when None): the fixed vectors, or a tuned tower's
        (trainer.text_tuning: fresh for the items a training step reads, cached for the others)."""
        if self.tower is None:
            return self.text if ids is None else self.text[ids]
        return self.tower.read(self.text, ids, touched, self.training and torch.is_grad_enabled())

    def _sharded_rows(self, needed: torch.Tensor | None) -> RowTable:
        if needed is None:
            raise ConfigError(
                "a sharded item table has no dense catalogue table: a step reads the rows it needs "
                "(sampled softmax), and the catalogue is ranked by slices (ShardedItemTable.target_ranks)"
            )
        return RowTable(needed, self.complete(needed, self.sharded(needed)))

    def complete(self, ids: torch.Tensor, id_rows: torch.Tensor) -> torch.Tensor:
        """The vectors of ``ids`` from their id rows: + projected text, + mean attribute embedding,
        in the order the dense ``table()`` adds them (the sharded table's lookups and its
        catalogue ranking, ShardedItemTable's ``complete``)."""
        rows = id_rows
        if self.text_proj is not None:
            rows = rows + self.text_proj(self.text[ids])
        if self.attributes is not None:
            rows = rows + self._attribute_rows(ids)
        return rows

    def _dropped(self, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows),) bool: which ``rows`` read the UNK id row (reserved ids never): a random
        ``id_dropout`` share in training, and the never-trained rows from ``cold_from`` on."""
        if self.training:
            dropped = torch.rand(rows.shape, device=rows.device) < self.id_dropout
        else:
            dropped = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
        if self.cold_from is not None:
            dropped = dropped | (rows >= self.cold_from)
        return dropped & (rows >= NUM_RESERVED_ITEMS)

    def _attribute_rows(self, needed: torch.Tensor) -> torch.Tensor:
        """(len(needed), H) mean attribute embedding of the ``needed`` items (their bags gathered)."""
        if self.attribute_bags is not None:  # fixed width: no data-dependent shape
            return self.attributes(self.attribute_bags[needed])
        lengths = self.attribute_lengths[needed]
        offsets = torch.cumsum(lengths, 0) - lengths
        # Position of every link of the needed items in attribute_ids: its item's start + its rank.
        starts = torch.repeat_interleave(self.attribute_offsets[needed] - offsets, lengths)
        links = starts + torch.arange(len(starts), device=starts.device)
        return self.attributes(self.attribute_ids[links], offsets)

    def forward(self, items: torch.Tensor, table: torch.Tensor | RowTable | None = None) -> torch.Tensor:
        if isinstance(table, RowTable):
            return table[items]
        return F.embedding(items, self.table() if table is None else table)


PADDED_BAGS_MAX_GROWTH = 4
"""Attribute bags are kept as one 0-padded (items, longest bag) matrix unless it would hold more
than this many times the links (a few items with very many attributes): then the bags a step reads
are gathered from the links (repeat_interleave, whose output size costs a GPU step a host sync)."""


def _padded_bags(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
    """(items, longest bag) attribute ids, 0 after each bag's end (EmbeddingBag's padding_idx, which
    its mean leaves out), or None when that matrix would be too large (PADDED_BAGS_MAX_GROWTH)."""
    width = int(lengths.max()) if len(lengths) else 0
    if width * len(lengths) > PADDED_BAGS_MAX_GROWTH * max(1, len(ids)):
        return None
    columns = torch.arange(width)
    inside = columns[None, :] < lengths[:, None]
    bags = torch.zeros(len(lengths), width, dtype=ids.dtype)
    bags[inside] = ids  # row-major order of the inside cells is the links' order
    return bags


def _first_occurrences(ids: torch.Tensor) -> torch.Tensor:
    """(len(ids),) 1.0 where an id appears for the first time in ``ids`` (by position), else 0.0."""
    order = torch.sort(ids, stable=True)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[1:] = order.values[1:] != order.values[:-1]
    out = torch.empty_like(first)
    out[order.indices] = first
    return out.float()
