//! Logical units: one CDB in, status with data or sense out (SAM-5, SPC-4, SBC-3).
//!
//! ```text
//! portal ──execute(nexus, cmd)──▶ TargetLus ──lun──▶ LogicalUnit
//!                                   │ unknown LUN: INQUIRY (PQ 011b), REPORT LUNS, REQUEST SENSE,
//!                                   │              else LOGICAL UNIT NOT SUPPORTED
//!                                   ▼
//!              unit attention pending for this I_T nexus? ──▶ CHECK CONDITION (except INQUIRY,
//!                                   │                          REPORT LUNS, REQUEST SENSE)
//!              persistent reservation allows it?          ──▶ RESERVATION CONFLICT
//!                                   ▼
//!                          spc.rs (common commands) / sbc.rs (block commands) on the backing store
//! ```
//!
//! LUN 0 is a storage-array controller unless a configured LU claims it (as tgt does). Mode
//! parameters (WCE, D_SENSE) are shared by all I_T nexuses. Data-In is truncated to the CDB's
//! allocation length here; the portal truncates to the iSCSI expected length and computes the
//! residuals. For Data-Out commands [`Outcome::scsi_transfer_len`] tells the portal how many bytes
//! the CDB called for; a command whose Data-Out is shorter than that is refused with INVALID
//! FIELD IN COMMAND INFORMATION UNIT and writes nothing (FCP-4 option b, what libiscsi's residual
//! tests accept).
//!
//! ALUA ([`alua`]): REPORT TARGET PORT GROUPS answers from the [`AluaView`] the cluster installs
//! with [`TargetLus::set_alua`] (standalone: one Active/Optimized group, the nexus's); access
//! states are not enforced here. The medium's size is read from the backing store on every
//! command, so a volume can grow while served; [`TargetLus::capacity_changed`] tells the
//! initiators (UA 2A/09). Persistent-reservation state moves between nodes with
//! [`TargetLus::pr_export`] / [`TargetLus::pr_import`].
//!
//! Atomicity: `Disk::atomic` is taken shared by READ, VERIFY and plain writes and exclusively by
//! COMPARE AND WRITE, ORWRITE and WRITE ATOMIC, so those three are indivisible for every other
//! command.
//!
//! Not done: protection information, XCOPY, RECEIVE COPY RESULTS, SANITIZE (all answered INVALID
//! COMMAND OPERATION CODE, which libiscsi treats as "not implemented").

pub mod alua;
pub mod pr;
mod sbc;
mod spc;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use raftsan_proto::scsi::cdb::{self, op};
use raftsan_proto::scsi::sense::{self, Sense, SenseCode, status};
use raftsan_proto::scsi::vpd;

use crate::backing::{BackingStore, FileStore, MemStore};
use crate::catalog::{Backing, LunDef, TargetDef};
pub use alua::{AluaState, AluaView, PortGroupState};
use pr::{PersistentReservations, PrError, PrNexus, UaTarget};

/// The target port an I_T nexus goes through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetPort {
    pub target_name: String,
    pub tpgt: u16,
    pub relative_port_id: u16,
    pub port_group: u16,
}

/// What [`TargetLus::admit_plain_write`] decided.
#[derive(Debug)]
pub enum Admission {
    /// Write `len` bytes of the Data-Out at byte `offset`, then
    /// [`TargetLus::finish_plain_write`].
    Write(PlainWrite),
    /// Finished without writing (UNIT ATTENTION, RESERVATION CONFLICT).
    Done(Outcome),
    /// Not a plain write: [`TargetLus::execute_sync`] it.
    Other,
}

/// An admitted plain write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlainWrite {
    pub offset: u64,
    pub len: usize,
    /// The SCSI transfer length in bytes, for residuals (as `Outcome::scsi_transfer_len`).
    pub transfer_len: Option<u32>,
}

/// One I_T nexus (an iSCSI session).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nexus {
    /// Unique per I_T nexus.
    pub id: u64,
    pub initiator_name: String,
    /// SPC-4 iSCSI TransportID name: `<initiator name>,i,0x<isid as 12 hex digits>`.
    pub initiator_port: String,
    pub isid: [u8; 6],
    /// The session's TSIH on the node that accepted its login (0: not an iSCSI session).
    pub tsih: u16,
    pub target_port: TargetPort,
}

