//! SCSI command execution (SPC-4, SBC-3): sequences of (CDB, Data-Out) from two I_T nexuses
//! run by `TargetLus::execute_sync` on a fresh target over memory stores, plus resets and
//! nexus changes between commands.
//!
//! Target: LUN 0 controller, LUN 1 512-byte blocks (thin, write cache), LUN 2 4096-byte blocks
//! (thick, read-only); LUN 3 does not exist.
//! Input: records `sel cdb_len data_hi data_lo cdb[cdb_len] data[len]`; `sel` bit 0 nexus,
//! bits 1-2 LUN, bits 3-5 task attribute, bits 6-7 = 3 makes the record a management event
//! (cdb_len selects which) instead of a command.
//! Invariants: a FENCE SESSIONS (C7h) parameter list that decodes re-encodes to the same bytes;
//! never panics; the status is one SAM-5 allows here; CHECK CONDITION carries sense
//! in a valid format (SPC-4 §4.5: fixed 70h/71h or descriptor 72h/73h, consistent additional
//! length) and no data; other statuses carry no sense; Data-In is bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use raftsan_proto::scsi::fence;
use raftsan_proto::scsi::sense::status;
use raftsan_target::backing::{BackingStore, MemStore};
use raftsan_target::catalog::{Backing, LunDef, derive_naa};
use raftsan_target::lu::{Command, Nexus, Outcome, TargetLus, TargetPort};

const TARGET: &str = "iqn.2026-01.test:fuzz";
/// Sizes of the two disks: small, so a READ of the whole LU stays cheap.
const LUN1_BYTES: u64 = 64 * 1024;
const LUN2_BYTES: u64 = 128 * 1024;
/// The largest Data-In any command may produce (VPD B0 caps transfers at 8 MiB).
const MAX_DATA_IN: usize = 8 << 20;
const RECORD_HEADER: usize = 4;

fn lun(lun: u64, size_bytes: u64, block_size: u32, thin: bool, read_only: bool) -> (LunDef, Box<dyn BackingStore>) {
    let def = LunDef {
        lun,
        backing: Backing::Memory { size_bytes },
        serial: format!("fuzz{lun}"),
        naa: derive_naa(TARGET, lun),
        vendor: "RAFTSAN".into(),
        product: "FUZZ".into(),
        revision: "0001".into(),
        block_size,
        read_only,
        thin,
        write_cache: !read_only,
    };
    (
        def,
        Box::new(MemStore::with_granularity(size_bytes, u64::from(block_size))),
    )
}

fn nexus(id: u64) -> Nexus {
    let isid = [0x80, 0, 0, 0, 0, id as u8];
    Nexus {
        id,
        initiator_name: format!("iqn.2026-01.test:init{id}"),
        initiator_port: format!("iqn.2026-01.test:init{id},i,0x80000000000{id}"),
        isid,
        tsih: id as u16,
        target_port: TargetPort {
            target_name: TARGET.into(),
            tpgt: 1,
            relative_port_id: 1,
            port_group: 1,
        },
    }
}

