#!/usr/bin/env bash
# The long fuzz run (issue 22): mutate every input engram reads and run the release binary on
# each, for SECONDS (default 1800), with SEED (default: the date). Failing inputs are saved under
# tests/fuzz-regressions/TARGET/, which `cargo test` replays from then on (fuzz::regressions).
#   scripts/fuzz.sh [SECONDS] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-1800}"
seed="${2:-$(date +%Y%m%d)}"
ENGRAM_FUZZ_SECS="$secs" ENGRAM_FUZZ_SEED="$seed" \
  cargo test --release --test all fuzz::long -- --ignored --nocapture
