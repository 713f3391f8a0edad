//! Persistent reservations (SPC-4 §5.13, §6.15, §6.16): `PersistentReservations` driven by
//! arbitrary PERSISTENT RESERVE IN/OUT CDBs and parameter lists, access checks of arbitrary
//! CDBs, SPC-2 RESERVE/RELEASE, resets and nexus loss, from two I_T nexuses.
//!
//! Input: records `op nexus cdb_len plen_hi plen_lo cdb[cdb_len] params[plen]`.
//! Invariants: never panics; PERSISTENT RESERVE IN data is self-consistent (its length fields
//! match, SPC-4 §6.15), keys are bounded by MAX_REGISTRATIONS and PRgeneration never decreases.
#![no_main]

use libfuzzer_sys::fuzz_target;
use raftsan_target::lu::pr::{PersistentReservations, PrNexus};

#[path = "common/prin.rs"]
mod prin;

const RECORD_HEADER: usize = 5;

fuzz_target!(|input: &[u8]| {
    let Ok(pr) = PersistentReservations::open(None) else {
        panic!("open without a file")
    };
    let nexuses = [
        PrNexus {
            initiator_port: "iqn.2026-01.test:a,i,0x800000000001",
            initiator_name: "iqn.2026-01.test:a",
            isid: [0x80, 0, 0, 0, 0, 1],
            relative_target_port: 1,
        },
        PrNexus {
            initiator_port: "iqn.2026-01.test:b,i,0x800000000002",
            initiator_name: "iqn.2026-01.test:b",
            isid: [0x80, 0, 0, 0, 0, 2],
            relative_target_port: 2,
        },
    ];
    let mut generation = 0u32;
    let mut rest = input;
    while rest.len() >= RECORD_HEADER {
        let (op, who) = (rest[0], usize::from(rest[1] & 1));
        let cdb_len = usize::from(rest[2]).min(rest.len() - RECORD_HEADER);
        let after = &rest[RECORD_HEADER + cdb_len..];
        let plen = usize::from(u16::from_be_bytes([rest[3], rest[4]])).min(after.len());
        let cdb = &rest[RECORD_HEADER..RECORD_HEADER + cdb_len];
        let params = &after[..plen];
        rest = &after[plen..];
        let nexus = &nexuses[who];
        match op % 8 {
            0 | 1 => {
                let Ok(data) = pr.reserve_in(nexus, cdb) else { continue };
                if let Some(g) = prin::check(cdb[1] & 0x1f, &data) {
                    assert!(g >= generation, "PRgeneration went from {generation} to {g}");
                    generation = g;
                }
            }
            2 | 3 => {
                let _ = pr.reserve_out(nexus, cdb, params);
            }
            4 => {
                let _ = pr.check_access(nexus, cdb);
            }
            5 => {
                let _ = if rest.len().is_multiple_of(2) {
                    pr.reserve6(nexus)
                } else {
                    pr.release6(nexus)
                };
            }
            6 => pr.lu_reset(),
            _ => pr.nexus_lost(nexus),
        }
    }
});
