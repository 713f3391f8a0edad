//! Asymmetric logical unit access (SPC-4 §5.16): target port groups, their access states, and
//! REPORT TARGET PORT GROUPS (SPC-4 r37 §6.37).
//!
//! Every node of a cluster is one target port group with one target port; the logical units are
//! the same on every node. The access state of each group comes from an [`AluaView`] the cluster
//! installs with [`TargetLus::set_alua`](super::TargetLus::set_alua):
//!
//! ```text
//!   leader of the volume ─▶ its node's group Active/Optimized
//!   other nodes          ─▶ Active/Non-optimized (they forward commands to the leader)
//!   no leader known      ─▶ Transitioning (the command router answers NOT READY 04/0A)
//! ```
//!
//! Without a view (standalone `raftsan serve`) there is one group: the nexus's own, Active/
//! Optimized, preferred.
//!
//! TPGS = 01b in standard INQUIRY data: only implicit ALUA, so SET TARGET PORT GROUPS is not
//! supported. The states are reported here, not enforced: the cluster's command router decides
//! what a command on a non-active port gets; [`access_check`] tells it what SPC-4 allows.

use raftsan_proto::scsi::cdb::{self, op, sa};
use raftsan_proto::scsi::sense::{self, SenseCode};

/// An asymmetric access state (SPC-4 §5.16.2.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AluaState {
    ActiveOptimized,
    ActiveNonOptimized,
    Standby,
    Unavailable,
    Transitioning,
}

impl AluaState {
    /// The ASYMMETRIC ACCESS STATE field value (SPC-4 r37 §6.37, table "ASYMMETRIC ACCESS STATE
    /// field").
    pub fn code(self) -> u8 {
        match self {
            AluaState::ActiveOptimized => 0x0,
            AluaState::ActiveNonOptimized => 0x1,
            AluaState::Standby => 0x2,
            AluaState::Unavailable => 0x3,
            AluaState::Transitioning => 0xf,
        }
    }
}

/// One target port group of a logical unit as the cluster sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortGroupState {
    pub group: u16,
    pub state: AluaState,
    /// Relative target port identifiers of the group's ports.
    pub relative_ports: Vec<u16>,
}

/// Where the access states of a target's port groups come from (the cluster's view of the volume
/// leaders). Called by REPORT TARGET PORT GROUPS only, never on the I/O path.
pub trait AluaView: Send + Sync {
    /// Every port group of LU `lun`, in the order to report them. An empty list falls back to
    /// the standalone answer (the nexus's own group, Active/Optimized).
    fn port_groups(&self, lun: u64) -> Vec<PortGroupState>;
}

/// Operation codes this module needs that the CDB table does not name (SPC-4 Annex E).
mod opcode {
    pub const RECEIVE_DIAGNOSTIC_RESULTS: u8 = 0x1c;
    pub const SEND_DIAGNOSTIC: u8 = 0x1d;
    pub const LOG_SELECT: u8 = 0x4c;
    pub const LOG_SENSE: u8 = 0x4d;
    pub const MAINTENANCE_OUT: u8 = 0xa4;
    /// MAINTENANCE OUT service action SET TARGET PORT GROUPS.
    pub const SET_TARGET_PORT_GROUPS: u8 = 0x0a;
}

/// The sense a command gets on a target port in `state`, or `None` when it may run
/// (SPC-4 §5.16.2.4.3–§5.16.2.4.6). Active states run everything.
pub fn access_check(state: AluaState, cdb: &[u8]) -> Option<SenseCode> {
    let opcode = cdb::u8_at(cdb, 0);
    let service_action = cdb::u8_at(cdb, 1) & 0x1f;
    let rtpg = opcode == op::MAINTENANCE_IN && u16::from(service_action) == sa::REPORT_TARGET_PORT_GROUPS;
    let stpg = opcode == opcode::MAINTENANCE_OUT && service_action == opcode::SET_TARGET_PORT_GROUPS;
    let always = rtpg || matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE);
    match state {
        AluaState::ActiveOptimized | AluaState::ActiveNonOptimized => None,
        // §5.16.2.4.4: management commands, mode and log pages, diagnostics, reservations.
        AluaState::Standby => {
            let allowed = always
                || stpg
                || matches!(
                    opcode,
                    op::MODE_SENSE_6
                        | op::MODE_SENSE_10
                        | op::MODE_SELECT_6
                        | op::MODE_SELECT_10
                        | opcode::LOG_SENSE
                        | opcode::LOG_SELECT
                        | opcode::RECEIVE_DIAGNOSTIC_RESULTS
                        | opcode::SEND_DIAGNOSTIC
                        | op::PERSISTENT_RESERVE_IN
                        | op::PERSISTENT_RESERVE_OUT
                );
            (!allowed).then_some(sense::LOGICAL_UNIT_NOT_ACCESSIBLE_STANDBY)
        }
        // §5.16.2.4.5
        AluaState::Unavailable => (!(always || stpg)).then_some(sense::LOGICAL_UNIT_NOT_ACCESSIBLE_UNAVAILABLE),
        // §5.16.2.4.6
        AluaState::Transitioning => (!always).then_some(sense::LOGICAL_UNIT_NOT_ACCESSIBLE_TRANSITIONING),
    }
}

