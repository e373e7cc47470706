#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz (clang 14, ASan and UBSan) into
# ${FUZZ_BUILD_DIR:-build-fuzz} and runs each for ${FUZZ_SECONDS:-60} seconds over a copy of its
# corpus, failing if one finds a crash, a sanitizer report or a broken invariant; the input that
# did it is then under build-fuzz/tests/fuzz/<target>.work/artifacts. scripts/test.sh runs it
# after the main tests.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${FUZZ_BUILD_DIR:-build-fuzz}
CC=clang-14 CXX=clang++-14 cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DTASKMASTER_FUZZ=ON >/dev/null
cmake --build "$build_dir" -j"$(nproc)" --target fuzz
cd "$build_dir"
ctest --output-on-failure -L fuzz -j"$(nproc)"
