"""The item table alone at catalogue scale: TorchRec row-wise sharded vs the dense DDP table.

    python benchmarks/catalogue_table_bench.py            # results/catalogue_table.json / .md
    python benchmarks/catalogue_table_bench.py --sizes 1000000 --steps 5   # quick look (the default: 6 minutes)

Two gloo ranks on this machine, hidden 64, each rank its own batch of 128 windows of 50 history
items plus 256 uniform negatives (the Sports recipe's sampled-softmax shape). A step looks the rows
up, scores each window's mean history row against its last item and the negatives (a stand-in
for the transformer: the table is what is measured), and updates:

- dense: ``nn.Embedding`` under DDP with AdamW, as ``trainer.model.ItemEncoder`` trains today
  (dense gradient, all-reduced, two Adam moments per row);
- sharded: ``trainer.sharded_table.ShardedItemTable`` (TorchRec row-wise sharding, FBGEMM fused
  row-wise Adagrad: only the rows a step reads are moved and updated).

Per-rank peak RSS (the larger of the two ranks) and median step seconds after 3 warm-up steps.
A dense size whose table, gradient and Adam state alone (4 copies per rank, plus DDP's gradient
buckets) would not fit the machine's memory on 2 ranks is not started (it would be OOM-killed,
taking other jobs with it): its estimate is recorded instead. This is the table's part of issue
20's goal; the full model on a sharded table is the next step (not built yet).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dist_bench import free_port
from shard_bench import REPO, machine, write_results

HIDDEN, BATCH, WINDOW, NEGATIVES, RANKS = 64, 128, 50, 256, 2


def _step_loss(rows, dim: int):
    import torch

    hist = rows[: BATCH * WINDOW].view(BATCH, WINDOW, dim)
    user, target, negatives = hist[:, :-1].mean(1), hist[:, -1], rows[BATCH * WINDOW :]
    logits = torch.cat([(user * target).sum(-1, keepdim=True), user @ negatives.T], 1)
    return torch.nn.functional.cross_entropy(logits, torch.zeros(BATCH, dtype=torch.long))


def rank_main(rank: int, mode: str, items: int, steps: int, port: str, out: str) -> None:
    """One rank: build the table, run the steps, write its figures to ``out.<rank>``."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    from trainer.runtime import before_process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    before_process_group()
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    if mode == "sharded":
        from trainer.sharded_table import ShardedItemTable

        table, optimizer = ShardedItemTable(items, HIDDEN, lr=0.01), None
    else:
        embedding = torch.nn.Embedding(items, HIDDEN)
        torch.nn.init.normal_(embedding.weight, std=0.02)
        table = torch.nn.parallel.DistributedDataParallel(embedding)
        optimizer = torch.optim.AdamW(table.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, items, (BATCH * WINDOW + NEGATIVES,), generator=generator)
        start = time.perf_counter()
        loss = _step_loss(table(ids), HIDDEN)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(f"{out}.{rank}").write_text(
        json.dumps({"rss_gib": rss, "step_s": statistics.median(times[3:]), "loss": float(loss)})
    )
    dist.destroy_process_group()


def measure(mode: str, items: int, steps: int) -> dict:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/rank"
        code = (
            "import sys, torch.multiprocessing as mp; sys.path.insert(0, sys.argv[1]); "
            "from catalogue_table_bench import rank_main; "
            "mp.spawn(rank_main, args=tuple(sys.argv[2:3]) + (int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]), nprocs=2)"
        )
        args = [str(Path(__file__).parent), mode, str(items), str(steps), port, out]
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} {items:,} items failed:\n{proc.stderr[-3000:]}")
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(RANKS)]
    return {"rss_gib": max(r["rss_gib"] for r in ranks), "step_s": max(r["step_s"] for r in ranks)}


def dense_estimate_gib(items: int) -> float:
    """A lower bound per rank: weights, gradient, 2 Adam moments and DDP's bucket copy of the
    gradient (5 table copies; measured at 5M items: 8.67 GiB, about 7 copies, AdamW's foreach
    temporaries included)."""
    return items * HIDDEN * 4 * 5 / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,5000000,10000000,50000000")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--name", default="catalogue_table")
    args = parser.parse_args()
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    metrics: dict[str, float] = {}
    rows = [
        "| items | dense DDP + AdamW: peak RSS / rank | sharded (TorchRec RW + row-wise Adagrad): peak RSS / rank | dense step s | sharded step s |",
        "|---|---|---|---|---|",
    ]
    for items in [int(s) for s in args.sizes.split(",")]:
        tag = f"{items // 1_000_000}m"
        sharded = measure("sharded", items, args.steps)
        metrics |= {
            f"sharded_peak_rss_gib_{tag}": round(sharded["rss_gib"], 3),
            f"sharded_step_s_{tag}": round(sharded["step_s"], 4),
        }
        estimate = dense_estimate_gib(items)
        if RANKS * estimate > 0.8 * total_gib:
            metrics[f"dense_estimated_rss_gib_{tag}"] = round(estimate, 2)
            dense_cells = [
                f"not started: needs over {estimate:.1f} GiB per rank, {RANKS} ranks exceed {total_gib:.0f} GiB",
                "-",
            ]
        else:
            dense = measure("dense", items, args.steps)
            metrics |= {
                f"dense_peak_rss_gib_{tag}": round(dense["rss_gib"], 3),
                f"dense_step_s_{tag}": round(dense["step_s"], 4),
            }
            metrics[f"rss_ratio_{tag}"] = round(sharded["rss_gib"] / dense["rss_gib"], 3)
            dense_cells = [f"{dense['rss_gib']:.2f} GiB", f"{dense['step_s']:.3f}"]
        rows.append(
            f"| {items:,} | {dense_cells[0]} | {sharded['rss_gib']:.2f} GiB | {dense_cells[1]} | {sharded['step_s']:.3f} |"
        )
        print(rows[-1], flush=True)
    command = "python benchmarks/catalogue_table_bench.py" + "".join(
        f" --{name} {value}" for name, value in vars(args).items() if value != parser.get_default(name)
    )
    result = {
        "benchmark": "catalogue_table",
        "dataset": f"uniform random item ids, {RANKS} gloo ranks, hidden {HIDDEN}, {BATCH}x{WINDOW} history + {NEGATIVES} negatives per rank",
        "command": command,
        "machine": machine(),
        "metrics": metrics,
        "goal": "issue 20 (table part): per-rank peak RSS of the sharded table <= 0.6x the dense DDP table at 10M items; 50M items train",
    }
    markdown = [f"# catalogue table: sharded vs dense, {RANKS} ranks\n", f"`{command}` on {machine()}\n", *rows, ""]
    write_results(args.name, result, markdown)


if __name__ == "__main__":
    main()
