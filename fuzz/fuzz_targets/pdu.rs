//! PDU framing and header parsing (RFC 7143 §11): `check` → `decode` → `Request::parse` →
//! `ScsiCommand::full_cdb`, and re-encoding of every decoded PDU.
//!
//! Input: byte 0 picks the limit on the data segment (MaxRecvDataSegmentLength), the rest is the
//! byte stream as a connection reader sees it. Every digest combination is tried.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use raftsan_proto::pdu::{self, BHS_LEN, DIGEST_LEN, Digests, Framing, MAX_CDB_LEN, Request};

const LIMITS: [u32; 4] = [0, 512, 8192, pdu::MAX_DATA_SEGMENT_LEN];

fuzz_target!(|input: &[u8]| {
    let Some((&sel, stream)) = input.split_first() else {
        return;
    };
    let limit = LIMITS[usize::from(sel & 3)];
    for (header, data) in [(false, false), (true, false), (false, true), (true, true)] {
        one(stream, Digests { header, data }, limit);
    }
});

fn one(stream: &[u8], digests: Digests, limit: u32) {
    // Frame the stream like the connection reader: PDU after PDU until one is incomplete/bad.
    let mut rest = stream;
    while let Ok(framing) = pdu::check(rest, digests, limit) {
        let len = match framing {
            Framing::Incomplete { needed } => {
                assert!(
                    needed > rest.len(),
                    "Incomplete needs {needed} but {} are there",
                    rest.len()
                );
                assert!(needed >= BHS_LEN);
                return;
            }
            Framing::Complete { len } => len,
        };
        assert!(
            len >= BHS_LEN && len <= rest.len(),
            "Complete len {len} of {}",
            rest.len()
        );
        assert_eq!(len % 4, 0, "a whole PDU is padded to 4 bytes");
        let (head, tail) = rest.split_at(len);
        rest = tail;
        let Ok(p) = pdu::decode(Bytes::copy_from_slice(head), digests) else {
            // Only the data digest may fail after check said Complete.
            assert!(digests.data, "decode refused a PDU check accepted without data digest");
            continue;
        };
        assert!(p.data.len() as u32 <= limit);
        assert_eq!(p.ahs.len(), p.bhs.total_ahs_len());
        assert_eq!(p.data.len() as u32, p.bhs.data_segment_len());

        if let Ok(Request::ScsiCommand(cmd)) = Request::parse(&p.bhs)
            && let Ok(cdb) = cmd.full_cdb(&p.ahs)
        {
            assert!(
                cdb.len() >= 16 && cdb.len() <= MAX_CDB_LEN,
                "CDB of {} bytes",
                cdb.len()
            );
            assert_eq!(&cdb[..16], &cmd.cdb);
            // The 16 BHS CDB bytes re-encode to the same header bytes.
            assert_eq!(cmd.to_bhs().0[32..48], p.bhs.0[32..48]);
        }

        // Re-encoding a decoded PDU frames to the same length and decodes to the same PDU.
        let mut out = BytesMut::new();
        pdu::encode(&p, digests, &mut out);
        assert_eq!(out.len(), len, "re-encoded PDU length differs");
        assert_eq!(pdu::check(&out, digests, limit), Ok(Framing::Complete { len }));
        // The header (and header digest) are identical; padding is zeroed on encode.
        let hdr = BHS_LEN + p.ahs.len() + if digests.header { DIGEST_LEN } else { 0 };
        assert_eq!(&out[..hdr], &head[..hdr]);
        let again = pdu::decode(out.freeze(), digests).expect("re-encoded PDU decodes");
        assert_eq!(again, p);
    }
}
