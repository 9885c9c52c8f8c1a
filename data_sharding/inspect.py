"""`bgpt inspect`: a readable summary of a dataset, and `--verify` of every shard's checksum."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_sharding import shards, storage


def summary(root: Path) -> dict:
    """Key facts of the dataset at ``root`` (from its manifest, users table and shard indexes)."""
    manifest = shards.load_manifest(root)
    users = storage.read_parquet(root, manifest["vocab"]["files"]["users"], columns=["n_events"])
    lengths = users["n_events"].to_numpy()
    lengths = lengths[lengths > 0]
    gens = []
    for g in manifest["generations"]:
        gens.append(
            {
                "generation": g["generation"],
                "shards": len(g["shards"]),
                "users": g["counts"]["users_in_shards"],
                "events": g["counts"]["events_in_shards"],
                "new_events": g["counts"]["new_events"],
                "new_items": g["counts"]["new_items"],
                "quarantined": g["counts"]["quarantined"],
                "duplicates": g["counts"]["duplicates"],
                "bytes": sum(s["bytes"] for s in g["shards"]),
                "created": g["created"],
                "quarantine_by_reason": g["quarantine"]["by_reason"],
            }
        )
    return {
        "dataset": str(root),
        "schema_version": manifest["schema_version"],
        "generation": manifest["generation"],
        "split": manifest["split"],
        "vocab_version": manifest["vocab"]["version"],
        "num_items": manifest["vocab"]["num_items"],
        "num_reserved_items": manifest["vocab"]["num_reserved_items"],
        "event_types": manifest["vocab"]["event_types"][1:],
        "users": manifest["totals"]["users"],
        "events": manifest["totals"]["events"],
        "sequence_length": {
            "mean": round(float(lengths.mean()), 2) if len(lengths) else 0,
            "p50": int(np.percentile(lengths, 50)) if len(lengths) else 0,
            "p90": int(np.percentile(lengths, 90)) if len(lengths) else 0,
            "max": int(lengths.max()) if len(lengths) else 0,
        },
        "generations": gens,
    }


def format_summary(info: dict) -> str:
    lines = [
        f"dataset      {info['dataset']}  (schema {info['schema_version']}, generation {info['generation']}, "
        f"split {info['split']['strategy']})",
        f"vocab        {info['vocab_version']}: {info['num_items'] - info['num_reserved_items']:,} items "
        f"(+{info['num_reserved_items']} reserved), event types {', '.join(info['event_types'])}",
        f"latest state {info['users']:,} users, {info['events']:,} events; sequence length mean "
        f"{info['sequence_length']['mean']}, p50 {info['sequence_length']['p50']}, "
        f"p90 {info['sequence_length']['p90']}, max {info['sequence_length']['max']}",
        "",
        f"{'gen':>4} {'shards':>7} {'users':>11} {'events':>13} {'new events':>13} {'new items':>10} "
        f"{'quarantined':>12} {'duplicates':>11} {'MiB':>9}  created",
    ]
    for g in info["generations"]:
        lines.append(
            f"{g['generation']:>4} {g['shards']:>7} {g['users']:>11,} {g['events']:>13,} {g['new_events']:>13,} "
            f"{g['new_items']:>10,} {g['quarantined']:>12,} {g['duplicates']:>11,} {g['bytes'] / 2**20:>9.1f}  "
            f"{g['created']}"
        )
        if g["quarantine_by_reason"]:
            reasons = ", ".join(f"{r} {n:,}" for r, n in g["quarantine_by_reason"].items())
            lines.append(f"{'':>4} quarantine: {reasons}")
    return "\n".join(lines)
