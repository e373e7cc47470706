#!/usr/bin/env bash
# Runs one fuzz target for ${FUZZ_SECONDS:-60} seconds over a copy of its committed corpus, so
# that the inputs it adds stay out of the source tree. Fails on a crash, a leak, a sanitizer
# report or a broken invariant; the input that did it is left under WORK_DIR/artifacts.
# Usage: run_fuzzer.sh TARGET_BINARY CORPUS_DIR WORK_DIR MAX_LEN [LIBFUZZER_OPTION...]
set -euo pipefail
binary=$1
corpus=$2
work=$3
max_len=$4
shift 4
rm -rf "$work"
mkdir -p "$work/corpus" "$work/artifacts"
cp "$corpus"/* "$work/corpus/"
exec "$binary" -max_total_time="${FUZZ_SECONDS:-60}" -max_len="$max_len" -rss_limit_mb=2048 \
  -timeout=10 -print_final_stats=1 -artifact_prefix="$work/artifacts/" "$@" "$work/corpus"
