//! Sense data (SPC-4 §4.5): a sense key with an additional sense code and qualifier, encoded in
//! fixed (response code 0x70) or descriptor (0x72) format.

/// SCSI status codes (SAM-5 §5.3).
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
    pub const ACA_ACTIVE: u8 = 0x30;
    pub const TASK_ABORTED: u8 = 0x40;
}

/// Sense keys (SPC-4 table 48).
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const RECOVERED_ERROR: u8 = 0x1;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const BLANK_CHECK: u8 = 0x8;
    pub const ABORTED_COMMAND: u8 = 0xb;
    pub const MISCOMPARE: u8 = 0xe;
}

/// A sense key with its additional sense code (ASC) and qualifier (ASCQ).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SenseCode {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl SenseCode {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        SenseCode { key, asc, ascq }
    }
}

// Codes used across the target; the names are SPC-4 Annex D's.
pub const INVALID_COMMAND_OPERATION_CODE: SenseCode = SenseCode::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
pub const LBA_OUT_OF_RANGE: SenseCode = SenseCode::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
pub const INVALID_FIELD_IN_CDB: SenseCode = SenseCode::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
pub const LOGICAL_UNIT_NOT_SUPPORTED: SenseCode = SenseCode::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
pub const INVALID_FIELD_IN_PARAMETER_LIST: SenseCode = SenseCode::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
pub const PARAMETER_LIST_LENGTH_ERROR: SenseCode = SenseCode::new(key::ILLEGAL_REQUEST, 0x1a, 0x00);
pub const SAVING_PARAMETERS_NOT_SUPPORTED: SenseCode = SenseCode::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
pub const INSUFFICIENT_REGISTRATION_RESOURCES: SenseCode = SenseCode::new(key::ILLEGAL_REQUEST, 0x55, 0x04);
pub const WRITE_PROTECTED: SenseCode = SenseCode::new(key::DATA_PROTECT, 0x27, 0x00);
pub const POWER_ON_RESET: SenseCode = SenseCode::new(key::UNIT_ATTENTION, 0x29, 0x00);
pub const BUS_DEVICE_RESET: SenseCode = SenseCode::new(key::UNIT_ATTENTION, 0x29, 0x03);
pub const I_T_NEXUS_LOSS: SenseCode = SenseCode::new(key::UNIT_ATTENTION, 0x29, 0x07);
pub const MODE_PARAMETERS_CHANGED: SenseCode = SenseCode::new(key::UNIT_ATTENTION, 0x2a, 0x01);
pub const RESERVATIONS_PREEMPTED: SenseCode = SenseCode::new(key::UNIT_ATTENTION, 0x2a, 0x03);
pub const RESERVATIONS_RELEASED: SenseCode = SenseCode::new(key::UNIT_ATTENTION, 0x2a, 0x04);
pub const REGISTRATIONS_PREEMPTED: SenseCode = SenseCode::new(key::UNIT_ATTENTION, 0x2a, 0x05);
pub const ASYMMETRIC_ACCESS_STATE_CHANGED: SenseCode = SenseCode::new(key::UNIT_ATTENTION, 0x2a, 0x06);
pub const CAPACITY_DATA_HAS_CHANGED: SenseCode = SenseCode::new(key::UNIT_ATTENTION, 0x2a, 0x09);
pub const REPORTED_LUNS_DATA_HAS_CHANGED: SenseCode = SenseCode::new(key::UNIT_ATTENTION, 0x3f, 0x0e);
/// NOT READY, LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION (SPC-4 §5.16.2.4.5).
pub const LOGICAL_UNIT_NOT_ACCESSIBLE_TRANSITIONING: SenseCode = SenseCode::new(key::NOT_READY, 0x04, 0x0a);
/// NOT READY, LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN STANDBY STATE (SPC-4 §5.16.2.4.3).
pub const LOGICAL_UNIT_NOT_ACCESSIBLE_STANDBY: SenseCode = SenseCode::new(key::NOT_READY, 0x04, 0x0b);
/// NOT READY, LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN UNAVAILABLE STATE (SPC-4 §5.16.2.4.4).
pub const LOGICAL_UNIT_NOT_ACCESSIBLE_UNAVAILABLE: SenseCode = SenseCode::new(key::NOT_READY, 0x04, 0x0c);
/// The earlier name of [`LOGICAL_UNIT_NOT_ACCESSIBLE_TRANSITIONING`].
pub const LOGICAL_UNIT_NOT_READY_TRANSITIONING: SenseCode = LOGICAL_UNIT_NOT_ACCESSIBLE_TRANSITIONING;
pub const MISCOMPARE_DURING_VERIFY: SenseCode = SenseCode::new(key::MISCOMPARE, 0x1d, 0x00);
pub const UNRECOVERED_READ_ERROR: SenseCode = SenseCode::new(key::MEDIUM_ERROR, 0x11, 0x00);
pub const WRITE_ERROR: SenseCode = SenseCode::new(key::MEDIUM_ERROR, 0x0c, 0x00);
pub const INTERNAL_TARGET_FAILURE: SenseCode = SenseCode::new(key::HARDWARE_ERROR, 0x44, 0x00);
pub const INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT: SenseCode = SenseCode::new(key::ILLEGAL_REQUEST, 0x0e, 0x03);
pub const NO_SENSE: SenseCode = SenseCode::new(key::NO_SENSE, 0x00, 0x00);
pub const INVALID_RELEASE_OF_PERSISTENT_RESERVATION: SenseCode = SenseCode::new(key::ILLEGAL_REQUEST, 0x26, 0x04);