impl Nexus {
    fn pr(&self) -> PrNexus<'_> {
        PrNexus {
            initiator_port: &self.initiator_port,
            initiator_name: &self.initiator_name,
            isid: self.isid,
            relative_target_port: self.target_port.relative_port_id,
        }
    }
}

/// One SCSI command as the portal received it.
#[derive(Clone, Copy, Debug)]
pub struct Command<'a> {
    pub lun: u64,
    pub cdb: &'a [u8],
    /// All Data-Out the initiator sent, at most `expected_transfer_len` bytes.
    pub data_out: &'a [u8],
    /// iSCSI Expected Data Transfer Length.
    pub expected_transfer_len: u32,
    pub task_attr: u8,
}

/// What a command produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: u8,
    /// Encoded sense data (without the iSCSI 2-byte length).
    pub sense: Option<Vec<u8>>,
    /// The data the command produced, already cut to the CDB's allocation length.
    pub data_in: Vec<u8>,
    /// For Data-Out commands: the byte count the CDB called for.
    pub scsi_transfer_len: Option<u32>,
}

impl Outcome {
    /// GOOD status with `data_in`.
    pub fn good(data_in: Vec<u8>) -> Self {
        Outcome {
            status: status::GOOD,
            sense: None,
            data_in,
            scsi_transfer_len: None,
        }
    }

    /// CHECK CONDITION with `code`, in descriptor format when `descriptor` (D_SENSE = 1), else
    /// fixed format.
    pub fn check_code(code: SenseCode, descriptor: bool) -> Self {
        Self::check(&Sense::from(code), descriptor)
    }

    fn check(sense: &Sense, descriptor_format: bool) -> Self {
        Outcome {
            status: status::CHECK_CONDITION,
            sense: Some(sense.encode(descriptor_format)),
            data_in: Vec::new(),
            scsi_transfer_len: None,
        }
    }
}

/// For `raftsan show`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LunInfo {
    pub lun: u64,
    /// "controller" or "disk".
    pub kind: &'static str,
    pub size_bytes: u64,
    pub block_size: u32,
    pub backing: String,
    pub read_only: bool,
}

/// Why a command did not complete with GOOD.
#[derive(Debug)]
pub(crate) enum Fail {
    Check(Sense),
    Conflict,
}

impl From<Sense> for Fail {
    fn from(s: Sense) -> Self {
        Fail::Check(s)
    }
}

impl From<SenseCode> for Fail {
    fn from(c: SenseCode) -> Self {
        Fail::Check(Sense::from(c))
    }
}

impl From<PrError> for Fail {
    fn from(e: PrError) -> Self {
        match e {
            PrError::Conflict => Fail::Conflict,
            PrError::Check(c) => Fail::Check(Sense::from(c)),
        }
    }
}

pub(crate) type CmdResult = Result<Vec<u8>, Fail>;

/// INVALID FIELD IN CDB pointing at `byte` (and `bit`).
pub(crate) fn bad_cdb(byte: u16, bit: Option<u8>) -> Fail {
    Fail::Check(Sense::cdb_field(sense::INVALID_FIELD_IN_CDB, byte, bit))
}

/// Cuts `data` to an allocation length.
pub(crate) fn truncate(mut data: Vec<u8>, alloc_len: usize) -> Vec<u8> {
    data.truncate(alloc_len);
    data
}

/// At most this many unit attentions wait per I_T nexus; older ones are dropped beyond it
/// (SAM-5 §5.14 lets a device server report only the highest-priority one).
const MAX_PENDING_UA: usize = 16;

/// Unit attentions per I_T nexus. `pending` counts them all so the hot path skips the lock.
#[derive(Default)]
struct UnitAttentions {
    pending: AtomicUsize,
    queues: Mutex<HashMap<u64, VecDeque<SenseCode>>>,
}

impl UnitAttentions {
    fn push(&self, nexus: u64, code: SenseCode) {
        let Ok(mut q) = self.queues.lock() else {
            return;
        };
        let queue = q.entry(nexus).or_default();
        if queue.contains(&code) {
            return;
        }
        if queue.len() >= MAX_PENDING_UA {
            queue.pop_front();
            self.pending.fetch_sub(1, Ordering::Relaxed);
        }
        queue.push_back(code);
        self.pending.fetch_add(1, Ordering::Relaxed);
    }

