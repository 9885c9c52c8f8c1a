"""Distributed launch: the Accelerate + DeepSpeed files of a run, the `accelerate launch` command,
and a memory plan per GPU for each ZeRO stage.

`bgpt launch` writes ``RUN/launch/accelerate.yaml`` (and ``RUN/launch/deepspeed.json`` for the
ZeRO strategies) and runs ``accelerate launch --config_file RUN/launch/accelerate.yaml -m launch.cli
train ...``. The files are plain Accelerate/DeepSpeed configs: on a cloud GPU box the same command
line works without bgpt, and they stay in the run for reproducibility.

The global batch (micro batch x processes x accumulation) is what the optimisation sees: with
``train.global_batch_size`` set, accumulation is derived from the process count, so moving a run
from 8 GPUs to 16 keeps the same optimisation.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from trainer.errors import ConfigError

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")
OFFLOADS = ("none", "optimizer", "optimizer+params")
LAUNCH_DIR = "launch"
LAUNCHED_ENV = "BGPT_LAUNCHED"
"""Set for the processes `bgpt launch` starts: a rank that stopped with a checkpoint exits 0 and
the launcher, seeing the run's STOPPED marker, exits EXIT_STOPPED for the whole node."""


@dataclass
class LaunchConfig:
    """Where the processes run and how the model state is split across them."""

    nproc: int = 1
    """Processes per node (one per GPU; on CPU, one per group of cores)."""
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    strategy: str = "ddp"
    offload: str = "none"
    rdzv: str = "static"
    """static (every node is told its rank) or c10d (elastic rendezvous, as under Slurm)."""
    cuda: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy {self.strategy!r}: choose {', '.join(STRATEGIES)}")
        if self.offload not in OFFLOADS:
            raise ConfigError(f"--offload {self.offload!r}: choose {', '.join(OFFLOADS)}")
        if self.offload != "none" and self.strategy == "ddp":
            raise ConfigError("--offload needs a ZeRO strategy (zero1, zero2 or zero3)")
        if self.offload == "optimizer+params" and self.strategy != "zero3":
            raise ConfigError("--offload optimizer+params needs --strategy zero3 (only ZeRO-3 partitions parameters)")
        if self.nproc < 1 or self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ConfigError("--nproc and --nnodes must be >= 1 and 0 <= --node-rank < --nnodes")
        if self.rdzv not in ("static", "c10d"):
            raise ConfigError("--rdzv: choose static or c10d")

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @property
    def zero_stage(self) -> int | None:
        return int(self.strategy[-1]) if self.strategy.startswith("zero") else None


def deepspeed_config(lc: LaunchConfig, train, precision: str) -> dict:
    """DeepSpeed JSON for a ZeRO strategy; every batch number explicit (no "auto": the stream is
    not passed through accelerate.prepare, so nothing could fill it in)."""
    accum = train.accumulation(lc.world_size)
    zero: dict = {
        "stage": lc.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": lc.cuda,
        "reduce_bucket_size": 50_000_000,
        "allgather_bucket_size": 50_000_000,
    }
    if lc.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["stage3_param_persistence_threshold"] = 10_000
    if lc.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": lc.cuda}
    if lc.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": lc.cuda}
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": train.micro_batch_size * lc.world_size * accum,
        "gradient_clipping": train.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # The optimizer is torch's AdamW, built by the trainer (DeepSpeed's fused CPU Adam would
        # need a compiled extension on every machine).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def accelerate_config(lc: LaunchConfig, precision: str, deepspeed_file: Path | None) -> dict:
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED" if deepspeed_file else ("MULTI_GPU" if lc.world_size > 1 else "NO"),
        "num_processes": lc.world_size,
        "num_machines": lc.nnodes,
        "machine_rank": lc.node_rank,
        "main_process_ip": lc.master_addr,
        "main_process_port": lc.master_port,
        "rdzv_backend": lc.rdzv,
        "same_network": True,
        # On CPU the trainer passes cpu=True (gloo) itself; use_cpu here would select
        # accelerate's MPI-based multi-CPU launcher instead of torch.distributed.run.
        "use_cpu": False,
        "gpu_ids": "all",
        "main_training_function": "main",
        "downcast_bf16": "no",
    }
    if not deepspeed_file:  # with DeepSpeed, precision lives in its JSON only (accelerate insists)
        config["mixed_precision"] = "bf16" if precision == "bf16" else "no"
    if deepspeed_file:
        config["deepspeed_config"] = {
            "deepspeed_config_file": str(deepspeed_file),
            "zero3_init_flag": False,
            "deepspeed_multinode_launcher": "standard",
        }
    return config


def _write_atomic(path: Path, text: str) -> None:
    """Readers (another node on a shared filesystem) see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_launch_files(run: Path, lc: LaunchConfig, train) -> tuple[Path, Path | None]:
    """Write the Accelerate (and DeepSpeed) configs into ``RUN/launch/``; return their paths."""
    train.accumulation(lc.world_size)  # fails early when the global batch does not divide
    precision = train.precision if train.precision != "auto" else ("bf16" if lc.cuda else "fp32")
    folder = run / LAUNCH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    ds_path = None
    if lc.zero_stage is not None:
        ds_path = folder / "deepspeed.json"
        _write_atomic(ds_path, json.dumps(deepspeed_config(lc, train, precision), indent=2) + "\n")
    # One file per node: on a shared filesystem the nodes of a job must not overwrite each other's.
    acc_path = folder / ("accelerate.yaml" if lc.nnodes == 1 else f"accelerate-node{lc.node_rank}.yaml")
    _write_atomic(acc_path, yaml.safe_dump(accelerate_config(lc, precision, ds_path.resolve() if ds_path else None)))
    return acc_path, ds_path


def launch_command(accelerate_file: Path, train_args: list[str]) -> list[str]:
    """``accelerate launch`` of ``bgpt train`` with the given arguments."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_file),
        "-m",
        "launch.cli",
        "train",
        *train_args,
    ]


