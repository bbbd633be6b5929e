#!/usr/bin/env bash
# Runs every fuzz target (each [[bin]] of fuzz/Cargo.toml but gen_corpus) for a bounded time,
# on the stable toolchain, with no cargo-fuzz and no nightly: the targets are built by plain
# cargo with the same coverage instrumentation cargo-fuzz asks rustc for (stable -C flags),
# and libfuzzer-sys builds libFuzzer itself from C++ source with the machine's C++ compiler.
#
#   fuzz/ci.sh [SECONDS_PER_TARGET [TARGET...]]
#
# SECONDS_PER_TARGET defaults to 30: seven targets, 3.5 minutes of fuzzing (plus the build, about
# 2.5 minutes from nothing on 2 cores). Naming targets runs only those.
#
# Seeds are read from fuzz/corpus/<target>/ (written by gen_corpus, committed) and never
# written; inputs that reach new coverage are kept in target/fuzz/corpus/<target>/ for the next
# run. The build has its own target dir, target/fuzz/, apart from the workspace's. A crash (a
# panic, a failed assertion, an arithmetic overflow, a timeout or an out-of-memory in a decoder)
# is written to fuzz/artifacts/<target>/; the script then prints its path, the command that
# replays it and the end of the target's output, and exits 1 once every target has run.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
secs=${1:-30}
[[ $secs =~ ^[1-9][0-9]*$ ]] || { echo "usage: fuzz/ci.sh [SECONDS_PER_TARGET [TARGET...]]" >&2; exit 2; }

# libfuzzer-sys compiles libFuzzer (C++17): it needs a C++ compiler.
if ! command -v c++ >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++
fi

mapfile -t targets < <(awk '/^\[\[bin\]\]/ { b = 1; next }
    b && /^name *=/ { gsub(/.*= *"|".*/, ""); if ($0 != "gen_corpus") print; b = 0 }' fuzz/Cargo.toml)
((${#targets[@]})) || { echo "no fuzz targets found in fuzz/Cargo.toml" >&2; exit 2; }
if (($# > 1)); then
    for t in "${@:2}"; do
        [[ " ${targets[*]} " == *" $t "* ]] || { echo "no fuzz target $t (${targets[*]})" >&2; exit 2; }
    done
    targets=("${@:2}")
fi

# The flags cargo-fuzz gives rustc with `--sanitizer none`, all stable; plus debug assertions
# and overflow checks, so that a decoder's arithmetic on peer-given lengths is checked too.
# With --target, RUSTFLAGS reach only the target's code, not build scripts or proc macros.
export CARGO_TARGET_DIR="$root/target/fuzz"
unset CARGO_ENCODED_RUSTFLAGS
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 -Cllvm-args=-sanitizer-coverage-stack-depth \
 -Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
 -Cdebug-assertions -Coverflow-checks"
triple=$(rustc -vV | sed -n 's/^host: //p')
bin_args=()
for t in "${targets[@]}"; do bin_args+=(--bin "$t"); done
echo "== building ${#targets[@]} fuzz targets ($triple, $(rustc --version))"
start=$SECONDS
cargo build --manifest-path fuzz/Cargo.toml --release --target "$triple" \
    --config 'profile.release.debug="line-tables-only"' "${bin_args[@]}"
echo "== built in $((SECONDS - start)) s; fuzzing each target for ${secs} s"
bindir="$CARGO_TARGET_DIR/$triple/release"

failed=()
summary=()
for t in "${targets[@]}"; do
    seeds="$root/fuzz/corpus/$t"
    corpus="$CARGO_TARGET_DIR/corpus/$t"
    artifacts="$root/fuzz/artifacts/$t"
    log="$CARGO_TARGET_DIR/logs/$t.log"
    mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
    dirs=("$corpus")
    if [[ -d $seeds ]]; then
        dirs+=("$seeds")
    else
        echo "warning: no seed corpus $seeds (run gen_corpus); fuzzing from nothing"
    fi
    echo "== fuzzing $t for ${secs} s"
    start=$SECONDS
    rc=0
    # libFuzzer stops itself after max_total_time; the outer timeout only guards against a
    # fuzzer that does not. One input running 10 s counts as a hang, i.e. a crash.
    timeout -k 10 $((secs * 2 + 60)) "$bindir/$t" "${dirs[@]}" \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" >"$log" 2>&1 || rc=$?
    took=$((SECONDS - start))
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -n 1 | cut -d' ' -f2 || true)
    if ((rc == 0)); then
        line=$(printf '%-12s %4d s  %10s runs  cov %5s  corpus %5d  ok' \
            "$t" "$took" "${runs:-?}" "${cov:-?}" "$(find "$corpus" -type f | wc -l)")
        echo "   $line"
        summary+=("$line")
    else
        failed+=("$t")
        summary+=("$(printf '%-12s %4d s  %10s runs  cov %5s  FAILED (exit %d)' \
            "$t" "$took" "${runs:-?}" "${cov:-?}" "$rc")")
        echo "!! $t failed (exit $rc) after ${took} s; full output: $log"
        found=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log")
        if [[ -n $found ]]; then
            while read -r f; do
                echo "!! crash input: $f"
                echo "!!   replay: RUST_BACKTRACE=1 $bindir/$t $f"
            done <<<"$found"
        else
            echo "!! no crash input was written (the fuzzer itself failed?)"
        fi
        if grep -q 'panicked at' "$log"; then
            echo "!! panic:"
            grep -m 2 -A 1 'panicked at' "$log" | sed 's/^/   | /'
        fi
        echo "!! last lines of $t's output (backtrace frames left out):"
        grep -v -E '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)|^ +([0-9]+: |at )' "$log" |
            tail -n 30 | sed 's/^/   | /'
    fi
done

echo "== fuzzing summary (${secs} s per target)"
printf '   %s\n' "${summary[@]}"
if ((${#failed[@]})); then
    echo "fuzzing FAILED: ${failed[*]} (crash inputs under fuzz/artifacts/)"
    exit 1
fi
echo "fuzzing passed: ${#targets[@]} targets, no crash"
