//! FENCE SESSIONS, raftsan's vendor-specific command (DESIGN.md invariant 3, hung paths).
//!
//! A multipath initiator that gives up on a path while commands on it have no answer cannot know
//! whether the network still holds them: a WRITE delivered late, after the initiator re-sent it
//! and then wrote newer data through another path, would overwrite that newer data. Before it
//! sends anything through another path, raftsan-initiator names the abandoned sessions in a FENCE
//! SESSIONS command; a raftsan cluster puts the fence in the volume's log, and every write of a
//! fenced session ordered after it is refused. Only the initiator's own sessions can be named
//! (the target pairs each entry with the requesting session's initiator name).
//!
//! ```text
//! CDB (10 bytes):  0: opcode C7h   1-6: reserved   7-8: parameter list length   9: control
//! parameter list:  n entries of 12 bytes (n <= MAX_SESSIONS):
//!                  0-1: target portal group tag   2-3: TSIH   4-9: ISID   10-11: reserved
//! ```
//!
//! A target without the command answers ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE, which
//! the initiator takes as "no fencing here".

/// Operation code (vendor specific, SPC-4 group 6).
pub const OPCODE: u8 = 0xc7;
/// Length of the CDB.
pub const CDB_LEN: usize = 10;
/// Length of one parameter list entry.
pub const ENTRY_LEN: usize = 12;
/// Most sessions one command may name.
pub const MAX_SESSIONS: usize = 64;

/// One session of the requesting initiator, as the target that accepted its login named it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionRef {
    pub tpgt: u16,
    pub tsih: u16,
    pub isid: [u8; 6],
}

/// Why a parameter list was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    #[error("CDB of {0} bytes, FENCE SESSIONS needs {CDB_LEN}")]
    ShortCdb(usize),
    #[error("parameter list length {declared} in the CDB but {got} bytes of data")]
    LengthMismatch { declared: usize, got: usize },
    #[error("parameter list of {0} bytes is not a whole number of {ENTRY_LEN}-byte entries")]
    Ragged(usize),
    #[error("{0} sessions named, at most {MAX_SESSIONS} allowed")]
    TooMany(usize),
    #[error("empty parameter list")]
    Empty,
    #[error("entry {0}: reserved bytes are not zero")]
    Reserved(usize),
}

/// The CDB for a parameter list of `sessions` entries (at most [`MAX_SESSIONS`]; more are cut).
pub fn cdb(sessions: usize) -> [u8; CDB_LEN] {
    let len = (sessions.min(MAX_SESSIONS) * ENTRY_LEN) as u16;
    let mut c = [0u8; CDB_LEN];
    c[0] = OPCODE;
    c[7..9].copy_from_slice(&len.to_be_bytes());
    c
}

/// The parameter list naming `sessions` (at most [`MAX_SESSIONS`]; more are cut).
pub fn encode(sessions: &[SessionRef]) -> Vec<u8> {
    let mut out = Vec::with_capacity(sessions.len().min(MAX_SESSIONS) * ENTRY_LEN);
    for s in sessions.iter().take(MAX_SESSIONS) {
        out.extend_from_slice(&s.tpgt.to_be_bytes());
        out.extend_from_slice(&s.tsih.to_be_bytes());
        out.extend_from_slice(&s.isid);
        out.extend_from_slice(&[0, 0]);
    }
    out
}

