#!/usr/bin/env python3
"""Soak: one guest migrated back and forth between two livemig processes, many times.

Two processes serve QMP on Unix sockets:

    A = livemig run      --qmp A.qmp --memory 256M --device vfio-sim,size=8M,rate=400M,precopy=1M
    B = livemig incoming --qmp B.qmp --verify

Each iteration, the process holding the guest migrates it (`migrate`) to the other one, which was
told `migrate-incoming` first (a process whose guest was migrated away takes one in again). After
both sides report `completed`:

  * the guest is checked on arrival with `x-livemig-verify`: pages-mismatched must be 0, and the
    guest's write counter never goes backwards (previous arrival <= source at pause <= arrival);
  * the device is checked by the destination while loading (vfio-sim verifies its stream, a bad
    stream fails the migration); a completed migration whose `device-state` lists every device
    with bytes > 0 on the source and `loaded` on the destination is the device check;
  * threads (/proc/PID/task), open fds (/proc/PID/fd) and VmRSS of both processes are sampled,
    once the migration threads have ended. A process alternates between two roles (it has just
    received the guest, or it has just sent it and still holds its paused copy until its next
    `migrate-incoming`), so each process is compared with itself in the same role: after the
    warm-up, threads and fds must equal the value at the end of the warm-up, and RSS must not
    grow by more than --rss-slack-mib over it.

Bounded in time: no iteration starts once --max-seconds is (nearly) spent, and one migration
that takes longer than --timeout fails the run with both processes' logs. Exit status 0 when
every check passed (also when the time budget stopped the run early: the report says so), 1 on
a failed check or migration, 2 on a usage or set-up problem.

Needs Python 3.11 and `qemu.qmp` (PyPI), e.g. in the project's virtualenv:
    python3 -m venv target/qmp-venv && target/qmp-venv/bin/pip install qemu.qmp==0.0.6
    target/qmp-venv/bin/python scripts/soak.py --bin target/release/livemig
(`scripts/soak.sh` does both, and builds the release binary.)
"""

import argparse
import asyncio
import collections
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

try:
    from qemu.qmp import QMPClient
except ImportError:
    sys.stderr.write(
        "soak.py needs the qemu.qmp package (PyPI). Make a virtualenv and run with it:\n"
        "    python3 -m venv target/qmp-venv && target/qmp-venv/bin/pip install qemu.qmp==0.0.6\n"
        "    target/qmp-venv/bin/python scripts/soak.py ...\n"
        "or just run scripts/soak.sh, which does that.\n")
    sys.exit(2)

# Threads that exist only while a migration runs (see tests/qmp/test_qmp.py, docs/threading.md).
MIGRATION_THREADS = ("lm-src", "lm-dst", "lm-vm-migrate", "lm-vm-incoming")
FINAL = ("completed", "failed", "cancelled")
MIB = 1 << 20


class SoakFailure(Exception):
    """A check failed or a migration failed / hung: the run fails."""


# ---------------------------------------------------------------------------------------------
# /proc sampling


def thread_names(pid):
    names = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return names
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names


def fd_targets(pid):
    out = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def status_kib(pid, *keys):
    got = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                got[k] = int(v.split()[0])
    return got


def sample(pid):
    """Threads, fds and memory of one process right now."""
    names = thread_names(pid)
    fds = fd_targets(pid)
    mem = status_kib(pid, "VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")
    return {
        "threads": len(names),
        "fds": len(fds),
        "rss_kib": mem.get("VmRSS", 0),
        "rss_anon_kib": mem.get("RssAnon", 0),
        "rss_file_kib": mem.get("RssFile", 0),
        "rss_shmem_kib": mem.get("RssShmem", 0),
        "hwm_kib": mem.get("VmHWM", 0),
        # For diagnosis only (not in the JSON): what the threads and fds are.
        "_thread_names": collections.Counter(names),
        "_fd_targets": collections.Counter(_fd_kind(t) for t in fds),
    }


def _fd_kind(target):
    # socket:[12345] -> socket, anon_inode:[eventfd] stays, paths stay.
    if target.startswith(("socket:", "pipe:")):
        return target.split(":")[0]
    return target


