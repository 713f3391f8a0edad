//! SCSI persistent reservations (SPC-4 §5.13, PERSISTENT RESERVE IN §6.15, PERSISTENT RESERVE
//! OUT §6.16) and SPC-2 RESERVE/RELEASE, as the single source of truth for one logical unit.
//!
//! # State
//!
//! ```text
//!   registrations: [(initiator port, target port | ALL, key)]   ≤ MAX_REGISTRATIONS
//!   reservation:   None | Some(type, holder registration)        (scope is always LU_SCOPE)
//!   generation:    u32, +1 per REGISTER / REGISTER AND IGNORE / CLEAR / PREEMPT / MOVE
//!   aptpl:         whether the last REGISTER-type command asked to persist through power loss
//!   spc2 holder:   None | Some(I_T nexus)                        (RESERVE(6)/(10))
//! ```
//!
//! A registration is keyed by I_T nexus: the iSCSI initiator port (TransportID name
//! `<iqn>,i,0x<isid>`, compared case-insensitively) and the relative target port, or every
//! target port when it was made with ALL_TG_PT=1. For all-registrants types (WE-AR, EA-AR) every
//! registrant is a reservation holder and READ RESERVATION reports key 0 (SPC-4 §5.13.10).
//!
//! # Calls
//!
//! The LU dispatcher calls [`PersistentReservations::check_access`] before every command; on
//! `Ok` it runs the command, routing PERSISTENT RESERVE IN/OUT to [`reserve_in`] /
//! [`reserve_out`] and RESERVE/RELEASE (6 and 10) to [`reserve6`] / [`release6`]. `reserve_out`
//! returns the unit attentions the dispatcher must establish. Task management calls
//! [`lu_reset`]; session teardown calls [`nexus_lost`].
//!
//! [`reserve_in`]: PersistentReservations::reserve_in
//! [`reserve_out`]: PersistentReservations::reserve_out
//! [`reserve6`]: PersistentReservations::reserve6
//! [`release6`]: PersistentReservations::release6
//! [`lu_reset`]: PersistentReservations::lu_reset
//! [`nexus_lost`]: PersistentReservations::nexus_lost
//!
//! # Deliberately not done
//!
//! * PREEMPT AND ABORT behaves as PREEMPT (same registrations removed, same unit attentions);
//!   aborting the preempted nexuses' tasks (SPC-4 §5.13.11.4.2 d) is left to the caller, which
//!   today aborts nothing.
//! * TransportIDs (SPEC_I_PT, REGISTER AND MOVE) must be iSCSI initiator-port TransportIDs
//!   (protocol 5h, format 01b); a name-only TransportID (format 00b) names every port of an
//!   initiator, which this model cannot key, and is refused with INVALID FIELD IN PARAMETER LIST.
//! * An ALL_TG_PT registration is one registration: unregistering it through any target port
//!   removes it for every port.
//! * Only LU_SCOPE exists; any other scope is INVALID FIELD IN CDB.
//! * RESERVE(10)/RELEASE(10) third-party reservations are the dispatcher's to refuse.
//!
//! # Persistence (APTPL)
//!
//! With APTPL=1 the whole PR state (not the SPC-2 reservation) is written after every change:
//! `magic "RSPR" | version u32 | payload length u32 | CRC32C(payload) u32 | payload`, the payload
//! a prost-encoded [`PersistedState`], written to a temporary file, fsynced, renamed over the
//! old file and the directory fsynced. A change is committed in memory only after it is on disk.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use raftsan_proto::scsi::sense::{self, SenseCode, key};

/// An I_T nexus as the PR code sees it.
pub struct PrNexus<'a> {
    /// iSCSI TransportID name of the initiator port: `"<iqn>,i,0x<isid 12 hex>"`.
    pub initiator_port: &'a str,
    pub initiator_name: &'a str,
    pub isid: [u8; 6],
    pub relative_target_port: u16,
}

/// Why a command may not run or failed.
#[derive(Debug, PartialEq, Eq)]
pub enum PrError {
    /// Status RESERVATION CONFLICT (0x18).
    Conflict,
    /// CHECK CONDITION with this sense.
    Check(SenseCode),
}

/// A unit attention to establish on every I_T nexus with this initiator port (and target port,
/// when Some).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UaTarget {
    pub initiator_port: String,
    pub relative_target_port: Option<u16>,
    pub sense: SenseCode,
}

/// ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION (SPC-4 Annex D).
pub const INVALID_RELEASE_OF_PERSISTENT_RESERVATION: SenseCode = SenseCode::new(key::ILLEGAL_REQUEST, 0x26, 0x04);

/// Most registrations one LU keeps; one more is INSUFFICIENT REGISTRATION RESOURCES.
pub const MAX_REGISTRATIONS: usize = 256;
/// Longest initiator port name accepted in a TransportID (RFC 7143 §4.2.7.1 caps iSCSI names
/// at 223 bytes; plus ",i,0x" and 12 hex digits).
const MAX_PORT_NAME_BYTES: usize = 240;

/// PERSISTENT RESERVE IN/OUT operation codes.
pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;

/// PERSISTENT RESERVE IN service actions (SPC-4 §6.15.1).
pub mod prin_sa {
    pub const READ_KEYS: u8 = 0x00;
    pub const READ_RESERVATION: u8 = 0x01;
    pub const REPORT_CAPABILITIES: u8 = 0x02;
    pub const READ_FULL_STATUS: u8 = 0x03;
}

/// PERSISTENT RESERVE OUT service actions (SPC-4 §6.16.1).
pub mod prout_sa {
    pub const REGISTER: u8 = 0x00;
    pub const RESERVE: u8 = 0x01;
    pub const RELEASE: u8 = 0x02;
    pub const CLEAR: u8 = 0x03;
    pub const PREEMPT: u8 = 0x04;
    pub const PREEMPT_AND_ABORT: u8 = 0x05;
    pub const REGISTER_AND_IGNORE_EXISTING_KEY: u8 = 0x06;
    pub const REGISTER_AND_MOVE: u8 = 0x07;
}

/// CDB fields (SPC-4 §6.15.1, §6.16.1).
mod cdb_off {
    pub const SERVICE_ACTION: usize = 1;
    pub const SERVICE_ACTION_MASK: u8 = 0x1f;
    pub const SCOPE_TYPE: usize = 2;
    pub const PRIN_LEN: usize = 10;
    pub const PROUT_LEN: usize = 10;
    pub const PROUT_PARAMETER_LIST_LENGTH: usize = 5;
}

/// PROUT basic parameter list (SPC-4 §6.16.3).
mod param_off {
    pub const RESERVATION_KEY: usize = 0;
    pub const SERVICE_ACTION_RESERVATION_KEY: usize = 8;
    pub const FLAGS: usize = 20;
    pub const SPEC_I_PT: u8 = 0x08;
    pub const ALL_TG_PT: u8 = 0x04;
    pub const APTPL: u8 = 0x01;
    pub const BASIC_LEN: usize = 24;
    /// SPEC_I_PT=1: TRANSPORTID PARAMETER DATA LENGTH, then the TransportIDs.
    pub const SPEC_I_PT_TID_LENGTH: usize = 24;
    pub const SPEC_I_PT_TIDS: usize = 28;
}

/// REGISTER AND MOVE parameter list (SPC-4 §6.16.4).
mod move_off {
    pub const FLAGS: usize = 17;
    pub const UNREG: u8 = 0x02;
    pub const APTPL: u8 = 0x01;
    pub const RELATIVE_TARGET_PORT: usize = 18;
    pub const TID_LENGTH: usize = 20;
    pub const TIDS: usize = 24;
}

/// iSCSI TransportID (SPC-4 §7.6.4.6).
mod tid {
    pub const PROTOCOL_ISCSI: u8 = 0x05;
    pub const FORMAT_INITIATOR_PORT: u8 = 0x40;
    pub const FORMAT_MASK: u8 = 0xc0;
    pub const PROTOCOL_MASK: u8 = 0x0f;
    pub const ADDITIONAL_LENGTH: usize = 2;
    pub const NAME: usize = 4;
    pub const MIN_ADDITIONAL_LENGTH: usize = 20;
}

/// Persistent reservation types (the TYPE field, SPC-4 §6.16.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrType {
    WriteExclusive = 0x1,
    ExclusiveAccess = 0x3,
    WriteExclusiveRegistrantsOnly = 0x5,
    ExclusiveAccessRegistrantsOnly = 0x6,
    WriteExclusiveAllRegistrants = 0x7,
    ExclusiveAccessAllRegistrants = 0x8,
}

impl PrType {
    pub fn from_code(code: u8) -> Option<PrType> {
        Some(match code {
            0x1 => PrType::WriteExclusive,
            0x3 => PrType::ExclusiveAccess,
            0x5 => PrType::WriteExclusiveRegistrantsOnly,
            0x6 => PrType::ExclusiveAccessRegistrantsOnly,
            0x7 => PrType::WriteExclusiveAllRegistrants,
            0x8 => PrType::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    fn all_registrants(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
        )
    }

    fn registrants_only_or_all(self) -> bool {
        !matches!(self, PrType::WriteExclusive | PrType::ExclusiveAccess)
    }

    /// Write Exclusive family: reads from non-holders are allowed.
    fn write_exclusive(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusive | PrType::WriteExclusiveRegistrantsOnly | PrType::WriteExclusiveAllRegistrants
        )
    }
}

/// LU_SCOPE, the only scope (SPC-4 §6.16.2).
const LU_SCOPE: u8 = 0x0;

/// Identity of a registration: initiator port and target port (None = all target ports).
#[derive(Clone, Debug, PartialEq, Eq)]
struct RegId {
    initiator_port: String,
    relative_target_port: Option<u16>,
}

impl RegId {
    fn same(&self, other: &RegId) -> bool {
        self.relative_target_port == other.relative_target_port
            && self.initiator_port.eq_ignore_ascii_case(&other.initiator_port)
    }

