//! SPC-4 commands every logical unit answers: INQUIRY, REPORT LUNS, REQUEST SENSE, MODE
//! SENSE/SELECT, REPORT SUPPORTED OPERATION CODES and REPORT TARGET PORT GROUPS.

use std::sync::atomic::Ordering;

use raftsan_proto::scsi::cdb::{self, op, sa};
use raftsan_proto::scsi::mode::{self, ModeParams, PageControl};
use raftsan_proto::scsi::sense::{self, Sense, SenseCode};
use raftsan_proto::scsi::vpd::{self, page};

use super::{CmdResult, Disk, Fail, LogicalUnit, LuKind, Nexus, alua, bad_cdb, truncate};

/// Largest data transfer of one READ/WRITE, in bytes (VPD B0h MAXIMUM TRANSFER LENGTH).
pub(crate) const MAX_TRANSFER_BYTES: u64 = 8 << 20;
pub(crate) const MAX_UNMAP_DESCRIPTORS: u32 = 256;
pub(crate) const MAX_WRITE_SAME_BLOCKS: u64 = 0xffff;
pub(crate) const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 255;
/// WRITE ATOMIC(16) limit in blocks before the MAXIMUM TRANSFER LENGTH cap: the whole write is
/// one positioned write under the LU's atomicity lock.
pub(crate) const MAX_ATOMIC_TRANSFER_BLOCKS: u32 = 256;

const INQUIRY_EVPD: u8 = 0x01;
const INQUIRY_CMDDT: u8 = 0x02;

pub(crate) fn inquiry(lu: &LogicalUnit, nexus: &Nexus, cdb: &[u8]) -> CmdResult {
    let flags = cdb::u8_at(cdb, 1);
    let page_code = cdb::u8_at(cdb, 2);
    let alloc = usize::from(cdb::u16_at(cdb, 3));
    if flags & INQUIRY_CMDDT != 0 {
        return Err(bad_cdb(1, Some(1)));
    }
    let p = lu.peripheral();
    if flags & INQUIRY_EVPD == 0 {
        if page_code != 0 {
            return Err(bad_cdb(2, None));
        }
        let data = match &lu.kind {
            LuKind::Disk(d) => vpd::standard(p, &d.def.vendor, &d.def.product, &d.def.revision),
            LuKind::Controller => vpd::standard(p, "RAFTSAN", "CONTROLLER", "0001"),
        };
        return Ok(truncate(data, alloc));
    }
    let port = vpd::PortIdentity {
        target_name: &nexus.target_port.target_name,
        tpgt: nexus.target_port.tpgt,
        relative_port_id: nexus.target_port.relative_port_id,
        port_group: nexus.target_port.port_group,
    };
    let data = match &lu.kind {
        LuKind::Controller => match page_code {
            page::SUPPORTED_VPD_PAGES => {
                vpd::supported_pages(p, &[page::SUPPORTED_VPD_PAGES, page::DEVICE_IDENTIFICATION])
            }
            page::DEVICE_IDENTIFICATION => vpd::device_identification(p, None, &port),
            _ => return Err(bad_cdb(2, None)),
        },
        LuKind::Disk(d) => match page_code {
            page::SUPPORTED_VPD_PAGES => vpd::supported_pages(
                p,
                &[
                    page::SUPPORTED_VPD_PAGES,
                    page::UNIT_SERIAL_NUMBER,
                    page::DEVICE_IDENTIFICATION,
                    page::EXTENDED_INQUIRY,
                    page::BLOCK_LIMITS,
                    page::BLOCK_DEVICE_CHARACTERISTICS,
                    page::LOGICAL_BLOCK_PROVISIONING,
                ],
            ),
            page::UNIT_SERIAL_NUMBER => vpd::unit_serial_number(p, &d.def.serial),
            page::DEVICE_IDENTIFICATION => vpd::device_identification(p, Some(&d.def.naa), &port),
            page::EXTENDED_INQUIRY => vpd::extended_inquiry(p),
            page::BLOCK_LIMITS => vpd::block_limits(p, &block_limits(d)),
            page::BLOCK_DEVICE_CHARACTERISTICS => vpd::block_device_characteristics(p),
            page::LOGICAL_BLOCK_PROVISIONING => vpd::logical_block_provisioning(p, d.def.thin),
            _ => return Err(bad_cdb(2, None)),
        },
    };
    Ok(truncate(data, alloc))
}

