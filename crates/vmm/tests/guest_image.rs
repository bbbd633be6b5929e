//! livemig's guest image over its console: under livemig (two vCPUs, `status` and `verify`
//! on COM1, a command waiting in the UART's FIFO carried across a migration) and, where
//! `qemu-system-x86_64` and /dev/kvm work, the same image booted by QEMU, verified by itself,
//! migrated QEMU to QEMU and verified again on the destination. Skipped (with a line saying
//! so) where /dev/kvm or QEMU is missing.

use livemig_engine::Guest;
use livemig_vmm::kvm::{
    create_paused, usable_or_skip, KvmConfig, KvmGuest, COMMAND_TIMEOUT, DEFAULT_IMAGE,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// The number after `key=` in `line`.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

#[test]
fn livemig_guest_answers_on_com1_and_its_uart_moves_with_it() {
    if !usable_or_skip() {
        return;
    }
    let g = KvmGuest::start(&KvmConfig {
        memory_bytes: 64 << 20,
        vcpus: 2,
        fill: 0.5,
        working_set_pages: 2048,
        rate: 100_000,
        ..KvmConfig::default()
    })
    .unwrap();
    let lines = g.console().lines();
    assert!(
        lines.iter().any(|l| l.starts_with("livemig-guest: boot ")
            && l.contains("vcpus=2")
            && l.contains("tsc_khz=")),
        "{lines:?}"
    );
    let ready = lines
        .iter()
        .find(|l| l.starts_with("livemig-guest: ready filled="))
        .expect("a ready line");
    let filled = field(ready, "filled=");
    assert_eq!(filled, g.layout().data_pages() / 2);
    // The debug port says the same (its copy of the ready line may still be on its way).
    assert!(g
        .console()
        .debug_lines()
        .iter()
        .any(|l| l.starts_with("livemig-guest: boot ")));

    let s1 = g
        .command("status", "livemig-guest: counter=", COMMAND_TIMEOUT)
        .unwrap();
    let v = g
        .command("verify", "livemig-guest: verify", COMMAND_TIMEOUT)
        .unwrap();
    assert!(v.starts_with("livemig-guest: verify ok "), "{v}");
    assert!(field(&v, "pages=") >= filled, "{v}");
    assert!(
        field(&v, "counter=") > field(&s1, "counter="),
        "{s1} then {v}"
    );
    let e = g
        .command("bogus", "livemig-guest: unknown command", COMMAND_TIMEOUT)
        .unwrap();
    assert!(e.ends_with("bogus"), "{e}");

    // A page broken behind the guest's back: its own verify names it.
    g.pause().unwrap();
    // Outside the working set (the first 2048 data pages), so the guest's own writes never
    // repair it before its verify looks (they did, now and then, on a loaded machine).
    let victim = g.layout().first_data_page + 2048 + 7;
    assert!(victim - g.layout().first_data_page < filled);
    g.memory()
        .write_obj(0xdead_u64, GuestAddress(victim * 4096 + 800))
        .unwrap();
    g.resume().unwrap();
    let v = g
        .command("verify", "livemig-guest: verify", COMMAND_TIMEOUT)
        .unwrap();
    assert!(
        v.starts_with(&format!(
            "livemig-guest: verify bad page=0x{:x}",
            victim * 4096
        )),
        "{v}"
    );
    // Repair it (the generation the table says), so the move below starts exact.
    g.pause().unwrap();
    let gen: u32 = g
        .memory()
        .read_obj(GuestAddress(g.layout().gen_addr(victim)))
        .unwrap();
    let mut page = [0u8; 4096];
    livemig_vmm::pattern::fill(&mut page, victim, gen);
    g.memory()
        .write_slice(&page, GuestAddress(victim * 4096))
        .unwrap();

    // Paused, a command waits in the UART's FIFO: it must travel in the state and be
    // answered on the destination.
    assert_eq!(g.console().send(b"status\n", Duration::ZERO), 7);
    let desc = g.descriptor();
    let to = create_paused(&desc).unwrap();
    let mut buf = [0u8; 4096];
    for p in 0..desc.memory_bytes() / 4096 {
        g.memory()
            .read_slice(&mut buf, GuestAddress(p * 4096))
            .unwrap();
        to.memory()
            .write_slice(&buf, GuestAddress(p * 4096))
            .unwrap();
    }
    let blob = g.save_state().unwrap();
    let at_pause = g.counter();
    let v = g.verify().unwrap();
    assert_eq!(v.pages_mismatched, 0, "source: {:?}", v.examples);
    drop(g);
    to.restore_state(&blob).unwrap();
    let v = to.verify().unwrap();
    assert_eq!(v.pages_mismatched, 0, "destination: {:?}", v.examples);
    assert_eq!(to.counter(), at_pause);
    to.resume().unwrap();
    let s = to
        .console()
        .wait_line(
            0,
            COMMAND_TIMEOUT,
            |l| l.starts_with("livemig-guest: counter="),
            || false,
        )
        .expect("the command that waited in the FIFO is answered on the destination");
    assert!(field(&s, "counter=") >= at_pause, "{s} after {at_pause}");
    let v = to
        .command("verify", "livemig-guest: verify", COMMAND_TIMEOUT)
        .unwrap();
    assert!(v.starts_with("livemig-guest: verify ok "), "{v}");
    assert!(field(&v, "counter=") > at_pause, "{v} after {at_pause}");
}

/// Where QEMU is, or None (with the skip line) where it or /dev/kvm is not usable.
fn qemu_or_skip() -> Option<PathBuf> {
    if !usable_or_skip() {
        return None;
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let thread = std::thread::current();
        let test = thread.name().unwrap_or("a test");
        eprintln!("{test}: SKIPPED (no qemu-system-x86_64)");
        if let Some(path) = std::env::var_os("LIVEMIG_SKIP_LOG") {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ =
                    f.write_all(format!("{test}: SKIPPED (no qemu-system-x86_64)\n").as_bytes());
            }
        }
    }
    found
}