def shell_line(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


# -- memory plan -------------------------------------------------------------------------------


@dataclass
class ModelSize:
    """Parameter counts that decide memory: the whole network and the part that trains."""

    total: int
    trainable: int
    layers: int
    hidden: int
    item_rows: int = 0
    """Of ``total`` (and ``trainable``): the item table's weights (items x hidden)."""


def model_size(backbone, num_items: int, lora_r: int, lora_targets, full_finetune: bool) -> ModelSize:
    """Exact counts for a backbone config (built on the meta device: no weights are read)."""
    import torch

    model = backbone.model if hasattr(backbone, "model") else backbone
    config = model.config if hasattr(model, "config") else backbone
    base = sum(p.numel() for p in model.parameters())
    hidden = config.hidden_size
    layers = config.num_hidden_layers
    behaviour = num_items * hidden + hidden * (64 + 32)  # item table + event-type and gap tables
    if full_finetune:
        adapters, trainable_base = 0, base
    else:
        adapters, trainable_base = 0, 0
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora_targets:
                adapters += lora_r * (module.in_features + module.out_features)
    total, trainable = base + adapters + behaviour, trainable_base + adapters + behaviour
    return ModelSize(total, trainable, layers, hidden, item_rows=num_items * hidden)


def memory_plan(
    size: ModelSize,
    gpus: int,
    strategy: str,
    offload: str = "none",
    micro_batch: int = 16,
    seq_len: int = 200,
    precision: str = "bf16",
    sharded_items: int = 0,
) -> dict:
    """Bytes per GPU for parameters, gradients, optimizer states and activations.

    Mixed-precision Adam as in the ZeRO paper: 16-bit weights and gradients, fp32 master copy,
    momentum and variance (12 bytes) for each trainable parameter; frozen weights only hold their
    16-bit copy. fp32 training holds 4-byte weights and gradients and 8 bytes of Adam moments.
    ZeRO-1 splits optimizer states over the GPUs, ZeRO-2 also gradients, ZeRO-3 also parameters.
    Activations: about 34 x seq x batch x hidden bytes per layer in 16-bit with fused attention
    (Korthikanti et al. 2022), doubled in fp32, plus the chunked item scores (64 MB).
    ``sharded_items``: the item table of that many rows is sharded over the GPUs (model.item_table,
    DDP only) instead: fp32 rows and one fp32 row-wise Adagrad accumulator per row, split over the
    GPUs, no gradient or Adam state (FBGEMM's fused update).
    """
    lc = LaunchConfig(nproc=gpus, strategy=strategy, offload=offload)
    word = 2 if precision == "bf16" else 4
    adam = 12 if precision == "bf16" else 8
    stage = lc.zero_stage or 0
    n = max(1, gpus)
    dense_total, dense_trainable, table = size.total, size.trainable, 0.0
    if sharded_items:
        if stage:
            raise ValueError("a sharded item table trains under DDP, not ZeRO")
        dense_total, dense_trainable = size.total - size.item_rows, size.trainable - size.item_rows
        table = (size.item_rows + sharded_items) * 4 / n
    params = dense_total * word / (n if stage >= 3 else 1)
    grads = dense_trainable * word / (n if stage >= 2 else 1)
    optim = dense_trainable * adam / (n if stage >= 1 else 1)
    cpu = 0.0
    if offload in ("optimizer", "optimizer+params"):
        cpu, optim = cpu + optim * n, 0.0
    if offload == "optimizer+params":
        cpu += params * n
        params = 0.0
    activations = 34 * seq_len * micro_batch * size.hidden * size.layers * (word / 2) + 64 * 2**20
    total = params + grads + optim + activations + table
    gib = 2**30
    return {
        "strategy": strategy,
        "item_table": "sharded" if sharded_items else "dense",
        "offload": offload,
        "gpus": gpus,
        "parameters_total": size.total,
        "parameters_trainable": size.trainable,
        "params_gib": params / gib,
        "grads_gib": grads / gib,
        "optimizer_gib": optim / gib,
        "activations_gib": activations / gib,
        "item_table_gib": table / gib,
        "total_per_gpu_gib": total / gib,
        "cpu_offload_gib_per_node": cpu / gib,
    }


def format_plan(rows: list[dict]) -> str:
    head = (
        f"{'strategy':<9} {'items':<8} {'offload':<17} {'params':>8} {'grads':>8} {'optim':>8} {'table':>8} "
        f"{'activ':>8} {'total/GPU':>10} {'CPU':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['strategy']:<9} {r['item_table']:<8} {r['offload']:<17} {r['params_gib']:>7.2f}G "
            f"{r['grads_gib']:>7.2f}G {r['optimizer_gib']:>7.2f}G {r['item_table_gib']:>7.2f}G "
            f"{r['activations_gib']:>7.2f}G {r['total_per_gpu_gib']:>9.2f}G {r['cpu_offload_gib_per_node']:>7.2f}G"
        )
    return "\n".join(lines)


def recommend(rows: list[dict], gpu_gib: float) -> dict | None:
    """The least partitioned strategy that fits (communication grows with the stage), if any."""
    fits = [r for r in rows if r["total_per_gpu_gib"] <= 0.9 * gpu_gib]
    return fits[0] if fits else None
