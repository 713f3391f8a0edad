//! The APTPL persistent-reservation state file (bytes read from disk at start):
//! `PersistentReservations::open` on arbitrary file contents.
//!
//! Input: byte 0 bit 0 clear wraps the rest in a valid header (magic `RSPR`, version 1, length,
//! CRC32C) so the fuzzer reaches the prost payload decoder; set uses the rest as the whole file.
//! Invariants: never panics; a loaded state answers PERSISTENT RESERVE IN consistently; after a
//! REGISTER AND IGNORE EXISTING KEY with APTPL=1 (which rewrites the file), the file loads again
//! to the same READ FULL STATUS / READ RESERVATION data.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use raftsan_target::lu::pr::{PersistentReservations, PrNexus};

#[path = "common/prin.rs"]
mod prin;

const MAGIC: &[u8; 4] = b"RSPR";
const VERSION: u32 = 1;
/// PERSISTENT RESERVE OUT, REGISTER AND IGNORE EXISTING KEY, parameter list length 24.
const PROUT_REGISTER_IGNORE: [u8; 10] = [0x5f, 0x06, 0, 0, 0, 0, 0, 0, 24, 0];

fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        let dir = if shm.is_dir() { shm } else { std::env::temp_dir() };
        dir.join(format!("raftsan-fuzz-aptpl-{}.pr", std::process::id()))
    })
}

fn prin_all(pr: &PersistentReservations, nexus: &PrNexus<'_>) -> Vec<Vec<u8>> {
    [0u8, 1, 3]
        .iter()
        .map(|&sa| {
            let cdb = [0x5e, sa, 0, 0, 0, 0, 0, 0xff, 0xff, 0];
            let data = pr
                .reserve_in(nexus, &cdb)
                .expect("PERSISTENT RESERVE IN of a loaded state");
            prin::check(sa, &data);
            data
        })
        .collect()
}

fuzz_target!(|input: &[u8]| {
    let Some((&sel, body)) = input.split_first() else {
        return;
    };
    let file = if sel & 1 == 0 {
        let mut f = Vec::with_capacity(16 + body.len());
        f.extend_from_slice(MAGIC);
        f.extend_from_slice(&VERSION.to_be_bytes());
        f.extend_from_slice(&(body.len() as u32).to_be_bytes());
        f.extend_from_slice(&crc32c::crc32c(body).to_be_bytes());
        f.extend_from_slice(body);
        f
    } else {
        body.to_vec()
    };
    let path = scratch();
    std::fs::write(path, &file).expect("write the scratch file");
    let Ok(pr) = PersistentReservations::open(Some(path.clone())) else {
        return;
    };
    let nexus = PrNexus {
        initiator_port: "iqn.2026-01.test:a,i,0x800000000001",
        initiator_name: "iqn.2026-01.test:a",
        isid: [0x80, 0, 0, 0, 0, 1],
        relative_target_port: 1,
    };
    prin_all(&pr, &nexus);

    let mut params = [0u8; 24];
    params[8..16].copy_from_slice(&0x1234_5678_9abc_def0u64.to_be_bytes());
    params[20] = 0x01; // APTPL
    if pr.reserve_out(&nexus, &PROUT_REGISTER_IGNORE, &params).is_ok() {
        let again = PersistentReservations::open(Some(path.clone())).expect("the file we wrote loads");
        assert_eq!(
            prin_all(&again, &nexus),
            prin_all(&pr, &nexus),
            "persisted state differs after reload"
        );
    }
});
