#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 30 s each) from the seed corpus in
# fuzz/corpus/: the same run as CI's, on the stable toolchain (see ci.sh). Crashes land in
# fuzz/artifacts/<target>/ and fail the script. cargo-fuzz works on these targets too (from
# fuzz/: `cargo fuzz run --sanitizer none frame` on stable, or with AddressSanitizer on nightly).
exec "$(dirname "$0")/ci.sh" "$@"