    fn pop(&self, nexus: u64) -> Option<SenseCode> {
        if self.pending.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut q = self.queues.lock().ok()?;
        let code = q.get_mut(&nexus)?.pop_front()?;
        self.pending.fetch_sub(1, Ordering::Relaxed);
        Some(code)
    }

    fn forget(&self, nexus: u64) {
        let Ok(mut q) = self.queues.lock() else {
            return;
        };
        if let Some(queue) = q.remove(&nexus) {
            self.pending.fetch_sub(queue.len(), Ordering::Relaxed);
        }
    }
}

/// A disk: the backing store and what SBC needs of it.
pub(crate) struct Disk {
    pub(crate) def: LunDef,
    pub(crate) store: Box<dyn BackingStore>,
    pub(crate) block_size: u32,
    /// READ and writes take it shared; COMPARE AND WRITE, ORWRITE and WRITE ATOMIC exclusively, so
    /// each is atomic with respect to every other read or write of the LU.
    pub(crate) atomic: RwLock<()>,
    pub(crate) pr: PersistentReservations,
}

pub(crate) enum LuKind {
    Controller,
    Disk(Box<Disk>),
}

pub(crate) struct LogicalUnit {
    pub(crate) lun: u64,
    pub(crate) kind: LuKind,
    ua: UnitAttentions,
    pub(crate) wce: AtomicBool,
    pub(crate) d_sense: AtomicBool,
}

impl LogicalUnit {
    pub(crate) fn disk(&self) -> Option<&Disk> {
        match &self.kind {
            LuKind::Disk(d) => Some(d),
            LuKind::Controller => None,
        }
    }

    pub(crate) fn peripheral(&self) -> u8 {
        match self.kind {
            LuKind::Disk(_) => vpd::device_type::DIRECT_ACCESS,
            LuKind::Controller => vpd::device_type::STORAGE_ARRAY_CONTROLLER,
        }
    }
}

impl Disk {
    /// The medium's size in logical blocks, from the backing store's current size: a volume may
    /// grow while it is served (see [`TargetLus::capacity_changed`]).
    pub(crate) fn blocks(&self) -> u64 {
        self.store.size_bytes() / u64::from(self.block_size)
    }
}

/// All logical units of one target.
pub struct TargetLus {
    target_name: String,
    lus: Vec<LogicalUnit>,
    /// Live I_T nexuses: initiator port and relative target port, for PR unit attentions.
    nexuses: Mutex<HashMap<u64, (String, u16)>>,
    /// The cluster's view of the target port groups (None: standalone, one group).
    alua: RwLock<Option<Arc<dyn AluaView>>>,
}

