#!/usr/bin/env bash
# `make demo`: the main job end to end on data it generates itself:
# synthesise a behaviour log -> shard -> fine-tune SmolLM2 (first 2 blocks, LoRA) for a short
# budget -> evaluate against the popularity baseline -> top-5 next items for a few users ->
# export and serve: one event through the HTTP API changes the next recommendation.
set -euo pipefail
out=${1:-demo_out}
bgpt=.venv/bin/bgpt
export HF_HUB_OFFLINE=1
rm -rf "$out"
mkdir -p "$out"

echo "== 1/6 synthesise 150k events (4k users, 1.5k items with titles) =="
$bgpt synth --events 150000 --users 4000 --items 1500 --out "$out/raw/events.csv"

echo "== 2/6 shard (leave-one-out split) and verify =="
$bgpt shard --input "$out/raw/events.csv" --items "$out/raw/items.csv" --out "$out/data" --events-per-shard 40000
$bgpt inspect "$out/data" --verify | tail -1

echo "== 3/6 fine-tune SmolLM2-135M (first 2 blocks) with LoRA for 3 minutes =="
$bgpt train --data "$out/data" --out "$out/run" --num-layers 2 --model.pretrained_weights=true --max-minutes 3 --batch-size 32 \
    --train.eval_every=0 --train.lr=2e-3

echo "== 4/6 test split: model vs popularity (full ranking over all items) =="
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

echo "== 5/6 top-5 next items for three users =="
$bgpt predict --run "$out/run" --users u1,u2,u3 --k 5

echo "== 6/6 export, serve over HTTP, and watch new events change the next recommendation =="
$bgpt export --run "$out/run" --out "$out/model" --merge-lora
port=${BGPT_DEMO_PORT:-8765}
$bgpt serve --model "$out/model" --port "$port" --state "$out/serve.sqlite" --reload-seconds 0 \
    > "$out/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
.venv/bin/python - "$port" "$out/raw/events.csv" "$out/raw/items.csv" <<'PY'
import csv, json, sys, time, urllib.request

url = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(300):
    try:
        urllib.request.urlopen(url + "/healthz", timeout=1)
        break
    except OSError:
        time.sleep(0.2)
else:
    sys.exit("the server did not start (see serve.log)")


def post(path, body):
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(req) as resp:
        return json.load(resp), (time.perf_counter() - started) * 1000


rows = sorted((r for r in csv.DictReader(open(sys.argv[2])) if r["user_id"] == "u7"), key=lambda r: int(r["timestamp"]))
items = {r["item_id"]: (r["title"], r["category"]) for r in csv.DictReader(open(sys.argv[3]))}
events = [{"item": r["item_id"], "event_type": r["event_type"], "timestamp": int(r["timestamp"])} for r in rows[-20:]]
post("/v1/events", {"user": "u7", "events": events})
before, ms = post("/v1/recommend", {"user": "u7", "k": 5})
print(f"u7, {len(events)} events, mostly {', '.join(sorted({items[e['item']][1] for e in events}))} ({ms:.1f} ms):")
for i in before["items"]:
    print(f"    {i['title']}")
# Three views in a category the user never touched: the next recommendation follows at once.
seen = {items[e["item"]][1] for e in events}
new = sorted({c for _, c in items.values()} - seen)[0]
picks = [i for i, (_, c) in items.items() if c == new][:3]
t = events[-1]["timestamp"]
for n, item in enumerate(picks, 1):
    _, ms_event = post("/v1/events", {"user": "u7", "events": [{"item": item, "event_type": "view", "timestamp": t + 60 * n}]})
after, ms = post("/v1/recommend", {"user": "u7", "k": 5})
print(f"u7 then views {', '.join(items[i][0] for i in picks)} (last event {ms_event:.1f} ms, recommend {ms:.1f} ms):")
for i in after["items"]:
    print(f"    {i['title']}")
PY