def counter_diff(base, now):
    """Human-readable difference of two Counters (what appeared, what went)."""
    parts = []
    for k in sorted(set(base) | set(now)):
        d = now.get(k, 0) - base.get(k, 0)
        if d:
            parts.append(f"{k}: {d:+d}")
    return ", ".join(parts) or "(same kinds)"


# ---------------------------------------------------------------------------------------------
# One livemig process with a QMP client


class Vm:
    def __init__(self, workdir, name, binary, args, cmd_timeout):
        self.name = name
        self.sock = os.path.join(workdir, f"{name}.qmp")
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.log = open(self.log_path, "w+")
        self.argv = [binary, *args, "--qmp", self.sock]
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.qmp = QMPClient(name)
        self.cmd_timeout = cmd_timeout
        self.connected = False

    @property
    def pid(self):
        return self.proc.pid

    async def start(self):
        for _ in range(600):
            if os.path.exists(self.sock):
                try:
                    await self.qmp.connect(self.sock)
                    self.connected = True
                    return self
                except Exception:
                    pass
            if self.proc.poll() is not None:
                raise SoakFailure(f"{self.name} exited at start with status "
                                  f"{self.proc.returncode}")
            await asyncio.sleep(0.05)
        raise SoakFailure(f"{self.name}: no QMP socket after 30 s")

    def alive(self):
        return self.proc.poll() is None

    def tail(self, lines=80):
        try:
            self.log.flush()
            with open(self.log_path) as f:
                return "".join(collections.deque(f, lines))
        except OSError as e:
            return f"(cannot read {self.log_path}: {e})"

    async def cmd(self, name, args=None, timeout=None):
        if not self.alive():
            raise SoakFailure(f"{self.name} (pid {self.pid}) died: exit status "
                              f"{self.proc.returncode}")
        try:
            return await asyncio.wait_for(self.qmp.execute(name, args),
                                          timeout or self.cmd_timeout)
        except asyncio.TimeoutError:
            raise SoakFailure(f"{self.name}: no answer to {name} within "
                              f"{timeout or self.cmd_timeout:.0f} s") from None
        except Exception as e:  # ExecuteError (an error reply), a lost connection, ...
            await asyncio.sleep(0.2)  # let a dying process be seen as dead
            state = ("running" if self.alive()
                     else f"exited with status {self.proc.returncode}")
            raise SoakFailure(f"{self.name} (pid {self.pid}, {state}): {name} "
                              f"{json.dumps(args) + ' ' if args else ''}failed: "
                              f"{type(e).__name__}: {e}") from None

    async def migration_threads_gone(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            left = [n for n in thread_names(self.pid) if n.startswith(MIGRATION_THREADS)]
            if not left or time.monotonic() > deadline:
                return left
            await asyncio.sleep(0.02)

    async def quit(self):
        """quit over QMP, then wait; kill if it will not go. Returns the exit status."""
        if self.alive() and self.connected:
            try:
                await asyncio.wait_for(self.qmp.execute("quit"), 10)
            except Exception:
                pass
        if self.connected:
            try:
                await asyncio.wait_for(self.qmp.disconnect(), 5)
            except Exception:
                pass
            self.connected = False
        try:
            code = await asyncio.to_thread(self.proc.wait, 20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
            code = None  # had to be killed
        self.log.close()
        return code


# ---------------------------------------------------------------------------------------------
# The soak


def free_tcp_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_slope(series):
    """Least-squares slope (KiB per iteration) over the second half of (iteration, KiB)
    samples; None with fewer than 4 of them. A plateau gives ~0, a leak a steady slope."""
    pts = series[len(series) // 2:]
    if len(pts) < 4:
        return None
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return round(sum((x - mx) * (y - my) for x, y in pts) / den, 1) if den else None


def fmt_mib(kib):
    return f"{kib / 1024:.1f}"


class Soak:
    def __init__(self, opts):
        self.o = opts
        self.dir = tempfile.mkdtemp(prefix="lm-soak-")
        self.vms = {}
        self.records = []
        self.t0 = time.monotonic()
        self.guest_kind = None
        self.stopped_early = None
        self.last_counter = None
        self.first_counter = None
        # (process, role) -> baseline sample at the end of the warm-up
        self.baseline = {}
        self.first = {}   # (process, role) -> first sample of the run
        self.last = {}    # (process, role) -> last sample
        self.max_rss = {}  # (process, role) -> largest VmRSS after the warm-up
        self.rss_series = collections.defaultdict(list)  # (process, role) -> [(i, kib)]
        self.settle_retries = 0
        self.flat_checks = 0  # samples compared with a baseline

    def uri(self, i):
        if self.o.transport == "tcp" or (self.o.transport == "alternate" and i % 4 >= 2):
            return f"tcp:127.0.0.1:{free_tcp_port()}"
        return f"unix:{os.path.join(self.dir, f'm{i}.mig')}"

    async def start(self):
        o = self.o
        run = ["run", "--guest", o.guest, "--memory", o.memory]
        for d in o.device:
            run += ["--device", d]
        inc = ["incoming", "--verify"]
        self.vms["A"] = Vm(self.dir, "A", o.bin, run, o.cmd_timeout)
        self.vms["B"] = Vm(self.dir, "B", o.bin, inc, o.cmd_timeout)
        await self.vms["A"].start()
        await self.vms["B"].start()
        a, b = self.vms["A"], self.vms["B"]
        if (s := (await a.cmd("query-status"))["status"]) != "running":
            raise SoakFailure(f"A is {s}, not running")
        if (s := (await b.cmd("query-status"))["status"]) != "inmigrate":
            raise SoakFailure(f"B is {s}, not inmigrate")
        v = await a.cmd("x-livemig-verify")
        self.guest_kind = v.get("guest")
        self.last_counter = self.first_counter = v["counter"]
        if v["pages-mismatched"] != 0:
            raise SoakFailure(f"A's guest is not exact before any migration: {v}")
        print(f"soak: guest {self.guest_kind} ({'/dev/kvm usable' if self.guest_kind == 'kvm' else 'synthetic: host threads, no KVM'}), "
              f"memory {o.memory}, devices {o.device or 'none'}, transport {o.transport}, "
              f"{o.iterations} iterations, warm-up {o.warmup}, budget {o.max_seconds:.0f} s, "
              f"per-migration timeout {o.timeout:g} s")
        print(f"soak: A pid {a.pid}: {' '.join(a.argv)}")
        print(f"soak: B pid {b.pid}: {' '.join(b.argv)}")
        print(f"soak: work dir {self.dir}")
        sys.stdout.flush()

    async def wait_completed(self, vm, deadline, i):
        q = {}
        while True:
            if not vm.alive():
                raise SoakFailure(f"iteration {i}: {vm.name} (pid {vm.pid}) died during the "
                                  f"migration, exit status {vm.proc.returncode}")
            q = await vm.cmd("query-migrate")
            st = q.get("status")
            if st == "completed":
                return q
            if st in FINAL:
                raise SoakFailure(f"iteration {i}: {vm.name}'s migration ended {st}: "
                                  f"{q.get('error-desc', q)}")
            if time.monotonic() > deadline:
                raise SoakFailure(f"iteration {i}: {vm.name}'s migration not completed after "
                                  f"{self.o.timeout:g} s (status {st}): {q}")
            await asyncio.sleep(0.05)

    async def iteration(self, i, src_name, dst_name):
        src, dst = self.vms[src_name], self.vms[dst_name]
        uri = self.uri(i)
        t_start = time.monotonic()
        await dst.cmd("migrate-incoming", {"uri": uri})
        await src.cmd("migrate", {"uri": uri})
        deadline = time.monotonic() + self.o.timeout
        sq = await self.wait_completed(src, deadline, i)
        dq = await self.wait_completed(dst, deadline, i)
        wall_ms = (time.monotonic() - t_start) * 1e3

        # Run states: the guest runs on the destination only.
        if (s := (await src.cmd("query-status"))["status"]) != "postmigrate":
            raise SoakFailure(f"iteration {i}: source {src_name} is {s}, not postmigrate")
        if (s := (await dst.cmd("query-status"))["status"]) != "running":
            raise SoakFailure(f"iteration {i}: destination {dst_name} is {s}, not running")

        # Device state: every device sent whole by the source, loaded by the destination.
        sdev, ddev = sq.get("device-state", []), dq.get("device-state", [])
        if len(sdev) != len(self.o.device) or len(ddev) != len(self.o.device):
            raise SoakFailure(f"iteration {i}: expected {len(self.o.device)} device(s) in "
                              f"device-state, source has {sdev}, destination has {ddev}")
        for d in sdev:
            if d.get("state") != "loaded" or not d.get("bytes", 0) > 0:
                raise SoakFailure(f"iteration {i}: device not migrated: {d}")
        for d in ddev:
            if d.get("state") != "loaded":
                raise SoakFailure(f"iteration {i}: device not loaded on the destination: {d}")

        # Memory: the guest as it paused on the source, and as it runs on the destination.
        at_pause = await src.cmd("x-livemig-verify")
        arrived = await dst.cmd("x-livemig-verify")
        if arrived["pages-mismatched"] != 0 or arrived["pages-checked"] <= 0:
            raise SoakFailure(f"iteration {i}: guest not exact on {dst_name}: {arrived}")
        if arrived.get("guest") != self.guest_kind:
            raise SoakFailure(f"iteration {i}: guest kind changed: {arrived.get('guest')}")
        c_prev, c_pause, c_arr = self.last_counter, at_pause["counter"], arrived["counter"]
        if not c_prev <= c_pause <= c_arr:
            raise SoakFailure(f"iteration {i}: guest counter went backwards: previous check "
                              f"{c_prev}, source at pause {c_pause}, destination {c_arr}")
        self.last_counter = c_arr

        # Threads, fds, RSS once this migration's threads are gone.
        left = {}
        for vm in (src, dst):
            if t := await vm.migration_threads_gone():
                left[vm.name] = t
        if left:
            raise SoakFailure(f"iteration {i}: migration threads still alive 10 s after "
                              f"completion: {left}")
        samples = {"A": sample(self.vms["A"].pid), "B": sample(self.vms["B"].pid)}
        roles = {src_name: "sent", dst_name: "received"}
        samples = await self.check_flat(i, samples, roles)

        ram = sq.get("ram", {})
        rec = {
            "iteration": i,
            "from": src_name, "to": dst_name, "uri": uri.split(":")[0],
            "total_ms": sq.get("total-time"), "downtime_ms": sq.get("downtime"),
            "setup_ms": sq.get("setup-time"), "wall_ms": round(wall_ms, 1),
            "rounds": ram.get("dirty-sync-count"), "ram_transferred": ram.get("transferred"),
            "downtime_breakdown": sq.get("downtime-breakdown"),
            "devices": [{"name": d.get("name"), "bytes": d.get("bytes"),
                         "chunks": d.get("chunks"),
                         "peak_buffered_bytes": d.get("peak-buffered-bytes")} for d in sdev],
            "pages_checked": arrived["pages-checked"],
            "pages_mismatched": arrived["pages-mismatched"],
            "counter_at_pause": c_pause, "counter_on_arrival_check": c_arr,
            "processes": {n: {"role": roles[n], **{k: v for k, v in s.items()
                                                  if not k.startswith("_")}}
                          for n, s in samples.items()},
        }
        self.records.append(rec)
        pa, pb = samples["A"], samples["B"]
        dev = sum(d.get("bytes", 0) for d in sdev)
        print(f"[{i:3d}/{self.o.iterations}] {src_name}->{dst_name} {rec['uri']:4s} "
              f"total {rec['total_ms']:5d} ms  down {rec['downtime_ms']:4d} ms  "
              f"rounds {rec['rounds']}  dev {dev / MIB:.1f} MiB  "
              f"pages {arrived['pages-checked']}/{arrived['pages-mismatched']} bad  "
              f"counter {c_arr}  | A thr {pa['threads']} fd {pa['fds']} "
              f"rss {fmt_mib(pa['rss_kib'])} MiB | B thr {pb['threads']} fd {pb['fds']} "
              f"rss {fmt_mib(pb['rss_kib'])} MiB"
              f"{'' if i > self.o.warmup else '  (warm-up)'}")
        sys.stdout.flush()

    async def check_flat(self, i, samples, roles):
        """Compare each process with itself in the same role. A thread or fd that is still
        being torn down gets up to --settle-seconds to go; a leak stays and fails the run."""
        deadline = time.monotonic() + self.o.settle_seconds
        while True:
            problems = []
            checked = 0
            for name, s in samples.items():
                key = (name, roles[name])
                self.first.setdefault(key, s)
                if i <= self.o.warmup:
                    continue
                base = self.baseline.get(key)
                if base is None:
                    continue
                checked += 1
                if s["threads"] != base["threads"]:
                    problems.append(
                        f"{name} ({roles[name]}): threads {base['threads']} -> {s['threads']} "
                        f"({counter_diff(base['_thread_names'], s['_thread_names'])})")
                if s["fds"] != base["fds"]:
                    problems.append(
                        f"{name} ({roles[name]}): fds {base['fds']} -> {s['fds']} "
                        f"({counter_diff(base['_fd_targets'], s['_fd_targets'])})")
                limit = base["rss_kib"] + self.o.rss_slack_mib * 1024
                if s["rss_kib"] > limit:
                    problems.append(
                        f"{name} ({roles[name]}): RSS {fmt_mib(base['rss_kib'])} -> "
                        f"{fmt_mib(s['rss_kib'])} MiB, over the baseline + "
                        f"{self.o.rss_slack_mib} MiB")
            if not problems:
                break
            if time.monotonic() > deadline:
                raise SoakFailure(f"iteration {i}: not flat against the end of the warm-up: "
                                  + "; ".join(problems))
            self.settle_retries += 1
            await asyncio.sleep(0.1)
            samples = {n: sample(self.vms[n].pid) for n in samples}
        self.flat_checks += checked
        for name, s in samples.items():
            key = (name, roles[name])
            if i <= self.o.warmup or key not in self.baseline:
                # The last warm-up sample in each role is the baseline (and, with no warm-up
                # left for a role, its first sample).
                self.baseline[key] = s
            self.last[key] = s
            if i > self.o.warmup:
                self.max_rss[key] = max(self.max_rss.get(key, 0), s["rss_kib"])
                self.rss_series[key].append((i, s["rss_kib"]))
        return samples

    async def run(self):
        await self.start()
        holder, other = "A", "B"
        longest = 0.0
        for i in range(1, self.o.iterations + 1):
            elapsed = time.monotonic() - self.t0
            left = self.o.max_seconds - elapsed
            # Start an iteration only if the longest one so far would still fit.
            if left <= 0 or (longest and left < longest * 1.5):
                self.stopped_early = (f"time budget of {self.o.max_seconds:.0f} s: stopped "
                                      f"after {i - 1} of {self.o.iterations} iterations "
                                      f"({elapsed:.0f} s elapsed, longest iteration "
                                      f"{longest:.1f} s)")
                print(f"soak: STOPPED EARLY: {self.stopped_early}")
                break
            t = time.monotonic()
            await self.iteration(i, holder, other)
            longest = max(longest, time.monotonic() - t)
            holder, other = other, holder
        if self.first_counter is not None and self.last_counter <= self.first_counter \
                and self.records:
            raise SoakFailure(f"the guest's counter did not advance over the run "
                              f"({self.first_counter} -> {self.last_counter}): is it running?")

    # -----------------------------------------------------------------------------------------
    # Report

    def summary(self):
        recs = self.records

        def stats(key):
            xs = [r[key] for r in recs if r.get(key) is not None]
            if not xs:
                return None
            return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}

        procs = {}
        for key in sorted(set(self.first) | set(self.last)):
            name, role = key
            f, b, l = self.first.get(key), self.baseline.get(key), self.last.get(key)
            pick = lambda s: None if s is None else {
                "threads": s["threads"], "fds": s["fds"], "rss_kib": s["rss_kib"],
                "thread_names": dict(s["_thread_names"]), "fd_kinds": dict(s["_fd_targets"])}
            procs[f"{name}/{role}"] = {
                "first": pick(f), "baseline": pick(b), "last": pick(l),
                "max_rss_kib_after_warmup": self.max_rss.get(key),
                "rss_slope_kib_per_iteration_second_half": rss_slope(self.rss_series[key]),
                "rss_growth_kib": None if b is None or l is None
                else l["rss_kib"] - b["rss_kib"],
            }
        return {
            "guest": self.guest_kind,
            "iterations_requested": self.o.iterations,
            "iterations_run": len(recs),
            "warmup": self.o.warmup,
            "flatness_checks": self.flat_checks,
            "stopped_early": self.stopped_early,
            "elapsed_s": round(time.monotonic() - self.t0, 1),
            "total_ms": stats("total_ms"),
            "downtime_ms": stats("downtime_ms"),
            "setup_ms": stats("setup_ms"),
            "rounds": stats("rounds"),
            "counter_first": self.first_counter,
            "counter_last": self.last_counter,
            "settle_retries": self.settle_retries,
            "processes": procs,
            "config": {"memory": self.o.memory, "devices": self.o.device,
                       "transport": self.o.transport, "rss_slack_mib": self.o.rss_slack_mib,
                       "timeout_s": self.o.timeout, "max_seconds": self.o.max_seconds},
        }

    def print_summary(self, s):
        print()
        print(f"soak summary: guest {s['guest']}, {s['iterations_run']} of "
              f"{s['iterations_requested']} iterations in {s['elapsed_s']} s "
              f"(warm-up {s['warmup']})")
        if s["stopped_early"]:
            print(f"  stopped early: {s['stopped_early']}")
        if not s["flatness_checks"]:
            print(f"  WARNING: too few iterations after the warm-up to check threads/fds/RSS")
        print(f"  {'':14s} {'min':>8s} {'median':>8s} {'max':>8s}")
        for k, label in (("total_ms", "total ms"), ("downtime_ms", "downtime ms"),
                         ("setup_ms", "setup ms"), ("rounds", "rounds")):
            if v := s[k]:
                print(f"  {label:14s} {v['min']:8g} {v['median']:8g} {v['max']:8g}")
        if s["iterations_run"]:
            print(f"  guest counter {s['counter_first']} -> {s['counter_last']}"
                  f"{', 0 mismatched pages in every check' if s['ok'] else ''}")
        print(f"  {'process/role':14s} {'threads':>15s} {'fds':>15s} {'RSS MiB first/base/last':>26s}"
              f" {'max':>7s} {'growth':>7s} {'slope':>8s}")
        for key, p in s["processes"].items():
            f, b, l = p["first"], p["baseline"], p["last"]
            tri = lambda k: "/".join("-" if x is None else str(x[k]) for x in (f, b, l))
            rss = "/".join("-" if x is None else fmt_mib(x["rss_kib"]) for x in (f, b, l))
            mx = p["max_rss_kib_after_warmup"]
            g = p["rss_growth_kib"]
            print(f"  {key:14s} {tri('threads'):>15s} {tri('fds'):>15s} {rss:>26s} "
                  f"{'-' if mx is None else fmt_mib(mx):>7s} "
                  f"{'-' if g is None else f'{g / 1024:+.1f}':>7s} "
                  f"{'-' if (sl := p['rss_slope_kib_per_iteration_second_half']) is None else f'{sl:+.0f}':>8s}")
        print("  (first = iteration 1/2, base = end of warm-up, last = last iteration in that role;"
              " growth = last - base;\n   slope = least-squares RSS trend over the second half"
              " of the samples after the warm-up, KiB per iteration: ~0 when flat)")


async def main_async(opts):
    soak = Soak(opts)
    error = None
    exits = {}
    try:
        await soak.run()
    except SoakFailure as e:
        error = str(e)
    except (KeyboardInterrupt, asyncio.CancelledError):
        error = "interrupted"
    except Exception:
        error = "soak.py itself failed:\n" + traceback.format_exc()
    finally:
        for name, vm in soak.vms.items():
            if error:
                print(f"\n---- {name} (pid {vm.pid}) log, last lines ({vm.log_path}) ----")
                print(vm.tail(), end="")
        for name, vm in soak.vms.items():
            exits[name] = await vm.quit()
    for name, code in exits.items():
        if code != 0 and not error:
            error = (f"{name} exited with status {code} after quit" if code is not None
                     else f"{name} did not exit within 20 s of quit and was killed")
            print(f"\n---- {name} log ({soak.vms[name].log_path}) ----\n"
                  f"{soak.vms[name].tail()}", end="")
    s = soak.summary()
    s["ok"] = error is None
    s["error"] = error
    s["exit_status"] = exits
    soak.print_summary(s)
    print("  exit status after quit: " + ", ".join(
        f"{n} {'killed (did not quit)' if c is None else c}" for n, c in exits.items()))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"summary": s, "iterations": soak.records}, f, indent=1)
        print(f"  JSON: {opts.json}")
    if error:
        print(f"\nsoak: FAILED: {error}")
        print(f"soak: logs kept in {soak.dir}")
        return 1
    print(f"\nsoak: OK")
    if opts.keep:
        print(f"soak: work dir kept: {soak.dir}")
    else:
        shutil.rmtree(soak.dir, ignore_errors=True)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bin", default=os.environ.get("LIVEMIG_BIN", "target/release/livemig"),
                   help="the livemig binary (env LIVEMIG_BIN)")
    p.add_argument("--iterations", type=int, default=100, help="migrations (hops)")
    p.add_argument("--warmup", type=int, default=5,
                   help="first iterations not held to the flatness checks")
    p.add_argument("--max-seconds", type=float, default=900,
                   help="time budget: no iteration starts once it is (nearly) spent")
    p.add_argument("--timeout", type=float, default=120,
                   help="seconds one migration may take before the run fails")
    p.add_argument("--cmd-timeout", type=float, default=30,
                   help="seconds one QMP command may take before the run fails")
    p.add_argument("--guest", default="auto", choices=("auto", "kvm", "synthetic"),
                   help="KVM micro-VM (auto: when /dev/kvm is usable) or the synthetic guest")
    p.add_argument("--memory", default="256M", help="guest memory")
    p.add_argument("--device", action="append",
                   help="device spec for the guest, repeatable; without it "
                        "vfio-sim,size=8M,rate=400M,precopy=1M")
    p.add_argument("--no-device", action="store_true", help="a guest without devices")
    p.add_argument("--transport", default="unix", choices=("unix", "tcp", "alternate"),
                   help="migration URI: unix:PATH, tcp:127.0.0.1:PORT, or both by turns")
    p.add_argument("--rss-slack-mib", type=float, default=32,
                   help="RSS may exceed its end-of-warm-up value by this much")
    p.add_argument("--settle-seconds", type=float, default=3,
                   help="time a thread or fd count gets to return to its baseline")
    p.add_argument("--json", metavar="PATH", help="write the summary and every iteration here")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs) on success")
    opts = p.parse_args()
    if opts.no_device:
        opts.device = []
    elif not opts.device:
        opts.device = ["vfio-sim,size=8M,rate=400M,precopy=1M"]
    if opts.iterations < 1 or opts.warmup < 0 or opts.timeout <= 0 or opts.max_seconds <= 0 \
            or opts.cmd_timeout <= 0:
        p.error("--iterations >= 1, --warmup >= 0; --timeout, --cmd-timeout, --max-seconds > 0")
    if not (os.path.isfile(opts.bin) and os.access(opts.bin, os.X_OK)):
        p.error(f"no livemig binary at {opts.bin} (build it: cargo build --release -p livemig)")
    try:
        return asyncio.run(main_async(opts))
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main())
