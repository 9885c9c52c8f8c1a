"""model.time_bias: an HSTU-style relative attention bias, per head, by how long before the
predicted event each key event happened (log2-second buckets, as the gap embeddings).

A position's state depends on the time of the event it predicts. In training and evaluation that
is the next event's time; at inference it is the time of the request, so a cached window keeps
its last event out of the key/value cache: the cache holds the events whose next event is known,
and the last one goes through the backbone at request time with the bias for that time
(:func:`query_bias`, :func:`cache_view`; used by trainer.inference).
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from trainer.heads import time_bucket


def relative_time_mask(batch: dict[str, torch.Tensor], bias: torch.Tensor, buckets: int) -> torch.Tensor:
    """The (B, heads, T, T) additive attention mask of model.time_bias: ``bias`` (buckets, heads)
    at the log2-second bucket of (time of the event after the query position - time of the key
    event), and the dtype's minimum where the key is not visible (later, another packed window, or
    padding; a padding query sees itself so that no row is empty). A window's last event has no
    next event: it takes its own time (its state predicts nothing in training)."""
    times = batch["times"]
    length = times.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=times.device).tril()
    if "positions" in batch:
        window = torch.cumsum(batch["positions"] == 0, dim=1)
        visible = window[:, :, None] == window[:, None, :]
    else:
        eye = torch.eye(length, dtype=torch.bool, device=times.device)
        visible = batch["mask"].bool()[:, None, :] | eye
    # The event after each position in its own window (a window's last event: its own time). Read
    # from the times, not the mask: evaluation hides the predicted event but keeps its time.
    follows = times[:, 1:] >= times[:, :-1]  # padding holds time 0
    if "positions" in batch:
        follows = follows & (batch["positions"][:, 1:] != 0)
    predicted_at = torch.cat([torch.where(follows, times[:, 1:], times[:, :-1]), times[:, -1:]], dim=1)
    gaps = predicted_at[:, :, None] - times[:, None, :]
    scores = nn.functional.embedding(time_bucket(gaps, buckets), bias).permute(0, 3, 1, 2)
    return scores.masked_fill(~(visible & causal)[:, None], torch.finfo(scores.dtype).min)


def query_bias(bias: torch.Tensor, buckets: int, key_times: torch.Tensor, at: int) -> torch.Tensor:
    """(1, heads, 1, K) additive mask of one query that predicts at ``at`` over keys at ``key_times``
    (K,), all visible (a cached window's last event over the events up to it); a time before the
    last key counts as the last key's time."""
    at_least = max(int(at), int(key_times[-1]))
    rows = nn.functional.embedding(time_bucket(at_least - key_times, buckets), bias)  # (K, heads)
    return rows.T[None, :, None, :]


def cache_argument(backbone: nn.Module) -> str:
    """The name of the backbone's key/value cache in its arguments and outputs (``cache`` since
    transformers 5.2x, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


def cache_view(cache):
    """A key/value cache that a forward pass may extend while ``cache`` stays as it was: the layers
    are copied, their tensors shared (a dynamic layer grows by concatenation, a new tensor)."""
    view = copy.copy(cache)
    view.layers = [copy.copy(layer) for layer in cache.layers]
    return view


def window_bias(
    bias: torch.Tensor, buckets: int, times: torch.Tensor, mask: torch.Tensor, at: torch.Tensor
) -> torch.Tensor:
    """(B, heads, T, T) mask of (B, T) left-aligned windows (``mask``: their events) whose last
    event's state predicts at ``at`` (B,); the others predict at their next event's time."""
    rows, last = torch.arange(len(times)), mask.sum(1) - 1
    # The prediction's time goes just after each window's last event, as the event it predicts.
    ahead = torch.cat([times, times[:, -1:]], dim=1)
    ahead[rows, last + 1] = torch.maximum(at.to(times.dtype), times[rows, last])
    visible = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
    length = times.shape[1]
    return relative_time_mask({"times": ahead, "mask": visible}, bias, buckets)[:, :, :length, :length]


def settled_cache(
    backbone: nn.Module, cache_name: str, x: torch.Tensor, times: torch.Tensor, bias: torch.Tensor, buckets: int
):
    """The key/value cache of a window's inputs ``x`` (1, T, H) at ``times`` (T,) but its last event:
    the events whose next event is known, each read at that next event's time (``cache_name``:
    :func:`cache_argument` of the backbone)."""
    from transformers import DynamicCache

    cache, known = DynamicCache(config=backbone.config), x.shape[1] - 1
    if known:
        visible = torch.ones(1, known + 1, dtype=torch.bool)
        mask = relative_time_mask({"times": times[None], "mask": visible}, bias, buckets)[:, :, :known, :known]
        backbone(inputs_embeds=x[:, :known], attention_mask=mask, use_cache=True, **{cache_name: cache})
    return cache