/// Atomic writes cover whole 4 KiB pages (ATOMIC ALIGNMENT = ATOMIC TRANSFER LENGTH GRANULARITY,
/// in blocks), so an atomic write never shares a page with another write.
pub(crate) fn atomic_granularity(d: &Disk) -> u32 {
    (4096 / d.block_size).max(1)
}

/// MAXIMUM ATOMIC TRANSFER LENGTH in blocks: at most the MAXIMUM TRANSFER LENGTH.
pub(crate) fn max_atomic_transfer_blocks(d: &Disk) -> u32 {
    let max_transfer = (MAX_TRANSFER_BYTES / u64::from(d.block_size)) as u32;
    MAX_ATOMIC_TRANSFER_BLOCKS.min(max_transfer)
}

pub(crate) fn block_limits(d: &Disk) -> vpd::BlockLimits {
    let bs = u64::from(d.block_size);
    let granularity = (4096 / bs).max(1) as u32;
    vpd::BlockLimits {
        // WRITE SAME with zero blocks is refused (see sbc::write_same).
        wsnz: true,
        max_compare_and_write_len: MAX_COMPARE_AND_WRITE_BLOCKS,
        optimal_transfer_granularity: granularity as u16,
        max_transfer_len: (MAX_TRANSFER_BYTES / bs) as u32,
        optimal_transfer_len: ((1 << 20) / bs) as u32,
        max_unmap_lba_count: if d.def.thin { u32::MAX } else { 0 },
        max_unmap_descriptor_count: if d.def.thin { MAX_UNMAP_DESCRIPTORS } else { 0 },
        optimal_unmap_granularity: if d.def.thin { granularity } else { 0 },
        max_write_same_len: MAX_WRITE_SAME_BLOCKS,
        max_atomic_transfer_len: max_atomic_transfer_blocks(d),
        atomic_alignment: atomic_granularity(d),
        atomic_transfer_len_granularity: atomic_granularity(d),
    }
}

/// INQUIRY at a LUN with no logical unit: peripheral qualifier 011b, type 1Fh (SPC-4 §6.6.2).
pub(crate) fn inquiry_unknown_lun(cdb: &[u8]) -> CmdResult {
    let flags = cdb::u8_at(cdb, 1);
    if flags & (INQUIRY_CMDDT | INQUIRY_EVPD) != 0 || cdb::u8_at(cdb, 2) != 0 {
        return Err(sense::LOGICAL_UNIT_NOT_SUPPORTED.into());
    }
    let p = vpd::QUALIFIER_NOT_SUPPORTED | vpd::device_type::UNKNOWN;
    Ok(truncate(
        vpd::standard(p, "RAFTSAN", "NO LU", "0001"),
        usize::from(cdb::u16_at(cdb, 3)),
    ))
}

/// REPORT LUNS (SPC-4 §6.33).
pub(crate) fn report_luns(luns: &[u64], cdb: &[u8]) -> CmdResult {
    let select = cdb::u8_at(cdb, 2);
    let alloc = cdb::u32_at(cdb, 6) as usize;
    let listed: &[u64] = match select {
        0x00 | 0x02 | 0x10 | 0x12 => luns,
        // Only well-known logical units: we have none.
        0x01 | 0x11 => &[],
        _ => return Err(bad_cdb(2, None)),
    };
    if alloc < 16 {
        return Err(bad_cdb(6, None));
    }
    let mut data = Vec::with_capacity(8 + 8 * listed.len());
    data.extend_from_slice(&((8 * listed.len()) as u32).to_be_bytes());
    data.extend_from_slice(&[0; 4]);
    for &lun in listed {
        data.extend_from_slice(&encode_lun(lun));
    }
    Ok(truncate(data, alloc))
}

