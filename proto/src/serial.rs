//! Serial-number arithmetic for CmdSN, StatSN, DataSN and R2TSN (RFC 1982 with SERIAL_BITS = 32,
//! as RFC 7143 §4.2.2.1 requires).

/// `a < b` in serial-number arithmetic. Undefined pairs (exactly 2^31 apart) compare false both
/// ways, as RFC 1982 §3.2 leaves them undefined.
pub fn lt(a: u32, b: u32) -> bool {
    a != b && (b.wrapping_sub(a) as i32) > 0
}

/// `a <= b` in serial-number arithmetic.
pub fn le(a: u32, b: u32) -> bool {
    a == b || lt(a, b)
}

/// `a > b` in serial-number arithmetic.
pub fn gt(a: u32, b: u32) -> bool {
    lt(b, a)
}

/// Whether `sn` lies in the window `[lo, hi]` (both inclusive) in serial-number arithmetic.
pub fn in_window(sn: u32, lo: u32, hi: u32) -> bool {
    le(lo, sn) && le(sn, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_around() {
        assert!(lt(0xffff_fff0, 5));
        assert!(gt(5, 0xffff_fff0));
        assert!(!lt(5, 5));
        assert!(le(5, 5));
        assert!(lt(1, 2));
        assert!(!lt(2, 1));
    }

    #[test]
    fn half_range_is_undefined() {
        assert!(!lt(0, 0x8000_0000));
        assert!(!lt(0x8000_0000, 0));
    }

    #[test]
    fn window() {
        assert!(in_window(0, 0xffff_fffe, 3));
        assert!(!in_window(4, 0xffff_fffe, 3));
        assert!(!in_window(0xffff_fffd, 0xffff_fffe, 3));
    }
}