    fn covers(&self, port: &str, rtp: u16) -> bool {
        self.initiator_port.eq_ignore_ascii_case(port) && self.relative_target_port.is_none_or(|p| p == rtp)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Registration {
    id: RegId,
    key: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Reservation {
    pr_type: PrType,
    /// The registration that reserved; for all-registrants types every registrant holds.
    holder: RegId,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PrState {
    generation: u32,
    registrations: Vec<Registration>,
    reservation: Option<Reservation>,
    aptpl: bool,
}

impl PrState {
    fn find(&self, port: &str, rtp: u16) -> Option<usize> {
        self.registrations.iter().position(|r| r.id.covers(port, rtp))
    }

    fn is_holder(&self, reg: &RegId) -> bool {
        match &self.reservation {
            None => false,
            Some(res) if res.pr_type.all_registrants() => true,
            Some(res) => res.holder.same(reg),
        }
    }

    /// Holder rules after registrations went away (SPC-4 §5.13.11.2.3 and §5.13.10): a
    /// non-all-registrants reservation ends with its holder's registration, an all-registrants
    /// one with the last registration. Returns the type of a reservation so ended.
    fn drop_orphan_reservation(&mut self) -> Option<PrType> {
        let res = self.reservation.as_ref()?;
        let orphaned = if res.pr_type.all_registrants() {
            self.registrations.is_empty()
        } else {
            !self.registrations.iter().any(|r| r.id.same(&res.holder))
        };
        if orphaned {
            self.reservation.take().map(|r| r.pr_type)
        } else {
            None
        }
    }

    fn bump(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct NexusId {
    initiator_port: String,
    relative_target_port: u16,
}

impl NexusId {
    fn of(n: &PrNexus<'_>) -> NexusId {
        NexusId {
            initiator_port: n.initiator_port.to_owned(),
            relative_target_port: n.relative_target_port,
        }
    }

    fn is(&self, n: &PrNexus<'_>) -> bool {
        self.relative_target_port == n.relative_target_port
            && self.initiator_port.eq_ignore_ascii_case(n.initiator_port)
    }
}

struct Inner {
    state: PrState,
    spc2_holder: Option<NexusId>,
}

/// The persistent reservations of one logical unit. `Send + Sync`; every call takes one lock.
pub struct PersistentReservations {
    aptpl_file: Option<PathBuf>,
    inner: Mutex<Inner>,
}

fn illegal(code: SenseCode) -> PrError {
    PrError::Check(code)
}

fn be_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

fn be_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

fn be_u16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(off..off + 2) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}

fn ua(out: &mut Vec<UaTarget>, id: &RegId, sense: SenseCode) {
    let t = UaTarget {
        initiator_port: id.initiator_port.clone(),
        relative_target_port: id.relative_target_port,
        sense,
    };
    if !out.contains(&t) {
        out.push(t);
    }
}

/// Encodes an iSCSI initiator-port TransportID (SPC-4 §7.6.4.6, format 01b).
fn encode_transport_id(port: &str, out: &mut Vec<u8>) {
    let with_nul = port.len() + 1;
    let additional = with_nul.div_ceil(4).max(tid::MIN_ADDITIONAL_LENGTH / 4) * 4;
    out.push(tid::FORMAT_INITIATOR_PORT | tid::PROTOCOL_ISCSI);
    out.push(0);
    out.extend_from_slice(&(additional as u16).to_be_bytes());
    out.extend_from_slice(port.as_bytes());
    out.resize(out.len() + additional - port.len(), 0);
}

/// Decodes one iSCSI initiator-port TransportID at the start of `b`; returns the port name and
/// the TransportID's length.
fn decode_transport_id(b: &[u8]) -> Result<(String, usize), PrError> {
    let bad = || illegal(sense::INVALID_FIELD_IN_PARAMETER_LIST);
    let head = *b.first().ok_or_else(bad)?;
    if head & tid::PROTOCOL_MASK != tid::PROTOCOL_ISCSI || head & tid::FORMAT_MASK != tid::FORMAT_INITIATOR_PORT {
        return Err(bad());
    }
    if b.len() < tid::NAME {
        return Err(bad());
    }
    let additional = usize::from(be_u16(b, tid::ADDITIONAL_LENGTH));
    if additional % 4 != 0 || additional < tid::MIN_ADDITIONAL_LENGTH {
        return Err(bad());
    }
    let body = b.get(tid::NAME..tid::NAME + additional).ok_or_else(bad)?;
    let name_len = body.iter().position(|&c| c == 0).ok_or_else(bad)?;
    let name = std::str::from_utf8(&body[..name_len]).map_err(|_| bad())?;
    // "<iqn>,i,0x<12 hex digits>"
    let (iname, isid) = name.rsplit_once(",i,0x").ok_or_else(bad)?;
    if iname.is_empty()
        || name.len() > MAX_PORT_NAME_BYTES
        || isid.len() != 12
        || !isid.bytes().all(|c| c.is_ascii_hexdigit())
    {
        return Err(bad());
    }
    Ok((name.to_owned(), tid::NAME + additional))
}

/// Which reservation rules a command falls under (SPC-4 §5.13.1 table 63, SBC-3 §4.18).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AccessClass {
    /// Allowed through every reservation type.
    Allowed,
    /// Allowed through Write Exclusive types, conflicts with Exclusive Access types.
    Read,
    /// Conflicts with every type unless the nexus holds (or, RO/AR, is registered).
    Write,
}

fn classify(cdb: &[u8]) -> AccessClass {
    use AccessClass::*;
    let op = cdb.first().copied().unwrap_or(0);
    let sa = cdb.get(1).copied().unwrap_or(0) & 0x1f;
    match op {
        // TEST UNIT READY (ALLOW COMMANDS 011b), REQUEST SENSE, INQUIRY, LOG SENSE,
        // PERSISTENT RESERVE IN, REPORT LUNS, READ CAPACITY(10), ACCESS CONTROL IN/OUT.
        0x00 | 0x03 | 0x12 | 0x4d | 0x5e | 0xa0 | 0x25 | 0x86 | 0x87 => Allowed,
        // PERSISTENT RESERVE OUT: the service action decides in reserve_out (SPC-4 §5.13.1).
        0x5f => Allowed,
        // RESERVE/RELEASE (6)/(10): compatible reservation handling in reserve6/release6.
        0x16 | 0x17 | 0x56 | 0x57 => Allowed,
        // SERVICE ACTION IN(16): READ CAPACITY(16) allowed, GET LBA STATUS reads.
        0x9e => match sa {
            0x10 => Allowed,
            0x12 => Read,
            _ => Write,
        },
        // MAINTENANCE IN.
        0xa3 => match sa {
            // REPORT IDENTIFYING INFORMATION, REPORT TARGET PORT GROUPS, REPORT ALIASES,
            // REPORT PRIORITY, REPORT TIMESTAMP.
            0x05 | 0x0a | 0x0b | 0x0e | 0x0f => Allowed,
            // REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS.
            0x0c | 0x0d => Read,
            _ => Write,
        },
        // SERVICE ACTION IN(12): READ MEDIA SERIAL NUMBER.
        0xab if sa == 0x01 => Allowed,
        // READ(6/10/12/16), VERIFY(10/12/16), PRE-FETCH(10/16), MODE SENSE(6/10), READ BUFFER,
        // RECEIVE DIAGNOSTIC RESULTS, READ ATTRIBUTE, READ DEFECT DATA(10/12),
        // SECURITY PROTOCOL IN, RECEIVE COPY RESULTS.
        0x08 | 0x28 | 0xa8 | 0x88 | 0x2f | 0xaf | 0x8f | 0x34 | 0x90 | 0x1a | 0x5a | 0x3c | 0x1c | 0x8c | 0x37
        | 0xb7 | 0xa2 | 0x84 => Read,
        // Variable length: READ(32) and VERIFY(32).
        0x7f if matches!(be_u16(cdb, 8), 0x0009 | 0x000a) => Read,
        _ => Write,
    }
}

/// Commands another I_T nexus may send while an SPC-2 reservation is held (SPC-2 §5.5.1):
/// INQUIRY, REQUEST SENSE, REPORT LUNS, RELEASE(6)/(10) (which then does nothing).
fn spc2_allowed(cdb: &[u8]) -> bool {
    matches!(cdb.first().copied(), Some(0x12 | 0x03 | 0xa0 | 0x17 | 0x57))
}

/// Parsed PROUT basic parameter list.
struct BasicParams {
    reservation_key: u64,
    sa_key: u64,
    spec_i_pt: bool,
    all_tg_pt: bool,
    aptpl: bool,
}

impl PersistentReservations {
    /// Loads state persisted by an earlier APTPL=1 operation; `None` → APTPL requests fail
    /// with INVALID FIELD IN PARAMETER LIST. A missing file is an empty state; a corrupt file
    /// is an error that names the file and what is wrong with it.
    pub fn open(aptpl_file: Option<PathBuf>) -> io::Result<Self> {
        let state = match &aptpl_file {
            Some(path) => match fs::read(path) {
                Ok(bytes) => decode_state_file(&bytes).map_err(|why| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "persistent reservation file {} is corrupt ({why}); move it aside \
                             to start without persisted reservations",
                            path.display()
                        ),
                    )
                })?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => PrState::default(),
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("reading persistent reservation file {}: {e}", path.display()),
                    ));
                }
            },
            None => PrState::default(),
        };
        Ok(PersistentReservations {
            aptpl_file,
            inner: Mutex::new(Inner {
                state,
                spc2_holder: None,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock cannot leave PrState half-updated: every
        // change is computed on a copy and swapped in whole.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// PERSISTENT RESERVE IN (SPC-4 §6.15): the full parameter data; the caller truncates it to
    /// the allocation length.
    pub fn reserve_in(&self, _nexus: &PrNexus<'_>, cdb: &[u8]) -> Result<Vec<u8>, PrError> {
        if cdb.len() < cdb_off::PRIN_LEN {
            return Err(illegal(sense::INVALID_FIELD_IN_CDB));
        }
        let inner = self.lock();
        let st = &inner.state;
        let mut out = Vec::new();
        out.extend_from_slice(&st.generation.to_be_bytes());
        match cdb[cdb_off::SERVICE_ACTION] & cdb_off::SERVICE_ACTION_MASK {
            prin_sa::READ_KEYS => {
                // SPC-4 §6.15.2.
                let len = st.registrations.len() * 8;
                out.extend_from_slice(&(len as u32).to_be_bytes());
                for r in &st.registrations {
                    out.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            prin_sa::READ_RESERVATION => {
                // SPC-4 §6.15.3.
                match &st.reservation {
                    None => out.extend_from_slice(&0u32.to_be_bytes()),
                    Some(res) => {
                        out.extend_from_slice(&16u32.to_be_bytes());
                        let key = if res.pr_type.all_registrants() {
                            0
                        } else {
                            st.registrations
                                .iter()
                                .find(|r| r.id.same(&res.holder))
                                .map_or(0, |r| r.key)
                        };
                        out.extend_from_slice(&key.to_be_bytes());
                        out.extend_from_slice(&[0; 4]); // obsolete
                        out.push(0);
                        out.push(LU_SCOPE << 4 | res.pr_type.code());
                        out.extend_from_slice(&[0; 2]); // obsolete
                    }
                }
            }
            prin_sa::REPORT_CAPABILITIES => {
                // SPC-4 §6.15.4; no PRgeneration here.
                out.clear();
                out.extend_from_slice(&8u16.to_be_bytes());
                let ptpl_c = if self.aptpl_file.is_some() { 0x01 } else { 0 };
                // CRH | SIP_C | ATP_C | PTPL_C
                out.push(0x10 | 0x08 | 0x04 | ptpl_c);
                // TMV | ALLOW COMMANDS 011b | PTPL_A
                out.push(0x80 | 0x30 | u8::from(st.aptpl));
                // Type mask: WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX | EX_AC_AR.
                out.extend_from_slice(&[0xea, 0x01, 0x00, 0x00]);
            }
            prin_sa::READ_FULL_STATUS => {
                // SPC-4 §6.15.5.
                let mut descs = Vec::new();
                for r in &st.registrations {
                    descs.extend_from_slice(&r.key.to_be_bytes());
                    descs.extend_from_slice(&[0; 4]);
                    let holder = st.is_holder(&r.id);
                    let all_tg_pt = r.id.relative_target_port.is_none();
                    descs.push(u8::from(all_tg_pt) << 1 | u8::from(holder));
                    descs.push(match (&st.reservation, holder) {
                        (Some(res), true) => LU_SCOPE << 4 | res.pr_type.code(),
                        _ => 0,
                    });
                    descs.extend_from_slice(&[0; 4]);
                    descs.extend_from_slice(&r.id.relative_target_port.unwrap_or(0).to_be_bytes());
                    let mut tid = Vec::new();
                    encode_transport_id(&r.id.initiator_port, &mut tid);
                    descs.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    descs.extend_from_slice(&tid);
                }
                out.extend_from_slice(&(descs.len() as u32).to_be_bytes());
                out.extend_from_slice(&descs);
            }
            _ => return Err(illegal(sense::INVALID_FIELD_IN_CDB)),
        }
        Ok(out)
    }

    /// PERSISTENT RESERVE OUT (SPC-4 §6.16, §5.13.7–§5.13.11): on success, the unit attentions
    /// to establish.
    pub fn reserve_out(&self, nexus: &PrNexus<'_>, cdb: &[u8], params: &[u8]) -> Result<Vec<UaTarget>, PrError> {
        if cdb.len() < cdb_off::PROUT_LEN {
            return Err(illegal(sense::INVALID_FIELD_IN_CDB));
        }
        let sa = cdb[cdb_off::SERVICE_ACTION] & cdb_off::SERVICE_ACTION_MASK;
        if sa > prout_sa::REGISTER_AND_MOVE {
            return Err(illegal(sense::INVALID_FIELD_IN_CDB));
        }
        let scope = cdb[cdb_off::SCOPE_TYPE] >> 4;
        let type_code = cdb[cdb_off::SCOPE_TYPE] & 0x0f;
        let list_len = be_u32(cdb, cdb_off::PROUT_PARAMETER_LIST_LENGTH) as usize;
        if params.len() < list_len {
            return Err(illegal(sense::PARAMETER_LIST_LENGTH_ERROR));
        }
        let params = &params[..list_len];

        // Service actions that carry a TYPE need a valid one (SPC-4 §6.16.2).
        let pr_type = match sa {
            prout_sa::RESERVE
            | prout_sa::RELEASE
            | prout_sa::PREEMPT
            | prout_sa::PREEMPT_AND_ABORT
            | prout_sa::REGISTER_AND_MOVE => {
                if scope != LU_SCOPE {
                    return Err(illegal(sense::INVALID_FIELD_IN_CDB));
                }
                Some(PrType::from_code(type_code).ok_or(illegal(sense::INVALID_FIELD_IN_CDB))?)
            }
            _ => None,
        };

        if sa == prout_sa::REGISTER_AND_MOVE {
            let pr_type = pr_type.ok_or(illegal(sense::INVALID_FIELD_IN_CDB))?;
            return self.register_and_move(nexus, pr_type, params);
        }

        let spec_i_pt = params
            .get(param_off::FLAGS)
            .is_some_and(|f| f & param_off::SPEC_I_PT != 0);
        let length_ok = if spec_i_pt && sa == prout_sa::REGISTER {
            params.len() >= param_off::SPEC_I_PT_TIDS
        } else {
            params.len() == param_off::BASIC_LEN
        };
        if !length_ok {
            return Err(illegal(sense::PARAMETER_LIST_LENGTH_ERROR));
        }
        let flags = params[param_off::FLAGS];
        let p = BasicParams {
            reservation_key: be_u64(params, param_off::RESERVATION_KEY),
            sa_key: be_u64(params, param_off::SERVICE_ACTION_RESERVATION_KEY),
            spec_i_pt,
            all_tg_pt: flags & param_off::ALL_TG_PT != 0,
            aptpl: flags & param_off::APTPL != 0,
        };
        if p.spec_i_pt && sa != prout_sa::REGISTER {
            return Err(illegal(sense::INVALID_FIELD_IN_PARAMETER_LIST));
        }
        let registers = matches!(sa, prout_sa::REGISTER | prout_sa::REGISTER_AND_IGNORE_EXISTING_KEY);
        if registers && p.aptpl && self.aptpl_file.is_none() {
            return Err(illegal(sense::INVALID_FIELD_IN_PARAMETER_LIST));
        }

        let mut inner = self.lock();
        let mut st = inner.state.clone();
        let mut uas = Vec::new();
        let me = st.find(nexus.initiator_port, nexus.relative_target_port);

        match sa {
            prout_sa::REGISTER | prout_sa::REGISTER_AND_IGNORE_EXISTING_KEY => {
                let ignore = sa == prout_sa::REGISTER_AND_IGNORE_EXISTING_KEY;
                self.register(&mut st, nexus, me, &p, ignore, params, &mut uas)?;
            }
            _ => {
                // Every other service action needs a registered nexus with the right key
                // (SPC-4 §5.13.1).
                let idx = me.ok_or(PrError::Conflict)?;
                if st.registrations[idx].key != p.reservation_key {
                    return Err(PrError::Conflict);
                }
                let my_id = st.registrations[idx].id.clone();
                let pr_type = pr_type.unwrap_or(PrType::WriteExclusive);
                match sa {
                    prout_sa::RESERVE => reserve(&mut st, &my_id, pr_type)?,
                    prout_sa::RELEASE => release(&mut st, &my_id, pr_type, &mut uas)?,
                    prout_sa::CLEAR => clear(&mut st, &my_id, &mut uas),
                    _ => preempt(&mut st, &my_id, pr_type, p.sa_key, &mut uas)?,
                }
            }
        }
        self.commit(&mut inner, st)?;
        Ok(uas)
    }

    /// REGISTER and REGISTER AND IGNORE EXISTING KEY (SPC-4 §5.13.7).
    #[allow(clippy::too_many_arguments)] // one call site; splitting it would hide the table
    fn register(
        &self,
        st: &mut PrState,
        nexus: &PrNexus<'_>,
        me: Option<usize>,
        p: &BasicParams,
        ignore: bool,
        params: &[u8],
        uas: &mut Vec<UaTarget>,
    ) -> Result<(), PrError> {
        match me {
            None => {
                if !ignore && p.reservation_key != 0 {
                    return Err(PrError::Conflict);
                }
                if p.sa_key == 0 {
                    // Nothing to register: GOOD without any change (the APTPL bit included).
                    return if p.spec_i_pt {
                        Err(illegal(sense::INVALID_FIELD_IN_PARAMETER_LIST))
                    } else {
                        Ok(())
                    };
                }
                let rtp = (!p.all_tg_pt).then_some(nexus.relative_target_port);
                let id = RegId {
                    initiator_port: nexus.initiator_port.to_owned(),
                    relative_target_port: rtp,
                };
                // One registration per initiator port per target port: an ALL_TG_PT request
                // from a port already registered elsewhere would make two.
                if st.registrations.iter().any(|r| {
                    r.id.initiator_port.eq_ignore_ascii_case(&id.initiator_port)
                        && (rtp.is_none() || r.id.relative_target_port.is_none())
                }) {
                    return Err(PrError::Conflict);
                }
                let mut new = vec![Registration { id, key: p.sa_key }];
                if p.spec_i_pt {
                    let n = be_u32(params, param_off::SPEC_I_PT_TID_LENGTH) as usize;
                    if param_off::SPEC_I_PT_TIDS.checked_add(n) != Some(params.len()) {
                        return Err(illegal(sense::PARAMETER_LIST_LENGTH_ERROR));
                    }
                    let mut rest = &params[param_off::SPEC_I_PT_TIDS..];
                    while !rest.is_empty() {
                        let (port, used) = decode_transport_id(rest)?;
                        rest = &rest[used..];
                        let id = RegId {
                            initiator_port: port,
                            relative_target_port: rtp,
                        };
                        let taken = st.registrations.iter().chain(new.iter()).any(|r| {
                            r.id.initiator_port.eq_ignore_ascii_case(&id.initiator_port)
                                && (rtp.is_none()
                                    || r.id.relative_target_port.is_none()
                                    || r.id.relative_target_port == rtp)
                        });
                        if taken {
                            // SPC-4 §6.16.3: a TransportID naming a registered nexus.
                            return Err(illegal(sense::INVALID_FIELD_IN_PARAMETER_LIST));
                        }
                        new.push(Registration { id, key: p.sa_key });
                    }
                }
                if st.registrations.len() + new.len() > MAX_REGISTRATIONS {
                    return Err(illegal(sense::INSUFFICIENT_REGISTRATION_RESOURCES));
                }
                st.registrations.extend(new);
            }
            Some(idx) => {
                if !ignore && st.registrations[idx].key != p.reservation_key {
                    return Err(PrError::Conflict);
                }
                if p.spec_i_pt {
                    return Err(illegal(sense::INVALID_FIELD_IN_CDB));
                }
                if p.sa_key == 0 {
                    // Unregister (SPC-4 §5.13.11.2.3).
                    let gone = st.registrations.remove(idx);
                    if let Some(t) = st.drop_orphan_reservation() {
                        // Releasing a registrants-only reservation by unregistering tells
                        // every other registrant (SPC-4 §5.13.11.2.3).
                        if matches!(
                            t,
                            PrType::WriteExclusiveRegistrantsOnly | PrType::ExclusiveAccessRegistrantsOnly
                        ) {
                            for r in &st.registrations {
                                if !r.id.same(&gone.id) {
                                    ua(uas, &r.id, sense::RESERVATIONS_RELEASED);
                                }
                            }
                        }
                    }
                } else {
                    st.registrations[idx].key = p.sa_key;
                }
            }
        }
        st.aptpl = p.aptpl;
        st.bump();
        Ok(())
    }

    /// REGISTER AND MOVE (SPC-4 §5.13.8, §6.16.4).
    fn register_and_move(&self, nexus: &PrNexus<'_>, pr_type: PrType, params: &[u8]) -> Result<Vec<UaTarget>, PrError> {
        if params.len() < move_off::TIDS {
            return Err(illegal(sense::PARAMETER_LIST_LENGTH_ERROR));
        }
        let tid_len = be_u32(params, move_off::TID_LENGTH) as usize;
        if move_off::TIDS.checked_add(tid_len).is_none_or(|end| end > params.len()) {
            return Err(illegal(sense::PARAMETER_LIST_LENGTH_ERROR));
        }
        let reservation_key = be_u64(params, param_off::RESERVATION_KEY);
        let sa_key = be_u64(params, param_off::SERVICE_ACTION_RESERVATION_KEY);
        let flags = params[move_off::FLAGS];
        let aptpl = flags & move_off::APTPL != 0;
        let unreg = flags & move_off::UNREG != 0;
        let dest_rtp = be_u16(params, move_off::RELATIVE_TARGET_PORT);

        let mut inner = self.lock();
        let mut st = inner.state.clone();
        let idx = st
            .find(nexus.initiator_port, nexus.relative_target_port)
            .ok_or(PrError::Conflict)?;
        if st.registrations[idx].key != reservation_key {
            return Err(PrError::Conflict);
        }
        let my_id = st.registrations[idx].id.clone();
        match &st.reservation {
            Some(res) if !res.pr_type.all_registrants() && res.holder.same(&my_id) => {}
            _ => return Err(PrError::Conflict),
        }
        let tids = &params[move_off::TIDS..move_off::TIDS + tid_len];
        let (dest_port, _) = decode_transport_id(tids)?;
        if sa_key == 0
            || dest_rtp == 0
            || (dest_port.eq_ignore_ascii_case(nexus.initiator_port) && dest_rtp == nexus.relative_target_port)
        {
            return Err(illegal(sense::INVALID_FIELD_IN_PARAMETER_LIST));
        }
        if aptpl && self.aptpl_file.is_none() {
            return Err(illegal(sense::INVALID_FIELD_IN_PARAMETER_LIST));
        }
        let dest_id = match st.find(&dest_port, dest_rtp) {
            Some(d) => {
                st.registrations[d].key = sa_key;
                st.registrations[d].id.clone()
            }
            None => {
                if st.registrations.len() >= MAX_REGISTRATIONS {
                    return Err(illegal(sense::INSUFFICIENT_REGISTRATION_RESOURCES));
                }
                let id = RegId {
                    initiator_port: dest_port,
                    relative_target_port: Some(dest_rtp),
                };
                st.registrations.push(Registration {
                    id: id.clone(),
                    key: sa_key,
                });
                id
            }
        };
        st.reservation = Some(Reservation {
            pr_type,
            holder: dest_id,
        });
        if unreg {
            st.registrations.retain(|r| !r.id.same(&my_id));
        }
        st.aptpl = aptpl;
        st.bump();
        self.commit(&mut inner, st)?;
        Ok(Vec::new())
    }

    /// Persists (when APTPL is or was active) and then installs `st`.
    fn commit(&self, inner: &mut Inner, st: PrState) -> Result<(), PrError> {
        if st == inner.state {
            return Ok(());
        }
        if let Some(path) = &self.aptpl_file
            && (st.aptpl || inner.state.aptpl)
        {
            let bytes = encode_state_file(&st);
            if let Err(e) = write_atomically(path, &bytes) {
                tracing::error!(path = %path.display(), error = %e,
                    "cannot persist persistent reservations; command fails");
                return Err(illegal(sense::INTERNAL_TARGET_FAILURE));
            }
        }
        inner.state = st;
        Ok(())
    }

    /// The whole PR state (not the SPC-2 reservation), prost-encoded as a [`PersistedState`],
    /// whatever APTPL says: for replicating it to other nodes.
    pub fn export(&self) -> Vec<u8> {
        use prost::Message;
        to_message(&self.lock().state).encode_to_vec()
    }

    /// Replaces the PR state with one from [`PersistentReservations::export`]; written to the
    /// APTPL file first when APTPL is or was active, as any change. The SPC-2 reservation stays.
    pub fn import(&self, bytes: &[u8]) -> io::Result<()> {
        use prost::Message;
        let bad = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("persistent reservation state: {why}"),
            )
        };
        let msg = PersistedState::decode(bytes).map_err(|e| bad(format!("undecodable: {e}")))?;
        let st = from_message(msg).map_err(bad)?;
        let mut inner = self.lock();
        self.commit(&mut inner, st)
            .map_err(|_| io::Error::other("cannot persist the imported persistent reservation state"))
    }

    /// May this command run on this nexus? (SPC-4 §5.13.1 table 63 and SBC-3 §4.18 for
    /// persistent reservations; SPC-2 §5.5.1 for a RESERVE(6)/(10) held by another nexus.)
    pub fn check_access(&self, nexus: &PrNexus<'_>, cdb: &[u8]) -> Result<(), PrError> {
        let inner = self.lock();
        if let Some(h) = &inner.spc2_holder
            && !h.is(nexus)
            && !spc2_allowed(cdb)
        {
            return Err(PrError::Conflict);
        }
        let st = &inner.state;
        let Some(res) = &st.reservation else {
            return Ok(());
        };
        let registered = st.find(nexus.initiator_port, nexus.relative_target_port);
        if let Some(i) = registered
            && st.is_holder(&st.registrations[i].id)
        {
            return Ok(());
        }
        if registered.is_some() && res.pr_type.registrants_only_or_all() {
            return Ok(());
        }
        match classify(cdb) {
            AccessClass::Allowed => Ok(()),
            AccessClass::Read if res.pr_type.write_exclusive() => Ok(()),
            _ => Err(PrError::Conflict),
        }
    }

    /// RESERVE(6)/(10) (SPC-2 §7.21, with compatible reservation handling, SPC-4 §5.13.3).
    pub fn reserve6(&self, nexus: &PrNexus<'_>) -> Result<(), PrError> {
        let mut inner = self.lock();
        let st = &inner.state;
        if st.reservation.is_some() {
            let holder = st
                .find(nexus.initiator_port, nexus.relative_target_port)
                .is_some_and(|i| st.is_holder(&st.registrations[i].id));
            return if holder { Ok(()) } else { Err(PrError::Conflict) };
        }
        match &inner.spc2_holder {
            Some(h) if !h.is(nexus) => Err(PrError::Conflict),
            _ => {
                inner.spc2_holder = Some(NexusId::of(nexus));
                Ok(())
            }
        }
    }

    /// RELEASE(6)/(10) (SPC-2 §7.17, SPC-4 §5.13.3): releasing a reservation this nexus does not
    /// hold is GOOD and does nothing.
    pub fn release6(&self, nexus: &PrNexus<'_>) -> Result<(), PrError> {
        let mut inner = self.lock();
        let st = &inner.state;
        if st.reservation.is_some() {
            let registered = st.find(nexus.initiator_port, nexus.relative_target_port).is_some();
            return if registered { Ok(()) } else { Err(PrError::Conflict) };
        }
        if inner.spc2_holder.as_ref().is_some_and(|h| h.is(nexus)) {
            inner.spc2_holder = None;
        }
        Ok(())
    }

    /// LOGICAL UNIT RESET and target resets: SPC-2 reservations end, persistent ones stay
    /// (SPC-4 §5.13.1).
    pub fn lu_reset(&self) {
        self.lock().spc2_holder = None;
    }

    /// The I_T nexus is gone (logout, connection loss, session reinstatement): its SPC-2
    /// reservation is released.
    pub fn nexus_lost(&self, nexus: &PrNexus<'_>) {
        let mut inner = self.lock();
        if inner.spc2_holder.as_ref().is_some_and(|h| h.is(nexus)) {
            inner.spc2_holder = None;
        }
    }
}

/// RESERVE (SPC-4 §5.13.9).
fn reserve(st: &mut PrState, me: &RegId, pr_type: PrType) -> Result<(), PrError> {
    match &st.reservation {
        Some(res) => {
            if st.is_holder(me) && res.pr_type == pr_type {
                Ok(())
            } else {
                Err(PrError::Conflict)
            }
        }
        None => {
            st.reservation = Some(Reservation {
                pr_type,
                holder: me.clone(),
            });
            Ok(())
        }
    }
}

/// RELEASE (SPC-4 §5.13.11.2.2).
fn release(st: &mut PrState, me: &RegId, pr_type: PrType, uas: &mut Vec<UaTarget>) -> Result<(), PrError> {
    let Some(res) = &st.reservation else {
        return Ok(());
    };
    if !st.is_holder(me) {
        return Ok(());
    }
    if res.pr_type != pr_type {
        return Err(illegal(INVALID_RELEASE_OF_PERSISTENT_RESERVATION));
    }
    if res.pr_type.registrants_only_or_all() {
        for r in &st.registrations {
            if !r.id.same(me) {
                ua(uas, &r.id, sense::RESERVATIONS_RELEASED);
            }
        }
    }
    st.reservation = None;
    Ok(())
}

/// CLEAR (SPC-4 §5.13.11.2.6).
fn clear(st: &mut PrState, me: &RegId, uas: &mut Vec<UaTarget>) {
    for r in &st.registrations {
        if !r.id.same(me) {
            ua(uas, &r.id, sense::RESERVATIONS_PREEMPTED);
        }
    }
    st.registrations.clear();
    st.reservation = None;
    st.bump();
}

/// PREEMPT and PREEMPT AND ABORT (SPC-4 §5.13.11.4).
fn preempt(st: &mut PrState, me: &RegId, pr_type: PrType, sa_key: u64, uas: &mut Vec<UaTarget>) -> Result<(), PrError> {
    let remove_key = |st: &mut PrState, uas: &mut Vec<UaTarget>, k: u64| -> usize {
        let before = st.registrations.len();
        let mut kept = Vec::with_capacity(before);
        for r in st.registrations.drain(..) {
            if r.key == k && !r.id.same(me) {
                ua(uas, &r.id, sense::REGISTRATIONS_PREEMPTED);
            } else {
                kept.push(r);
            }
        }
        st.registrations = kept;
        before - st.registrations.len()
    };
    match st.reservation.clone() {
        None => {
            // SPC-4 §5.13.11.4.4: no reservation, only registrations go.
            if sa_key == 0 {
                return Err(illegal(sense::INVALID_FIELD_IN_PARAMETER_LIST));
            }
            let own = st.registrations.iter().any(|r| r.key == sa_key && r.id.same(me));
            if remove_key(st, uas, sa_key) == 0 && !own {
                return Err(PrError::Conflict);
            }
        }
        Some(res) if res.pr_type.all_registrants() => {
            if sa_key == 0 {
                // Everyone else goes; the preempting nexus now holds the new type.
                let mut kept = Vec::new();
                for r in st.registrations.drain(..) {
                    if r.id.same(me) {
                        kept.push(r);
                    } else {
                        ua(uas, &r.id, sense::REGISTRATIONS_PREEMPTED);
                    }
                }
                st.registrations = kept;
                st.reservation = Some(Reservation {
                    pr_type,
                    holder: me.clone(),
                });
            } else {
                let own = st.registrations.iter().any(|r| r.key == sa_key && r.id.same(me));
                if remove_key(st, uas, sa_key) == 0 && !own {
                    return Err(PrError::Conflict);
                }
            }
        }
        Some(res) => {
            let holder_key = st.registrations.iter().find(|r| r.id.same(&res.holder)).map(|r| r.key);
            if sa_key == 0 {
                return Err(illegal(sense::INVALID_FIELD_IN_PARAMETER_LIST));
            }
            if holder_key == Some(sa_key) {
                // SPC-4 §5.13.11.4.3: the holder is preempted; the reservation moves.
                remove_key(st, uas, sa_key);
                st.reservation = Some(Reservation {
                    pr_type,
                    holder: me.clone(),
                });
                if res.pr_type != pr_type {
                    for r in &st.registrations {
                        if !r.id.same(me) {
                            ua(uas, &r.id, sense::RESERVATIONS_RELEASED);
                        }
                    }
                }
            } else {
                let own = st.registrations.iter().any(|r| r.key == sa_key && r.id.same(me));
                if remove_key(st, uas, sa_key) == 0 && !own {
                    return Err(PrError::Conflict);
                }
            }
        }
    }
    st.drop_orphan_reservation();
    st.bump();
    Ok(())
}

// ---- persistence -------------------------------------------------------------------------

/// File header: magic, version, payload length, CRC32C of the payload.
const FILE_MAGIC: [u8; 4] = *b"RSPR";
const FILE_VERSION: u32 = 1;
const FILE_HEADER_LEN: usize = 16;
/// A file larger than this is not ours (MAX_REGISTRATIONS × a few hundred bytes).
const FILE_MAX_PAYLOAD: usize = 1 << 20;

/// The persisted PR state (prost message).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PersistedState {
    #[prost(uint32, tag = "1")]
    pub generation: u32,
    #[prost(message, repeated, tag = "2")]
    pub registrations: Vec<PersistedRegistration>,
    #[prost(message, optional, tag = "3")]
    pub reservation: Option<PersistedReservation>,
    #[prost(bool, tag = "4")]
    pub aptpl: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PersistedRegistration {
    #[prost(string, tag = "1")]
    pub initiator_port: String,
    /// Absent: registered on all target ports (ALL_TG_PT).
    #[prost(uint32, optional, tag = "2")]
    pub relative_target_port: Option<u32>,
    #[prost(fixed64, tag = "3")]
    pub key: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PersistedReservation {
    #[prost(uint32, tag = "1")]
    pub pr_type: u32,
    #[prost(string, tag = "2")]
    pub holder_port: String,
    #[prost(uint32, optional, tag = "3")]
    pub holder_relative_target_port: Option<u32>,
}

fn to_message(st: &PrState) -> PersistedState {
    PersistedState {
        generation: st.generation,
        registrations: st
            .registrations
            .iter()
            .map(|r| PersistedRegistration {
                initiator_port: r.id.initiator_port.clone(),
                relative_target_port: r.id.relative_target_port.map(u32::from),
                key: r.key,
            })
            .collect(),
        reservation: st.reservation.as_ref().map(|res| PersistedReservation {
            pr_type: u32::from(res.pr_type.code()),
            holder_port: res.holder.initiator_port.clone(),
            holder_relative_target_port: res.holder.relative_target_port.map(u32::from),
        }),
        aptpl: st.aptpl,
    }
}

fn encode_state_file(st: &PrState) -> Vec<u8> {
    use prost::Message;
    let payload = to_message(st).encode_to_vec();
    let mut out = Vec::with_capacity(FILE_HEADER_LEN + payload.len());
    out.extend_from_slice(&FILE_MAGIC);
    out.extend_from_slice(&FILE_VERSION.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

fn decode_state_file(bytes: &[u8]) -> Result<PrState, String> {
    use prost::Message;
    if bytes.len() < FILE_HEADER_LEN || bytes[..4] != FILE_MAGIC {
        return Err("not a raftsan persistent reservation file (bad magic)".into());
    }
    let version = be_u32(bytes, 4);
    if version != FILE_VERSION {
        return Err(format!("unknown version {version}, expected {FILE_VERSION}"));
    }
    let len = be_u32(bytes, 8) as usize;
    if len > FILE_MAX_PAYLOAD || bytes.len() != FILE_HEADER_LEN + len {
        return Err(format!("payload length {len} does not match file size {}", bytes.len()));
    }
    let payload = &bytes[FILE_HEADER_LEN..];
    let crc = be_u32(bytes, 12);
    if crc32c::crc32c(payload) != crc {
        return Err("CRC32C mismatch".into());
    }
    let msg = PersistedState::decode(payload).map_err(|e| format!("undecodable payload: {e}"))?;
    if !msg.aptpl {
        // The last registration asked not to persist: power loss clears everything.
        return Ok(PrState::default());
    }
    from_message(msg)
}

/// Checks and converts a decoded state: port names, port numbers, reservation type and holder.
fn from_message(msg: PersistedState) -> Result<PrState, String> {
    let rtp = |v: Option<u32>| -> Result<Option<u16>, String> {
        v.map(|p| u16::try_from(p).map_err(|_| format!("relative target port {p} out of range")))
            .transpose()
    };
    if msg.registrations.len() > MAX_REGISTRATIONS {
        return Err(format!(
            "{} registrations, more than {MAX_REGISTRATIONS}",
            msg.registrations.len()
        ));
    }
    let mut st = PrState {
        generation: msg.generation,
        registrations: Vec::new(),
        reservation: None,
        aptpl: msg.aptpl,
    };
    for r in msg.registrations {
        if r.initiator_port.is_empty() || r.initiator_port.len() > MAX_PORT_NAME_BYTES {
            return Err("registration with a bad initiator port name".into());
        }
        st.registrations.push(Registration {
            id: RegId {
                initiator_port: r.initiator_port,
                relative_target_port: rtp(r.relative_target_port)?,
            },
            key: r.key,
        });
    }
    if let Some(res) = msg.reservation {
        let pr_type = u8::try_from(res.pr_type)
            .ok()
            .and_then(PrType::from_code)
            .ok_or_else(|| format!("reservation type {} invalid", res.pr_type))?;
        let holder = RegId {
            initiator_port: res.holder_port,
            relative_target_port: rtp(res.holder_relative_target_port)?,
        };
        if !pr_type.all_registrants() && !st.registrations.iter().any(|r| r.id.same(&holder)) {
            return Err("reservation holder is not registered".into());
        }
        if pr_type.all_registrants() && st.registrations.is_empty() {
            return Err("all-registrants reservation without registrations".into());
        }
        st.reservation = Some(Reservation { pr_type, holder });
    }
    Ok(st)
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new file: temporary
/// file, fsync, rename, fsync of the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const P1: &str = "iqn.2024-01.test:init1,i,0x23d000000001";
    const P2: &str = "iqn.2024-01.test:init2,i,0x23d000000002";
    const K1: u64 = 0x1111_2222_3333_4444;
    const K2: u64 = 0x5555_6666_7777_8888;

    fn nx(port: &str, rtp: u16) -> PrNexus<'_> {
        PrNexus {
            initiator_port: port,
            initiator_name: port.split(',').next().unwrap_or(port),
            isid: [0x23, 0xd0, 0, 0, 0, 1],
            relative_target_port: rtp,
        }
    }

    fn prin_cdb(sa: u8) -> [u8; 10] {
        [PERSISTENT_RESERVE_IN, sa, 0, 0, 0, 0, 0, 0x40, 0x00, 0]
    }

    fn prout_cdb(sa: u8, pr_type: u8, len: u32) -> [u8; 10] {
        let l = len.to_be_bytes();
        [PERSISTENT_RESERVE_OUT, sa, pr_type, 0, 0, l[0], l[1], l[2], l[3], 0]
    }

    fn basic(rk: u64, sark: u64, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&rk.to_be_bytes());
        p[8..16].copy_from_slice(&sark.to_be_bytes());
        p[20] = flags;
        p
    }

    fn out(
        pr: &PersistentReservations,
        n: &PrNexus<'_>,
        sa: u8,
        t: u8,
        rk: u64,
        sark: u64,
    ) -> Result<Vec<UaTarget>, PrError> {
        pr.reserve_out(n, &prout_cdb(sa, t, 24), &basic(rk, sark, 0))
    }

    fn reg(pr: &PersistentReservations, n: &PrNexus<'_>, k: u64) {
        out(pr, n, prout_sa::REGISTER_AND_IGNORE_EXISTING_KEY, 0, 0, k).expect("register");
    }

    fn keys(pr: &PersistentReservations) -> (u32, Vec<u64>) {
        let d = pr
            .reserve_in(&nx(P1, 1), &prin_cdb(prin_sa::READ_KEYS))
            .expect("read keys");
        let gen_ = be_u32(&d, 0);
        let n = be_u32(&d, 4) as usize / 8;
        (gen_, (0..n).map(|i| be_u64(&d, 8 + 8 * i)).collect())
    }

    fn read_res(pr: &PersistentReservations) -> Vec<u8> {
        pr.reserve_in(&nx(P1, 1), &prin_cdb(prin_sa::READ_RESERVATION))
            .expect("read res")
    }

    fn fresh() -> PersistentReservations {
        PersistentReservations::open(None).expect("open")
    }

    const READ10: [u8; 10] = [0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0];
    const WRITE10: [u8; 10] = [0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0];

    // ---- PERSISTENT RESERVE IN data layouts ----

    /// SPC-4 §6.15.2: PRgeneration, ADDITIONAL LENGTH, keys.
    #[test]
    fn read_keys_exact_bytes() {
        let pr = fresh();
        assert_eq!(
            pr.reserve_in(&nx(P1, 1), &prin_cdb(prin_sa::READ_KEYS)),
            Ok(vec![0, 0, 0, 0, 0, 0, 0, 0])
        );
        reg(&pr, &nx(P1, 1), K1);
        reg(&pr, &nx(P2, 1), K2);
        assert_eq!(
            pr.reserve_in(&nx(P1, 1), &prin_cdb(prin_sa::READ_KEYS)),
            Ok(vec![
                0, 0, 0, 2, 0, 0, 0, 16, //
                0x11, 0x11, 0x22, 0x22, 0x33, 0x33, 0x44, 0x44, //
                0x55, 0x55, 0x66, 0x66, 0x77, 0x77, 0x88, 0x88,
            ])
        );
    }

    /// SPC-4 §6.15.3; all-registrants types report key 0 (§5.13.10).
    #[test]
    fn read_reservation_exact_bytes() {
        let pr = fresh();
        assert_eq!(read_res(&pr), vec![0, 0, 0, 0, 0, 0, 0, 0]);
        reg(&pr, &nx(P1, 1), K1);
        out(&pr, &nx(P1, 1), prout_sa::RESERVE, 3, K1, 0).expect("reserve");
        assert_eq!(
            read_res(&pr),
            vec![
                0, 0, 0, 1, 0, 0, 0, 16, //
                0x11, 0x11, 0x22, 0x22, 0x33, 0x33, 0x44, 0x44, //
                0, 0, 0, 0, 0, 0x03, 0, 0,
            ]
        );
        out(&pr, &nx(P1, 1), prout_sa::RELEASE, 3, K1, 0).expect("release");
        out(&pr, &nx(P1, 1), prout_sa::RESERVE, 8, K1, 0).expect("reserve EA-AR");
        assert_eq!(
            read_res(&pr),
            vec![
                0, 0, 0, 1, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0, 0
            ]
        );
    }

    /// SPC-4 §6.15.4: CRH, SIP_C, ATP_C, PTPL_C (only with a file), TMV, ALLOW
    /// COMMANDS 011b, PTPL_A, and the type mask of all six types ().
    #[test]
    fn report_capabilities_exact_bytes() {
        let pr = fresh();
        let caps = pr.reserve_in(&nx(P1, 1), &prin_cdb(prin_sa::REPORT_CAPABILITIES));
        assert_eq!(caps, Ok(vec![0x00, 0x08, 0x1c, 0xb0, 0xea, 0x01, 0x00, 0x00]));

        let dir = tempfile::tempdir().expect("tempdir");
        let pr = PersistentReservations::open(Some(dir.path().join("pr"))).expect("open");
        let caps = pr.reserve_in(&nx(P1, 1), &prin_cdb(prin_sa::REPORT_CAPABILITIES));
        assert_eq!(caps, Ok(vec![0x00, 0x08, 0x1d, 0xb0, 0xea, 0x01, 0x00, 0x00]));
        pr.reserve_out(
            &nx(P1, 1),
            &prout_cdb(prout_sa::REGISTER, 0, 24),
            &basic(0, K1, param_off::APTPL),
        )
        .expect("register aptpl");
        let caps = pr.reserve_in(&nx(P1, 1), &prin_cdb(prin_sa::REPORT_CAPABILITIES));
        assert_eq!(caps, Ok(vec![0x00, 0x08, 0x1d, 0xb1, 0xea, 0x01, 0x00, 0x00]));
    }

    /// SPC-4 §6.15.5 with an iSCSI initiator-port TransportID (§7.6.4.6).
    #[test]
    fn read_full_status_exact_bytes() {
        let pr = fresh();
        let port = "iqn.x,i,0x000000000001"; // 22 bytes + NUL → 24, padded: additional 24
        reg(&pr, &nx(port, 2), K1);
        out(&pr, &nx(port, 2), prout_sa::RESERVE, 1, K1, 0).expect("reserve");
        pr.reserve_out(
            &nx(P2, 3),
            &prout_cdb(prout_sa::REGISTER, 0, 24),
            &basic(0, K2, param_off::ALL_TG_PT),
        )
        .expect("register all_tg_pt");
        let d = pr
            .reserve_in(&nx(port, 2), &prin_cdb(prin_sa::READ_FULL_STATUS))
            .expect("rfs");
        let mut want = vec![0, 0, 0, 2];
        let d1_len = 24 + 4 + 24;
        let p2_tid = 4 + (P2.len() + 1).div_ceil(4) * 4;
        want.extend_from_slice(&((d1_len + 24 + p2_tid) as u32).to_be_bytes());
        want.extend_from_slice(&K1.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 0, 0x01, 0x01, 0, 0, 0, 0, 0, 2, 0, 0, 0, 28]);
        want.extend_from_slice(&[0x45, 0, 0, 24]);
        want.extend_from_slice(port.as_bytes());
        want.extend_from_slice(&[0, 0]);
        want.extend_from_slice(&K2.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 0, 0x02, 0x00, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&(p2_tid as u32).to_be_bytes());
        want.extend_from_slice(&[0x45, 0, 0, (p2_tid - 4) as u8]);
        want.extend_from_slice(P2.as_bytes());
        want.resize(want.len() + p2_tid - 4 - P2.len(), 0);
        assert_eq!(d, want);
    }

    /// libiscsi PrinServiceactionRange: SA 0..=3 work, 4..0x1f are INVALID FIELD IN CDB.
    #[test]
    fn prin_service_action_range() {
        let pr = fresh();
        for sa in 0..4 {
            assert!(pr.reserve_in(&nx(P1, 1), &prin_cdb(sa)).is_ok(), "sa {sa}");
        }
        for sa in 4..0x20 {
            assert_eq!(
                pr.reserve_in(&nx(P1, 1), &prin_cdb(sa)),
                Err(PrError::Check(sense::INVALID_FIELD_IN_CDB))
            );
        }
    }

    // ---- PERSISTENT RESERVE OUT ----

    /// SPC-4 §5.13.7 (libiscsi ProutRegister.Simple) and the generation rules
    /// of §6.15.2.
    #[test]
    fn register_reregister_unregister() {
        let pr = fresh();
        let n1 = nx(P1, 1);
        // Unregistered nexus with a non-zero RESERVATION KEY: conflict.
        assert_eq!(out(&pr, &n1, prout_sa::REGISTER, 0, 7, K1), Err(PrError::Conflict));
        // Unregistered, SARK 0: GOOD, nothing happens, generation unchanged.
        assert_eq!(out(&pr, &n1, prout_sa::REGISTER, 0, 0, 0), Ok(vec![]));
        assert_eq!(keys(&pr), (0, vec![]));
        reg(&pr, &n1, K1);
        assert_eq!(keys(&pr), (1, vec![K1]));
        // REGISTER with RESERVATION KEY 0 while registered with K1: conflict.
        assert_eq!(out(&pr, &n1, prout_sa::REGISTER, 0, 0, K1 + 1), Err(PrError::Conflict));
        assert_eq!(keys(&pr), (1, vec![K1]));
        // Key change.
        assert_eq!(out(&pr, &n1, prout_sa::REGISTER, 0, K1, K2), Ok(vec![]));
        assert_eq!(keys(&pr), (2, vec![K2]));
        // REGISTER AND IGNORE EXISTING KEY.
        reg(&pr, &n1, K1);
        assert_eq!(keys(&pr), (3, vec![K1]));
        // Unregister.
        assert_eq!(out(&pr, &n1, prout_sa::REGISTER, 0, K1, 0), Ok(vec![]));
        assert_eq!(keys(&pr), (4, vec![]));
        // Another target port is another I_T nexus.
        reg(&pr, &nx(P1, 2), K2);
        assert_eq!(out(&pr, &n1, prout_sa::RESERVE, 1, K2, 0), Err(PrError::Conflict));
        // RESERVE and RELEASE leave the generation alone.
        out(&pr, &nx(P1, 2), prout_sa::RESERVE, 1, K2, 0).expect("reserve");
        out(&pr, &nx(P1, 2), prout_sa::RELEASE, 1, K2, 0).expect("release");
        assert_eq!(keys(&pr).0, 5);
    }

    /// SPC-4 §6.16.1: a parameter list other than 24 bytes is PARAMETER LIST LENGTH ERROR.
    #[test]
    fn parameter_list_length_must_be_24() {
        let pr = fresh();
        for len in [0u32, 23, 25, 32] {
            let params = vec![0u8; len as usize];
            assert_eq!(
                pr.reserve_out(&nx(P1, 1), &prout_cdb(prout_sa::REGISTER, 0, len), &params),
                Err(PrError::Check(sense::PARAMETER_LIST_LENGTH_ERROR)),
                "len {len}"
            );
        }
        // Fewer bytes delivered than the CDB announces.
        assert_eq!(
            pr.reserve_out(&nx(P1, 1), &prout_cdb(prout_sa::REGISTER, 0, 24), &[0; 10]),
            Err(PrError::Check(sense::PARAMETER_LIST_LENGTH_ERROR))
        );
    }

    /// SPC-4 §6.16.2: invalid TYPE or SCOPE → INVALID FIELD IN CDB; unknown SA too.
    #[test]
    fn invalid_type_scope_service_action() {
        let pr = fresh();
        reg(&pr, &nx(P1, 1), K1);
        for t in [0u8, 2, 4, 9, 0xf] {
            assert_eq!(
                out(&pr, &nx(P1, 1), prout_sa::RESERVE, t, K1, 0),
                Err(PrError::Check(sense::INVALID_FIELD_IN_CDB)),
                "type {t}"
            );
        }
        assert_eq!(
            out(&pr, &nx(P1, 1), prout_sa::RESERVE, 0x21, K1, 0),
            Err(PrError::Check(sense::INVALID_FIELD_IN_CDB))
        );
        assert_eq!(
            out(&pr, &nx(P1, 1), 0x08, 1, K1, 0),
            Err(PrError::Check(sense::INVALID_FIELD_IN_CDB))
        );
        // CLEAR ignores TYPE (libiscsi sends 0).
        assert_eq!(out(&pr, &nx(P1, 1), prout_sa::CLEAR, 0, K1, 0), Ok(vec![]));
    }

    /// SPC-4 §5.13.1: an unregistered nexus, or one with the wrong key, gets
    /// RESERVATION CONFLICT for RESERVE, RELEASE, CLEAR, PREEMPT.
    #[test]
    fn unregistered_or_wrong_key_conflicts() {
        let pr = fresh();
        reg(&pr, &nx(P1, 1), K1);
        for sa in [prout_sa::RESERVE, prout_sa::RELEASE, prout_sa::CLEAR, prout_sa::PREEMPT] {
            assert_eq!(out(&pr, &nx(P2, 1), sa, 1, K2, K1), Err(PrError::Conflict));
            assert_eq!(out(&pr, &nx(P1, 1), sa, 1, K2, K1), Err(PrError::Conflict));
        }
    }

    /// SPC-4 §5.13.9: a second RESERVE by another registrant conflicts; the holder's repeat of
    /// the same type is GOOD, of another type conflicts.
    #[test]
    fn reserve_rules() {
        let pr = fresh();
        reg(&pr, &nx(P1, 1), K1);
        reg(&pr, &nx(P2, 1), K2);
        out(&pr, &nx(P1, 1), prout_sa::RESERVE, 1, K1, 0).expect("reserve");
        assert_eq!(out(&pr, &nx(P1, 1), prout_sa::RESERVE, 1, K1, 0), Ok(vec![]));
        assert_eq!(
            out(&pr, &nx(P1, 1), prout_sa::RESERVE, 3, K1, 0),
            Err(PrError::Conflict)
        );
        assert_eq!(
            out(&pr, &nx(P2, 1), prout_sa::RESERVE, 1, K2, 0),
            Err(PrError::Conflict)
        );
    }

    /// SPC-4 §5.13.11.2.2: RELEASE by a non-holder is GOOD without effect; by the holder with
    /// another type is INVALID RELEASE OF PERSISTENT RESERVATION; RO/AR releases tell the other
    /// registrants RESERVATIONS RELEASED.
    #[test]
    fn release_rules() {
        let pr = fresh();
        reg(&pr, &nx(P1, 1), K1);
        reg(&pr, &nx(P2, 1), K2);
        out(&pr, &nx(P1, 1), prout_sa::RESERVE, 5, K1, 0).expect("reserve WE-RO");
        assert_eq!(out(&pr, &nx(P2, 1), prout_sa::RELEASE, 5, K2, 0), Ok(vec![]));
        assert_eq!(read_res(&pr)[21], 0x05);
        assert_eq!(
            out(&pr, &nx(P1, 1), prout_sa::RELEASE, 1, K1, 0),
            Err(PrError::Check(INVALID_RELEASE_OF_PERSISTENT_RESERVATION))
        );
        assert_eq!(
            out(&pr, &nx(P1, 1), prout_sa::RELEASE, 5, K1, 0),
            Ok(vec![UaTarget {
                initiator_port: P2.into(),
                relative_target_port: Some(1),
                sense: sense::RESERVATIONS_RELEASED,
            }])
        );
        assert_eq!(read_res(&pr), vec![0, 0, 0, 2, 0, 0, 0, 0]);
        // WE and EA releases raise no unit attention.
        out(&pr, &nx(P1, 1), prout_sa::RESERVE, 1, K1, 0).expect("reserve WE");
        assert_eq!(out(&pr, &nx(P1, 1), prout_sa::RELEASE, 1, K1, 0), Ok(vec![]));
        // No reservation: GOOD.
        assert_eq!(out(&pr, &nx(P1, 1), prout_sa::RELEASE, 1, K1, 0), Ok(vec![]));
    }

    /// libiscsi ProutClear.Simple and SPC-4 §5.13.11.2.6: CLEAR drops everything, +1
    /// generation, RESERVATIONS PREEMPTED for the other registrants.
    #[test]
    fn clear_flow() {
        let pr = fresh();
        reg(&pr, &nx(P1, 1), K1);
        reg(&pr, &nx(P2, 1), K2);
        out(&pr, &nx(P1, 1), prout_sa::RESERVE, 3, K1, 0).expect("reserve");
        let (g, _) = keys(&pr);
        assert_eq!(
            out(&pr, &nx(P1, 1), prout_sa::CLEAR, 0, K1, 0),
            Ok(vec![UaTarget {
                initiator_port: P2.into(),
                relative_target_port: Some(1),
                sense: sense::RESERVATIONS_PREEMPTED,
            }])
        );
        assert_eq!(keys(&pr), (g + 1, vec![]));
        assert_eq!(read_res(&pr), vec![0, 0, 0, 3, 0, 0, 0, 0]);
    }

    /// libiscsi ProutPreempt.RemoveRegistration: with no reservation, PREEMPT removes the
    /// registrations holding SARK, +1 generation, REGISTRATIONS PREEMPTED (SPC-4 §5.13.11.4.4).
    #[test]
    fn preempt_removes_registration() {
        let pr = fresh();
        reg(&pr, &nx(P1, 1), K1);
        reg(&pr, &nx(P2, 1), K2);
        let (g, _) = keys(&pr);
        assert_eq!(
            out(&pr, &nx(P2, 1), prout_sa::PREEMPT, 3, K2, K1),
            Ok(vec![UaTarget {
                initiator_port: P1.into(),
                relative_target_port: Some(1),
                sense: sense::REGISTRATIONS_PREEMPTED,
            }])
        );
        assert_eq!(keys(&pr), (g + 1, vec![K2]));
        // Nothing registered under SARK: conflict; SARK 0 without reservation: 26/00.
        assert_eq!(
            out(&pr, &nx(P2, 1), prout_sa::PREEMPT, 3, K2, K1),
            Err(PrError::Conflict)
        );
        assert_eq!(
            out(&pr, &nx(P2, 1), prout_sa::PREEMPT, 3, K2, 0),
            Err(PrError::Check(sense::INVALID_FIELD_IN_PARAMETER_LIST))
        );
    }

    /// SPC-4 §5.13.11.4.3: preempting the holder moves the reservation (new type), removes the
    /// holder's registration, REGISTRATIONS PREEMPTED to it and RESERVATIONS RELEASED to the
    /// other registrants when the type changed. PREEMPT AND ABORT behaves the same here.
    #[test]
    fn preempt_holder_moves_reservation() {
        for sa in [prout_sa::PREEMPT, prout_sa::PREEMPT_AND_ABORT] {
            let pr = fresh();
            let p3 = "iqn.2024-01.test:init3,i,0x000000000003";
            reg(&pr, &nx(P1, 1), K1);
            reg(&pr, &nx(P2, 1), K2);
            reg(&pr, &nx(p3, 1), 3);
            out(&pr, &nx(P1, 1), prout_sa::RESERVE, 1, K1, 0).expect("reserve");
            let uas = out(&pr, &nx(P2, 1), sa, 3, K2, K1).expect("preempt");
            assert_eq!(
                uas,
                vec![
                    UaTarget {
                        initiator_port: P1.into(),
                        relative_target_port: Some(1),
                        sense: sense::REGISTRATIONS_PREEMPTED,
                    },
                    UaTarget {
                        initiator_port: p3.into(),
                        relative_target_port: Some(1),
                        sense: sense::RESERVATIONS_RELEASED,
                    },
                ]
            );
            let r = read_res(&pr);
            assert_eq!(be_u64(&r, 8), K2);
            assert_eq!(r[21], 0x03);
            assert_eq!(keys(&pr), (4, vec![K2, 3]));
            // Non-zero SARK is required against a non-AR reservation.
            assert_eq!(
                out(&pr, &nx(p3, 1), sa, 3, 3, 0),
                Err(PrError::Check(sense::INVALID_FIELD_IN_PARAMETER_LIST))
            );
        }
    }

    /// SPC-4 §5.13.11.4.3: against an all-registrants reservation, SARK 0 removes every other
    /// registration and the preempting nexus holds the new reservation.
    #[test]
    fn preempt_all_registrants_with_zero_key() {
        let pr = fresh();
        reg(&pr, &nx(P1, 1), K1);
        reg(&pr, &nx(P2, 1), K2);
        out(&pr, &nx(P1, 1), prout_sa::RESERVE, 7, K1, 0).expect("reserve WE-AR");
        let uas = out(&pr, &nx(P2, 1), prout_sa::PREEMPT, 1, K2, 0).expect("preempt");
        assert_eq!(uas.len(), 1);
        assert_eq!(uas[0].sense, sense::REGISTRATIONS_PREEMPTED);
        assert_eq!(keys(&pr).1, vec![K2]);
        let r = read_res(&pr);
        assert_eq!((be_u64(&r, 8), r[21]), (K2, 0x01));
    }

    /// libiscsi ProutReserve.Ownership*: unregistering the holder releases WE/EA/WE-RO/EA-RO
    /// (RO types tell the other registrants, SPC-4 §5.13.11.2.3); AR reservations stay while a
    /// registrant remains and that registrant may release them.
    #[test]
    fn ownership_when_holder_unregisters() {
        for (t, shared) in [(1u8, false), (3, false), (5, false), (6, false), (7, true), (8, true)] {
            let pr = fresh();
            reg(&pr, &nx(P1, 1), K1);
            reg(&pr, &nx(P2, 1), K2);
            out(&pr, &nx(P1, 1), prout_sa::RESERVE, t, K1, 0).expect("reserve");
            let uas = out(&pr, &nx(P1, 1), prout_sa::REGISTER, 0, K1, 0).expect("unregister");
            if shared {
                assert_eq!(uas, vec![]);
                assert_eq!(read_res(&pr)[21], t);
                assert_eq!(be_u64(&read_res(&pr), 8), 0);
                assert_eq!(
                    out(&pr, &nx(P2, 1), prout_sa::RELEASE, t, K2, 0).map(|u| u.len()),
                    Ok(0)
                );
                assert_eq!(be_u32(&read_res(&pr), 4), 0);
            } else {
                assert_eq!(be_u32(&read_res(&pr), 4), 0, "type {t}");
                let want = if t == 5 || t == 6 {
                    vec![UaTarget {
                        initiator_port: P2.into(),
                        relative_target_port: Some(1),
                        sense: sense::RESERVATIONS_RELEASED,
                    }]
                } else {
                    vec![]
                };
                assert_eq!(uas, want, "type {t}");
            }
        }
    }

    /// The access matrix of libiscsi ProutReserve.Access*, from SPC-4 §5.13.1 table 63 and
    /// SBC-3 §4.18: (type, registered reader, registered writer, unregistered reader,
    /// unregistered writer) for a nexus that does not hold the reservation.
    #[test]
    fn access_matrix_per_type() {
        let table: [(u8, bool, bool, bool, bool); 6] = [
            (0x3, false, false, false, false), // Exclusive Access
            (0x1, true, false, true, false),   // Write Exclusive
            (0x6, true, true, false, false),   // Exclusive Access – Registrants Only
            (0x5, true, true, true, false),    // Write Exclusive – Registrants Only
            (0x8, true, true, false, false),   // Exclusive Access – All Registrants
            (0x7, true, true, true, false),    // Write Exclusive – All Registrants
        ];
        let ok = |b: bool| if b { Ok(()) } else { Err(PrError::Conflict) };
        for (t, reg_r, reg_w, unreg_r, unreg_w) in table {
            let pr = fresh();
            let (n1, n2) = (nx(P1, 1), nx(P2, 1));
            reg(&pr, &n1, K1);
            reg(&pr, &n2, K2);
            out(&pr, &n1, prout_sa::RESERVE, t, K1, 0).expect("reserve");
            assert_eq!(pr.check_access(&n1, &READ10), Ok(()), "holder read, type {t}");
            assert_eq!(pr.check_access(&n1, &WRITE10), Ok(()), "holder write, type {t}");
            assert_eq!(pr.check_access(&n2, &READ10), ok(reg_r), "reg read, type {t}");
            assert_eq!(pr.check_access(&n2, &WRITE10), ok(reg_w), "reg write, type {t}");
            out(&pr, &n2, prout_sa::REGISTER, 0, K2, 0).expect("unregister");
            assert_eq!(pr.check_access(&n2, &READ10), ok(unreg_r), "unreg read, type {t}");
            assert_eq!(pr.check_access(&n2, &WRITE10), ok(unreg_w), "unreg write, type {t}");
            // Always allowed through every type (table 63): INQUIRY, TUR (ALLOW COMMANDS 011b),
            // REPORT LUNS, PRIN, READ CAPACITY(10/16), PROUT (checked by service action).
            for cdb in [
                &[0x12u8, 0, 0, 0, 36, 0][..],
                &[0x00, 0, 0, 0, 0, 0],
                &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0],
                &prin_cdb(0),
                &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
                &prout_cdb(0, 0, 24),
            ] {
                assert_eq!(pr.check_access(&n2, cdb), Ok(()), "type {t} cdb {cdb:02x?}");
            }
            // MODE SENSE follows reads, SYNCHRONIZE CACHE follows writes.
            assert_eq!(pr.check_access(&n2, &[0x1a, 0, 0x3f, 0, 0xff, 0]), ok(unreg_r));
            assert_eq!(pr.check_access(&n2, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]), ok(unreg_w));
        }
    }

    /// No reservation, only registrations: everything runs.
    #[test]
    fn registrations_alone_do_not_restrict() {
        let pr = fresh();
        reg(&pr, &nx(P1, 1), K1);
        assert_eq!(pr.check_access(&nx(P2, 1), &WRITE10), Ok(()));
    }

    /// libiscsi Reserve6.2Initiators/LUNReset/ITNexusLoss (SPC-2 §7.21, §7.17, §5.5.1).
    #[test]
    fn reserve6_two_initiators() {
        let pr = fresh();
        let (n1, n2) = (nx(P1, 1), nx(P2, 1));
        assert_eq!(pr.reserve6(&n1), Ok(()));
        assert_eq!(pr.reserve6(&n1), Ok(()));
        assert_eq!(pr.reserve6(&n2), Err(PrError::Conflict));
        assert_eq!(pr.release6(&n2), Ok(())); // not the holder: GOOD, no effect
        let mode_sense = [0x1a, 0, 0x3f, 0, 0xff, 0];
        assert_eq!(pr.check_access(&n1, &mode_sense), Ok(()));
        assert_eq!(pr.check_access(&n2, &mode_sense), Err(PrError::Conflict));
        assert_eq!(pr.check_access(&n2, &[0x12, 0, 0, 0, 36, 0]), Ok(()));
        assert_eq!(pr.check_access(&n2, &[0x17, 0, 0, 0, 0, 0]), Ok(()));
        assert_eq!(pr.check_access(&n2, &prin_cdb(0)), Err(PrError::Conflict));
        assert_eq!(pr.reserve6(&n2), Err(PrError::Conflict));
        assert_eq!(pr.release6(&n1), Ok(()));
        assert_eq!(pr.reserve6(&n2), Ok(()));
        // Same initiator port on another target port is another nexus.
        assert_eq!(pr.check_access(&nx(P2, 2), &READ10), Err(PrError::Conflict));
        pr.lu_reset();
        assert_eq!(pr.reserve6(&n1), Ok(()));
        pr.nexus_lost(&n2); // not the holder: nothing
        assert_eq!(pr.reserve6(&n2), Err(PrError::Conflict));
        pr.nexus_lost(&n1);
        assert_eq!(pr.reserve6(&n2), Ok(()));
        assert_eq!(pr.release6(&n2), Ok(()));
    }

    /// SPC-4 §5.13.3 (CRH=1): with a persistent reservation, RESERVE(6) is GOOD for a holder
    /// and RESERVATION CONFLICT otherwise; RELEASE(6) is GOOD for registrants.
    #[test]
    fn compatible_reservation_handling() {
        let pr = fresh();
        reg(&pr, &nx(P1, 1), K1);
        out(&pr, &nx(P1, 1), prout_sa::RESERVE, 1, K1, 0).expect("reserve");
        assert_eq!(pr.reserve6(&nx(P1, 1)), Ok(()));
        assert_eq!(pr.reserve6(&nx(P2, 1)), Err(PrError::Conflict));
        assert_eq!(pr.release6(&nx(P1, 1)), Ok(()));
        assert_eq!(pr.release6(&nx(P2, 1)), Err(PrError::Conflict));
        assert_eq!(read_res(&pr)[21], 0x01);
    }

    /// SPC-4 §5.13.8: REGISTER AND MOVE registers the destination, hands it the reservation
    /// and with UNREG drops the source.
    #[test]
    fn register_and_move() {
        let pr = fresh();
        reg(&pr, &nx(P1, 1), K1);
        out(&pr, &nx(P1, 1), prout_sa::RESERVE, 3, K1, 0).expect("reserve");
        let mut tid = Vec::new();
        encode_transport_id(P2, &mut tid);
        let mut params = vec![0u8; 24];
        params[0..8].copy_from_slice(&K1.to_be_bytes());
        params[8..16].copy_from_slice(&K2.to_be_bytes());
        params[17] = move_off::UNREG;
        params[18..20].copy_from_slice(&2u16.to_be_bytes());
        params[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
        params.extend_from_slice(&tid);
        let cdb = prout_cdb(prout_sa::REGISTER_AND_MOVE, 1, params.len() as u32);
        // Short list: PARAMETER LIST LENGTH ERROR.
        assert_eq!(
            pr.reserve_out(&nx(P1, 1), &prout_cdb(7, 1, 30), &params[..30]),
            Err(PrError::Check(sense::PARAMETER_LIST_LENGTH_ERROR))
        );
        // Not the holder: conflict.
        reg(&pr, &nx(P2, 1), 9);
        let mut p9 = params.clone();
        p9[0..8].copy_from_slice(&9u64.to_be_bytes());
        assert_eq!(pr.reserve_out(&nx(P2, 1), &cdb, &p9), Err(PrError::Conflict));
        assert_eq!(pr.reserve_out(&nx(P1, 1), &cdb, &params), Ok(vec![]));
        assert_eq!(keys(&pr), (3, vec![9, K2]));
        let r = read_res(&pr);
        assert_eq!((be_u64(&r, 8), r[21]), (K2, 0x01));
        assert_eq!(pr.check_access(&nx(P2, 2), &WRITE10), Ok(()));
        assert_eq!(pr.check_access(&nx(P1, 1), &WRITE10), Err(PrError::Conflict));
    }

    /// SPC-4 §6.16.3: SPEC_I_PT registers the listed initiator ports too; with other service
    /// actions it is INVALID FIELD IN PARAMETER LIST.
    #[test]
    fn spec_i_pt() {
        let pr = fresh();
        let mut tid = Vec::new();
        encode_transport_id(P2, &mut tid);
        let mut params = basic(0, K1, param_off::SPEC_I_PT);
        params.extend_from_slice(&(tid.len() as u32).to_be_bytes());
        params.extend_from_slice(&tid);
        let cdb = prout_cdb(prout_sa::REGISTER, 0, params.len() as u32);
        assert_eq!(pr.reserve_out(&nx(P1, 1), &cdb, &params), Ok(vec![]));
        assert_eq!(keys(&pr), (1, vec![K1, K1]));
        assert_eq!(pr.check_access(&nx(P2, 1), &READ10), Ok(()));
        // Registered nexus: SPEC_I_PT is INVALID FIELD IN CDB (SPC-4 §5.13.7).
        let mut again = params.clone();
        again[0..8].copy_from_slice(&K1.to_be_bytes());
        assert_eq!(
            pr.reserve_out(&nx(P1, 1), &cdb, &again),
            Err(PrError::Check(sense::INVALID_FIELD_IN_CDB))
        );
        assert_eq!(
            pr.reserve_out(
                &nx(P1, 1),
                &prout_cdb(prout_sa::RESERVE, 1, 24),
                &basic(K1, 0, param_off::SPEC_I_PT)
            ),
            Err(PrError::Check(sense::INVALID_FIELD_IN_PARAMETER_LIST))
        );
    }

    // ---- APTPL ----

    #[test]
    fn aptpl_without_file_is_invalid_field_in_parameter_list() {
        let pr = fresh();
        assert_eq!(
            pr.reserve_out(
                &nx(P1, 1),
                &prout_cdb(prout_sa::REGISTER, 0, 24),
                &basic(0, K1, param_off::APTPL)
            ),
            Err(PrError::Check(sense::INVALID_FIELD_IN_PARAMETER_LIST))
        );
    }

    /// SPC-4 §5.13.5: with APTPL=1 the state survives a restart; the next REGISTER with
    /// APTPL=0 makes it volatile again.
    #[test]
    fn aptpl_persist_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lu1.pr");
        let snapshot =
            |pr: &PersistentReservations| [0u8, 1, 3].map(|sa| pr.reserve_in(&nx(P1, 1), &prin_cdb(sa)).expect("prin"));
        let before = {
            let pr = PersistentReservations::open(Some(path.clone())).expect("open");
            pr.reserve_out(
                &nx(P1, 1),
                &prout_cdb(prout_sa::REGISTER, 0, 24),
                &basic(0, K1, param_off::APTPL),
            )
            .expect("register");
            pr.reserve_out(
                &nx(P2, 3),
                &prout_cdb(prout_sa::REGISTER_AND_IGNORE_EXISTING_KEY, 0, 24),
                &basic(0, K2, param_off::APTPL | param_off::ALL_TG_PT),
            )
            .expect("register");
            out(&pr, &nx(P1, 1), prout_sa::RESERVE, 6, K1, 0).expect("reserve");
            pr.reserve6(&nx(P1, 1)).expect("reserve6 as holder");
            snapshot(&pr)
        };
        assert!(!dir.path().join("lu1.pr.tmp").exists());
        let pr = PersistentReservations::open(Some(path.clone())).expect("reopen");
        assert_eq!(snapshot(&pr), before);
        assert_eq!(pr.check_access(&nx(P2, 7), &WRITE10), Ok(()));
        assert_eq!(
            pr.check_access(&nx("iqn.other,i,0x000000000009", 1), &READ10),
            Err(PrError::Conflict)
        );
        // APTPL=0 on the next registration: a restart forgets everything.
        out(&pr, &nx(P2, 3), prout_sa::REGISTER, 0, K2, K2 + 1).expect("re-register");
        drop(pr);
        let pr = PersistentReservations::open(Some(path)).expect("reopen");
        assert_eq!(keys(&pr), (0, vec![]));
    }

    #[test]
    fn corrupt_file_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pr");
        {
            let pr = PersistentReservations::open(Some(path.clone())).expect("open");
            pr.reserve_out(
                &nx(P1, 1),
                &prout_cdb(prout_sa::REGISTER, 0, 24),
                &basic(0, K1, param_off::APTPL),
            )
            .expect("register");
        }
        let good = fs::read(&path).expect("read");
        assert_eq!(&good[..4], b"RSPR");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                {
                    let mut b = good.clone();
                    let l = b.len();
                    b[l - 1] ^= 0x40;
                    b
                },
                "CRC32C",
            ),
            (
                {
                    let mut b = good.clone();
                    b[0] = b'X';
                    b
                },
                "magic",
            ),
            (
                {
                    let mut b = good.clone();
                    b[7] = 9;
                    b
                },
                "version",
            ),
            (good[..good.len() - 1].to_vec(), "length"),
            (Vec::new(), "magic"),
        ];
        for (bytes, why) in cases {
            fs::write(&path, &bytes).expect("write");
            let err = PersistentReservations::open(Some(path.clone()))
                .err()
                .expect("corrupt file must not load");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            let msg = err.to_string();
            assert!(msg.contains(why) && msg.contains("is corrupt"), "{msg}");
        }
        // A well-framed file whose content breaks the invariants is corrupt too.
        let mut st = PrState {
            aptpl: true,
            ..PrState::default()
        };
        st.reservation = Some(Reservation {
            pr_type: PrType::WriteExclusive,
            holder: RegId {
                initiator_port: P1.into(),
                relative_target_port: Some(1),
            },
        });
        fs::write(&path, encode_state_file(&st)).expect("write");
        assert!(PersistentReservations::open(Some(path)).is_err());
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Arbitrary CDBs and parameter lists never panic, from any starting state.
            #[test]
            fn arbitrary_input_never_panics(
                setup in any::<bool>(),
                ops in proptest::collection::vec(
                    (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..12),
                     proptest::collection::vec(any::<u8>(), 0..80), any::<bool>()),
                    1..12)
            ) {
                let pr = fresh();
                if setup {
                    reg(&pr, &nx(P1, 1), K1);
                    reg(&pr, &nx(P2, 1), K2);
                    let _ = out(&pr, &nx(P1, 1), prout_sa::RESERVE, 1, K1, 0);
                }
                for (kind, mut cdb, params, who) in ops {
                    let n = if who { nx(P1, 1) } else { nx(P2, 1) };
                    if cdb.len() >= 10 && kind & 1 == 0 {
                        // Keep the parameter list length plausible half of the time.
                        let l = (params.len() as u32).to_be_bytes();
                        cdb[5..9].copy_from_slice(&l);
                    }
                    match kind % 5 {
                        0 => { let _ = pr.reserve_in(&n, &cdb); }
                        1 | 2 => { let _ = pr.reserve_out(&n, &cdb, &params); }
                        3 => { let _ = pr.check_access(&n, &cdb); }
                        _ => { let _ = pr.reserve6(&n); let _ = pr.release6(&n); }
                    }
                }
            }

            /// Arbitrary bytes as a persistence file: an error or a state, never a panic.
            #[test]
            fn arbitrary_file_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
                let _ = decode_state_file(&bytes);
            }
        }

        #[test]
        fn transport_ids_decode_or_refuse() {
            let mut tid = Vec::new();
            encode_transport_id(P1, &mut tid);
            assert_eq!(decode_transport_id(&tid), Ok((P1.to_owned(), tid.len())));
            assert!(decode_transport_id(&tid[..tid.len() - 4]).is_err());
            let mut name_only = tid.clone();
            name_only[0] = 0x05;
            assert!(decode_transport_id(&name_only).is_err());
        }
    }
}
