"""Windows -> batch tensors: right-padded rows, or several windows packed into each row.

Packing (first-fit decreasing into rows of a fixed width) keeps every sample, target and loss of
the padded batch while the rows stop paying for padding: on Amazon Sports (max_len 50, 128
windows per batch) 16% of a padded batch's positions hold events, 96% of a packed one's.
The model keeps windows apart through ``positions`` (each event's place in its own window): with
restarting position ids and no 2D mask, transformers builds a block-diagonal causal mask.
"""

from __future__ import annotations

import numpy as np
import torch

from data_sharding import shards
from data_sharding.errors import DataError


def pack_rows(lengths: list[int], width: int) -> tuple[np.ndarray, np.ndarray]:
    """First-fit decreasing: (row, offset) of each window when windows of these lengths are packed
    into rows of ``width`` positions. Deterministic (ties keep the batch order)."""
    row = np.empty(len(lengths), np.int64)
    offset = np.empty(len(lengths), np.int64)
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > width:
            raise DataError(f"a window of {lengths[i]} events does not fit a packed row of {width} positions")
        r = next((r for r, room in enumerate(free) if room >= lengths[i]), len(free))
        if r == len(free):
            free.append(width)
        row[i], offset[i] = r, width - free[r]
        free[r] -= lengths[i]
    return row, offset


def collate_windows(
    users: list[int],
    windows: list[np.ndarray],
    width: int | None = None,
    seen: list[np.ndarray] | None = None,
    pack_width: int | None = None,
    targets: list[np.ndarray] | None = None,
    row_multiple: int = 1,
) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) tensors of SEQ_DTYPE windows; ``mask`` marks real events, ``has_value``
    those with a value, ``targets`` the positions that count as prediction targets. ``seen``: per
    window, the item ids of the user's whole history before the event to predict (evaluation
    excludes them all, not only the visible window), as a 0-padded (B, S) ``seen`` tensor.

    ``pack_width``: windows share rows of this many positions (pack_rows); ``positions`` (R, T)
    then gives each event's place in its own window (padding counts on from 0 as a window of its
    own), and a window's first event is never a target (nothing before it in its row is its
    history). ``users`` stays one entry per window. ``targets``: per window, which of its events
    are targets (default: all). ``row_multiple``: a packed batch's row count is rounded up to a
    multiple of it (rows of padding), so batches take few distinct shapes."""
    lengths = [len(w) for w in windows]
    if pack_width is None:
        row, offset = np.arange(len(windows)), np.zeros(len(windows), np.int64)
        width, num_rows = width or max(lengths), len(windows)
    else:
        row, offset = pack_rows(lengths, pack_width)
        width, num_rows = pack_width, -(-(int(row.max()) + 1) // row_multiple) * row_multiple
    batch = np.zeros((num_rows, width), dtype=shards.SEQ_DTYPE)
    mask = np.zeros((num_rows, width), dtype=bool)
    is_target = np.zeros((num_rows, width), dtype=bool)
    positions = np.zeros((num_rows, width), dtype=np.int64)
    used = np.zeros(num_rows, np.int64)
    for i, (w, r, o, n) in enumerate(zip(windows, row, offset, lengths, strict=True)):
        batch[r, o : o + n], mask[r, o : o + n], positions[r, o : o + n] = w, True, np.arange(n)
        is_target[r, o : o + n] = True if targets is None else targets[i]
        used[r] = max(used[r], o + n)
    if pack_width is not None:
        is_target &= positions > 0
        for r in range(num_rows):  # padding: its own run of positions after the row's last window
            positions[r, used[r] :] = np.arange(width - used[r])
    has_value = mask & np.isfinite(batch["value"])
    out = {
        "items": torch.from_numpy(batch["item"].astype(np.int64)),
        "times": torch.from_numpy(batch["ts"].copy()),
        "types": torch.from_numpy(batch["type"].astype(np.int64)),
        "values": torch.from_numpy(np.where(has_value, batch["value"], 0).astype(np.float32)),
        "has_value": torch.from_numpy(has_value),
        "new": torch.from_numpy(batch["new"].astype(bool)),
        "mask": torch.from_numpy(mask),
        "targets": torch.from_numpy(is_target),
        "users": torch.tensor(users, dtype=torch.int64),
    }
    if pack_width is not None:
        out["positions"] = torch.from_numpy(positions)
    if seen is not None:
        items = np.zeros((len(seen), max(1, max(len(s) for s in seen))), dtype=np.int64)
        for i, s in enumerate(seen):
            items[i, : len(s)] = s
        out["seen"] = torch.from_numpy(items)
    return out
