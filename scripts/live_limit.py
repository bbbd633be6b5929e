#!/usr/bin/env python3
"""Issue 16's first target, measured over QMP as an operator meets it: four vfio-sim devices
(256 MiB read at 500 MiB/s) that cannot fit a 300 ms downtime limit hold the migration; the
limit is raised to 1000 ms mid-migration (libvirt's migrate-setmaxdowntime); the migration
completes. Prints, per run, the expected downtime before the raise, the expected downtime
when the guest paused, the downtime that followed, and whether the switchover was forced.

    LIVEMIG_BIN=target/debug/livemig target/qmp-venv/bin/python scripts/live_limit.py [RUNS]

Needs qemu.qmp (the QMP suite's virtualenv has it). KVM guest when /dev/kvm is usable.
"""

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

from qemu.qmp import QMPClient

BIN = os.environ.get("LIVEMIG_BIN", "target/debug/livemig")
GUEST = ["--memory", "256M", "--fill", "1", "--working-set", "64M", "--dirty-rate", "50k"]
DEVICES = ["--device", "vfio-sim,size=256M,rate=500M"] * 4


async def connect(name, path, proc):
    qmp = QMPClient(name)
    for _ in range(600):
        if os.path.exists(path):
            try:
                await qmp.connect(path)
                return qmp
            except Exception:
                pass
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited")
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{name}: no QMP socket")


async def one_run(d, n):
    src_sock, dst_sock = os.path.join(d, f"src{n}.qmp"), os.path.join(d, f"dst{n}.qmp")
    uri = f"unix:{os.path.join(d, f'mig{n}')}"
    log = open(os.path.join(d, f"log{n}"), "w")
    src_p = subprocess.Popen([BIN, "run", *GUEST, *DEVICES, "--qmp", src_sock],
                             stdout=log, stderr=log)
    dst_p = subprocess.Popen([BIN, "incoming", "--listen", uri, "--qmp", dst_sock],
                             stdout=log, stderr=log)
    try:
        src = await connect("src", src_sock, src_p)
        dst = await connect("dst", dst_sock, dst_p)
        await src.execute("migrate-set-parameters", {"downtime-limit": 300})
        await src.execute("migrate", {"uri": uri})
        while True:
            q = await src.execute("query-migrate")
            if q.get("expected-downtime", 0) > 300:
                break
            if q["status"] not in ("setup", "active"):
                raise RuntimeError(f"ended before the raise: {q}")
            await asyncio.sleep(0.02)
        before = q["expected-downtime"]
        raised = time.monotonic()
        await src.execute("migrate-set-parameters", {"downtime-limit": 1000})
        while (q := await src.execute("query-migrate"))["status"] not in (
                "completed", "failed", "cancelled"):
            await asyncio.sleep(0.02)
        row = {
            "status": q["status"],
            "expected_before_raise_ms": before,
            "expected_at_pause_ms": q.get("x-expected-downtime"),
            "downtime_ms": q.get("downtime"),
            "forced": q.get("x-forced-switchover"),
            "raise_to_end_ms": round(1e3 * (time.monotonic() - raised)),
            "device_save_ms": q.get("downtime-breakdown", {}).get("device_save_ms"),
        }
        for vm in (src, dst):
            await vm.execute("quit")
            await vm.disconnect()
        return row
    finally:
        for p in (src_p, dst_p):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()


async def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    with tempfile.TemporaryDirectory(prefix="lm-live-limit-") as d:
        for n in range(runs):
            row = await one_run(d, n)
            row["load"] = os.getloadavg()[0]
            print(json.dumps(row), flush=True)


asyncio.run(main())
