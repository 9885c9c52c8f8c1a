"""Every way Slurm stops a training job, on a real two-node Slurm cluster on this host.

    python benchmarks/preemption_bench.py [--steps 600]

Starts the test cluster (tests/slurm_cluster.py: Debian's slurm-wlm + munge, two node names on
this host), shards a small synthetic log, and submits the same 2-node DDP job (`bgpt slurm
submit`, checkpoints only at the end and on a stop) once uninterrupted, then once per stop path,
interrupted after 20 logged steps (node_failure: 120):

- usr1_to_the_batch_script: what `--signal=B:USR1@N` does before the time limit
- usr1_to_the_job_steps: `scancel --signal=USR1` (every process of the steps, launchers included)
- usr1_to_both: `scancel --full --signal=USR1` (the batch script and the steps)
- term_to_the_job_steps: `scancel --signal=TERM` (the steps only: the ranks checkpoint, the script requeues)
- term_to_both: `scancel --full --signal=TERM` (a TERM to the batch script reads as "the job is
  ending": not requeued, like scancel; the same command, submitted again, resumes)
- scontrol_requeue: the scheduler takes the job back (TERM to everything, KILL after KillWait)
- preemption: a job of a higher-priority partition needs both nodes (PreemptMode=REQUEUE, TERM,
  then KILL after the partition's 120 s GraceTime)
- node_failure: node n2's slurmd and the job's processes on it are SIGKILLed at once (a power
  loss); Slurm declares the node failed after SlurmdTimeout (30 s) and requeues the job, which
  resumes from its last periodic checkpoint (this path checkpoints every 50 steps) once n2 is back
- time_limit: a 2-minute limit with the warning 60 s before it, attempt after attempt until done
- scancel: a user's plain cancel (TERM, then KILL): the job ends CANCELLED; the same command,
  submitted again, resumes

For each: what Slurm reports (state, exit code, restarts), what the job log says about each stop
(checkpoint written, or none and resumed from the checkpoint before), the steps in the train log
(each once, all of them) and the largest difference between the final weights and the
uninterrupted run's. Writes benchmarks/results/preemption.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from shard_bench import machine, write_results  # noqa: E402
from slurm_cluster import Cluster  # noqa: E402

from trainer import checkpoint as ckpt  # noqa: E402

ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
PATHS = {
    "usr1_to_the_batch_script": ("scancel", "--batch", "--signal=USR1"),
    "usr1_to_the_job_steps": ("scancel", "--signal=USR1"),
    "usr1_to_both": ("scancel", "--full", "--signal=USR1"),
    "term_to_the_job_steps": ("scancel", "--signal=TERM"),
    "term_to_both": ("scancel", "--full", "--signal=TERM"),
    "scontrol_requeue": ("scontrol", "requeue"),
    "preemption": ("sbatch", "--partition=urgent", "--nodes=2", "--exclusive", "--wrap=sleep 5"),
    "node_failure": None,
    "time_limit": None,
    "scancel": ("scancel",),
}


def make_data(root: Path) -> Path:
    """The distributed tests' log: 64 users x 10 events over 12 items, small shards."""
    rows = ["user,item,ts,event_type"]
    for u in range(64):
        for t in range(10):
            item = (u * 7 + t * (1 + u % 3)) % 12
            rows.append(f"u{u},i{item},{1_600_000_000 + 60 * t},{'buy' if item >= 6 else 'view'}")
    (root / "e.csv").write_text("\n".join(rows) + "\n")
    data = root / "data"
    bgpt(["shard", "--input", str(root / "e.csv"), "--out", str(data), "--events-per-shard", "100"], {})
    return data


def bgpt(args: list[str], env: dict) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"bgpt {' '.join(args[:2])} failed: {done.stderr[-3000:]}")
    return done.stdout.strip()


def train_args(data: Path, run: Path, steps: int) -> list[str]:
    return [
        "--data", str(data), "--out", str(run), "--backbone", "scratch", "--model.hidden_size=32",
        "--model.num_layers=1", "--model.dropout=0.0", "--train.micro_batch_size=8", "--train.global_batch_size=16",
        f"--train.max_steps={steps}", "--train.log_every=1", "--train.eval_every=0", "--train.lr=0.003",
        "--checkpoint.every_steps=0", "--eval.ks=1,10", "--data.num_workers=1",
    ]  # fmt: skip


def submit(cluster: Cluster, run: Path, args: list[str], time_limit: str = "20:00", signal_s: int = 30) -> str:
    env = {**cluster.env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    options = ["--nodes", "2", "--time", time_limit, "--signal-seconds", str(signal_s)]
    return bgpt(["slurm", "submit", *options, "--", *args], env).splitlines()[-1]


def job_facts(cluster: Cluster, job: str) -> dict:
    out = cluster.run("scontrol", "show", "job", job, check=False).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return {"state": fields.get("JobState"), "exit_code": fields.get("ExitCode"), "restarts": fields.get("Restarts")}


def wait_for_steps(cluster: Cluster, job: str, log: Path, n: int) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < n):
        if cluster.job_state(job) not in ("PENDING", "CONFIGURING", "RUNNING"):
            raise SystemExit(f"job {job} ended before {n} steps: {cluster.job_state(job)}")
        time.sleep(0.2)


