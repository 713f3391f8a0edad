//! SCSI wire formats (SPC-4, SBC-3): CDB decoding, sense data, VPD and mode pages.

pub mod cdb;
pub mod fence;
pub mod mode;
pub mod sense;
pub mod vpd;
