"""model.transition_causal: in training, each position counts only the pairs known before its target."""

import numpy as np
import pytest
import torch
from conftest import shard_generations, tiny_config

from data_sharding.stream import iter_sequences
from trainer.errors import ConfigError
from trainer.heads import ChunkedSoftmaxCE
from trainer.model import ModelConfig
from trainer.online_pairs import OnlinePairs
from trainer.priors import PAIRS_FILE, TransitionPrior, count_pairs, load_pairs
from trainer.run import train_run

T0 = 1_600_000_000
# u1: a, b, c; u2: a, b; u3: a, c (seconds after T0).
LOG = [("u1", "a", 100), ("u1", "b", 200), ("u1", "c", 300), ("u2", "a", 150), ("u2", "b", 250)]
LOG += [("u3", "a", 260), ("u3", "c", 270)]


def _batch(data):
    """The log's sequences as one padded training batch (items, mask, times in ms)."""
    rows = [(events["item"].astype(np.int64), events["ts"].astype(np.int64)) for _, events in iter_sequences(data)]
    width = max(len(items) for items, _ in rows)
    batch = {k: torch.zeros(len(rows), width, dtype=torch.int64) for k in ("items", "times")}
    batch["mask"] = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, (items, ts) in enumerate(rows):
        batch["items"][r, : len(items)] = torch.from_numpy(items)
        batch["times"][r, : len(ts)] = torch.from_numpy(ts)
        batch["mask"][r, : len(items)] = True
    return batch


def test_pair_counts_by_time_match_the_dense_rows():
    rng = np.random.default_rng(0)
    n, v = 400, 12
    pairs = OnlinePairs(rng.integers(3, v, n), rng.integers(3, v, n), rng.integers(0, 50, n), rng.random(n), v)
    src, at = torch.from_numpy(rng.integers(0, v, 30)), torch.from_numpy(rng.integers(0, 60, 30))
    rows = pairs.rows(src, at)
    dst = torch.from_numpy(rng.integers(0, v, (30, 7)))
    assert torch.allclose(pairs.counts(src, dst, at), torch.gather(rows, 1, dst))
    shared = torch.arange(v)
    assert torch.allclose(pairs.counts(src, shared, at), rows)


def test_causal_training_counts_only_the_pairs_completed_before_each_target(tmp_path):
    data = shard_generations(tmp_path, [LOG], T0)
    batch = _batch(data)
    num_items = int(batch["items"].max()) + 1
    pairs = count_pairs(data, num_items, neighbors=10, steps=2, timed=True)
    assert len(pairs["timed_src"]) == 5  # u1: a->b, b->c, a->c (two apart); u2: a->b; u3: a->c
    static = TransitionPrior(pairs, num_items)
    causal = TransitionPrior(pairs, num_items, causal=True)
    valid = batch["mask"][:, 1:]
    targets = batch["items"][:, 1:][valid]
    plain = static.training_inputs(batch)[valid]
    timed = causal.training_inputs(batch)[valid]
    assert torch.equal(timed[:, :2], plain) and torch.equal(timed[:, 2], batch["times"][:, 1:][valid])
    got = causal.features(timed, leave_out=targets)  # (steps, N, V)
    # By hand: the pairs of every other row known strictly before this row's target time.
    for n in range(len(targets)):
        for d in range(2):
            src = int(plain[n, d])
            expected = torch.zeros(num_items, dtype=torch.float64)
            for s, t, known, w in zip(
                *(pairs[k] for k in ("timed_src", "timed_dst", "timed_at", "timed_weight")), strict=True
            ):
                if s == src and known < int(timed[n, 2]):
                    expected[t] += w
            assert torch.allclose(got[d, n].double(), torch.log1p(expected)), (n, d)
    # The sampled path (candidate columns) reads the same counts.
    columns = torch.arange(3, num_items)
    assert torch.allclose(causal.features(timed, columns, targets), got[:, :, 3:])
    # Where they differ: u3's c at 270 after a. All pairs but its own count a->c 0.5 (u1's a, b, c,
    # two steps apart, known at 300); before 270 nothing was known.
    row = int((timed[:, 2] == (T0 + 270) * 1000).nonzero()[0, 0])
    c = int(targets[row])
    assert static.features(plain, leave_out=targets)[0, row, c] > 0
    assert got[0, row, c] == 0


def test_a_causal_prior_trains_with_exact_full_softmax_gradients(tmp_path):
    data = shard_generations(tmp_path, [LOG], T0)
    batch = _batch(data)
    num_items = int(batch["items"].max()) + 1
    prior = TransitionPrior(count_pairs(data, num_items, 10, 2, timed=True), num_items, causal=True).double()
    with torch.no_grad():
        prior.weight.copy_(torch.tensor([0.7, 0.3]))
    valid = batch["mask"][:, 1:]
    targets, inputs = batch["items"][:, 1:][valid], prior.training_inputs(batch)[valid]
    torch.manual_seed(0)
    h = torch.randn(len(targets), 4, dtype=torch.float64, requires_grad=True)
    table = torch.randn(num_items, 4, dtype=torch.float64, requires_grad=True)
    loss = ChunkedSoftmaxCE.apply(h, table, targets, 2, [(prior, inputs)], None, prior.row_weights(h))
    grads = torch.autograd.grad(loss, (h, table, prior.weight))
    copies = [t.detach().clone().requires_grad_() for t in (h, table, prior.weight)]
    features = prior.features(inputs, leave_out=targets).double()
    scores = copies[0] @ copies[1].T + torch.einsum("s,snv->nv", copies[2], features)
    scores[:, :3] = float("-inf")
    expected = torch.nn.functional.cross_entropy(scores, targets, reduction="sum")
    assert torch.allclose(loss, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, copies), strict=True):
        assert torch.allclose(got, want, atol=1e-10)


def test_a_run_with_causal_counts_keeps_the_pair_times_and_needs_the_prior(tmp_path):
    data = shard_generations(tmp_path, [LOG], T0)
    cfg = tiny_config(data, max_steps=2)
    cfg.model.transition_prior = True
    cfg.model.transition_causal = True
    train_run(tmp_path / "run", cfg, log=lambda *a: None)
    saved = load_pairs(tmp_path / "run" / PAIRS_FILE)
    assert len(saved["timed_at"]) == len(saved["timed_src"]) > 0
    with pytest.raises(ConfigError, match="pairs' times"):
        TransitionPrior({k: v for k, v in saved.items() if not k.startswith("timed_")}, 10, causal=True)
    with pytest.raises(ConfigError, match="transition_causal"):
        ModelConfig(transition_causal=True)
