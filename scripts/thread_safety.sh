#!/usr/bin/env bash
# Builds every library with clang 14, whose -Wthread-safety checks the lock annotations
# (ABSL_GUARDED_BY, ABSL_EXCLUSIVE_LOCKS_REQUIRED) of our code: a shared field touched without
# the mutex that guards it, or a helper called without the lock it requires, fails the build.
# Into ${TSA_BUILD_DIR:-build-tsa}; scripts/test.sh runs it after the main tests.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${TSA_BUILD_DIR:-build-tsa}
# Debug (-O0): the analysis is the same at every level, and -O0 compiles fastest.
CXX=clang++-14 cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Debug -DBUILD_TESTING=OFF >/dev/null
cmake --build "$build_dir" -j"$(nproc)" --target master_core master_store master_rpc worker_core worker client
echo "thread-safety analysis: clean"
