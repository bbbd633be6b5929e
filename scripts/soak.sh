#!/usr/bin/env bash
# Soak: one guest migrated back and forth 100 times between two livemig processes over QMP,
# memory and device state checked each time, threads, fds and RSS checked flat (scripts/soak.py,
# docs/soak.md). Not part of `cargo test`. Bounded: 900 s budget, 120 s per migration.
#
#   scripts/soak.sh                          # 100 iterations, KVM guest if /dev/kvm is usable
#   scripts/soak.sh --iterations 10          # a short run
#   scripts/soak.sh --guest synthetic --transport tcp --json target/soak.json
#   LIVEMIG_BIN=path/to/livemig scripts/soak.sh   # use this binary, build nothing
#
# Builds the release binary (CARGO_TARGET_DIR is honoured), makes the virtualenv
# target/qmp-venv with qemu.qmp if it is missing (as .ci/run does; LIVEMIG_QMP_PYTHON names
# another Python that has it), then runs scripts/soak.py with the arguments given.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"   # paths given in the arguments stay the caller's

if [[ -z "${LIVEMIG_BIN:-}" ]]; then
    cargo build --release -p livemig --manifest-path "$ROOT/Cargo.toml"
    LIVEMIG_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/livemig"
fi

VENV="$ROOT/target/qmp-venv"
PY="${LIVEMIG_QMP_PYTHON:-$VENV/bin/python}"
if ! "$PY" -c 'import qemu.qmp' 2>/dev/null; then
    if [[ -n "${LIVEMIG_QMP_PYTHON:-}" ]]; then
        echo "soak.sh: LIVEMIG_QMP_PYTHON=$PY cannot import qemu.qmp" >&2
        exit 2
    fi
    echo "soak.sh: making $VENV with qemu.qmp==0.0.6 (PyPI)" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q 'qemu.qmp==0.0.6'
fi

exec "$PY" "$ROOT/scripts/soak.py" --bin "$LIVEMIG_BIN" "$@"
