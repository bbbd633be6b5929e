//! The save file's decoders: the prefix, the header (and its layout check against a file
//! length), a region's bitmap and groups, a device's chunk index.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemig_wire::file::{
    decode_bitmap, decode_chunk_index, decode_group_sums, FileHeader, FilePrefix, PREFIX_LEN,
};

fuzz_target!(|data: &[u8]| {
    if let Some(p) = data.get(..PREFIX_LEN) {
        if let Ok(prefix) = FilePrefix::decode(p.try_into().unwrap()) {
            let _ = prefix.check_header(&data[PREFIX_LEN..]);
        }
    }
    let body = data.get(PREFIX_LEN..).unwrap_or(data);
    if let Ok(h) = FileHeader::decode(body) {
        assert_eq!(h.encode(), body, "a decoded header encodes to its bytes");
        for len in [0, h.file_len, u64::MAX] {
            let _ = h.check_layout(body.len() as u32, len, 64 << 20);
        }
    }
    let _ = decode_bitmap(data, (data.len() as u64 * 8).saturating_sub(3));
    let _ = decode_chunk_index(data, (data.len() / 16) as u32, 1 << 40);
    let _ = decode_group_sums(data, (data.len() as u64 / 8) * 1024);
});
