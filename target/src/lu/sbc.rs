//! SBC-3 block commands over the backing store.

use std::sync::atomic::Ordering;

use raftsan_proto::scsi::cdb::{self, op, sa};
use raftsan_proto::scsi::sense::{self, Sense};

use super::spc::{
    MAX_COMPARE_AND_WRITE_BLOCKS, MAX_TRANSFER_BYTES, MAX_UNMAP_DESCRIPTORS, MAX_WRITE_SAME_BLOCKS, atomic_granularity,
    max_atomic_transfer_blocks,
};
use super::{CmdResult, Command, Disk, Fail, LogicalUnit, bad_cdb, truncate};

/// The Data-Out byte count a CDB calls for (SPDTL), or `None` for commands without Data-Out.
pub(crate) fn data_out_len(cdb: &[u8], block_size: u32) -> Option<u32> {
    let bs = u64::from(block_size);
    let n: u64 = match cdb::u8_at(cdb, 0) {
        op::WRITE_6
        | op::WRITE_10
        | op::WRITE_12
        | op::WRITE_16
        | op::WRITE_AND_VERIFY_10
        | op::WRITE_AND_VERIFY_12
        | op::WRITE_AND_VERIFY_16
        | op::ORWRITE_16 => u64::from(cdb::block_io(cdb)?.blocks) * bs,
        op::WRITE_ATOMIC_16 => u64::from(cdb::u16_at(cdb, WRITE_ATOMIC_TRANSFER_LEN)) * bs,
        op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => {
            let io = cdb::block_io(cdb)?;
            match io.bytchk {
                1 => u64::from(io.blocks) * bs,
                3 if io.blocks > 0 => bs,
                _ => return None,
            }
        }
        op::WRITE_SAME_10 => bs,
        op::WRITE_SAME_16 => {
            if cdb::u8_at(cdb, 1) & 0x01 != 0 {
                0
            } else {
                bs
            }
        }
        op::COMPARE_AND_WRITE => 2 * u64::from(cdb::u8_at(cdb, 13)) * bs,
        op::UNMAP => u64::from(cdb::u16_at(cdb, 7)),
        op::MODE_SELECT_6 => u64::from(cdb::u8_at(cdb, 4)),
        op::MODE_SELECT_10 => u64::from(cdb::u16_at(cdb, 7)),
        op::PERSISTENT_RESERVE_OUT => u64::from(cdb::u32_at(cdb, 5)),
        _ => return None,
    };
    Some(u32::try_from(n).unwrap_or(u32::MAX))
}

pub(crate) fn execute(lu: &LogicalUnit, d: &Disk, cmd: &Command<'_>) -> CmdResult {
    let c = cmd.cdb;
    if is_write(c[0]) {
        // Before any field or Data-Out check: a read-only LU refuses every write the same way.
        check_writable(d)?;
    }
    if let Some(n) = data_out_len(c, d.block_size)
        && cmd.data_out.len() < n as usize
    {
        // Less Data-Out than the CDB describes (iSCSI EDTL < SCSI transfer length). A plain
        // write of whole blocks writes just those blocks and reports the overflow residual, as
        // libiscsi's residual tests expect (RFC 7143 §11.4.5.2); anything else transfers
        // nothing (FCP-4 §9.4.2 b).
        let whole_blocks = cmd.data_out.len().is_multiple_of(d.block_size as usize);
        if !(is_plain_write(c[0]) && whole_blocks) {
            return Err(sense::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT.into());
        }
    }
    match c[0] {
        op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => read(d, c),
        op::WRITE_6
        | op::WRITE_10
        | op::WRITE_12
        | op::WRITE_16
        | op::WRITE_AND_VERIFY_10
        | op::WRITE_AND_VERIFY_12
        | op::WRITE_AND_VERIFY_16 => write(lu, d, c, cmd.data_out),
        op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => verify(d, c, cmd.data_out),
        op::READ_CAPACITY_10 => read_capacity10(d, c),
        op::SERVICE_ACTION_IN_16 => match u16::from(c[1] & 0x1f) {
            sa::READ_CAPACITY_16 => read_capacity16(d, c),
            sa::GET_LBA_STATUS => get_lba_status(d, c),
            _ => Err(bad_cdb(1, Some(4))),
        },
        op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => synchronize_cache(d, c),
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => write_same(lu, d, c, cmd.data_out),
        op::UNMAP => unmap(d, c, cmd.data_out),
        op::COMPARE_AND_WRITE => compare_and_write(lu, d, c, cmd.data_out),
        op::ORWRITE_16 => orwrite(lu, d, c, cmd.data_out),
        op::WRITE_ATOMIC_16 => write_atomic(lu, d, c, cmd.data_out),
        op::PRE_FETCH_10 | op::PRE_FETCH_16 => pre_fetch(d, c),
        op::READ_DEFECT_DATA_10 | op::READ_DEFECT_DATA_12 => read_defect_data(c),
        op::START_STOP_UNIT | op::PREVENT_ALLOW_MEDIUM_REMOVAL => Ok(Vec::new()),
        _ => Err(sense::INVALID_COMMAND_OPERATION_CODE.into()),
    }
}

