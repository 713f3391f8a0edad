//! Shared check of PERSISTENT RESERVE IN parameter data (SPC-4 §6.15).

use raftsan_target::lu::pr::MAX_REGISTRATIONS;

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Checks `data` returned for service action `sa`; returns its PRgeneration (None for REPORT
/// CAPABILITIES, which has none).
pub fn check(sa: u8, data: &[u8]) -> Option<u32> {
    if sa == 2 {
        // REPORT CAPABILITIES: LENGTH = 8 (SPC-4 §6.15.4).
        assert_eq!(data.len(), 8);
        assert_eq!(u16::from_be_bytes([data[0], data[1]]), 8);
        return None;
    }
    assert!(data.len() >= 8, "PRIN data of {} bytes", data.len());
    let additional = be32(&data[4..8]) as usize;
    assert_eq!(
        additional + 8,
        data.len(),
        "PRIN ADDITIONAL LENGTH, service action {sa}"
    );
    match sa {
        0 => {
            assert_eq!(additional % 8, 0);
            assert!(additional / 8 <= MAX_REGISTRATIONS, "{} keys", additional / 8);
        }
        1 => assert!(additional == 0 || additional == 16),
        3 => {
            // Full status descriptors: 24 bytes + TransportID each (SPC-4 §6.15.5).
            let mut d = &data[8..];
            let mut n = 0;
            while !d.is_empty() {
                assert!(d.len() >= 24, "truncated full status descriptor");
                let tid = be32(&d[20..24]) as usize;
                assert!(24 + tid <= d.len(), "TransportID overruns");
                assert!(tid >= 24 && tid.is_multiple_of(4), "iSCSI TransportID of {tid} bytes");
                d = &d[24 + tid..];
                n += 1;
            }
            assert!(n <= MAX_REGISTRATIONS);
        }
        _ => panic!("service action {sa} answered"),
    }
    Some(be32(&data[0..4]))
}
