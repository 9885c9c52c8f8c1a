"""Distributed training on CPU with real processes: DDP and DeepSpeed ZeRO-2/3 against one process,
consolidated ZeRO-3 checkpoints, stop-on-signal with resume, the launch files and the memory plan."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import free_port, shard, write_lines
from safetensors.torch import load_file

from launch import distributed as dist
from launch.train_cli import config_from_train_args
from trainer import checkpoint as ckpt
from trainer.errors import ConfigError
from trainer.run import evaluate_run, load_run_model
from trainer.run_folder import EXIT_STOPPED

REPO = Path(__file__).resolve().parent.parent
STEPS = 6


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    rows = ["user,item,ts,event_type"]
    for u in range(64):
        for t in range(10):
            item = (u * 7 + t * (1 + u % 3)) % 12
            rows.append(f"u{u},i{item},{1_600_000_000 + 60 * t},{'buy' if item >= 6 else 'view'}")
    shard([write_lines(root / "e.csv", rows)], root / "data", events_per_shard=100)
    return root / "data"


def train_args(data: Path, run: Path, workers: int, steps: int = STEPS, **extra) -> list[str]:
    """Micro batch 8, global batch 16: 1 process accumulates 2 micro batches, 2 processes 1 each.
    1 process x 2 loader workers reads the same samples in the same order as 2 ranks x 1 worker."""
    args = [
        "--data",
        str(data),
        "--out",
        str(run),
        "--backbone",
        "scratch",
        "--model.hidden_size=32",
        "--model.num_layers=1",
        "--model.dropout=0.0",
        "--train.micro_batch_size=8",
        "--train.global_batch_size=16",
        f"--train.max_steps={steps}",
        "--train.log_every=1",
        "--train.eval_every=0",
        "--train.lr=0.003",
        "--checkpoint.every_steps=0",
        "--eval.ks=1,10",
        "--eval.batch_size=16",
        f"--data.num_workers={workers}",
    ]
    return args + [f"--{k}={v}" for k, v in extra.items()]


def bgpt(*args: str, timeout: int = 600, env: dict | None = None, status: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == status, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def launch(strategy: str, data: Path, run: Path, **extra) -> subprocess.CompletedProcess:
    port = str(free_port())
    return bgpt(
        "launch",
        "--nproc",
        "2",
        "--strategy",
        strategy,
        "--master-port",
        port,
        "--",
        *train_args(data, run, 1, **extra),
    )


@pytest.fixture(scope="module")
def single(small_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    bgpt("train", *train_args(small_data, run, 2))
    return run


@pytest.fixture(scope="module")
def ddp(small_data, tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("ddp") / "run"
    done = launch("ddp", small_data, run)
    return run, done.stdout + done.stderr


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(single, ddp):
    run, log = ddp
    assert "world size 2 (ddp)" in log
    one, two = losses(single), losses(run)
    assert len(one) == len(two) == STEPS
    assert two == pytest.approx(one, rel=1e-4)
    assert two[-1] != one[0]  # it trained
    # The files behind it are kept in the run.
    assert (run / "launch" / "accelerate.yaml").exists()


def test_distributed_validation_equals_one_process_evaluation_of_the_same_weights(ddp):
    """Each of the 2 ranks scored half of the validation batches; merged, they are one process's metrics."""
    run, log = ddp
    reported = [json.loads(line) for line in (run / "valid_metrics.jsonl").read_text().splitlines()][-1]["valid"]
    assert reported["count"] > 16  # more than one batch of eval.batch_size 16: both ranks had some
    alone = evaluate_run(run, "valid", log=lambda *a: None)
    assert {k: alone[k] for k in reported} == reported  # every metric, exactly


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_deepspeed_zero_matches_ddp(strategy, small_data, ddp, tmp_path):
    pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    done = launch(strategy, small_data, run)
    assert f"world size 2 (deepspeed zero-{strategy[-1]})" in done.stdout + done.stderr
    ddp_run, _ = ddp
    assert losses(run) == pytest.approx(losses(ddp_run), rel=1e-4)
    ds = json.loads((run / "launch" / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == int(strategy[-1])
    assert ds["train_batch_size"] == 16
    latest = ckpt.latest_valid(run)
    assert (latest / ckpt.ZERO_DIR).is_dir()  # sharded optimizer states, one file set per rank
    # The consolidated weights load in this single process and equal DDP's after the same steps.
    model, _, _ = load_run_model(run, weights="latest", log=lambda *a: None)
    ddp_weights = load_file(str(ckpt.latest_valid(ddp_run) / ckpt.WEIGHTS))
    mine = dict(model.named_parameters())
    assert set(ddp_weights) <= set(mine)
    for name, value in ddp_weights.items():
        torch.testing.assert_close(mine[name].detach(), value, rtol=1e-4, atol=1e-5, msg=name)
    # Evaluation here reproduces what the distributed job reported.
    reported = json.loads((run / "metrics.json").read_text())
    assert evaluate_run(run, "test", log=lambda *a: None)["hr@10"] == reported["hr@10"]


def test_zero3_validation_shares_the_batches_and_equals_one_process_evaluation(small_data, tmp_path):
    """Under ZeRO-3 every forward gathers the weights collectively: each rank scores its share of
    the validation batches in step with the other (an odd count: one rank joins the last forward
    without counting it), and the merged metrics are one process's on the kept weights."""
    pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    launch("zero3", small_data, run, **{"train.eval_every": STEPS, "eval.batch_size": 10})
    reported = [json.loads(line) for line in (run / "valid_metrics.jsonl").read_text().splitlines()][-1]["valid"]
    assert -(-reported["count"] // 10) % 2 == 1  # an odd number of batches
    alone = evaluate_run(run, "valid", log=lambda *a: None)
    assert {k: alone[k] for k in reported} == reported


def test_a_stop_signal_checkpoints_and_the_same_command_resumes(small_data, tmp_path):
    """SIGUSR1 (Slurm's preemption warning) mid-run: checkpoint, clean exit, resume to the end."""
    run = tmp_path / "run"
    args = train_args(small_data, run, 0, steps=400, **{"train.log_every": 1})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "train", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    log = run / "train_log.jsonl"
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 5):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_STOPPED, out[-3000:]  # stopped with a checkpoint: not "done"
    assert "stop requested" in out
    stopped = json.loads(out.strip().splitlines()[-1])["stopped_at_step"]
    assert 5 <= stopped < 400
    assert ckpt.latest_valid(run).name == f"step-{stopped:08d}"
    assert not (run / "metrics.json").exists()
    assert json.loads((run / "STOPPED").read_text())["step"] == stopped
    # As if a later attempt had run past that checkpoint and been killed mid-write:
    with open(log, "a") as f:
        f.writelines(json.dumps({"step": stopped + k, "loss": 1.0}) + "\n" for k in range(1, 4))
        f.write('{"step": ')

    done = bgpt("train", *args)
    assert "dropped 4 log records" in done.stdout + done.stderr
    assert not (run / "STOPPED").exists()
    assert f"resumed from {ckpt.step_dir(run, stopped)}" in done.stdout + done.stderr
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 401))  # every step exactly once, none repeated after the resume
    assert (run / "metrics.json").exists()