/// PARAMETER DATA FORMAT (CDB byte 1, bits 7..5; SPC-4 r37 §6.37 table "PARAMETER DATA FORMAT
/// field").
pub(crate) mod format {
    pub const LENGTH_ONLY: u8 = 0b000;
    pub const EXTENDED: u8 = 0b001;
}

/// Target port group descriptor (SPC-4 r37 §6.37.2, table "Target port group descriptor
/// format").
mod desc {
    /// Byte 0 bit 7.
    pub const PREF: u8 = 0x80;
    /// Byte 1: T_SUP (7), U_SUP (3), S_SUP (2), AN_SUP (1), AO_SUP (0). O_SUP and LBD_SUP stay 0:
    /// no offline or LBA-dependent state.
    pub const SUPPORTED: u8 = 0x80 | 0x08 | 0x04 | 0x02 | 0x01;
    /// STATUS CODE (byte 5) 00h: no status available (table "STATUS CODE field").
    pub const STATUS_NONE: u8 = 0x00;
    /// Extended header byte 4: FORMAT TYPE 001b in bits 6..4 (table "Extended header parameter
    /// data format").
    pub const EXTENDED_FORMAT_TYPE: u8 = 0x10;
}

/// REPORT TARGET PORT GROUPS parameter data (SPC-4 r37 §6.37.2) for `groups`, `preferred` setting
/// PREF on Active/Optimized groups; the caller truncates it to the allocation length.
///
/// Length-only header: RETURN DATA LENGTH (4 bytes) = bytes that follow. Extended header:
/// RETURN DATA LENGTH, FORMAT TYPE, IMPLICIT TRANSITION TIME (0: unspecified), 2 reserved; the
/// length counts the 4 extended-header bytes too (as Linux scsi_dh_alua and sg_rtpg read it).
pub(crate) fn report_target_port_groups(groups: &[PortGroupState], preferred: bool, extended: bool) -> Vec<u8> {
    let mut body = Vec::new();
    if extended {
        body.extend_from_slice(&[desc::EXTENDED_FORMAT_TYPE, 0, 0, 0]);
    }
    for g in groups {
        let pref = if preferred && g.state == AluaState::ActiveOptimized {
            desc::PREF
        } else {
            0
        };
        body.push(pref | g.state.code());
        body.push(desc::SUPPORTED);
        body.extend_from_slice(&g.group.to_be_bytes());
        // Reserved, status code, vendor specific, TARGET PORT COUNT.
        let ports = &g.relative_ports[..g.relative_ports.len().min(usize::from(u8::MAX))];
        body.extend_from_slice(&[0, desc::STATUS_NONE, 0, ports.len() as u8]);
        for p in ports {
            // Target port descriptor: 2 reserved, RELATIVE TARGET PORT IDENTIFIER.
            body.extend_from_slice(&[0, 0]);
            body.extend_from_slice(&p.to_be_bytes());
        }
    }
    let mut data = Vec::with_capacity(4 + body.len());
    data.extend_from_slice(&(body.len() as u32).to_be_bytes());
    data.extend_from_slice(&body);
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SPC-4 §5.16.2.4: what each state lets through.
    #[test]
    fn access_states() {
        let read10 = [op::READ_10, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        let rtpg = [op::MAINTENANCE_IN, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        let prin = [op::PERSISTENT_RESERVE_IN, 0, 0, 0, 0, 0, 0, 0, 8, 0];
        for s in [AluaState::ActiveOptimized, AluaState::ActiveNonOptimized] {
            assert_eq!(access_check(s, &read10), None);
        }
        assert_eq!(
            access_check(AluaState::Standby, &read10),
            Some(sense::LOGICAL_UNIT_NOT_ACCESSIBLE_STANDBY)
        );
        assert_eq!(access_check(AluaState::Standby, &prin), None);
        assert_eq!(
            access_check(AluaState::Unavailable, &prin),
            Some(sense::LOGICAL_UNIT_NOT_ACCESSIBLE_UNAVAILABLE)
        );
        assert_eq!(
            access_check(AluaState::Transitioning, &read10),
            Some(sense::LOGICAL_UNIT_NOT_ACCESSIBLE_TRANSITIONING)
        );
        for s in [AluaState::Standby, AluaState::Unavailable, AluaState::Transitioning] {
            assert_eq!(access_check(s, &rtpg), None);
            assert_eq!(access_check(s, &[op::INQUIRY, 0, 0, 0, 36, 0]), None);
            assert_eq!(access_check(s, &[op::REPORT_LUNS; 12]), None);
        }
        assert_eq!(
            access_check(AluaState::Transitioning, &[]),
            Some(sense::LOGICAL_UNIT_NOT_ACCESSIBLE_TRANSITIONING)
        );
    }
}
