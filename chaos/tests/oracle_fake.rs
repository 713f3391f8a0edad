//! The oracle against fake targets: an honest in-memory device passes; a device that drops one
//! acknowledged write, and one that "fails over" to a replica missing its last writes, must be
//! reported. The fakes are served by raftsan-initiator's NBD server, so the workload runs the same
//! code as against a real cluster; no switch in production code is involved.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use raftsan_chaos::nbd::NbdClient;
use raftsan_chaos::workload::{self, Shared, WorkloadConfig};
use raftsan_initiator::nbd::{BlockDevice, DeviceError, NbdConfig, NbdListen};
use tokio::sync::watch;

const SIZE: u64 = 64 * 4096;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Misbehaviour {
    None,
    /// From the 200th write on, writes to that write's block are acknowledged but never stored
    /// (a sector that silently loses writes), so the loss cannot be masked by a later write.
    DropOneAckedWrite,
    /// After 300 writes, reads and writes go to a replica that missed the last 20 writes.
    StaleFailover,
}

/// The replica's image and the writes it has not applied yet (offset, data), oldest first.
type Replica = (Vec<u8>, Vec<(u64, Bytes)>);

struct Fake {
    how: Misbehaviour,
    primary: Mutex<Vec<u8>>,
    /// Writes not yet applied to the replica (offset, data), oldest first.
    lag: Mutex<Replica>,
    writes: AtomicU64,
    failed_over: AtomicU64,
    /// The block whose writes are dropped (DropOneAckedWrite), +1; 0 before.
    dropped: AtomicU64,
}

impl Fake {
    fn new(how: Misbehaviour) -> Fake {
        Fake {
            how,
            primary: Mutex::new(vec![0; SIZE as usize]),
            lag: Mutex::new((vec![0; SIZE as usize], Vec::new())),
            writes: AtomicU64::new(0),
            failed_over: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }
}

impl BlockDevice for Fake {
    fn size(&self) -> u64 {
        SIZE
    }

    fn block_size(&self) -> u32 {
        4096
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, DeviceError> {
        let range = offset as usize..(offset + u64::from(len)) as usize;
        if self.failed_over.load(Ordering::SeqCst) == 1 {
            return Ok(Bytes::copy_from_slice(&self.lag.lock().unwrap().0[range]));
        }
        Ok(Bytes::copy_from_slice(&self.primary.lock().unwrap()[range]))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), DeviceError> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        let at = offset as usize;
        match self.how {
            Misbehaviour::DropOneAckedWrite => {
                if n == 200 {
                    self.dropped.store(offset / 4096 + 1, Ordering::SeqCst);
                }
                if self.dropped.load(Ordering::SeqCst) == offset / 4096 + 1 {
                    return Ok(());
                }
            }
            Misbehaviour::StaleFailover => {
                if n == 300 {
                    // The replica becomes the volume; what it had not applied is gone.
                    self.lag.lock().unwrap().1.clear();
                    self.failed_over.store(1, Ordering::SeqCst);
                }
                let mut lag = self.lag.lock().unwrap();
                if self.failed_over.load(Ordering::SeqCst) == 1 {
                    lag.0[at..at + data.len()].copy_from_slice(&data);
                    return Ok(());
                }
                lag.1.push((offset, data.clone()));
                while lag.1.len() > 20 {
                    let (o, d) = lag.1.remove(0);
                    lag.0[o as usize..o as usize + d.len()].copy_from_slice(&d);
                }
            }
            _ => {}
        }
        self.primary.lock().unwrap()[at..at + data.len()].copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    async fn trim(&self, _offset: u64, _len: u32) -> Result<(), DeviceError> {
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), DeviceError> {
        self.write(offset, Bytes::from(vec![0u8; len as usize]), fua).await
    }
}

/// Runs the workload against a fake for `secs` and then reads every block; returns the
/// violation kinds found.
async fn run_against(how: Misbehaviour) -> Vec<&'static str> {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fake.sock");
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = {
        let listen = NbdListen::Unix(sock.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            raftsan_initiator::nbd::serve(listen, Arc::new(Fake::new(how)), NbdConfig::default(), async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        })
    };
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let client = Arc::new(NbdClient::connect(&sock).await.unwrap());
    let shared = Shared::new();
    let (wl_stop_tx, wl_stop_rx) = watch::channel(false);
    let cfg = WorkloadConfig {
        blocks: 64,
        workers: 4,
        read_fraction: 0.5,
        flush_every: 16,
    };
    let wl = tokio::spawn(workload::run(client.clone(), shared.clone(), cfg, 7, wl_stop_rx));
    // Long enough for 300+ writes.
    for _ in 0..500 {
        if shared.oracle().writes_acked > 600 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wl_stop_tx.send_replace(true);
    wl.await.unwrap();
    workload::verify_all(&client, &shared).await;
    client.disconnect().await;
    stop_tx.send_replace(true);
    let _ = server.await;
    let o = shared.oracle();
    assert!(
        o.writes_acked > 600,
        "the workload did too little: {} writes",
        o.writes_acked
    );
    assert!(shared.record.lock().unwrap().errors.is_empty());
    o.violations.iter().map(|v| v.kind).collect()
}

#[tokio::test]
async fn an_honest_device_has_no_violations() {
    assert_eq!(run_against(Misbehaviour::None).await, Vec::<&str>::new());
}

#[tokio::test]
async fn a_dropped_acknowledged_write_is_reported() {
    let found = run_against(Misbehaviour::DropOneAckedWrite).await;
    assert!(found.contains(&"lost"), "{found:?}");
}

#[tokio::test]
async fn a_failover_to_a_lagging_replica_is_reported() {
    let found = run_against(Misbehaviour::StaleFailover).await;
    assert!(
        !found.is_empty() && found.iter().all(|k| *k == "lost" || *k == "stale"),
        "{found:?}"
    );
}
