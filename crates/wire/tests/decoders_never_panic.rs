//! Arbitrary bytes fed to every decoder: an error is fine, a panic is not.

use livemig_wire::*;
use proptest::prelude::*;

proptest! {
    #[test]
    fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let l = Limits::default();
        let _ = decode_frame(&bytes, &l);
        let _ = SessionHello::decode(&bytes);
        let _ = ChannelHello::decode(&bytes);
        let _ = Reject::decode(&bytes);
        let _ = RoundEnd::decode(&bytes);
        let _ = RoundStart::decode(&bytes);
        let _ = Complete::decode(&bytes);
        let _ = RoundAck::decode(&bytes);
        let _ = SessionAccept::decode(&bytes);
        for v in [4, 5] {
            let _ = version::decode_hello(v, &bytes);
            let _ = version::decode_accept(v, &bytes);
        }
        let _ = Credit::decode(&bytes);
        let _ = VmStates::decode(&bytes, 2);
        if bytes.len() >= CHUNK_PREFIX {
            let _ = ChunkHeader::decode(bytes[..CHUNK_PREFIX].try_into().unwrap());
        }
        let _ = Loaded::decode(&bytes);
        let _ = Resumed::decode(&bytes);
        let _ = RamPacket::decode(&bytes, &l);
        let ranges = [MemoryRange { guest_addr: 0, size: 1 << 20 }, MemoryRange { guest_addr: 1 << 32, size: 100 * 4096 }];
        let _ = PostcopyStart::decode(&bytes, &ranges);
        let _ = PageRequest::decode(&bytes);
        let _ = PostcopyDone::decode(&bytes);
        let _ = PostcopyComplete::decode(&bytes);
        if bytes.len() >= HEADER_LEN {
            let _ = FrameHeader::decode(bytes[..HEADER_LEN].try_into().unwrap(), &l);
        }
    }

    #[test]
    fn ram_packet_round_trip(round in any::<u32>(), checked in any::<bool>(), normal in proptest::collection::vec(0u64..1<<30, 0..8), zero in proptest::collection::vec(0u64..1<<30, 0..8)) {
        let normal: Vec<u64> = normal.iter().map(|a| a * 4096).collect();
        let zero: Vec<u64> = zero.iter().map(|a| a * 4096).collect();
        let p = ram::encode_packet(round, &normal, &vec![0xa5; normal.len() * PAGE_SIZE], &zero, checked);
        let pkt = RamPacket::decode(&p, &Limits::default()).unwrap();
        prop_assert_eq!(pkt.round, round);
        prop_assert_eq!(pkt.normal_addrs().collect::<Vec<_>>(), normal);
        prop_assert_eq!(pkt.zero_addrs().collect::<Vec<_>>(), zero);
        prop_assert!(pkt.checked_pages().all(|(_, _, ok)| ok));
    }
}
