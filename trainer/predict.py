"""Top-K next items for users, from their latest sequences in the shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from data_sharding import shards
from data_sharding.stream import iter_sequences
from trainer.errors import ConfigError


def user_histories(data: Path, users: list[str], max_len: int) -> dict[str, np.ndarray]:
    """Latest events (up to max_len) of the named users, read from the shards."""
    manifest = shards.load_manifest(data)
    table = pq.read_table(data / manifest["vocab"]["files"]["users"], columns=["uidx", "user"])
    index = dict(zip(table["user"].to_pylist(), table["uidx"].to_pylist(), strict=True))
    unknown = [u for u in users if u not in index]
    if unknown:
        raise ConfigError(f"unknown users {unknown[:5]} (not in {data})")
    wanted = {index[u]: u for u in users}
    found = {}
    for uidx, events in iter_sequences(data):
        if uidx in wanted:
            found[wanted[uidx]] = events[-max_len:]
    return found


@torch.no_grad()
def recommend(model, histories: dict[str, np.ndarray], k: int, exclude_seen: bool = False) -> dict[str, list]:
    """user -> [(item id, score), ...] best first."""
    users = list(histories)
    width = max(len(histories[u]) for u in users)
    items = torch.zeros(len(users), width, dtype=torch.long)
    times = torch.zeros(len(users), width, dtype=torch.long)
    types = torch.zeros(len(users), width, dtype=torch.long)
    mask = torch.zeros(len(users), width, dtype=torch.bool)
    for row, user in enumerate(users):
        events = histories[user]
        n = len(events)
        items[row, :n] = torch.from_numpy(events["item"].astype(np.int64))
        times[row, :n] = torch.from_numpy(events["ts"].astype(np.int64))
        types[row, :n] = torch.from_numpy(events["type"].astype(np.int64))
        mask[row, :n] = True
    batch = {"items": items, "times": times, "types": types, "mask": mask}
    table = model.items.table()
    last = mask.sum(1) - 1
    hidden = model.hidden_states(batch, table)[torch.arange(len(users)), last]
    scores = model.heads.item_scores(hidden, table)
    if exclude_seen:
        scores.scatter_(1, items, float("-inf"))
    top = torch.topk(scores, k, dim=1)
    return {
        user: list(zip(top.indices[row].tolist(), top.values[row].tolist(), strict=True))
        for row, user in enumerate(users)
    }
