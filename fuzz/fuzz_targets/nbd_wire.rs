//! NBD wire parsers (NetworkBlockDevice/nbd doc/proto.md), `raftsan_initiator::nbd::wire`.
//! Input: a selector byte, then
//! * even: a handshake as a client sends it: 4 bytes of client flags, then option requests
//!   (16-byte header + data) until the input ends;
//! * odd: transmission request headers, 28 bytes each.
//!
//! Asserts: no panic; accepted option headers are within `MAX_OPTION_LEN`; a parsed option
//! re-encodes to exactly its data; accepted request headers re-encode to the same 28 bytes and only
//! `NBD_CMD_WRITE` carries a payload; option replies are 20 bytes plus their data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use raftsan_initiator::nbd::wire::{self, Command, NbdOption};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    if sel % 2 == 0 {
        handshake(rest);
    } else {
        requests(rest);
    }
});

fn handshake(data: &[u8]) {
    let Some((flags, mut rest)) = data.split_first_chunk::<{ wire::CLIENT_FLAGS_LEN }>() else {
        return;
    };
    if let Ok(f) = wire::parse_client_flags(flags) {
        let raw = u32::from_be_bytes(*flags);
        assert_eq!(f.fixed_newstyle, raw & 1 != 0);
        assert_eq!(f.no_zeroes, raw & 2 != 0);
        let pad = wire::encode_export_name_reply(1, 1, f.no_zeroes).len();
        assert_eq!(pad, if f.no_zeroes { 10 } else { 134 });
    }
    while let Some((hdr, tail)) = rest.split_first_chunk::<{ wire::OPTION_HEADER_LEN }>() {
        let Ok(h) = wire::parse_option_header(hdr) else { return };
        assert!(h.len <= wire::MAX_OPTION_LEN);
        let take = (h.len as usize).min(tail.len());
        let (body, tail) = tail.split_at(take);
        rest = tail;
        let reply = wire::encode_option_reply(h.option, wire::NBD_REP_ERR_UNSUP, body);
        assert_eq!(reply.len(), 20 + body.len());
        match wire::parse_option(h.option, body) {
            Ok(NbdOption::ExportName(name)) => {
                assert_eq!(h.option, wire::NBD_OPT_EXPORT_NAME);
                assert_eq!(name, body);
            }
            Ok(NbdOption::Abort) => assert_eq!(h.option, wire::NBD_OPT_ABORT),
            Ok(NbdOption::List) => assert!(h.option == wire::NBD_OPT_LIST && body.is_empty()),
            Ok(NbdOption::Info { go, name, requests }) => {
                assert_eq!(go, h.option == wire::NBD_OPT_GO);
                assert!(name.len() <= wire::MAX_STRING_LEN);
                let mut again = (name.len() as u32).to_be_bytes().to_vec();
                again.extend_from_slice(&name);
                again.extend_from_slice(&(requests.len() as u16).to_be_bytes());
                for r in &requests {
                    again.extend_from_slice(&r.to_be_bytes());
                }
                assert_eq!(again, body, "INFO/GO re-encodes to its data");
            }
            Ok(NbdOption::Unknown(o)) => assert_eq!(o, h.option),
            Err(_) => {}
        }
    }
}

fn requests(data: &[u8]) {
    for chunk in data.chunks_exact(wire::REQUEST_LEN) {
        let Some(buf) = chunk.first_chunk::<{ wire::REQUEST_LEN }>() else { return };
        match wire::parse_request(buf) {
            Ok(req) => {
                assert_eq!(&req.encode(), buf, "request re-encodes to its bytes");
                assert_eq!(req.payload_len() != 0, req.command == Command::Write && req.len != 0);
                assert_eq!(Command::from_u16(req.command.to_u16()), req.command);
                let reply = wire::encode_simple_reply(wire::NBD_EINVAL, req.cookie);
                let parsed = wire::parse_simple_reply(&reply);
                assert_eq!(parsed.map(|r| (r.error, r.cookie)), Some((wire::NBD_EINVAL, req.cookie)));
            }
            Err(_) => assert_ne!(&buf[0..4], &wire::REQUEST_MAGIC.to_be_bytes()),
        }
    }
}
