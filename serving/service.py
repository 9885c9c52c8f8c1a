"""The recommender behind the HTTP API: stored histories, per-user key/value caches, hot reload.

A request reads ``self.current`` once and uses that (model, caches) pair to the end, so a reload
that swaps in a new pair never mixes two models inside one request, and no request fails
during the swap. Caches belong to their model and are dropped with it.

Cached windows: a user's cache holds the key/values of their latest window of events. An
appended event costs one backbone step. A window may grow to ``max_len`` events (the longest
the model was trained on); the event after that re-encodes the latest ``max_len - slack``
events, and the next ``slack`` events are again single steps. With ``slack = 0`` every
prediction sees exactly the last ``max_len`` events (a full re-encode per event once a user has
that many); the default keeps 80-100% of the window and re-encodes once every ``slack`` events.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_sharding.vocab import PAD_ITEM, UNK_ITEM
from serving.store import Event, HistoryStore
from trainer.errors import ConfigError
from trainer.export import load_inference, source_signature
from trainer.inference import CachedState, InferenceModel

log = logging.getLogger("bgpt.serve")


@dataclass
class ServiceConfig:
    source: Path
    """A run folder or an export directory."""
    state: Path
    """SQLite file with the users' histories."""
    history_size: int | None = None
    """Events kept per user (default: the model's max_len)."""
    cache_users: int = 4096
    """Users whose key/value caches are kept in memory (least recently used are dropped)."""
    slack: int | None = None
    """Events a cached window may lag behind a full re-encode (default max_len // 5)."""
    reload_seconds: float = 5.0
    """How often to look for a newer checkpoint or export (0: never)."""
    quantize: str | None = None
    threads: int = 1
    durability: str = "normal"


@dataclass
class Loaded:
    """A model and the caches computed with it."""

    model: InferenceModel
    signature: str | None
    loaded_at: float = field(default_factory=time.time)
    caches: OrderedDict[str, CachedState] = field(default_factory=OrderedDict)


class RequestError(ValueError):
    """A request the model cannot answer as asked (unknown item or type, bad history): a 4xx."""


