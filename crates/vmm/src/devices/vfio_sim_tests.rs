//! Unit tests of [`super::VfioSim`] (a separate file to keep the device's file short).

use super::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

const MIB: usize = 1 << 20;

fn cfg(spec: &str) -> VfioSimConfig {
    VfioSimConfig::parse(spec).expect("spec")
}

/// Reads every available precopy chunk of at most `chunk` bytes.
fn drain_precopy(dev: &VfioSim, chunk: usize) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    loop {
        let mut buf = Vec::new();
        let n = dev.save_precopy(&mut buf, chunk).expect("save_precopy");
        if n == 0 {
            return chunks;
        }
        assert_eq!(n, buf.len());
        chunks.push(buf);
    }
}

fn drain_final(dev: &VfioSim, chunk: usize) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    loop {
        let mut buf = Vec::new();
        let n = dev.save_final(&mut buf, chunk).expect("save_final");
        if n == 0 {
            return chunks;
        }
        chunks.push(buf);
    }
}

fn twin(dev: &VfioSim) -> VfioSim {
    VfioSim::from_descriptor(&dev.descriptor()).expect("twin")
}

fn load_all(dest: &VfioSim, chunks: &[Vec<u8>]) -> Result<(), DeviceError> {
    chunks.iter().try_for_each(|c| dest.load(c))
}

#[test]
fn round_trip_with_precopy_generations_loads_in_order() {
    let src = VfioSim::new("vfio0", cfg("size=3M,precopy=100K,seed=7,gen_ms=0"));
    src.begin_save().expect("begin");
    let mut chunks = drain_precopy(&src, 40_000);
    assert_eq!(
        chunks.len(),
        3,
        "one section of 100K + 28 in 40000-byte chunks"
    );
    assert!(
        drain_precopy(&src, 40_000).is_empty(),
        "generation 0 already sent"
    );
    src.advance_generation();
    chunks.extend(drain_precopy(&src, 40_000));
    let n_precopy = chunks.len();
    assert_eq!(n_precopy, 6);
    chunks.extend(drain_final(&src, 333_333));
    let dest = twin(&src);
    load_all(&dest, &chunks).expect("load");
    dest.load_complete().expect("complete");
    assert!(dest.loaded_in_order_ok());
    assert_eq!(dest.bytes_loaded(), src.bytes_saved());
    assert_eq!(
        src.bytes_saved(),
        2 * (100 * 1024 + 28) + 3 * MIB as u64 + 28
    );
    // The twin continues at the generation the source had at switchover.
    assert_eq!(dest.generation(), 1);
    assert_eq!(src.generation(), 1);
}

#[test]
fn swapped_chunks_fail_at_once_naming_the_offset() {
    let src = VfioSim::new("vfio0", cfg("size=4M,seed=3"));
    src.begin_save().expect("begin");
    let mut chunks = drain_final(&src, MIB);
    chunks.swap(1, 2);
    let dest = twin(&src);
    dest.load(&chunks[0]).expect("first chunk is fine");
    let err = dest.load(&chunks[1]).expect_err("out of order");
    assert_eq!(err.op, "load");
    assert!(
        err.detail.contains("byte 1048576 of the final state") && err.detail.contains("order"),
        "{err}"
    );
    // Broken for good, like hardware.
    assert!(dest.load(&chunks[2]).is_err());
    assert!(dest.load_complete().is_err());
    assert!(!dest.loaded_in_order_ok());
}

#[test]
fn precopy_after_a_wrong_header_fails_naming_the_stream_byte() {
    let src = VfioSim::new("vfio0", cfg("size=1M,precopy=64K,seed=3,gen_ms=0"));
    src.begin_save().expect("begin");
    let pre = drain_precopy(&src, 32 * 1024);
    let dest = twin(&src);
    let err = dest
        .load(&pre[1])
        .expect_err("payload where a header belongs");
    assert!(
        err.detail.contains("stream byte 0") && err.detail.contains("magic"),
        "{err}"
    );
}

#[test]
fn truncated_stream_fails_load_complete() {
    let src = VfioSim::new("vfio0", cfg("size=2M,seed=1"));
    src.begin_save().expect("begin");
    let chunks = drain_final(&src, MIB);
    let dest = twin(&src);
    load_all(&dest, &chunks[..2]).expect("in order so far");
    let err = dest.load_complete().expect_err("missing the end");
    assert!(err.detail.contains("incomplete"), "{err}");
    let empty = twin(&src);
    assert!(empty.load_complete().is_err());
}

