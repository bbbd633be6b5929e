//! Real links between two network namespaces joined by a veth pair, made by each test and
//! removed after it (a guard deletes them even when the test fails), with the source in
//! one namespace and the destination in the other and traffic only between the two
//! addresses the test assigned them (10.77.N.1 and 10.77.N.2):
//!
//! - a slow link: a token bucket (`tc qdisc ... tbf`) of 400 Mbit/s on the source's side;
//! - a lossy link: 2 % of packets dropped each way (`nft ... numgen random mod 100 < 2 drop`);
//! - a high-latency link: livemig's own delaying proxy (`livemig-faultnet`) inside the
//!   source's namespace, 25 ms each way. (This kernel has no netem; a proxy that stamps
//!   each chunk and releases it 25 ms later keeps the throughput of the link, which a
//!   per-chunk sleep would not.)
//!
//! Each migration completes, every page checked at the destination and none wrong. Without
//! `ip`, `tc`, `nft` or network namespaces a test says `SKIPPED (...)` and adds a line to
//! the file named by `LIVEMIG_SKIP_LOG`.

mod common;
mod faults_common;

use common::*;
use faults_common::*;
use livemig_faultnet::Proxy;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

static SERIAL: Mutex<()> = Mutex::new(());

/// The full path of `tool`, from PATH or the sbin directories root's PATH may lack.
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs a command to its end; its stderr on failure.
fn run(cmd: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{}: {e}", cmd.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{} {}: {}",
            cmd.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two namespaces joined by a veth pair: `a` holds 10.77.N.1, `b` 10.77.N.2. Both go (and
/// the veth pair with them) when this is dropped.
struct Link {
    ip: PathBuf,
    a: String,
    b: String,
    dev_a: String,
    dev_b: String,
    addr_a: String,
    addr_b: String,
}

impl Link {
    /// Namespaces for test number `n`, or why they cannot be made here.
    fn new(n: u8) -> Result<Link, String> {
        let ip = tool("ip").ok_or("no 'ip' command (iproute2)")?;
        remove_stale(&ip);
        let pid = std::process::id();
        let link = Link {
            a: format!("lmf{pid}-{n}a"),
            b: format!("lmf{pid}-{n}b"),
            dev_a: format!("lmf{}{n}a", pid % 100_000),
            dev_b: format!("lmf{}{n}b", pid % 100_000),
            addr_a: format!("10.77.{n}.1"),
            addr_b: format!("10.77.{n}.2"),
            ip,
        };
        let ip = link.ip.clone();
        // Namespaces first: from here on, dropping `link` removes whatever was made.
        run(&ip, &["netns", "add", &link.a])
            .map_err(|e| format!("cannot create network namespaces: {e}"))?;
        run(&ip, &["netns", "add", &link.b])?;
        run(
            &ip,
            &[
                "link",
                "add",
                &link.dev_a,
                "netns",
                &link.a,
                "type",
                "veth",
                "peer",
                "name",
                &link.dev_b,
                "netns",
                &link.b,
            ],
        )?;
        for (ns, dev, addr) in [
            (&link.a, &link.dev_a, &link.addr_a),
            (&link.b, &link.dev_b, &link.addr_b),
        ] {
            run(
                &ip,
                &["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev],
            )?;
            run(&ip, &["-n", ns, "link", "set", dev, "up"])?;
            run(&ip, &["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(link)
    }

    /// Runs `cmd ARGS` inside namespace `ns`.
    fn exec(&self, ns: &str, cmd: &Path, args: &[&str]) -> Result<String, String> {
        let mut a = vec!["netns", "exec", ns, cmd.to_str().unwrap()];
        a.extend_from_slice(args);
        run(&self.ip, &a)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            if let Err(e) = run(&self.ip, &["netns", "del", ns]) {
                eprintln!("removing network namespace {ns}: {e}");
            }
        }
    }
}

/// Removes namespaces an earlier run of these tests left behind (its process gone).
fn remove_stale(ip: &Path) {
    let Ok(list) = run(ip, &["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix("lmf") else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(ip, &["netns", "del", name]);
        }
    }
}

/// The link for test `n` with `tools`, or `None` after saying why the test is skipped.
fn link_or_skip(n: u8, tools: &[&str]) -> Option<(Link, Vec<PathBuf>)> {
    let mut found = Vec::new();
    for t in tools {
        match tool(t) {
            Some(p) => found.push(p),
            None => {
                skip(&format!("no '{t}' command"));
                return None;
            }
        }
    }
    match Link::new(n) {
        Ok(l) => Some((l, found)),
        Err(e) => {
            skip(&e);
            None
        }
    }
}

/// A destination in `link.b`, listening on its address.
fn destination(link: &Link) -> (Proc, String) {
    let listen = format!("--listen=tcp:{}:0", link.addr_b);
    let mut p = spawn_in(Some(&link.b), &["incoming", "--json", "--verify", &listen]);
    let l = p.expect_event("listening");
    let addr = l["addr"].as_str().unwrap().to_string();
    (p, addr)
}

/// A source in `link.a` migrating a guest of `memory` to `to`.
fn source(link: &Link, to: &str, memory: &str, extra: &[&str]) -> Proc {
    let memory = format!("--memory={memory}");
    let options = [
        &memory,
        "--working-set=8M",
        "--dirty-rate=5k",
        "--warmup-ms=50",
    ];
    let args = synthetic_source_args(to, &options);
    spawn_in(Some(&link.a), &[&strs(&args)[..], extra].concat())
}

/// The migration completed and every one of `pages` was checked, none wrong; returns the
/// source's report.
fn completes(src: &mut Proc, dest: &mut Proc, pages: u64, what: &str) -> serde_json::Value {
    let end = src
        .wait_within(&["completed", "attempt_failed"], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{what}: {e}: {:#?}", src.seen));
    assert_eq!(end["event"], "completed", "{what}: {end:#}");
    let report = end["report"].clone();
    assert_eq!(u64_at(&report, &["pages_mismatched"]), 0);
    assert!(src.wait_exit().success());
    let recv = dest.expect_event("received");
    assert_eq!(u64_at(&recv["report"]["verify"], &["pages_checked"]), pages);
    assert_eq!(u64_at(&recv["report"]["verify"], &["pages_mismatched"]), 0);
    assert!(dest.wait_exit().success());
    println!(
        "{what}: {} MiB in {:.0} ms ({:.0} MB/s), set-up {:.0} ms, {} rounds, downtime {:.1} ms",
        u64_at(&report, &["transferred_bytes"]) >> 20,
        report["total_ms"].as_f64().unwrap(),
        report["bytes_per_s"].as_f64().unwrap() / 1e6,
        report["setup_ms"].as_f64().unwrap(),
        report["rounds"].as_array().map_or(0, Vec::len),
        report["downtime_ms"].as_f64().unwrap()
    );
    report
}

#[test]
fn a_slow_link_of_400_mbits_carries_a_migration_exact() {
    let _s = serial(&SERIAL);
    let Some((link, tools)) = link_or_skip(1, &["ip", "tc"]) else {
        return;
    };
    let tc = &tools[1];
    link.exec(
        &link.a,
        tc,
        &[
            "qdisc",
            "add",
            "dev",
            &link.dev_a,
            "root",
            "tbf",
            "rate",
            "400mbit",
            "burst",
            "256kb",
            "latency",
            "50ms",
        ],
    )
    .expect("tc tbf");
    let (mut dest, addr) = destination(&link);
    let mut src = source(&link, &addr, "128M", &[]);
    let report = completes(&mut src, &mut dest, 32768, "400 Mbit/s link");
    // The bucket held: the rate cannot exceed 50 MB/s (plus its burst).
    let rate = report["bytes_per_s"].as_f64().unwrap();
    assert!(rate < 56e6, "{rate} bytes/s through a 400 Mbit/s bucket");
    let stats = link
        .exec(&link.a, tc, &["-s", "qdisc", "show", "dev", &link.dev_a])
        .unwrap();
    println!("400 Mbit/s link: {}", stats.replace('\n', " "));
}

/// Reads the packets an nft counter rule matched in `ns`.
fn dropped(link: &Link, ns: &str, nft: &Path) -> u64 {
    let out = link
        .exec(ns, nft, &["list", "chain", "inet", "lmloss", "out"])
        .unwrap();
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_lossy_link_dropping_2_percent_carries_a_migration_exact() {
    let _s = serial(&SERIAL);
    let Some((link, tools)) = link_or_skip(2, &["ip", "nft"]) else {
        return;
    };
    let nft = &tools[1];
    // One wire-sized packet per segment (no 64 KiB GSO super-packets), so the rule drops
    // 2 % of real packets.
    for (ns, dev) in [(&link.a, &link.dev_a), (&link.b, &link.dev_b)] {
        if let Err(e) = link.exec(
            ns,
            &link.ip,
            &["link", "set", "dev", dev, "gso_max_segs", "1"],
        ) {
            println!("(segments stay GSO-sized: {e})");
        }
    }
    for (ns, peer) in [(&link.a, &link.addr_b), (&link.b, &link.addr_a)] {
        link.exec(ns, nft, &["add", "table", "inet", "lmloss"])
            .expect("nft table");
        link.exec(
            ns,
            nft,
            &[
                "add",
                "chain",
                "inet",
                "lmloss",
                "out",
                "{ type filter hook output priority 0; policy accept; }",
            ],
        )
        .expect("nft chain");
        link.exec(
            ns,
            nft,
            &[
                "add", "rule", "inet", "lmloss", "out", "ip", "daddr", peer, "numgen", "random",
                "mod", "100", "<", "2", "counter", "drop",
            ],
        )
        .expect("nft rule");
    }
    let (mut dest, addr) = destination(&link);
    let mut src = source(
        &link,
        &addr,
        "64M",
        &["--device=vfio-sim,size=8M,rate=200M"],
    );
    completes(&mut src, &mut dest, 16384, "2 % loss each way");
    let (a, b) = (dropped(&link, &link.a, nft), dropped(&link, &link.b, nft));
    println!("2 % loss each way: {a} packets dropped towards the destination, {b} back");
    assert!(a > 0, "the loss rule dropped nothing");
}

#[test]
fn a_link_with_25_ms_each_way_carries_a_migration_exact() {
    let _s = serial(&SERIAL);
    let Some((link, _)) = link_or_skip(3, &["ip"]) else {
        return;
    };
    let (mut dest, addr) = destination(&link);
    // The proxy lives in the source's namespace, on the source's address, and reaches the
    // destination over the veth pair.
    let one_way = Duration::from_millis(25);
    let proxy = Proxy::builder(sockaddr(&addr))
        .listen(format!("{}:0", link.addr_a).parse().unwrap())
        .netns(format!("/run/netns/{}", link.a))
        .latency(one_way)
        .start()
        .expect("the delaying proxy in the source's namespace");
    let via = format!("tcp:{}", proxy.addr());
    let mut src = source(
        &link,
        &via,
        "64M",
        &[
            "--device=vfio-sim,size=16M,rate=200M",
            "--device=vmstate-sim",
        ],
    );
    let report = completes(&mut src, &mut dest, 16384, "25 ms each way");
    // Set-up is a round trip for the session and one for the data channels, whose hellos
    // all go out before any answer is awaited (it was one round trip per channel: 5 in all).
    let setup = report["setup_ms"].as_f64().unwrap();
    assert!(
        (2.0 * 50.0..4.0 * 50.0).contains(&setup),
        "set-up of {setup} ms over a 50 ms round trip: two round trips expected"
    );
    assert_eq!(proxy.connections(), 5);
    assert!(proxy.fired().is_empty());
    drop(proxy);
}

#[test]
fn a_guest_outrunning_a_200_mbit_link_completes_with_postcopy() {
    let _s = serial(&SERIAL);
    let Some((link, tools)) = link_or_skip(4, &["ip", "tc"]) else {
        return;
    };
    let tc = &tools[1];
    let bucket = [
        "qdisc",
        "add",
        "dev",
        &link.dev_a,
        "root",
        "tbf",
        "rate",
        "200mbit",
        "burst",
        "256kb",
        "latency",
        "50ms",
    ];
    link.exec(&link.a, tc, &bucket).expect("tc tbf");
    let (mut dest, addr) = destination(&link);
    // The KVM guest where it runs (else the synthetic one) writing a 32 MiB working set as
    // fast as it can: far faster than 25 MB/s, so precopy never converges (auto-converge
    // off), and at the round bound the migration switches to postcopy.
    let guest = if livemig_vmm::kvm::usable_or_skip() {
        "--guest=kvm"
    } else {
        "--guest=synthetic"
    };
    let to = format!("--to={addr}");
    let args = [
        "migrate",
        "--json",
        &to,
        guest,
        "--memory=128M",
        "--working-set=32M",
        "--dirty-rate=0",
        "--warmup-ms=200",
        "--downtime-limit-ms=50",
        "--auto-converge=false",
        "--max-rounds=2",
        "--postcopy",
        "--on-no-convergence=postcopy",
    ];
    let mut src = spawn_in(Some(&link.a), &args);
    let report = completes(&mut src, &mut dest, 32768, "postcopy over 200 Mbit/s");
    let pc = &report["postcopy"];
    assert!(pc.is_object(), "switched to postcopy: {report:#}");
    assert!(u64_at(pc, &["pages"]) > 0, "{pc:#}");
    // Two precopy rounds, no switchover round: the pause sent no RAM.
    assert_eq!(
        report["rounds"].as_array().map(Vec::len),
        Some(2),
        "{report:#}"
    );
    assert_eq!(report["forced_switchover"], false);
}
