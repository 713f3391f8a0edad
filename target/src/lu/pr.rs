//! STUB — replaced by the PR engineer's file at merge
//!
//! Persistent reservations (SPC-4 §5.13) and SPC-2 RESERVE/RELEASE: only the interface the
//! logical unit calls, with no reservation ever held.

use raftsan_proto::scsi::sense::{INVALID_COMMAND_OPERATION_CODE, SenseCode};

pub struct PrNexus<'a> {
    pub initiator_port: &'a str,
    pub initiator_name: &'a str,
    pub isid: [u8; 6],
    pub relative_target_port: u16,
}

#[derive(Debug, PartialEq, Eq)]
pub enum PrError {
    Conflict,
    Check(SenseCode),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UaTarget {
    pub initiator_port: String,
    pub relative_target_port: Option<u16>,
    pub sense: SenseCode,
}

pub struct PersistentReservations {}

impl PersistentReservations {
    pub fn open(_aptpl_file: Option<std::path::PathBuf>) -> std::io::Result<Self> {
        Ok(PersistentReservations {})
    }

    pub fn reserve_in(&self, _nexus: &PrNexus<'_>, _cdb: &[u8]) -> Result<Vec<u8>, PrError> {
        Err(PrError::Check(INVALID_COMMAND_OPERATION_CODE))
    }

    pub fn reserve_out(
        &self,
        _nexus: &PrNexus<'_>,
        _cdb: &[u8],
        _params: &[u8],
    ) -> Result<Vec<UaTarget>, PrError> {
        Err(PrError::Check(INVALID_COMMAND_OPERATION_CODE))
    }

    pub fn check_access(&self, _nexus: &PrNexus<'_>, _cdb: &[u8]) -> Result<(), PrError> {
        Ok(())
    }

    pub fn reserve6(&self, _nexus: &PrNexus<'_>) -> Result<(), PrError> {
        Ok(())
    }

    pub fn release6(&self, _nexus: &PrNexus<'_>) -> Result<(), PrError> {
        Ok(())
    }

    pub fn lu_reset(&self) {}

    pub fn nexus_lost(&self, _nexus: &PrNexus<'_>) {}
}
