"""`bgpt launch`, `bgpt plan` and `bgpt slurm`: from one process to multi-node clusters.

Both `launch` and `slurm` take the training arguments after ``--`` exactly as `bgpt train` does;
they are parsed (and the config validated) before anything is written or submitted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from launch import distributed as dist
from launch.train_cli import config_from_train_args
from trainer.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SLURM_TEMPLATE = REPO / "slurm" / "train.sbatch"


def _launch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=1, help="processes per node (one per GPU)")
    p.add_argument("--strategy", default="ddp", help="ddp | zero1 | zero2 | zero3")
    p.add_argument("--offload", default="none", help="none | optimizer | optimizer+params (ZeRO only)")
    p.add_argument("--grad-accum", type=int, help="micro batches per optimizer step (sets train.grad_accum)")


def add_launch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="run `bgpt train` on several processes/nodes with Accelerate (DDP) or DeepSpeed ZeRO",
        description="Writes RUN/launch/accelerate.yaml (+ deepspeed.json) and runs accelerate launch "
        "with them. Training arguments follow --.",
    )
    _launch_options(p)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--rdzv", default="static", help="static | c10d (c10d: elastic rendezvous, used under Slurm)")
    p.add_argument("--dry-run", action="store_true", help="write the files and print the command only")
    p.set_defaults(func=run_launch, takes_train_args=True)


def _with_accum(train_args: list[str], grad_accum: int | None) -> list[str]:
    return [*train_args, f"--train.grad_accum={grad_accum}"] if grad_accum else list(train_args)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_launch(args: argparse.Namespace) -> int:
    from trainer.run_folder import EXIT_STOPPED, current_attempt, stopped_marker

    train_args = _with_accum(args.train_args, args.grad_accum)
    cfg, run = config_from_train_args(train_args)
    lc = dist.LaunchConfig(
        nproc=args.nproc,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        strategy=args.strategy,
        offload=args.offload,
        rdzv=args.rdzv,
        cuda=_cuda(),
    )
    acc_file, ds_file = dist.write_launch_files(run, lc, cfg.train)
    cmd = dist.launch_command(acc_file, train_args)
    print(f"bgpt launch: {lc.world_size} processes ({lc.strategy}); config {acc_file}", file=sys.stderr)
    print(dist.shell_line(cmd), file=sys.stderr)
    if args.dry_run:
        return 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env[dist.LAUNCHED_ENV] = "1"
    # torch's elastic agent ends its workers on SIGTERM (what preemption and `scontrol requeue`
    # send to every process): let it keep SIGTERM ignored, so the ranks checkpoint before they exit.
    # (torchrun's --signals-to-handle, read from PET_SIGNALS_TO_HANDLE when accelerate starts it)
    env.setdefault("PET_SIGNALS_TO_HANDLE", "SIGINT,SIGHUP,SIGQUIT")
    attempt = current_attempt()
    status = _run_with_stop_requests(cmd, env, run, attempt)
    marker = stopped_marker(run)
    if marker is not None and marker.get("attempt") == attempt:
        # The checkpoint is complete before the marker is written, whatever the launcher's status.
        print(f"bgpt launch: stopped with a checkpoint at step {marker['step']}; resume with the same command",
              file=sys.stderr)  # fmt: skip
        return EXIT_STOPPED
    return status


def _run_with_stop_requests(cmd: list[str], env: dict, run: Path, attempt: str) -> int:
    """Run the launcher; SIGUSR1 or SIGTERM to this process becomes a stop request in the run
    folder (every rank stops at the same step and checkpoints). Slurm signals every process of a
    job step: the launcher processes between this one and the ranks inherit SIGUSR1 and SIGTERM
    ignored, so a stop signal cannot end them before the ranks have checkpointed (the ranks and
    torch's elastic agent install their own handlers)."""
    from trainer.run_folder import request_stop

    def on_signal(signum, frame) -> None:
        request_stop(run, attempt)
        print(f"bgpt launch: {signal.Signals(signum).name}: asked the ranks to checkpoint and stop", file=sys.stderr)

    signals = (signal.SIGUSR1, signal.SIGTERM)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        proc = subprocess.Popen(cmd, env=env)  # inherits the two signals ignored
        for sig in signals:
            signal.signal(sig, on_signal)
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- plan ----------------------------------------------------------------------------------------


def add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="memory per GPU for each ZeRO stage, before you pay for a cluster")
    p.add_argument("--backbone", default="smollm2-135m", help="smollm2-135m, scratch, or a local HF model directory")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    p.add_argument("--strategy", default="all", help="ddp | zero1 | zero2 | zero3 | all")
    p.add_argument("--offload", default="none", help="none | optimizer | optimizer+params")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU, to recommend a strategy")
    p.add_argument("--num-layers", type=int, help="keep the first N blocks")
    p.add_argument("--num-items", type=int, default=1_000_000, help="catalogue size (the item table trains)")
    p.add_argument("--data", help="dataset folder: take the catalogue size from its vocabulary")
    p.add_argument("--lora-r", type=int, help="LoRA rank (default: the training default, lora.r)")
    p.add_argument("--full-finetune", action="store_true")
    p.add_argument("--micro-batch", type=int, help="windows per GPU (default: train.micro_batch_size)")
    p.add_argument("--max-len", type=int, help="positions per window (default: model.max_len)")
    p.add_argument("--precision", default="bf16", help="bf16 (GPU) or fp32")
    p.add_argument(
        "--item-table",
        default="auto",
        choices=("auto", "dense", "sharded"),
        help="also plan DDP with the item table sharded (model.item_table): auto from 1M items",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_plan)


