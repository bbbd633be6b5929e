"""livemig driven the way a QEMU user drives QEMU: through Python's `qemu.qmp` library.

Each test starts real `livemig run --qmp` (source) and `livemig incoming --qmp`
(destination) processes, talks QMP to them over their Unix sockets, and checks what a user
would check: statuses and events, `query-migrate`'s numbers, that the guest arrives exact
(`x-livemig-verify`), that a cancelled or failed migration leaves the source running with
nothing lost, that no migration thread is left behind, and that a retry succeeds.

Run by `cargo test` (crates/cli/tests/qmp_python.rs), which sets LIVEMIG_BIN; by hand:
    LIVEMIG_BIN=target/debug/livemig python -m unittest discover -s tests/qmp -v
"""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import unittest

from qemu.qmp import QMPClient, ExecuteError

BIN = os.environ.get("LIVEMIG_BIN", "target/debug/livemig")
GUEST = ["--memory", "256M"]
# Threads that exist only while a migration runs (engine, pool and the QMP-side runner).
MIGRATION_THREADS = ("lm-src", "lm-dst", "lm-vm-migrate", "lm-vm-incoming")
FINAL = ("completed", "failed", "cancelled")


def migration_threads(pid):
    names = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return [n for n in names if n.startswith(MIGRATION_THREADS)]