/// SAM-5 §4.7: peripheral device addressing below 256, flat space addressing up to 16383.
pub(crate) fn encode_lun(lun: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else {
        let l = (lun & 0x3fff) as u16;
        b[0] = 0x40 | (l >> 8) as u8;
        b[1] = l as u8;
    }
    b
}

/// REQUEST SENSE (SPC-4 §6.39): the pending unit attention (or NO SENSE) as parameter data,
/// descriptor format when DESC = 1.
pub(crate) fn request_sense(code: SenseCode, cdb: &[u8]) -> CmdResult {
    let desc = cdb::u8_at(cdb, 1) & 0x01 != 0;
    let alloc = usize::from(cdb::u8_at(cdb, 4));
    Ok(truncate(Sense::from(code).encode(desc), alloc))
}

/// MAINTENANCE IN: REPORT TARGET PORT GROUPS and REPORT SUPPORTED OPERATION CODES.
pub(crate) fn maintenance_in(
    lu: &LogicalUnit,
    nexus: &Nexus,
    cdb: &[u8],
    alua: Option<&dyn alua::AluaView>,
) -> CmdResult {
    match u16::from(cdb::u8_at(cdb, 1) & 0x1f) {
        sa::REPORT_TARGET_PORT_GROUPS => report_target_port_groups(lu, nexus, cdb, alua),
        sa::REPORT_SUPPORTED_OPERATION_CODES => report_supported_opcodes(lu, cdb),
        _ => Err(bad_cdb(1, Some(4))),
    }
}

/// REPORT TARGET PORT GROUPS (SPC-4 r37 §6.37): the groups of the cluster's view; without one
/// (or when it knows no group for this LU), the nexus's own group, Active/Optimized, preferred.
fn report_target_port_groups(
    lu: &LogicalUnit,
    nexus: &Nexus,
    cdb: &[u8],
    view: Option<&dyn alua::AluaView>,
) -> CmdResult {
    let extended = match cdb::u8_at(cdb, 1) >> 5 {
        alua::format::LENGTH_ONLY => false,
        alua::format::EXTENDED => true,
        _ => return Err(bad_cdb(1, Some(7))),
    };
    let alloc = cdb::u32_at(cdb, 6) as usize;
    let groups = view.map(|v| v.port_groups(lu.lun)).unwrap_or_default();
    let data = if groups.is_empty() {
        let own = alua::PortGroupState {
            group: nexus.target_port.port_group,
            state: alua::AluaState::ActiveOptimized,
            relative_ports: vec![nexus.target_port.relative_port_id],
        };
        alua::report_target_port_groups(&[own], true, extended)
    } else {
        alua::report_target_port_groups(&groups, false, extended)
    };
    Ok(truncate(data, alloc))
}

/// One supported command: operation code, service action, CDB usage data (SPC-4 §6.35.3).
struct Supported {
    opcode: u8,
    sa: Option<u16>,
    usage: &'static [u8],
}

macro_rules! cmd {
    ($op:expr, [$($b:expr),*]) => { Supported { opcode: $op, sa: None, usage: &[$op, $($b),*] } };
    ($op:expr, sa $sa:expr, [$($b:expr),*]) => { Supported { opcode: $op, sa: Some($sa), usage: &[$op, $($b),*] } };
}

const COMMON_COMMANDS: &[Supported] = &[
    cmd!(op::TEST_UNIT_READY, [0, 0, 0, 0, 0x07]),
    cmd!(op::REQUEST_SENSE, [0x01, 0, 0, 0xff, 0x07]),
    cmd!(op::INQUIRY, [0x01, 0xff, 0xff, 0xff, 0x07]),
    cmd!(op::REPORT_LUNS, [0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x07]),
    cmd!(op::MAINTENANCE_IN, sa 0x0a, [0xea, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x07]),
    cmd!(op::MAINTENANCE_IN, sa 0x0c, [0x0c, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x07]),
];

const RW10: [u8; 8] = [0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x07];
const RW12: [u8; 10] = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x07];
const RW16: [u8; 14] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x07,
];