#[test]
fn digest_mismatch_fails() {
    let src = VfioSim::new("vfio0", cfg("size=100K,seed=1"));
    src.begin_save().expect("begin");
    let mut chunks = drain_final(&src, usize::MAX);
    let last = chunks[0].len() - 1;
    chunks[0][last] ^= 0x01;
    let dest = twin(&src);
    let err = dest.load(&chunks[0]).expect_err("bad digest");
    assert!(err.detail.contains("digest of the final state"), "{err}");
    assert!(dest.load_complete().is_err());
}

#[test]
fn bytes_after_the_end_and_wrong_sizes_are_rejected() {
    let src = VfioSim::new("vfio0", cfg("size=10K,seed=1"));
    src.begin_save().expect("begin");
    let chunks = drain_final(&src, usize::MAX);
    let dest = twin(&src);
    load_all(&dest, &chunks).expect("load");
    assert!(dest
        .load(&[0])
        .is_err_and(|e| e.detail.contains("after the end")));
    let other = VfioSim::new("vfio0", cfg("size=20K,seed=1"));
    assert!(other
        .load(&chunks[0])
        .is_err_and(|e| e.detail.contains("long")));
}

#[test]
fn reads_are_paced_by_the_rate() {
    let src = VfioSim::new("vfio0", cfg("size=4M,rate=40000000,seed=2"));
    src.begin_save().expect("begin");
    let start = Instant::now();
    let chunks = drain_final(&src, MIB);
    let elapsed = start.elapsed();
    assert_eq!(chunks.len(), 5);
    // 4 MiB at 40 MB/s is 105 ms; only a lower bound, the machine is noisy.
    assert!(elapsed >= Duration::from_millis(90), "{elapsed:?}");
}

#[test]
fn injected_save_failure_then_retry_succeeds_and_source_is_intact() {
    let src = VfioSim::new("vfio0", cfg("size=4M,seed=5,fail_save_at=2M"));
    src.begin_save().expect("begin");
    let mut ok = 0;
    let err = loop {
        let mut buf = Vec::new();
        match src.save_final(&mut buf, MIB) {
            Ok(n) => {
                assert!(n > 0, "the failure must come first");
                ok += 1;
            }
            Err(e) => break e,
        }
    };
    assert_eq!(ok, 2);
    assert!(err.detail.contains("byte 2097152"), "{err}");
    src.verify_intact().expect("intact after a failed attempt");
    src.begin_save().expect("retry");
    let chunks = drain_final(&src, MIB);
    let dest = twin(&src);
    load_all(&dest, &chunks).expect("load");
    dest.load_complete().expect("complete");
}

#[test]
fn injected_panic_fires_once_and_leaves_the_device_usable() {
    let src = VfioSim::new("vfio0", cfg("size=1M,seed=5,panic_save_at=100"));
    src.begin_save().expect("begin");
    let r = catch_unwind(AssertUnwindSafe(|| src.save_final(&mut Vec::new(), 4096)));
    assert!(r.is_err(), "expected the injected panic");
    src.verify_intact().expect("intact");
    src.begin_save().expect("retry");
    let chunks = drain_final(&src, MIB);
    let dest = twin(&src);
    load_all(&dest, &chunks).expect("load");
    dest.load_complete().expect("complete");
}

#[test]
fn injected_load_failure_is_carried_by_the_descriptor() {
    let src = VfioSim::new("vfio0", cfg("size=3M,seed=5,fail_load_at=1M"));
    src.begin_save().expect("begin");
    let chunks = drain_final(&src, MIB);
    let dest = twin(&src);
    dest.load(&chunks[0]).expect("first MiB");
    let err = dest.load(&chunks[1]).expect_err("injected");
    assert!(err.detail.contains("byte 1048576"), "{err}");
    let at_header = VfioSim::new("vfio0", cfg("size=3M,seed=5,fail_load_at=0"));
    assert!(at_header
        .load(&chunks[0])
        .is_err_and(|e| e.detail.contains("byte 0")));
    src.disarm();
    let dest = twin(&src);
    load_all(&dest, &chunks).expect("no hook after disarm");
    dest.load_complete().expect("complete");
}

#[test]
fn save_final_finishes_a_half_read_precopy_section_first() {
    let src = VfioSim::new("vfio0", cfg("size=1M,precopy=1M,seed=9,gen_ms=0"));
    src.begin_save().expect("begin");
    let mut first = Vec::new();
    src.save_precopy(&mut first, 300_000).expect("precopy");
    let mut chunks = vec![first];
    chunks.extend(drain_final(&src, MIB));
    assert!(src.save_precopy(&mut Vec::new(), 1).is_err());
    let dest = twin(&src);
    load_all(&dest, &chunks).expect("load");
    dest.load_complete().expect("complete");
}

