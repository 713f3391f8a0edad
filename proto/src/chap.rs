//! CHAP for iSCSI login (RFC 1994, RFC 7143 §12.1.3): the response function, the algorithm
//! codes iSCSI uses in `CHAP_A` (5 MD5; 6 SHA-1, 7 SHA-256, 8 SHA3-256 as registered by
//! RFC 9266 / IANA and offered by current open-iscsi, libiscsi and LIO), and the binary value
//! encodings of RFC 7143 §6.1 (`0x` hex, `0b` base64).
//!
//! Pure: challenges and identifiers are chosen by the caller.

use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use sha3::Sha3_256;

/// Longest binary value we decode, in bytes. RFC 7143 §12.1.3 bounds CHAP_C and CHAP_R by
/// the text value length; 1024 bytes is far beyond any digest or sensible challenge.
pub const MAX_BINARY_LEN: usize = 1024;

/// CHAP algorithm codes of `CHAP_A` (RFC 7143 §12.1.3, IANA "PPP Authentication Algorithms").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChapAlgorithm {
    Md5 = 5,
    Sha1 = 6,
    Sha256 = 7,
    Sha3_256 = 8,
}

impl ChapAlgorithm {
    /// The algorithm with this `CHAP_A` code, if we implement it.
    pub fn from_code(c: u32) -> Option<Self> {
        match c {
            5 => Some(Self::Md5),
            6 => Some(Self::Sha1),
            7 => Some(Self::Sha256),
            8 => Some(Self::Sha3_256),
            _ => None,
        }
    }

    /// The `CHAP_A` code.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Length of a CHAP_R of this algorithm, in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Self::Md5 => 16,
            Self::Sha1 => 20,
            Self::Sha256 | Self::Sha3_256 => 32,
        }
    }

    /// The first algorithm of a `CHAP_A` list (in the initiator's order) that we implement.
    /// Each item must be a plain decimal code: `56` is not `5` (libiscsi
    /// test_iscsi_chap_invalid checks exactly that).
    pub fn select(offer: &str) -> Option<Self> {
        offer.split(',').find_map(|item| {
            if item.is_empty() || item.len() > 10 || !item.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            item.parse::<u32>().ok().and_then(Self::from_code)
        })
    }
}

/// Why a CHAP binary value could not be decoded. Always caused by the peer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChapError {
    /// Neither `0x`/`0X` nor `0b`/`0B` (RFC 7143 §6.1 binary-value).
    #[error("binary value without 0x or 0b prefix")]
    MissingPrefix,
    /// Nothing after the prefix.
    #[error("empty binary value")]
    Empty,
    /// A character that is not a hex digit after `0x`.
    #[error("invalid hex digit in binary value")]
    InvalidHex,
    /// Not valid base64 after `0b` (RFC 4648 §4).
    #[error("invalid base64 in binary value")]
    InvalidBase64,
    /// Decodes to more than [`MAX_BINARY_LEN`] bytes.
    #[error("binary value longer than {MAX_BINARY_LEN} bytes")]
    TooLong,
}

/// CHAP response `H(id || secret || challenge)` (RFC 1994 §4.1).
pub fn chap_response(alg: ChapAlgorithm, id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
    fn hash<D: Digest>(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
        let mut d = D::new();
        d.update([id]);
        d.update(secret);
        d.update(challenge);
        d.finalize().to_vec()
    }
    match alg {
        ChapAlgorithm::Md5 => hash::<Md5>(id, secret, challenge),
        ChapAlgorithm::Sha1 => hash::<Sha1>(id, secret, challenge),
        ChapAlgorithm::Sha256 => hash::<Sha256>(id, secret, challenge),
        ChapAlgorithm::Sha3_256 => hash::<Sha3_256>(id, secret, challenge),
    }
}

/// Decodes an RFC 7143 §6.1 binary value: `0x`/`0X` hex (an odd number of digits means a
/// leading zero nibble) or `0b`/`0B` base64 (RFC 4648, padding optional), at most
/// [`MAX_BINARY_LEN`] bytes.
pub fn decode_binary(value: &str) -> Result<Vec<u8>, ChapError> {
    let (kind, body) = match value.as_bytes() {
        [b'0', k @ (b'x' | b'X' | b'b' | b'B'), ..] => (k.to_ascii_lowercase(), &value[2..]),
        _ => return Err(ChapError::MissingPrefix),
    };
    if body.is_empty() {
        return Err(ChapError::Empty);
    }
    if kind == b'x' {
        decode_hex(body)
    } else {
        decode_base64(body)
    }
}

