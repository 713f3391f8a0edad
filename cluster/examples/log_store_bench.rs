//! Raft log store benchmark: prints append+fsync latency and pipelined throughput for 4 KiB
//! entries under each fsync policy. A program that prints figures, not a test.
//!
//! `cargo run --release -p raftsan-cluster --example log_store_bench [DIR]` (DIR: where to put the
//! segment files, default a temporary directory; pick the disk you want to measure).

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::alias::{EntryOf, LogIdOf};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::type_config::TypeConfigExt;
use openraft::vote::RaftLeaderId;
use raftsan_cluster::raft::{FsyncPolicy, LogStore, LogStoreOptions, Request, TypeConfig as C};

const SERIAL: u64 = 2_000;
const PIPELINED: u64 = 20_000;
const DEPTH: usize = 32;
const ENTRY_BYTES: usize = 4096;

fn entry(index: u64) -> EntryOf<C> {
    let log_id = LogIdOf::<C>::new(openraft::impls::leader_id_adv::LeaderId::new(1, 1), index);
    let data = Bytes::from(vec![(index % 251) as u8; ENTRY_BYTES]);
    EntryOf::<C>::new_normal(
        log_id,
        Request::Write {
            offset_bytes: index * 4096,
            data,
            origin: 0,
        },
    )
}

fn open(base: &std::path::Path, policy: FsyncPolicy, name: &str) -> io::Result<LogStore> {
    let dir = base.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    LogStore::open(
        &dir,
        LogStoreOptions {
            fsync: policy,
            ..Default::default()
        },
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> io::Result<()> {
    let tmp = tempfile::tempdir()?;
    let base = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    println!("4 KiB entries in {}", base.display());
    for policy in [FsyncPolicy::Always, FsyncPolicy::Batch] {
        // One append at a time, waiting for durability: append + fsync latency.
        let mut s = open(&base, policy, "serial")?;
        let mut lat: Vec<Duration> = Vec::with_capacity(SERIAL as usize);
        for i in 0..SERIAL {
            let t = Instant::now();
            let (tx, rx) = C::oneshot();
            s.append([entry(i)], IOFlushed::signal(tx)).await?;
            rx.await.map_err(|e| io::Error::other(e.to_string()))??;
            lat.push(t.elapsed());
        }
        lat.sort();
        println!(
            "{policy:?}: one at a time: p50 {:?} p99 {:?} ({} fsyncs for {SERIAL})",
            lat[lat.len() / 2],
            lat[lat.len() * 99 / 100],
            s.fsync_count()
        );
        // Pipelined like RaftCore: up to DEPTH appends outstanding.
        let mut s = open(&base, policy, "pipelined")?;
        let t = Instant::now();
        let mut inflight = VecDeque::new();
        for i in 0..PIPELINED {
            if inflight.len() == DEPTH
                && let Some(rx) = inflight.pop_front()
            {
                let rx: openraft::alias::OneshotReceiverOf<C, io::Result<()>> = rx;
                rx.await.map_err(|e| io::Error::other(e.to_string()))??;
            }
            let (tx, rx) = C::oneshot();
            s.append([entry(i)], IOFlushed::signal(tx)).await?;
            inflight.push_back(rx);
        }
        for rx in inflight {
            rx.await.map_err(|e| io::Error::other(e.to_string()))??;
        }
        let el = t.elapsed();
        println!(
            "{policy:?}: depth {DEPTH}: {:.0} appends/s ({} fsyncs for {PIPELINED})",
            PIPELINED as f64 / el.as_secs_f64(),
            s.fsync_count()
        );
    }
    Ok(())
}