def outcome(run: Path, reference: Path | None, steps: int) -> dict:
    log = "".join(p.read_text(errors="replace") for p in sorted(run.glob("slurm-*.out")))
    logged = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    final = ckpt.step_dir(run, steps)
    diff = None
    if reference is not None and final.exists():
        mine, theirs = ckpt.load_weights(final), ckpt.load_weights(ckpt.step_dir(reference, steps))
        diff = max(float((mine[k] - theirs[k]).abs().max()) for k in theirs)
    return {
        "checkpoints_written_on_stop": [
            int(s) for s in re.findall(r"checkpoint at step (\d+) written by this attempt", log)
        ],
        "stops_without_checkpoint": re.findall(
            r"no checkpoint written by this attempt [^;]*;.* resumes from (.*)", log
        ),
        "not_requeued": len(re.findall(r"not requeued: the same command resumes", log)),
        "resumed_from_steps": [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)],
        "steps_logged_once_each": logged == list(range(1, steps + 1)),
        "finished": (run / "metrics.json").exists(),
        "max_abs_weight_diff": diff,
    }


def run_path(cluster: Cluster, name: str, data: Path, root: Path, steps: int, reference: Path) -> dict:
    run = root / name
    args = train_args(data, run, steps)
    started = time.perf_counter()
    if name == "time_limit":
        job = submit(cluster, run, args, time_limit="2", signal_s=60)
    elif name == "node_failure":
        args.append("--checkpoint.every_steps=50")
        job = submit(cluster, run, args)
        wait_for_steps(cluster, job, run / "train_log.jsonl", 120)
        cluster.fail_node("n2")
        deadline = time.time() + 300
        while time.time() < deadline and job_facts(cluster, job)["restarts"] in (None, "0"):
            time.sleep(1)
        cluster.start_slurmd("n2")
    elif name == "preemption":
        job = submit(cluster, run, args)
        wait_for_steps(cluster, job, run / "train_log.jsonl", 20)
        cluster.run(*PATHS[name], f"--output={root / 'urgent-%j.out'}")
    else:
        job = submit(cluster, run, args)
        wait_for_steps(cluster, job, run / "train_log.jsonl", 20)
        cluster.run(*PATHS[name], job)
    cluster.wait_for(job, ENDED, 1200)
    record = {"job": job, **job_facts(cluster, job)}
    if name in ("scancel", "term_to_both"):  # ended on purpose: the same command, submitted again, resumes
        second = submit(cluster, run, args)
        cluster.wait_for(second, ENDED, 1200)
        record["resubmitted"] = {"job": second, **job_facts(cluster, second)}
    record.update(outcome(run, reference, steps))
    record["seconds"] = round(time.perf_counter() - started, 1)
    final_state = record.get("resubmitted", record)["state"]
    record["resumed_exactly"] = bool(
        final_state == "COMPLETED"
        and record["finished"]
        and record["steps_logged_once_each"]
        and record["max_abs_weight_diff"] == 0.0
    )
    print(json.dumps({name: record}), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (job logs, runs) instead of a temp dir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bgpt-preempt-") as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        cluster = Cluster(root / "slurm").start()
        try:
            data = make_data(root)
            reference = root / "uninterrupted"
            job = submit(cluster, reference, train_args(data, reference, args.steps))
            cluster.wait_for(job, ENDED, 1200)
            base = {"job": job, **job_facts(cluster, job), **outcome(reference, None, args.steps)}
            print(json.dumps({"uninterrupted": base}), flush=True)
            paths = {name: run_path(cluster, name, data, root, args.steps, reference) for name in args.paths}
        finally:
            cluster.stop()
    report(args, base, paths)


def report(args, base: dict, paths: dict) -> None:
    exact = sum(p["resumed_exactly"] for p in paths.values())
    result = {
        "benchmark": "preemption",
        "dataset": "synthetic: 64 users x 10 events, 12 items; 2-node DDP (1 process per node), CPU",
        "command": "python benchmarks/preemption_bench.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "metrics": {"paths_tested": len(paths), "paths_resumed_exactly": exact, "steps": args.steps},
        "goal": "every stop path ends COMPLETED at exactly the requested steps, each logged once, with final "
        "weights equal to the uninterrupted run's",
        "uninterrupted": base,
        "paths": paths,
    }
    lines = [
        "# Preemption: every stop path on a real two-node Slurm cluster",
        "",
        f"`{result['command']}` on {result['machine']}; {args.steps} steps, checkpoints only at the end and on "
        f"a stop (node_failure: also every 50 steps). Uninterrupted reference: {base['state']} (exit {base['exit_code']}).",
        "",
        "| path | Slurm reports | restarts | checkpoint on stop (step) | stop without checkpoint: resumed from "
        "| steps logged once each | max abs weight diff vs uninterrupted | resumed exactly |",
        "|---" * 8 + "|",
    ]
    for name, p in paths.items():
        end = p.get("resubmitted", p)
        reported = f"{p['state']} {p['exit_code']}"
        if "resubmitted" in p:
            reported += f"; resubmitted: {end['state']} {end['exit_code']}"
        diff = "-" if p["max_abs_weight_diff"] is None else f"{p['max_abs_weight_diff']:.1e}"
        lines.append(
            f"| {name} | {reported} | {p['restarts']} | {', '.join(map(str, p['checkpoints_written_on_stop'])) or '-'} "
            f"| {'; '.join(p['stops_without_checkpoint']) or '-'} | {p['steps_logged_once_each']} | {diff} "
            f"| {p['resumed_exactly']} |"
        )
    lines += ["", f"{exact} of {len(paths)} paths resumed exactly."]
    write_results("preemption", result, lines)


if __name__ == "__main__":
    main()
