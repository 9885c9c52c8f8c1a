"""`bgpt train` on a sharded item table (model.item_table): trains, validates and tests through the
sharded path, checkpoints the table per rank, resumes exactly, and single-process readers (eval,
predict, export) read the table into the dense model."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from conftest import crash_then_resume, tiny_config
from test_distributed import small_data  # noqa: F401 (a fixture)
from test_retrain import generations  # noqa: F401 (a fixture)

# Checked without importing them: TorchRec/FBGEMM load only in the processes the tests start, so
# a pytest worker that later forks (loader workers) carries none of their threads.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torchrec") is None or importlib.util.find_spec("fbgemm_gpu") is None,
    reason="torchrec and fbgemm-gpu(-cpu) are not installed",
)

from trainer import checkpoint as ckpt  # noqa: E402
from trainer.errors import ConfigError  # noqa: E402
from trainer.run import evaluate_run, train_run  # noqa: E402


def sharded_config(data, **train):
    cfg = tiny_config(data, **train)
    cfg.model.item_table = "sharded"
    cfg.heads.item_loss, cfg.heads.num_negatives = "sampled", 8
    cfg.train.item_lr = 0.1
    return cfg


def _trains_checkpoints_and_tests_like_a_dense_reader(tmp_path, cyclic_data):
    run = tmp_path / "run"
    metrics = train_run(run, sharded_config(cyclic_data, max_steps=120, eval_every=40), log=lambda *a: None)
    assert metrics["hr@1"] > 0.9  # the cyclic walk is learnt through the sharded rows
    for folder in (run / "best", run / "step-00000120"):
        assert (folder / "item_rows" / "item_rows.json").exists() and ckpt.verify(folder) is None
        assert "items.ids.weight" not in ckpt.load_weights(folder, full_table=False)
    # One process reads the table into the dense model: the same test metrics as the run reported,
    # and the validation of the best step as the sharded evaluator recorded it.
    assert evaluate_run(run, "test") == {k: v for k, v in metrics.items() if k != "train"}
    best = json.loads((run / "best" / "state.json").read_text())
    valid = evaluate_run(run, "valid")
    assert {k: valid[k] for k in best["valid"]} == best["valid"]
    # The serving export holds the whole table (gathered from the rank files).
    from trainer.export import export_run, load_inference
    from trainer.item_rows import read_full_table

    export_run(run, tmp_path / "export")
    table = load_inference(tmp_path / "export").item_table
    assert torch.equal(table, read_full_table(run / "best" / "item_rows"))


def _resumes_bit_for_bit(tmp_path, cyclic_data):
    cfg = sharded_config(cyclic_data, max_steps=30)
    train_run(tmp_path / "straight", cfg, log=lambda *a: None)
    with pytest.MonkeyPatch.context() as monkeypatch:
        messages = crash_then_resume(monkeypatch, tmp_path / "resumed", cfg, 20)
    assert any("resumed from" in m and "step-00000020" in m for m in messages)
    # The dense weights, and the table with its accumulators (next steps equal), bit for bit.
    a, b = (ckpt.load_weights(tmp_path / r / "step-00000030") for r in ("straight", "resumed"))
    assert a.keys() == b.keys() and "items.ids.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)


def in_fresh_process(fn, *args) -> None:
    """Run ``fn(*args)`` in a new interpreter: a one-process sharded run makes a gloo group and
    loads TorchRec/FBGEMM in its process, and a test process that later forks (loader workers)
    must not carry their threads (a loader test hung in CI after a sharded run in its worker)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(fn, *args).result()  # re-raises the child's assertion error


def test_a_sharded_run_trains_checkpoints_and_tests_like_a_dense_reader(tmp_path, cyclic_data):
    in_fresh_process(_trains_checkpoints_and_tests_like_a_dense_reader, tmp_path, cyclic_data)


def test_a_sharded_run_resumes_bit_for_bit(tmp_path, cyclic_data):
    in_fresh_process(_resumes_bit_for_bit, tmp_path, cyclic_data)


def test_the_item_table_choice_says_what_a_sharded_table_needs(tmp_path, cyclic_data):
    from trainer.sharded_run import SHARDED_FROM_ITEMS, use_sharded_table

    cfg = sharded_config(cyclic_data)
    cfg.heads.item_loss, cfg.model.transition_prior = "full", True
    with pytest.raises(ConfigError, match="heads.item_loss=sampled .*no score priors"):
        use_sharded_table(cfg, 100, 1, False)
    cfg.model.item_table = "auto"
    said = []
    assert not use_sharded_table(cfg, SHARDED_FROM_ITEMS, 1, False, said.append)
    assert "auto -> dense" in said[0]
    auto = sharded_config(cyclic_data)
    auto.model.item_table = "auto"
    assert not use_sharded_table(auto, SHARDED_FROM_ITEMS - 1, 1, False)
    assert use_sharded_table(auto, SHARDED_FROM_ITEMS, 1, False, said.append) and "auto -> sharded" in said[-1]
    assert not use_sharded_table(auto, SHARDED_FROM_ITEMS, 2, False, said.append)  # accumulation
    auto.train.ema_decay = 0.999
    assert not use_sharded_table(auto, SHARDED_FROM_ITEMS, 1, False, said.append)
    assert "train.ema_decay=0" in said[-1]