/// The allocation length (SPC-4 §4.2.5.6) of CDBs that have one, when the CDB is long enough.
fn allocation_length(cdb: &[u8]) -> Option<usize> {
    let u16_at = |i: usize| cdb.get(i..i + 2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    let u32_at = |i: usize| {
        cdb.get(i..i + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    match *cdb.first()? {
        0x12 => u16_at(3),                                                // INQUIRY
        0x03 | 0x1a => cdb.get(4).map(|&b| usize::from(b)),               // REQUEST SENSE, MODE SENSE(6)
        0x5a | 0x5e => u16_at(7),                                         // MODE SENSE(10), PERSISTENT RESERVE IN
        0xa0 => u32_at(6),                                                // REPORT LUNS
        0x9e if cdb.get(1).map(|b| b & 0x1f) == Some(0x10) => u32_at(10), // READ CAPACITY(16)
        0x25 => Some(8),                                                  // READ CAPACITY(10)
        _ => None,
    }
}

fn check_outcome(cdb: &[u8], block_size: Option<usize>, o: &Outcome) {
    if let Some(alloc) = allocation_length(cdb) {
        assert!(
            o.data_in.len() <= alloc,
            "{} bytes for allocation length {alloc}, CDB {cdb:02x?}",
            o.data_in.len()
        );
    }
    // READ(10) that succeeds returns exactly TRANSFER LENGTH blocks (SBC-3 §5.11).
    if o.status == status::GOOD
        && let (Some(bs), [0x28, _, _, _, _, _, _, hi, lo, _, ..]) = (block_size, cdb)
    {
        let blocks = usize::from(u16::from_be_bytes([*hi, *lo]));
        assert_eq!(o.data_in.len(), blocks * bs, "READ(10) Data-In length, CDB {cdb:02x?}");
    }
    let allowed = [
        status::GOOD,
        status::CHECK_CONDITION,
        status::CONDITION_MET,
        status::RESERVATION_CONFLICT,
        status::TASK_SET_FULL,
        status::BUSY,
    ];
    assert!(
        allowed.contains(&o.status),
        "status {:#04x} for CDB {cdb:02x?}",
        o.status
    );
    assert!(o.data_in.len() <= MAX_DATA_IN, "{} bytes of Data-In", o.data_in.len());
    if o.status == status::CHECK_CONDITION {
        let sense = o.sense.as_deref().expect("CHECK CONDITION without sense");
        check_sense(cdb, sense);
        assert!(o.data_in.is_empty(), "CHECK CONDITION with Data-In for CDB {cdb:02x?}");
    } else {
        assert!(
            o.sense.is_none(),
            "status {:#04x} with sense for CDB {cdb:02x?}",
            o.status
        );
    }
    if o.status == status::RESERVATION_CONFLICT {
        assert!(o.data_in.is_empty());
    }
}

/// SPC-4 §4.5: sense data formats.
fn check_sense(cdb: &[u8], s: &[u8]) {
    assert!(
        s.len() >= 8 && s.len() <= 252,
        "sense of {} bytes for CDB {cdb:02x?}",
        s.len()
    );
    match s[0] & 0x7f {
        0x70 | 0x71 => {
            assert_eq!(
                usize::from(s[7]) + 8,
                s.len(),
                "fixed sense additional length: {s:02x?}"
            );
            assert!(s.len() >= 14, "fixed sense too short for ASC/ASCQ: {s:02x?}");
            assert_ne!(
                s[2] & 0x0f,
                0,
                "CHECK CONDITION with NO SENSE key: {s:02x?} CDB {cdb:02x?}"
            );
        }
        0x72 | 0x73 => {
            assert_eq!(s[0] & 0x80, 0, "descriptor sense has no VALID bit");
            assert_eq!(
                usize::from(s[7]) + 8,
                s.len(),
                "descriptor sense additional length: {s:02x?}"
            );
            assert_ne!(
                s[1] & 0x0f,
                0,
                "CHECK CONDITION with NO SENSE key: {s:02x?} CDB {cdb:02x?}"
            );
            // Descriptors tile the rest exactly.
            let mut d = &s[8..];
            while !d.is_empty() {
                assert!(d.len() >= 2, "truncated sense descriptor: {s:02x?}");
                let n = 2 + usize::from(d[1]);
                assert!(n <= d.len(), "sense descriptor overruns: {s:02x?}");
                d = &d[n..];
            }
        }
        other => panic!("sense response code {other:#04x} for CDB {cdb:02x?}: {s:02x?}"),
    }
}

fuzz_target!(|input: &[u8]| {
    let lus = TargetLus::with_stores(
        TARGET,
        vec![
            lun(1, LUN1_BYTES, 512, true, false),
            lun(2, LUN2_BYTES, 4096, false, true),
        ],
    )
    .expect("fuzz target builds");
    let nexuses = [nexus(1), nexus(2)];
    let mut joined = [true, true];
    for n in &nexuses {
        lus.nexus_joined(n);
    }

    let mut rest = input;
    while rest.len() >= RECORD_HEADER {
        let (sel, event) = (rest[0], rest[1]);
        let cdb_len = usize::from(rest[1]).min(rest.len() - RECORD_HEADER);
        let rest_after_cdb = &rest[RECORD_HEADER + cdb_len..];
        let data_len = usize::from(u16::from_be_bytes([rest[2], rest[3]])).min(rest_after_cdb.len());
        let cdb = &rest[RECORD_HEADER..RECORD_HEADER + cdb_len];
        let data_out = &rest_after_cdb[..data_len];
        rest = &rest_after_cdb[data_len..];

        let who = usize::from(sel & 1);
        let nexus = &nexuses[who];
        let lun_no = u64::from((sel >> 1) & 3);
        if sel >> 6 == 3 {
            // A management event; its "CDB length" byte picks which.
            match event % 4 {
                0 => {
                    lus.lu_reset(lun_no, nexus);
                }
                1 => lus.target_reset(nexus),
                2 if joined[who] => {
                    lus.nexus_left(nexus);
                    joined[who] = false;
                }
                _ if !joined[who] => {
                    lus.nexus_joined(nexus);
                    joined[who] = true;
                }
                _ => {}
            }
            continue;
        }
        if !joined[who] {
            // The portal runs no command on a session that has ended.
            continue;
        }
        let cmd = Command {
            lun: lun_no,
            cdb,
            data_out,
            expected_transfer_len: data_out.len() as u32,
            task_attr: (sel >> 3) & 7,
        };
        if cdb.first() == Some(&fence::OPCODE) {
            // The cluster's FENCE SESSIONS parameter list: a list that decodes re-encodes to
            // the same bytes.
            if let Ok(list) = fence::parse(cdb, data_out) {
                assert_eq!(fence::encode(&list), data_out, "FENCE SESSIONS list {data_out:02x?}");
            }
        }
        let outcome = lus.execute_sync(nexus, &cmd);
        let block_size = match lun_no {
            1 => Some(512),
            2 => Some(4096),
            _ => None,
        };
        check_outcome(cdb, block_size, &outcome);
    }
    let _ = lus.luns();
});