class Recommender:
    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        torch.set_num_threads(cfg.threads)
        self.current = self._load()
        model = self.current.model
        self.slack = model.max_len // 5 if cfg.slack is None else cfg.slack
        if not 0 <= self.slack < model.max_len:
            raise ConfigError(f"--slack {self.slack}: must be in [0, max_len={model.max_len})")
        self.store = HistoryStore(cfg.state, cfg.history_size or model.max_len, cfg.durability)
        self._write_lock = threading.Lock()
        """Held while items or a model's live-counted events are posted, and while a reload places
        the posted items, counts the stored events and swaps models: an item or event posted
        during a reload lands in the new model too, and no event is counted twice."""
        self._place_posted_or_warn(self.current.model)
        self._count_stored(self.current.model)
        self.reloads = 0
        self.reload_failures = 0
        self.events_total = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self._failed: str | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def _load(self) -> Loaded:
        signature = source_signature(self.cfg.source)
        model = load_inference(self.cfg.source, self.cfg.quantize, log=log.warning)
        model.warmup()  # before it takes traffic (also before a hot swap)
        # The model's weights and modules live as long as it serves: move them out of the cyclic
        # garbage collector's view, so full collections during requests stay short.
        gc.collect()
        gc.freeze()
        return Loaded(model, signature)

    # ----- hot reload ------------------------------------------------------------------------
    def start_watching(self) -> None:
        if self.cfg.reload_seconds > 0 and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="bgpt-reload", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
        self.store.close()
        gc.unfreeze()

    def _watch(self) -> None:
        while not self._stop.wait(self.cfg.reload_seconds):
            self.reload_if_changed()

    def reload_if_changed(self) -> bool:
        """Load the newer weights if the source changed; the old model serves until the new one is ready."""
        try:
            signature = source_signature(self.cfg.source)
        except OSError:
            return False
        if signature is None or signature in (self.current.signature, self._failed):
            return False
        try:
            loaded = self._load()
        except Exception as e:  # a corrupt new version: keep serving the old one, retry when it changes
            self.reload_failures += 1
            self._failed = signature
            log.warning("reload of %s failed, still serving %s: %s", self.cfg.source, self.current.model.version, e)
            return False
        with self._write_lock:
            self._place_posted_or_warn(loaded.model)
            self._count_stored(loaded.model)
            self.current = loaded  # one reference swap: requests already running finish on the old pair
        self.reloads += 1
        log.info("serving %s", loaded.model.version)
        return True

    # ----- ids -------------------------------------------------------------------------------
    @staticmethod
    def _ids(model: InferenceModel, events: list[Event]) -> tuple[list[int], list[int], list[int]]:
        try:
            items = model.item_ids([e.item for e in events])
            types = model.type_ids([e.event_type for e in events])
        except ConfigError as e:
            raise RequestError(str(e)) from None
        return items, types, [e.ts for e in events]

    # ----- writes ----------------------------------------------------------------------------
    def _place_posted_or_warn(self, model: InferenceModel) -> None:
        """Give ``model`` the items posted earlier that its vocabulary lacks (a start, a reload); a
        model that cannot place them still serves what it knows."""
        rows = [r for r in self.store.posted_items() if r[0] not in model.item_index]
        if not rows:
            return
        try:
            model.add_items(*map(list, zip(*rows, strict=True)))
        except ConfigError as e:
            log.warning("%d items posted earlier are not placed in %s: %s", len(rows), model.version, e)
            return
        log.info("placed %d items posted earlier in %s", len(rows), model.version)

    def add_items(self, items: list[str], titles: list[str | None], attributes: list[str | None]) -> dict:
        """Make new items recommendable now (vectors from their text and attributes; kept in the
        store so a restart or a reload places them again). Ids the model knows are left alone."""
        with self._write_lock:
            loaded = self.current
            try:
                added = loaded.model.add_items(items, titles, attributes)
            except ConfigError as e:
                raise RequestError(str(e)) from None
            kept = set(added)
            self.store.put_items([r for r in zip(items, titles, attributes, strict=True) if r[0] in kept])
        known = [item for item in items if item not in kept]
        return {"added": added, "known": known, "num_items": loaded.model.num_items}

    def _count_stored(self, model: InferenceModel) -> None:
        """Count in ``model``'s live counts (transition pairs, trend events) the stored events newer
        than the counts it was trained with (a start, a reload): a scan of the users with such events."""
        since = model.counted_until
        if since is None:
            return
        pairs = events = 0
        for _, history in self.store.histories_after(since):
            items = [model.item_index.get(e.item, PAD_ITEM) for e in history]
            pairs += model.count_events(items, [e.ts for e in history], [True] * len(history))
            events += len(history)
        if events:
            log.info(
                "%s: counted %d stored events (%d transition pairs) newer than its counts", model.version, events, pairs
            )

    def add_events(self, user: str, events: list[Event]) -> int:
        """Validate, persist, count the new transition pairs (models with a live counter), then
        advance the user's cached window (if cached) one step per event."""
        with self._write_lock:
            loaded = self.current
            items, types, times = self._ids(loaded.model, events)  # nothing is stored if any is unknown
            names = loaded.model.event_types
            live = loaded.model.live
            before = self.store.history(user)[-live.steps :] if live is not None else []
            stored = [Event(e.item, names[t], e.ts) for e, t in zip(events, types, strict=True)]
            length = self.store.append(user, stored)
            if loaded.model.counted_until is not None:  # the new events after the ones before them, by time (stable)
                merged = sorted([(e, False) for e in before] + [(e, True) for e in stored], key=lambda p: p[0].ts)
                ids = [loaded.model.item_index.get(e.item, PAD_ITEM) for e, _ in merged]
                loaded.model.count_events(ids, [e.ts for e, _ in merged], [new for _, new in merged])
        self.events_total += len(events)
        state = loaded.caches.get(user)
        if state is not None:
            order = sorted(range(len(events)), key=times.__getitem__)  # the store orders by time too
            if times[order[0]] < state.last_time:  # out of order: the window must be rebuilt
                del loaded.caches[user]
            elif state.length + len(events) <= loaded.model.max_len:  # one backbone step per event
                for i in order:
                    state = loaded.model.append(state, items[i], types[i], times[i])
                loaded.caches[user] = state
                loaded.caches.move_to_end(user)
            else:  # the window would outgrow max_len: re-encode its latest max_len - slack events
                window = self.store.history(user)[-(loaded.model.max_len - self.slack) :]
                loaded.caches[user] = loaded.model.start(*self._ids(loaded.model, window))
                loaded.caches.move_to_end(user)
        return length

    # ----- reads -----------------------------------------------------------------------------
    def _state(self, loaded: Loaded, user: str, history: list[Event]) -> CachedState:
        state = loaded.caches.get(user)
        if state is not None:
            self.cache_hits += 1
            loaded.caches.move_to_end(user)
            return state
        self.cache_misses += 1
        state = loaded.model.start(*self._ids(loaded.model, history))
        loaded.caches[user] = state
        while len(loaded.caches) > self.cfg.cache_users:
            loaded.caches.popitem(last=False)
        return state

    def recommend(
        self,
        user: str | None,
        history: list[Event] | None,
        k: int,
        exclude_seen: bool = False,
        event_types: list[str] | None = None,
    ) -> dict:
        """Top-k for a stored user (their cached window) or for a history given in the request.

        ``event_types``: read only the history's events of these types (encoded afresh, uncached)."""
        loaded = self.current
        model = loaded.model
        stored = history is None
        if stored:
            history = self.store.history(user)
            if not history:
                raise LookupError(f"user {user!r} has no events; POST /v1/events first or send a history")
        if event_types is not None:
            try:
                wanted = {model.event_types[t] for t in model.type_ids(event_types)}
            except ConfigError as e:
                raise RequestError(str(e)) from None
            single = model.event_types[1] if len(model.event_types) == 2 else None
            history = [e for e in history if (e.event_type or single) in wanted]
            if not history:
                raise RequestError(f"no events of types {event_types} in the history")
        # The prediction is for now: the last event's item and the time since it (models that use them).
        now = int(time.time() * 1000)
        if stored and event_types is None:
            hidden = model.hidden_at(self._state(loaded, user, history), now)
        else:
            hidden = model.hidden_at(model.start(*self._ids(model, history)), now)
        exclude = None
        if exclude_seen:
            exclude = [sorted({model.item_index[e.item] for e in history if e.item in model.item_index})]
        context = model.context([[model.item_index.get(e.item, UNK_ITEM) for e in history]])
        gap = torch.tensor([now - int(history[-1].ts)])
        top, scores = model.top_k(hidden.unsqueeze(0), k, exclude, context, gap, torch.tensor([now]))
        side = model.side_predictions(hidden.unsqueeze(0))
        out = {
            "user": user,
            "model_version": model.version,
            "items": [
                {"item": model.items[i], "score": round(float(s), 6), "title": model.titles[i]}
                for i, s in zip(top[0], scores[0], strict=True)
                if s > float("-inf")  # fewer than k items left after exclusions
            ],
            "history_length": len(history),
        }
        if "next_event_type" in side:
            out["next_event_type"] = model.event_types[int(side["next_event_type"][0])]
        for key in ("next_event_seconds", "next_value"):
            if key in side:
                out[key] = round(float(side[key][0]), 4)
        return out