/// Decodes a FENCE SESSIONS command: its CDB and the data-out it carried.
pub fn parse(cdb: &[u8], data: &[u8]) -> Result<Vec<SessionRef>, FenceError> {
    if cdb.len() < CDB_LEN {
        return Err(FenceError::ShortCdb(cdb.len()));
    }
    let declared = usize::from(u16::from_be_bytes([cdb[7], cdb[8]]));
    if declared != data.len() {
        return Err(FenceError::LengthMismatch {
            declared,
            got: data.len(),
        });
    }
    if data.is_empty() {
        return Err(FenceError::Empty);
    }
    if !data.len().is_multiple_of(ENTRY_LEN) {
        return Err(FenceError::Ragged(data.len()));
    }
    let n = data.len() / ENTRY_LEN;
    if n > MAX_SESSIONS {
        return Err(FenceError::TooMany(n));
    }
    if let Some(i) = data.chunks_exact(ENTRY_LEN).position(|e| e[10..12] != [0, 0]) {
        return Err(FenceError::Reserved(i));
    }
    Ok(data
        .chunks_exact(ENTRY_LEN)
        .map(|e| {
            let mut isid = [0u8; 6];
            isid.copy_from_slice(&e[4..10]);
            SessionRef {
                tpgt: u16::from_be_bytes([e[0], e[1]]),
                tsih: u16::from_be_bytes([e[2], e[3]]),
                isid,
            }
        })
        .collect())
}

/// The cluster-wide key of a session's writes: FNV-1a (64 bit) of the initiator name, ISID, TPGT
/// and TSIH. The same on every node; an initiator can only name keys under its own name.
pub fn session_key(initiator_name: &str, s: &SessionRef) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    };
    for b in initiator_name.to_ascii_lowercase().bytes() {
        eat(b);
    }
    eat(0);
    for b in s.isid {
        eat(b);
    }
    for b in s.tpgt.to_be_bytes() {
        eat(b);
    }
    for b in s.tsih.to_be_bytes() {
        eat(b);
    }
    // 0 means "no session" in the log.
    h.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(tpgt: u16, tsih: u16) -> SessionRef {
        SessionRef {
            tpgt,
            tsih,
            isid: [0x80, 1, 2, 3, 4, 5],
        }
    }

    #[test]
    fn round_trip() {
        let list = vec![s(1, 7), s(3, 0xfffe)];
        let cdb = cdb(list.len());
        assert_eq!(cdb[0], OPCODE);
        assert_eq!(u16::from_be_bytes([cdb[7], cdb[8]]), 24);
        assert_eq!(parse(&cdb, &encode(&list)).unwrap(), list);
    }

    #[test]
    fn malformed_lists_are_refused() {
        let one = encode(&[s(1, 1)]);
        assert_eq!(parse(&[OPCODE; 6], &one), Err(FenceError::ShortCdb(6)));
        assert_eq!(
            parse(&cdb(2), &one),
            Err(FenceError::LengthMismatch { declared: 24, got: 12 })
        );
        assert_eq!(parse(&cdb(0), &[]), Err(FenceError::Empty));
        let mut c = cdb(1);
        c[8] = 13;
        assert_eq!(parse(&c, &[0; 13]), Err(FenceError::Ragged(13)));
        let mut dirty = encode(&[s(1, 1), s(1, 2)]);
        dirty[ENTRY_LEN + 11] = 1;
        assert_eq!(parse(&cdb(2), &dirty), Err(FenceError::Reserved(1)));
        let many = vec![0u8; (MAX_SESSIONS + 1) * ENTRY_LEN];
        let mut c = cdb(1);
        c[7..9].copy_from_slice(&(many.len() as u16).to_be_bytes());
        assert_eq!(parse(&c, &many), Err(FenceError::TooMany(MAX_SESSIONS + 1)));
        // The encoder never produces more than the limit.
        let long: Vec<SessionRef> = (0..100).map(|i| s(1, i)).collect();
        assert_eq!(encode(&long).len(), MAX_SESSIONS * ENTRY_LEN);
        assert_eq!(cdb(100), cdb(MAX_SESSIONS));
    }

    #[test]
    fn session_keys_differ_by_every_part() {
        let base = session_key("iqn.a", &s(1, 7));
        assert_eq!(base, session_key("IQN.A", &s(1, 7)), "names compare case-insensitively");
        assert_ne!(base, session_key("iqn.b", &s(1, 7)));
        assert_ne!(base, session_key("iqn.a", &s(2, 7)));
        assert_ne!(base, session_key("iqn.a", &s(1, 8)));
        let mut other = s(1, 7);
        other.isid[5] = 6;
        assert_ne!(base, session_key("iqn.a", &other));
        assert_ne!(base, 0);
    }
}
