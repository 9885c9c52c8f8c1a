#!/usr/bin/env bash
# `make demo`: the main job end to end on data it generates itself:
# synthesise a behaviour log -> shard -> fine-tune SmolLM2 (first 2 blocks, LoRA) for a short
# budget -> evaluate against the popularity baseline -> top-5 next items for a few users.
set -euo pipefail
out=${1:-demo_out}
bgpt=.venv/bin/bgpt
export HF_HUB_OFFLINE=1
rm -rf "$out"
mkdir -p "$out"

echo "== 1/5 synthesise 150k events (4k users, 1.5k items with titles) =="
$bgpt synth --events 150000 --users 4000 --items 1500 --out "$out/raw/events.csv"

echo "== 2/5 shard (leave-one-out split) and verify =="
$bgpt shard --input "$out/raw/events.csv" --items "$out/raw/items.csv" --out "$out/data" --events-per-shard 40000
$bgpt inspect "$out/data" --verify | tail -1

echo "== 3/5 fine-tune SmolLM2-135M (first 2 blocks) with LoRA for 3 minutes =="
$bgpt train --data "$out/data" --out "$out/run" --num-layers 2 --max-minutes 3 --batch-size 32 \
    --train.eval_every=0 --train.lr=2e-3

echo "== 4/5 test split: model vs popularity (full ranking over all items) =="
$bgpt baseline popularity --data "$out/data" > "$out/popularity.json"
.venv/bin/python - "$out/run/metrics.json" "$out/popularity.json" <<'PY'
import json, sys
model, pop = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
print(f"{'':12}{'HR@10':>8}{'NDCG@10':>9}{'MRR':>8}{'coverage@10':>13}")
for name, m in (("model", model), ("popularity", pop)):
    print(f"{name:12}{m['hr@10']:8.4f}{m['ndcg@10']:9.4f}{m['mrr']:8.4f}{m['coverage@10']:13.4f}")
if model["ndcg@10"] <= pop["ndcg@10"]:
    sys.exit("the model did not beat the popularity baseline")
print(f"model / popularity NDCG@10: {model['ndcg@10'] / pop['ndcg@10']:.2f}x")
PY

echo "== 5/5 top-5 next items for three users =="
$bgpt predict --run "$out/run" --users u1,u2,u3 --k 5