macro_rules! rw {
    ($op:expr, $b1:expr, 10) => {
        Supported {
            opcode: $op,
            sa: None,
            usage: &[
                $op, $b1, RW10[0], RW10[1], RW10[2], RW10[3], RW10[4], RW10[5], RW10[6], RW10[7],
            ],
        }
    };
    ($op:expr, $b1:expr, 12) => {
        Supported {
            opcode: $op,
            sa: None,
            usage: &[
                $op, $b1, RW12[0], RW12[1], RW12[2], RW12[3], RW12[4], RW12[5], RW12[6], RW12[7], RW12[8], RW12[9],
            ],
        }
    };
    ($op:expr, $b1:expr, 16) => {
        Supported {
            opcode: $op,
            sa: None,
            usage: &[
                $op, $b1, RW16[0], RW16[1], RW16[2], RW16[3], RW16[4], RW16[5], RW16[6], RW16[7], RW16[8], RW16[9],
                RW16[10], RW16[11], RW16[12], RW16[13],
            ],
        }
    };
}

const DISK_COMMANDS: &[Supported] = &[
    cmd!(op::READ_6, [0x1f, 0xff, 0xff, 0xff, 0x07]),
    cmd!(op::WRITE_6, [0x1f, 0xff, 0xff, 0xff, 0x07]),
    cmd!(op::MODE_SELECT_6, [0x10, 0, 0, 0xff, 0x07]),
    cmd!(op::RESERVE_6, [0, 0, 0, 0, 0x07]),
    cmd!(op::RELEASE_6, [0, 0, 0, 0, 0x07]),
    cmd!(op::MODE_SENSE_6, [0x08, 0xff, 0xff, 0xff, 0x07]),
    cmd!(op::START_STOP_UNIT, [0x01, 0, 0x0f, 0xf7, 0x07]),
    cmd!(op::PREVENT_ALLOW_MEDIUM_REMOVAL, [0, 0, 0, 0x03, 0x07]),
    cmd!(op::READ_CAPACITY_10, [0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x01, 0x07]),
    rw!(op::READ_10, 0x18, 10),
    rw!(op::WRITE_10, 0x18, 10),
    rw!(op::WRITE_AND_VERIFY_10, 0x12, 10),
    rw!(op::VERIFY_10, 0x16, 10),
    rw!(op::PRE_FETCH_10, 0x02, 10),
    rw!(op::SYNCHRONIZE_CACHE_10, 0x02, 10),
    cmd!(op::READ_DEFECT_DATA_10, [0, 0x1f, 0, 0, 0, 0, 0xff, 0xff, 0x07]),
    rw!(op::WRITE_SAME_10, 0x08, 10),
    cmd!(op::UNMAP, [0, 0, 0, 0, 0, 0x1f, 0xff, 0xff, 0x07]),
    cmd!(op::MODE_SELECT_10, [0x10, 0, 0, 0, 0, 0, 0xff, 0xff, 0x07]),
    cmd!(op::RESERVE_10, [0, 0, 0, 0, 0, 0, 0, 0, 0x07]),
    cmd!(op::RELEASE_10, [0, 0, 0, 0, 0, 0, 0, 0, 0x07]),
    cmd!(op::MODE_SENSE_10, [0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0x07]),
    cmd!(op::PERSISTENT_RESERVE_IN, sa 0x00, [0x00, 0, 0, 0, 0, 0, 0xff, 0xff, 0x07]),
    cmd!(op::PERSISTENT_RESERVE_IN, sa 0x01, [0x01, 0, 0, 0, 0, 0, 0xff, 0xff, 0x07]),
    cmd!(op::PERSISTENT_RESERVE_IN, sa 0x02, [0x02, 0, 0, 0, 0, 0, 0xff, 0xff, 0x07]),
    cmd!(op::PERSISTENT_RESERVE_IN, sa 0x03, [0x03, 0, 0, 0, 0, 0, 0xff, 0xff, 0x07]),
    cmd!(op::PERSISTENT_RESERVE_OUT, sa 0x00, [0x00, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x07]),
    cmd!(op::PERSISTENT_RESERVE_OUT, sa 0x01, [0x01, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x07]),
    cmd!(op::PERSISTENT_RESERVE_OUT, sa 0x02, [0x02, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x07]),
    cmd!(op::PERSISTENT_RESERVE_OUT, sa 0x03, [0x03, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x07]),
    cmd!(op::PERSISTENT_RESERVE_OUT, sa 0x04, [0x04, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x07]),
    cmd!(op::PERSISTENT_RESERVE_OUT, sa 0x05, [0x05, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x07]),
    cmd!(op::PERSISTENT_RESERVE_OUT, sa 0x06, [0x06, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x07]),
    cmd!(op::PERSISTENT_RESERVE_OUT, sa 0x07, [0x07, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x07]),
    rw!(op::READ_16, 0x18, 16),
    cmd!(
        op::COMPARE_AND_WRITE,
        [
            0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0xff, 0x1f, 0x07
        ]
    ),
    rw!(op::WRITE_16, 0x18, 16),
    rw!(op::ORWRITE_16, 0x18, 16),
    rw!(op::WRITE_AND_VERIFY_16, 0x12, 16),
    rw!(op::VERIFY_16, 0x16, 16),
    rw!(op::PRE_FETCH_16, 0x02, 16),
    rw!(op::SYNCHRONIZE_CACHE_16, 0x02, 16),
    rw!(op::WRITE_SAME_16, 0x09, 16),
    cmd!(
        op::WRITE_ATOMIC_16,
        [
            0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0xff, 0xff, 0x1f, 0x07
        ]
    ),
    cmd!(op::SERVICE_ACTION_IN_16, sa 0x10, [0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x07]),
    cmd!(op::SERVICE_ACTION_IN_16, sa 0x12, [0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x07]),
    rw!(op::READ_12, 0x18, 12),
    rw!(op::WRITE_12, 0x18, 12),
    rw!(op::WRITE_AND_VERIFY_12, 0x12, 12),
    rw!(op::VERIFY_12, 0x16, 12),
    cmd!(
        op::READ_DEFECT_DATA_12,
        [0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x07]
    ),
];