/// WRITE and WRITE AND VERIFY: commands whose Data-Out is the data to write, block by block.
fn is_plain_write(opcode: u8) -> bool {
    matches!(
        opcode,
        op::WRITE_6
            | op::WRITE_10
            | op::WRITE_12
            | op::WRITE_16
            | op::WRITE_AND_VERIFY_10
            | op::WRITE_AND_VERIFY_12
            | op::WRITE_AND_VERIFY_16
    )
}

/// Commands that modify the medium.
fn is_write(opcode: u8) -> bool {
    matches!(
        opcode,
        op::WRITE_6
            | op::WRITE_10
            | op::WRITE_12
            | op::WRITE_16
            | op::WRITE_AND_VERIFY_10
            | op::WRITE_AND_VERIFY_12
            | op::WRITE_AND_VERIFY_16
            | op::WRITE_SAME_10
            | op::WRITE_SAME_16
            | op::UNMAP
            | op::COMPARE_AND_WRITE
            | op::ORWRITE_16
            | op::WRITE_ATOMIC_16
    )
}

/// LBA OUT OF RANGE unless `lba..lba+blocks` lies on the medium (SBC-3 §4.5).
fn check_range(d: &Disk, lba: u64, blocks: u64) -> Result<(), Fail> {
    match lba.checked_add(blocks) {
        Some(end) if end <= d.blocks() => Ok(()),
        _ => Err(sense::LBA_OUT_OF_RANGE.into()),
    }
}

fn check_transfer(d: &Disk, blocks: u32, len_byte: u16) -> Result<(), Fail> {
    if u64::from(blocks) * u64::from(d.block_size) > MAX_TRANSFER_BYTES {
        return Err(bad_cdb(len_byte, None));
    }
    Ok(())
}

fn transfer_len_byte(opcode: u8) -> u16 {
    match opcode {
        op::READ_6 | op::WRITE_6 => 4,
        op::READ_12 | op::WRITE_12 | op::VERIFY_12 | op::WRITE_AND_VERIFY_12 => 6,
        op::READ_16 | op::WRITE_16 | op::VERIFY_16 | op::WRITE_AND_VERIFY_16 | op::ORWRITE_16 => 10,
        _ => 7,
    }
}

fn byte_offset(d: &Disk, lba: u64) -> u64 {
    lba * u64::from(d.block_size)
}

fn read_error(d: &Disk, e: std::io::Error, offset: u64) -> Fail {
    if crate::backing::Fenced::is(&e) {
        tracing::info!(lun = d.def.lun, offset, reason = %e, "read fenced");
    } else {
        tracing::error!(lun = d.def.lun, offset, error = %e, "backing store read failed");
        crate::metrics::storage_error(crate::metrics::StorageOp::Read);
    }
    sense::UNRECOVERED_READ_ERROR.into()
}

