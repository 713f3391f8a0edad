//! The oracle: every block the workload writes says which block and which write it is, and the
//! oracle knows when each write was issued and acknowledged, so it can judge every read.
//!
//! Block format (`BLOCK` bytes): magic, block number, write id, CRC32C of the rest, then bytes
//! derived from (block, write id). An all-zero block is "never written" (write id 0).
//!
//! The workload keeps at most one write per block in flight, so a block's writes are totally
//! ordered by issue. A read that started at `rs` and ended at `re` is linearizable when it
//! returns a write that was issued before `re` and is not older than the newest write of that
//! block acknowledged before `rs`. Anything else is a violation: a *lost* write (an acknowledged
//! write replaced by an older one), a *stale* read (a failed or late write showing up after a
//! newer one was acknowledged, DESIGN.md invariant 3), a *foreign* block (data of another block
//! or of a write never issued) or a *corrupt* one (bad magic or checksum).

use std::collections::HashMap;
use std::fmt;

pub const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"RSCHAOS1";
const HEADER: usize = 28;

/// The bytes of write `id` to `block`.
pub fn encode(block: u64, id: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[0..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b[16..24].copy_from_slice(&id.to_le_bytes());
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ id.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) | 1;
    for chunk in b[HEADER..].chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    let crc = crc32c::crc32c(&b[HEADER..]);
    b[24..28].copy_from_slice(&crc.to_le_bytes());
    b
}

/// What a read returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// Never written (all zeros).
    Zero,
    /// Write `id` of block `block`.
    Write { block: u64, id: u64 },
    /// Not a block this workload wrote.
    Corrupt,
}

pub fn decode(b: &[u8]) -> Content {
    if b.len() != BLOCK {
        return Content::Corrupt;
    }
    if b.iter().all(|&x| x == 0) {
        return Content::Zero;
    }
    if &b[0..8] != MAGIC {
        return Content::Corrupt;
    }
    let crc = u32::from_le_bytes([b[24], b[25], b[26], b[27]]);
    if crc32c::crc32c(&b[HEADER..]) != crc {
        return Content::Corrupt;
    }
    let block = u64::from_le_bytes(b[8..16].try_into().unwrap_or_default());
    let id = u64::from_le_bytes(b[16..24].try_into().unwrap_or_default());
    Content::Write { block, id }
}

/// One write of a block.
#[derive(Clone, Debug)]
struct WriteRec {
    id: u64,
    issued_ns: u64,
    /// When it was acknowledged; None while in flight or when it failed (its fate is unknown).
    acked_ns: Option<u64>,
}

/// A broken promise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub block: u64,
    pub kind: &'static str,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {}: {}: {}", self.block, self.kind, self.detail)
    }
}

/// Histories of every block. Times are nanoseconds since the run began.
#[derive(Default)]
pub struct Oracle {
    blocks: HashMap<u64, Vec<WriteRec>>,
    next_id: u64,
    pub violations: Vec<Violation>,
    pub reads_checked: u64,
    pub writes_acked: u64,
    pub writes_failed: u64,
}

