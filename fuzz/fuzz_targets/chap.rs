//! CHAP binary values (RFC 7143 §6.1, §12.1.3): `chap::decode_binary` on arbitrary strings.
//! Decoded values are bounded and re-encode (as hex) to a string that decodes to the same bytes;
//! hex input decodes to what a reference decoder computes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use raftsan_proto::chap::{self, ChapAlgorithm, MAX_BINARY_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let decoded = chap::decode_binary(s);
    if let Ok(bytes) = &decoded {
        assert!(
            !bytes.is_empty() && bytes.len() <= MAX_BINARY_LEN,
            "{} bytes",
            bytes.len()
        );
        let hex = chap::encode_hex(bytes);
        assert_eq!(
            chap::decode_binary(&hex).as_ref(),
            Ok(bytes),
            "hex re-encoding decodes back"
        );
        assert!(chap::constant_time_eq(bytes, bytes));
    }
    // Reference for the hex form: an odd digit count means a leading zero nibble.
    if let Some(body) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))
        && !body.is_empty()
        && body.bytes().all(|b| b.is_ascii_hexdigit())
    {
        let padded = if body.len() % 2 == 1 {
            format!("0{body}")
        } else {
            body.to_owned()
        };
        let want: Vec<u8> = (0..padded.len() / 2)
            .map(|i| u8::from_str_radix(&padded[2 * i..2 * i + 2], 16).unwrap_or(0))
            .collect();
        if want.len() <= MAX_BINARY_LEN {
            assert_eq!(decoded.as_ref(), Ok(&want), "hex {s:?}");
        } else {
            assert!(decoded.is_err(), "over-long hex accepted");
        }
    }
    // The algorithm selection never panics on an arbitrary offer.
    let _ = ChapAlgorithm::select(s);
});
