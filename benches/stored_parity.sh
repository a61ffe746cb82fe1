#!/usr/bin/env bash
# Issue 25's parity check: ROME on the first N CounterFact dev cases (default 20) with
# `--weights stored` and with the f32 path, then every per-case field compared (probabilities,
# ES/PS/NS outcomes, generated texts, re-quantized scores; timings skipped). Run from the
# repository root after `cargo build --release`. The key statistics are computed by the first
# run and read by the second (the fingerprint hashes dequantized values, so it is the same).
set -euo pipefail
N=${N:-20}
cp ./target/release/engram /tmp/engram-parity
mkdir -p out
for w in stored f32; do
  rm -f "out/parity-$w.jsonl"
  /tmp/engram-parity --weights $w eval counterfact --data ../shared/data/counterfact/dev-2000.jsonl \
    --method rome --layer 5 --n "$N" --no-locality --resume "out/parity-$w.jsonl" \
    --json "out/parity-$w.json" > "out/parity-$w.log" 2>&1
done
python3 - out/parity-f32.jsonl out/parity-stored.jsonl <<'PYEOF'
import json, sys
def rows(p):
    return {r["case_id"]: r for r in (json.loads(l) for l in open(p) if l.strip())}
def flat(x, pre=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from flat(v, f"{pre}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from flat(v, f"{pre}[{i}]")
    else:
        yield pre, x
a, b = rows(sys.argv[1]), rows(sys.argv[2])
fields = differ = 0
for cid in sorted(a):
    fb = dict(flat(b.get(cid, {})))
    for k, v in flat(a[cid]):
        if "seconds" in k or "eval_split" in k:
            continue
        fields += 1
        if fb.get(k) != v:
            differ += 1
            print("case", cid, k, v, fb.get(k))
print(f"{len(a)} cases, {fields} fields compared, {differ} differ")
sys.exit(1 if differ or set(a) != set(b) else 0)
PYEOF
