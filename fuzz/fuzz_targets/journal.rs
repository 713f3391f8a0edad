//! The snapshot chunk journal (`raftsan_cluster::raft::journal`) on arbitrary file contents: what
//! a crash, bit rot or a bug can leave in a group's `staging/` directory before an install redoes
//! it.
//!
//! Input layout: the whole input is the journal file's contents.
//!
//! Invariants: no panic; `verify` accepts exactly what an independent in-memory parser of the
//! documented format accepts (header, CRC'd chunks of 1..=MAX_CHUNK bytes, a trailer with a valid
//! CRC and the right chunk count; bytes after the trailer are not read), with the same final size;
//! `next_chunk` yields the same chunks and stays done after the trailer; writing the accepted
//! chunks with `JournalWriter` reproduces the input up to the end of the trailer byte for byte.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use raftsan_cluster::raft::journal::{JournalReader, JournalWriter, MAX_CHUNK};

fn scratch(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        let base = if shm.is_dir() { shm } else { std::env::temp_dir() };
        base.join(format!("raftsan-fuzz-journal-{}", std::process::id()))
    });
    std::fs::create_dir_all(dir).expect("create the scratch directory");
    dir.join(name)
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

/// Reference parser: (chunks, final size, length of the accepted prefix) of a valid journal.
#[allow(clippy::type_complexity)]
fn reference(data: &[u8]) -> Option<(Vec<(u64, &[u8])>, u64, usize)> {
    if data.len() < 8 || &data[..4] != b"RSJN" || le32(&data[4..8]) != 1 {
        return None;
    }
    let mut pos = 8;
    let mut chunks = Vec::new();
    loop {
        let head = data.get(pos..pos + 16)?;
        let (offset, len, crc) = (le64(&head[..8]), le32(&head[8..12]), le32(&head[12..16]));
        pos += 16;
        if offset == u64::MAX {
            let body = data.get(pos..pos + 16)?;
            if len != 0 || crc32c::crc32c(body) != crc || le64(&body[8..]) != chunks.len() as u64 {
                return None;
            }
            return Some((chunks, le64(&body[..8]), pos + 16));
        }
        if len == 0 || len > MAX_CHUNK {
            return None;
        }
        let chunk = data.get(pos..pos + len as usize)?;
        if crc32c::crc32c(chunk) != crc {
            return None;
        }
        pos += len as usize;
        chunks.push((offset, chunk));
    }
}

fuzz_target!(|data: &[u8]| {
    let path = scratch("input.journal");
    std::fs::write(&path, data).expect("write the scratch journal");
    let expected = reference(data);

    let verified = JournalReader::verify(&path);
    match (&verified, &expected) {
        (Ok(size), Some((_, want, _))) => assert_eq!(size, want, "final size"),
        (Err(_), None) => {}
        (Ok(size), None) => panic!("journal accepted (size {size}) that the format refuses"),
        (Err(e), Some(_)) => panic!("valid journal refused: {e}"),
    }

    // Chunk by chunk: the same chunks, then None for good.
    let mut got = Vec::new();
    let mut complete = false;
    if let Ok(mut r) = JournalReader::open(&path) {
        loop {
            match r.next_chunk() {
                Ok(Some(c)) => got.push(c),
                Ok(None) => {
                    complete = true;
                    assert!(r.size_bytes().is_some(), "done without a size");
                    assert!(matches!(r.next_chunk(), Ok(None)), "done stays done");
                    break;
                }
                Err(_) => {
                    assert!(r.size_bytes().is_none(), "a size before the trailer");
                    break;
                }
            }
        }
    }
    assert_eq!(complete, expected.is_some());
    let Some((chunks, size, end)) = expected else {
        return;
    };
    assert_eq!(got.len(), chunks.len());
    for ((o, d), (wo, wd)) in got.iter().zip(&chunks) {
        assert_eq!((o, &d[..]), (wo, *wd));
    }

    // Writing the same chunks reproduces the journal.
    let out = scratch("rewritten.journal");
    let mut w = JournalWriter::create(&out).expect("create a journal");
    for (o, d) in &chunks {
        w.append(*o, d).expect("append a chunk the reader accepted");
    }
    assert_eq!(w.chunks(), chunks.len() as u64);
    w.finish(size).expect("finish the journal");
    let rewritten = std::fs::read(&out).expect("read the rewritten journal");
    assert_eq!(
        &rewritten[..],
        &data[..end],
        "rewriting differs from the accepted journal"
    );
});