def test_the_stop_file_stops_a_run_at_once(small_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "STOP").touch()
    done = bgpt("train", *train_args(small_data, run, 0, steps=50), status=EXIT_STOPPED)
    assert json.loads(done.stdout.strip().splitlines()[-1])["stopped_at_step"] == 1
    assert not (run / "STOP").exists()  # consumed: the resumed run goes on


def test_a_stop_request_of_an_earlier_attempt_is_ignored(small_data, tmp_path):
    """A requeued Slurm job (restart 1) must not stop on the request its killed predecessor left."""
    run = tmp_path / "run"
    run.mkdir()
    attempt = {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "1"}
    (run / "STOP").write_text("7.0\n")
    done = bgpt("train", *train_args(small_data, run, 0, steps=12), env=attempt)
    assert "ignored" in done.stdout + done.stderr and "attempt 7.0" in done.stdout + done.stderr
    assert (run / "metrics.json").exists() and not (run / "STOP").exists()
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    (run / "STOP").write_text("7.1\n")  # addressed to this attempt: honoured
    done = bgpt("train", *train_args(small_data, run, 0, steps=20), env=attempt, status=EXIT_STOPPED)
    assert json.loads(done.stdout.strip().splitlines()[-1])["stopped_at_step"] == 13
    assert json.loads((run / "STOPPED").read_text()) == {
        "step": 13, "checkpoint": str(ckpt.step_dir(run, 13)), "attempt": "7.1"
    }  # fmt: skip
    status = json.loads(bgpt("inspect", str(run), "--json").stdout)
    assert not status["finished"]  # the 12-step run's metrics.json does not vouch for this request
    assert (status["requested_steps"], status["last_logged_step"], status["latest_checkpoint_step"]) == (20, 13, 13)
    assert status["stopped"]["attempt"] == "7.1" and status["stop_requested"] is None
    assert "13 of 20" in bgpt("inspect", str(run)).stdout