/// A plain WRITE(10)/(16) a caller may carry out itself ([`crate::lu::TargetLus::admit_plain_write`]):
/// `Some((offset, bytes))` when it needs nothing but its data written at `offset` (no FUA, write
/// cache on, no protection information, writable, in range, whole blocks of Data-Out); `None`
/// for anything else, which the ordinary path executes and reports.
pub(crate) fn plain_write(lu: &LogicalUnit, d: &Disk, c: &[u8], data_out_len: usize) -> Option<(u64, usize)> {
    if !matches!(c.first(), Some(&op::WRITE_10) | Some(&op::WRITE_16)) {
        return None;
    }
    let io = cdb::block_io(c)?;
    if io.protect != 0 || io.fua || !lu.wce.load(Ordering::Relaxed) || d.def.read_only {
        return None;
    }
    check_range(d, io.lba, u64::from(io.blocks)).ok()?;
    check_transfer(d, io.blocks, transfer_len_byte(c[0])).ok()?;
    let want = io.blocks as usize * d.block_size as usize;
    if want == 0 || data_out_len < want {
        return None;
    }
    Some((byte_offset(d, io.lba), want))
}

pub(crate) fn write_error(d: &Disk, e: std::io::Error, offset: u64) -> Fail {
    if crate::backing::Fenced::is(&e) {
        tracing::info!(lun = d.def.lun, offset, reason = %e, "write fenced");
    } else {
        tracing::error!(lun = d.def.lun, offset, error = %e, "backing store write failed");
        crate::metrics::storage_error(crate::metrics::StorageOp::Write);
    }
    sense::WRITE_ERROR.into()
}

/// A failed flush: reported like a write error, counted as `op="flush"`.
fn flush_error(d: &Disk, e: std::io::Error) -> Fail {
    if crate::backing::Fenced::is(&e) {
        tracing::info!(lun = d.def.lun, reason = %e, "flush fenced");
    } else {
        tracing::error!(lun = d.def.lun, error = %e, "backing store flush failed");
        crate::metrics::storage_error(crate::metrics::StorageOp::Flush);
    }
    sense::WRITE_ERROR.into()
}

fn read_blocks(d: &Disk, lba: u64, blocks: u64) -> Result<Vec<u8>, Fail> {
    let offset = byte_offset(d, lba);
    let mut buf = vec![0u8; (blocks * u64::from(d.block_size)) as usize];
    d.store
        .read_at(&mut buf, offset)
        .map_err(|e| read_error(d, e, offset))?;
    Ok(buf)
}

fn read(d: &Disk, c: &[u8]) -> CmdResult {
    let Some(io) = cdb::block_io(c) else {
        return Err(sense::INVALID_COMMAND_OPERATION_CODE.into());
    };
    if io.protect != 0 {
        return Err(bad_cdb(1, Some(7)));
    }
    check_range(d, io.lba, u64::from(io.blocks))?;
    check_transfer(d, io.blocks, transfer_len_byte(c[0]))?;
    // Shared: a read never sees half of a COMPARE AND WRITE, ORWRITE or WRITE ATOMIC.
    let _shared = d
        .atomic
        .read()
        .map_err(|_| Fail::from(sense::INTERNAL_TARGET_FAILURE))?;
    read_blocks(d, io.lba, u64::from(io.blocks))
}

fn check_writable(d: &Disk) -> Result<(), Fail> {
    if d.def.read_only {
        Err(sense::WRITE_PROTECTED.into())
    } else {
        Ok(())
    }
}

/// Makes a write durable when FUA asks or the reported cache is write-through (WCE = 0).
fn maybe_flush(lu: &LogicalUnit, d: &Disk, fua: bool) -> Result<(), Fail> {
    if fua || !lu.wce.load(Ordering::Relaxed) {
        d.store.flush().map_err(|e| flush_error(d, e))?;
    }
    Ok(())
}

