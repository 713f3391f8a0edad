//! The workload: workers write and read random blocks through an NBD export, every write and
//! read judged by the [`Oracle`]; every operation's start and end are kept for the stall figures.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

use crate::nbd::NbdClient;
use crate::oracle::{BLOCK, Oracle, encode};

#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    /// Blocks of [`BLOCK`] bytes the workload uses, from the start of the volume.
    pub blocks: u64,
    /// Concurrent workers (requests in flight).
    pub workers: usize,
    /// Share of reads among operations.
    pub read_fraction: f64,
    /// One FLUSH per this many writes of a worker (0: never).
    pub flush_every: u32,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            blocks: 4096,
            workers: 8,
            read_fraction: 0.4,
            flush_every: 64,
        }
    }
}

/// One completed (or failed) operation.
#[derive(Clone, Copy, Debug)]
pub struct Op {
    pub start_ns: u64,
    pub end_ns: u64,
    pub ok: bool,
    /// Sent by the direct iSCSI workers ([`crate::iscsi`]) rather than through NBD.
    pub direct: bool,
}

/// What the workload saw.
#[derive(Default)]
pub struct Record {
    pub ops: Vec<Op>,
    /// Errors returned to the client (a failed operation is not a violation by itself).
    pub errors: Vec<String>,
}

/// Shared state of one run.
pub struct Shared {
    pub oracle: Mutex<Oracle>,
    pub record: Mutex<Record>,
    busy: Mutex<HashSet<u64>>,
    pub clock: Instant,
}

impl Shared {
    pub fn new() -> Arc<Shared> {
        Arc::new(Shared {
            oracle: Mutex::new(Oracle::default()),
            record: Mutex::new(Record::default()),
            busy: Mutex::new(HashSet::new()),
            clock: Instant::now(),
        })
    }

    pub fn now_ns(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }

    pub fn oracle(&self) -> std::sync::MutexGuard<'_, Oracle> {
        self.oracle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps an operation for the stall figures, and the I/O error it returned, if any.
    pub fn record_op(&self, op: Op, error: Option<String>) {
        let mut r = self.record.lock().unwrap_or_else(|e| e.into_inner());
        r.ops.push(op);
        if let Some(e) = error {
            r.errors.push(format!("[{:.1} s] {e}", op.end_ns as f64 / 1e9));
        }
    }

    /// Claims a free block (at most one operation per block at a time).
    fn claim(&self, rng: &mut StdRng, blocks: u64) -> u64 {
        self.claim_range(rng, 0, blocks)
    }

    /// Claims a free block of `[lo, hi)`; release it with [`Shared::release`].
    pub fn claim_range(&self, rng: &mut StdRng, lo: u64, hi: u64) -> u64 {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let b = rng.random_range(lo..hi.max(lo + 1));
            if busy.insert(b) {
                return b;
            }
        }
    }

    pub fn release(&self, b: u64) {
        self.busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&b);
    }
}

