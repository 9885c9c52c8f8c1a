"""The chunked full-softmax loss equals the textbook one; the sampled loss trains."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_sharding.vocab import NUM_RESERVED_ITEMS
from trainer.heads import ChunkedSoftmaxCE, HeadsConfig, MultiTaskHeads


def test_chunked_softmax_matches_cross_entropy_in_value_and_gradient():
    torch.manual_seed(0)
    h = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    table = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(NUM_RESERVED_ITEMS, 50, (37,))
    loss = ChunkedSoftmaxCE.apply(h, table, targets, 5, [], None)
    grads = torch.autograd.grad(loss, (h, table))

    h2, table2 = h.detach().clone().requires_grad_(), table.detach().clone().requires_grad_()
    scores = h2 @ table2.T
    scores = torch.cat(
        [torch.full_like(scores[:, :NUM_RESERVED_ITEMS], float("-inf")), scores[:, NUM_RESERVED_ITEMS:]], 1
    )
    expected = F.cross_entropy(scores, targets, reduction="sum")
    expected_grads = torch.autograd.grad(expected, (h2, table2))
    assert torch.allclose(loss, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-10)


def test_uniform_only_sampled_softmax_ranks_each_target_against_the_shared_draws():
    num_items, k = 40, 16
    cfg = HeadsConfig(item_loss="sampled", num_negatives=k, in_batch_negatives=False, type_weight=0, time_weight=0)
    heads = MultiTaskHeads(cfg, 8, num_items, 2, 4, np.ones(num_items))
    torch.manual_seed(0)
    h, table = torch.randn(30, 8, dtype=torch.float64), torch.randn(num_items, 8, dtype=torch.float64)
    targets = torch.randint(NUM_RESERVED_ITEMS, num_items, (30,))
    torch.manual_seed(1)
    loss = heads.item_loss(h, targets, table)
    torch.manual_seed(1)
    negatives = torch.randint(NUM_RESERVED_ITEMS, num_items, (k,))
    expected = []
    for row, target in zip(h, targets, strict=True):
        others = [n for n in negatives.tolist() if n != target]  # a draw of the target is no negative
        scores = table[[int(target), *others]] @ row
        expected.append(torch.logsumexp(scores, 0) - scores[0])
    assert any(target in negatives for target in targets)  # the masking case is exercised
    assert torch.allclose(loss, torch.stack(expected).mean())


def _two_step_case():
    """A two-step prior over 9 items, four training rows, and the features each row must read."""
    # Two-step counts: 3->4 2.0, 3->5 1.0, 4->6 1.0, 5->6 0.5 (a CSR table over sources 3, 4, 5).
    pairs = {
        "crow": np.array([0, 0, 0, 0, 2, 3, 4, 4, 4, 4]),
        "col": np.array([4, 5, 6, 6]),
        "count": np.array([2.0, 1, 1, 0.5]),
        "steps": np.array(2),
    }
    # Rows: sources (last, one before) and targets.
    src, targets = torch.tensor([[3, 0], [3, 5], [4, 3], [8, 0]]), torch.tensor([4, 6, 6, 3])
    last = torch.zeros(4, 9, dtype=torch.float64)
    last[0, 4], last[0, 5], last[1, 4], last[1, 5], last[2, 6] = 1, 1, 2, 1, 0  # own pair (1/1) left out
    before = torch.zeros(4, 9, dtype=torch.float64)
    before[1, 6], before[2, 4], before[2, 5] = 0.0, 2, 1  # 5->6: 0.5 - 1/2 (own pair two steps apart)
    return pairs, src, targets, torch.log1p(last), torch.log1p(before)


def _reference_loss(h, table, targets, weights, last, before):
    """Textbook cross-entropy of h @ table.T plus the prior at per-row ``weights`` (N, 2)."""
    scores = h @ table.T + weights[:, :1] * last + weights[:, 1:] * before
    scores = torch.cat([torch.full_like(scores[:, :NUM_RESERVED_ITEMS], float("-inf")), scores[:, 3:]], 1)
    return F.cross_entropy(scores, targets, reduction="sum")


def test_the_transition_prior_adds_learned_log_counts_with_the_own_pair_left_out():
    from trainer.priors import TransitionPrior

    num_items = 9
    pairs, src, targets, last, before = _two_step_case()
    prior = TransitionPrior(pairs, num_items).double()
    with torch.no_grad():
        prior.weight.copy_(torch.tensor([0.7, 0.3]))
    features = prior.features(src, leave_out=targets)
    assert torch.allclose(features[0], last) and torch.allclose(features[1], before)
    columns = torch.tensor([4, 5, 6])
    assert torch.allclose(prior.features(src, columns, leave_out=targets), features[:, :, 4:7])

    torch.manual_seed(0)
    h = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    table = torch.randn(num_items, 3, dtype=torch.float64, requires_grad=True)
    loss = ChunkedSoftmaxCE.apply(h, table, targets, 3, [(prior, src)], None, prior.row_weights(h))
    grads = torch.autograd.grad(loss, (h, table, prior.weight))
    h2, table2 = h.detach().clone().requires_grad_(), table.detach().clone().requires_grad_()
    weight = prior.weight.detach().clone().requires_grad_()
    expected = _reference_loss(h2, table2, targets, weight.expand(4, -1), last, before)
    for got, want in zip(grads, torch.autograd.grad(expected, (h2, table2, weight)), strict=True):
        assert torch.allclose(got, want, atol=1e-10)
    assert (grads[2] != 0).all()


def test_a_gated_transition_prior_weighs_each_query_by_its_state_with_exact_gradients():
    from trainer.priors import TransitionPrior

    pairs, src, targets, last, before = _two_step_case()
    prior = TransitionPrior(pairs, 9, gate_from=3).double()
    assert torch.equal(prior.row_weights(torch.ones(4, 3, dtype=torch.float64)), torch.zeros(4, 2, dtype=torch.float64))
    torch.manual_seed(0)
    with torch.no_grad():
        prior.weight.copy_(torch.tensor([0.7, 0.3]))
        prior.gate.weight.normal_()
        prior.gate.bias.normal_()
    h = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    table = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    params = (h, table, prior.weight, prior.gate.weight, prior.gate.bias)
    loss = ChunkedSoftmaxCE.apply(h, table, targets, 3, [(prior, src)], None, prior.row_weights(h))
    grads = torch.autograd.grad(loss, params)

    copies = [p.detach().clone().requires_grad_() for p in params]
    h2, table2, weight, gate_w, gate_b = copies
    expected = _reference_loss(h2, table2, targets, weight + h2 @ gate_w.T + gate_b, last, before)
    assert torch.allclose(loss, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, copies), strict=True):
        assert torch.allclose(got, want, atol=1e-10)
    assert (grads[3] != 0).all()  # the gate learns
    # Scoring reads the same per-query weights; without them a gated prior refuses to guess.
    rows = prior.offsets(src, weights=prior.row_weights(h))
    assert torch.allclose(rows[1], (prior.row_weights(h)[1, :, None] * prior.features(src)[:, 1]).sum(0))
    with pytest.raises(ValueError, match="row_weights"):
        prior.offsets(src)


def test_the_repeat_prior_counts_each_items_occurrences_in_the_visible_history():
    from trainer.priors import RepeatPrior

    num_items = 8
    repeat = RepeatPrior(num_items).double()
    with torch.no_grad():
        repeat.weight.fill_(0.5)
    batch = {"items": torch.tensor([[3, 4, 3, 5]]), "mask": torch.tensor([[True, True, True, True]])}
    history = repeat.training_inputs(batch)[0]  # positions 0..2, each seeing the window up to itself
    assert history.tolist() == [[3, 0, 0, 0], [3, 4, 0, 0], [3, 4, 3, 0]]
    features = repeat.features(history)
    assert features[2, 3] == pytest.approx(math.log(3)) and features[2, 4] == pytest.approx(math.log(2))
    assert features[0, 4] == 0 and (features[:, 0] == 0).all()
    assert torch.allclose(repeat.features(history, torch.tensor([3, 5])), features[:, [3, 5]])

    # Its weight's gradient through the chunked softmax equals plain autograd.
    torch.manual_seed(0)
    h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    table = torch.randn(num_items, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([4, 3, 5])
    loss = ChunkedSoftmaxCE.apply(h, table, targets, 2, [(repeat, history)], None, repeat.row_weights(h))
    grads = torch.autograd.grad(loss, (h, table, repeat.weight))
    h2, table2 = h.detach().clone().requires_grad_(), table.detach().clone().requires_grad_()
    weight = repeat.weight.detach().clone().requires_grad_()
    scores = h2 @ table2.T + weight * features
    scores = torch.cat([torch.full_like(scores[:, :NUM_RESERVED_ITEMS], float("-inf")), scores[:, 3:]], 1)
    expected = F.cross_entropy(scores, targets, reduction="sum")
    for got, want in zip(grads, torch.autograd.grad(expected, (h2, table2, weight)), strict=True):
        assert torch.allclose(got, want, atol=1e-10)


def test_the_full_softmax_keeps_fp32_scores_under_bf16_and_returns_gradients_in_the_input_dtypes():
    torch.manual_seed(0)
    h = torch.randn(23, 8).bfloat16().requires_grad_()
    table = torch.randn(40, 8, requires_grad=True)
    targets = torch.randint(NUM_RESERVED_ITEMS, 40, (23,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ChunkedSoftmaxCE.apply(h, table, targets, 5, [], None)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and table.grad.dtype == torch.float32

    # The same loss from the same (bf16-valued) hidden states, all in fp32 without autocast.
    h32, table32 = h.detach().float().requires_grad_(), table.detach().clone().requires_grad_()
    scores = h32 @ table32.T
    scores = torch.cat(
        [torch.full_like(scores[:, :NUM_RESERVED_ITEMS], float("-inf")), scores[:, NUM_RESERVED_ITEMS:]], 1
    )
    expected = F.cross_entropy(scores, targets, reduction="sum")
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-6)
    assert torch.allclose(table.grad, table32.grad, atol=1e-6)
    assert torch.equal(h.grad, h32.grad.bfloat16())


def test_the_sampled_softmax_scores_in_fp32_whatever_the_input_dtype():
    num_items = 60
    heads = MultiTaskHeads(HeadsConfig(item_loss="sampled", num_negatives=16), 8, num_items, 2, 4, np.ones(num_items))
    torch.manual_seed(0)
    h, table = torch.randn(30, 8).bfloat16(), torch.randn(num_items, 8).bfloat16()
    targets = torch.randint(NUM_RESERVED_ITEMS, num_items, (30,))
    negatives = heads.draw_negatives(h.device)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = heads.item_loss(h, targets, table, negatives=negatives)
    full = heads.item_loss(h.float(), targets, table.float(), negatives=negatives)
    assert low.dtype == torch.float32 and torch.allclose(low, full, rtol=1e-6)
    assert heads.item_scores(h, table).dtype == torch.float32