fn supported(lu: &LogicalUnit) -> Vec<&'static Supported> {
    let mut all: Vec<&Supported> = COMMON_COMMANDS.iter().collect();
    if lu.disk().is_some() {
        all.extend(DISK_COMMANDS.iter());
    }
    all.sort_by_key(|c| (c.opcode, c.sa));
    all
}

/// Command timeouts descriptor (SPC-4 §6.35.4): length 0Ah, no nominal, 30 s recommended.
fn timeouts_descriptor(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0x00, 0x0a, 0, 0]);
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&30u32.to_be_bytes());
}

/// REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35).
fn report_supported_opcodes(lu: &LogicalUnit, cdb: &[u8]) -> CmdResult {
    let rctd = cdb::u8_at(cdb, 2) & 0x80 != 0;
    let options = cdb::u8_at(cdb, 2) & 0x07;
    let req_op = cdb::u8_at(cdb, 3);
    let req_sa = cdb::u16_at(cdb, 4);
    let alloc = cdb::u32_at(cdb, 6) as usize;
    let table = supported(lu);
    let mut data = Vec::new();
    let one = |data: &mut Vec<u8>, found: Option<&Supported>| {
        match found {
            Some(c) => {
                data.push(0);
                data.push(if rctd { 0x80 } else { 0 } | 0x03);
                data.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
                data.extend_from_slice(c.usage);
                if rctd {
                    timeouts_descriptor(data);
                }
            }
            // SUPPORT 001b: not supported.
            None => data.extend_from_slice(&[0, 0x01, 0, 0]),
        }
    };
    match options {
        0 => {
            data.extend_from_slice(&[0; 4]);
            for c in &table {
                data.push(c.opcode);
                data.push(0);
                data.extend_from_slice(&c.sa.unwrap_or(0).to_be_bytes());
                data.push(0);
                data.push(if rctd { 0x02 } else { 0 } | if c.sa.is_some() { 0x01 } else { 0 });
                data.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
                if rctd {
                    timeouts_descriptor(&mut data);
                }
            }
            let n = (data.len() - 4) as u32;
            data[0..4].copy_from_slice(&n.to_be_bytes());
        }
        1 => {
            if table.iter().any(|c| c.opcode == req_op && c.sa.is_some()) {
                return Err(bad_cdb(3, None));
            }
            one(&mut data, table.iter().copied().find(|c| c.opcode == req_op));
        }
        2 => {
            if table.iter().any(|c| c.opcode == req_op && c.sa.is_none()) {
                return Err(bad_cdb(3, None));
            }
            one(
                &mut data,
                table
                    .iter()
                    .copied()
                    .find(|c| c.opcode == req_op && c.sa == Some(req_sa)),
            );
        }
        3 => {
            let found = table
                .iter()
                .copied()
                .find(|c| c.opcode == req_op && c.sa.is_none_or(|s| s == req_sa));
            one(&mut data, found);
        }
        _ => return Err(bad_cdb(2, Some(2))),
    }
    Ok(truncate(data, alloc))
}