def test_launch_files_keep_the_global_batch_when_the_process_count_changes(small_data, tmp_path):
    cfg, run = config_from_train_args(train_args(small_data, tmp_path / "run", 1, **{"train.micro_batch_size": 4}))
    for nproc, accum in ((1, 4), (2, 2), (4, 1)):
        lc = dist.LaunchConfig(nproc=nproc, strategy="zero2")
        acc_file, ds_file = dist.write_launch_files(run, lc, cfg.train)
        ds = json.loads(ds_file.read_text())
        assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (4, accum)
        assert ds["train_batch_size"] == 16
    with pytest.raises(ConfigError, match="not a multiple"):
        dist.write_launch_files(run, dist.LaunchConfig(nproc=3), cfg.train)
    with pytest.raises(ConfigError, match="needs --strategy zero3"):
        dist.LaunchConfig(strategy="zero2", offload="optimizer+params")


def test_launch_dry_run_prints_the_accelerate_command(small_data, tmp_path):
    done = bgpt("launch", "--nproc", "2", "--dry-run", "--", *train_args(small_data, tmp_path / "run", 1))
    assert "accelerate.commands.launch --config_file" in done.stderr
    config = (tmp_path / "run" / "launch" / "accelerate.yaml").read_text()
    assert "num_processes: 2" in config and "distributed_type: MULTI_GPU" in config


def test_memory_plan_follows_the_zero_partitioning():
    size = dist.ModelSize(total=1_000, trainable=100, layers=1, hidden=8)
    rows = {s: dist.memory_plan(size, 4, s, micro_batch=1, seq_len=1) for s in dist.STRATEGIES}
    gib = 2**30
    assert rows["ddp"]["params_gib"] * gib == 2_000  # bf16 weights of everything
    assert rows["ddp"]["grads_gib"] * gib == 200  # bf16 gradients of what trains
    assert rows["ddp"]["optimizer_gib"] * gib == 1_200  # fp32 master + Adam moments
    assert rows["zero1"]["optimizer_gib"] * gib == 300
    assert rows["zero2"]["grads_gib"] * gib == 50
    assert rows["zero3"]["params_gib"] * gib == 500
    offload = dist.memory_plan(size, 4, "zero3", "optimizer+params", micro_batch=1, seq_len=1)
    assert offload["optimizer_gib"] == offload["params_gib"] == 0
    assert offload["cpu_offload_gib_per_node"] * gib == 1_200 + 2_000
    # A sharded item table (10 items x 8 of the 1,000 weights): split over the GPUs in fp32 with one
    # accumulator per row, no gradient or Adam state; the rest as under DDP.
    size = dist.ModelSize(total=1_000, trainable=100, layers=1, hidden=8, item_rows=80)
    sharded = dist.memory_plan(size, 4, "ddp", micro_batch=1, seq_len=1, sharded_items=10)
    assert sharded["item_table"] == "sharded" and sharded["item_table_gib"] * gib == (80 + 10) * 4 / 4
    assert (sharded["params_gib"] * gib, sharded["grads_gib"] * gib) == (920 * 2, 20 * 2)
    assert sharded["optimizer_gib"] * gib == 20 * 12
    with pytest.raises(ValueError, match="DDP, not ZeRO"):
        dist.memory_plan(size, 4, "zero1", sharded_items=10)


