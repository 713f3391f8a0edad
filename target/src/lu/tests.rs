//! Behaviour of the logical units over in-memory and file stores (SPC-4, SBC-3).

use super::*;
use crate::backing::{Fault, FaultOp, FaultyStore};
use crate::catalog::derive_naa;
use raftsan_proto::scsi::sense::key;
use std::sync::Arc;

const BS: u32 = 512;
const BLOCKS: u64 = 2048;

fn def(lun: u64) -> LunDef {
    LunDef {
        lun,
        backing: Backing::Memory {
            size_bytes: BLOCKS * u64::from(BS),
        },
        serial: "beaf10".into(),
        naa: derive_naa("iqn.2024-01.test:t", lun),
        vendor: "RAFTSAN".into(),
        product: "VDISK".into(),
        revision: "0001".into(),
        block_size: BS,
        read_only: false,
        thin: true,
        write_cache: true,
    }
}

fn target_with(d: LunDef, store: Box<dyn BackingStore>) -> TargetLus {
    TargetLus::with_stores("iqn.2024-01.test:t", vec![(d, store)]).unwrap()
}

fn target() -> TargetLus {
    target_with(def(1), Box::new(MemStore::new(BLOCKS * u64::from(BS))))
}

fn nexus(id: u64) -> Nexus {
    Nexus {
        id,
        initiator_name: "iqn.2024-01.test:i".into(),
        initiator_port: format!("iqn.2024-01.test:i,i,0x00023d00000{id}"),
        isid: [0, 2, 0x3d, 0, 0, id as u8],
        tsih: id as u16,
        target_port: TargetPort {
            target_name: "iqn.2024-01.test:t".into(),
            tpgt: 1,
            relative_port_id: 1,
            port_group: 1,
        },
    }
}

fn run(t: &TargetLus, n: &Nexus, lun: u64, cdb: &[u8], data_out: &[u8]) -> Outcome {
    let cmd = Command {
        lun,
        cdb,
        data_out,
        expected_transfer_len: data_out.len() as u32,
        task_attr: 0,
    };
    t.execute_sync(n, &cmd)
}

/// (key, asc, ascq) of a CHECK CONDITION in fixed format.
fn sense_of(o: &Outcome) -> (u8, u8, u8) {
    assert_eq!(o.status, status::CHECK_CONDITION, "{o:?}");
    let s = o.sense.as_ref().unwrap();
    assert_eq!(s[0] & 0x7f, 0x70);
    (s[2] & 0x0f, s[12], s[13])
}

fn good(o: &Outcome) {
    assert_eq!(o.status, status::GOOD, "{o:?}");
}

fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![op::READ_10, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&blocks.to_be_bytes());
    c.push(0);
    c
}

fn write10(lba: u32, blocks: u16, flags: u8) -> Vec<u8> {
    let mut c = read10(lba, blocks);
    c[0] = op::WRITE_10;
    c[1] = flags;
    c
}