#[test]
fn generation_advances_with_time_and_freezes_at_switchover() {
    let src = VfioSim::new("vfio0", cfg("size=4K,precopy=4K,seed=9,gen_ms=10"));
    src.begin_save().expect("begin");
    let first = drain_precopy(&src, MIB);
    assert_eq!(first.len(), 1);
    std::thread::sleep(Duration::from_millis(30));
    assert!(
        !drain_precopy(&src, MIB).is_empty(),
        "a new generation, new data"
    );
    let final_chunks = drain_final(&src, MIB);
    let frozen = src.generation();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(src.generation(), frozen, "paused guest: no change");
    let dest = twin(&src);
    load_all(&dest, &final_chunks).expect("final alone is a whole stream");
    dest.load_complete().expect("complete");
    assert_eq!(dest.generation(), frozen);
    src.resume();
    std::thread::sleep(Duration::from_millis(30));
    assert!(src.generation() > frozen);
    // A retry's final state carries the newer generation and still loads.
    src.begin_save().expect("retry");
    let chunks = drain_final(&src, MIB);
    let dest = twin(&src);
    load_all(&dest, &chunks).expect("load");
    dest.load_complete().expect("complete");
    assert!(dest.generation() > frozen);
}

#[test]
fn descriptor_errors_are_clear() {
    let src = VfioSim::new("vfio0", cfg("size=1K"));
    let mut desc = src.descriptor();
    desc.config[0] = 9;
    let err = VfioSim::from_descriptor(&desc).err().expect("bad version");
    assert!(err.to_string().contains("unknown version 9"), "{err}");
    desc.kind = "nvme".to_string();
    assert!(VfioSim::from_descriptor(&desc).is_err());
}

/// How fast the model itself produces and checks state, unpaced (`--ignored --nocapture`):
/// it must be far above the rates benchmarks ask for, or it would be the bottleneck.
#[test]
#[ignore = "measurement, prints throughput"]
fn unpaced_throughput_256m() {
    let src = VfioSim::new("vfio0", cfg("size=256M,seed=1"));
    let dest = twin(&src);
    src.begin_save().expect("begin");
    let (mut save, mut load) = (Duration::ZERO, Duration::ZERO);
    let mut buf = Vec::with_capacity(MIB);
    loop {
        buf.clear();
        let t = Instant::now();
        if src.save_final(&mut buf, MIB).expect("save") == 0 {
            break;
        }
        save += t.elapsed();
        let t = Instant::now();
        dest.load(&buf).expect("load");
        load += t.elapsed();
    }
    dest.load_complete().expect("complete");
    let mbs = |d: Duration| 256.0 * 1.048_576 / d.as_secs_f64();
    println!("save {:.0} MB/s, load {:.0} MB/s", mbs(save), mbs(load));
}

#[test]
fn pending_shrinks_with_precopy_and_matches_what_the_final_save_reads() {
    let dev = VfioSim::new("d", cfg("size=3M,precopy=2M,rate=500M,gen_ms=0"));
    dev.begin_save().expect("begin");
    let whole = |len: u64| section_total(len);
    let p = dev.pending().expect("vfio-sim reports");
    assert_eq!(
        p.precopy_bytes,
        whole(2 << 20),
        "a whole precopy section to read"
    );
    assert_eq!(p.final_bytes, whole(3 << 20));
    assert_eq!(p.read_rate, Some(500 << 20));
    // Half a precopy section read: both shrink to what a final save must finish first.
    let mut buf = Vec::new();
    dev.save_precopy(&mut buf, MIB).expect("precopy");
    let p = dev.pending().expect("pending");
    let rest = whole(2 << 20) - MIB as u64;
    assert_eq!(p.precopy_bytes, rest);
    assert_eq!(p.final_bytes, rest + whole(3 << 20));
    let read: usize = drain_final(&dev, 256 << 10).iter().map(Vec::len).sum();
    assert_eq!(
        read as u64, p.final_bytes,
        "the estimate is what the final save read"
    );
    let p = dev.pending().expect("pending");
    assert_eq!((p.precopy_bytes, p.final_bytes), (0, 0), "all read");
}

#[test]
fn pending_with_precopy_read_is_the_final_section() {
    let dev = VfioSim::new("d", cfg("size=1M,precopy=1M,gen_ms=0"));
    dev.begin_save().expect("begin");
    drain_precopy(&dev, MIB);
    let p = dev.pending().expect("pending");
    assert_eq!(p.precopy_bytes, 0, "this generation's precopy data is read");
    assert_eq!(p.final_bytes, section_total(1 << 20));
    assert_eq!(p.read_rate, None, "unpaced");
    dev.advance_generation();
    let p = dev.pending().expect("pending");
    assert_eq!(
        p.precopy_bytes,
        section_total(1 << 20),
        "a new generation to send"
    );
}
