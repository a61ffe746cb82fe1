#!/usr/bin/env bash
# The benchmarks behind the README's "Measured" table. Run from the repository root after
# `cargo build --release`. They are benchmarks, not tests: numbers depend on the machine.
set -euo pipefail
E=./target/release/engram
CF=../shared/data/counterfact/dev-2000.jsonl
mkdir -p out
$E bench --json out/bench.json
$E locate --prompt "The Eiffel Tower is located in the city of" --subject "The Eiffel Tower" \
  --target " Paris" --method attribution --compare-exact --json out/locate-eiffel.json --plot out/locate-eiffel.svg
# Exact traces with the matmul peak of the same process (the first 12-token prompt of dev-2000 last).
$E locate --prompt "The Eiffel Tower is located in the city of" --subject "The Eiffel Tower" --target " Paris" --peak
$E locate --prompt "The mother tongue of Danielle Darrieux is said to be" --subject "Danielle Darrieux" --target " French" --peak
$E locate --prompt "Anaal Nathrakh, that was created in" --subject "Anaal Nathrakh" --target " Birmingham" --peak
$E locate --prompt "The mother tongue of Danielle Darrieux is said to be" --subject "Danielle Darrieux" \
  --target " French" --method attribution --compare-exact --json out/locate-darrieux.json
$E eval counterfact --data $CF --method rome --layer 5 --n 100 --json out/cf-rome-l5.json --resume out/cf-rome-l5.jsonl
# The same with the reference's 20 context prefixes (our default is 10).
$E eval counterfact --data $CF --spec benches/rome-20-prefixes.yaml --n 100 --json out/cf-rome-l5-20.json --resume out/cf-rome-l5-20.jsonl
# The same with the reference's Adam rate for v* (0.5; ours is 2.0).
$E eval counterfact --data $CF --spec benches/rome-lr05.yaml --n 100 --json out/cf-rome-l5-lr05.json --resume out/cf-rome-l5-lr05.jsonl
$E eval counterfact --data $CF --method ft --layer 5 --n 100 --json out/cf-ft-l5.json --resume out/cf-ft-l5.jsonl
$E edit edits/eiffel-rome.yaml --json out/edit-eiffel.json
# Edits where people run them (issue 21): generation-based, free-generation (WILD-style) and
# re-quantized scores with --out-type auto on the default Q4_1 file and on Q4_K_M / Q8_0 copies
# made by llama.cpp's own quantizer; then the written files in llama.cpp and transformers.
# Needs a Python with llama-cpp-python (and transformers, gguf, torch, accelerate): $PY.
PY=${PY:-python3}
Q41=${ENGRAM_HOME:-$HOME/.cache/engram}/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
if $PY -c "import llama_cpp" 2>/dev/null; then
  for t in Q4_K_M Q8_0; do
    [ -f out/smollm2-135m-$t.gguf ] || $PY - "$Q41" out/smollm2-135m-$t.gguf $t <<'PYEOF'
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
p.allow_requantize = True
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
PYEOF
  done
  $E eval counterfact --data $CF --method rome --n 100 --wild --out-type auto --json out/cf-q4_1-auto.json --resume out/cf-q4_1-auto.jsonl
  $E eval counterfact --model out/smollm2-135m-Q4_K_M.gguf --data $CF --method rome --layer 5 --n 100 --wild --out-type auto \
    --json out/cf-q4_k_m-auto.json --resume out/cf-q4_k_m-auto.jsonl
  for m in "$Q41" out/smollm2-135m-Q4_K_M.gguf out/smollm2-135m-Q8_0.gguf; do
    $PY scripts/real_clients.py --engram $E --model "$m" --spec edits/eiffel-rome.yaml --transformers \
      --json out/clients-eiffel-$(basename "$m" .gguf).json
  done
  for m in "$Q41" out/smollm2-135m-Q4_K_M.gguf; do
    $PY scripts/real_clients.py --engram $E --model "$m" --counterfact $CF --n 100 --json out/clients-cf-$(basename "$m" .gguf).json
  done