/// A QEMU process, killed when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu(bin: &Path, dir: &Path, name: &str, image: &Path, incoming: Option<u16>) -> Qemu {
    let sock = |what: &str| dir.join(format!("{name}.{what}"));
    let mut c = Command::new(bin);
    c.args([
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        "512",
    ])
    .args(["-nodefaults", "-display", "none", "-no-reboot"])
    .arg("-kernel")
    .arg(image)
    .args(["-append", "fill=128M ws=16M rate=20000 pace=spin"])
    .arg("-serial")
    .arg(format!(
        // wait=on: QEMU starts the guest once the test is connected, so no line is lost.
        "unix:{},server=on,wait=on",
        sock("serial").display()
    ))
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", sock("qmp").display()))
    .arg("-debugcon")
    .arg(format!("file:{}", sock("debugcon").display()))
    .args(["-global", "isa-debugcon.iobase=0xe9"])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    if let Some(port) = incoming {
        c.arg("-incoming").arg(format!("tcp:127.0.0.1:{port}"));
    }
    Qemu(c.spawn().expect("start qemu-system-x86_64"))
}

fn connect(path: &Path) -> UnixStream {
    let t = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if t.elapsed() > Duration::from_secs(20) => {
                panic!("connecting to {}: {e}", path.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// COM1 of a QEMU guest: lines in, commands out.
struct Serial {
    lines: BufReader<UnixStream>,
    out: UnixStream,
}

impl Serial {
    fn open(path: &Path) -> Self {
        let s = connect(path);
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Serial {
            out: s.try_clone().unwrap(),
            lines: BufReader::new(s),
        }
    }

    /// The first line starting with `prefix` within `timeout`.
    fn wait(&mut self, prefix: &str, timeout: Duration) -> String {
        let t = Instant::now();
        let mut line = String::new();
        loop {
            assert!(t.elapsed() < timeout, "no line starting with {prefix:?}");
            match self.lines.read_line(&mut line) {
                Ok(0) => panic!("the serial socket closed"),
                Ok(_) if line.ends_with('\n') => {
                    let l = line.trim_end().to_string();
                    line.clear();
                    if let Some(at) = l.find(prefix) {
                        return l[at..].to_string();
                    }
                }
                _ => {}
            }
        }
    }

    fn command(&mut self, cmd: &str, prefix: &str) -> String {
        self.out.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        self.wait(prefix, Duration::from_secs(60))
    }
}

/// QMP: one command, its `return` (or error) line.
fn qmp(s: &mut BufReader<UnixStream>, cmd: &str) -> String {
    s.get_mut().write_all(cmd.as_bytes()).unwrap();
    let mut line = String::new();
    loop {
        line.clear();
        s.read_line(&mut line).unwrap();
        if line.contains("\"return\"") || line.contains("\"error\"") {
            return line.replace(' ', "");
        }
    }
}

#[test]
fn qemu_boots_the_image_and_migrates_it_exactly() {
    let Some(bin) = qemu_or_skip() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("livemig-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("guest.elf");
    std::fs::write(&image, DEFAULT_IMAGE).unwrap();

    let _src = qemu(&bin, &dir, "src", &image, None);
    let mut com1 = Serial::open(&dir.join("src.serial"));
    let boot = com1.wait("livemig-guest: boot ", Duration::from_secs(60));
    assert_eq!(field(&boot, "memory="), 510 << 20, "{boot}");
    let ready = com1.wait("livemig-guest: ready ", Duration::from_secs(60));
    assert_eq!(field(&ready, "filled="), 32768, "{ready}");
    let v = com1.command("verify", "livemig-guest: verify");
    assert!(v.starts_with("livemig-guest: verify ok "), "{v}");
    let before = field(&v, "counter=");
    let debug = std::fs::read_to_string(dir.join("src.debugcon")).unwrap();
    assert!(
        debug.contains("livemig-guest: ready filled=32768"),
        "{debug}"
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _dst = qemu(&bin, &dir, "dst", &image, Some(port));
    let mut dst_com1 = Serial::open(&dir.join("dst.serial"));
    // The destination answers QMP from its main loop, after its incoming listener is up.
    let mut dq = BufReader::new(connect(&dir.join("dst.qmp")));
    let mut greeting = String::new();
    dq.read_line(&mut greeting).unwrap();
    assert!(qmp(&mut dq, r#"{"execute":"qmp_capabilities"}"#).contains("return"));
    let st = qmp(&mut dq, r#"{"execute":"query-status"}"#);
    assert!(st.contains("\"status\":\"inmigrate\""), "{st}");
    let mut q = BufReader::new(connect(&dir.join("src.qmp")));
    let mut greeting = String::new();
    q.read_line(&mut greeting).unwrap();
    assert!(qmp(&mut q, r#"{"execute":"qmp_capabilities"}"#).contains("return"));
    let r = qmp(
        &mut q,
        &format!(r#"{{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#),
    );
    assert!(r.contains("\"return\""), "{r}");
    let t = Instant::now();
    loop {
        let r = qmp(&mut q, r#"{"execute":"query-migrate"}"#);
        if r.contains("\"status\":\"completed\"") {
            break;
        }
        assert!(!r.contains("\"status\":\"failed\""), "{r}");
        assert!(t.elapsed() < Duration::from_secs(60), "migration: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The destination runs the guest on: its own check of every page, and its counter went
    // on from where the source's was.
    let v = dst_com1.command("verify", "livemig-guest: verify");
    assert!(v.starts_with("livemig-guest: verify ok "), "{v}");
    assert!(field(&v, "counter=") > before, "{v} after {before}");
    let s = dst_com1.command("status", "livemig-guest: counter=");
    assert!(field(&s, "counter=") >= field(&v, "counter="), "{s}");
    let mut rest = Vec::new();
    let _ = q
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(10)));
    let _ = q.read_to_end(&mut rest);
    let _ = std::fs::remove_dir_all(&dir);
}
