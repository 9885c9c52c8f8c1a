"""The checkpoint layout, tested directly: what a checkpoint folder holds, how a bad one is found
and skipped, pruning, and loading weights into a model whose tables grew."""

import json

import pytest
import torch

from trainer import checkpoint as ckpt
from trainer.errors import ConfigError


def _write(run, step, weights=None, ranks=2):
    weights = weights or {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    rank_states = [{"rng": ckpt.rng_state(), "loader": {"rank": r}} for r in range(ranks)]
    return ckpt.write_checkpoint(
        ckpt.step_dir(run, step), weights, {"scheduler": {"last": step}}, rank_states, {"step": step}
    )


def test_a_checkpoint_folder_holds_weights_optimizer_state_every_rank_and_a_checksum_index(tmp_path):
    path = _write(tmp_path, 7)
    assert path == tmp_path / "step-00000007"
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted([ckpt.WEIGHTS, ckpt.OPTIMIZER, ckpt.STATE, ckpt.META, "rank-0.pt", "rank-1.pt"])
    meta = json.loads((path / ckpt.META).read_text())
    assert meta["step"] == 7 and set(meta["files"]) == set(names) - {ckpt.META}
    assert ckpt.verify(path) is None
    assert ckpt.read_state(path) == {"step": 7}
    assert ckpt.load_optimizer(path) == {"scheduler": {"last": 7}}
    assert ckpt.load_rank_state(path, 1)["loader"] == {"rank": 1}
    assert torch.equal(ckpt.load_weights(path)["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert not ckpt.temp_dir(path).exists()  # assembled aside, renamed into place


def test_verify_names_what_is_wrong_with_a_damaged_checkpoint(tmp_path):
    path = _write(tmp_path, 1)
    (path / "rank-1.pt").write_bytes(b"truncated")
    assert ckpt.verify(path) == "rank-1.pt does not match its checksum (truncated or corrupt)"
    (path / "rank-1.pt").unlink()
    assert ckpt.verify(path) == "rank-1.pt is missing"
    (path / ckpt.META).write_text("{")
    assert ckpt.verify(path) == "meta.json is corrupt"
    (path / ckpt.META).unlink()
    assert ckpt.verify(path) == "no meta.json (incomplete write)"


def test_latest_valid_skips_newer_broken_checkpoints_by_step_number_and_says_so(tmp_path):
    for step in (2, 10, 30):
        _write(tmp_path, step)
    (tmp_path / "step-00000030" / ckpt.WEIGHTS).write_bytes(b"x")
    (tmp_path / "step-notanumber").mkdir()
    said = []
    assert ckpt.latest_valid(tmp_path, said.append).name == "step-00000010"
    assert len(said) == 1 and "step-00000030" in said[0] and ckpt.WEIGHTS in said[0]
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["step-00000002", "step-00000010", "step-00000030"]


def test_prune_keeps_the_last_k_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        _write(tmp_path, step, ranks=1)
    ckpt.prune(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


def test_rng_state_round_trips(tmp_path):
    torch.manual_seed(3)
    state = ckpt.rng_state()
    first = torch.rand(4)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(4), first)


class _Items(torch.nn.Module):
    def __init__(self, rows):
        super().__init__()
        self.ids = torch.nn.Embedding(rows, 3)
        self.text_proj = None


class _Model(torch.nn.Module):
    def __init__(self, rows):
        super().__init__()
        self.items = _Items(rows)
        self.head = torch.nn.Linear(3, 2)


def test_grow_and_load_keeps_old_rows_and_starts_new_ones_at_the_mean_known_item(tmp_path):
    old = _Model(5)
    path = ckpt.write_checkpoint(tmp_path / "best", ckpt.trainable_state(old), {}, [], {"step": 1})
    new = _Model(8)
    grown = ckpt.grow_and_load(new, path, log=lambda *a: None)
    assert grown == ["items.ids.weight 5 -> 8 rows"]
    saved = old.items.ids.weight.detach()
    assert torch.equal(new.items.ids.weight[:5], saved)
    expected = saved[ckpt.NUM_RESERVED_ITEMS :].mean(dim=0)  # padding / special rows left out
    assert torch.allclose(new.items.ids.weight[5:], expected.expand(3, 3))
    assert torch.equal(new.head.weight, old.head.weight)


def test_grow_and_load_refuses_a_smaller_table_or_a_changed_model(tmp_path):
    path = ckpt.write_checkpoint(tmp_path / "best", ckpt.trainable_state(_Model(6)), {}, [], {"step": 1})
    with pytest.raises(ConfigError, match=r"items.ids.weight has shape \(6, 3\)"):
        ckpt.grow_and_load(_Model(4), path, log=lambda *a: None)
    other = _Model(6)
    other.extra = torch.nn.Linear(1, 1)
    with pytest.raises(ConfigError, match="lacks"):
        ckpt.grow_and_load(other, path, log=lambda *a: None)
