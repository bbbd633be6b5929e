use super::*;
use crate::{MemoryRange, WireDevice};
use proptest::prelude::*;

fn header() -> FileHeader {
    let ranges = [
        MemoryRange {
            guest_addr: 0,
            size: 70 * 4096,
        },
        MemoryRange {
            guest_addr: 1 << 32,
            size: 3 * 4096,
        },
    ];
    let mut h = FileHeader {
        guest_kind: "synthetic".into(),
        vcpus: 2,
        regions: ranges
            .iter()
            .map(|&range| FileRegion {
                range,
                data_offset: 0,
                bitmap: Section::default(),
                crcs: Section::default(),
                groups: Section::default(),
            })
            .collect(),
        devices: vec![FileDevice {
            device: WireDevice {
                kind: "vfio-sim".into(),
                name: "vfio0".into(),
                config: vec![1, 2, 3],
            },
            index: Section::default(),
            chunks: 2,
            bytes: 100,
        }],
        vmstates: vec![WireDevice {
            kind: "vmstate-sim".into(),
            name: "vmstate0".into(),
            config: vec![],
        }],
        state: Section::default(),
        vmstate_blobs: Section::default(),
        file_len: 0,
        rounds: 1,
        paused: true,
    };
    // Lay it out as a save does: regions by the plan, sections after the tail.
    let len = h.encode().len();
    let plan = plan(len, &ranges);
    let mut at = plan.tail;
    let mut place = |n: u64| {
        let s = Section {
            offset: at,
            len: n,
            crc: 0,
        };
        at += n;
        s
    };
    for (r, off) in h.regions.iter_mut().zip(&plan.data_offsets) {
        r.data_offset = *off;
        let pages = r.range.size / 4096;
        r.bitmap = place(pages.div_ceil(64) * 8);
        r.crcs = place(pages * 4);
        r.groups = place(pages.div_ceil(1024) * 8);
    }
    h.devices[0].index = place(32);
    h.state = place(10);
    h.vmstate_blobs = place(4);
    h.file_len = at;
    assert_eq!(h.encode().len(), len, "a laid-out header keeps its length");
    h
}

#[test]
fn a_header_round_trips_and_its_layout_checks() {
    let h = header();
    let body = h.encode();
    assert_eq!(FileHeader::decode(&body).unwrap(), h);
    let prefix = FilePrefix::for_header(&body);
    let raw = prefix.encode();
    assert_eq!(&raw[..8], b"LMIGSAVE");
    assert_eq!(FilePrefix::decode(&raw).unwrap(), prefix);
    prefix.check_header(&body).unwrap();
    h.check_layout(prefix.header_len, h.file_len, 1 << 20)
        .unwrap();
    assert_eq!(h.regions[0].data_offset % REGION_ALIGN, 0);
    assert_eq!(h.regions[1].data_offset, REGION_ALIGN * 2);
}

#[test]
fn another_version_is_named_before_its_crc_is_checked() {
    let mut raw = FilePrefix::for_header(b"x").encode();
    for old_or_new in [1, 3] {
        raw[8] = old_or_new;
        assert_eq!(
            FilePrefix::decode(&raw),
            Err(FileFormatError::UnsupportedVersion {
                found: old_or_new as u16,
                supported: 2
            })
        );
    }
    raw[8] = 2;
    raw[12] ^= 1;
    assert!(matches!(
        FilePrefix::decode(&raw),
        Err(FileFormatError::BadCrc { .. })
    ));
    raw[0] = b'X';
    assert!(matches!(
        FilePrefix::decode(&raw),
        Err(FileFormatError::BadMagic { .. })
    ));
}

#[test]
fn a_corrupted_header_is_caught_by_its_crc() {
    let body = header().encode();
    let prefix = FilePrefix::for_header(&body);
    let mut bad = body.clone();
    bad[5] ^= 0x40;
    assert!(matches!(
        prefix.check_header(&bad),
        Err(FileFormatError::BadCrc { .. })
    ));
    assert!(matches!(
        prefix.check_header(&body[..body.len() - 1]),
        Err(FileFormatError::Truncated { .. })
    ));
}

