//! `--compress zstd`: pages travel as zstd frames where that makes them smaller. Source and
//! destination in one process over real loopback sockets, a guest whose memory compresses
//! well (text-like pages) and one whose memory does not (livemig's page pattern): every byte
//! of the destination's memory must equal the source's, the compressible guest must cost far
//! fewer bytes on the wire, and the incompressible one no more than uncompressed.

use livemig_engine::{
    migrate, receive, Guest, IncomingConfig, Listener, MigrationConfig, MigrationReport,
};
use livemig_vmm::synthetic::{SyntheticConfig, SyntheticGuest, Workload};
use livemig_vmm::Factory;
use livemig_wire::PAGE_SIZE;
use vm_memory::{Bytes, GuestAddress};

const MEMORY: u64 = 32 << 20;

fn idle_guest() -> SyntheticGuest {
    SyntheticGuest::start(&SyntheticConfig {
        memory_bytes: MEMORY,
        fill: 1.0,
        workload: Workload {
            working_set_pages: 0,
            rate: 0,
            threads: 1,
        },
        backing: Default::default(),
    })
    .expect("start the synthetic guest")
}

/// Migrates `g` in-process with `config`; returns the source's report and whether the
/// destination's memory equals the source's, byte for byte.
fn migrate_and_compare(g: &SyntheticGuest, config: &MigrationConfig) -> (MigrationReport, bool) {
    migrate_to(g, config, &IncomingConfig::default())
}

/// [`migrate_and_compare`] to a destination configured with `in_config`.
fn migrate_to(
    g: &SyntheticGuest,
    config: &MigrationConfig,
    in_config: &IncomingConfig,
) -> (MigrationReport, bool) {
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let to = listener.local_endpoint().unwrap();
    let (report, incoming) = std::thread::scope(|s| {
        let dest = s.spawn(|| receive(&listener, &Factory, in_config, &|_| {}));
        let src = migrate(g, &to, config, &|_| {});
        (
            src.expect("migration"),
            dest.join().unwrap().expect("incoming"),
        )
    });
    let (src, dst) = (g.memory(), incoming.guest.memory());
    let mut a = vec![0u8; PAGE_SIZE];
    let mut b = vec![0u8; PAGE_SIZE];
    let same = (0..MEMORY / PAGE_SIZE as u64).all(|p| {
        let addr = GuestAddress(p * PAGE_SIZE as u64);
        src.read_slice(&mut a, addr).unwrap();
        dst.read_slice(&mut b, addr).unwrap();
        a == b
    });
    (report, same)
}

fn zstd(level: i32) -> MigrationConfig {
    MigrationConfig {
        channels: 2,
        compress: Some(level),
        ..MigrationConfig::default()
    }
}

/// A guest whose pages are text-like: a line naming the page, repeated.
fn compressible_guest() -> SyntheticGuest {
    let g = idle_guest();
    let mut page = vec![0u8; PAGE_SIZE];
    for p in 0..MEMORY / PAGE_SIZE as u64 {
        let line = format!("page {p:08} of a guest that compresses well; ");
        for (i, b) in page.iter_mut().enumerate() {
            *b = line.as_bytes()[i % line.len()];
        }
        g.memory()
            .write_slice(&page, GuestAddress(p * PAGE_SIZE as u64))
            .unwrap();
    }
    g
}

#[test]
fn compressible_pages_arrive_exact_and_cost_far_fewer_bytes() {
    let g = compressible_guest();
    let (report, same) = migrate_and_compare(&g, &zstd(1));
    assert!(same, "the destination's memory must equal the source's");
    assert_eq!(report.normal_pages, MEMORY / PAGE_SIZE as u64, "{report:?}");
    assert!(
        report.transferred_bytes < MEMORY / 8,
        "{} bytes on the wire for {MEMORY} bytes of text-like memory",
        report.transferred_bytes
    );
}

#[test]
fn incompressible_pages_go_as_they_are() {
    let g = idle_guest();
    let (report, same) = migrate_and_compare(&g, &zstd(3));
    assert!(same, "the destination's memory must equal the source's");
    // livemig's page pattern does not compress: each packet goes uncompressed, so the
    // bytes are those of a migration without compression (pages, offsets, CRCs, headers).
    let pages = MEMORY / PAGE_SIZE as u64;
    assert!(report.transferred_bytes >= MEMORY, "{report:?}");
    assert!(report.transferred_bytes < MEMORY + pages * 64, "{report:?}");
}

#[test]
fn a_zstd_level_out_of_range_is_refused_before_connecting() {
    let g = idle_guest();
    let to = "tcp:127.0.0.1:9".parse().unwrap();
    let e = migrate(&g, &to, &zstd(1000), &|_| {}).unwrap_err();
    assert!(e.to_string().contains("zstd level 1000"), "{e}");
}

/// A destination without zstd (one that does not offer it in the negotiation): the source
/// leaves compression off rather than fail, and the pages arrive exact, uncompressed.
#[test]
fn a_destination_without_zstd_gets_the_pages_as_they_are() {
    let g = compressible_guest();
    let mut in_config = IncomingConfig::default();
    in_config.test_hooks.protocol.lack = livemig_wire::Features::ZSTD;
    let (report, same) = migrate_to(&g, &zstd(1), &in_config);
    assert!(same, "the destination's memory must equal the source's");
    assert_eq!(report.normal_pages, MEMORY / PAGE_SIZE as u64, "{report:?}");
    assert!(
        report.transferred_bytes >= MEMORY,
        "{} bytes on the wire: compression was used",
        report.transferred_bytes
    );
}