impl Oracle {
    /// Registers a write about to be issued; returns its id.
    pub fn begin_write(&mut self, block: u64, now_ns: u64) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.blocks.entry(block).or_default().push(WriteRec {
            id,
            issued_ns: now_ns,
            acked_ns: None,
        });
        id
    }

    /// The write was acknowledged (`ok`) or failed (its outcome is unknown: it may land later).
    pub fn end_write(&mut self, block: u64, id: u64, ok: bool, now_ns: u64) {
        if let Some(r) = self
            .blocks
            .get_mut(&block)
            .and_then(|h| h.iter_mut().rev().find(|r| r.id == id))
        {
            if ok {
                r.acked_ns = Some(now_ns);
                self.writes_acked += 1;
            } else {
                self.writes_failed += 1;
            }
        }
    }

    /// Judges a read of `block` that began at `start_ns`, ended at `end_ns` and returned `data`.
    pub fn check_read(&mut self, block: u64, data: &[u8], start_ns: u64, end_ns: u64) -> Result<(), Violation> {
        self.reads_checked += 1;
        let r = self.judge(block, data, start_ns, end_ns);
        if let Err(v) = &r {
            self.violations.push(v.clone());
        }
        r
    }

    fn judge(&self, block: u64, data: &[u8], start_ns: u64, end_ns: u64) -> Result<(), Violation> {
        let history: &[WriteRec] = self.blocks.get(&block).map(Vec::as_slice).unwrap_or(&[]);
        // The newest write acknowledged before the read began: nothing older may be returned.
        let floor = history.iter().rposition(|w| w.acked_ns.is_some_and(|a| a < start_ns));
        let v = |kind, detail: String| Violation { block, kind, detail };
        match decode(data) {
            Content::Corrupt => Err(v("corrupt", "bad magic or checksum".into())),
            Content::Zero => match floor {
                Some(i) => Err(v(
                    "lost",
                    format!(
                        "read zeros, but write {} was acknowledged {:.3} s before the read began",
                        history[i].id,
                        ns_to_s(start_ns.saturating_sub(history[i].acked_ns.unwrap_or(0)))
                    ),
                )),
                None => Ok(()),
            },
            Content::Write { block: b, id } if b != block => {
                Err(v("foreign", format!("read block {b}'s write {id} at block {block}")))
            }
            Content::Write { id, .. } => {
                let Some(pos) = history.iter().position(|w| w.id == id) else {
                    return Err(v("foreign", format!("write {id} was never issued for this block")));
                };
                if history[pos].issued_ns > end_ns {
                    return Err(v("future", format!("write {id} was issued after the read ended")));
                }
                match floor {
                    Some(f) if pos < f => {
                        let newer = &history[f];
                        let kind = if history[pos].acked_ns.is_some() {
                            "lost"
                        } else {
                            "stale"
                        };
                        Err(v(
                            kind,
                            format!(
                                "read write {id} ({}), but write {} was acknowledged {:.3} s before the read began",
                                if history[pos].acked_ns.is_some() {
                                    "acknowledged"
                                } else {
                                    "never acknowledged"
                                },
                                newer.id,
                                ns_to_s(start_ns.saturating_sub(newer.acked_ns.unwrap_or(0)))
                            ),
                        ))
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    /// For every block, the newest write acknowledged before `t_ns` as (block, write id): what a
    /// flush issued at `t_ns` promises to keep.
    pub fn acked_before(&self, t_ns: u64) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self
            .blocks
            .iter()
            .filter_map(|(&b, h)| {
                h.iter()
                    .rev()
                    .find(|w| w.acked_ns.is_some_and(|a| a < t_ns))
                    .map(|w| (b, w.id))
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// Judges a read of `block` against a durability promise: it must return write `promised`
    /// or a write issued after it (zeros or an older write mean the promised write was lost).
    /// A broken promise is recorded as a `lost` violation.
    pub fn check_survived(&mut self, block: u64, promised: u64, data: &[u8]) -> Result<(), Violation> {
        let history: &[WriteRec] = self.blocks.get(&block).map(Vec::as_slice).unwrap_or(&[]);
        let floor = history.iter().position(|w| w.id == promised);
        let got = match decode(data) {
            Content::Zero => None,
            Content::Write { block: b, id } if b == block => history.iter().position(|w| w.id == id),
            // Foreign or corrupt: check_read reports those.
            _ => return Ok(()),
        };
        match (floor, got) {
            (Some(f), Some(g)) if g >= f => Ok(()),
            (None, _) => Ok(()),
            (Some(_), got) => {
                let v = Violation {
                    block,
                    kind: "lost",
                    detail: format!(
                        "write {promised} (issued at {:.3} s, acknowledged at {:.3} s) was acknowledged \
                         before a completed flush, but the read after the restart returned {}",
                        history.get(floor.unwrap_or(0)).map_or(0.0, |w| ns_to_s(w.issued_ns)),
                        history
                            .get(floor.unwrap_or(0))
                            .and_then(|w| w.acked_ns)
                            .map_or(0.0, ns_to_s),
                        match got {
                            Some(g) => format!(
                                "the older write {} (issued at {:.3} s, acknowledged at {})",
                                history[g].id,
                                ns_to_s(history[g].issued_ns),
                                history[g]
                                    .acked_ns
                                    .map_or("never".to_string(), |a| format!("{:.3} s", ns_to_s(a)))
                            ),
                            None => "zeros".into(),
                        }
                    ),
                };
                self.violations.push(v.clone());
                Err(v)
            }
        }
    }

    /// Blocks written so far.
    pub fn written_blocks(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.blocks.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

fn ns_to_s(ns: u64) -> f64 {
    ns as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_and_detect_damage() {
        let b = encode(7, 42);
        assert_eq!(decode(&b), Content::Write { block: 7, id: 42 });
        let mut bad = b.clone();
        bad[100] ^= 1;
        assert_eq!(decode(&bad), Content::Corrupt);
        assert_eq!(decode(&vec![0u8; BLOCK]), Content::Zero);
        assert_eq!(decode(&b[..100]), Content::Corrupt);
    }

    #[test]
    fn linearizable_reads_pass() {
        let mut o = Oracle::default();
        let w1 = o.begin_write(1, 10);
        o.end_write(1, w1, true, 20);
        // Read overlapping the next write: old or new are both fine.
        let w2 = o.begin_write(1, 30);
        assert!(o.check_read(1, &encode(1, w1), 35, 40).is_ok());
        assert!(o.check_read(1, &encode(1, w2), 35, 40).is_ok());
        o.end_write(1, w2, true, 50);
        assert!(o.check_read(1, &encode(1, w2), 60, 70).is_ok());
        // A block never written reads as zeros.
        assert!(o.check_read(2, &vec![0u8; BLOCK], 60, 70).is_ok());
        // A failed write may or may not have landed, until a newer one is acknowledged.
        let w3 = o.begin_write(1, 80);
        o.end_write(1, w3, false, 90);
        assert!(o.check_read(1, &encode(1, w2), 100, 110).is_ok());
        assert!(o.check_read(1, &encode(1, w3), 100, 110).is_ok());
        assert!(o.violations.is_empty());
    }

    #[test]
    fn lost_stale_foreign_and_corrupt_reads_are_caught() {
        let mut o = Oracle::default();
        let w1 = o.begin_write(1, 10);
        o.end_write(1, w1, true, 20);
        let w2 = o.begin_write(1, 30);
        o.end_write(1, w2, true, 40);
        assert_eq!(o.check_read(1, &encode(1, w1), 50, 60).unwrap_err().kind, "lost");
        assert_eq!(o.check_read(1, &vec![0u8; BLOCK], 50, 60).unwrap_err().kind, "lost");
        // A failed write that shows up after a newer one was acknowledged: stale.
        let w3 = o.begin_write(1, 70);
        o.end_write(1, w3, false, 80);
        let w4 = o.begin_write(1, 90);
        o.end_write(1, w4, true, 100);
        assert_eq!(o.check_read(1, &encode(1, w3), 110, 120).unwrap_err().kind, "stale");
        assert_eq!(o.check_read(1, &encode(2, w4), 110, 120).unwrap_err().kind, "foreign");
        assert_eq!(o.check_read(1, &encode(1, 999), 110, 120).unwrap_err().kind, "foreign");
        let mut bad = encode(1, w4);
        bad[4000] ^= 0xff;
        assert_eq!(o.check_read(1, &bad, 110, 120).unwrap_err().kind, "corrupt");
        assert_eq!(o.violations.len(), 6);
    }

    #[test]
    fn flush_promises_are_checked() {
        let mut o = Oracle::default();
        let w1 = o.begin_write(1, 10);
        o.end_write(1, w1, true, 20);
        let w2 = o.begin_write(1, 30);
        o.end_write(1, w2, true, 40);
        let w3 = o.begin_write(2, 30);
        // Block 2's only write is still in flight at the flush: nothing promised there.
        assert_eq!(o.acked_before(35), vec![(1, w1)]);
        assert_eq!(o.acked_before(45), vec![(1, w2)]);
        o.end_write(2, w3, false, 50);
        assert!(o.check_survived(1, w1, &encode(1, w1)).is_ok());
        assert!(o.check_survived(1, w1, &encode(1, w2)).is_ok());
        assert_eq!(o.check_survived(1, w2, &encode(1, w1)).unwrap_err().kind, "lost");
        assert_eq!(o.check_survived(1, w1, &vec![0u8; BLOCK]).unwrap_err().kind, "lost");
        assert_eq!(o.violations.len(), 2);
    }
}
