"""The files of a run folder besides its config and checkpoints: the training and validation logs,
``metrics.json`` (written last: the run finished), and the stop protocol (``STOP`` asks a run to
checkpoint and exit, ``STOPPED`` records that it did). ``run_status`` reads them for `bgpt inspect`.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
from pathlib import Path

import yaml

from data_sharding import shards
from trainer import checkpoint as ckpt
from trainer.config import CONFIG
from trainer.errors import ConfigError

METRICS = "metrics.json"
STOP_FILE = "STOP"
"""Created in a run folder (e.g. by the Slurm script on its preemption signal): checkpoint and exit.
Empty, it stops whichever attempt reads it; holding an attempt id (:func:`current_attempt`), only
that attempt, so a request left behind by a killed job never stops the requeued one."""
STOPPED_FILE = "STOPPED"
"""Written when a run stopped on request with a checkpoint: {"step", "checkpoint", "attempt"}."""
EXIT_STOPPED = 75
"""Exit status of `bgpt train`/`retrain`/`launch` that stopped with a checkpoint (EX_TEMPFAIL):
run the same command to resume. 0: finished (metrics.json written); 1: failed; 2: bad input."""
LOG_FILE = "train_log.jsonl"
VALID_LOG = "valid_metrics.jsonl"


def current_attempt() -> str:
    """This attempt of a Slurm job ("JOBID.RESTARTS"), or "" outside Slurm."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT') or 0}" if job else ""


def stopped_marker(run: Path) -> dict | None:
    """What the run's last stop on request left (None when the run did not stop that way)."""
    try:
        return json.loads((Path(run) / STOPPED_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def trim_logs(run: Path, step: int) -> int:
    """Drop log records after ``step``: they belong to an attempt that died before its next
    checkpoint, and the resumed run logs those steps again. Each step is then logged once across
    restarts. Returns how many records were dropped (a half-written last line counts)."""
    dropped = 0
    for name in (LOG_FILE, VALID_LOG):
        path = Path(run) / name
        if not path.exists():
            continue
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        keep = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                pass
        if len(keep) < len(lines):
            dropped += len(lines) - len(keep)
            shards.write_atomic(path, "".join(line + "\n" for line in keep).encode())
    return dropped


def request_stop(run: Path, attempt: str) -> None:
    """Ask the run to checkpoint and stop: ``RUN/STOP`` addressed to ``attempt`` ("" for any)."""
    (Path(run) / STOP_FILE).write_text(attempt + "\n")


def run_status(run: Path) -> dict:
    """What a run folder holds: finished or not, the latest valid checkpoint (and any newer one
    that fails verification), steps logged of those requested, a pending stop request."""
    if not (run / CONFIG).exists():
        raise ConfigError(f"{run}: not a run folder (no {CONFIG})")
    train = (yaml.safe_load((run / CONFIG).read_text()) or {}).get("train", {})
    invalid: list[str] = []
    latest = ckpt.latest_valid(run, log=invalid.append)
    logged = 0
    if (run / LOG_FILE).exists():
        for line in (run / LOG_FILE).read_text().splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                logged = max(logged, int(json.loads(line).get("step", 0)))
    stop = run / STOP_FILE
    return {
        "run": str(run),
        "finished": (run / "metrics.json").exists(),
        "requested_steps": train.get("max_steps"),
        "epochs": train.get("epochs"),
        "latest_checkpoint": str(latest) if latest else None,
        "latest_checkpoint_step": ckpt.read_state(latest)["step"] if latest else None,
        "invalid_newer_checkpoints": invalid,
        "last_logged_step": logged,
        "stopped": stopped_marker(run),
        "stop_requested": (stop.read_text().strip() or "any attempt") if stop.exists() else None,
        "best_step": ckpt.read_state(run / "best")["step"] if ckpt.verify(run / "best") is None else None,
    }


def write_resources(run: Path, accelerator, zero_stage: int | None) -> None:
    """``RUN/resources.json``: peak memory of every rank (process RSS; GPU memory on CUDA); a
    collective (every rank calls it)."""
    import torch
    from accelerate.utils import gather_object

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    ranks = gather_object([{"rank": accelerator.process_index, "peak_rss_gib": rss, "peak_gpu_gib": gpu}])
    if accelerator.is_main_process:
        strategy = f"zero{zero_stage}" if zero_stage is not None else "ddp"
        record = {"world_size": accelerator.num_processes, "strategy": strategy, "ranks": ranks}
        (run / "resources.json").write_text(json.dumps(record, indent=2) + "\n")