#[test]
fn a_truncated_file_and_sections_outside_it_are_refused() {
    let h = header();
    let len = h.encode().len() as u32;
    assert!(matches!(
        h.check_layout(len, h.file_len - 1, 1 << 20),
        Err(FileFormatError::Truncated { .. })
    ));
    let mut bad = h.clone();
    bad.state.offset = u64::MAX - 3;
    assert!(matches!(
        bad.check_layout(len, u64::MAX, 1 << 20),
        Err(FileFormatError::Layout { .. })
    ));
    let mut bad = h.clone();
    bad.regions[1].data_offset = bad.regions[0].data_offset;
    assert!(bad.check_layout(len, h.file_len, 1 << 20).is_err());
    let mut bad = h.clone();
    bad.regions[0].groups.len += 8;
    assert!(bad.check_layout(len, h.file_len, 1 << 20).is_err());
    let mut bad = h.clone();
    bad.devices[0].chunks = 3;
    assert!(bad.check_layout(len, h.file_len, 1 << 20).is_err());
    assert!(
        h.check_layout(len, h.file_len, 5).is_err(),
        "a state blob over the limit is refused"
    );
}

#[test]
fn bitmaps_and_chunk_indexes_are_checked() {
    let words = [u64::MAX, 0b11];
    let raw: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    assert_eq!(decode_bitmap(&raw, 66).unwrap(), words);
    assert!(decode_bitmap(&raw, 65).is_err(), "a bit past the last page");
    assert!(decode_bitmap(&raw[..8], 66).is_err());
    let chunks = [
        ChunkRef {
            offset: 4096,
            len: 10,
            crc: 7,
        },
        ChunkRef {
            offset: 1 << 33,
            len: 1,
            crc: 9,
        },
    ];
    let raw = encode_chunk_index(&chunks);
    assert_eq!(decode_chunk_index(&raw, 2, (1 << 33) + 1).unwrap(), chunks);
    assert!(
        decode_chunk_index(&raw, 2, 1 << 33).is_err(),
        "past the file"
    );
    assert!(
        decode_chunk_index(&raw, 1, u64::MAX).is_err(),
        "count and bytes disagree"
    );
}

#[test]
fn group_sums_cover_each_group_of_the_tables() {
    // 2500 pages: groups of 1024, 1024 and 452 pages.
    let pages = 2500u64;
    let bitmap: Vec<u8> = (0..pages.div_ceil(64) * 8).map(|i| i as u8).collect();
    let crcs: Vec<u8> = (0..pages * 4).map(|i| (i * 7) as u8).collect();
    let raw = encode_group_sums(&bitmap, &crcs, pages);
    let sums = decode_group_sums(&raw, pages).unwrap();
    assert_eq!(sums.len(), 3);
    let last = group_slices(pages, 2);
    assert_eq!(last.first_page, 2048);
    assert_eq!(last.pages, 452);
    assert_eq!(last.bitmap, (256, 8 * 8));
    assert_eq!(last.crcs, (2048 * 4, 452 * 4));
    let (at, len) = (last.crcs.0 as usize, last.crcs.1 as usize);
    assert_eq!(sums[2].crcs, crc32c::crc32c(&crcs[at..at + len]));
    let (at, len) = (last.bitmap.0 as usize, last.bitmap.1 as usize);
    assert_eq!(
        at + len,
        bitmap.len(),
        "the last group ends with the bitmap"
    );
    assert_eq!(sums[2].bitmap, crc32c::crc32c(&bitmap[at..]));
    assert!(decode_group_sums(&raw[..16], pages).is_err());
}

proptest! {
    #[test]
    fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = FileHeader::decode(&data);
        if let Some(p) = data.get(..PREFIX_LEN) {
            let _ = FilePrefix::decode(p.try_into().unwrap());
        }
        let _ = decode_bitmap(&data, 1000);
        let _ = decode_chunk_index(&data, (data.len() / 16) as u32, u64::MAX);
        let _ = decode_group_sums(&data, data.len() as u64 * 128);
    }

    #[test]
    fn one_flipped_bit_anywhere_in_prefix_or_header_is_caught(at in 0usize..4096, bit in 0u8..8) {
        let body = header().encode();
        let mut file = FilePrefix::for_header(&body).encode().to_vec();
        file.extend_from_slice(&body);
        let at = at % file.len();
        file[at] ^= 1 << bit;
        let caught = FilePrefix::decode(file[..PREFIX_LEN].try_into().unwrap())
            .and_then(|p| p.check_header(&file[PREFIX_LEN..]).map(|_| p));
        prop_assert!(caught.is_err());
    }
}