fn rw16(opcode: u8, lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![opcode, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&blocks.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

#[test]
fn write_read_round_trip() {
    let t = target();
    let n = nexus(1);
    let data: Vec<u8> = (0..2 * BS).map(|i| i as u8).collect();
    let o = run(&t, &n, 1, &write10(5, 2, 0), &data);
    good(&o);
    assert_eq!(o.scsi_transfer_len, Some(2 * BS));
    let o = run(&t, &n, 1, &read10(5, 2), &[]);
    good(&o);
    assert_eq!(o.data_in, data);
    // READ(6) transfer length 0 means 256 blocks (SBC-3 §5.8).
    let o = run(&t, &n, 1, &[op::READ_6, 0, 0, 0, 0, 0], &[]);
    assert_eq!(o.data_in.len(), 256 * BS as usize);
}

/// SBC-3 §4.5: LBA OUT OF RANGE for any block past the end, including a 0-length one beyond it.
#[test]
fn out_of_range() {
    let t = target();
    let n = nexus(1);
    assert_eq!(
        sense_of(&run(&t, &n, 1, &read10(BLOCKS as u32 - 1, 2), &[])),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
    assert_eq!(
        sense_of(&run(&t, &n, 1, &read10(BLOCKS as u32 + 1, 0), &[])),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
    good(&run(&t, &n, 1, &read10(BLOCKS as u32 - 1, 1), &[]));
    let o = run(&t, &n, 1, &rw16(op::READ_16, u64::MAX, 1), &[]);
    assert_eq!(sense_of(&o), (key::ILLEGAL_REQUEST, 0x21, 0));
    let o = run(&t, &n, 1, &write10(BLOCKS as u32, 1, 0), &[0; BS as usize]);
    assert_eq!(sense_of(&o), (key::ILLEGAL_REQUEST, 0x21, 0));
    // RDPROTECT without protection information: INVALID FIELD IN CDB.
    let mut c = read10(0, 1);
    c[1] = 0x20;
    assert_eq!(sense_of(&run(&t, &n, 1, &c, &[])), (key::ILLEGAL_REQUEST, 0x24, 0));
}

/// FUA flushes: a failing flush turns a FUA write into a write error, a plain one stays GOOD.
#[test]
fn fua_flushes() {
    let store = Arc::new(FaultyStore::new(MemStore::new(BLOCKS * u64::from(BS))));
    store.inject(Fault {
        op: FaultOp::Flush,
        after_ops: 0,
        range: None,
        errno: libc::EIO,
    });
    let t = target_with(def(1), Box::new(store.clone()));
    let n = nexus(1);
    good(&run(&t, &n, 1, &write10(0, 1, 0), &[1; BS as usize]));
    let o = run(&t, &n, 1, &write10(0, 1, 0x08), &[1; BS as usize]);
    assert_eq!(sense_of(&o), (key::MEDIUM_ERROR, 0x0c, 0));
}

#[test]
fn storage_errors_are_medium_errors() {
    let store = Arc::new(FaultyStore::new(MemStore::new(BLOCKS * u64::from(BS))));
    let t = target_with(def(1), Box::new(store.clone()));
    let n = nexus(1);
    store.inject(Fault {
        op: FaultOp::Read,
        after_ops: 0,
        range: Some((0, 512)),
        errno: libc::EIO,
    });
    store.inject(Fault {
        op: FaultOp::Write,
        after_ops: 0,
        range: Some((512, 1024)),
        errno: libc::EIO,
    });
    assert_eq!(
        sense_of(&run(&t, &n, 1, &read10(0, 1), &[])),
        (key::MEDIUM_ERROR, 0x11, 0)
    );
    good(&run(&t, &n, 1, &read10(2, 1), &[]));
    assert_eq!(
        sense_of(&run(&t, &n, 1, &write10(1, 1, 0), &[0; 512])),
        (key::MEDIUM_ERROR, 0x0c, 0)
    );
}

/// Residuals: less Data-Out than the CDB calls for writes nothing (FCP-4 §9.4.2 b); more is cut.
#[test]
fn short_and_long_data_out() {
    let t = target();
    let n = nexus(1);
    let o = run(&t, &n, 1, &write10(0, 2, 0), &[7; 600]);
    assert_eq!(sense_of(&o), (key::ILLEGAL_REQUEST, 0x0e, 0x03));
    assert_eq!(o.scsi_transfer_len, Some(1024));
    assert_eq!(run(&t, &n, 1, &read10(0, 1), &[]).data_in, vec![0; 512]);
    good(&run(&t, &n, 1, &write10(0, 1, 0), &[9; 1024]));
    assert_eq!(run(&t, &n, 1, &read10(0, 2), &[]).data_in[511..513], [9, 0]);
    // EDTL of whole blocks below the transfer length: only those blocks are written
    // (RFC 7143 §11.4.5.2 overflow; libiscsi test_write10_residuals).
    let o = run(&t, &n, 1, &write10(0, 2, 0), &[5; 512]);
    good(&o);
    assert_eq!(o.scsi_transfer_len, Some(1024));
    assert_eq!(run(&t, &n, 1, &read10(0, 2), &[]).data_in[511..513], [5, 0]);
    // No Data-Out at all (EDTL 0): nothing is written, GOOD.
    good(&run(&t, &n, 1, &write10(1, 1, 0), &[]));
    assert_eq!(run(&t, &n, 1, &read10(1, 1), &[]).data_in, vec![0; 512]);
}

/// SBC-3 §5.2: COMPARE AND WRITE writes on match, MISCOMPARE with the offset otherwise.
#[test]
fn compare_and_write() {
    let t = target();
    let n = nexus(1);
    good(&run(&t, &n, 1, &write10(3, 1, 0), &[b'A'; 512]));
    let mut cdb = [0u8; 16];
    cdb[0] = op::COMPARE_AND_WRITE;
    cdb[2..10].copy_from_slice(&3u64.to_be_bytes());
    cdb[13] = 1;
    let mut data = vec![b'A'; 512];
    data.extend_from_slice(&[b'B'; 512]);
    good(&run(&t, &n, 1, &cdb, &data));
    assert_eq!(run(&t, &n, 1, &read10(3, 1), &[]).data_in, vec![b'B'; 512]);
    // Now the medium holds 'B': compare data 'B' except byte 100.
    let mut data = vec![b'B'; 512];
    data[100] = b'Z';
    data.extend_from_slice(&[b'C'; 512]);
    let o = run(&t, &n, 1, &cdb, &data);
    assert_eq!(sense_of(&o), (key::MISCOMPARE, 0x1d, 0));
    let s = o.sense.unwrap();
    assert_eq!(s[0], 0xf0);
    assert_eq!(&s[3..7], &[0, 0, 0, 100]);
    assert_eq!(run(&t, &n, 1, &read10(3, 1), &[]).data_in, vec![b'B'; 512]);
    // Too much Data-Out for NUMBER OF LOGICAL BLOCKS.
    let o = run(&t, &n, 1, &cdb, &[0; 2048]);
    assert_eq!(sense_of(&o).0, key::ILLEGAL_REQUEST);
}

/// SBC-3 §5.29: VERIFY with BYTCHK 01b reports the first differing byte.
#[test]
fn verify_miscompare() {
    let t = target();
    let n = nexus(1);
    good(&run(&t, &n, 1, &write10(0, 2, 0), &[5; 1024]));
    let mut c = read10(0, 2);
    c[0] = op::VERIFY_10;
    c[1] = 0x02;
    good(&run(&t, &n, 1, &c, &[5; 1024]));
    let mut d = vec![5; 1024];
    d[700] = 6;
    let o = run(&t, &n, 1, &c, &d);
    assert_eq!(sense_of(&o), (key::MISCOMPARE, 0x1d, 0));
    assert_eq!(&o.sense.unwrap()[3..7], &[0, 0, 0x02, 0xbc]);
    c[1] = 0;
    good(&run(&t, &n, 1, &c, &[]));
}

/// SBC-3 §5.41: WRITE SAME fills, WSNZ refuses 0 blocks, wrong Data-Out size refused.
#[test]
fn write_same() {
    let t = target();
    let n = nexus(1);
    let mut c = read10(10, 4);
    c[0] = op::WRITE_SAME_10;
    good(&run(&t, &n, 1, &c, &[0x5a; 512]));
    assert_eq!(run(&t, &n, 1, &read10(10, 5), &[]).data_in[..2048], [0x5a; 2048]);
    assert_eq!(run(&t, &n, 1, &read10(14, 1), &[]).data_in, vec![0; 512]);
    // WSNZ = 1 (SBC-3 §6.6.3): zero blocks is INVALID FIELD IN CDB pointing at the length.
    let o = run(&t, &n, 1, &write_same10(0, 0), &[0; 512]);
    assert_eq!(
        o.sense.unwrap(),
        [0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0xc0, 0, 7]
    );
    let o = run(&t, &n, 1, &write_same16(0, 0), &[0; 512]);
    assert_eq!(sense_of(&o), (key::ILLEGAL_REQUEST, 0x24, 0));
    assert_eq!(sense_of(&run(&t, &n, 1, &c, &[0; 1024])).0, key::ILLEGAL_REQUEST);
    assert_eq!(sense_of(&run(&t, &n, 1, &c, &[0; 256])).0, key::ILLEGAL_REQUEST);
    let mut anchor = c.clone();
    anchor[1] = 0x10;
    assert_eq!(
        sense_of(&run(&t, &n, 1, &anchor, &[0; 512])),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
    // UNMAP bit with zero data on a thin LU deallocates.
    c[1] = 0x08;
    good(&run(&t, &n, 1, &c, &[0; 512]));
    assert_eq!(run(&t, &n, 1, &read10(10, 4), &[]).data_in, vec![0; 2048]);
}

fn write_same10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = read10(lba, blocks);
    c[0] = op::WRITE_SAME_10;
    c
}

fn write_same16(lba: u64, blocks: u32) -> Vec<u8> {
    rw16(op::WRITE_SAME_16, lba, blocks)
}

fn pre_fetch10(lba: u32, blocks: u16, immed: bool) -> Vec<u8> {
    let mut c = read10(lba, blocks);
    c[0] = op::PRE_FETCH_10;
    c[1] = if immed { 0x02 } else { 0 };
    c
}

/// SBC-3 PRE-FETCH(10)/(16): GOOD for a range on the medium (with or without IMMED), LBA OUT OF
/// RANGE past the end, even for zero blocks.
#[test]
fn pre_fetch() {
    let t = target();
    let n = nexus(1);
    for c in [
        pre_fetch10(0, 0, false),
        pre_fetch10(0, 256, false),
        pre_fetch10(BLOCKS as u32 - 256, 256, true),
        rw16(op::PRE_FETCH_16, BLOCKS - 1, 1),
        rw16(op::PRE_FETCH_16, BLOCKS, 0),
    ] {
        let o = run(&t, &n, 1, &c, &[]);
        assert_eq!(o, Outcome::good(Vec::new()));
    }
    for c in [
        pre_fetch10(BLOCKS as u32 + 1, 0, false),
        pre_fetch10(BLOCKS as u32 - 1, 2, false),
        pre_fetch10(u32::MAX, 1, true),
        rw16(op::PRE_FETCH_16, 1 << 63, 1),
        rw16(op::PRE_FETCH_16, u64::MAX, 0),
    ] {
        let o = run(&t, &n, 1, &c, &[]);
        assert_eq!(sense_of(&o), (key::ILLEGAL_REQUEST, 0x21, 0));
    }
}

/// SBC-3 READ DEFECT DATA(10)/(12): empty lists, PLISTV/GLISTV and the format echoed, cut to the
/// allocation length; the reserved format 111b is refused.
#[test]
fn read_defect_data() {
    let t = target();
    let n = nexus(1);
    let rdd10 = |flags: u8, alloc: u16| {
        let mut c = vec![op::READ_DEFECT_DATA_10, 0, flags, 0, 0, 0, 0];
        c.extend_from_slice(&alloc.to_be_bytes());
        c.push(0);
        c
    };
    let rdd12 = |flags: u8, alloc: u32| {
        let mut c = vec![op::READ_DEFECT_DATA_12, flags, 0, 0, 0, 0];
        c.extend_from_slice(&alloc.to_be_bytes());
        c.extend_from_slice(&[0, 0]);
        c
    };
    assert_eq!(run(&t, &n, 1, &rdd10(0, 32), &[]).data_in, [0, 0, 0, 0]);
    // REQ_PLIST, REQ_GLIST, long block format 011b.
    assert_eq!(run(&t, &n, 1, &rdd10(0x1b, 32), &[]).data_in, [0, 0x1b, 0, 0]);
    assert_eq!(run(&t, &n, 1, &rdd10(0x1b, 2), &[]).data_in, [0, 0x1b]);
    assert_eq!(run(&t, &n, 1, &rdd10(0x1b, 0), &[]), Outcome::good(Vec::new()));
    assert_eq!(
        run(&t, &n, 1, &rdd10(0x07, 32), &[]).sense.unwrap(),
        [0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0xca, 0, 2]
    );
    assert_eq!(
        run(&t, &n, 1, &rdd12(0x0c, 32), &[]).data_in,
        [0, 0x0c, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(run(&t, &n, 1, &rdd12(0, 5), &[]).data_in, [0; 5]);
    assert_eq!(
        sense_of(&run(&t, &n, 1, &rdd12(0x1f, 32), &[])),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
}

fn orwrite(lba: u64, blocks: u32, flags: u8) -> Vec<u8> {
    let mut c = rw16(op::ORWRITE_16, lba, blocks);
    c[1] = flags;
    c
}

/// SBC-3 ORWRITE(16): the Data-Out is ORed into the medium; range, ORPROTECT and Data-Out size
/// checked; a failing FUA flush is a write error.
#[test]
fn orwrite16() {
    let store = Arc::new(FaultyStore::new(MemStore::new(BLOCKS * u64::from(BS))));
    let t = target_with(def(1), Box::new(store.clone()));
    let n = nexus(1);
    good(&run(&t, &n, 1, &write10(4, 2, 0), &[0x0f; 1024]));
    let mut data = vec![0xa0; 1024];
    data[1023] = 0x30;
    let o = run(&t, &n, 1, &orwrite(4, 2, 0), &data);
    good(&o);
    assert_eq!(o.scsi_transfer_len, Some(1024));
    let mut want = vec![0xaf; 1024];
    want[1023] = 0x3f;
    assert_eq!(run(&t, &n, 1, &read10(4, 2), &[]).data_in, want);
    // Neighbours untouched; DPO and FUA accepted.
    assert_eq!(run(&t, &n, 1, &read10(6, 1), &[]).data_in, vec![0; 512]);
    good(&run(&t, &n, 1, &orwrite(6, 1, 0x18), &[0x01; 512]));
    assert_eq!(run(&t, &n, 1, &read10(6, 1), &[]).data_in, vec![0x01; 512]);
    good(&run(&t, &n, 1, &orwrite(0, 0, 0), &[]));
    for (lba, blocks) in [(BLOCKS + 1, 0), (1 << 63, 0), (u64::MAX, 1), (BLOCKS - 1, 2)] {
        let data = vec![0xa6; blocks as usize * 512];
        let o = run(&t, &n, 1, &orwrite(lba, blocks, 0), &data);
        assert_eq!(sense_of(&o), (key::ILLEGAL_REQUEST, 0x21, 0));
    }
    for protect in 1..8u8 {
        let o = run(&t, &n, 1, &orwrite(0, 1, protect << 5), &[0; 512]);
        assert_eq!(sense_of(&o), (key::ILLEGAL_REQUEST, 0x24, 0));
    }
    // Short Data-Out: nothing is written (FCP-4 §9.4.2 b).
    let o = run(&t, &n, 1, &orwrite(8, 2, 0), &[0xff; 512]);
    assert_eq!(sense_of(&o), (key::ILLEGAL_REQUEST, 0x0e, 0x03));
    assert_eq!(run(&t, &n, 1, &read10(8, 1), &[]).data_in, vec![0; 512]);
    store.inject(Fault {
        op: FaultOp::Flush,
        after_ops: 0,
        range: None,
        errno: libc::EIO,
    });
    let o = run(&t, &n, 1, &orwrite(0, 1, 0x08), &[1; 512]);
    assert_eq!(sense_of(&o), (key::MEDIUM_ERROR, 0x0c, 0));
}

fn write_atomic(lba: u64, blocks: u16, flags: u8) -> Vec<u8> {
    let mut c = vec![op::WRITE_ATOMIC_16, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c.extend_from_slice(&blocks.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

/// SBC-4 WRITE ATOMIC(16) with 512-byte blocks: the block limits page reports MAXIMUM ATOMIC
/// TRANSFER LENGTH 256, ATOMIC ALIGNMENT 8 and granularity 8; writes obeying them land, others
/// are INVALID FIELD IN CDB, and the range is checked first.
#[test]
fn write_atomic16() {
    let t = target();
    let n = nexus(1);
    let o = run(&t, &n, 1, &[op::INQUIRY, 1, 0xb0, 0, 255, 0], &[]);
    assert_eq!(
        &o.data_in[44..64],
        &[0, 0, 1, 0, 0, 0, 0, 8, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(o.data_in[4], 1, "WSNZ");
    let data: Vec<u8> = (0..8 * 512).map(|i| (i / 512) as u8 + 1).collect();
    let o = run(&t, &n, 1, &write_atomic(8, 8, 0), &data);
    good(&o);
    assert_eq!(o.scsi_transfer_len, Some(8 * 512));
    assert_eq!(run(&t, &n, 1, &read10(8, 8), &[]).data_in, data);
    good(&run(
        &t,
        &n,
        1,
        &write_atomic(BLOCKS - 256, 256, 0x18),
        &vec![3; 256 * 512],
    ));
    good(&run(&t, &n, 1, &write_atomic(0, 0, 0), &[]));
    let invalid = |c: &[u8], data: &[u8], byte: u8| {
        let o = run(&t, &n, 1, c, data);
        let s = o.sense.unwrap();
        assert_eq!((s[2], s[12], s[13]), (key::ILLEGAL_REQUEST, 0x24, 0));
        assert_eq!(s[17], byte, "field pointer");
    };
    invalid(&write_atomic(1, 8, 0), &data, 2);
    invalid(&write_atomic(0, 1, 0), &data[..512], 12);
    invalid(&write_atomic(0, 264, 0), &vec![0; 264 * 512], 12);
    let mut boundary = write_atomic(0, 8, 0);
    boundary[11] = 8;
    invalid(&boundary, &data, 10);
    for protect in 1..8u8 {
        invalid(&write_atomic(0, 8, protect << 5), &data, 1);
    }
    assert_eq!(run(&t, &n, 1, &read10(0, 1), &[]).data_in, vec![0; 512]);
    // Out of range wins over the length limit (libiscsi test_writeatomic16_beyond_eol).
    for (lba, blocks) in [(BLOCKS - 256, 512), (1 << 63, 8), (u64::MAX - 7, 8), (BLOCKS + 8, 0)] {
        let data = vec![0xa6; blocks as usize * 512];
        let o = run(&t, &n, 1, &write_atomic(lba, blocks, 0), &data);
        assert_eq!(sense_of(&o), (key::ILLEGAL_REQUEST, 0x21, 0));
    }
}

/// Read-only LUs refuse ORWRITE and WRITE ATOMIC with DATA PROTECT; READ DEFECT DATA and
/// PRE-FETCH still work.
#[test]
fn read_only_new_commands() {
    let mut d = def(1);
    d.read_only = true;
    let t = target_with(d, Box::new(MemStore::new(BLOCKS * u64::from(BS))));
    let n = nexus(1);
    for (c, data) in [
        (orwrite(0, 1, 0), vec![0; 512]),
        (write_atomic(0, 8, 0), vec![0; 8 * 512]),
        (write_same10(0, 1), vec![0; 512]),
    ] {
        assert_eq!(sense_of(&run(&t, &n, 1, &c, &data)), (key::DATA_PROTECT, 0x27, 0));
    }
    good(&run(&t, &n, 1, &pre_fetch10(0, 1, false), &[]));
    good(&run(
        &t,
        &n,
        1,
        &[op::READ_DEFECT_DATA_10, 0, 0, 0, 0, 0, 0, 0, 4, 0],
        &[],
    ));
}

/// ORWRITE, WRITE ATOMIC and COMPARE AND WRITE racing on one block from several threads: every
/// ORWRITE bit survives (no lost update), and an atomic write is never seen torn by a reader.
#[test]
fn atomic_commands_do_not_interleave() {
    let t = Arc::new(target());
    let bits: Vec<u8> = (0..8).map(|i| 1 << i).collect();
    std::thread::scope(|s| {
        for &bit in &bits {
            let t = t.clone();
            s.spawn(move || {
                let n = nexus(1);
                for _ in 0..50 {
                    good(&run(&t, &n, 1, &orwrite(0, 1, 0), &[bit; 512]));
                }
            });
        }
        let t2 = t.clone();
        s.spawn(move || {
            let n = nexus(2);
            for i in 0..100u32 {
                let fill = (i % 2) as u8 * 0xff;
                good(&run(&t2, &n, 1, &write_atomic(8, 8, 0), &[fill; 8 * 512]));
                let got = run(&t2, &n, 1, &read10(8, 8), &[]).data_in;
                assert!(got.iter().all(|&b| b == got[0]), "torn atomic write");
            }
        });
    });
    let n = nexus(1);
    assert_eq!(run(&t, &n, 1, &read10(0, 1), &[]).data_in, vec![0xff; 512]);
}

fn unmap_cdb(param_len: u16) -> Vec<u8> {
    let mut c = vec![op::UNMAP, 0, 0, 0, 0, 0, 0];
    c.extend_from_slice(&param_len.to_be_bytes());
    c.push(0);
    c
}

fn unmap_params(ranges: &[(u64, u32)]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&((6 + 16 * ranges.len()) as u16).to_be_bytes());
    p.extend_from_slice(&((16 * ranges.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    for &(lba, n) in ranges {
        p.extend_from_slice(&lba.to_be_bytes());
        p.extend_from_slice(&n.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
    }
    p
}

fn get_lba_status(lba: u64) -> Vec<u8> {
    let mut c = vec![op::SERVICE_ACTION_IN_16, 0x12];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&1024u32.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

/// SBC-3 §5.28 and §5.6 over a file: UNMAP punches a hole that GET LBA STATUS reports.
#[test]
fn unmap_and_get_lba_status_on_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lu.img");
    std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
    let mut d = def(1);
    d.block_size = 4096;
    d.backing = Backing::Path(path.clone());
    let t = TargetLus::open(
        &TargetDef {
            name: "iqn.2024-01.test:t".into(),
            tid: 1,
            alias: None,
            luns: vec![d],
            incoming_users: vec![],
            outgoing_user: None,
            initiator_names: vec![],
            initiator_addresses: vec![],
        },
        None,
    )
    .unwrap();
    let n = nexus(1);
    good(&run(&t, &n, 1, &write10(0, 256, 0), &vec![0xaa; 256 * 4096]));
    let p = unmap_params(&[(16, 32)]);
    good(&run(&t, &n, 1, &unmap_cdb(p.len() as u16), &p));
    assert_eq!(run(&t, &n, 1, &read10(16, 1), &[]).data_in, vec![0; 4096]);
    let o = run(&t, &n, 1, &get_lba_status(0), &[]);
    good(&o);
    let first = &o.data_in[8..24];
    assert_eq!(&first[0..8], &0u64.to_be_bytes());
    assert_eq!(&first[8..12], &16u32.to_be_bytes());
    assert_eq!(first[12], 0, "mapped");
    let o = run(&t, &n, 1, &get_lba_status(16), &[]);
    // tmpfs/ext4/xfs punch holes; on a file system that cannot, the run stays mapped.
    if o.data_in[8 + 12] == 1 {
        assert_eq!(&o.data_in[16..20], &32u32.to_be_bytes());
        let next = &o.data_in[24..40];
        assert_eq!((&next[0..8], next[12]), (&48u64.to_be_bytes()[..], 0));
    }
    // Out of range descriptors and LBAs.
    let p = unmap_params(&[(256, 0x1_0000)]);
    assert_eq!(
        sense_of(&run(&t, &n, 1, &unmap_cdb(p.len() as u16), &p)),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
    assert_eq!(
        sense_of(&run(&t, &n, 1, &get_lba_status(256), &[])),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
}

/// SAM-5 §5.14: a unit attention is reported once, on any command but INQUIRY/REPORT LUNS.
#[test]
fn unit_attention_once() {
    let t = target();
    let (a, b) = (nexus(1), nexus(2));
    t.nexus_joined(&a);
    t.nexus_joined(&b);
    good(&run(&t, &a, 1, &[op::INQUIRY, 0, 0, 0, 96, 0], &[]));
    assert_eq!(sense_of(&run(&t, &a, 1, &[0; 6], &[])), (key::UNIT_ATTENTION, 0x29, 0));
    good(&run(&t, &a, 1, &[0; 6], &[]));
    // LUN 0 (controller) had its own.
    assert_eq!(sense_of(&run(&t, &a, 0, &[0; 6], &[])), (key::UNIT_ATTENTION, 0x29, 0));
    // A LU reset by b: every nexus gets 29/03, b included (SAM-5 §6.3.3).
    assert_eq!(sense_of(&run(&t, &b, 1, &[0; 6], &[])), (key::UNIT_ATTENTION, 0x29, 0));
    assert!(t.lu_reset(1, &b));
    assert_eq!(
        sense_of(&run(&t, &b, 1, &[0; 6], &[])),
        (key::UNIT_ATTENTION, 0x29, 0x03)
    );
    good(&run(&t, &b, 1, &[0; 6], &[]));
    assert_eq!(
        sense_of(&run(&t, &a, 1, &[0; 6], &[])),
        (key::UNIT_ATTENTION, 0x29, 0x03)
    );
    assert!(!t.lu_reset(9, &b));
    // REQUEST SENSE returns and clears a pending one.
    t.target_reset(&b);
    let o = run(&t, &a, 1, &[op::REQUEST_SENSE, 0, 0, 0, 252, 0], &[]);
    good(&o);
    assert_eq!(
        (o.data_in[2], o.data_in[12], o.data_in[13]),
        (key::UNIT_ATTENTION, 0x29, 0x03)
    );
    good(&run(&t, &a, 1, &[0; 6], &[]));
}

#[test]
fn read_only_is_write_protected() {
    let mut d = def(1);
    d.read_only = true;
    let t = target_with(d, Box::new(MemStore::new(BLOCKS * u64::from(BS))));
    let n = nexus(1);
    assert_eq!(
        sense_of(&run(&t, &n, 1, &write10(0, 1, 0), &[0; 512])),
        (key::DATA_PROTECT, 0x27, 0)
    );
    good(&run(&t, &n, 1, &read10(0, 1), &[]));
    // MODE SENSE reports WP.
    let o = run(&t, &n, 1, &[op::MODE_SENSE_6, 0x08, 0x3f, 0, 255, 0], &[]);
    assert_eq!(o.data_in[2] & 0x80, 0x80);
}

#[test]
fn unknown_lun() {
    let t = target();
    let n = nexus(1);
    let o = run(&t, &n, 7, &[op::INQUIRY, 0, 0, 0, 36, 0], &[]);
    good(&o);
    assert_eq!(o.data_in[0], 0x7f);
    assert_eq!(o.data_in.len(), 36);
    assert_eq!(sense_of(&run(&t, &n, 7, &[0; 6], &[])), (key::ILLEGAL_REQUEST, 0x25, 0));
    let o = run(&t, &n, 7, &[op::REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    good(&o);
    assert_eq!(
        o.data_in,
        [0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    );
    // The controller at LUN 0 has no media commands.
    assert_eq!(
        sense_of(&run(&t, &n, 0, &read10(0, 1), &[])),
        (key::ILLEGAL_REQUEST, 0x20, 0)
    );
    let o = run(&t, &n, 0, &[op::INQUIRY, 0, 0, 0, 96, 0], &[]);
    assert_eq!(o.data_in[0], 0x0c);
}

/// SBC-3 §5.16: READ CAPACITY(16) with LBPME and LBPRZ on a thin LU.
#[test]
fn read_capacity() {
    let t = target();
    let n = nexus(1);
    let mut c = vec![op::SERVICE_ACTION_IN_16, 0x10];
    c.extend_from_slice(&[0; 8]);
    c.extend_from_slice(&32u32.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    let o = run(&t, &n, 1, &c, &[]);
    let mut want = vec![0u8; 32];
    want[0..8].copy_from_slice(&(BLOCKS - 1).to_be_bytes());
    want[8..12].copy_from_slice(&BS.to_be_bytes());
    want[14] = 0xc0;
    assert_eq!(o.data_in, want);
    let o = run(&t, &n, 1, &[op::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(o.data_in, [0, 0, 0x07, 0xff, 0, 0, 2, 0]);
}

/// SPC-4 §6.6.2 / §7.8: INQUIRY standard data and every VPD page, truncated to the allocation.
#[test]
fn inquiry_pages() {
    let t = target();
    let n = nexus(1);
    let o = run(&t, &n, 1, &[op::INQUIRY, 0, 0, 0, 5, 0], &[]);
    assert_eq!(o.data_in, [0, 0, 6, 0x12, 69]);
    let o = run(&t, &n, 1, &[op::INQUIRY, 1, 0, 0, 255, 0], &[]);
    assert_eq!(o.data_in, [0, 0, 0, 7, 0x00, 0x80, 0x83, 0x86, 0xb0, 0xb1, 0xb2]);
    for page in [0x80, 0x83, 0x86, 0xb0, 0xb1, 0xb2] {
        let o = run(&t, &n, 1, &[op::INQUIRY, 1, page, 0, 255, 0], &[]);
        good(&o);
        assert_eq!(o.data_in[1], page);
        assert_eq!(
            o.data_in.len(),
            4 + usize::from(u16::from_be_bytes([o.data_in[2], o.data_in[3]]))
        );
    }
    let o = run(&t, &n, 1, &[op::INQUIRY, 1, 0x80, 0, 255, 0], &[]);
    assert_eq!(&o.data_in[4..], b"beaf10");
    // EVPD = 0 with a page code: INVALID FIELD IN CDB pointing at byte 2.
    let o = run(&t, &n, 1, &[op::INQUIRY, 0, 0x80, 0, 255, 0], &[]);
    assert_eq!(
        o.sense.unwrap(),
        [0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0xc0, 0, 2]
    );
}

/// SPC-4 §6.11 / §7.5.8: MODE SENSE pages; D_SENSE via MODE SELECT switches to descriptor sense.
#[test]
fn mode_sense_select_and_descriptor_sense() {
    let t = target();
    let (a, b) = (nexus(1), nexus(2));
    t.nexus_joined(&a);
    t.nexus_joined(&b);
    run(&t, &a, 1, &[0; 6], &[]);
    run(&t, &b, 1, &[0; 6], &[]);
    let o = run(&t, &a, 1, &[op::MODE_SENSE_6, 0, 0x3f, 0, 255, 0], &[]);
    good(&o);
    assert_eq!(&o.data_in[0..4], &[3 + 8 + 20 + 12 + 12, 0, 0x10, 8]);
    assert_eq!(&o.data_in[4..12], &[0, 0, 0x08, 0, 0, 0, 2, 0]);
    assert_eq!(&o.data_in[12..15], &[0x08, 0x12, 0x04]);
    // Residual test of libiscsi: allocation length 4 gives 4 bytes.
    assert_eq!(
        run(&t, &a, 1, &[op::MODE_SENSE_6, 0, 0x3f, 0, 4, 0], &[]).data_in.len(),
        4
    );
    // Saved values: SAVING PARAMETERS NOT SUPPORTED.
    assert_eq!(
        sense_of(&run(&t, &a, 1, &[op::MODE_SENSE_6, 0, 0xca, 0, 255, 0], &[])).1,
        0x39
    );
    let o = run(&t, &a, 1, &[op::MODE_SENSE_6, 0x08, 0x0a, 0, 255, 0], &[]);
    let mut sel = vec![0, 0, 0, 0];
    sel.extend_from_slice(&o.data_in[4..]);
    sel[4 + 2] |= 0x04;
    good(&run(
        &t,
        &a,
        1,
        &[op::MODE_SELECT_6, 0x10, 0, 0, sel.len() as u8, 0],
        &sel,
    ));
    let o = run(&t, &a, 1, &read10(BLOCKS as u32, 1), &[]);
    assert_eq!(o.sense.unwrap(), [0x72, 5, 0x21, 0, 0, 0, 0, 0]);
    // The other nexus learns of the change: MODE PARAMETERS CHANGED.
    let o = run(&t, &b, 1, &[0; 6], &[]);
    assert_eq!(o.sense.unwrap()[1..4], [6, 0x2a, 0x01]);
}

/// SPC-4 §6.35: all commands, one command, one command with service action.
#[test]
fn report_supported_operation_codes() {
    let t = target();
    let n = nexus(1);
    let rsoc = |options: u8, opcode: u8, sa: u16| {
        let mut c = vec![op::MAINTENANCE_IN, 0x0c, options, opcode];
        c.extend_from_slice(&sa.to_be_bytes());
        c.extend_from_slice(&4096u32.to_be_bytes());
        c.extend_from_slice(&[0, 0]);
        c
    };
    let o = run(&t, &n, 1, &rsoc(0, 0, 0), &[]);
    good(&o);
    let len = u32::from_be_bytes(o.data_in[0..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, o.data_in.len());
    assert_eq!(&o.data_in[4..12], &[0x00, 0, 0, 0, 0, 0, 0, 6]);
    let o = run(&t, &n, 1, &rsoc(0x80, 0, 0), &[]);
    assert_eq!(
        &o.data_in[4..24],
        &[0, 0, 0, 0, 0, 0x02, 0, 6, 0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 30]
    );
    let o = run(&t, &n, 1, &rsoc(1, op::READ_10, 0), &[]);
    assert_eq!(
        o.data_in,
        [0, 3, 0, 10, 0x28, 0x18, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x07]
    );
    assert_eq!(sense_of(&run(&t, &n, 1, &rsoc(2, op::READ_10, 0), &[])).1, 0x24);
    assert_eq!(
        sense_of(&run(&t, &n, 1, &rsoc(1, op::SERVICE_ACTION_IN_16, 0), &[])).1,
        0x24
    );
    let o = run(&t, &n, 1, &rsoc(2, op::SERVICE_ACTION_IN_16, 0x10), &[]);
    assert_eq!(&o.data_in[0..6], &[0, 3, 0, 16, 0x9e, 0x10]);
    assert_eq!(run(&t, &n, 1, &rsoc(1, 0xc0, 0), &[]).data_in, [0, 1, 0, 0]);
}

/// SPC-4 §6.37: one group, Active/Optimized, our relative port.
#[test]
fn report_target_port_groups() {
    let t = target();
    let n = nexus(1);
    let o = run(
        &t,
        &n,
        1,
        &[op::MAINTENANCE_IN, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        &[],
    );
    assert_eq!(o.data_in, [0, 0, 0, 12, 0x80, 0x8f, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]);
    let o = run(
        &t,
        &n,
        1,
        &[op::MAINTENANCE_IN, 0x2a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        &[],
    );
    assert_eq!(&o.data_in[0..8], &[0, 0, 0, 16, 0x10, 0, 0, 0]);
}

/// SPC-4 §6.33: REPORT LUNS lists the controller and the disk; bad SELECT REPORT is refused.
#[test]
fn report_luns() {
    let t = target();
    let n = nexus(1);
    let o = run(&t, &n, 1, &[op::REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    assert_eq!(o.data_in[0..4], [0, 0, 0, 16]);
    assert_eq!(o.data_in[8..24], [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        sense_of(&run(
            &t,
            &n,
            1,
            &[op::REPORT_LUNS, 0, 3, 0, 0, 0, 0, 0, 1, 0, 0, 0],
            &[]
        ))
        .1,
        0x24
    );
    assert_eq!(
        sense_of(&run(
            &t,
            &n,
            1,
            &[op::REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0],
            &[]
        ))
        .1,
        0x24
    );
}

/// SPC-4 §6.6.2 (standard INQUIRY data, byte 5): TPGS = 01b, implicit ALUA only, on the disk and
/// on the controller at LUN 0.
#[test]
fn inquiry_tpgs_implicit() {
    let t = target();
    let n = nexus(1);
    for lun in [0, 1] {
        let o = run(&t, &n, lun, &[op::INQUIRY, 0, 0, 0, 96, 0], &[]);
        good(&o);
        assert_eq!(o.data_in[5] & 0x30, 0x10, "LUN {lun}");
    }
}

/// SPC-4 §7.8.6 (device identification VPD page): the LU's NAA designator, then the target
/// port's SCSI name string, relative target port (type 4) and target port group (type 5).
#[test]
fn device_identification_designators() {
    let t = target();
    let mut n = nexus(1);
    n.target_port.relative_port_id = 3;
    n.target_port.port_group = 2;
    let o = run(&t, &n, 1, &[op::INQUIRY, 1, 0x83, 0, 255, 0], &[]);
    good(&o);
    let mut want = vec![0x00, 0x83, 0, 68];
    // NAA (type 3), binary, associated with the logical unit.
    want.extend_from_slice(&[0x01, 0x03, 0, 16]);
    want.extend_from_slice(&derive_naa("iqn.2024-01.test:t", 1));
    // SCSI name string (type 8), iSCSI, UTF-8, PIV, target port: "<iqn>,t,0x0001", NUL-padded.
    want.extend_from_slice(&[0x53, 0x98, 0, 28]);
    want.extend_from_slice(b"iqn.2024-01.test:t,t,0x0001\0");
    // Relative target port (type 4), iSCSI, binary, PIV, target port.
    want.extend_from_slice(&[0x51, 0x94, 0, 4, 0, 0, 0, 3]);
    // Target port group (type 5).
    want.extend_from_slice(&[0x51, 0x95, 0, 4, 0, 0, 0, 2]);
    assert_eq!(o.data_in, want);
}

/// A cluster view: node 1 leads (Active/Optimized), nodes 2 and 3 follow (Active/Non-optimized).
struct ThreeGroups;

impl AluaView for ThreeGroups {
    fn port_groups(&self, lun: u64) -> Vec<PortGroupState> {
        if lun != 1 {
            return Vec::new();
        }
        vec![
            PortGroupState {
                group: 1,
                state: AluaState::ActiveOptimized,
                relative_ports: vec![1],
            },
            PortGroupState {
                group: 2,
                state: AluaState::ActiveNonOptimized,
                relative_ports: vec![2],
            },
            PortGroupState {
                group: 3,
                state: AluaState::ActiveNonOptimized,
                relative_ports: vec![3],
            },
        ]
    }
}

fn rtpg(extended: bool, alloc: u32) -> Vec<u8> {
    let mut c = vec![op::MAINTENANCE_IN, if extended { 0x2a } else { 0x0a }, 0, 0, 0, 0];
    c.extend_from_slice(&alloc.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

/// SPC-4 r37 §6.37 REPORT TARGET PORT GROUPS with a view of three groups, in both parameter data
/// formats. Each target port group descriptor (§6.37.2, table "Target port group descriptor
/// format") is: PREF | ASYMMETRIC ACCESS STATE (0h AO, 1h ANO), supported states T_SUP U_SUP
/// S_SUP AN_SUP AO_SUP (8Fh), TARGET PORT GROUP, reserved, STATUS CODE 00h, vendor specific,
/// TARGET PORT COUNT, then one target port descriptor (2 reserved, RELATIVE TARGET PORT
/// IDENTIFIER) per port.
#[test]
fn report_target_port_groups_with_view() {
    let t = target();
    t.set_alua(Arc::new(ThreeGroups));
    let n = nexus(1);
    let descriptors: [u8; 36] = [
        0x00, 0x8f, 0, 1, 0, 0x00, 0, 1, 0, 0, 0, 1, // group 1: AO, port 1
        0x01, 0x8f, 0, 2, 0, 0x00, 0, 1, 0, 0, 0, 2, // group 2: ANO, port 2
        0x01, 0x8f, 0, 3, 0, 0x00, 0, 1, 0, 0, 0, 3, // group 3: ANO, port 3
    ];
    // Length-only header (table "Length only header parameter data format"): RETURN DATA LENGTH.
    let o = run(&t, &n, 1, &rtpg(false, 4096), &[]);
    good(&o);
    let mut want = vec![0, 0, 0, 36];
    want.extend_from_slice(&descriptors);
    assert_eq!(o.data_in, want);
    // Extended header (table "Extended header parameter data format"): RETURN DATA LENGTH
    // (counting the 4 bytes below), FORMAT TYPE 001b, IMPLICIT TRANSITION TIME 0, 2 reserved.
    let o = run(&t, &n, 1, &rtpg(true, 4096), &[]);
    good(&o);
    let mut want = vec![0, 0, 0, 40, 0x10, 0, 0, 0];
    want.extend_from_slice(&descriptors);
    assert_eq!(o.data_in, want);
    // Truncated to the allocation length.
    assert_eq!(run(&t, &n, 1, &rtpg(false, 6), &[]).data_in, [0, 0, 0, 36, 0x00, 0x8f]);
    // A LU the view knows nothing of: the standalone answer.
    let o = run(&t, &n, 0, &rtpg(false, 4096), &[]);
    assert_eq!(o.data_in, [0, 0, 0, 12, 0x80, 0x8f, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]);
    // PARAMETER DATA FORMAT 010b is reserved.
    assert_eq!(
        sense_of(&run(
            &t,
            &n,
            1,
            &[op::MAINTENANCE_IN, 0x4a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
            &[]
        )),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
}

/// SPC-4 r37 §6.37 without a view: one group, the nexus's, Active/Optimized and preferred, with
/// the nexus's relative port; both formats.
#[test]
fn report_target_port_groups_without_view() {
    let t = target();
    let mut n = nexus(1);
    n.target_port.relative_port_id = 7;
    n.target_port.port_group = 5;
    let o = run(&t, &n, 1, &rtpg(false, 4096), &[]);
    assert_eq!(o.data_in, [0, 0, 0, 12, 0x80, 0x8f, 0, 5, 0, 0, 0, 1, 0, 0, 0, 7]);
    let o = run(&t, &n, 1, &rtpg(true, 4096), &[]);
    assert_eq!(
        o.data_in,
        [0, 0, 0, 16, 0x10, 0, 0, 0, 0x80, 0x8f, 0, 5, 0, 0, 0, 1, 0, 0, 0, 7]
    );
}

/// Clears the POWER ON unit attention of `n` on every LU of `t`.
fn clear_power_on(t: &TargetLus, n: &Nexus) {
    for lun in [0, 1] {
        assert_eq!(sense_of(&run(t, n, lun, &[0; 6], &[])), (key::UNIT_ATTENTION, 0x29, 0));
    }
}

/// SPC-4 §5.16.2.3: ASYMMETRIC ACCESS STATE CHANGED (2A/06) on every nexus of the chosen LUs.
#[test]
fn unit_attention_all_access_state_changed() {
    let t = target();
    let (a, b) = (nexus(1), nexus(2));
    t.nexus_joined(&a);
    t.nexus_joined(&b);
    clear_power_on(&t, &a);
    clear_power_on(&t, &b);
    t.unit_attention_all(Some(1), sense::ASYMMETRIC_ACCESS_STATE_CHANGED);
    for n in [&a, &b] {
        assert_eq!(
            sense_of(&run(&t, n, 1, &[0; 6], &[])),
            (key::UNIT_ATTENTION, 0x2a, 0x06)
        );
        good(&run(&t, n, 1, &[0; 6], &[]));
        good(&run(&t, n, 0, &[0; 6], &[]));
    }
    t.unit_attention_all(None, sense::ASYMMETRIC_ACCESS_STATE_CHANGED);
    for lun in [0, 1] {
        assert_eq!(
            sense_of(&run(&t, &a, lun, &[0; 6], &[])),
            (key::UNIT_ATTENTION, 0x2a, 0x06)
        );
    }
    // A nexus that left gets nothing more.
    t.nexus_left(&b);
    t.unit_attention_all(Some(1), sense::REPORTED_LUNS_DATA_HAS_CHANGED);
    good(&run(&t, &b, 1, &[0; 6], &[]));
    assert_eq!(
        sense_of(&run(&t, &a, 1, &[0; 6], &[])),
        (key::UNIT_ATTENTION, 0x3f, 0x0e)
    );
}

/// SBC-3 §4.6: READ CAPACITY and LBA checks follow the store's size; capacity_changed raises
/// CAPACITY DATA HAS CHANGED (2A/09) on every nexus.
#[test]
fn capacity_follows_the_store() {
    let store = Arc::new(MemStore::new(BLOCKS * u64::from(BS)));
    let t = target_with(def(1), Box::new(store.clone()));
    let n = nexus(1);
    t.nexus_joined(&n);
    clear_power_on(&t, &n);
    let rc10 = [op::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(run(&t, &n, 1, &rc10, &[]).data_in, [0, 0, 0x07, 0xff, 0, 0, 2, 0]);
    assert_eq!(sense_of(&run(&t, &n, 1, &read10(BLOCKS as u32, 1), &[])).1, 0x21);
    store.resize(2 * BLOCKS * u64::from(BS)).unwrap();
    assert!(t.capacity_changed(1));
    assert!(!t.capacity_changed(0));
    assert!(!t.capacity_changed(9));
    assert_eq!(sense_of(&run(&t, &n, 1, &rc10, &[])), (key::UNIT_ATTENTION, 0x2a, 0x09));
    assert_eq!(run(&t, &n, 1, &rc10, &[]).data_in, [0, 0, 0x0f, 0xff, 0, 0, 2, 0]);
    let mut rc16 = vec![op::SERVICE_ACTION_IN_16, 0x10];
    rc16.extend_from_slice(&[0; 8]);
    rc16.extend_from_slice(&32u32.to_be_bytes());
    rc16.extend_from_slice(&[0, 0]);
    assert_eq!(run(&t, &n, 1, &rc16, &[]).data_in[0..8], (2 * BLOCKS - 1).to_be_bytes());
    good(&run(
        &t,
        &n,
        1,
        &write10(2 * BLOCKS as u32 - 1, 1, 0),
        &[9; BS as usize],
    ));
    assert_eq!(
        run(&t, &n, 1, &read10(2 * BLOCKS as u32 - 1, 1), &[]).data_in,
        [9; BS as usize]
    );
    assert_eq!(t.luns()[1].size_bytes, 2 * BLOCKS * u64::from(BS));
}

fn prout(sa: u8, pr_type: u8, key: u64, sa_key: u64) -> (Vec<u8>, Vec<u8>) {
    let cdb = vec![op::PERSISTENT_RESERVE_OUT, sa, pr_type, 0, 0, 0, 0, 0, 24, 0];
    let mut params = vec![0u8; 24];
    params[0..8].copy_from_slice(&key.to_be_bytes());
    params[8..16].copy_from_slice(&sa_key.to_be_bytes());
    (cdb, params)
}

fn prin(sa: u8) -> Vec<u8> {
    vec![op::PERSISTENT_RESERVE_IN, sa, 0, 0, 0, 0, 0, 0x10, 0, 0]
}

/// SPC-4 §5.13: the PR state exported from one TargetLus and imported into another reads back
/// the same (READ KEYS, READ RESERVATION, READ FULL STATUS) and is enforced the same.
#[test]
fn pr_export_import_round_trip() {
    let a = target();
    let (n1, n2, n3) = (nexus(1), nexus(2), nexus(3));
    let (c, p) = prout(0x00, 0, 0, 0xaa);
    good(&run(&a, &n1, 1, &c, &p));
    let (c, p) = prout(0x00, 0, 0, 0xbb);
    good(&run(&a, &n2, 1, &c, &p));
    // RESERVE, Write Exclusive - Registrants Only, by n1.
    let (c, p) = prout(0x01, 0x05, 0xaa, 0);
    good(&run(&a, &n1, 1, &c, &p));
    let state = a.pr_export(1).unwrap();
    assert!(a.pr_export(0).is_none());

    let b = target();
    b.pr_import(1, &state).unwrap();
    for sa in [0x00, 0x01, 0x03] {
        let (x, y) = (run(&a, &n1, 1, &prin(sa), &[]), run(&b, &n1, 1, &prin(sa), &[]));
        good(&y);
        assert_eq!(x.data_in, y.data_in, "service action {sa}");
    }
    let keys = run(&b, &n1, 1, &prin(0x00), &[]).data_in;
    // Generation 2 (two REGISTERs), 16 bytes of keys.
    assert_eq!(keys[0..8], [0, 0, 0, 2, 0, 0, 0, 16]);
    let res = run(&b, &n1, 1, &prin(0x01), &[]).data_in;
    assert_eq!(res[4..8], [0, 0, 0, 16]);
    assert_eq!(res[8..16], 0xaau64.to_be_bytes());
    assert_eq!(res[21], 0x05);
    // Enforced: an unregistered nexus may not write.
    assert_eq!(
        run(&b, &n3, 1, &write10(0, 1, 0), &[0; BS as usize]).status,
        status::RESERVATION_CONFLICT
    );
    // Importing replaces: an empty state clears it.
    b.pr_import(1, &target().pr_export(1).unwrap()).unwrap();
    assert_eq!(run(&b, &n1, 1, &prin(0x00), &[]).data_in, [0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        b.pr_import(1, &[0xff, 0xff]).unwrap_err().kind(),
        std::io::ErrorKind::InvalidData
    );
    assert_eq!(b.pr_import(0, &state).unwrap_err().kind(), std::io::ErrorKind::NotFound);
}

/// Outcome constructors for command routers.
#[test]
fn outcome_constructors() {
    let o = Outcome::check_code(sense::LOGICAL_UNIT_NOT_ACCESSIBLE_TRANSITIONING, false);
    assert_eq!(sense_of(&o), (key::NOT_READY, 0x04, 0x0a));
    let o = Outcome::check_code(sense::LOGICAL_UNIT_NOT_ACCESSIBLE_STANDBY, true);
    assert_eq!(o.sense.unwrap(), [0x72, 0x02, 0x04, 0x0b, 0, 0, 0, 0]);
    assert_eq!(Outcome::good(vec![1, 2]).data_in, [1, 2]);
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// No CDB and Data-Out combination makes `execute` panic.
        #[test]
        fn execute_never_panics(
            lun in 0u64..3,
            opcode in prop_oneof![any::<u8>(), Just(0x28u8), Just(0x2a), Just(0x89), Just(0x93), Just(0x42),
                Just(0x9e), Just(0xa3), Just(0x15), Just(0x55), Just(0x12), Just(0x1a), Just(0x5a), Just(0x2f),
                Just(0x8b), Just(0x9c), Just(0x34), Just(0x90), Just(0x37), Just(0xb7)],
            rest in proptest::collection::vec(any::<u8>(), 0..16),
            small in any::<bool>(),
            data in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let t = target();
            let n = nexus(1);
            let mut cdb = vec![opcode];
            cdb.extend_from_slice(&rest);
            if small && cdb.len() > 2 {
                // Keep lengths small so that most commands pass the range checks.
                for b in cdb.iter_mut().skip(2) { *b &= 0x03; }
            }
            let o = run(&t, &n, lun, &cdb, &data);
            prop_assert!(o.status == status::GOOD || o.status == status::CHECK_CONDITION
                || o.status == status::RESERVATION_CONFLICT);
        }
    }
}

fn admit(t: &TargetLus, n: &Nexus, lun: u64, cdb: &[u8], data_out: &[u8]) -> Admission {
    t.admit_plain_write(
        n,
        &Command {
            lun,
            cdb,
            data_out,
            expected_transfer_len: data_out.len() as u32,
            task_attr: 0,
        },
    )
}

/// The replicated fast path's admission: plain writes only, with the ordinary path's unit
/// attention and reservation checks; everything unusual is left to `execute_sync`.
#[test]
fn plain_writes_are_admitted_with_the_ordinary_checks() {
    let t = target();
    let (a, b) = (nexus(1), nexus(2));
    t.nexus_joined(&a);
    t.nexus_joined(&b);
    let data = vec![7u8; 2 * BS as usize];
    // The pending 29/00 comes first, as in execute_sync, and only once.
    let Admission::Done(o) = admit(&t, &a, 1, &write10(5, 2, 0), &data) else {
        panic!("a pending unit attention must finish the command");
    };
    assert_eq!(sense_of(&o), (key::UNIT_ATTENTION, 0x29, 0));
    assert_eq!(o.scsi_transfer_len, Some(2 * BS));
    let w = match admit(&t, &a, 1, &write10(5, 2, 0), &data) {
        Admission::Write(w) => w,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        w,
        PlainWrite {
            offset: 5 * u64::from(BS),
            len: 2 * BS as usize,
            transfer_len: Some(2 * BS),
        }
    );
    assert!(matches!(
        admit(&t, &a, 1, &rw16(op::WRITE_16, 9, 1), &data),
        Admission::Write(PlainWrite { offset, len, .. }) if offset == 9 * u64::from(BS) && len == BS as usize
    ));
    // Left to execute_sync: FUA, beyond the end, short Data-Out, WRITE(6), reads, LUN 0, unknown LUN.
    for (lun, cdb, out) in [
        (1, write10(5, 2, 0x08), &data[..]),
        (1, write10(BLOCKS as u32 - 1, 2, 0), &data[..]),
        (1, write10(5, 2, 0), &data[..BS as usize]),
        (1, vec![op::WRITE_6, 0, 0, 5, 1, 0], &data[..]),
        (1, read10(5, 2), &[][..]),
        (0, write10(5, 2, 0), &data[..]),
        (9, write10(5, 2, 0), &data[..]),
    ] {
        assert!(matches!(admit(&t, &a, lun, &cdb, out), Admission::Other), "{cdb:02x?}");
    }
    // A reservation held by another nexus: RESERVATION CONFLICT, as execute_sync answers.
    assert_eq!(sense_of(&run(&t, &b, 1, &[0; 6], &[])), (key::UNIT_ATTENTION, 0x29, 0));
    let (c, p) = prout(0x00, 0, 0, 0xbb);
    good(&run(&t, &b, 1, &c, &p));
    let (c, p) = prout(0x01, 0x01, 0xbb, 0); // Write Exclusive
    good(&run(&t, &b, 1, &c, &p));
    let Admission::Done(o) = admit(&t, &a, 1, &write10(5, 2, 0), &data) else {
        panic!("a reservation conflict must finish the command");
    };
    assert_eq!(o.status, status::RESERVATION_CONFLICT);
    assert_eq!(o.status, run(&t, &a, 1, &write10(5, 2, 0), &data).status);
    assert!(matches!(
        admit(&t, &b, 1, &write10(5, 2, 0), &data),
        Admission::Write(_)
    ));
    // Finishing: GOOD with the transfer length, or WRITE ERROR.
    let o = t.finish_plain_write(1, &w, Ok(()));
    good(&o);
    assert_eq!(o.scsi_transfer_len, Some(2 * BS));
    let o = t.finish_plain_write(1, &w, Err(std::io::Error::other("disk gone")));
    assert_eq!(sense_of(&o), (key::MEDIUM_ERROR, 0x0c, 0x00));
}
