"""Training end to end on CPU: a tiny model learns, resume is exact, bad configs are refused."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import crash_then_resume, tiny_config
from safetensors.torch import load_file

from launch.cli import main
from trainer import checkpoint as ckpt
from trainer.errors import ConfigError
from trainer.evaluate import EvalConfig, RankingMetrics, eval_loader
from trainer.next_period import evaluate_next_period
from trainer.periods import Period
from trainer.run import evaluate_run, load_run_model, train_run


def test_a_tiny_model_overfits_a_tiny_set_and_beats_popularity(tmp_path, cyclic_data):
    metrics = train_run(tmp_path / "run", tiny_config(cyclic_data, max_steps=120), log=lambda *a: None)
    cfg = EvalConfig(ks=[1, 10], exclude_seen=False)
    popularity = evaluate_next_period(None, cyclic_data, Period(split="test"), cfg, ["popularity"])
    popularity = popularity["scorers"]["popularity"]["overall"]
    assert metrics["hr@1"] > 0.9
    assert popularity["hr@1"] < 0.2
    assert metrics["type_accuracy"] > 0.9  # the type follows from the (predictable) next item
    assert (tmp_path / "run" / "metrics.json").exists()
    assert evaluate_run(tmp_path / "run", "test")["hr@1"] == metrics["hr@1"]  # deterministic


def test_a_refit_on_train_and_valid_keeps_its_last_weights(tmp_path, cyclic_data):
    cfg = tiny_config(cyclic_data, max_steps=40, eval_every=15)
    cfg.data.train_on_valid = True
    messages = []
    metrics = train_run(tmp_path / "run", cfg, log=messages.append)
    assert not (tmp_path / "run" / "valid_metrics.jsonl").exists()  # nothing held out to validate on
    best = ckpt.read_state(tmp_path / "run" / "best")
    assert best["refit"] is True and best["step"] == 40
    last = load_file(str(tmp_path / "run" / "step-00000040" / ckpt.WEIGHTS))
    kept = load_file(str(tmp_path / "run" / "best" / ckpt.WEIGHTS))
    assert all(torch.equal(last[k], kept[k]) for k in last)
    assert metrics["hr@1"] > 0.9 and any("refit" in m for m in messages)


def test_an_ensemble_of_runs_ranks_by_the_mean_log_probability(tmp_path, cyclic_data, capsys):
    runs = []
    for seed, max_len in ((0, 50), (1, 50), (2, 5)):
        runs.append(tmp_path / f"run{seed}")
        cfg = tiny_config(cyclic_data, max_steps=12, seed=seed)
        cfg.model.max_len = max_len
        train_run(runs[-1], cfg, log=lambda *a: None)
    quiet = {"ks": [1, 10], "exclude_seen": False, "log": lambda *a: None}
    single = evaluate_run(runs[0], "test", **quiet)
    same = evaluate_run([runs[0], runs[0]], "test", **quiet)
    assert all(same[k] == single[k] for k in ("hr@1", "hr@10", "ndcg@10", "mrr", "coverage@10"))

    # By hand: the mean of both models' log-softmax over the catalogue, ranked with ties by id.
    models = [load_run_model(r, log=lambda *a: None)[0] for r in runs[:2]]
    expected = RankingMetrics([1, 10], models[0].num_items)
    with torch.no_grad():
        for batch in eval_loader(cyclic_data, "test", 50, 256):
            last = batch["mask"].sum(1) - 1
            rows = torch.arange(len(last))
            seen = batch["mask"].clone()
            seen[rows, last] = False
            logp = [
                torch.log_softmax(
                    m.heads.item_scores(m.hidden_states({**batch, "mask": seen})[rows, last - 1], m.items.table()), 1
                )
                for m in models
            ]
            expected.add((logp[0] + logp[1]) / 2, batch["items"][rows, last])
    ensemble = evaluate_run(runs[:2], "test", **quiet)
    assert ensemble["run"] == [str(r) for r in runs[:2]]
    assert {k: ensemble[k] for k in ("hr@1", "hr@10", "mrr")} == {
        k: expected.result()[k] for k in ("hr@1", "hr@10", "mrr")
    }
    with pytest.raises(ConfigError, match="max_len"):
        evaluate_run([runs[0], runs[2]], "test", **quiet)
    (runs[0] / "metrics.json").unlink()
    assert main(["eval", "--run", str(runs[0]), str(runs[1]), "--k", "1,10", "--no-exclude-seen"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["hr@10"] == ensemble["hr@10"]
    assert not (runs[0] / "metrics.json").exists()  # an ensemble's metrics belong to no single run


def test_resume_after_interruption_reaches_the_same_weights(tmp_path, cyclic_data, monkeypatch):
    cfg = tiny_config(cyclic_data, max_steps=30)
    train_run(tmp_path / "straight", cfg, log=lambda *a: None)

    messages = crash_then_resume(monkeypatch, tmp_path / "resumed", cfg, 20)
    assert any("resumed from" in m and "step-00000020" in m for m in messages)
    a = load_file(str(tmp_path / "straight" / "step-00000030" / ckpt.WEIGHTS))
    b = load_file(str(tmp_path / "resumed" / "step-00000030" / ckpt.WEIGHTS))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_corrupt_latest_checkpoint_is_named_and_skipped(tmp_path, cyclic_data):
    run = tmp_path / "run"
    train_run(run, tiny_config(cyclic_data, max_steps=20), log=lambda *a: None)
    (run / "step-00000020" / ckpt.WEIGHTS).write_bytes(b"truncated")
    messages = []
    assert ckpt.latest_valid(run, messages.append) == run / "step-00000010"
    assert "step-00000020" in messages[0] and "checksum" in messages[0]
    shutil.rmtree(run / "step-00000010")
    (run / "step-00000010").mkdir()
    assert ckpt.latest_valid(run, messages.append) is None
    assert "no meta.json" in messages[-1]


def test_resuming_with_a_different_model_is_refused(tmp_path, cyclic_data):
    run = tmp_path / "run"
    train_run(run, tiny_config(cyclic_data, max_steps=10), log=lambda *a: None)
    changed = tiny_config(cyclic_data, max_steps=20)
    changed.model.hidden_size = 64
    with pytest.raises(ConfigError, match="different model section"):
        train_run(run, changed, log=lambda *a: None)


def test_a_run_refuses_data_with_another_vocabulary(tmp_path, cyclic_data, dataset):
    from trainer.run import load_run_model

    run = tmp_path / "run"
    train_run(run, tiny_config(cyclic_data, max_steps=5), log=lambda *a: None)
    with pytest.raises(ConfigError, match="trained on vocab .* but .* has"):
        load_run_model(run, data=dataset)
    with pytest.raises(ConfigError, match="not a run folder"):
        load_run_model(tmp_path)


def test_sigkill_while_writing_checkpoints_leaves_the_previous_one_loadable(tmp_path):
    """A process writes checkpoints back to back; SIGKILL lands at random moments of a write."""
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    script = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from trainer import checkpoint as ckpt\n"
        "run = Path(sys.argv[1])\n"
        "w = {'w': torch.randn(512, 1024)}\n"
        "for step in range(1, 10_000):\n"
        "    ckpt.write_checkpoint(ckpt.step_dir(run, step), w, {'opt': torch.randn(256, 1024)}, [{}],"
        " {'step': step, 'vocab_version': 'v'})\n"
        "    ckpt.prune(run, 2)\n"
    )
    rng = np.random.default_rng(0)
    for attempt in range(4):
        run = tmp_path / f"run{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", script, str(run)], cwd=Path(__file__).resolve().parent.parent)
        while not ckpt.checkpoints(run):
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.05, 0.6)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = ckpt.latest_valid(run, log=lambda *a: None)
        assert latest is not None and ckpt.verify(latest) is None
        assert ckpt.load_weights(latest)["w"].shape == (512, 1024)
        assert ckpt.read_state(latest)["step"] == int(latest.name[5:])
