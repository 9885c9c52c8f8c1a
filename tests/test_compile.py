"""train.compile: the backbone compiled with torch.compile trains through the normal run path."""

from __future__ import annotations

from conftest import tiny_config

from trainer import checkpoint as ckpt
from trainer.run import train_run


def test_a_compiled_backbone_trains_and_checkpoints_under_the_same_names(tmp_path, cyclic_data):
    """train.compile: torch.compile of the backbone in place (dynamic shapes); the checkpoint holds
    the same parameter names as an uncompiled run's, so every reader loads it."""
    plain, compiled = tiny_config(cyclic_data, max_steps=4), tiny_config(cyclic_data, max_steps=4)
    compiled.train.compile = True
    train_run(tmp_path / "plain", plain, log=lambda *a: None)
    metrics = train_run(tmp_path / "compiled", compiled, log=lambda *a: None)
    assert metrics["count"] > 0
    a, b = (ckpt.load_weights(tmp_path / r / "best") for r in ("plain", "compiled"))
    assert a.keys() == b.keys()
