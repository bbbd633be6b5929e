#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 30 s each) from the seed corpus in
# fuzz/corpus/, with cargo-fuzz on the nightly toolchain. New corpus entries stay in
# fuzz/corpus/<target>/; crashes land in fuzz/artifacts/<target>/ and fail the script.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-30}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for t in frame session ram_packet device control guest_state; do
    echo "== fuzzing $t for ${secs}s"
    mkdir -p "corpus/$t"
    cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048
done
