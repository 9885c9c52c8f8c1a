"""A trained model in inference form: encode histories, append one event with the key/value cache,
score the catalogue.

Training keeps an item *encoder* (id table + projected text + attributes) and LoRA adapters; at
inference both are folded once: the item table is computed and frozen, LoRA is merged into the
backbone's weights. The same object serves batch prediction, the HTTP service and exports, so
every path scores exactly alike.

Windows follow training: a history is its last ``max_len`` events, left-aligned (the oldest
event sits at position 0 and has time gap 0). :meth:`InferenceModel.append` extends a cached
window by one event in one backbone step; when the window is full it is re-encoded (see
:class:`trainer.inference.CachedState`). A model with model.time_bias reads the time of the
prediction in every layer: its cache holds all but the window's last event, which goes through
the backbone at request time (:meth:`InferenceModel.hidden_at`; trainer.time_bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from data_sharding.vocab import NUM_RESERVED_ITEMS
from trainer.errors import ConfigError
from trainer.folding import merge_lora, quantize_int8
from trainer.heads import time_bucket
from trainer.online_pairs import LivePairs
from trainer.time_bias import cache_argument, cache_view, query_bias, settled_cache, window_bias


def live_counter(prior) -> LivePairs | None:
    """A live counter for a transition prior whose counts say how recent they are."""
    if prior is None or prior.counted_until is None:
        return None
    return LivePairs(prior.num_items, prior.steps, prior.counted_until)


@dataclass
class CachedState:
    """One user's encoded window: the backbone's key/value cache, the hidden state after its
    last event, and what the next event's time gap is measured from."""

    cache: object
    hidden: torch.Tensor | None
    """(H,) state after the window's last event: what the next-item scores are computed from
    (None with model.time_bias: it depends on the time of the request, :meth:`InferenceModel.hidden_at`)."""
    length: int
    """Events in the window (positions the cache holds, or one more with model.time_bias)."""
    last_time: int
    times: torch.Tensor | None = None
    """(length,) the window's event times (model.time_bias: what the bias of each key is read from)."""
    pending: torch.Tensor | None = None
    """(1, 1, H) the last event's input, not yet in the cache (model.time_bias)."""


