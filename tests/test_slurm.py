"""The sbatch scripts on a real (local, two-node) Slurm cluster: a multi-node job trains as one
process group; a preemption signal checkpoints, requeues, and the requeued job resumes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import Cluster, ClusterUnavailable
from test_distributed import small_data, train_args  # noqa: F401  (fixture and helper)

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the test cluster runs Debian's Slurm")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        c = Cluster(tmp_path_factory.mktemp("slurm")).start()
    except ClusterUnavailable as e:
        if os.environ.get("CI"):
            raise  # in CI the cluster is part of what is tested
        pytest.skip(str(e))
    yield c
    c.stop()


def submit(cluster: Cluster, run: Path, args: list[str], *options: str) -> str:
    env = {**cluster.env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "launch.cli", "slurm", "submit", "--nodes", "2", "--time", "20:00", *options]
    done = subprocess.run([*cmd, "--", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def job_log(run: Path, job: str) -> str:
    path = run / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def test_two_node_job_trains_as_one_process_group(cluster, small_data, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    job = submit(cluster, run, train_args(small_data, run, 1))
    state = cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 600)
    log = job_log(run, job)
    assert state == "COMPLETED", log[-4000:]
    assert "2 nodes x 1 processes" in log
    assert "world size 2 (ddp)" in log  # both nodes joined one group
    assert (run / "launch" / "accelerate-node0.yaml").exists() and (run / "launch" / "accelerate-node1.yaml").exists()
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    assert "hr@10" in json.loads((run / "metrics.json").read_text())


STOPS = {
    # what --signal=B:USR1@N does before the time limit: USR1 to the batch script
    "usr1_to_the_batch_script": ("scancel", "--batch", "--signal=USR1"),
    # USR1 to every process of the job steps (launchers included), not to the batch script
    "usr1_to_the_job_steps": ("scancel", "--signal=USR1"),
    # the scheduler takes the job back: TERM to everything, then KILL after KillWait
    "scontrol_requeue": ("scontrol", "requeue"),
}


@pytest.mark.parametrize("how", list(STOPS))
def test_every_stop_ends_in_a_requeued_run_at_exactly_the_requested_steps(cluster, small_data, tmp_path, how):  # noqa: F811
    run = tmp_path / "run"
    total = 600
    job = submit(cluster, run, train_args(small_data, run, 1, steps=total), "--signal-seconds", "30")
    log_file = run / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log_file.exists() or len(log_file.read_text().splitlines()) < 20):
        assert cluster.job_state(job) in ("PENDING", "CONFIGURING", "RUNNING"), job_log(run, job)[-4000:]
        time.sleep(0.2)
    cluster.run(*STOPS[how], job)
    deadline = time.time() + 600
    while time.time() < deadline and "restart 1" not in job_log(run, job):
        time.sleep(0.5)
    state = cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 600)
    log = job_log(run, job)
    assert state == "COMPLETED", log[-4000:]
    assert "run finished" in log and "requeueing job" in log
    written = re.findall(r"checkpoint at step (\d+) written by this attempt; (?:Slurm is )?requeueing", log)
    lost = re.findall(r"no checkpoint written by this attempt .*it resumes from (.*)", log)
    assert len(written) + len(lost) == 1, log[-4000:]  # one stop, reported once, as it happened
    if how != "scontrol_requeue":  # a signal the ranks can act on: they must checkpoint
        assert written, log[-4000:]
    if written:
        step = int(written[0])
        assert 20 <= step < total
        assert f"resumed from {run / f'step-{step:08d}'} at step {step}" in log  # not from step 0
    else:
        assert lost[0].startswith("the start")  # checkpoint.every_steps=0: nothing before the stop
    assert "stopped at step 1" not in log and "checkpoint at step 1 saved" not in log  # no stale STOP honoured
    steps = [json.loads(line)["step"] for line in log_file.read_text().splitlines()]
    assert steps == list(range(1, total + 1))  # exactly the requested steps, each logged once
    assert (run / "metrics.json").exists() and not (run / "STOPPED").exists()


def test_a_cancelled_job_stays_cancelled_and_the_same_command_resumes(cluster, small_data, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    total = 600
    args = train_args(small_data, run, 1, steps=total)
    job = submit(cluster, run, args)
    log_file = run / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log_file.exists() or len(log_file.read_text().splitlines()) < 20):
        assert cluster.job_state(job) in ("PENDING", "CONFIGURING", "RUNNING"), job_log(run, job)[-4000:]
        time.sleep(0.2)
    cluster.run("scancel", job)
    assert cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "PENDING"}, 300) == "CANCELLED"
    log = job_log(run, job)
    assert "not requeued: the same command resumes from" in log and "restart 1" not in log, log[-4000:]
    again = submit(cluster, run, args)
    assert cluster.wait_for(again, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 600) == "COMPLETED"
    steps = [json.loads(line)["step"] for line in log_file.read_text().splitlines()]
    assert steps == list(range(1, total + 1))
    assert (run / "metrics.json").exists()
