#!/usr/bin/env bash
# Installs what is missing, builds, and runs every test through ctest; then checks the lock
# annotations with clang (scripts/thread_safety.sh), runs the unit, store and integration tests
# again under UBSan (scripts/ubsan.sh), and each fuzz target for FUZZ_SECONDS (scripts/fuzz.sh).
# FAST=1 in the environment, or --fast, skips those three for day-to-day work; other arguments go
# to the main ctest run.
set -euo pipefail
cd "$(dirname "$0")/.."
fast=${FAST:-0}
ctest_args=()
for arg in "$@"; do
  if [ "$arg" = --fast ]; then fast=1; else ctest_args+=("$arg"); fi
done
./scripts/deps.sh
./scripts/build.sh
(cd "${BUILD_DIR:-build}" && ctest --output-on-failure --timeout 300 -j"$(nproc)" "${ctest_args[@]}")
if [ "$fast" = 1 ]; then exit 0; fi
./scripts/thread_safety.sh
./scripts/ubsan.sh
./scripts/fuzz.sh
