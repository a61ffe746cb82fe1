#!/usr/bin/env bash
# The scale benchmark (issue 25): synthetic checkpoints with real block shapes, and the default
# model, in each weight mode that fits. Run from the repository root after `cargo build --release`.
# A benchmark, not a test: numbers depend on the machine and on what else it runs. Run it on
# an idle machine; it takes hours for the 8B shape (see README "Models people run").
#
# Per model and mode it records (out/scale/*.log, *.json):
#   load time and peak RSS (`inspect`; the synthetic file is written first, by `model synth`), prefill tokens/s and the fraction of the matmul peak
#   measured in the same process (`bench`), `generate` peak RSS, one ROME edit and one MEMIT
#   batch of 10 with key statistics from a corpus (`benches/scale-*.yaml`), time and peak RSS.
# FLOPs of a forward pass: about 2 x parameters x tokens (`inspect` prints the parameters).
set -euo pipefail
cp ./target/release/engram /tmp/engram-scale
E=/tmp/engram-scale
SHAPES=${SCALE_SHAPES:-"llama-3.2-1b:q4_k_m llama-3.2-1b:q8_0 llama-3.2-1b:f16 qwen2.5-3b:q4_k_m llama-3.1-8b:q4_k_m"}
DIR=${SCALE_DIR:-target/scale}
mkdir -p "$DIR" out/scale
# The statistics corpus: 400 TOFU retain question-answer pairs, one document per line.
python3 - "$DIR/corpus.txt" <<'PYEOF'
import json, sys
with open(sys.argv[1], "w") as out:
    for i, line in enumerate(open("../shared/data/tofu/retain90.jsonl")):
        if i == 400:
            break
        r = json.loads(line)
        out.write((r["question"] + " " + r["answer"]).replace("\n", " ") + "\n")
PYEOF
Q41=${ENGRAM_HOME:-$HOME/.cache/engram}/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
run() { # name mode model
  local tag="$1-$2" m="$3" w="--weights $2"
  /usr/bin/time -f "load: %e s, peak RSS %M KB" $E $w inspect --model "$m" > "out/scale/$tag-inspect.log" 2>&1
  $E $w bench --model "$m" --json "out/scale/$tag-bench.json" > "out/scale/$tag-bench.log" 2>&1
  /usr/bin/time -f "generate: %e s, peak RSS %M KB" $E $w generate --model "$m" \
    --prompt "The Eiffel Tower is located in the city of" --max-new-tokens 16 > "out/scale/$tag-generate.log" 2>&1
  /usr/bin/time -f "rome: %e s, peak RSS %M KB" $E $w edit benches/scale-rome.yaml --model "$m" --no-locality \
    --out "$DIR/$tag-rome.gguf" --patch "$DIR/$tag-rome.patch" --json "out/scale/$tag-rome.json" > "out/scale/$tag-rome.log" 2>&1
  /usr/bin/time -f "memit: %e s, peak RSS %M KB" $E $w edit benches/scale-memit.yaml --model "$m" --no-locality \
    --out "$DIR/$tag-memit.gguf" --patch "$DIR/$tag-memit.patch" --json "out/scale/$tag-memit.json" > "out/scale/$tag-memit.log" 2>&1
  rm -f "$DIR/$tag-rome.gguf" "$DIR/$tag-memit.gguf"
  tail -qn1 out/scale/$tag-{inspect,generate,rome,memit}.log
}
for mode in f32 stored stored-kernel; do run smollm2-135m $mode "$Q41"; done
for s in $SHAPES; do
  like=${s%%:*} ty=${s##*:} f="$DIR/$like-$ty.gguf"
  [ -f "$f" ] || $E model synth --like "$like" --type "$ty" --out "$f" --json "out/scale/$like-$ty-synth.json"
  # stored-kernel: generation (and so ROME's context prefixes) takes the integer kernel;
  # every other product dequantizes, as in `stored`.
  run "$like-$ty" stored-kernel "$f"
  # The f32 path needs 4 bytes per parameter: only where that fits in memory.
  case "$like" in llama-3.2-1b) run "$like-$ty" f32 "$f" ;; esac
done
