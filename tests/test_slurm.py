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
from slurm_cluster import Cluster, ClusterUnavailable, _free_ports
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
    # Its own rendezvous port: the script's default (20000 + job id) is the same for the equal job
    # ids of the two test clusters that `pytest -n 2` starts on this one host.
    (port,) = _free_ports(1)
    env = {**cluster.env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "BGPT_MASTER_PORT": str(port)}
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
    # TERM to every process of the steps (loader workers included), not to the batch script
    "term_to_the_job_steps": ("scancel", "--signal=TERM"),
    # the scheduler takes the job back: TERM to everything, then KILL after KillWait
    "scontrol_requeue": ("scontrol", "requeue"),
    # a job of a higher-priority partition needs the nodes: TERM, then KILL after GraceTime
    "preemption": ("sbatch", "--partition=urgent", "--nodes=2", "--exclusive", "--wrap=sleep 5; echo preemptor done"),
}


@pytest.mark.parametrize("how", list(STOPS))
def test_every_stop_ends_in_a_requeued_run_at_exactly_the_requested_steps(cluster, small_data, tmp_path, how):  # noqa: F811
    run = tmp_path / "run"
    total = 300
    job = submit(cluster, run, train_args(small_data, run, 1, steps=total), "--signal-seconds", "30")
    log_file = run / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log_file.exists() or len(log_file.read_text().splitlines()) < 20):
        assert cluster.job_state(job) in ("PENDING", "CONFIGURING", "RUNNING"), job_log(run, job)[-4000:]
        time.sleep(0.2)
    if how == "preemption":
        cluster.run(*STOPS[how], f"--output={tmp_path / 'urgent.out'}")
    else:
        cluster.run(*STOPS[how], job)
    deadline = time.time() + 600
    while time.time() < deadline and "restart 1" not in job_log(run, job):
        time.sleep(0.5)
    state = cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 600)
    log = job_log(run, job)
    assert state == "COMPLETED", log[-4000:]
    assert "run finished" in log and "requeueing job" in log
    written = re.findall(
        r"checkpoint at step (\d+) written by this attempt; (?:Slurm is |job \d+ was preempted at \S+; )?requeueing",
        log,
    )
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
    if how == "preemption":  # the preemptor ran in between, and the job knew it had been preempted
        assert "was preempted at" in log
        assert (tmp_path / "urgent.out").read_text().strip() == "preemptor done"


def test_a_cancelled_job_stays_cancelled_and_the_same_command_resumes(cluster, small_data, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    total = 300
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


def test_a_node_failure_requeues_the_job_and_it_resumes_from_its_last_checkpoint(cluster, small_data, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    total = 300
    job = submit(cluster, run, train_args(small_data, run, 1, steps=total, **{"checkpoint.every_steps": 50}))
    log_file = run / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log_file.exists() or len(log_file.read_text().splitlines()) < 120):
        assert cluster.job_state(job) in ("PENDING", "CONFIGURING", "RUNNING"), job_log(run, job)[-4000:]
        time.sleep(0.2)
    assert cluster.fail_node("n2") > 0  # slurmd and the job's processes on n2, all at once
    deadline = time.time() + 300  # SlurmdTimeout (30 s) before Slurm declares the node failed
    while time.time() < deadline and "Slurm is requeueing" not in job_log(run, job):
        time.sleep(1)
    # The node comes back (ReturnToService=2). slurmctld still holds what it could not deliver to
    # the dead node (the first attempt's step kill, retried every 60 s); step ids restart with
    # every attempt, so a late delivery would stop the next attempt's step 0 on n2. Hold the
    # requeued job until that queue is empty, as an operator returning a node would.
    cluster.run("scontrol", "hold", job)
    cluster.start_slurmd("n2")
    deadline = time.time() + 180
    while time.time() < deadline and cluster.agent_queue() > 0:
        time.sleep(1)
    cluster.run("scontrol", "release", job)
    state = cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 600)
    log = job_log(run, job)
    assert state == "COMPLETED", log[-4000:]
    assert "DUE TO NODE FAILURE" in log
    assert "(restart 1)" in log and "(restart 2)" not in log, log[-4000:]  # one requeue, no stray stop
    lost = re.findall(
        r"no checkpoint written by this attempt .*Slurm is requeueing job \d+: it resumes from (\S+)", log
    )
    assert len(lost) == 1, log[-4000:]
    step = int(lost[0].rsplit("-", 1)[1])
    assert step >= 100 and f"resumed from {lost[0]} at step {step}" in log  # the last checkpoint, not step 0
    steps = [json.loads(line)["step"] for line in log_file.read_text().splitlines()]
    assert steps == list(range(1, total + 1))  # the steps after the checkpoint were logged once, not twice
    assert (run / "metrics.json").exists()
    deadline = time.time() + 60
    while time.time() < deadline and cluster.run("sinfo", "-h", "-o", "%T %D").stdout.split()[:2] != ["idle", "2"]:
        time.sleep(0.5)  # both nodes back in service for whatever runs next
