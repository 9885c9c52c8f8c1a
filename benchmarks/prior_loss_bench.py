"""The full-softmax loss with a 3-step transition prior: seconds per forward + backward.

    python benchmarks/prior_loss_bench.py

A micro-benchmark of ``trainer.heads.ChunkedSoftmaxCE`` at MovieLens-1M's size (3,700 items,
4,096 rows, width 64, random pair counts): the median of 5 timed repeats after a warm-up. To
compare two versions of the code, run it in each checkout (``PYTHONPATH=<checkout>``),
alternating, several times: the two cores are shared by everything. Works with the code before
per-row prior weights (``TransitionPrior.row_weights``) too.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path.cwd()))
from trainer.heads import ChunkedSoftmaxCE  # noqa: E402
from trainer.priors import TransitionPrior  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    items, rows, width = 3700, 4096, 64
    keys = np.unique(rng.integers(3, items, 200_000) * items + rng.integers(3, items, 200_000))
    src_ids, dst_ids = keys // items, keys % items
    crow = np.zeros(items + 1, np.int64)
    np.add.at(crow, src_ids + 1, 1)
    counts = (rng.random(len(dst_ids)) * 5).astype(np.float32)
    prior = TransitionPrior({"crow": np.cumsum(crow), "col": dst_ids, "count": counts, "steps": np.array(3)}, items)
    h = torch.randn(rows, width, requires_grad=True)
    table = torch.randn(items, width, requires_grad=True)
    targets, sources = torch.randint(3, items, (rows,)), torch.randint(3, items, (rows, 3))
    per_row = hasattr(prior, "row_weights")
    seconds = []
    for _ in range(6):
        start = time.perf_counter()
        weights = prior.row_weights(h) if per_row else prior.weight
        ChunkedSoftmaxCE.apply(h, table, targets, 512, [(prior, sources)], None, weights).backward()
        seconds.append(time.perf_counter() - start)
    version = "per-row prior weights" if per_row else "scalar prior weights"
    print(f"{version}: median {sorted(seconds[1:])[2]:.3f} s per forward + backward")


if __name__ == "__main__":
    main()
