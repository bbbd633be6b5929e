//! Writes the seed corpus: one valid encoding of each message kind per target, made by the
//! encoders themselves, so the fuzzer starts from inputs that get past the first checks.
//! `cargo run --manifest-path fuzz/Cargo.toml --bin gen_corpus` (any toolchain).

use livemig_vmm::devices::VfioSimConfig;
use livemig_vmm::kvm::state::VcpuState;
use livemig_vmm::kvm::KvmState;
use livemig_vmm::synthetic::{SyntheticState, Workload};
use livemig_wire::*;
use std::path::Path;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

/// The hello and accept of each version, behind the byte that picks the version (low bit: 4
/// or 5), for the session target; the version-5 hello as a whole frame for the frame target.
fn versioned_seeds(hello: &SessionHello) {
    use livemig_wire::version::{encode_accept, encode_hello, Agreed, Features, Offer, Versions};
    let offer = Offer {
        versions: Versions::THIS,
        features: Features::ALL,
        required: Features::POSTCOPY,
    };
    let accept = SessionAccept {
        window: 8,
        buffer_cap: 8 << 20,
        peer_timeout_ms: 30_000,
    };
    let agreed = Agreed {
        version: 5,
        features: Features::ALL,
    };
    for v in [4u16, 5] {
        let picked = |payload: Vec<u8>| [vec![v as u8 & 1], payload].concat();
        write(
            "session",
            &format!("hello_v{v}"),
            &picked(encode_hello(v, &offer, hello)),
        );
        let agreed = if v == 4 { Agreed::V4 } else { agreed };
        let payload = encode_accept(v, &agreed, &accept);
        write("session", &format!("accept_v{v}"), &picked(payload));
    }
    let frame = encode_frame_versioned(5, FrameKind::SessionHello, &encode_hello(5, &offer, hello));
    write("frame", "hello_v5", &frame);
}

fn main() {
    let hello = SessionHello {
        session: SessionId([7; 16]),
        channels: 4,
        pages_per_packet: 128,
        guest: GuestDescriptor {
            kind: "kvm".into(),
            vcpus: 1,
            page_size: 4096,
            ranges: vec![MemoryRange {
                guest_addr: 0,
                size: 1 << 30,
            }],
        },
        devices: DeviceSetup {
            devices: vec![WireDevice {
                kind: "vfio-sim".into(),
                name: "vfio0".into(),
                config: VfioSimConfig::with_size(1 << 20).encode(),
            }],
            ..DeviceSetup::default()
        },
        ram: RamTransfer::Copy,
        peer_timeout_ms: 30_000,
        postcopy: true,
        resume: false,
    };
    write("session", "hello", &hello.encode());
    versioned_seeds(&hello);
    write(
        "session",
        "memory_files",
        &MemoryFiles { offsets: vec![0] }.encode(),
    );
    write(
        "session",
        "accept",
        &SessionAccept {
            window: 8,
            buffer_cap: 8 << 20,
            peer_timeout_ms: 30_000,
        }
        .encode(),
    );
    write(
        "session",
        "channel",
        &ChannelHello {
            session: SessionId([7; 16]),
            index: 2,
        }
        .encode(),
    );
    write(
        "session",
        "reject",
        &Reject::new(RejectCode::Protocol, "bad").encode(),
    );
    write(
        "frame",
        "round_end",
        &encode_frame(
            FrameKind::RoundEnd,
            &RoundEnd {
                round: 1,
                last: false,
            }
            .encode(),
        ),
    );
    let ram = ram::encode_packet(3, &[0, 8192], &[0x5a; 2 * PAGE_SIZE], &[4096], true);
    write("ram_packet", "two_normal_one_zero", &ram);
    write("frame", "ram", &encode_frame(FrameKind::RamPages, &ram));
    let chunk = ChunkHeader {
        device: 1,
        idx: 9,
        last: true,
    }
    .encode();
    write("device", "chunk_header", &chunk);
    write(
        "device",
        "credit",
        &Credit {
            device: 1,
            up_to: 17,
        }
        .encode(),
    );
    write(
        "device",
        "vmstates",
        &VmStates {
            blobs: vec![vec![1, 2, 3], vec![]],
        }
        .encode(),
    );
    write(
        "control",
        "loaded",
        &Loaded {
            drain_us: 1,
            devices: vec![DeviceLoadStats::default()],
            ..Loaded::default()
        }
        .encode(),
    );
    write(
        "control",
        "round_start",
        &RoundStart {
            round: 2,
            pages: 100,
        }
        .encode(),
    );
    let synthetic = SyntheticState {
        counter: 5,
        workload: Workload {
            working_set_pages: 4,
            rate: 0,
            threads: 1,
        },
        gens: vec![1; 16],
    };
    write("guest_state", "synthetic", &synthetic.encode());
    write(
        "guest_state",
        "vfio_config",
        &VfioSimConfig::with_size(4096).encode(),
    );
    // A KVM guest state with one vCPU, every part present (zeroed kernel structures, no MSRs):
    // without it the fuzzer must find a whole multi-kilobyte blob by itself.
    let kvm = KvmState {
        memory_bytes: 1 << 20,
        vcpus: vec![VcpuState::default()],
        ..Default::default()
    };
    write("guest_state", "kvm_one_vcpu", &kvm.encode());
    // The fuzz target's guest (fuzz_targets/postcopy.rs): three ranges.
    let pc_ranges = [
        MemoryRange {
            guest_addr: 0,
            size: 1 << 20,
        },
        MemoryRange {
            guest_addr: (1 << 20) + (64 << 10),
            size: 100 * PAGE_SIZE as u64,
        },
        MemoryRange {
            guest_addr: 1 << 32,
            size: PAGE_SIZE as u64,
        },
    ];
    let mut start = PostcopyStart::new(4, &pc_ranges);
    for a in [0, 4096, 255 * 4096, (1 << 20) + (64 << 10) + 99 * 4096, 1 << 32] {
        start.insert(a);
    }
    write("postcopy", "start", &start.encode());
    write(
        "postcopy",
        "page_request",
        &PageRequest {
            addrs: vec![0, 4096, 1 << 32],
        }
        .encode(),
    );
    write("postcopy", "done", &PostcopyDone { pages: 9 }.encode());
    write(
        "postcopy",
        "complete",
        &PostcopyComplete {
            pages: 5,
            requested: 2,
            blocked_us: 300,
        }
        .encode(),
    );
    write(
        "frame",
        "postcopy_start",
        &encode_frame(FrameKind::PostcopyStart, &start.encode()),
    );
    file_seeds(&hello);
    println!("corpus written under fuzz/corpus/");
}