/// `0x` followed by lowercase hex.
pub fn encode_hex(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn decode_hex(body: &str) -> Result<Vec<u8>, ChapError> {
    if body.len().div_ceil(2) > MAX_BINARY_LEN {
        return Err(ChapError::TooLong);
    }
    let digits = body.as_bytes();
    let nibble =
        |c: u8| -> Result<u8, ChapError> { (c as char).to_digit(16).map(|d| d as u8).ok_or(ChapError::InvalidHex) };
    let mut out = Vec::with_capacity(digits.len().div_ceil(2));
    let rest = if digits.len() % 2 == 1 {
        out.push(nibble(digits[0])?);
        &digits[1..]
    } else {
        digits
    };
    for pair in rest.chunks_exact(2) {
        out.push((nibble(pair[0])? << 4) | nibble(pair[1])?);
    }
    Ok(out)
}

fn decode_base64(body: &str) -> Result<Vec<u8>, ChapError> {
    let bytes = body.as_bytes();
    let unpadded = bytes
        .iter()
        .rposition(|&b| b != b'=')
        .map_or(&bytes[..0], |last| &bytes[..=last]);
    let padding = bytes.len() - unpadded.len();
    // Padding only completes the last quantum (RFC 4648 §4): at most two '='.
    if padding > 2 || (padding > 0 && !bytes.len().is_multiple_of(4)) || unpadded.len() % 4 == 1 {
        return Err(ChapError::InvalidBase64);
    }
    if unpadded.len() / 4 * 3 > MAX_BINARY_LEN + 3 {
        return Err(ChapError::TooLong);
    }
    let sextet = |c: u8| -> Result<u32, ChapError> {
        Ok(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(ChapError::InvalidBase64),
        } as u32)
    };
    let mut out = Vec::with_capacity(unpadded.len() * 3 / 4);
    for chunk in unpadded.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | sextet(c)?;
        }
        match chunk.len() {
            4 => out.extend_from_slice(&[(acc >> 16) as u8, (acc >> 8) as u8, acc as u8]),
            // Non-canonical trailing bits are malformed (RFC 4648 §3.5).
            3 if acc & 0b11 == 0 => out.extend_from_slice(&[(acc >> 10) as u8, (acc >> 2) as u8]),
            2 if acc & 0b1111 == 0 => out.push((acc >> 4) as u8),
            _ => return Err(ChapError::InvalidBase64),
        }
    }
    if out.len() > MAX_BINARY_LEN {
        return Err(ChapError::TooLong);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &[u8] = b"secretsecret";
    const CHALLENGE: [u8; 16] = [
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
    ];

    #[test]
    fn responses_match_independent_vectors() {
        // RFC 1994 §4.1: H(id || secret || challenge). Expected values computed with Python's
        // hashlib over bytes([1]) + b"secretsecret" + bytes.fromhex("0011..eeff").
        let cases = [
            (ChapAlgorithm::Md5, "3d3d7f13199a65926f355637d73daf5c"),
            (ChapAlgorithm::Sha1, "49e1aa2619e4e569c7225d7cd5c1f61a55ca4345"),
            (
                ChapAlgorithm::Sha256,
                "257057db4d4b74df190de053df3e0a4c7f0eff17c7d88ed0e20f53eb1c0d4a73",
            ),
            (
                ChapAlgorithm::Sha3_256,
                "b09c7123d338e0a7e868c76214f0e6546b1f1f56fe6c1c084d2e507b59c7b8fc",
            ),
        ];
        for (alg, expected) in cases {
            let r = chap_response(alg, 1, SECRET, &CHALLENGE);
            assert_eq!(hex::encode(&r), expected, "{alg:?}");
            assert_eq!(r.len(), alg.digest_len());
        }
    }

    #[test]
    fn algorithm_codes_and_selection() {
        // RFC 7143 §12.1.3: the target picks from the initiator's CHAP_A list.
        assert_eq!(ChapAlgorithm::from_code(5), Some(ChapAlgorithm::Md5));
        assert_eq!(ChapAlgorithm::from_code(8), Some(ChapAlgorithm::Sha3_256));
        assert_eq!(ChapAlgorithm::from_code(4), None);
        assert_eq!(ChapAlgorithm::Sha256.code(), 7);
        assert_eq!(ChapAlgorithm::select("7,5"), Some(ChapAlgorithm::Sha256));
        assert_eq!(ChapAlgorithm::select("5,6,7,8"), Some(ChapAlgorithm::Md5));
        assert_eq!(ChapAlgorithm::select("128,6"), Some(ChapAlgorithm::Sha1));
        // libiscsi test_iscsi_chap_invalid: "56" and "" must not be taken for MD5.
        assert_eq!(ChapAlgorithm::select("56"), None);
        assert_eq!(ChapAlgorithm::select(""), None);
        assert_eq!(ChapAlgorithm::select("+5"), None);
        assert_eq!(ChapAlgorithm::select("0x5"), None);
    }

    #[test]
    fn decode_hex_values() {
        // RFC 7143 §6.1 hex-constant; odd length has an implied leading zero nibble.
        assert_eq!(decode_binary("0x00ff10").unwrap(), vec![0x00, 0xff, 0x10]);
        assert_eq!(decode_binary("0XABC").unwrap(), vec![0x0a, 0xbc]);
        assert_eq!(decode_binary("0x1").unwrap(), vec![0x01]);
        assert_eq!(decode_binary("0x"), Err(ChapError::Empty));
        assert_eq!(decode_binary("0xzz"), Err(ChapError::InvalidHex));
        assert_eq!(decode_binary("ff"), Err(ChapError::MissingPrefix));
        assert_eq!(decode_binary(""), Err(ChapError::MissingPrefix));
        let max = format!("0x{}", "ab".repeat(MAX_BINARY_LEN));
        assert_eq!(decode_binary(&max).unwrap().len(), MAX_BINARY_LEN);
        let over = format!("0x{}", "ab".repeat(MAX_BINARY_LEN + 1));
        assert_eq!(decode_binary(&over), Err(ChapError::TooLong));
    }

    #[test]
    fn decode_base64_values() {
        // RFC 7143 §6.1 base64-constant (RFC 4648 §4); "0b" like libiscsi test_iscsi_chap_base64.
        // base64.b64encode(bytes.fromhex("3d3d7f13199a65926f355637d73daf5c")):
        assert_eq!(
            hex::encode(decode_binary("0bPT1/ExmaZZJvNVY31z2vXA==").unwrap()),
            "3d3d7f13199a65926f355637d73daf5c"
        );
        assert_eq!(decode_binary("0BAAEC").unwrap(), vec![0, 1, 2]);
        assert_eq!(decode_binary("0bAAE=").unwrap(), vec![0, 1]);
        assert_eq!(decode_binary("0bAAE").unwrap(), vec![0, 1]);
        assert_eq!(decode_binary("0bAA==").unwrap(), vec![0]);
        assert_eq!(decode_binary("0bAB=="), Err(ChapError::InvalidBase64));
        assert_eq!(decode_binary("0bA"), Err(ChapError::InvalidBase64));
        assert_eq!(decode_binary("0bAA=A"), Err(ChapError::InvalidBase64));
        assert_eq!(decode_binary("0b===="), Err(ChapError::InvalidBase64));
        assert_eq!(decode_binary("0bAA!A"), Err(ChapError::InvalidBase64));
        let over = format!("0b{}", "AAAA".repeat(MAX_BINARY_LEN / 3 + 1));
        assert_eq!(decode_binary(&over), Err(ChapError::TooLong));
    }

    #[test]
    fn hex_encoding_and_compare() {
        assert_eq!(encode_hex(&[0x0a, 0xbc]), "0x0abc");
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    proptest! {
        #[test]
        fn decode_never_panics(s in "\\PC{0,64}") {
            let _ = decode_binary(&s);
        }

        #[test]
        fn hex_roundtrip(bytes in proptest::collection::vec(any::<u8>(), 1..64)) {
            prop_assert_eq!(decode_binary(&encode_hex(&bytes)).unwrap(), bytes);
        }
    }
}
