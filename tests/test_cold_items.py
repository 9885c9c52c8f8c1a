"""Items first seen after training (model.id_dropout): dropped id rows read the UNK row, new and
never-trained items start from it, and next-period evaluation ranks them by their features."""

import pytest
import torch
from conftest import shard, tiny_config, write_lines

from data_sharding.sequences import SplitConfig
from data_sharding.vocab import NUM_RESERVED_ITEMS, UNK_ITEM
from trainer import checkpoint as ckpt
from trainer.errors import ConfigError
from trainer.evaluate import ModelScorer
from trainer.factory import mark_cold_items
from trainer.item_features import ItemFeatures
from trainer.model import ItemEncoder, ModelConfig
from trainer.run import evaluate_on_period, run_scorer, train_run

QUIET = {"log": lambda *a: None}


def encoder(rows: int = 40, id_dropout: float = 0.5) -> ItemEncoder:
    # Item i has attribute i % 3 + 1; the reserved rows have none (0).
    attribute_ids = torch.tensor([0] * NUM_RESERVED_ITEMS + [i % 3 + 1 for i in range(NUM_RESERVED_ITEMS, rows)])
    features = ItemFeatures(attribute_ids=attribute_ids, attribute_offsets=torch.arange(rows), num_attributes=4)
    return ItemEncoder(rows, 8, features, id_dropout)


def test_id_dropout_swaps_a_share_of_id_rows_for_the_unk_row_in_training_only():
    torch.manual_seed(0)
    enc = encoder()
    ids, attrs = enc.ids.weight, enc.attributes(enc.attribute_ids, enc.attribute_offsets)
    torch.manual_seed(1)
    table = enc.table()
    dropped = torch.isclose(table, ids[UNK_ITEM] + attrs).all(dim=1)
    kept = torch.isclose(table, ids + attrs).all(dim=1)
    assert bool((dropped | kept).all())
    assert 5 < int(dropped[NUM_RESERVED_ITEMS:].sum()) < 35 and not bool(dropped[:UNK_ITEM].any())
    torch.manual_seed(1)  # the sampled-softmax path builds the same rows for the ids it needs
    assert torch.allclose(enc.table(torch.arange(40)), table)
    enc.eval()
    assert torch.equal(enc.table(), ids + attrs)


def test_a_dropped_row_trains_the_unk_row_and_the_features_not_its_own_id_row():
    torch.manual_seed(0)
    enc = encoder()
    attrs = enc.attributes(enc.attribute_ids, enc.attribute_offsets).detach()
    torch.manual_seed(1)
    table = enc.table()
    dropped = torch.isclose(table, enc.ids.weight[UNK_ITEM] + attrs).all(dim=1)
    row = int(dropped[NUM_RESERVED_ITEMS:].nonzero()[0]) + NUM_RESERVED_ITEMS
    table[row].sum().backward()
    assert float(enc.ids.weight.grad[row].abs().sum()) == 0.0
    assert float(enc.ids.weight.grad[UNK_ITEM].abs().sum()) > 0
    assert float(enc.attributes.weight.grad.abs().sum()) > 0


def test_never_trained_rows_read_the_unk_row_in_evaluation_too():
    enc = encoder().eval()
    enc.cold_from = 30
    table, ids = enc.table(), enc.ids.weight
    attrs = enc.attributes(enc.attribute_ids, enc.attribute_offsets)
    assert torch.equal(table[:30], (ids + attrs)[:30])
    assert torch.allclose(table[30:], ids[UNK_ITEM] + attrs[30:])
    needed = torch.tensor([2, 31])  # the sampled-softmax path completes only these rows
    assert torch.allclose(enc.table(needed)[needed], table[needed])


def test_grow_and_load_starts_new_items_at_the_unk_row_when_trained_with_id_dropout(tmp_path):
    class Model(torch.nn.Module):
        def __init__(self, rows):
            super().__init__()
            self.items = encoder(rows)

    old = Model(20)
    path = ckpt.write_checkpoint(tmp_path / "best", ckpt.trainable_state(old), {}, [], {"step": 1})
    new = Model(25)
    ckpt.grow_and_load(new, path, **QUIET)
    saved = old.items.ids.weight.detach()
    assert torch.equal(new.items.ids.weight[:20], saved)
    assert torch.equal(new.items.ids.weight[20:], saved[UNK_ITEM].expand(5, 8))


def test_mark_cold_items_names_the_ids_the_newest_generation_added():
    model = type("M", (), {"items": encoder()})()
    manifest = {
        "vocab": {"num_items": 40},
        "generations": [{"counts": {"new_items": 30}}, {"counts": {"new_items": 7}}],
    }
    mark_cold_items(model, manifest, validate_on_newest=False)
    assert model.items.cold_from is None  # trained on every generation: nothing is cold
    mark_cold_items(model, manifest, validate_on_newest=True)
    assert model.items.cold_from == 33
    model.items.id_dropout = 0.0
    model.items.cold_from = None
    mark_cold_items(model, manifest, validate_on_newest=True)
    assert model.items.cold_from is None  # without id dropout the UNK row means nothing to the features


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_id_dropout_outside_zero_to_one_is_refused(rate):
    with pytest.raises(ConfigError, match="model.id_dropout"):
        ModelConfig(id_dropout=rate)


def test_next_period_ranks_a_brand_new_item_from_the_unk_row_plus_its_attributes(tmp_path):
    T0 = 1_600_000_000
    items = ["item_id,title,category"] + [f"i{k},thing {k},{'ab'[k % 2]}" for k in range(8)]
    items += ["fresh,new thing,a"]
    items_file = write_lines(tmp_path / "items.csv", items)
    gen1 = ["user,item,ts"] + [f"u{u},i{(u + t) % 8},{T0 + 60 * t}" for u in range(24) for t in range(8)]
    data = tmp_path / "data"
    options = {"items": str(items_file), "split": SplitConfig("none")}
    shard([write_lines(tmp_path / "g1.csv", gen1)], data, **options)
    run = tmp_path / "run"
    cfg = tiny_config(data, max_steps=6)
    cfg.model.id_dropout = 0.3
    train_run(run, cfg, **QUIET)
    gen2 = ["user,item,ts"] + [f"u{u},fresh,{T0 + 10_000 + u}" for u in range(6)]
    shard([write_lines(tmp_path / "g2.csv", gen2)], data, append=True, items=str(items_file))
    scorer, rankable, facts = run_scorer([run], data, **QUIET)
    assert facts["encodes_cold_items"] and bool(rankable[facts["known_items"] :].all())
    enc = scorer.models[0].items
    fresh = facts["known_items"]  # the one id the second generation added
    attrs = enc.attributes(enc.attribute_ids, enc.attribute_offsets)
    assert torch.allclose(enc.table()[fresh], enc.ids.weight[UNK_ITEM] + attrs[fresh])
    result = evaluate_on_period([run], **QUIET)
    assert result["model"]["unknown_targets"] == 6 and result["summary"]["cold_events"] == 6
    assert result["scorers"]["model"]["breakdown"]["cold_items"]["mrr"] > 0


def test_a_scorer_built_from_a_model_in_training_mode_scores_as_in_evaluation():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.items = encoder(id_dropout=0.9)
            self.num_items = 40

    model = Model()  # a freshly built module is in training mode
    scorer = ModelScorer(model)
    assert model.training and not scorer.tables[0].requires_grad  # mode restored, no graph kept
    model.eval()
    assert torch.equal(scorer.tables[0], model.items.table())