/// A save file's prefix and header for the guest and devices of `hello`, laid out as a save
/// lays them out.
fn file_seeds(hello: &SessionHello) {
    use livemig_wire::file::*;
    let mut h = FileHeader {
        guest_kind: hello.guest.kind.clone(),
        vcpus: hello.guest.vcpus,
        regions: hello
            .guest
            .ranges
            .iter()
            .map(|&range| FileRegion {
                range,
                data_offset: 0,
                bitmap: Section::default(),
                crcs: Section::default(),
                groups: Section::default(),
            })
            .collect(),
        devices: hello
            .devices
            .devices
            .iter()
            .map(|d| FileDevice {
                device: d.clone(),
                index: Section::default(),
                chunks: 1,
                bytes: 10,
            })
            .collect(),
        vmstates: vec![],
        state: Section::default(),
        vmstate_blobs: Section::default(),
        file_len: 0,
        rounds: 1,
        paused: false,
    };
    let p = plan(h.encode().len(), &hello.guest.ranges);
    let mut at = p.tail;
    for (r, off) in h.regions.iter_mut().zip(p.data_offsets) {
        r.data_offset = off;
        let pages = r.range.size / 4096;
        r.bitmap = Section { offset: at, len: pages.div_ceil(64) * 8, crc: 0 };
        at += r.bitmap.len;
        r.crcs = Section { offset: at, len: pages * 4, crc: 0 };
        at += r.crcs.len;
        r.groups = Section { offset: at, len: groups(pages) * 8, crc: 0 };
        at += r.groups.len;
    }
    for d in &mut h.devices {
        d.index = Section { offset: at, len: 16, crc: 0 };
        at += 16;
    }
    h.state = Section { offset: at, len: 100, crc: 0 };
    h.file_len = at + 100;
    let body = h.encode();
    let mut file = FilePrefix::for_header(&body).encode().to_vec();
    file.extend_from_slice(&body);
    write("file", "header", &file);
    let index = encode_chunk_index(&[ChunkRef { offset: 1 << 21, len: 4096, crc: 1 }]);
    write("file", "chunk_index", &index);
}