def test_a_two_rank_sharded_run_validates_as_one_process_and_resumes_on_two_ranks_and_on_one(small_data, tmp_path):  # noqa: F811
    import shutil

    from conftest import free_port
    from test_distributed import bgpt, train_args

    def args(run, **extra):
        sharded = {"model.item_table": "sharded", "heads.item_loss": "sampled", "heads.num_negatives": 8}
        extra = {"train.global_batch_size": "none", "train.eval_every": 6, "checkpoint.every_steps": 6, **extra}
        return train_args(small_data, run, 1, 12, **sharded, **extra)

    def launch(run):
        return bgpt("launch", "--nproc", "2", "--master-port", str(free_port()), "--", *args(run))

    straight = tmp_path / "straight"
    done = launch(straight)
    log = done.stdout + done.stderr
    assert "world size 2 (ddp)" in log
    files = sorted(p.name for p in (straight / "step-00000012" / "item_rows").iterdir())
    assert files == ["item_rows-00000-of-00002.safetensors", "item_rows-00001-of-00002.safetensors", "item_rows.json"]
    # The two ranks' sharded validation (each its batches, each its slice of the catalogue) equals
    # one process's dense evaluation of the same weights, every metric.
    reported = [json.loads(line) for line in (straight / "valid_metrics.jsonl").read_text().splitlines()]
    best = max(reported, key=lambda r: r["valid"]["ndcg@10"])["valid"]
    alone = evaluate_run(straight, "valid", log=lambda *a: None)
    assert {k: alone[k] for k in best} == best
    for name, resume in (("two", launch), ("one", lambda run: bgpt("train", *args(run)))):
        run = tmp_path / name
        shutil.copytree(straight, run)
        for later in ("step-00000012", "best", "metrics.json"):
            shutil.rmtree(run / later) if (run / later).is_dir() else (run / later).unlink()
        out = resume(run)
        assert "resumed from" in out.stderr + out.stdout
        a, b = ckpt.load_weights(straight / "step-00000012"), ckpt.load_weights(run / "step-00000012")
        same = all(torch.equal(a[k], b[k]) for k in a)
        assert same if name == "two" else not same  # one rank: the same samples, batches of 8 instead of 2 x 8
        assert (run / "metrics.json").exists()


def _retrains_a_sharded_run_growing_its_table(root, data, second):
    from conftest import shard
    from test_retrain import tiny

    from trainer.config import load_run_config
    from trainer.factory import build_model
    from trainer.item_rows import read_full_table
    from trainer.retrain import retrain
    from trainer.sharded_run import grow_and_load, release_process_group, table_of

    quiet = {"log": lambda *a: None}
    cfg = tiny(data, max_steps=20)
    cfg.model.item_table, cfg.heads.item_loss, cfg.heads.num_negatives = "sharded", "sampled", 4
    parent = root / "parent"
    train_run(parent, cfg, **quiet)
    source = ckpt.latest_valid(parent)
    old_rows, old = read_full_table(source / "item_rows"), ckpt.load_weights(source, full_table=False)
    shard([second], data, append=True)

    # Grown: old rows bit for bit (each rank its slice), new ids at the mean known row (no text),
    # the dense weights as the dense path loads them.
    cfg = load_run_config(parent)
    model, _ = build_model(cfg.model, cfg.lora, cfg.heads, data, sharded=True)
    assert grow_and_load(model, source, **quiet)[-1] == "item rows (sharded) 15 -> 18"
    table = table_of(model).full_table()
    assert torch.equal(table[:15], old_rows)
    torch.testing.assert_close(table[15:], old_rows[3:].double().mean(0).float().expand(3, -1), rtol=0, atol=1e-6)
    assert all(torch.equal(p.detach(), old[n]) for n, p in model.named_parameters() if n in old)
    release_process_group()

    # `bgpt retrain` of the sharded run trains on the new generation through the sharded table.
    out = root / "retrained"
    metrics = retrain(parent, data, out, {"train": {"max_steps": 6}, "data": {"replay_fraction": 0.0}}, **quiet)
    assert metrics["count"] > 0
    best = ckpt.latest_valid(out)
    assert ckpt.read_state(best)["vocab_version"].startswith("g0002")
    assert read_full_table(best / "item_rows").shape[0] == 18


def test_a_sharded_run_retrains_on_a_new_generation_growing_its_table(generations):  # noqa: F811
    in_fresh_process(_retrains_a_sharded_run_growing_its_table, *generations)