def _meta_backbone(name: str, num_layers: int | None):
    """The backbone built on the meta device: exact shapes, no weights read or allocated."""
    import torch
    from transformers import AutoConfig, AutoModel

    from trainer import backbone as backbones

    if name == "scratch":
        with torch.device("meta"):
            return backbones.build_scratch("gpt2", num_layers or 2, 64, 2, 512, 0.0).model
    path = backbones.smollm2_dir() if name == "smollm2-135m" else Path(name)
    if not (path / "config.json").exists():
        raise ConfigError(f"--backbone {name}: no config.json there; give smollm2-135m, scratch or a HF model folder")
    config = AutoConfig.from_pretrained(path)
    if num_layers:
        config.num_hidden_layers = min(num_layers, config.num_hidden_layers)
    with torch.device("meta"):
        return AutoModel.from_config(config)


def _plan_sharded(choice: str, num_items: int) -> bool:
    from trainer.sharded_run import SHARDED_FROM_ITEMS

    return choice == "sharded" or (choice == "auto" and num_items >= SHARDED_FROM_ITEMS)


def run_plan(args: argparse.Namespace) -> int:
    from trainer.config import RunConfig
    from trainer.model import LORA_TARGETS

    defaults = RunConfig()  # unset options plan what `bgpt train` would run
    args.lora_r = defaults.lora.r if args.lora_r is None else args.lora_r
    args.micro_batch = defaults.train.micro_batch_size if args.micro_batch is None else args.micro_batch
    args.max_len = defaults.model.max_len if args.max_len is None else args.max_len
    num_items = args.num_items
    if args.data:
        from trainer.factory import dataset_info

        num_items = dataset_info(Path(args.data)).num_items
    backbone = _meta_backbone(args.backbone, args.num_layers)
    size = dist.model_size(
        backbone, num_items, args.lora_r, LORA_TARGETS, args.full_finetune or args.backbone == "scratch"
    )
    strategies = dist.STRATEGIES if args.strategy == "all" else (args.strategy,)
    rows = []
    for strategy in strategies:
        offload = args.offload if strategy != "ddp" else "none"
        if offload == "optimizer+params" and strategy != "zero3":
            offload = "optimizer"
        rows.append(
            dist.memory_plan(size, args.gpus, strategy, offload, args.micro_batch, args.max_len, args.precision)
        )
        if strategy == "ddp" and _plan_sharded(args.item_table, num_items):
            rows.append(
                dist.memory_plan(
                    size, args.gpus, "ddp", "none", args.micro_batch, args.max_len, args.precision, num_items
                )
            )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    mode = "full fine-tuning" if args.full_finetune or args.backbone == "scratch" else "LoRA"
    print(
        f"{args.backbone}: {size.total:,} parameters, {size.trainable:,} trainable ({mode}, "
        f"{num_items:,} items); {args.gpus} GPUs, micro batch {args.micro_batch} x {args.max_len} positions, "
        f"{args.precision}"
    )
    print(dist.format_plan(rows))
    best = dist.recommend(rows, args.gpu_memory)
    if best:
        print(
            f"fits in {args.gpu_memory:g} GiB (with 10% headroom): --strategy {best['strategy']} --offload {best['offload']}"
        )
    else:
        print(f"nothing fits in {args.gpu_memory:g} GiB per GPU: add GPUs, offload, or lower --micro-batch")
    return 0