impl TargetLus {
    /// Opens the backing stores of `target.luns` and adds LUN 0 as a storage-array controller
    /// (peripheral device type 0Ch, as tgt) when no LU claims 0. `state_dir`: where APTPL
    /// persistent-reservation files live (None: APTPL not supported).
    pub fn open(target: &TargetDef, state_dir: Option<&Path>) -> std::io::Result<Self> {
        let mut lus = Vec::new();
        if !target.luns.iter().any(|l| l.lun == 0) {
            lus.push(LogicalUnit::new(0, LuKind::Controller, false));
        }
        for def in &target.luns {
            let store: Box<dyn BackingStore> = match &def.backing {
                Backing::Path(p) => Box::new(FileStore::open(p, def.read_only).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("LUN {} backing store {}: {e}", def.lun, p.display()))
                })?),
                Backing::Memory { size_bytes } => {
                    Box::new(MemStore::with_granularity(*size_bytes, u64::from(def.block_size)))
                }
            };
            let aptpl = state_dir.map(|d| d.join(format!("{}.lun{}.pr", target.name, def.lun)));
            lus.push(LogicalUnit::new(
                def.lun,
                LuKind::Disk(Box::new(Disk::new(def.clone(), store, aptpl)?)),
                def.write_cache,
            ));
        }
        lus.sort_by_key(|l| l.lun);
        Ok(TargetLus {
            target_name: target.name.clone(),
            lus,
            nexuses: Mutex::new(HashMap::new()),
            alua: RwLock::new(None),
        })
    }

    /// A target over explicit stores (tests and benchmarks): `(definition, store)` per LU.
    pub fn with_stores(target_name: &str, luns: Vec<(LunDef, Box<dyn BackingStore>)>) -> std::io::Result<Self> {
        let mut lus = Vec::new();
        if !luns.iter().any(|(d, _)| d.lun == 0) {
            lus.push(LogicalUnit::new(0, LuKind::Controller, false));
        }
        for (def, store) in luns {
            let wce = def.write_cache;
            lus.push(LogicalUnit::new(
                def.lun,
                LuKind::Disk(Box::new(Disk::new(def, store, None)?)),
                wce,
            ));
        }
        lus.sort_by_key(|l| l.lun);
        Ok(TargetLus {
            target_name: target_name.to_string(),
            lus,
            nexuses: Mutex::new(HashMap::new()),
            alua: RwLock::new(None),
        })
    }

    fn lu(&self, lun: u64) -> Option<&LogicalUnit> {
        self.lus.iter().find(|l| l.lun == lun)
    }

    pub(crate) fn lun_list(&self) -> Vec<u64> {
        self.lus.iter().map(|l| l.lun).collect()
    }

    /// Executes one command. Blocking file I/O happens inline on the calling thread.
    pub async fn execute(&self, nexus: &Nexus, cmd: &Command<'_>) -> Outcome {
        self.execute_sync(nexus, cmd)
    }

    /// The synchronous core of [`TargetLus::execute`].
    pub fn execute_sync(&self, nexus: &Nexus, cmd: &Command<'_>) -> Outcome {
        let opcode = cdb::u8_at(cmd.cdb, 0);
        let Some(lu) = self.lu(cmd.lun) else {
            return self.execute_unknown_lun(nexus, cmd);
        };
        let descriptor_format = lu.d_sense.load(Ordering::Relaxed);
        let transfer_len = lu.disk().and_then(|d| sbc::data_out_len(cmd.cdb, d.block_size));
        if cmd.cdb.is_empty() || cmd.cdb.len() < cdb::cdb_len(opcode) {
            return Outcome::check(&Sense::from(sense::INVALID_COMMAND_OPERATION_CODE), descriptor_format);
        }
        let exempt = matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE);
        if !exempt && let Some(code) = lu.ua.pop(nexus.id) {
            let mut o = Outcome::check(&Sense::from(code), descriptor_format);
            o.scsi_transfer_len = transfer_len;
            return o;
        }
        let result = match &lu.kind {
            LuKind::Disk(disk) => match disk.pr.check_access(&nexus.pr(), cmd.cdb) {
                Err(e) => Err(Fail::from(e)),
                Ok(()) => self.dispatch(lu, nexus, cmd),
            },
            LuKind::Controller => self.dispatch(lu, nexus, cmd),
        };
        let descriptor_format = lu.d_sense.load(Ordering::Relaxed);
        let mut outcome = match result {
            Ok(data) => Outcome::good(data),
            Err(Fail::Check(s)) => Outcome::check(&s, descriptor_format),
            Err(Fail::Conflict) => Outcome {
                status: status::RESERVATION_CONFLICT,
                sense: None,
                data_in: Vec::new(),
                scsi_transfer_len: None,
            },
        };
        outcome.scsi_transfer_len = transfer_len;
        outcome
    }

    /// The fast path of a replicated target: admits a plain WRITE(10)/(16) (see
    /// [`Admission`]) with the same checks, in the same order, as [`TargetLus::execute_sync`]:
    /// a pending unit attention or a reservation conflict finishes it here; anything unusual is
    /// left to `execute_sync`. The caller writes the data itself, excluding COMPARE AND WRITE,
    /// ORWRITE and WRITE ATOMIC of the same LU meanwhile (they read, decide and write as one).
    pub fn admit_plain_write(&self, nexus: &Nexus, cmd: &Command<'_>) -> Admission {
        let Some(lu) = self.lu(cmd.lun) else {
            return Admission::Other;
        };
        let Some(disk) = lu.disk() else {
            return Admission::Other;
        };
        let opcode = cdb::u8_at(cmd.cdb, 0);
        if cmd.cdb.len() < cdb::cdb_len(opcode) {
            return Admission::Other;
        }
        let Some((offset, len)) = sbc::plain_write(lu, disk, cmd.cdb, cmd.data_out.len()) else {
            return Admission::Other;
        };
        let transfer_len = sbc::data_out_len(cmd.cdb, disk.block_size);
        let descriptor_format = lu.d_sense.load(Ordering::Relaxed);
        if let Some(code) = lu.ua.pop(nexus.id) {
            let mut o = Outcome::check(&Sense::from(code), descriptor_format);
            o.scsi_transfer_len = transfer_len;
            return Admission::Done(o);
        }
        if let Err(e) = disk.pr.check_access(&nexus.pr(), cmd.cdb) {
            let mut o = match Fail::from(e) {
                Fail::Check(s) => Outcome::check(&s, descriptor_format),
                Fail::Conflict => Outcome {
                    status: status::RESERVATION_CONFLICT,
                    sense: None,
                    data_in: Vec::new(),
                    scsi_transfer_len: None,
                },
            };
            o.scsi_transfer_len = transfer_len;
            return Admission::Done(o);
        }
        Admission::Write(PlainWrite {
            offset,
            len,
            transfer_len,
        })
    }

    /// How an admitted plain write ends: GOOD, or the error of the ordinary path's write
    /// (WRITE ERROR, logged and counted unless the store said the command was fenced).
    pub fn finish_plain_write(&self, lun: u64, w: &PlainWrite, result: std::io::Result<()>) -> Outcome {
        let Some((lu, disk)) = self.lu(lun).and_then(|lu| lu.disk().map(|d| (lu, d))) else {
            return Outcome::check_code(sense::LOGICAL_UNIT_NOT_SUPPORTED, false);
        };
        let mut o = match result {
            Ok(()) => Outcome::good(Vec::new()),
            Err(e) => match sbc::write_error(disk, e, w.offset) {
                Fail::Check(s) => Outcome::check(&s, lu.d_sense.load(Ordering::Relaxed)),
                Fail::Conflict => Outcome::check_code(sense::WRITE_ERROR, false),
            },
        };
        o.scsi_transfer_len = w.transfer_len;
        o
    }

    fn dispatch(&self, lu: &LogicalUnit, nexus: &Nexus, cmd: &Command<'_>) -> CmdResult {
        let opcode = cmd.cdb[0];
        match opcode {
            op::TEST_UNIT_READY => Ok(Vec::new()),
            op::INQUIRY => spc::inquiry(lu, nexus, cmd.cdb),
            op::REPORT_LUNS => spc::report_luns(&self.lun_list(), cmd.cdb),
            op::REQUEST_SENSE => {
                let code = lu.ua.pop(nexus.id).unwrap_or(sense::NO_SENSE);
                spc::request_sense(code, cmd.cdb)
            }
            op::MAINTENANCE_IN => {
                let view = self.alua.read().ok().and_then(|v| v.clone());
                spc::maintenance_in(lu, nexus, cmd.cdb, view.as_deref())
            }
            _ => match lu.disk() {
                Some(disk) => self.dispatch_disk(lu, disk, nexus, cmd),
                None => Err(sense::INVALID_COMMAND_OPERATION_CODE.into()),
            },
        }
    }

    fn dispatch_disk(&self, lu: &LogicalUnit, disk: &Disk, nexus: &Nexus, cmd: &Command<'_>) -> CmdResult {
        let opcode = cmd.cdb[0];
        if matches!(
            opcode,
            op::MODE_SELECT_6 | op::MODE_SELECT_10 | op::PERSISTENT_RESERVE_OUT
        ) && sbc::data_out_len(cmd.cdb, disk.block_size).is_some_and(|n| cmd.data_out.len() < n as usize)
        {
            // Less parameter data than the CDB announces: nothing is applied.
            return Err(sense::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT.into());
        }
        match opcode {
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => spc::mode_sense(lu, disk, cmd.cdb),
            op::MODE_SELECT_6 | op::MODE_SELECT_10 => {
                let changed = spc::mode_select(lu, cmd.cdb, cmd.data_out)?;
                if changed {
                    self.ua_others(lu, nexus.id, sense::MODE_PARAMETERS_CHANGED);
                }
                Ok(Vec::new())
            }
            op::PERSISTENT_RESERVE_IN => {
                let alloc = usize::from(cdb::u16_at(cmd.cdb, 7));
                Ok(truncate(disk.pr.reserve_in(&nexus.pr(), cmd.cdb)?, alloc))
            }
            op::PERSISTENT_RESERVE_OUT => {
                let len = (cdb::u32_at(cmd.cdb, 5) as usize).min(cmd.data_out.len());
                let uas = disk.pr.reserve_out(&nexus.pr(), cmd.cdb, &cmd.data_out[..len])?;
                self.deliver(lu, &uas);
                Ok(Vec::new())
            }
            op::RESERVE_6 | op::RESERVE_10 => {
                disk.pr.reserve6(&nexus.pr())?;
                Ok(Vec::new())
            }
            op::RELEASE_6 | op::RELEASE_10 => {
                disk.pr.release6(&nexus.pr())?;
                Ok(Vec::new())
            }
            _ => sbc::execute(lu, disk, cmd),
        }
    }

    fn execute_unknown_lun(&self, _nexus: &Nexus, cmd: &Command<'_>) -> Outcome {
        let result = match cdb::u8_at(cmd.cdb, 0) {
            op::INQUIRY => spc::inquiry_unknown_lun(cmd.cdb),
            op::REPORT_LUNS => spc::report_luns(&self.lun_list(), cmd.cdb),
            op::REQUEST_SENSE => spc::request_sense(sense::LOGICAL_UNIT_NOT_SUPPORTED, cmd.cdb),
            _ => Err(sense::LOGICAL_UNIT_NOT_SUPPORTED.into()),
        };
        match result {
            Ok(data) => Outcome::good(data),
            Err(Fail::Check(s)) => Outcome::check(&s, false),
            Err(Fail::Conflict) => Outcome::check(&Sense::from(sense::LOGICAL_UNIT_NOT_SUPPORTED), false),
        }
    }

    /// Establishes `code` on this LU for every live nexus except `except`.
    fn ua_others(&self, lu: &LogicalUnit, except: u64, code: SenseCode) {
        let Ok(n) = self.nexuses.lock() else { return };
        for &id in n.keys().filter(|&&id| id != except) {
            lu.ua.push(id, code);
        }
    }

    /// Delivers unit attentions the PR layer asked for.
    fn deliver(&self, lu: &LogicalUnit, uas: &[UaTarget]) {
        if uas.is_empty() {
            return;
        }
        let Ok(n) = self.nexuses.lock() else { return };
        for ua in uas {
            for (&id, (port, rel)) in n.iter() {
                if port.eq_ignore_ascii_case(&ua.initiator_port) && ua.relative_target_port.is_none_or(|r| r == *rel) {
                    lu.ua.push(id, ua.sense);
                }
            }
        }
    }

    /// A new I_T nexus: UA 29/00 POWER ON, RESET OR BUS DEVICE RESET OCCURRED on every LU.
    pub fn nexus_joined(&self, nexus: &Nexus) {
        if let Ok(mut n) = self.nexuses.lock() {
            n.insert(
                nexus.id,
                (nexus.initiator_port.clone(), nexus.target_port.relative_port_id),
            );
        }
        for lu in &self.lus {
            lu.ua.forget(nexus.id);
            lu.ua.push(nexus.id, sense::POWER_ON_RESET);
        }
    }

    /// The I_T nexus is gone: its unit attentions go, and PR forgets SPC-2 reservations it held.
    pub fn nexus_left(&self, nexus: &Nexus) {
        if let Ok(mut n) = self.nexuses.lock() {
            n.remove(&nexus.id);
        }
        for lu in &self.lus {
            lu.ua.forget(nexus.id);
            if let Some(d) = lu.disk() {
                d.pr.nexus_lost(&nexus.pr());
            }
        }
    }

    /// LOGICAL UNIT RESET: UA 29/03 to the other nexuses, SPC-2 reservations cleared. False when
    /// there is no such LUN.
    pub fn lu_reset(&self, lun: u64, by: &Nexus) -> bool {
        let Some(lu) = self.lu(lun) else { return false };
        tracing::debug!(lun, by = %by.initiator_port, "logical unit reset");
        self.reset_lu(lu);
        true
    }

    fn reset_lu(&self, lu: &LogicalUnit) {
        if let Some(d) = lu.disk() {
            d.pr.lu_reset();
        }
        // Every I_T nexus, the requester's included, learns of the reset (SAM-5 §6.3.3; the
        // initiator's other paths depend on it, libiscsi MultipathIO.Reset).
        self.ua_all(lu, sense::BUS_DEVICE_RESET);
    }

    fn ua_all(&self, lu: &LogicalUnit, code: SenseCode) {
        let Ok(n) = self.nexuses.lock() else { return };
        for &id in n.keys() {
            lu.ua.push(id, code);
        }
    }

    /// TARGET WARM RESET: every LU is reset.
    pub fn target_reset(&self, by: &Nexus) {
        tracing::debug!(by = %by.initiator_port, "target reset");
        for lu in &self.lus {
            self.reset_lu(lu);
        }
    }

    pub fn luns(&self) -> Vec<LunInfo> {
        self.lus
            .iter()
            .map(|lu| match &lu.kind {
                LuKind::Controller => LunInfo {
                    lun: lu.lun,
                    kind: "controller",
                    size_bytes: 0,
                    block_size: 0,
                    backing: "none".into(),
                    read_only: true,
                },
                LuKind::Disk(d) => LunInfo {
                    lun: lu.lun,
                    kind: "disk",
                    size_bytes: d.blocks() * u64::from(d.block_size),
                    block_size: d.block_size,
                    backing: d.store.describe(),
                    read_only: d.def.read_only,
                },
            })
            .collect()
    }

    pub fn target_name(&self) -> &str {
        &self.target_name
    }

    /// Installs the cluster's view of the target port groups, used by REPORT TARGET PORT GROUPS
    /// from then on (replacing any earlier view).
    pub fn set_alua(&self, view: Arc<dyn AluaView>) {
        let mut v = self.alua.write().unwrap_or_else(|p| p.into_inner());
        *v = Some(view);
    }

    /// Establishes UNIT ATTENTION `code` on every live I_T nexus of LU `lun` (None: every LU),
    /// e.g. ASYMMETRIC ACCESS STATE CHANGED (2A/06) when a volume's leader moves.
    pub fn unit_attention_all(&self, lun: Option<u64>, code: SenseCode) {
        for lu in self.lus.iter().filter(|l| lun.is_none_or(|n| n == l.lun)) {
            self.ua_all(lu, code);
        }
    }

    /// The backing store of LU `lun` changed size: UNIT ATTENTION CAPACITY DATA HAS CHANGED
    /// (2A/09) on every live nexus (SBC-3 §4.6). READ CAPACITY and LBA checks already follow the
    /// store's size. False when there is no such disk.
    pub fn capacity_changed(&self, lun: u64) -> bool {
        let Some(lu) = self.lu(lun).filter(|l| l.disk().is_some()) else {
            return false;
        };
        self.ua_all(lu, sense::CAPACITY_DATA_HAS_CHANGED);
        true
    }

    /// The persistent-reservation state of LU `lun` (every registration, the reservation, the
    /// generation and the APTPL flag; not an SPC-2 RESERVE), prost-encoded
    /// ([`pr::PersistedState`]). None when `lun` is not a disk.
    pub fn pr_export(&self, lun: u64) -> Option<Vec<u8>> {
        self.lu(lun).and_then(LogicalUnit::disk).map(|d| d.pr.export())
    }

    /// Replaces the persistent-reservation state of LU `lun` with `state` (from
    /// [`TargetLus::pr_export`]). Raises no unit attention; an SPC-2 reservation held through
    /// this node stays. Errors: no such disk (NotFound), undecodable or inconsistent state
    /// (InvalidData), the APTPL file cannot be written.
    pub fn pr_import(&self, lun: u64, state: &[u8]) -> std::io::Result<()> {
        let Some(d) = self.lu(lun).and_then(LogicalUnit::disk) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("target {}: no disk at LUN {lun}", self.target_name),
            ));
        };
        d.pr.import(state)
    }
}

impl LogicalUnit {
    fn new(lun: u64, kind: LuKind, wce: bool) -> Self {
        LogicalUnit {
            lun,
            kind,
            ua: UnitAttentions::default(),
            wce: AtomicBool::new(wce),
            d_sense: AtomicBool::new(false),
        }
    }
}

impl Disk {
    fn new(def: LunDef, store: Box<dyn BackingStore>, aptpl: Option<std::path::PathBuf>) -> std::io::Result<Self> {
        let block_size = def.block_size;
        if !(512..=65536).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "LUN {}: block size {block_size} is not a power of two in 512..=65536",
                    def.lun
                ),
            ));
        }
        let pr = PersistentReservations::open(aptpl)?;
        Ok(Disk {
            def,
            store,
            block_size,
            atomic: RwLock::new(()),
            pr,
        })
    }
}

#[cfg(test)]
mod tests;