fn default_mode(d: &Disk) -> ModeParams {
    ModeParams {
        wce: d.def.write_cache,
        d_sense: false,
    }
}

fn current_mode(lu: &LogicalUnit) -> ModeParams {
    ModeParams {
        wce: lu.wce.load(Ordering::Relaxed),
        d_sense: lu.d_sense.load(Ordering::Relaxed),
    }
}

/// MODE SENSE(6)/(10) (SPC-4 §6.11, §6.12).
pub(crate) fn mode_sense(lu: &LogicalUnit, d: &Disk, cdb: &[u8]) -> CmdResult {
    let ten = cdb::u8_at(cdb, 0) == op::MODE_SENSE_10;
    let b1 = cdb::u8_at(cdb, 1);
    let dbd = b1 & 0x08 != 0;
    let llbaa = ten && b1 & 0x10 != 0;
    let pc = PageControl::from_bits(cdb::u8_at(cdb, 2) >> 6);
    let code = cdb::u8_at(cdb, 2) & 0x3f;
    let subpage = cdb::u8_at(cdb, 3);
    let alloc = if ten {
        usize::from(cdb::u16_at(cdb, 7))
    } else {
        usize::from(cdb::u8_at(cdb, 4))
    };
    if pc == PageControl::Saved {
        return Err(Sense::cdb_field(sense::SAVING_PARAMETERS_NOT_SUPPORTED, 2, Some(7)).into());
    }
    if subpage != 0 && subpage != 0xff {
        return Err(bad_cdb(3, None));
    }
    let (cur, def) = (current_mode(lu), default_mode(d));
    let mut pages = Vec::new();
    if code == mode::page::ALL {
        for p in mode::PAGES {
            pages.extend(mode::page_bytes(p, pc, &cur, &def).unwrap_or_default());
        }
    } else {
        match mode::page_bytes(code, pc, &cur, &def) {
            Some(p) => pages = p,
            None => return Err(bad_cdb(2, Some(5))),
        }
    }
    let bd = (!dbd).then_some((d.blocks(), d.block_size));
    let data = mode::mode_sense_data(ten, d.def.read_only, bd, llbaa, &pages);
    Ok(truncate(data, alloc))
}

/// MODE SELECT(6)/(10) (SPC-4 §6.9, §6.10). True when a parameter changed.
pub(crate) fn mode_select(lu: &LogicalUnit, cdb: &[u8], data_out: &[u8]) -> Result<bool, Fail> {
    let ten = cdb::u8_at(cdb, 0) == op::MODE_SELECT_10;
    if cdb::u8_at(cdb, 1) & 0x01 != 0 {
        // SP: no saved parameters.
        return Err(bad_cdb(1, Some(0)));
    }
    let len = if ten {
        usize::from(cdb::u16_at(cdb, 7))
    } else {
        usize::from(cdb::u8_at(cdb, 4))
    };
    if len == 0 {
        return Ok(false);
    }
    let data = &data_out[..len.min(data_out.len())];
    let Some(d) = lu.disk() else {
        return Err(sense::INVALID_COMMAND_OPERATION_CODE.into());
    };
    let cur = current_mode(lu);
    let new = mode::mode_select(ten, data, &cur, &default_mode(d))?;
    lu.wce.store(new.wce, Ordering::Relaxed);
    lu.d_sense.store(new.d_sense, Ordering::Relaxed);
    Ok(new != cur)
}
