#!/usr/bin/env bash
# `make demo`: the main job end to end on data it generates itself.
# Today: synthesise a behaviour log -> shard it -> inspect and verify. Training joins when the trainer lands.
set -euo pipefail
out=${1:-demo_out}
bgpt=.venv/bin/bgpt
rm -rf "$out"
mkdir -p "$out"
echo "== 1/4 synthesise 500k events (8k users, 3k items) =="
$bgpt synth --events 500000 --users 8000 --items 3000 --out "$out/raw/events.csv"
echo "== 2/4 shard (leave-one-out split) =="
$bgpt shard --input "$out/raw/events.csv" --items "$out/raw/items.csv" --out "$out/data" --events-per-shard 125000
echo "== 3/4 append a new generation (20k more events) =="
$bgpt synth --events 20000 --users 2000 --items 3000 --seed 1 --out "$out/raw/new.csv" --items-out "$out/raw/new_items.csv"
$bgpt shard --append --input "$out/raw/new.csv" --out "$out/data"
echo "== 4/4 inspect and verify every shard =="
$bgpt inspect "$out/data" --verify
