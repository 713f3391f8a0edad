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
pub const LOGICAL_UNIT_NOT_READY_TRANSITIONING: SenseCode = SenseCode::new(key::NOT_READY, 0x04, 0x0a);
pub const MISCOMPARE_DURING_VERIFY: SenseCode = SenseCode::new(key::MISCOMPARE, 0x1d, 0x00);
pub const UNRECOVERED_READ_ERROR: SenseCode = SenseCode::new(key::MEDIUM_ERROR, 0x11, 0x00);
pub const WRITE_ERROR: SenseCode = SenseCode::new(key::MEDIUM_ERROR, 0x0c, 0x00);
pub const INTERNAL_TARGET_FAILURE: SenseCode = SenseCode::new(key::HARDWARE_ERROR, 0x44, 0x00);