/// Fixed-format (0x70) layout, SPC-4 §4.5.3 table 46.
mod fixed {
    pub const LEN: usize = 18;
    pub const RESPONSE_CODE: u8 = 0x70;
    pub const VALID: u8 = 0x80;
    pub const SENSE_KEY: usize = 2;
    pub const INFORMATION: usize = 3;
    pub const ADDITIONAL_LENGTH: usize = 7;
    pub const ASC: usize = 12;
    pub const ASCQ: usize = 13;
    pub const SENSE_KEY_SPECIFIC: usize = 15;
}

/// Descriptor-format (0x72) layout, SPC-4 §4.5.2 table 27, with the information (type 0, §4.5.2.2)
/// and sense-key-specific (type 2, §4.5.2.4) descriptors.
mod descriptor {
    pub const HEADER_LEN: usize = 8;
    pub const RESPONSE_CODE: u8 = 0x72;
    pub const SENSE_KEY: usize = 1;
    pub const ASC: usize = 2;
    pub const ASCQ: usize = 3;
    pub const ADDITIONAL_LENGTH: usize = 7;
    pub const INFORMATION_TYPE: u8 = 0x00;
    pub const INFORMATION_LEN: u8 = 0x0a;
    pub const SKS_TYPE: u8 = 0x02;
    pub const SKS_LEN: u8 = 0x06;
}

/// Sense data to report: a code plus the optional INFORMATION and SENSE KEY SPECIFIC fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub code: SenseCode,
    /// INFORMATION field (e.g. the miscompare offset, SBC-3 §5.2).
    pub information: Option<u64>,
    /// The three SENSE KEY SPECIFIC bytes, SKSV bit included (SPC-4 §4.5.2.4).
    pub sense_key_specific: Option<[u8; 3]>,
}

impl From<SenseCode> for Sense {
    fn from(code: SenseCode) -> Self {
        Sense {
            code,
            information: None,
            sense_key_specific: None,
        }
    }
}

impl Sense {
    /// ILLEGAL REQUEST with a field pointer into the CDB (C/D = 1, SPC-4 §4.5.2.4.2 table 30).
    pub fn cdb_field(code: SenseCode, byte: u16, bit: Option<u8>) -> Self {
        Sense {
            code,
            information: None,
            sense_key_specific: Some(field_pointer(true, byte, bit)),
        }
    }

    /// ILLEGAL REQUEST with a field pointer into the parameter list (C/D = 0).
    pub fn param_field(code: SenseCode, byte: u16, bit: Option<u8>) -> Self {
        Sense {
            code,
            information: None,
            sense_key_specific: Some(field_pointer(false, byte, bit)),
        }
    }

    pub fn with_information(mut self, information: u64) -> Self {
        self.information = Some(information);
        self
    }

    /// Encodes in fixed format, or descriptor format when `descriptor_format` (control mode page
    /// D_SENSE = 1).
    pub fn encode(&self, descriptor_format: bool) -> Vec<u8> {
        if descriptor_format {
            self.encode_descriptor()
        } else {
            self.encode_fixed()
        }
    }

    /// Fixed format, 18 bytes (SPC-4 §4.5.3). An INFORMATION value above 32 bits does not fit:
    /// VALID stays 0 then.
    pub fn encode_fixed(&self) -> Vec<u8> {
        let mut b = vec![0u8; fixed::LEN];
        b[0] = fixed::RESPONSE_CODE;
        b[fixed::SENSE_KEY] = self.code.key & 0x0f;
        if let Some(info) = self.information.and_then(|i| u32::try_from(i).ok()) {
            b[0] |= fixed::VALID;
            b[fixed::INFORMATION..fixed::INFORMATION + 4].copy_from_slice(&info.to_be_bytes());
        }
        b[fixed::ADDITIONAL_LENGTH] = (fixed::LEN - 8) as u8;
        b[fixed::ASC] = self.code.asc;
        b[fixed::ASCQ] = self.code.ascq;
        if let Some(sks) = self.sense_key_specific {
            b[fixed::SENSE_KEY_SPECIFIC..fixed::SENSE_KEY_SPECIFIC + 3].copy_from_slice(&sks);
        }
        b
    }

