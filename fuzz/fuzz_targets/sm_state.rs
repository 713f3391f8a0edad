//! A Raft group's state file (`<dir>/state`: one CRC-framed `SmStateRecord`) on arbitrary bytes
//! → `GroupStateMachine::open_volume` / `open_meta`, including the redo of an interrupted
//! snapshot install from a chunk journal.
//!
//! Input layout: byte 0 flags: bit 0 open the metadata group (else a volume of
//! `4096 * (bits 3-4)` bytes); bit 1 the rest is the whole state file (else the harness frames it
//! as one record with a valid CRC, so the prost decoder is reached); bit 2 first comes
//! `u16 LE len, len bytes` written as the journal file `<dir>/j.journal`. The rest is the state.
//!
//! Each input gets a fresh directory (under /dev/shm when there is one). When the state decodes,
//! the harness points an install's journal path at `<dir>/j.journal` (so no input reads or
//! deletes files elsewhere) and cuts sizes above 1 MiB to their low 20 bits (so images stay
//! small), then writes it back framed.
//!
//! Invariants: no panic; a state file that does not frame and decode is refused; an open that
//! succeeds yields the right kind of state machine, an image of at least the requested and the
//! recorded size (after an interrupted install: exactly the snapshot's), the applied index of the
//! state (or of the install's snapshot); opening the directory again succeeds with the same applied
//! index and catalogue.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use raftsan_cluster::raft::record::{decode_records, encode_record};
use raftsan_cluster::raft::state_machine::{GroupStateMachine, STATE_FILE, SmStateRecord};
use raftsan_target::backing::BackingStore;

const SMALL: u64 = 1 << 20;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        let base = if shm.is_dir() { shm } else { std::env::temp_dir() };
        base.join(format!("raftsan-fuzz-sm-{}", std::process::id()))
    })
}

fn small(v: &mut u64) {
    if *v > SMALL {
        *v &= SMALL - 1;
    }
}

/// Confines the decoded state to the scratch directory and small sizes; None if it does not decode.
fn sanitize(file: &[u8], journal: &Path) -> Option<(Vec<u8>, SmStateRecord)> {
    let (recs, _, tail) = decode_records(file);
    if tail.is_some() || recs.len() != 1 {
        return None;
    }
    let mut rec = SmStateRecord::decode(recs[0].payload).ok()?;
    small(&mut rec.size_bytes);
    if let Some(s) = &mut rec.snapshot {
        small(&mut s.len);
    }
    if let Some(i) = &mut rec.installing {
        if !i.journal.is_empty() {
            i.journal = journal.as_os_str().as_encoded_bytes().to_vec();
        }
        if let Some(s) = &mut i.snapshot {
            small(&mut s.len);
        }
    }
    let mut out = Vec::new();
    encode_record(&rec.encode_to_vec(), &mut out);
    Some((out, rec))
}

fn open(dir: &Path, meta: bool, size: u64) -> std::io::Result<GroupStateMachine> {
    if meta {
        GroupStateMachine::open_meta(dir)
    } else {
        GroupStateMachine::open_volume(dir, size)
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&flags, mut rest)) = input.split_first() else {
        return;
    };
    let meta = flags & 1 != 0;
    let size = 4096 * u64::from((flags >> 3) & 3);
    let dir = scratch();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("create the scratch directory");
    let journal = dir.join("j.journal");
    if flags & 4 != 0 {
        let Some((len, r)) = rest.split_first_chunk::<2>() else {
            return;
        };
        let n = usize::from(u16::from_le_bytes(*len)).min(r.len());
        std::fs::write(&journal, &r[..n]).expect("write the journal");
        rest = &r[n..];
    }
    let mut file = Vec::new();
    if flags & 2 != 0 {
        file.extend_from_slice(rest);
    } else {
        encode_record(rest, &mut file);
    }
    let decoded = sanitize(&file, &journal);
    if let Some((clean, _)) = &decoded {
        file = clean.clone();
    }
    std::fs::write(dir.join(STATE_FILE), &file).expect("write the state file");

    let opened = open(dir, meta, size);
    let Some((_, rec)) = &decoded else {
        assert!(opened.is_err(), "a state file that does not decode was accepted");
        return;
    };
    let Ok(sm) = opened else {
        return;
    };
    assert_eq!(sm.catalogue().is_some(), meta, "kind of the opened state machine");
    let install = rec.installing.as_ref().and_then(|i| i.snapshot.as_ref());
    if let Some(img) = sm.image() {
        match install {
            Some(s) => assert_eq!(img.size_bytes(), s.len, "image size after the install"),
            None => assert!(img.size_bytes() >= size.max(rec.size_bytes), "image smaller than asked"),
        }
    }
    let applied = match &rec.installing {
        Some(_) => install.and_then(|s| s.last_log_id.as_ref()),
        None => rec.applied.as_ref(),
    };
    assert_eq!(
        sm.applied_index(),
        applied.map_or(0, |l| l.index),
        "applied index after open"
    );
    let applied = sm.applied_index();
    let catalogue = sm.catalogue().map(|c| (**c.borrow()).clone());
    drop(sm);
    let again = open(dir, meta, size).expect("a state machine that opened opens again");
    assert_eq!(again.applied_index(), applied, "applied index after reopening");
    assert_eq!(again.catalogue().map(|c| (**c.borrow()).clone()), catalogue);
});
