//! CRC32C digests (RFC 7143 §12.1, Castagnoli polynomial 0x1EDC6F41).
//!
//! The digest is appended little-endian on the wire, as the byte order of the iSCSI CRC32C
//! definition works out (RFC 7143 §13.1 and Appendix B examples).

/// CRC32C of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    ::crc32c::crc32c(bytes)
}

/// CRC32C of several slices as if they were one (data segment plus its padding).
pub fn crc32c_parts(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |crc, p| ::crc32c::crc32c_append(crc, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 3720 Appendix B.4 test vectors.
    #[test]
    fn rfc3720_b4_vectors() {
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&inc), 0x46dd_794e);
        let dec: Vec<u8> = (0..32).rev().collect();
        assert_eq!(crc32c(&dec), 0x113f_db5c);
    }

    #[test]
    fn parts_equal_whole() {
        let a = b"hello ";
        let b = b"world";
        assert_eq!(crc32c_parts(&[a, b]), crc32c(b"hello world"));
    }
}