fi
# Lifelong editing (issue 24) on CounterFact's whole edit split, batches of 100: plain AlphaEdit
# against AlphaEdit + NAS, each resumable (state in out/, not in git). N=500 is what the README
# reports; N=10000 is the issue's run (many hours here: run it in pieces with --max-batches).
EDIT10K=../shared/data/counterfact/edit-10000.jsonl
N=${LIFELONG_N:-500}
for m in alphaedit alphaedit-nas; do
  $E eval counterfact --data $EDIT10K --method $m --batch-size 100 --sequential --n $N \
    --retention-every 500 --resume out/lifelong-$m-$N.state ${LIFELONG_MAX_BATCHES:+--max-batches $LIFELONG_MAX_BATCHES} \
    --json out/lifelong-$m-$N.json --plot out/lifelong-$m-$N.svg
done
# Unlearning: the demo end to end (learn, audit, unlearn with its receipt, audit, the second
# person, verify), each step timed; then TOFU (about 45 minutes).
t() { local s=$(date +%s.%N); "$@" || [ $? -eq 3 ]; echo "time: $(echo "$(date +%s.%N) - $s" | bc) s: $*" >&2; }
t $E learn forget-sets/mara-quillfeather-data.yaml --optimizer grid --out out/mara-learned.gguf --json out/learn-mara.json
t $E audit forget-sets/mara-quillfeather.yaml --reference none --types q8_0,q4_1 --json out/audit-default-calibrated.json
t $E audit forget-sets/mara-quillfeather.yaml --model out/mara-learned.gguf --types f16,q8_0,q4_1 --json out/audit-learned.json
t $E unlearn forget-sets/mara-quillfeather.yaml --model out/mara-learned.gguf --types f16,q8_0,q4_1 --json out/unlearn-mara.json
t $E audit forget-sets/tobias-wrenfield.yaml --model out/mara-quillfeather-unlearned.gguf --types none --json out/audit-tobias.json
t $E receipt verify out/mara-quillfeather.receipt.json --model out/mara-quillfeather-unlearned.gguf
# The closed-form rewrite on the same learned model: local, and what its audit finds.
t $E unlearn forget-sets/mara-quillfeather-rewrite.yaml --model out/mara-learned.gguf --types q8_0,q4_1,q4_0 --json out/unlearn-mara-rewrite.json
t $E audit forget-sets/tobias-wrenfield.yaml --model out/mara-quillfeather-rewrite-unlearned.gguf --types none --json out/audit-tobias-rewrite.json
# The learned and unlearned models against the default one (KL, top-1, perplexity).
$E eval compare --edited out/mara-learned.gguf --json out/compare-learned.json
$E eval compare --base out/mara-learned.gguf --edited out/mara-quillfeather-unlearned.gguf --json out/compare-unlearned.json
# Learning with the keep set (KL to the model's own answers on CounterFact prompts), and the
# demo request on that file.
t $E learn forget-sets/mara-quillfeather-data.yaml --optimizer grid --keep ../shared/data/counterfact/dev-2000.jsonl \
  --out out/mara-learned-keep.gguf --json out/learn-mara-keep.json
$E eval compare --edited out/mara-learned-keep.gguf --json out/compare-learned-keep.json
t $E unlearn forget-sets/mara-quillfeather.yaml --model out/mara-learned-keep.gguf --types f16,q8_0,q4_1 \
  --out out/mara-keep-unlearned.gguf --receipt out/mara-keep.receipt.json --json out/unlearn-mara-keep.json
# Knowledge from pre-training: the default model knows who wrote The Lord of the Rings.
t $E audit forget-sets/pretrained-tolkien.yaml --types f16,q8_0,q4_1,q4_0 --json out/audit-tolkien.json
t $E unlearn forget-sets/pretrained-tolkien.yaml --types f16,q8_0,q4_1,q4_0 --json out/unlearn-tolkien.json
# TOFU with open-unlearning's metrics on the dev authors: forget 0-1, retain 2-9, holdout
# 10-11 (all from the perturbed file); finetuned, retain model, NPO / SimNPO / RMU.
TP=../shared/data/tofu/authors-0-19-perturbed.jsonl
t $E eval tofu --forget $TP --forget-authors 0-1 --retain $TP --retain-authors 2-9 \
  --holdout $TP --holdout-authors 10-11 --world ../shared/data/tofu/world_facts_perturbed.jsonl \
  --json out/tofu.json