    /// Descriptor format (SPC-4 §4.5.2): header, then an information descriptor and a
    /// sense-key-specific descriptor when those fields are set.
    pub fn encode_descriptor(&self) -> Vec<u8> {
        let mut b = vec![0u8; descriptor::HEADER_LEN];
        b[0] = descriptor::RESPONSE_CODE;
        b[descriptor::SENSE_KEY] = self.code.key & 0x0f;
        b[descriptor::ASC] = self.code.asc;
        b[descriptor::ASCQ] = self.code.ascq;
        if let Some(info) = self.information {
            b.extend_from_slice(&[descriptor::INFORMATION_TYPE, descriptor::INFORMATION_LEN, 0x80, 0]);
            b.extend_from_slice(&info.to_be_bytes());
        }
        if let Some(sks) = self.sense_key_specific {
            b.extend_from_slice(&[descriptor::SKS_TYPE, descriptor::SKS_LEN, 0, 0]);
            b.extend_from_slice(&sks);
            b.extend_from_slice(&[0]);
        }
        b[descriptor::ADDITIONAL_LENGTH] = (b.len() - descriptor::HEADER_LEN) as u8;
        b
    }
}

/// SENSE KEY SPECIFIC bytes for a field pointer: SKSV, C/D, BPV and bit pointer, field pointer.
pub fn field_pointer(in_cdb: bool, byte: u16, bit: Option<u8>) -> [u8; 3] {
    let mut b0 = 0x80;
    if in_cdb {
        b0 |= 0x40;
    }
    if let Some(bit) = bit {
        b0 |= 0x08 | (bit & 0x07);
    }
    let [hi, lo] = byte.to_be_bytes();
    [b0, hi, lo]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SPC-4 §4.5.3: fixed format with the field pointer of INVALID FIELD IN CDB at byte 1 bit 5.
    #[test]
    fn fixed_with_field_pointer() {
        let s = Sense::cdb_field(INVALID_FIELD_IN_CDB, 1, Some(5));
        assert_eq!(
            s.encode_fixed(),
            [
                0x70, 0, 0x05, 0, 0, 0, 0, 0x0a, 0, 0, 0, 0, 0x24, 0x00, 0, 0xcd, 0x00, 0x01
            ]
        );
    }

    /// SBC-3 §5.2 COMPARE AND WRITE: MISCOMPARE with the offset in INFORMATION (VALID = 1).
    #[test]
    fn fixed_with_information() {
        let s = Sense::from(MISCOMPARE_DURING_VERIFY).with_information(0x1234);
        assert_eq!(
            s.encode_fixed(),
            [
                0xf0, 0, 0x0e, 0, 0, 0x12, 0x34, 0x0a, 0, 0, 0, 0, 0x1d, 0x00, 0, 0, 0, 0
            ]
        );
        // Beyond 32 bits the fixed format cannot carry it: VALID stays 0.
        let big = Sense::from(MISCOMPARE_DURING_VERIFY)
            .with_information(1 << 40)
            .encode_fixed();
        assert_eq!(big[0], 0x70);
        assert_eq!(&big[3..7], &[0, 0, 0, 0]);
    }

    /// SPC-4 §4.5.2: descriptor format, header only.
    #[test]
    fn descriptor_plain() {
        assert_eq!(
            Sense::from(LBA_OUT_OF_RANGE).encode_descriptor(),
            [0x72, 0x05, 0x21, 0x00, 0, 0, 0, 0]
        );
        assert_eq!(
            Sense::from(POWER_ON_RESET).encode(true),
            [0x72, 0x06, 0x29, 0x00, 0, 0, 0, 0]
        );
    }

    /// SPC-4 §4.5.2.2 and §4.5.2.4.2: information and sense-key-specific descriptors.
    #[test]
    fn descriptor_with_information_and_pointer() {
        let mut s = Sense::param_field(INVALID_FIELD_IN_PARAMETER_LIST, 0x0102, None);
        s.information = Some(7);
        assert_eq!(
            s.encode(true),
            [
                0x72, 0x05, 0x26, 0x00, 0, 0, 0, 20, //
                0x00, 0x0a, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 7, //
                0x02, 0x06, 0, 0, 0x80, 0x01, 0x02, 0
            ]
        );
    }
}