class InferenceModel:
    """Frozen item table + backbone + heads, with the vocabulary to map external ids."""

    def __init__(
        self,
        backbone: nn.Module,
        item_table: torch.Tensor,
        type_embedding: nn.Embedding,
        gap_embedding: nn.Embedding,
        heads: dict[str, nn.Linear],
        items: list[str],
        titles: list[str | None],
        event_types: list[str],
        max_len: int,
        version: str,
        query_gaps: nn.Embedding | None = None,
        prior=None,
        repeat=None,
        writer=None,
        trend=None,
        time_bias: torch.Tensor | None = None,
    ) -> None:
        self.backbone = backbone.eval()
        self.time_bias = time_bias.detach().float() if time_bias is not None else None
        """(buckets, heads) model.time_bias: attention bias by time before the prediction."""
        self.writer = writer
        """A trainer.new_items.ItemWriter: vectors for items posted after training (None: the
        model knows items by id only, or by text it cannot rebuild)."""
        self.query_gaps = query_gaps.eval() if query_gaps is not None else None
        self.prior = prior.eval() if prior is not None else None
        """A trainer.priors.TransitionPrior (model.transition_prior)."""
        self.live = live_counter(self.prior)
        """The prior's live pair counts (trainer.online_pairs.LivePairs): events posted to a server
        (:meth:`count_events`), read by queries scored at a time (``at_ms``); None without a prior
        or with counts that do not record how recent they are."""
        self.repeat = repeat.eval() if repeat is not None else None
        """A trainer.priors.RepeatPrior (model.repeat_prior)."""
        self.trend = trend.eval() if trend is not None else None
        """A trainer.trend_prior.TrendPrior (model.trend_prior): every score is taken at a time
        (``at_ms``), over the run's events plus the events posted since (:meth:`count_events`)."""
        self.live_events = trend.live() if trend is not None else None
        self.item_table = item_table.detach().float().contiguous()
        self.types = type_embedding.eval()
        self.gaps = gap_embedding.eval()
        self.heads = {k: v.eval() for k, v in heads.items()}
        self.items = items
        self.titles = titles
        self.item_index = {item: i for i, item in enumerate(items) if i >= NUM_RESERVED_ITEMS}
        self.event_types = event_types
        self.type_index = {name: i for i, name in enumerate(event_types) if i > 0}
        self.max_len = max_len
        self.time_buckets = gap_embedding.num_embeddings
        self.version = version
        self.quantized = False
        self.cache_name = cache_argument(backbone)

    @classmethod
    def from_model(cls, model, info, event_types: list[str], version: str) -> InferenceModel:
        """From a trained BehaviorGPT (eval mode) and its dataset info; merges LoRA in place."""
        from trainer.new_items import ItemWriter

        with torch.no_grad():
            table = model.items.table().detach().clone()
            writer = ItemWriter.from_model(model)
        heads = {
            name: getattr(model.heads, f"{name}_head")
            for name in ("type", "time", "value")
            if getattr(model.heads, f"{name}_head") is not None
        }
        backbone = merge_lora(model.backbone)
        return cls(
            backbone,
            table,
            model.types,
            model.gaps,
            heads,
            list(info.items),
            list(info.titles),
            event_types,
            model.cfg.max_len,
            version,
            model.query_gaps,
            model.prior,
            model.repeat,
            writer,
            getattr(model, "trend", None),
            getattr(model, "time_bias", None),
        )

    @property
    def num_items(self) -> int:
        return self.item_table.shape[0]

    def quantize(self) -> InferenceModel:
        self.backbone = quantize_int8(self.backbone)
        self.quantized = True
        return self

    def add_items(self, items: list[str], titles: list[str | None], attributes: list[str | None]) -> list[str]:
        """Make items the model has never seen recommendable at once: each gets a vector from its
        title and ``name=v1|v2; other=w`` attributes (trainer.new_items) and a new model id; ids
        already known are left as they are. Returns the ids added. The count priors (transition,
        trend) count them from now on, as they count the events posted to a server
        (:meth:`count_events`): live transition pairs to and from them, their events in the trend
        windows."""
        from trainer.new_items import split_known

        if self.writer is None or (self.writer.text is None and self.writer.attribute_table is None):
            raise ConfigError(
                "this model cannot place new items: that needs item text read by model.item_text llm or "
                "minilm, or item attributes, in a dense item table; add them to the data and `bgpt retrain`"
            )
        fresh, _ = split_known(self.item_index, items)
        if not fresh:
            return []
        with torch.inference_mode():
            rows = self.writer.vectors([titles[i] for i in fresh], [attributes[i] for i in fresh])
        first = self.num_items
        self.item_table = torch.cat([self.item_table, rows.float()])
        for offset, i in enumerate(fresh):
            self.items.append(items[i])
            self.titles.append(titles[i])
            self.item_index[items[i]] = first + offset
        if self.live is not None:
            self.live.grow(self.num_items)
        if self.trend is not None:
            self.trend.grow(self.num_items)
        if self.repeat is not None:
            self.repeat.grow(self.num_items)
        return [items[i] for i in fresh]

    # ----- ids -------------------------------------------------------------------------------
    def item_ids(self, items: list[str]) -> list[int]:
        """External item ids -> model ids; unknown ones raise ConfigError naming them."""
        unknown = [i for i in items if i not in self.item_index]
        if unknown:
            raise ConfigError(f"unknown items {unknown[:5]} (not in the model's vocabulary {self.version})")
        return [self.item_index[i] for i in items]

    def type_ids(self, types: list[str | None]) -> list[int]:
        """Event type names -> ids; None means the only type when there is just one."""
        out = []
        for name in types:
            if name is None:
                if len(self.event_types) != 2:
                    raise ConfigError(f"event_type is required: the model knows {self.event_types[1:]}")
                out.append(1)
            elif name not in self.type_index:
                raise ConfigError(f"unknown event type {name!r}; the model knows {self.event_types[1:]}")
            else:
                out.append(self.type_index[name])
        return out

    # ----- encoding --------------------------------------------------------------------------
    def _embed(self, items: torch.Tensor, types: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
        return self.item_table[items] + self.types(types) + self.gaps(time_bucket(gaps, self.time_buckets))

    @torch.inference_mode()
    def encode(
        self,
        items: torch.Tensor,
        types: torch.Tensor,
        times: torch.Tensor,
        mask: torch.Tensor,
        at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) left-aligned windows -> (B, H) hidden state after each window's last event;
        ``at`` (B,): the time of each prediction (required by model.time_bias)."""
        gaps = torch.zeros_like(times)
        gaps[:, 1:] = times[:, 1:] - times[:, :-1]
        x = self._embed(items, types, gaps) * mask.unsqueeze(-1)
        attention = mask.long()
        if self.time_bias is not None:
            if at is None:
                raise ConfigError("this model (model.time_bias) encodes for a time: give the time of the prediction")
            attention = window_bias(self.time_bias, self.time_buckets, times, mask, at)
        hidden = self.backbone(inputs_embeds=x, attention_mask=attention, use_cache=False).last_hidden_state
        return hidden[torch.arange(len(items)), mask.sum(1) - 1]

    @torch.inference_mode()
    def start(self, items: list[int], types: list[int], times: list[int]) -> CachedState:
        """Encode one history (its last ``max_len`` events) and keep the key/value cache."""
        items, types, times = items[-self.max_len :], types[-self.max_len :], times[-self.max_len :]
        t = torch.tensor(times, dtype=torch.int64)
        gaps = torch.zeros_like(t)
        gaps[1:] = t[1:] - t[:-1]
        x = self._embed(torch.tensor(items), torch.tensor(types), gaps).unsqueeze(0)
        if self.time_bias is None:
            out = self.backbone(inputs_embeds=x, use_cache=True)
            return CachedState(out[self.cache_name], out.last_hidden_state[0, -1], len(items), int(times[-1]))
        cache = settled_cache(self.backbone, self.cache_name, x, t, self.time_bias, self.time_buckets)
        return CachedState(cache, None, len(items), int(times[-1]), t, x[:, -1:])

    def _pending_step(self, state: CachedState, at: int):
        """(hidden state, extended cache) of the time-bias window's last event read at time ``at``;
        ``state.cache`` is left as it was."""
        mask = query_bias(self.time_bias, self.time_buckets, state.times, at)
        view = cache_view(state.cache)
        out = self.backbone(inputs_embeds=state.pending, attention_mask=mask, use_cache=True, **{self.cache_name: view})
        return out.last_hidden_state[0, -1], view

    @torch.inference_mode()
    def hidden_at(self, state: CachedState, at_ms: int) -> torch.Tensor:
        """(H,) the state that scores the next item of a cached window at time ``at_ms`` (model.time_bias:
        one position through the backbone; otherwise the cached state)."""
        if self.time_bias is None:
            return state.hidden
        return self._pending_step(state, at_ms)[0]

    @torch.inference_mode()
    def append(self, state: CachedState, item: int, etype: int, time: int) -> CachedState:
        """One new event through the backbone on top of the cached window (one position of work;
        model.time_bias: the window's last event goes into the cache, read at the new event's time).
        The old state may not be used again."""
        gap = torch.tensor([[time - state.last_time]], dtype=torch.int64)
        x = self._embed(torch.tensor([[item]]), torch.tensor([[etype]]), gap)
        if self.time_bias is not None:
            _, cache = self._pending_step(state, time)
            times = torch.cat([state.times, torch.tensor([time], dtype=torch.int64)])
            return CachedState(cache, None, state.length + 1, int(time), times, x)
        out = self.backbone(inputs_embeds=x, use_cache=True, **{self.cache_name: state.cache})
        return CachedState(out[self.cache_name], out.last_hidden_state[0, -1], state.length + 1, int(time))

    def warmup(self) -> None:
        """Run every code path once (full window, short window, one cached step, scoring), so the
        first real request does not pay for one-time kernel and allocator set-up."""
        n = self.max_len
        items = [NUM_RESERVED_ITEMS + i % max(1, self.num_items - NUM_RESERVED_ITEMS) for i in range(n)]
        for length in (n, 1):
            state = self.start(items[:length], [1] * length, list(range(length)))
            context = self.context([items[:length]])
            hidden = self.hidden_at(state, length)[None]
            self.top_k(hidden, 10, context=context, gap_ms=torch.tensor([1000]), at_ms=torch.tensor([length]))
        self.append(self.start(items[:2], [1, 1], [0, 1]), items[2 % n], 1, 2)

    def count_events(self, items: list[int], times: list[int], new: list[bool]) -> int:
        """Count one user's ``new`` events (``items``, ``times``: the user's events in time order,
        the ones before the new events first) in the live counts: the transition pairs ending at
        them, and the events themselves for the trend prior; returns how many pairs (0 without a
        live pair counter)."""
        if self.live_events is not None:
            self.live_events.add(
                [i for i, n in zip(items, new, strict=True) if n], [t for t, n in zip(times, new, strict=True) if n]
            )
        return self.live.add(items, times, new) if self.live is not None else 0

    @property
    def counted_until(self) -> int | None:
        """The oldest time from which posted events are counted live (the start or reload of a server
        counts the stored events after it); None: nothing is counted live."""
        since = [c.since for c in (self.live, self.live_events) if c is not None]
        return min(since) if since else None

    # ----- predictions -----------------------------------------------------------------------
    @property
    def priors(self) -> list:
        return [p for p in (self.prior, self.repeat, self.trend) if p is not None]

    def context(self, histories: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(items, mask, pos) of each history's last ``max_len`` item ids, as the priors read them."""
        windows = [h[-self.max_len :] or [0] for h in histories]
        items = torch.zeros(len(windows), max(len(w) for w in windows), dtype=torch.int64)
        for row, w in enumerate(windows):
            items[row, : len(w)] = torch.tensor(w)
        mask = items != 0
        return items, mask, mask.sum(1) - 1

    @torch.inference_mode()
    def scores(
        self, hidden: torch.Tensor, context=None, gap_ms: torch.Tensor | None = None, at_ms: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, H) -> (B, V) next-item scores; reserved ids can never be recommended. ``context``:
        (items, mask, pos) of the histories (:meth:`context`; the count priors read it); ``gap_ms``
        (B,): time from the last event to the prediction (model.query_time); ``at_ms`` (B,): the
        prediction's time, at which the transition prior adds the live counts known before it
        (required by model.trend_prior, which counts the events before it)."""
        if self.trend is not None and at_ms is None:
            raise ConfigError("this model (model.trend_prior) scores at a time: give the time of the prediction")
        if self.query_gaps is not None:
            if gap_ms is None:
                raise ConfigError("this model scores at a time: give the time of the prediction")
            hidden = hidden + self.query_gaps(time_bucket(gap_ms, self.time_buckets))
        scores = hidden @ self.item_table.T
        if self.priors and context is None:
            raise ConfigError("this model's count priors need each history's items")
        for prior in self.priors:
            items, mask, pos = context
            live = at_ms is not None and prior is self.prior and self.live is not None and self.live.pairs > 0
            # Items added after training (add_items): the frozen transition table reads them as padding.
            known = self.live.num_items if live else prior.num_items
            inputs = prior.query_inputs(torch.where(items < known, items, 0), mask, pos, at=at_ms)
            live = {"at": at_ms, "online": self.live} if live else {}
            offsets = prior.offsets(inputs, weights=prior.row_weights(hidden), **live)
            # Counts may cover an item posted after this request's item table was read: not scored here.
            width = min(offsets.shape[1], scores.shape[1])
            scores[:, :width] += offsets[:, :width]
        scores[:, :NUM_RESERVED_ITEMS] = float("-inf")
        return scores

    @torch.inference_mode()
    def top_k(
        self,
        hidden: torch.Tensor,
        k: int,
        exclude: list[list[int]] | None = None,
        context=None,
        gap_ms: torch.Tensor | None = None,
        at_ms: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(B, H) -> (indices, scores) each (B, k), best first; ``exclude``: ids never recommended per
        row; ``context``, ``gap_ms``, ``at_ms``: see :meth:`scores`."""
        scores = self.scores(hidden, context, gap_ms, at_ms)
        if exclude:
            for row, ids in enumerate(exclude):
                if ids:
                    scores[row, ids] = float("-inf")
        k = min(k, self.num_items - NUM_RESERVED_ITEMS)
        top = torch.topk(scores, k, dim=1)
        return top.indices.numpy(), top.values.numpy()

    @torch.inference_mode()
    def side_predictions(self, hidden: torch.Tensor) -> dict[str, np.ndarray]:
        """Next event type (name index), seconds to the next event (bucket midpoint) and value, when
        those heads exist."""
        out: dict[str, np.ndarray] = {}
        if "type" in self.heads:
            logits = self.heads["type"](hidden)
            logits[:, 0] = float("-inf")  # padding is not an event type
            out["next_event_type"] = logits.argmax(1).numpy()
        if "time" in self.heads:
            bucket = self.heads["time"](hidden).argmax(1).double()
            # bucket b covers log2(s + 1) in [b, b + 1): report the geometric middle of that range.
            out["next_event_seconds"] = (torch.pow(2.0, bucket + 0.5) - 1).numpy()
        if "value" in self.heads:
            out["next_value"] = self.heads["value"](hidden).squeeze(-1).numpy()
        return out
