"""Shared fixtures: small synthetic logs and datasets the project generates itself."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import socket
from pathlib import Path

import pytest

from data_sharding.ingest import InputConfig
from data_sharding.pipeline import ShardConfig, build
from data_sharding.synth import SynthConfig, generate
from trainer.config import build_config


def write_lines(path: Path, lines: list[str] | bytes) -> Path:
    """Write a raw text file (or bytes) for a test input."""
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("\n".join(lines) + "\n")
    return path


def tree(root):
    """sha256 of every file of a generation folder except the manifest copy (it records times and options)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def comparable(manifest: dict) -> dict:
    """The manifest without wall times, creation stamps and the engine options (input sha256s stay)."""
    out = json.loads(json.dumps(manifest))
    for gen in out["generations"]:
        for key in ("created", "seconds", "phase_seconds", "options"):
            gen.pop(key)
    return out


def shard(inputs: list[Path], out: Path, **kwargs) -> dict:
    """Run the shard pipeline with test-friendly defaults."""
    input_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in InputConfig.__dataclass_fields__}
    cfg = ShardConfig(out=str(out), input=InputConfig(paths=[str(p) for p in inputs], **input_kwargs), **kwargs)
    return build(cfg)


@pytest.fixture(scope="session")
def synth_log(tmp_path_factory) -> tuple[Path, Path]:
    """(events.csv, items.csv): 30k events, 600 users, 400 items."""
    root = tmp_path_factory.mktemp("synth")
    events, items = root / "events.csv", root / "items.csv"
    generate(SynthConfig(events=30_000, users=600, items=400, seed=7), events, items)
    return events, items


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, synth_log) -> Path:
    """A sharded dataset of the synthetic log: 8 shards, leave-one-out split."""
    out = tmp_path_factory.mktemp("ds") / "data"
    events, items = synth_log
    shard([events], out, items=str(items), events_per_shard=4_000)
    return out


NUM_ITEMS = 12


@pytest.fixture(scope="session")
def cyclic_data(tmp_path_factory):
    """Every user walks the catalogue in order (next item = current + 1 mod 12): perfectly learnable."""
    root = tmp_path_factory.mktemp("cyclic")
    rows = ["user,item,ts,event_type"]
    for u in range(48):
        for t in range(10):
            item = (u + t) % NUM_ITEMS
            rows.append(f"u{u},i{item},{1_600_000_000 + 60 * t},{'buy' if item >= 6 else 'view'}")
    shard([write_lines(root / "e.csv", rows)], root / "data")
    return root / "data"


def shard_generations(tmp_path: Path, generations: list[list[tuple[str, str, int]]], t0: int) -> Path:
    """(user, item, seconds after t0) rows, one list per generation, sharded as appended generations
    (``--split none``) into tmp_path/data."""
    from data_sharding.sequences import SplitConfig

    out = tmp_path / "data"
    for gen, rows in enumerate(generations, start=1):
        lines = ["user,item,ts"] + [f"{u},{i},{t0 + t}" for u, i, t in rows]
        shard([write_lines(tmp_path / f"g{gen}.csv", lines)], out, append=gen > 1, split=SplitConfig("none"))
    return out


def tiny_config(data, **train):
    return build_config(
        {
            "data": {"path": str(data), "num_workers": 0},
            "model": {"backbone": "scratch", "hidden_size": 32, "num_heads": 2, "num_layers": 1, "dropout": 0.1},
            "train": {"micro_batch_size": 16, "lr": 5e-3, "warmup_steps": 5, "eval_every": 0, "log_every": 5, **train},
            "heads": {"type_weight": 0.5},
            "checkpoint": {"every_steps": 10, "keep_last": 5},
            "eval": {"ks": [1, 10]},
        }
    )


def crash_then_resume(monkeypatch, run: Path, cfg, crash_at: int) -> list[str]:
    """Train ``cfg`` into ``run`` until its checkpoint at step ``crash_at`` is written, crash there,
    then send the same request again; returns the log lines of the resumed request."""
    from trainer.loop import Trainer
    from trainer.run import train_run

    original_save = Trainer.save

    def crash(self):
        original_save(self)
        if self.state.step == crash_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train_run(run, cfg, log=lambda *a: None)
    monkeypatch.setattr(Trainer, "save", original_save)
    messages: list[str] = []
    train_run(run, cfg, log=messages.append)
    return messages


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous or a server the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_then_collect(rank: int, fn, *args) -> None:
    fn(rank, *args)
    # A sharded table's TorchRec modules hold the (destroyed) group in reference cycles: collect
    # them now, so the group's gloo threads are joined before interpreter shutdown, not during it.
    gc.collect()


def spawn_ranks(fn, world: int, *args) -> None:
    """``fn(rank, *args)`` in ``world`` spawned processes (torch.multiprocessing), each collecting
    its garbage once ``fn`` returned (see _rank_then_collect)."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_then_collect, args=(fn, *args), nprocs=world)


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    """This process as ``rank`` of a gloo process group of ``world`` on this host (torch.multiprocessing
    spawned ranks), destroyed on the way out."""
    import torch.distributed as dist

    from trainer.runtime import before_process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    before_process_group()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


WORDS = ["red", "blue", "green", "shoe", "hat", "coat", "toy", "ball", "sport", "kind", "means", "in", "one", "word"]
WORDS += ["this", "item", "colour"]


@pytest.fixture(scope="session")
def tower_dir(tmp_path_factory):
    """A tiny Llama causal LM with a word-level tokenizer, saved as a local HF directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tower") / "llm"
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[EOS]", '"', ":", ".", ",", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    fast.save_pretrained(root)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(root)
    return root