fn write(lu: &LogicalUnit, d: &Disk, c: &[u8], data_out: &[u8]) -> CmdResult {
    let Some(io) = cdb::block_io(c) else {
        return Err(sense::INVALID_COMMAND_OPERATION_CODE.into());
    };
    if io.protect != 0 {
        return Err(bad_cdb(1, Some(7)));
    }
    check_writable(d)?;
    check_range(d, io.lba, u64::from(io.blocks))?;
    check_transfer(d, io.blocks, transfer_len_byte(c[0]))?;
    // Data-Out may be shorter than the CDB's transfer length (whole blocks, checked above).
    let n = (io.blocks as usize * d.block_size as usize).min(data_out.len());
    if n == 0 {
        return Ok(Vec::new());
    }
    let offset = byte_offset(d, io.lba);
    {
        let _shared = d
            .atomic
            .read()
            .map_err(|_| Fail::from(sense::INTERNAL_TARGET_FAILURE))?;
        d.store
            .write_at(&data_out[..n], offset)
            .map_err(|e| write_error(d, e, offset))?;
    }
    maybe_flush(lu, d, io.fua)?;
    Ok(Vec::new())
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn miscompare(offset: usize) -> Fail {
    Sense::from(sense::MISCOMPARE_DURING_VERIFY)
        .with_information(offset as u64)
        .into()
}

/// VERIFY (SBC-3 §5.29): BYTCHK 00b checks the range only, 01b compares the Data-Out, 11b
/// compares one Data-Out block against every block.
fn verify(d: &Disk, c: &[u8], data_out: &[u8]) -> CmdResult {
    let Some(io) = cdb::block_io(c) else {
        return Err(sense::INVALID_COMMAND_OPERATION_CODE.into());
    };
    if io.protect != 0 {
        return Err(bad_cdb(1, Some(7)));
    }
    if io.bytchk == 2 {
        return Err(bad_cdb(1, Some(2)));
    }
    check_range(d, io.lba, u64::from(io.blocks))?;
    check_transfer(d, io.blocks, transfer_len_byte(c[0]))?;
    if io.bytchk == 0 || io.blocks == 0 {
        return Ok(Vec::new());
    }
    let medium = {
        let _shared = d
            .atomic
            .read()
            .map_err(|_| Fail::from(sense::INTERNAL_TARGET_FAILURE))?;
        read_blocks(d, io.lba, u64::from(io.blocks))?
    };
    let bs = d.block_size as usize;
    let diff = if io.bytchk == 1 {
        first_difference(&medium, &data_out[..medium.len()])
    } else {
        medium
            .chunks(bs)
            .enumerate()
            .find_map(|(i, blk)| first_difference(blk, &data_out[..bs]).map(|o| i * bs + o))
    };
    match diff {
        Some(o) => Err(miscompare(o)),
        None => Ok(Vec::new()),
    }
}

/// READ CAPACITY(10) (SBC-3 §5.15): FFFFFFFFh when the last LBA does not fit.
fn read_capacity10(d: &Disk, c: &[u8]) -> CmdResult {
    let pmi = cdb::u8_at(c, 8) & 0x01 != 0;
    if !pmi && cdb::u32_at(c, 2) != 0 {
        return Err(bad_cdb(2, None));
    }
    let last = d.blocks().saturating_sub(1);
    let mut data = Vec::with_capacity(8);
    data.extend_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
    data.extend_from_slice(&d.block_size.to_be_bytes());
    Ok(data)
}

/// READ CAPACITY(16) parameter data (SBC-3 §5.16): LBPME and LBPRZ when thin.
pub(crate) fn read_capacity16_data(d: &Disk) -> Vec<u8> {
    let mut data = vec![0u8; 32];
    data[0..8].copy_from_slice(&d.blocks().saturating_sub(1).to_be_bytes());
    data[8..12].copy_from_slice(&d.block_size.to_be_bytes());
    if d.def.thin {
        data[14] = 0x80 | 0x40;
    }
    data
}

fn read_capacity16(d: &Disk, c: &[u8]) -> CmdResult {
    Ok(truncate(read_capacity16_data(d), cdb::u32_at(c, 10) as usize))
}

/// GET LBA STATUS (SBC-3 §5.6): mapped/deallocated extents from the backing store.
fn get_lba_status(d: &Disk, c: &[u8]) -> CmdResult {
    let lba = cdb::u64_at(c, 2);
    let alloc = cdb::u32_at(c, 10) as usize;
    let total = d.blocks();
    if lba >= total {
        return Err(sense::LBA_OUT_OF_RANGE.into());
    }
    let bs = u64::from(d.block_size);
    let max_descriptors = (alloc.saturating_sub(8) / 16).clamp(1, 64);
    let mut data = vec![0u8; 8];
    let mut at = lba;
    while at < total && (data.len() - 8) / 16 < max_descriptors {
        let remaining = (total - at).min(u64::from(u32::MAX));
        let (mapped, run) = d
            .store
            .is_mapped(at * bs, remaining * bs)
            .map_err(|e| read_error(d, e, at * bs))?;
        let blocks = (run / bs).clamp(1, remaining);
        data.extend_from_slice(&at.to_be_bytes());
        data.extend_from_slice(&(blocks as u32).to_be_bytes());
        data.push(if mapped { 0 } else { 1 });
        data.extend_from_slice(&[0, 0, 0]);
        at += blocks;
    }
    let n = (data.len() - 4) as u32;
    data[0..4].copy_from_slice(&n.to_be_bytes());
    Ok(truncate(data, alloc))
}

/// SYNCHRONIZE CACHE(10)/(16) (SBC-3 §5.22): range checked, then the whole store is flushed.
fn synchronize_cache(d: &Disk, c: &[u8]) -> CmdResult {
    let (lba, blocks) = if c[0] == op::SYNCHRONIZE_CACHE_10 {
        (u64::from(cdb::u32_at(c, 2)), u64::from(cdb::u16_at(c, 7)))
    } else {
        (cdb::u64_at(c, 2), u64::from(cdb::u32_at(c, 10)))
    };
    check_range(d, lba, blocks)?;
    d.store.flush().map_err(|e| flush_error(d, e))?;
    Ok(Vec::new())
}

/// WRITE SAME(10)/(16) (SBC-3 §5.41, §5.42). WSNZ = 1: zero blocks is refused. (WSNZ = 0, "to
/// the end of the medium", is not offered: libiscsi's test_writesame10_unmap_until_end sends a
/// block of FFh with UNMAP = 1 and expects zeros back, which a device server that honours the
/// Data-Out, as SBC requires, cannot give.)
fn write_same(lu: &LogicalUnit, d: &Disk, c: &[u8], data_out: &[u8]) -> CmdResult {
    let ten = c[0] == op::WRITE_SAME_10;
    let b1 = cdb::u8_at(c, 1);
    let (lba, blocks, len_byte) = if ten {
        (u64::from(cdb::u32_at(c, 2)), u64::from(cdb::u16_at(c, 7)), 7)
    } else {
        (cdb::u64_at(c, 2), u64::from(cdb::u32_at(c, 10)), 10)
    };
    let unmap = b1 & 0x08 != 0;
    let ndob = !ten && b1 & 0x01 != 0;
    if b1 >> 5 != 0 {
        return Err(bad_cdb(1, Some(7)));
    }
    if b1 & 0x10 != 0 {
        // ANCHOR: anchored state not supported (ANC_SUP = 0).
        return Err(bad_cdb(1, Some(4)));
    }
    if b1 & 0x06 != 0 {
        return Err(bad_cdb(1, Some(2)));
    }
    if unmap && !d.def.thin {
        // LBPWS = LBPWS10 = 0: no unmap through WRITE SAME (SBC-3 §5.41).
        return Err(bad_cdb(1, Some(3)));
    }
    if blocks == 0 || blocks > MAX_WRITE_SAME_BLOCKS {
        return Err(bad_cdb(len_byte, None));
    }
    let bs = d.block_size as usize;
    if !ndob && data_out.len() != bs {
        return Err(bad_cdb(len_byte, None));
    }
    check_writable(d)?;
    check_range(d, lba, blocks)?;
    let block: Vec<u8> = if ndob { vec![0; bs] } else { data_out[..bs].to_vec() };
    let offset = byte_offset(d, lba);
    let len = blocks * bs as u64;
    let _shared = d
        .atomic
        .read()
        .map_err(|_| Fail::from(sense::INTERNAL_TARGET_FAILURE))?;
    if unmap && d.def.thin && block.iter().all(|&b| b == 0) {
        d.store.punch_hole(offset, len).map_err(|e| write_error(d, e, offset))?;
    } else {
        const CHUNK_BLOCKS: u64 = 256;
        let chunk: Vec<u8> = block
            .iter()
            .copied()
            .cycle()
            .take(bs * CHUNK_BLOCKS.min(blocks) as usize)
            .collect();
        let mut done = 0u64;
        while done < blocks {
            let n = CHUNK_BLOCKS.min(blocks - done);
            let at = offset + done * bs as u64;
            d.store
                .write_at(&chunk[..n as usize * bs], at)
                .map_err(|e| write_error(d, e, at))?;
            done += n;
        }
    }
    drop(_shared);
    maybe_flush(lu, d, false)?;
    Ok(Vec::new())
}

/// UNMAP (SBC-3 §5.28).
fn unmap(d: &Disk, c: &[u8], data_out: &[u8]) -> CmdResult {
    if !d.def.thin {
        return Err(sense::INVALID_COMMAND_OPERATION_CODE.into());
    }
    if cdb::u8_at(c, 1) & 0x01 != 0 {
        return Err(bad_cdb(1, Some(0)));
    }
    let len = usize::from(cdb::u16_at(c, 7));
    if len == 0 {
        return Ok(Vec::new());
    }
    check_writable(d)?;
    let p = &data_out[..len];
    if len < 8 {
        return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let descriptors_len = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if descriptors_len % 16 != 0 || 8 + descriptors_len > len {
        return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let count = descriptors_len / 16;
    if count > MAX_UNMAP_DESCRIPTORS as usize {
        return Err(Sense::param_field(sense::INVALID_FIELD_IN_PARAMETER_LIST, 2, None).into());
    }
    let ranges: Vec<(u64, u64)> = p[8..8 + descriptors_len]
        .chunks_exact(16)
        .map(|x| (cdb::u64_at(x, 0), u64::from(cdb::u32_at(x, 8))))
        .collect();
    for &(lba, blocks) in &ranges {
        check_range(d, lba, blocks)?;
    }
    let bs = u64::from(d.block_size);
    let _shared = d
        .atomic
        .read()
        .map_err(|_| Fail::from(sense::INTERNAL_TARGET_FAILURE))?;
    for (lba, blocks) in ranges {
        if blocks > 0 {
            d.store
                .punch_hole(lba * bs, blocks * bs)
                .map_err(|e| write_error(d, e, lba * bs))?;
        }
    }
    Ok(Vec::new())
}

/// COMPARE AND WRITE (SBC-3 §5.2): atomic against every other write to the LU; MISCOMPARE
/// reports the offset of the first differing byte in INFORMATION.
fn compare_and_write(lu: &LogicalUnit, d: &Disk, c: &[u8], data_out: &[u8]) -> CmdResult {
    let b1 = cdb::u8_at(c, 1);
    if b1 >> 5 != 0 {
        return Err(bad_cdb(1, Some(7)));
    }
    let lba = cdb::u64_at(c, 2);
    let blocks = cdb::u8_at(c, 13);
    if u32::from(blocks) > u32::from(MAX_COMPARE_AND_WRITE_BLOCKS) {
        return Err(bad_cdb(13, None));
    }
    let n = usize::from(blocks) * d.block_size as usize;
    if data_out.len() != 2 * n {
        return Err(bad_cdb(13, None));
    }
    check_writable(d)?;
    check_range(d, lba, u64::from(blocks))?;
    if blocks == 0 {
        return Ok(Vec::new());
    }
    let offset = byte_offset(d, lba);
    {
        let _exclusive = d
            .atomic
            .write()
            .map_err(|_| Fail::from(sense::INTERNAL_TARGET_FAILURE))?;
        let medium = read_blocks(d, lba, u64::from(blocks))?;
        if let Some(o) = first_difference(&medium, &data_out[..n]) {
            return Err(miscompare(o));
        }
        d.store
            .write_at(&data_out[n..2 * n], offset)
            .map_err(|e| write_error(d, e, offset))?;
    }
    maybe_flush(lu, d, b1 & 0x08 != 0)?;
    Ok(Vec::new())
}

/// WRITE ATOMIC(16) CDB offsets (SBC-4): ATOMIC BOUNDARY and a 2-byte TRANSFER LENGTH.
const WRITE_ATOMIC_BOUNDARY: usize = 10;
const WRITE_ATOMIC_TRANSFER_LEN: usize = 12;

/// ORWRITE(16) (SBC-3): the Data-Out is ORed into the medium. The read, the OR and the write
/// hold the LU's atomicity lock exclusively, as COMPARE AND WRITE does. FUA_NV is ignored (no
/// non-volatile cache).
fn orwrite(lu: &LogicalUnit, d: &Disk, c: &[u8], data_out: &[u8]) -> CmdResult {
    let Some(io) = cdb::block_io(c) else {
        return Err(sense::INVALID_COMMAND_OPERATION_CODE.into());
    };
    if io.protect != 0 {
        // ORPROTECT: no protection information.
        return Err(bad_cdb(1, Some(7)));
    }
    check_range(d, io.lba, u64::from(io.blocks))?;
    check_transfer(d, io.blocks, transfer_len_byte(c[0]))?;
    if io.blocks == 0 {
        return Ok(Vec::new());
    }
    let n = io.blocks as usize * d.block_size as usize;
    let offset = byte_offset(d, io.lba);
    {
        let _exclusive = d
            .atomic
            .write()
            .map_err(|_| Fail::from(sense::INTERNAL_TARGET_FAILURE))?;
        let mut medium = read_blocks(d, io.lba, u64::from(io.blocks))?;
        for (m, x) in medium.iter_mut().zip(&data_out[..n]) {
            *m |= x;
        }
        d.store
            .write_at(&medium, offset)
            .map_err(|e| write_error(d, e, offset))?;
    }
    maybe_flush(lu, d, io.fua)?;
    Ok(Vec::new())
}

/// WRITE ATOMIC(16) (SBC-4): the write is one positioned write under the LU's atomicity lock,
/// held exclusively, so no read or other write sees part of it. The range is checked first (as
/// libiscsi expects LBA OUT OF RANGE for over-long writes past the end), then the VPD B0h
/// limits: at most MAXIMUM ATOMIC TRANSFER LENGTH blocks, LBA a multiple of ATOMIC ALIGNMENT and
/// length a multiple of ATOMIC TRANSFER LENGTH GRANULARITY, else INVALID FIELD IN CDB. ATOMIC
/// BOUNDARY must be zero (MAXIMUM ATOMIC BOUNDARY SIZE is zero).
fn write_atomic(lu: &LogicalUnit, d: &Disk, c: &[u8], data_out: &[u8]) -> CmdResult {
    let b1 = cdb::u8_at(c, 1);
    if b1 >> 5 != 0 {
        return Err(bad_cdb(1, Some(7)));
    }
    let lba = cdb::u64_at(c, 2);
    let blocks = u32::from(cdb::u16_at(c, WRITE_ATOMIC_TRANSFER_LEN));
    if cdb::u16_at(c, WRITE_ATOMIC_BOUNDARY) != 0 {
        return Err(bad_cdb(WRITE_ATOMIC_BOUNDARY as u16, None));
    }
    check_range(d, lba, u64::from(blocks))?;
    let unit = atomic_granularity(d);
    if blocks > max_atomic_transfer_blocks(d) || !blocks.is_multiple_of(unit) {
        return Err(bad_cdb(WRITE_ATOMIC_TRANSFER_LEN as u16, None));
    }
    if !lba.is_multiple_of(u64::from(unit)) {
        return Err(bad_cdb(2, None));
    }
    if blocks == 0 {
        return Ok(Vec::new());
    }
    let n = blocks as usize * d.block_size as usize;
    let offset = byte_offset(d, lba);
    {
        let _exclusive = d
            .atomic
            .write()
            .map_err(|_| Fail::from(sense::INTERNAL_TARGET_FAILURE))?;
        d.store
            .write_at(&data_out[..n], offset)
            .map_err(|e| write_error(d, e, offset))?;
    }
    maybe_flush(lu, d, b1 & 0x08 != 0)?;
    Ok(Vec::new())
}

/// PRE-FETCH(10)/(16) (SBC-3): the range is checked and nothing else is done; the backing
/// store's page cache serves later reads. The status is GOOD, not CONDITION MET: the device
/// server has no cache of its own that it could promise holds the blocks (SBC-3 allows GOOD when
/// the cache cannot take them all). IMMED and GROUP NUMBER change nothing.
fn pre_fetch(d: &Disk, c: &[u8]) -> CmdResult {
    let (lba, blocks) = if c[0] == op::PRE_FETCH_10 {
        (u64::from(cdb::u32_at(c, 2)), u64::from(cdb::u16_at(c, 7)))
    } else {
        (cdb::u64_at(c, 2), u64::from(cdb::u32_at(c, 10)))
    };
    check_range(d, lba, blocks)?;
    Ok(Vec::new())
}

/// READ DEFECT DATA(10)/(12) parameter data bits (SBC-3): PLISTV / GLISTV sit where the CDB has
/// REQ_PLIST / REQ_GLIST, followed by the DEFECT LIST FORMAT.
const DEFECT_LIST_FLAGS: u8 = 0x1f;
const DEFECT_LIST_FORMAT: u8 = 0x07;
const DEFECT_LIST_FORMAT_RESERVED: u8 = 0x07;

/// READ DEFECT DATA(10)/(12) (SBC-3): a virtual disk has no defects. The requested primary and
/// grown lists are returned valid and empty, in the requested format, so the parameter data is
/// the header alone (4 bytes for (10), 8 for (12)).
fn read_defect_data(c: &[u8]) -> CmdResult {
    let twelve = c[0] == op::READ_DEFECT_DATA_12;
    let (flags_byte, alloc) = if twelve {
        (1, cdb::u32_at(c, 6) as usize)
    } else {
        (2, usize::from(cdb::u16_at(c, 7)))
    };
    let flags = cdb::u8_at(c, flags_byte);
    if flags & DEFECT_LIST_FORMAT == DEFECT_LIST_FORMAT_RESERVED {
        return Err(bad_cdb(flags_byte as u16, Some(2)));
    }
    let mut data = vec![0, flags & DEFECT_LIST_FLAGS, 0, 0];
    if twelve {
        // GENERATION CODE (SBC-4) 0, then the 4-byte DEFECT LIST LENGTH 0.
        data.extend_from_slice(&[0; 4]);
    }
    Ok(truncate(data, alloc))
}