def test_plan_command_counts_a_real_backbone(tmp_path):
    done = bgpt("plan", "--backbone", "scratch", "--gpus", "2", "--num-items", "1000", "--json")
    rows = json.loads(done.stdout)
    assert [r["strategy"] for r in rows] == list(dist.STRATEGIES)
    totals = [r["total_per_gpu_gib"] for r in rows]
    assert totals == sorted(totals, reverse=True)
    # 2 blocks x 64 scratch GPT-2 (+ 1,000 x 64 item table) trains in full.
    assert rows[0]["parameters_trainable"] == rows[0]["parameters_total"] > 64_000
    done = bgpt("plan", "--backbone", "scratch", "--gpus", "2", "--num-items", "1000", "--item-table", "sharded")
    assert "ddp       sharded" in done.stdout  # a DDP row with the table sharded, beside the dense one


def _kill_after_step(cmd: list[str], log: Path, step: int) -> None:
    """Start ``cmd`` and SIGKILL it and all its descendants once ``step`` is logged."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < step):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    # Every process at once, as a machine failure would: torchrun starts its workers in their own
    # sessions, so the process group alone would miss them.
    family = psutil.Process(proc.pid).children(recursive=True)
    for p in [psutil.Process(proc.pid), *family]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()
    psutil.wait_procs(family, timeout=30)


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_sigkill_then_resume_gives_bit_identical_weights(strategy, small_data, tmp_path):
    """Checkpoints every 4 steps; SIGKILL every process at a random step past the first checkpoint;
    the same command resumes (rank RNG, data position, optimizer shards) and ends bit-identical."""
    if strategy != "ddp":
        pytest.importorskip("deepspeed")
    extra = {"checkpoint.every_steps": 4, "checkpoint.keep_last": 5, "model.dropout": 0.1}

    def command(run: Path) -> list[str]:
        launch = ["launch", "--nproc", "2", "--strategy", strategy, "--master-port", str(free_port())]
        return [sys.executable, "-m", "launch.cli", *launch, "--", *train_args(small_data, run, 1, steps=16, **extra)]

    straight = tmp_path / "straight"
    done = subprocess.run(command(straight), cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = tmp_path / "killed"
    kill_at = int(os.environ.get("BGPT_TEST_KILL_AT", np.random.default_rng().integers(6, 14)))
    _kill_after_step(command(killed), killed / "train_log.jsonl", kill_at)
    assert not (killed / "metrics.json").exists()
    resumed_from = ckpt.latest_valid(killed)
    # The kill lands a moment after step kill_at is logged, so training may have saved one more
    # checkpoint by then; what matters is that the run was cut before its end.
    assert resumed_from is not None and 4 <= int(resumed_from.name[5:]) < 16
    done = subprocess.run(
        command(killed), cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {resumed_from}" in done.stdout + done.stderr, (kill_at, done.stdout[-2000:])
    a = load_file(str(ckpt.step_dir(straight, 16) / ckpt.WEIGHTS))
    b = load_file(str(ckpt.step_dir(killed, 16) / ckpt.WEIGHTS))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), (name, kill_at, resumed_from.name)


def test_a_two_process_checkpoint_resumes_in_one_process(small_data, ddp, tmp_path):
    """Elastic resume: the DDP run's last checkpoint (2 ranks) continues with 1 process."""
    source, _ = ddp
    run = tmp_path / "run"
    shutil.copytree(source, run)
    done = bgpt("train", *train_args(small_data, run, 0, steps=STEPS + 4))
    assert f"resumed from {ckpt.step_dir(run, STEPS)}" in done.stdout + done.stderr
    assert "elastic resume: the checkpoint's data position was reached by 2 processes x 1" in done.stdout + done.stderr
    assert json.loads((run / "metrics.json").read_text())["train"]["step"] == STEPS + 4