/// Runs the workers until `stop` turns true.
pub async fn run(
    client: Arc<NbdClient>,
    shared: Arc<Shared>,
    cfg: WorkloadConfig,
    seed: u64,
    stop: watch::Receiver<bool>,
) {
    let blocks = cfg.blocks.min(client.size / BLOCK as u64).max(1);
    let mut tasks = Vec::new();
    for w in 0..cfg.workers {
        let client = client.clone();
        let shared = shared.clone();
        let cfg = cfg.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ (w as u64).wrapping_mul(0x9e37_79b9));
            let mut writes = 0u32;
            while !*stop.borrow() {
                let b = shared.claim(&mut rng, blocks);
                let offset = b * BLOCK as u64;
                if rng.random_bool(cfg.read_fraction) {
                    let start = shared.now_ns();
                    let r = client.read(offset, BLOCK as u32).await;
                    let end = shared.now_ns();
                    match r {
                        Ok(Ok(data)) => {
                            let _ = shared.oracle().check_read(b, &data, start, end);
                            shared.record_op(
                                Op {
                                    start_ns: start,
                                    end_ns: end,
                                    ok: true,
                                    direct: false,
                                },
                                None,
                            );
                        }
                        Ok(Err(errno)) => shared.record_op(
                            Op {
                                start_ns: start,
                                end_ns: end,
                                ok: false,
                                direct: false,
                            },
                            Some(format!("read of block {b}: errno {errno}")),
                        ),
                        Err(e) => {
                            shared.record_op(
                                Op {
                                    start_ns: start,
                                    end_ns: end,
                                    ok: false,
                                    direct: false,
                                },
                                Some(format!("{e:#}")),
                            );
                            shared.release(b);
                            return;
                        }
                    }
                } else {
                    let start = shared.now_ns();
                    let id = shared.oracle().begin_write(b, start);
                    let r = client.write(offset, &encode(b, id), false).await;
                    let end = shared.now_ns();
                    let ok = matches!(r, Ok(Ok(_)));
                    shared.oracle().end_write(b, id, ok, end);
                    let error = match &r {
                        Ok(Ok(_)) => None,
                        Ok(Err(errno)) => Some(format!("write of block {b}: errno {errno}")),
                        Err(e) => Some(format!("{e:#}")),
                    };
                    shared.record_op(
                        Op {
                            start_ns: start,
                            end_ns: end,
                            ok,
                            direct: false,
                        },
                        error,
                    );
                    if r.is_err() {
                        shared.release(b);
                        return;
                    }
                    writes += 1;
                    if cfg.flush_every > 0 && writes.is_multiple_of(cfg.flush_every) {
                        let start = shared.now_ns();
                        let r = client.flush().await;
                        let end = shared.now_ns();
                        let ok = matches!(r, Ok(Ok(_)));
                        shared.record_op(
                            Op {
                                start_ns: start,
                                end_ns: end,
                                ok,
                                direct: false,
                            },
                            (!ok).then(|| "flush failed".into()),
                        );
                    }
                }
                shared.release(b);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Reads every written block once more and judges it (after the faults are healed).
pub async fn verify_all(client: &NbdClient, shared: &Shared) -> u64 {
    let blocks = shared.oracle().written_blocks();
    let mut n = 0;
    for b in blocks {
        let start = shared.now_ns();
        if let Ok(Ok(data)) = client.read(b * BLOCK as u64, BLOCK as u32).await {
            let end = shared.now_ns();
            let _ = shared.oracle().check_read(b, &data, start, end);
            n += 1;
        } else {
            let mut r = shared.record.lock().unwrap_or_else(|e| e.into_inner());
            r.errors.push(format!(
                "[{:.1} s] final read of block {b} failed",
                shared.now_ns() as f64 / 1e9
            ));
        }
    }
    n
}

/// Waits (at most `within`) until the NBD client completed an operation that started after
/// `after_ns`: I/O through the initiator has resumed.
pub fn wait_progress(shared: &Shared, after_ns: u64, within: std::time::Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        {
            let r = shared.record.lock().unwrap_or_else(|e| e.into_inner());
            let resumed = r
                .ops
                .iter()
                .rev()
                .take_while(|o| o.end_ns > after_ns)
                .any(|o| !o.direct && o.ok && o.start_ns > after_ns);
            if resumed {
                return true;
            }
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The longest operation overlapping `[from_ns, to_ns]`: what the client saw as a stall.
pub fn max_latency_in(ops: &[Op], from_ns: u64, to_ns: u64) -> u64 {
    max_latency_where(ops, from_ns, to_ns, |_| true)
}

/// [`max_latency_in`] over the operations `which` selects (e.g. only the direct iSCSI ones).
pub fn max_latency_where(ops: &[Op], from_ns: u64, to_ns: u64, which: impl Fn(&Op) -> bool) -> u64 {
    ops.iter()
        .filter(|o| which(o) && o.end_ns >= from_ns && o.start_ns <= to_ns)
        .map(|o| o.end_ns - o.start_ns)
        .max()
        .unwrap_or(0)
}