# -- slurm -----------------------------------------------------------------------------------------


def add_slurm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "slurm",
        help="render or submit the multi-node sbatch script for a training run",
        description="Fills slurm/train.sbatch from these options; training arguments follow --.",
    )
    p.add_argument("action", choices=("render", "submit"))
    _launch_options(p)
    header = _template_header(SLURM_TEMPLATE.read_text())
    p.add_argument("--nodes", type=int, default=int(header["nodes"]))
    p.add_argument("--gpus-per-node", type=int, default=0, help="0 on CPU-only nodes")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem", help="memory per node, e.g. 200G")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", default=header["time"])
    p.add_argument("--job-name", default=header["job-name"])
    p.add_argument(
        "--signal-seconds",
        type=int,
        default=int(header["signal"].rpartition("@")[2]),
        help="preemption warning before the time limit",
    )
    p.add_argument("--python", default=sys.executable, help="the Python with behavior-gpt installed on the nodes")
    p.add_argument("--script", help="where to write the script (default: RUN/launch/train.sbatch)")
    p.set_defaults(func=run_slurm, takes_train_args=True)


def _template_header(text: str) -> dict[str, str | None]:
    """The template's ``#SBATCH --key[=value]`` lines, in order: the one source of their defaults."""
    header: dict[str, str | None] = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH --"):
            key, sep, value = line[len("#SBATCH --") :].partition("=")
            header[key.strip()] = value.strip() if sep else None
    return header


def render_slurm(args: argparse.Namespace, train_args: list[str], run: Path) -> str:
    """The template with its #SBATCH header and defaults filled in from the options."""
    text = SLURM_TEMPLATE.read_text()
    values = _template_header(text)
    values.update(
        {
            "job-name": args.job_name,
            "nodes": str(args.nodes),
            "time": args.time,
            "signal": f"B:USR1@{args.signal_seconds}",
            "output": str(run.resolve() / "slurm-%j.out"),
        }
    )
    for flag in ("gpus_per_node", "cpus_per_task", "mem", "partition", "account"):
        value = getattr(args, flag)
        if value:
            values[flag.replace("_", "-")] = str(value)
    header = [f"#SBATCH --{key}" + ("" if value is None else f"={value}") for key, value in values.items()]
    nproc = args.nproc if args.nproc > 1 or not args.gpus_per_node else args.gpus_per_node
    settings = {
        "BGPT_PYTHON": args.python,
        "BGPT_REPO": str(REPO),
        "BGPT_NPROC_PER_NODE": str(nproc),
        "BGPT_STRATEGY": args.strategy,
        "BGPT_OFFLOAD": args.offload,
    }
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    end = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    body = lines[end + 1 :]
    defaults = [f': "${{{k}:={shlex.quote(v)}}}"' for k, v in settings.items()]
    args_line = "set -- " + " ".join(shlex.quote(a) for a in train_args)
    out = lines[:start] + header + ["", "# Rendered by `bgpt slurm render`.", *defaults, args_line] + body
    return "\n".join(out) + "\n"


def run_slurm(args: argparse.Namespace) -> int:
    train_args = _with_accum(args.train_args, args.grad_accum)
    cfg, run = config_from_train_args(train_args)
    lc = dist.LaunchConfig(
        nproc=max(args.nproc, args.gpus_per_node or 1), nnodes=args.nodes, strategy=args.strategy, offload=args.offload
    )
    cfg.train.accumulation(lc.world_size)
    run.mkdir(parents=True, exist_ok=True)
    script = Path(args.script) if args.script else run / dist.LAUNCH_DIR / "train.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(render_slurm(args, train_args, run))
    script.chmod(0o755)
    print(f"wrote {script}", file=sys.stderr)
    if args.action == "render":
        print(script)
        return 0
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"sbatch failed: {done.stderr.strip() or done.stdout.strip()}")
    job = re.split(r"[;\s]", done.stdout.strip())[0]
    print(job)
    return 0
