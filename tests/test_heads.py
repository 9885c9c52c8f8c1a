"""The chunked full-softmax loss equals the textbook one; the sampled loss trains."""

import torch
import torch.nn.functional as F

from data_sharding.vocab import NUM_RESERVED_ITEMS
from trainer.heads import ChunkedSoftmaxCE


def test_chunked_softmax_matches_cross_entropy_in_value_and_gradient():
    torch.manual_seed(0)
    h = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    table = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(NUM_RESERVED_ITEMS, 50, (37,))
    loss = ChunkedSoftmaxCE.apply(h, table, targets, 5)
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
