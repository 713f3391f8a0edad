//! CDB decoding (SPC-4 §4.2, SBC-3 §5): operation codes, big-endian field readers that never
//! panic on short CDBs, and the common READ/WRITE/VERIFY family decode.

/// Operation codes (SPC-4 Annex E, SBC-3 table 13).
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8a;
    pub const ORWRITE_16: u8 = 0x8b;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const WRITE_ATOMIC_16: u8 = 0x9c;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_AND_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;
    pub const READ_DEFECT_DATA_12: u8 = 0xb7;
}

/// Service actions of SERVICE ACTION IN(16) (SBC-3) and MAINTENANCE IN (SPC-4).
pub mod sa {
    pub const READ_CAPACITY_16: u16 = 0x10;
    pub const GET_LBA_STATUS: u16 = 0x12;
    pub const REPORT_TARGET_PORT_GROUPS: u16 = 0x0a;
    pub const REPORT_SUPPORTED_OPERATION_CODES: u16 = 0x0c;
}

/// CDB length from the group code in the top three bits of the operation code (SPC-4 §4.2.5.1).
pub fn cdb_len(opcode: u8) -> usize {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 0,
    }
}

/// Byte `i`, or 0 past the end.
pub fn u8_at(cdb: &[u8], i: usize) -> u8 {
    cdb.get(i).copied().unwrap_or(0)
}

/// Big-endian unsigned of `n` bytes (n ≤ 8) at `i`; missing bytes read as 0.
pub fn be_at(cdb: &[u8], i: usize, n: usize) -> u64 {
    (i..i + n).fold(0u64, |acc, j| (acc << 8) | u64::from(u8_at(cdb, j)))
}

pub fn u16_at(cdb: &[u8], i: usize) -> u16 {
    be_at(cdb, i, 2) as u16
}

pub fn u32_at(cdb: &[u8], i: usize) -> u32 {
    be_at(cdb, i, 4) as u32
}

pub fn u64_at(cdb: &[u8], i: usize) -> u64 {
    be_at(cdb, i, 8)
}

/// The fields common to READ, WRITE, WRITE AND VERIFY and VERIFY (6/10/12/16) and ORWRITE(16),
/// SBC-3 §5.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockIo {
    pub lba: u64,
    /// Number of logical blocks (READ(6)/WRITE(6): 0 already turned into 256).
    pub blocks: u32,
    /// RDPROTECT / WRPROTECT / VRPROTECT / ORPROTECT (byte 1 bits 7..5; 0 for the 6-byte CDBs).
    pub protect: u8,
    pub dpo: bool,
    pub fua: bool,
    /// BYTCHK (VERIFY and WRITE AND VERIFY: byte 1 bits 2..1; meaningless for the others).
    pub bytchk: u8,
}

/// Decodes the LBA / transfer length family. `None` when the opcode is not one of them.
pub fn block_io(cdb: &[u8]) -> Option<BlockIo> {
    let opcode = u8_at(cdb, 0);
    let b1 = u8_at(cdb, 1);
    let flags = |lba, blocks| BlockIo {
        lba,
        blocks,
        protect: b1 >> 5,
        dpo: b1 & 0x10 != 0,
        fua: b1 & 0x08 != 0,
        bytchk: (b1 >> 1) & 0x03,
    };
    Some(match opcode {
        op::READ_6 | op::WRITE_6 => {
            let lba = be_at(cdb, 1, 3) & 0x1f_ffff;
            let n = u32::from(u8_at(cdb, 4));
            BlockIo {
                lba,
                blocks: if n == 0 { 256 } else { n },
                protect: 0,
                dpo: false,
                fua: false,
                bytchk: 0,
            }
        }
        op::READ_10 | op::WRITE_10 | op::WRITE_AND_VERIFY_10 | op::VERIFY_10 => {
            flags(u64::from(u32_at(cdb, 2)), u32::from(u16_at(cdb, 7)))
        }
        op::READ_12 | op::WRITE_12 | op::WRITE_AND_VERIFY_12 | op::VERIFY_12 => {
            flags(u64::from(u32_at(cdb, 2)), u32_at(cdb, 6))
        }
        op::READ_16 | op::WRITE_16 | op::WRITE_AND_VERIFY_16 | op::VERIFY_16 | op::ORWRITE_16 => {
            flags(u64_at(cdb, 2), u32_at(cdb, 10))
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SBC-3 §5.8: READ(6) has a 21-bit LBA and a transfer length of 0 meaning 256 blocks.
    #[test]
    fn read6_zero_means_256() {
        let io = block_io(&[op::READ_6, 0xff, 0x12, 0x34, 0, 0]).unwrap();
        assert_eq!(io.lba, 0x1f1234);
        assert_eq!(io.blocks, 256);
    }

    /// SBC-3 §5.11: READ(16) fields, RDPROTECT/DPO/FUA in byte 1.
    #[test]
    fn read16_fields() {
        let mut cdb = [0u8; 16];
        cdb[0] = op::READ_16;
        cdb[1] = 0x20 | 0x10 | 0x08;
        cdb[2..10].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        cdb[10..14].copy_from_slice(&9u32.to_be_bytes());
        let io = block_io(&cdb).unwrap();
        assert_eq!(
            io,
            BlockIo {
                lba: 0x0102_0304_0506_0708,
                blocks: 9,
                protect: 1,
                dpo: true,
                fua: true,
                bytchk: 0
            }
        );
    }

    #[test]
    fn short_cdbs_read_zero() {
        assert_eq!(block_io(&[op::WRITE_10]).unwrap().blocks, 0);
        assert_eq!(u32_at(&[1, 2], 0), 0x0102_0000);
        assert!(block_io(&[op::INQUIRY]).is_none());
        assert_eq!(cdb_len(op::READ_16), 16);
        assert_eq!(cdb_len(op::READ_12), 12);
        assert_eq!(cdb_len(op::MODE_SENSE_10), 10);
    }

    proptest::proptest! {
        /// Any byte string decodes without panicking (issue 2 item 7: CDB decoder fuzzing).
        #[test]
        fn decode_never_panics(cdb in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..32)) {
            let _ = block_io(&cdb);
            let _ = cdb_len(u8_at(&cdb, 0));
            let _ = u64_at(&cdb, 2);
        }
    }
}