class Vm:
    """One livemig process with a QMP client on its socket."""

    def __init__(self, workdir, name, args):
        self.name = name
        self.sock = os.path.join(workdir, f"{name}.qmp")
        self.log = open(os.path.join(workdir, f"{name}.log"), "w+")
        self.proc = subprocess.Popen([BIN, *args, "--qmp", self.sock],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.qmp = QMPClient(name)

    async def start(self):
        for _ in range(300):
            if os.path.exists(self.sock):
                try:
                    await self.qmp.connect(self.sock)
                    return self
                except Exception:
                    pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.output()}")
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name}: no QMP socket: {self.output()}")

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    async def cmd(self, name, args=None):
        return await self.qmp.execute(name, args)

    async def status(self):
        return (await self.cmd("query-status"))["status"]

    async def wait_migration(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            q = await self.cmd("query-migrate")
            if q.get("status") in FINAL:
                return q
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.name}: migration did not end: {q}")

    async def wait_status(self, want, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            q = await self.cmd("query-migrate")
            if q.get("status") == want:
                return q
            await asyncio.sleep(0.02)
        raise AssertionError(f"{self.name}: never reached {want}: {q}")

    async def threads_settle(self):
        """The migration threads of this process, once they have had a moment to end."""
        for _ in range(100):
            left = migration_threads(self.proc.pid)
            if not left:
                return left
            await asyncio.sleep(0.05)
        return left

    async def quit(self):
        if self.proc.poll() is None:
            try:
                await self.cmd("quit")
            except Exception:
                pass
            await self.qmp.disconnect()
            try:
                return self.proc.wait(20)
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
        return self.proc.returncode


async def drain(listener):
    """Events received so far."""
    out = []
    while not listener.empty():
        out.append(await listener.get())
    return out


async def next_event(listener, name, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {name} event")
        ev = await asyncio.wait_for(listener.get(), left)
        if ev["event"] == name:
            return ev


def x509_dir(path):
    """A CA and a certificate for localhost/127.0.0.1 (client and server use) in QEMU's
    tls-creds-x509 layout, made with the openssl command as an operator would."""
    os.makedirs(path, exist_ok=True)

    def ssl(*args):
        subprocess.run(["openssl", *args], cwd=path, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ssl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2",
        "-subj", "/CN=livemig test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    with open(os.path.join(path, "leaf.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                "extendedKeyUsage=serverAuth,clientAuth\n"
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n")
    for side in ("server", "client"):
        ssl("req", *ec, "-keyout", f"{side}-key.pem", "-out", f"{side}.csr",
            "-subj", "/CN=localhost")
        ssl("x509", "-req", "-in", f"{side}.csr", "-CA", "ca-cert.pem", "-CAkey",
            "ca-key.pem", "-CAcreateserial", "-out", f"{side}-cert.pem", "-days", "2",
            "-extfile", "leaf.ext")
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Link:
    """A Unix-socket forwarder standing for the network between the hosts: every connection
    through it can be cut at once (`cut`), as a lost link; new ones are forwarded again."""

    def __init__(self, listen, target):
        self.listen, self.target = listen, target
        self.open = []

    async def start(self):
        self.server = await asyncio.start_unix_server(self.serve, self.listen)
        return self

    async def serve(self, reader, writer):
        try:
            t_reader, t_writer = await asyncio.open_unix_connection(self.target)
        except OSError:
            writer.transport.abort()
            return
        self.open += [writer, t_writer]

        async def pump(a, b):
            try:
                while data := await a.read(1 << 16):
                    b.write(data)
                    await b.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                b.transport.abort()

        await asyncio.gather(pump(reader, t_writer), pump(t_reader, writer))

    def cut(self):
        for w in self.open:
            w.transport.abort()
        self.open.clear()

    async def close(self):
        self.cut()
        self.server.close()
        await self.server.wait_closed()


class QmpTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self):
        self.dir = tempfile.mkdtemp(prefix="lm-qmp-")
        self.vms = []

    async def asyncTearDown(self):
        for vm in self.vms:
            code = await vm.quit()
            log = vm.output()
            vm.log.close()
            self.assertEqual(code, 0, f"{vm.name} exit status; log:\n{log}")
        shutil.rmtree(self.dir, ignore_errors=True)

    async def source(self, *extra, guest="synthetic"):
        vm = await Vm(self.dir, f"src{len(self.vms)}",
                      ["run", "--guest", guest, *GUEST, *extra]).start()
        self.vms.append(vm)
        return vm

    async def destination(self, *extra):
        vm = await Vm(self.dir, f"dst{len(self.vms)}", ["incoming", "--verify", *extra]).start()
        self.vms.append(vm)
        return vm

    def uri(self, name):
        return f"unix:{os.path.join(self.dir, name)}.mig"

    async def enable_events(self, *vms):
        for vm in vms:
            await vm.cmd("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True},
                {"capability": "multifd", "state": True}]})

    async def assert_source_intact(self, src):
        self.assertEqual(await src.status(), "running")
        v = await src.cmd("x-livemig-verify")
        self.assertEqual(v["pages-mismatched"], 0, v)
        self.assertGreater(v["pages-checked"], 0)
        self.assertEqual(await src.threads_settle(), [], "migration threads left on the source")

    async def test_migrate_like_a_qemu_user(self):
        """Parameters, migrate, poll query-migrate, events, an exact guest on arrival."""
        src = await self.source("--device", "vfio-sim,size=8M,rate=200M,precopy=1M",
                                guest="auto")
        dst = await self.destination()
        self.assertEqual(await src.status(), "running")
        self.assertEqual(await dst.status(), "inmigrate")
        await self.enable_events(src, dst)
        params = {"multifd-channels": 3, "downtime-limit": 200, "x-device-chunk-size": 262144}
        for vm in (src, dst):
            await vm.cmd("migrate-set-parameters", params)
            got = await vm.cmd("query-migrate-parameters")
            for k, v in params.items():
                self.assertEqual(got[k], v)
        caps = {c["capability"]: c["state"] for c in await src.cmd("query-migrate-capabilities")}
        self.assertEqual(caps, {"multifd": True, "events": True, "auto-converge": True,
                                "x-local": False, "postcopy-ram": False,
                                "postcopy-preempt": False, "postcopy-blocktime": False,
                                "pause-before-switchover": False,
                                "mapped-ram": False, "return-path": False,
                                "switchover-ack": False})
        self.assertEqual(await src.cmd("query-migrate"), {}, "no migration yet")

        uri = self.uri("m1")
        with src.qmp.listener() as src_ev, dst.qmp.listener() as dst_ev:
            await dst.cmd("migrate-incoming", {"uri": uri})
            await src.cmd("migrate", {"uri": uri})
            seen, last_transferred = [], 0
            while True:
                q = await src.cmd("query-migrate")
                seen.append(q["status"])
                if "ram" in q:
                    self.assertGreaterEqual(q["ram"]["transferred"], last_transferred)
                    last_transferred = q["ram"]["transferred"]
                if q["status"] in FINAL:
                    break
                await asyncio.sleep(0.02)
            self.assertEqual(q["status"], "completed", q)
            await dst.wait_migration()
            await asyncio.sleep(0.2)
            src_events = await drain(src_ev)
            dst_events = await drain(dst_ev)

        # QEMU's fields, with QEMU's meanings.
        ram = q["ram"]
        self.assertEqual(ram["total"], 256 << 20)
        self.assertEqual(ram["remaining"], 0)
        self.assertEqual(ram["page-size"], 4096)
        self.assertEqual(ram["normal-bytes"], ram["normal"] * 4096)
        self.assertEqual(ram["normal"] + ram["duplicate"] >= 65536, True, ram)
        self.assertGreaterEqual(ram["transferred"], ram["normal-bytes"])
        # transferred = before the pause + during it (+ postcopy's, none here).
        self.assertGreater(ram["precopy-bytes"], 0, ram)
        self.assertEqual(ram["precopy-bytes"] + ram["downtime-bytes"] + ram["postcopy-bytes"],
                         ram["transferred"], ram)
        self.assertGreaterEqual(ram["dirty-sync-count"], 1)
        for k in ("mbps", "dirty-pages-rate", "pages-per-second"):
            self.assertIn(k, ram)
        for k in ("total-time", "downtime", "setup-time", "downtime-breakdown"):
            self.assertIn(k, q)
        self.assertLessEqual(q["downtime"], q["total-time"])
        dev = q["device-state"]
        self.assertEqual([d["name"] for d in dev], ["vfio0"])
        self.assertGreaterEqual(dev[0]["bytes"], 8 << 20)
        self.assertGreater(dev[0]["chunks"], 0)
        self.assertIn("peak-buffered-bytes", dev[0])

        # Events: every status change, a pass per round, STOP at switchover.
        statuses = [e["data"]["status"] for e in src_events if e["event"] == "MIGRATION"]
        self.assertEqual(statuses, ["setup", "active", "completed"], src_events)
        passes = [e["data"]["pass"] for e in src_events if e["event"] == "MIGRATION_PASS"]
        self.assertEqual(passes, list(range(1, len(passes) + 1)))
        self.assertEqual(len(passes), ram["dirty-sync-count"])
        self.assertIn("STOP", [e["event"] for e in src_events])
        self.assertIn("RESUME", [e["event"] for e in dst_events])
        dst_statuses = [e["data"]["status"] for e in dst_events if e["event"] == "MIGRATION"]
        self.assertEqual(dst_statuses[-1], "completed")

        # The guest left the source paused for good and runs, exact, on the destination.
        self.assertEqual(await src.status(), "postmigrate")
        with self.assertRaises(ExecuteError) as e:
            await src.cmd("cont")
        self.assertIn("runs on the destination", str(e.exception))
        at_pause = (await src.cmd("x-livemig-verify"))["counter"]
        self.assertEqual(await dst.status(), "running")
        v = await dst.cmd("x-livemig-verify")
        self.assertEqual(v["pages-mismatched"], 0, v)
        self.assertGreaterEqual(v["counter"], at_pause)
        self.assertEqual(await src.threads_settle(), [])
        self.assertEqual(await dst.threads_settle(), [])

        # The destination now holds the guest and can migrate it back to the source, which
        # waits for it again (ping-pong between two processes).
        uri2 = self.uri("m2")
        await src.cmd("migrate-incoming", {"uri": uri2})
        self.assertEqual(await src.status(), "inmigrate")
        await dst.cmd("migrate", {"uri": uri2})
        self.assertEqual((await dst.wait_migration())["status"], "completed")
        self.assertEqual((await src.wait_migration())["status"], "completed")
        self.assertEqual(await src.status(), "running")
        back = await src.cmd("x-livemig-verify")
        self.assertEqual(back["pages-mismatched"], 0)
        self.assertGreaterEqual(back["counter"], v["counter"])

    async def test_local_mode_hands_the_memory_over(self):
        """x-local with a unix: URI: the destination maps the source's memfds; no page is sent."""
        src = await self.source("--shared-memory")
        dst = await self.destination()
        await src.cmd("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-local", "state": True}]})
        # Local mode needs a Unix socket: a TCP URI fails at once and the guest runs on.
        await src.cmd("migrate", {"uri": "tcp:127.0.0.1:9"})
        q = await src.wait_migration()
        self.assertEqual(q["status"], "failed", q)
        self.assertIn("unix:", q["error-desc"])
        self.assertEqual(await src.status(), "running")

        uri = self.uri("local")
        await dst.cmd("migrate-incoming", {"uri": uri})
        await src.cmd("migrate", {"uri": uri})
        q = await src.wait_migration()
        self.assertEqual(q["status"], "completed", q)
        self.assertEqual(q["ram"]["normal"] + q["ram"]["duplicate"], 0, q)
        self.assertEqual((await dst.wait_migration())["status"], "completed")
        self.assertEqual(await dst.status(), "running")
        v = await dst.cmd("x-livemig-verify")
        self.assertEqual(v["pages-mismatched"], 0, v)
        self.assertEqual(v["pages-checked"], 65536)
        self.assertEqual(await src.status(), "postmigrate")
        self.assertEqual(await src.threads_settle(), [])
        self.assertEqual(await dst.threads_settle(), [])

    async def test_cancel_while_connecting_then_retry(self):
        """A destination that accepts and says nothing: cancel frees the source at once."""
        src = await self.source()
        await self.enable_events(src)
        path = os.path.join(self.dir, "silent.mig")
        silent = socket.socket(socket.AF_UNIX)
        silent.bind(path)
        silent.listen(16)
        try:
            with src.qmp.listener("MIGRATION") as ev:
                await src.cmd("migrate", {"uri": f"unix:{path}"})
                await asyncio.sleep(0.5)
                self.assertEqual((await src.cmd("query-migrate"))["status"], "setup")
                t0 = time.monotonic()
                await src.cmd("migrate_cancel")
                q = await src.wait_migration(timeout=10)
                self.assertLess(time.monotonic() - t0, 5)
                self.assertEqual(q["status"], "cancelled", q)
                got = [e["data"]["status"] for e in await drain(ev)]
                self.assertEqual(got, ["setup", "cancelling", "cancelled"])
        finally:
            silent.close()
        await self.assert_source_intact(src)
        dst = await self.destination()
        uri = self.uri("retry")
        await dst.cmd("migrate-incoming", {"uri": uri})
        await src.cmd("migrate", {"uri": uri})
        self.assertEqual((await src.wait_migration())["status"], "completed")
        self.assertEqual((await dst.wait_migration())["status"], "completed")
        self.assertEqual((await dst.cmd("x-livemig-verify"))["pages-mismatched"], 0)

    async def test_cancel_in_precopy_and_in_switchover_then_retry(self):
        """Cancel while pages stream and while the guest is paused; each time the source runs
        on, exact, the destination waits again, and the last attempt succeeds."""
        # A device whose final state takes ~2 s to read holds the switchover open.
        src = await self.source("--device", "vfio-sim,size=16M,rate=8M")
        dst = await self.destination()
        await self.enable_events(src, dst)

        # 1. Precopy, slowed by a bandwidth cap so there is time to cancel.
        await src.cmd("migrate-set-parameters", {"max-bandwidth": 20 << 20})
        uri = self.uri("c1")
        await dst.cmd("migrate-incoming", {"uri": uri})
        with src.qmp.listener("MIGRATION_PASS") as passes:
            await src.cmd("migrate", {"uri": uri})
            await next_event(passes, "MIGRATION_PASS")
        await asyncio.sleep(0.3)
        q = await src.cmd("query-migrate")
        self.assertEqual(q["status"], "active")
        self.assertGreater(q["ram"]["remaining"], 0)
        with self.assertRaises(ExecuteError) as e:
            await src.cmd("migrate", {"uri": uri})
        self.assertIn("in progress", str(e.exception))
        # Mid-migration only downtime-limit and max-bandwidth are taken (as QEMU takes them).
        with self.assertRaises(ExecuteError) as e:
            await src.cmd("migrate-set-parameters", {"multifd-channels": 2})
        self.assertIn("migration process in progress", str(e.exception))
        await src.cmd("migrate-set-parameters", {"downtime-limit": 250})
        self.assertEqual((await src.cmd("query-migrate-parameters"))["downtime-limit"], 250)
        await src.cmd("migrate_cancel")
        self.assertEqual((await src.wait_migration())["status"], "cancelled")
        await self.assert_source_intact(src)
        self.assertEqual((await dst.wait_migration())["status"], "failed")
        self.assertEqual(await dst.status(), "inmigrate", "no partial guest runs")
        self.assertEqual(await dst.threads_settle(), [])

        # 2. Switchover: the guest is paused while the device's final state is read (a limit
        # the device fits: the switchover counts its read time).
        await src.cmd("migrate-set-parameters", {"max-bandwidth": 0, "downtime-limit": 10000})
        uri = self.uri("c2")
        await dst.cmd("migrate-incoming", {"uri": uri})
        with src.qmp.listener(("STOP", "RESUME")) as ev:
            await src.cmd("migrate", {"uri": uri})
            await next_event(ev, "STOP")
            self.assertEqual(await src.status(), "finish-migrate")
            with self.assertRaises(ExecuteError) as e:
                await src.cmd("cont")
            self.assertIn("switchover", str(e.exception))
            await src.cmd("migrate_cancel")
            await next_event(ev, "RESUME", timeout=20)
        self.assertEqual((await src.wait_migration())["status"], "cancelled")
        await self.assert_source_intact(src)
        self.assertEqual((await dst.wait_migration())["status"], "failed")
        self.assertEqual(await dst.status(), "inmigrate")

        # 3. And now for real.
        uri = self.uri("c3")
        await dst.cmd("migrate-incoming", {"uri": uri})
        await src.cmd("migrate", {"uri": uri})
        self.assertEqual((await src.wait_migration())["status"], "completed")
        self.assertEqual((await dst.wait_migration())["status"], "completed")
        self.assertEqual((await dst.cmd("x-livemig-verify"))["pages-mismatched"], 0)
        self.assertEqual(await src.threads_settle(), [])

    async def test_raise_the_downtime_limit_mid_migration_like_libvirt(self):
        """Four devices of 16 MiB read at 32 MiB/s (500 ms, in parallel) cannot fit a 300 ms
        limit: the migration waits, saying so in expected-downtime. Raising downtime-limit
        while it runs (libvirt's migrate-setmaxdowntime) lets it complete, not forced."""
        src = await self.source(*(["--device", "vfio-sim,size=16M,rate=32M"] * 4))
        dst = await self.destination()
        await src.cmd("migrate-set-parameters", {"downtime-limit": 300})
        uri = self.uri("live")
        await dst.cmd("migrate-incoming", {"uri": uri})
        await src.cmd("migrate", {"uri": uri})
        deadline = time.monotonic() + 60
        while True:
            q = await src.cmd("query-migrate")
            self.assertIn(q["status"], ("setup", "active"), q)
            if q.get("expected-downtime", 0) > 300:
                break
            self.assertLess(time.monotonic(), deadline, q)
            await asyncio.sleep(0.02)
        self.assertGreaterEqual(q["x-expected-downtime-parts"]["device-read-ms"], 500, q)
        await src.cmd("migrate-set-parameters", {"downtime-limit": 60000, "max-bandwidth": 0})
        q = await src.wait_migration()
        self.assertEqual(q["status"], "completed", q)
        self.assertFalse(q["x-forced-switchover"], q)
        self.assertGreaterEqual(q["x-expected-downtime"], 500, q)
        self.assertEqual((await dst.wait_migration())["status"], "completed")
        self.assertEqual((await dst.cmd("x-livemig-verify"))["pages-mismatched"], 0)

    async def test_throttle_parameters_set_mid_migration_like_qemu(self):
        """A guest dirtying faster than a capped link: auto-converge's parameters set while
        the migration runs (cpu-throttle-initial 60, -increment 30, trigger 10 %) are the
        steps it takes next, seen in cpu-throttle-percentage; other parameters are refused
        meanwhile with QEMU's words."""
        src = await self.source("--working-set", "32M", "--dirty-rate", "100k")
        dst = await self.destination()
        await src.cmd("migrate-set-parameters", {"max-bandwidth": 32 << 20,
                                                 "downtime-limit": 10})
        uri = self.uri("throttle")
        await dst.cmd("migrate-incoming", {"uri": uri})
        await src.cmd("migrate", {"uri": uri})
        await src.wait_status("active")
        await src.cmd("migrate-set-parameters", {"cpu-throttle-initial": 60,
                                                 "cpu-throttle-increment": 30,
                                                 "throttle-trigger-threshold": 10})
        with self.assertRaises(ExecuteError) as e:
            await src.cmd("migrate-set-parameters", {"multifd-channels": 2})
        self.assertIn("migration process in progress", str(e.exception))
        got = await src.cmd("query-migrate-parameters")
        self.assertEqual((got["cpu-throttle-initial"], got["cpu-throttle-increment"],
                          got["max-cpu-throttle"], got["throttle-trigger-threshold"]),
                         (60, 30, 99, 10), got)
        seen = []
        deadline = time.monotonic() + 90
        while not seen or seen[-1] < 90:
            q = await src.cmd("query-migrate")
            self.assertIn(q["status"], ("setup", "active"), q)
            t = q.get("cpu-throttle-percentage", 0)
            if t and (not seen or seen[-1] != t):
                seen.append(t)
            self.assertLess(time.monotonic(), deadline, (seen, q))
            await asyncio.sleep(0.02)
        self.assertEqual(seen[:2], [60, 90], seen)
        await src.cmd("migrate-set-parameters", {"downtime-limit": 60000, "max-bandwidth": 0})
        self.assertEqual((await src.wait_migration())["status"], "completed")
        self.assertEqual((await dst.wait_migration())["status"], "completed")
        self.assertEqual((await dst.cmd("x-livemig-verify"))["pages-mismatched"], 0)

    @unittest.skipIf(shutil.which("openssl") is None, "SKIPPED: no openssl command")
    async def test_tls_with_object_add_like_qemu(self):
        """TLS set up as QEMU's scripts and libvirt do: object-add of tls-creds-x509 over a
        directory in QEMU's layout on each side, the tls-creds and tls-hostname parameters;
        the migration completes exact over TLS; bad objects are refused by the command."""
        creds = x509_dir(os.path.join(self.dir, "pki"))
        src = await self.source()
        dst = await self.destination()
        for vm, endpoint in ((src, "client"), (dst, "server")):
            await vm.cmd("object-add", {"qom-type": "tls-creds-x509", "id": "tls0",
                                        "dir": creds, "endpoint": endpoint,
                                        "verify-peer": True})
        cases = [
            ({"qom-type": "tls-creds-x509", "id": "tls0", "dir": creds}, "duplicate"),
            ({"qom-type": "tls-creds-x509", "id": "t1", "dir": creds, "verify-peer": False},
             "verify-peer"),
            ({"qom-type": "tls-creds-x509", "id": "t2", "dir": self.dir}, "client-cert.pem"),
            ({"qom-type": "memory-backend-ram", "id": "m0"}, "tls-creds-x509"),
        ]
        for args, words in cases:
            with self.assertRaises(ExecuteError, msg=args) as e:
                await src.cmd("object-add", args)
            self.assertIn(words, str(e.exception), args)
        await src.cmd("migrate-set-parameters", {"tls-creds": "tls0",
                                                 "tls-hostname": "localhost"})
        await dst.cmd("migrate-set-parameters", {"tls-creds": "tls0"})
        self.assertEqual((await src.cmd("query-migrate-parameters"))["tls-creds"], "tls0")
        uri = f"tcp:127.0.0.1:{free_port()}"
        await dst.cmd("migrate-incoming", {"uri": uri})
        await src.cmd("migrate", {"uri": uri})
        q = await src.wait_migration()
        self.assertEqual(q["status"], "completed", q)
        self.assertEqual((await dst.wait_migration())["status"], "completed")
        self.assertEqual((await dst.cmd("x-livemig-verify"))["pages-mismatched"], 0)
        with self.assertRaises(ExecuteError) as e:
            await src.cmd("object-del", {"id": "tls0"})
        self.assertIn("in use", str(e.exception))
        await src.cmd("migrate-set-parameters", {"tls-creds": ""})
        await src.cmd("object-del", {"id": "tls0"})

    @unittest.skipIf(shutil.which("openssl") is None, "SKIPPED: no openssl command")
    async def test_a_qemu_script_runs_unchanged(self):
        """Issue 16's script: TLS from object-add, the address as QEMU 9.1's channels, and
        parameters changed while the migration runs (libvirt's migrate-setspeed and
        migrate-setmaxdowntime), the same commands a QEMU user sends, unchanged."""
        creds = x509_dir(os.path.join(self.dir, "pki"))
        src = await self.source("--working-set", "32M", "--dirty-rate", "50k")
        dst = await self.destination()
        for vm, endpoint in ((src, "client"), (dst, "server")):
            await vm.cmd("object-add", {"qom-type": "tls-creds-x509", "id": "tls0",
                                        "dir": creds, "endpoint": endpoint})
            await vm.cmd("migrate-set-parameters", {"tls-creds": "tls0"})
        await src.cmd("migrate-set-parameters", {"tls-hostname": "localhost",
                                                 "max-bandwidth": 16 << 20,
                                                 "downtime-limit": 1})
        channels = [{"channel-type": "main",
                     "addr": {"transport": "socket", "type": "inet",
                              "host": "127.0.0.1", "port": str(free_port())}}]
        await dst.cmd("migrate-incoming", {"channels": channels})
        await src.cmd("migrate", {"channels": channels})
        await src.wait_status("active")
        await asyncio.sleep(0.5)
        await src.cmd("migrate-set-parameters", {"max-bandwidth": 0})
        await src.cmd("migrate-set-parameters", {"downtime-limit": 2000})
        q = await src.wait_migration()
        self.assertEqual(q["status"], "completed", q)
        self.assertFalse(q.get("x-forced-switchover", False), q)
        self.assertEqual((await dst.wait_migration())["status"], "completed")
        self.assertEqual((await dst.cmd("x-livemig-verify"))["pages-mismatched"], 0)

    async def test_calc_dirty_rate_before_migrating_like_qemu(self):
        """calc-dirty-rate / query-dirty-rate: a guest writing a 16 MiB working set, measured
        over a second with its dirty log (each page once), reads at most 16 MiB/s and more
        than nothing; no migration starts while it measures; QEMU's range check."""
        src = await self.source("--working-set", "16M", "--dirty-rate", "50k")
        self.assertEqual((await src.cmd("query-dirty-rate"))["status"], "unstarted")
        with self.assertRaises(ExecuteError) as e:
            await src.cmd("calc-dirty-rate", {"calc-time": 0})
        self.assertIn("out of range", str(e.exception))
        await src.cmd("calc-dirty-rate", {"calc-time": 1})
        self.assertEqual((await src.cmd("query-dirty-rate"))["status"], "measuring")
        with self.assertRaises(ExecuteError) as e:
            await src.cmd("migrate", {"uri": self.uri("busy")})
        self.assertIn("calc-dirty-rate", str(e.exception))
        deadline = time.monotonic() + 30
        while (q := await src.cmd("query-dirty-rate"))["status"] != "measured":
            self.assertLess(time.monotonic(), deadline, q)
            await asyncio.sleep(0.05)
        self.assertNotIn("x-error", q)
        self.assertGreater(q["dirty-rate"], 0, q)
        self.assertLessEqual(q["dirty-rate"], 16, q)
        self.assertEqual(q["calc-time"], 1)
        self.assertEqual(await src.status(), "running")

    async def test_a_stopped_guest_migrates_and_stays_stopped_like_qemu(self):
        """`stop`, then `migrate`: the guest is migrated as it is and arrives paused (QEMU's
        way); `cont` on the destination runs it, from exactly where it stopped. A failed
        migration of a stopped guest leaves it stopped here."""
        src = await self.source("--working-set", "8M", "--dirty-rate", "20k")
        await src.cmd("stop")
        at_stop = (await src.cmd("x-livemig-verify"))["counter"]
        await src.cmd("migrate", {"uri": self.uri("nobody")})
        self.assertEqual((await src.wait_migration())["status"], "failed")
        self.assertEqual(await src.status(), "paused", "not resumed by the failure")
        dst = await self.destination()
        uri = self.uri("stopped")
        await dst.cmd("migrate-incoming", {"uri": uri})
        await src.cmd("migrate", {"uri": uri})
        self.assertEqual((await src.wait_migration())["status"], "completed")
        self.assertEqual((await dst.wait_migration())["status"], "completed")
        self.assertEqual(await dst.status(), "paused", "arrives as it left")
        v = await dst.cmd("x-livemig-verify")
        self.assertEqual(v["pages-mismatched"], 0, v)
        self.assertEqual(v["counter"], at_stop, "it did not run on the way")
        await dst.cmd("cont")
        self.assertEqual(await dst.status(), "running")
        await asyncio.sleep(0.3)
        self.assertGreater((await dst.cmd("x-livemig-verify"))["counter"], at_stop)

    async def test_quit_during_a_migration_cancels_and_joins_it(self):
        """`quit` while pages stream: the process cancels, joins and exits 0 promptly; the
        destination, told nothing, fails cleanly and waits again."""
        src = await self.source()
        dst = await self.destination()
        await src.cmd("migrate-set-parameters", {"max-bandwidth": 20 << 20})
        uri = self.uri("q")
        await dst.cmd("migrate-incoming", {"uri": uri})
        await src.cmd("migrate", {"uri": uri})
        await src.wait_status("active")
        t0 = time.monotonic()
        self.assertEqual(await src.quit(), 0, src.output())
        self.assertLess(time.monotonic() - t0, 10)
        self.assertEqual((await dst.wait_migration())["status"], "failed")
        self.assertEqual(await dst.status(), "inmigrate")
        self.assertEqual(await dst.threads_settle(), [])

    async def test_failed_migration_then_retry_elsewhere(self):
        """A destination that refuses: the source reports why and stays running; a retry
        to another destination succeeds; the destination can be cancelled while waiting."""
        src = await self.source()
        small = await self.destination("--max-guest-memory", "64M")
        uri = self.uri("small")
        await small.cmd("migrate-incoming", {"uri": uri})
        await src.cmd("migrate", {"uri": uri})
        q = await src.wait_migration()
        self.assertEqual(q["status"], "failed")
        self.assertIn("limit", q["error-desc"])
        await self.assert_source_intact(src)
        # The refusing destination still waits; cancel its wait, then it can wait again.
        self.assertEqual((await small.cmd("query-migrate"))["status"], "setup")
        await small.cmd("migrate_cancel")
        self.assertEqual((await small.wait_migration())["status"], "cancelled")
        self.assertEqual(await small.threads_settle(), [])
        await small.cmd("migrate-incoming", {"uri": self.uri("small2")})
        self.assertEqual((await small.cmd("query-migrate"))["status"], "setup")

        dst = await self.destination()
        uri = self.uri("ok")
        await dst.cmd("migrate-incoming", {"uri": uri})
        await src.cmd("migrate", {"uri": uri})
        self.assertEqual((await src.wait_migration())["status"], "completed")
        # The source completes when told the guest runs there; the destination's own status
        # follows a moment later (as QEMU's), and a check waits for it.
        self.assertEqual((await dst.wait_migration())["status"], "completed")
        self.assertEqual((await dst.cmd("x-livemig-verify"))["pages-mismatched"], 0)

    async def test_postcopy_like_a_qemu_user(self):
        """postcopy-ram, migrate-start-postcopy during precopy: postcopy-active on both
        sides, then completed; the source may not cancel meanwhile; the guest arrives exact
        with its pages fetched on demand."""
        # A guest that keeps a 32 MiB working set dirty; a link paced to 32 MB/s so that
        # precopy's first round takes seconds and the postcopy push about one, while the
        # guest's writes fault on the destination.
        src = await Vm(self.dir, "src", ["run", "--guest", "synthetic", "--memory", "128M",
                                         "--working-set", "32M", "--dirty-rate", "50k",
                                         "--warmup-ms", "200"]).start()
        self.vms.append(src)
        dst = await self.destination()
        await self.enable_events(src, dst)

        # Refused with QEMU's words: without the capability, and before any migration.
        with self.assertRaises(ExecuteError) as e:
            await src.cmd("migrate-start-postcopy")
        self.assertIn("Enable postcopy with migrate_set_capability", str(e.exception))
        with self.assertRaises(ExecuteError) as e:
            await src.cmd("migrate-set-capabilities", {"capabilities": [
                {"capability": "postcopy-preempt", "state": True}]})
        self.assertIn("Postcopy preempt requires postcopy-ram", str(e.exception))
        await src.cmd("migrate-set-capabilities", {"capabilities": [
            {"capability": "postcopy-ram", "state": True},
            {"capability": "postcopy-preempt", "state": True},
            {"capability": "postcopy-blocktime", "state": True}]})
        with self.assertRaises(ExecuteError) as e:
            await src.cmd("migrate-start-postcopy")
        self.assertIn("Postcopy must be started after migration has been started",
                      str(e.exception))
        # Postcopy takes no compressed pages yet: refused by the command, not a failure.
        await src.cmd("migrate-set-parameters", {"multifd-compression": "zstd"})
        with self.assertRaises(ExecuteError) as e:
            await src.cmd("migrate", {"uri": self.uri("zstd")})
        self.assertIn("compress", str(e.exception))
        await src.cmd("migrate-set-parameters", {"multifd-compression": "none",
                                                 "max-bandwidth": 32 << 20,
                                                 "downtime-limit": 50})

        # QEMU reports blocktime on the destination, per vCPU too.
        await dst.cmd("migrate-set-capabilities", {"capabilities": [
            {"capability": "postcopy-blocktime", "state": True}]})
        uri = self.uri("pc")
        with src.qmp.listener() as src_ev, dst.qmp.listener() as dst_ev, \
                src.qmp.listener("MIGRATION_PASS") as passes:
            await dst.cmd("migrate-incoming", {"uri": uri})
            await src.cmd("migrate", {"uri": uri})
            await next_event(passes, "MIGRATION_PASS")
            q = await src.cmd("query-migrate")
            self.assertEqual(q["status"], "active", q)
            self.assertGreater(q["ram"]["remaining"], 0, "precopy's first round under way")
            with self.assertRaises(ExecuteError):
                await src.cmd("migrate-set-capabilities", {"capabilities": [
                    {"capability": "postcopy-ram", "state": False}]})
            await src.cmd("migrate-start-postcopy")
            # The switch comes at the end of the round under way.
            q = await src.wait_status("postcopy-active", timeout=60)
            self.assertEqual(await src.status(), "finish-migrate")
            with self.assertRaises(ExecuteError) as e:
                await src.cmd("migrate_cancel")
            self.assertIn("Postcopy migration in progress, cannot cancel", str(e.exception))
            with self.assertRaises(ExecuteError) as e:
                await src.cmd("cont")
            self.assertIn("postcopy", str(e.exception))
            q = await src.wait_migration()
            self.assertEqual(q["status"], "completed", q)
            dq = await dst.wait_migration()
            self.assertEqual(dq["status"], "completed", dq)
            await asyncio.sleep(0.2)
            src_events = await drain(src_ev)
            dst_events = await drain(dst_ev)

        statuses = [e["data"]["status"] for e in src_events if e["event"] == "MIGRATION"]
        self.assertEqual(statuses, ["setup", "active", "postcopy-active", "completed"],
                         src_events)
        dst_statuses = [e["data"]["status"] for e in dst_events if e["event"] == "MIGRATION"]
        self.assertEqual(dst_statuses[-2:], ["postcopy-active", "completed"], dst_events)
        ram = q["ram"]
        self.assertGreater(ram["postcopy-bytes"], 0, q)
        self.assertEqual(ram["postcopy-bytes"] % 4096, 0, q)
        self.assertGreater(ram["postcopy-requests"], 0, q)
        self.assertIn("postcopy-blocktime", q)
        self.assertNotIn("postcopy-vcpu-blocktime", q, "the destination's figure")
        # The destination's: the guest's writers faulted (requests > 0), each counted for
        # the vCPU that waited.
        self.assertIsInstance(dq["postcopy-blocktime"], int, dq)
        per_vcpu = dq["postcopy-vcpu-blocktime"]
        self.assertIsInstance(per_vcpu, list, dq)
        self.assertGreater(len(per_vcpu), 0, dq)
        # Each vCPU's milliseconds rounded down: together at most the total.
        self.assertLessEqual(sum(per_vcpu), dq["postcopy-blocktime"], dq)
        self.assertEqual(ram["remaining"], 0)

        # The source keeps its copy paused for good; the guest runs on, exact, there.
        self.assertEqual(await src.status(), "postmigrate")
        at_pause = (await src.cmd("x-livemig-verify"))["counter"]
        self.assertEqual(await dst.status(), "running")
        v = await dst.cmd("x-livemig-verify")
        self.assertEqual(v["pages-mismatched"], 0, v)
        self.assertEqual(v["pages-checked"], 32768)
        self.assertGreaterEqual(v["counter"], at_pause)
        self.assertEqual(await src.threads_settle(), [])
        self.assertEqual(await dst.threads_settle(), [])

    async def postcopy_pair(self, src_uri, dst_uri):
        """A source whose postcopy push takes seconds, switched to postcopy towards a
        destination listening on `dst_uri` (reached through `src_uri`), once pages flow
        after the switch; returns both and the source's MIGRATION listener."""
        src = await Vm(self.dir, "src", ["run", "--guest", "synthetic", "--memory", "64M",
                                         "--working-set", "32M", "--dirty-rate", "50k",
                                         "--warmup-ms", "200"]).start()
        self.vms.append(src)
        dst = await self.destination()
        await self.enable_events(src, dst)
        await src.cmd("migrate-set-capabilities", {"capabilities": [
            {"capability": "postcopy-ram", "state": True}]})
        # Paced so that the postcopy push of the working set takes seconds.
        await src.cmd("migrate-set-parameters", {"max-bandwidth": 12 << 20,
                                                 "downtime-limit": 50})
        await dst.cmd("migrate-incoming", {"uri": dst_uri})
        await src.cmd("migrate", {"uri": src_uri})
        await src.wait_status("active")
        await src.cmd("migrate-start-postcopy")
        await src.wait_status("postcopy-active", timeout=60)
        # Past the pause: pages go out after the switch (the destination runs the guest).
        for _ in range(500):
            q = await src.cmd("query-migrate")
            if q["ram"]["postcopy-bytes"] > 0:
                break
            await asyncio.sleep(0.01)
        self.assertEqual(q["status"], "postcopy-active", q)
        self.assertGreater(q["ram"]["postcopy-bytes"], 0, q)
        return src, dst

    async def test_a_broken_postcopy_keeps_the_source_paused(self):
        """The destination killed after the switch: the guest's memory is split between the
        hosts, so the source goes to postcopy-paused and keeps its copy, as QEMU's: it may
        not be cancelled or resumed here, and a resume towards nobody pauses again."""
        uri = self.uri("broken")
        src, dst = await self.postcopy_pair(uri, uri)
        with src.qmp.listener("MIGRATION") as ev:
            dst.proc.kill()
            dst.proc.wait(10)
            self.vms.remove(dst)
            await dst.qmp.disconnect()
            dst.log.close()
            await src.wait_status("postcopy-paused", timeout=60)
            for cmd, args, words in (
                    ("migrate_cancel", None, "Postcopy migration in progress"),
                    ("cont", None, "postcopy"),
                    ("migrate-recover", {"uri": self.uri("x")}, "only be run when postcopy is paused"),
                    ("migrate", {"uri": self.uri("x")}, "in progress")):
                with self.assertRaises(ExecuteError, msg=cmd) as e:
                    await src.cmd(cmd, args)
                self.assertIn(words, str(e.exception), cmd)
            # A resume towards an address nobody listens on: tried, and paused again.
            await src.cmd("migrate", {"uri": self.uri("nobody"), "resume": True})
            statuses = []
            while statuses[-2:] != ["postcopy-recover", "postcopy-paused"]:
                statuses.append((await next_event(ev, "MIGRATION"))["data"]["status"])
        self.assertEqual(statuses, ["postcopy-paused", "postcopy-recover", "postcopy-paused"],
                         statuses)
        self.assertEqual(await src.status(), "finish-migrate", "never resumed here")
        self.assertGreater(len(migration_threads(src.proc.pid)), 0, "the migration waits")

    async def test_a_link_lost_in_postcopy_is_recovered_like_qemu(self):
        """Every connection cut after the switch: both sides go to postcopy-paused (the
        guest runs on the destination on what it has); `migrate-recover` on the destination
        and `migrate` with `resume: true` on the source resume it, as with QEMU, and the
        guest arrives exact."""
        real, proxied = self.uri("real"), self.uri("proxied")
        link = await Link(proxied[len("unix:"):], real[len("unix:"):]).start()
        try:
            src, dst = await self.postcopy_pair(proxied, real)
            with src.qmp.listener("MIGRATION") as src_ev, dst.qmp.listener("MIGRATION") as dst_ev:
                link.cut()
                await src.wait_status("postcopy-paused", timeout=60)
                await dst.wait_status("postcopy-paused", timeout=60)
                with self.assertRaises(ExecuteError) as e:
                    await dst.cmd("migrate_cancel")
                self.assertIn("Postcopy migration in progress", str(e.exception))
                with self.assertRaises(ExecuteError) as e:
                    await src.cmd("migrate-recover", {"uri": self.uri("x")})
                self.assertIn("only be run when postcopy is paused", str(e.exception))
                again = self.uri("again")
                await dst.cmd("migrate-recover", {"uri": again})
                self.assertEqual((await dst.cmd("query-migrate"))["status"], "postcopy-recover")
                await src.cmd("migrate", {"uri": again, "resume": True})
                q = await src.wait_migration()
                self.assertEqual(q["status"], "completed", q)
                dq = await dst.wait_migration()
                self.assertEqual(dq["status"], "completed", dq)
                await asyncio.sleep(0.2)
                src_statuses = [e["data"]["status"] for e in await drain(src_ev)]
                dst_statuses = [e["data"]["status"] for e in await drain(dst_ev)]
        finally:
            await link.close()
        self.assertEqual(src_statuses, ["postcopy-paused", "postcopy-recover",
                                        "postcopy-active", "completed"], src_statuses)
        self.assertEqual(dst_statuses, ["postcopy-paused", "postcopy-recover",
                                        "postcopy-active", "completed"], dst_statuses)
        at_pause = (await src.cmd("x-livemig-verify"))["counter"]
        v = await dst.cmd("x-livemig-verify")
        self.assertEqual(v["pages-mismatched"], 0, v)
        self.assertGreaterEqual(v["counter"], at_pause)
        self.assertEqual(await src.threads_settle(), [])
        self.assertEqual(await dst.threads_settle(), [])

    async def test_pause_before_switchover_like_qemu(self):
        """pause-before-switchover: the guest paused for the switchover, the migration holds
        in pre-switchover until migrate-continue (its state named, as QEMU checks), then
        device, completed; a cancel while it holds gives the guest back to the source."""
        src = await self.source()
        await self.enable_events(src)
        await src.cmd("migrate-set-capabilities", {"capabilities": [
            {"capability": "pause-before-switchover", "state": True}]})
        with self.assertRaises(ExecuteError) as e:
            await src.cmd("migrate-continue", {"state": "pre-switchover"})
        self.assertIn("Migration not in expected state: none", str(e.exception))

        # Held, then cancelled: the guest runs on here, exact.
        dst = await self.destination()
        await dst.cmd("migrate-incoming", {"uri": self.uri("held")})
        await src.cmd("migrate", {"uri": self.uri("held")})
        await src.wait_status("pre-switchover")
        self.assertEqual(await src.status(), "finish-migrate", "paused while it holds")
        await src.cmd("migrate_cancel")
        self.assertEqual((await src.wait_migration())["status"], "cancelled")
        self.assertEqual(await src.status(), "running")
        self.assertEqual((await src.cmd("x-livemig-verify"))["pages-mismatched"], 0)

        # QEMU 9.1's form of the address, on both sides.
        dst = await self.destination()
        path = self.uri("go")[len("unix:"):]
        channels = [{"channel-type": "main",
                     "addr": {"transport": "socket", "type": "unix", "path": path}}]
        with src.qmp.listener("MIGRATION") as ev:
            await dst.cmd("migrate-incoming", {"channels": channels})
            await src.cmd("migrate", {"channels": channels})
            await src.wait_status("pre-switchover")
            with self.assertRaises(ExecuteError) as e:
                await src.cmd("migrate-continue", {"state": "active"})
            self.assertIn("Migration not in expected state: pre-switchover", str(e.exception))
            await src.cmd("migrate-continue", {"state": "pre-switchover"})
            q = await src.wait_migration()
            statuses = [x["data"]["status"] for x in await drain(ev)]
        self.assertEqual(q["status"], "completed", q)
        self.assertEqual(statuses, ["setup", "active", "pre-switchover", "device", "completed"],
                         statuses)
        self.assertEqual((await dst.wait_migration())["status"], "completed")
        self.assertEqual((await dst.cmd("x-livemig-verify"))["pages-mismatched"], 0)

    async def test_a_switchover_past_the_hard_limit_is_abandoned_and_tried_again(self):
        """x-downtime-hard-limit, livemig's own: a device whose first final read stalls for 10 s
        has its switchover abandoned at 100 ms; SWITCHOVER_ABANDONED says so, the status goes
        back to active (the guest runs here), and the next switchover completes, every page
        exact; query-migrate lists the abandoned switchover with the pause the guest saw."""
        src = await self.source("--device", "vfio-sim,size=4M,precopy=1M,stall_final_ms=10000")
        dst = await self.destination()
        await self.enable_events(src)
        await src.cmd("migrate-set-parameters", {"x-downtime-hard-limit": 100})
        await dst.cmd("migrate-incoming", {"uri": self.uri("hard")})
        with src.qmp.listener(("MIGRATION", "SWITCHOVER_ABANDONED", "STOP", "RESUME")) as ev:
            await src.cmd("migrate", {"uri": self.uri("hard")})
            q = await src.wait_migration()
            events = await drain(ev)
        self.assertEqual(q["status"], "completed", q)
        # The stalled one; a loaded host may cut a later one at the bound too.
        abandoned = [e["data"] for e in events if e["event"] == "SWITCHOVER_ABANDONED"]
        self.assertGreaterEqual(len(abandoned), 1, events)
        self.assertLess(abandoned[0]["paused-ms"], 5000, "not held for the stalled read")
        # Paused, abandoned, running again (each time), paused for the switchover that
        # completed.
        order = [e["event"] for e in events if e["event"] != "MIGRATION"]
        cut = ["SWITCHOVER_ABANDONED", "RESUME", "STOP"] * len(abandoned)
        self.assertEqual(order, ["STOP"] + cut, events)
        statuses = [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]
        self.assertEqual(statuses, ["setup", "active", "completed"], statuses)
        listed = q["x-abandoned-switchovers"]
        self.assertEqual(len(listed), len(abandoned), q)
        self.assertGreaterEqual(listed[0]["cut-ms"], 100)
        self.assertEqual((await dst.wait_migration())["status"], "completed")
        self.assertEqual((await dst.cmd("x-livemig-verify"))["pages-mismatched"], 0)

    async def test_bad_requests_and_wrong_states_keep_the_server_serving(self):
        src = await self.source()
        dst = await self.destination()
        cases = [
            (src, "no-such-command", None, "CommandNotFound", "has not been found"),
            (src, "migrate", {"uri": 5}, "GenericError", "expected: string"),
            (src, "migrate", {}, "GenericError", "Either 'uri' or 'channels'"),
            (src, "migrate", {"uri": "tcp:a:1", "channels": []}, "GenericError",
             "Either 'uri' or 'channels'"),
            (src, "migrate", {"uri": "tcp:a:1", "bogus": 1}, "GenericError", "'bogus' is unexpected"),
            (src, "migrate", {"uri": "ftp://x"}, "GenericError", "URI"),
            (src, "migrate-incoming", {"uri": self.uri("x")}, "GenericError", "has a guest already"),
            (dst, "migrate", {"uri": self.uri("x")}, "GenericError", "no guest here"),
            (dst, "cont", None, "GenericError", "no guest here"),
            (src, "migrate-set-capabilities",
             {"capabilities": [{"capability": "xbzrle", "state": True}]}, "GenericError", "'xbzrle'"),
            (src, "migrate-set-parameters", {"multifd-channels": 0}, "GenericError", "multifd-channels"),
            (src, "migrate-set-parameters", {"downtime-limit": "fast"}, "GenericError", "downtime-limit"),
        ]
        for vm, cmd, args, cls, text in cases:
            with self.assertRaises(ExecuteError, msg=cmd) as e:
                await vm.cmd(cmd, args)
            self.assertEqual(e.exception.error_class, cls, f"{cmd} {args}")
            self.assertIn(text, str(e.exception), f"{cmd} {args}")
            self.assertEqual(await vm.status(), "running" if vm is src else "inmigrate")

        # stop / cont, with their events.
        with src.qmp.listener(("STOP", "RESUME")) as ev:
            await src.cmd("stop")
            self.assertEqual(await src.status(), "paused")
            await src.cmd("cont")
            self.assertEqual([x["event"] for x in await drain(ev)], ["STOP", "RESUME"])

        # Raw bytes a library would never send, on a second connection at the same time.
        r, w = await asyncio.open_unix_connection(src.sock)
        greeting = json.loads(await r.readline())
        self.assertIn("QMP", greeting)

        async def raw(data):
            w.write(data)
            await w.drain()
            return json.loads(await asyncio.wait_for(r.readline(), 10))

        self.assertEqual((await raw(b'{"execute":"query-status"}'))["error"]["class"],
                         "CommandNotFound", "negotiation comes first")
        self.assertIn("return", await raw(b'{"execute":"qmp_capabilities"}'))
        self.assertIn("JSON parse error", (await raw(b'{"execute": nope}'))["error"]["desc"])
        self.assertIn("must be a JSON object", (await raw(b'"hello"\n'))["error"]["desc"])
        self.assertIn("lacks member 'execute'", (await raw(b'{"arguments":{}}'))["error"]["desc"])
        both = await raw(b'{"execute":"query-status","id":1}{"execute":"query-status","id":2}')
        self.assertEqual(both["id"], 1)
        self.assertEqual(json.loads(await r.readline())["id"], 2)
        # A client that leaves in the middle of a command.
        w.write(b'{"execute":"x-livemig-verify"}')
        await w.drain()
        w.close()
        # The library's connection still works.
        self.assertEqual(await src.status(), "running")
        self.assertEqual((await src.cmd("x-livemig-verify"))["pages-mismatched"], 0)

        # Two library clients on one socket, both seeing events.
        second = QMPClient("second")
        await second.connect(src.sock)
        with src.qmp.listener("STOP") as a, second.listener("STOP") as b:
            await second.execute("stop")
            await next_event(a, "STOP", timeout=10)
            await next_event(b, "STOP", timeout=10)
        await src.cmd("cont")
        await second.disconnect()


if __name__ == "__main__":
    unittest.main()