# Mass editing: one MEMIT batch of 100 from the unedited model, at our Adam rate and the reference's.
$E eval counterfact --data $CF --method memit --batch-size 100 --n 100 --json out/cf-memit100.json
$E eval counterfact --data $CF --spec benches/memit-lr05.yaml --batch-size 100 --n 100 --json out/cf-memit100-lr05.json
# ROME one edit at a time on one model (about 20 minutes).
$E eval counterfact --data $CF --method rome --layer 5 --batch-size 20 --sequential --n 200 \
  --json out/cf-rome-seq200.json --plot out/cf-rome-seq200.svg
# 1000 edits in sequential batches of 100 (40 minutes to an hour each).
$E eval counterfact --data $CF --method memit --batch-size 100 --sequential --n 1000 \
  --json out/cf-memit-seq1000.json --plot out/cf-memit-seq1000.svg
$E eval counterfact --data $CF --method alphaedit --batch-size 100 --sequential --n 1000 \
  --json out/cf-alphaedit-seq1000.json --plot out/cf-alphaedit-seq1000.svg
# ROME one edit at a time over 1000 cases, retention every 100 (about 80 minutes).
$E eval counterfact --data $CF --method rome --layer 5 --batch-size 100 --sequential --n 1000 \
  --json out/cf-rome-seq1000.json --plot out/cf-rome-seq1000.svg
# AlphaEdit's default rate is 0.5 already; the spec states it for the record.
$E eval counterfact --data $CF --spec benches/alphaedit-lr05.yaml --batch-size 100 --sequential --n 1000 \
  --json out/cf-alphaedit-seq1000-lr05.json --plot out/cf-alphaedit-seq1000-lr05.svg
# How much of a ROME edit the bare prompt receives (u.k / u.k*), plain-mean k* vs bare weight 0.5.
for env in "PREFIXES=20" "PREFIXES=20 HALF=1" "PREFIXES=10" "HALF=1"; do
  env $env cargo run --release --example key_ratio -- "Veracode, whose headquarters are in" Veracode
done
# One step of the v* search (forward and backward of layers 5.. on 22 rows x 8 positions):
# time in attention and in the linear maps against the whole blocks.
cargo run --release --example step_profile -- 22 8 22 5 5
# MEMIT's λ and AlphaEdit's null-space threshold on the ten facts of edits/memit-ten.yaml.
cargo run --release --example mass_sweep -- memit:15000 memit:5000 memit:3000 memit:1000 \
  alphaedit:0.02:10 alphaedit:0.01:1 alphaedit:0.005:0.1
# The value search alone (z at layer 6 for MEMIT, v* at layer 5 for ROME) on CounterFact cases.
cargo run --release --example zsearch_bench -- memit 48
cargo run --release --example zsearch_bench -- rome 8
# Matrix-product rates for a block's shapes against the square peak, one process: why the MLP
# runs in blocks of 512 positions when nothing differentiates (8192 rows: whole vs blocks).
cargo run --release --example gemm_shapes -- 8192
# Key statistics from a fresh cache: sampling 200 x 128 tokens, then the layer-5 keys.
H=$(mktemp -d); mkdir -p "$H/models"
ln -s "${ENGRAM_HOME:-$HOME/.cache/engram}/models/smollm2-135m" "$H/models/"
ENGRAM_HOME=$H $E stats --layer 5
# Peer: ROME's own causal tracing code on the 12-token prompt above, when a checkout of
# github.com/kmeng01/rome is given in $ROME (needs torch, transformers, gguf, accelerate and
# matplotlib from PyPI; see scripts/reference_trace.py).
if [ -n "${ROME:-}" ]; then
  python3 scripts/reference_trace.py --rome "$ROME" \
    --gguf "${ENGRAM_HOME:-$HOME/.cache/engram}/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf" \
    --prompt "Anaal Nathrakh, that was created in" --subject "Anaal Nathrakh" --noise 0.4067
fi
