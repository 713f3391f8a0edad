//! DESIGN.md invariant 3's "hung path" clause WITHOUT a leadership change (needs root for the
//! NFQUEUE delayer, and the built binaries; skipped otherwise).
//!
//! A write sent on a path that then hangs is still in the network when the client gives up on
//! the path, re-sends it elsewhere and writes newer data to the same block. Nothing changes the
//! ALUA epoch, so the epoch fence cannot refuse the late copy when it arrives on the still-open
//! session; FENCE SESSIONS (`raftsan_proto::scsi::fence`) does: the client names the abandoned
//! session through another path, the fence goes into the volume's log, and the late write is
//! refused on every replica.
//!
//! `cargo test -p raftsan-chaos --test hung_path -- --nocapture` (root).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use raftsan_chaos::netem::{self, NetFault};
use raftsan_chaos::oracle::{Content, decode};
use raftsan_chaos::stale::{Volume, describe, execute, session_config};
use raftsan_initiator::connector::IscsiConnector;
use raftsan_initiator::multipath::{Multipath, MultipathConfig, Request, fence};
use raftsan_initiator::session::{Command, Session, SessionConfig};
use raftsan_tests::cluster::{Cluster, group_leader};

/// Delay on the hung path, each way: longer than the client's patience (below), shorter than the
/// target's NOP-In timeout, so the target still holds the session when the late write arrives.
const HANG: Duration = Duration::from_millis(2000);

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: needs root (iptables NFQUEUE)");
    }
    root
}

/// Delays the client's path to `ip`'s portal by [`HANG`] each way until dropped.
fn hang(ip: std::net::Ipv4Addr) -> netem::Degraded {
    netem::degrade_portal(
        ip,
        NetFault::Delay {
            delay_ms: HANG.as_millis() as u32,
            jitter_ms: 0,
        },
    )
    .expect("delay")
}

fn session_ref(s: &Session) -> fence::SessionRef {
    let n = s.negotiated();
    fence::SessionRef {
        tpgt: n.tpgt.expect("the target named its portal group"),
        tsih: n.tsih,
        isid: n.isid,
    }
}

fn fence_command(lun: u64, sessions: &[fence::SessionRef]) -> Command {
    Command {
        lun,
        cdb: fence::cdb(sessions.len()).to_vec(),
        data_out: Some(Bytes::from(fence::encode(sessions))),
        data_in_len: 0,
    }
}

struct Setup {
    c: Cluster,
    target: String,
    lun: u64,
    leader: u64,
    follower: u64,
}

fn cluster() -> Setup {
    let mut c = Cluster::start(3).expect("cluster");
    let (group, target, lun) = c.create_volume("hung", "16M").expect("volume");
    let leader = c.settled_leader(group, Duration::from_secs(1)).expect("leader");
    let s = c.status().expect("status");
    assert_eq!(group_leader(&s, group), Some(leader));
    let follower = (1..=3).find(|&n| n != leader).expect("follower");
    Setup {
        c,
        target,
        lun,
        leader,
        follower,
    }
}

/// Two sessions to the leader hang with a write each in flight; the client moves on through a
/// follower's portal and fences only the first. When the late writes arrive, the fenced one is
/// refused and the other (the control: what a client without fencing gets) is executed.
#[test]
fn a_late_write_of_a_fenced_session_is_refused_and_an_unfenced_one_is_not() {
    if !root() {
        return;
    }
    let Setup {
        c,
        target,
        lun,
        leader,
        follower,
    } = cluster();
    let l_portal = SocketAddr::V4(c.node(leader).expect("node").portal());
    let f_portal = SocketAddr::V4(c.node(follower).expect("node").portal());
    let l_ip = c.node(leader).expect("node").ip;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (fenced_block, control_block) = (100, 200);
    rt.block_on(async {
        let fenced = Arc::new(
            Session::login(l_portal, session_config(&target))
                .await
                .expect("login S1"),
        );
        let control = Arc::new(
            Session::login(l_portal, session_config(&target))
                .await
                .expect("login S1'"),
        );
        let vol = Volume::probe(&fenced, lun).await.expect("capacity");
        for (s, b) in [(&fenced, fenced_block), (&control, control_block)] {
            let r = execute(s, vol.write(b, 1)).await.expect("w0");
            assert_eq!(r.status, 0, "w0: {}", describe(&r));
        }
        let hung = hang(l_ip);
        let late: Vec<_> = [(&fenced, fenced_block), (&control, control_block)]
            .into_iter()
            .map(|(s, b)| {
                let (s, cmd) = (s.clone(), vol.write(b, 2));
                tokio::spawn(async move { s.execute(cmd).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The client gives up on the hung sessions and goes through the follower.
        let s2 = Session::login(f_portal, session_config(&target))
            .await
            .expect("login S2");
        let r = execute(&s2, fence_command(lun, &[session_ref(&fenced)]))
            .await
            .expect("fence");
        assert_eq!(r.status, 0, "FENCE SESSIONS: {}", describe(&r));
        for b in [fenced_block, control_block] {
            let r = execute(&s2, vol.write(b, 3)).await.expect("w_new");
            assert_eq!(r.status, 0, "w_new: {}", describe(&r));
        }
        let mut outcomes = Vec::new();
        for l in late {
            let r = tokio::time::timeout(HANG * 5, l).await;
            outcomes.push(format!("{r:?}"));
        }
        drop(hung);
        let fenced_reads = decode(&execute(&s2, vol.read(fenced_block)).await.expect("read").data);
        let control_reads = decode(&execute(&s2, vol.read(control_block)).await.expect("read").data);
        eprintln!("late writes: {outcomes:?}; fenced block {fenced_reads:?}, control block {control_reads:?}");
        assert_eq!(
            fenced_reads,
            Content::Write {
                block: fenced_block,
                id: 3
            },
            "the late write of the fenced session overwrote newer data (late: {})",
            outcomes[0]
        );
        assert!(
            outcomes[0].contains("status: 2") && !outcomes[0].contains("status: 0"),
            "the fenced session's late write must end in CHECK CONDITION: {}",
            outcomes[0]
        );
        // The control proves the late delivery happened: without a fence it overwrites.
        assert_eq!(
            control_reads,
            Content::Write {
                block: control_block,
                id: 2
            },
            "the unfenced control's late write was expected to land (late: {})",
            outcomes[1]
        );
    });
    drop(c);
}

/// The same through raftsan-initiator's multipath layer, which fences on its own: a write in
/// flight on the leader's path when the path hangs is re-sent elsewhere after a fence, a newer
/// write follows, and the late copy does not overwrite it.
#[test]
fn the_multipath_initiator_fences_a_hung_path_before_re_sending_its_writes() {
    if !root() {
        return;
    }
    let Setup {
        c, target, lun, leader, ..
    } = cluster();
    let portals: Vec<String> = (1..=3).map(|n| c.node(n).expect("node").portal().to_string()).collect();
    let l_ip = c.node(leader).expect("node").ip;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let block = 300;
    rt.block_on(async {
        let cfg = SessionConfig {
            // Give up on a silent path well within HANG.
            nop_interval: Duration::from_millis(300),
            nop_timeout: Duration::from_millis(600),
            command_timeout: Duration::from_secs(30),
            ..session_config(&target)
        };
        let mp = Multipath::start(
            IscsiConnector { cfg },
            MultipathConfig {
                target: target.clone(),
                lun,
                portals,
                discover: false,
                alua_refresh: Duration::from_millis(200),
                ..MultipathConfig::default()
            },
        );
        assert!(mp.wait_usable(Duration::from_secs(20)).await, "no usable path");
        // Wait until the leader's path is known as Active/Optimized, so the write goes there.
        let l_portal = c.node(leader).expect("node").portal().to_string();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !mp
            .view()
            .paths
            .iter()
            .any(|p| p.portal == l_portal && p.alua == "active/optimized")
        {
            assert!(tokio::time::Instant::now() < deadline, "{:?}", mp.view().paths);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let vol = {
            let s = Session::login(l_portal.parse().expect("portal"), session_config(&target))
                .await
                .expect("login");
            Volume::probe(&s, lun).await.expect("capacity")
        };
        let req = |cmd: Command| Request {
            lun: cmd.lun,
            cdb: cmd.cdb,
            data_out: cmd.data_out,
            data_in_len: cmd.data_in_len,
        };
        let r = mp.execute(req(vol.write(block, 1))).await.expect("w0");
        assert_eq!(r.status, 0);
        let hung = hang(l_ip);
        // In flight on the leader's path when it hangs; re-sent elsewhere after the fence.
        let r = mp.execute(req(vol.write(block, 2))).await.expect("w_old");
        assert_eq!(r.status, 0);
        let r = mp.execute(req(vol.write(block, 3))).await.expect("w_new");
        assert_eq!(r.status, 0);
        // Let the late copy of w_old arrive, then read through whatever path serves.
        tokio::time::sleep(HANG + Duration::from_millis(1500)).await;
        drop(hung);
        let r = mp.execute(req(vol.read(block))).await.expect("read");
        let read = decode(&r.data);
        let failovers = mp.view().failovers;
        mp.shutdown().await;
        assert!(failovers >= 1, "the hung path never failed over");
        assert_eq!(
            read,
            Content::Write { block, id: 3 },
            "the late copy of a write re-sent after a path hung overwrote newer data"
        );
    });
    drop(c);
}

/// FENCE SESSIONS itself, without a hung path (no root needed): malformed parameter lists are
/// refused, an initiator's fence never touches another initiator's session (the key includes the
/// sender's name) nor the session it is sent on, and a fenced session's writes are not executed.
#[test]
fn fence_sessions_checks_its_list_and_fences_only_the_senders_other_sessions() {
    let Setup {
        c,
        target,
        lun,
        leader,
        follower,
    } = cluster();
    let l_portal = SocketAddr::V4(c.node(leader).expect("node").portal());
    let f_portal = SocketAddr::V4(c.node(follower).expect("node").portal());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let named = |name: &str| SessionConfig {
            initiator_name: name.into(),
            ..session_config(&target)
        };
        let (x, y) = ("iqn.2026-11.org.raftsan.test:x", "iqn.2026-11.org.raftsan.test:y");
        let a = Session::login(l_portal, named(x)).await.expect("login A (x)");
        let b = Session::login(l_portal, named(y)).await.expect("login B (y)");
        let s = Session::login(f_portal, named(x)).await.expect("login S (x)");
        let vol = Volume::probe(&a, lun).await.expect("capacity");
        // Every session past its first unit attentions, each block written once.
        for (i, sess) in [&a, &b, &s].into_iter().enumerate() {
            let r = execute(sess, vol.write(10 + i as u64, 1)).await.expect("w0");
            assert_eq!(r.status, 0, "w0: {}", describe(&r));
        }
        let check = |r: &raftsan_initiator::session::CommandResult| {
            let sense = r.sense.as_deref().and_then(raftsan_initiator::scsi::Sense::parse);
            (r.status, sense.map(|s| (s.code.key, s.code.asc, s.code.ascq)))
        };
        // Malformed lists: ILLEGAL REQUEST, nothing fenced.
        let mut short = fence_command(lun, &[session_ref(&a)]);
        short.data_out = short.data_out.map(|d| d.slice(..11));
        let mut dirty = fence_command(lun, &[session_ref(&a)]);
        let mut bytes = dirty.data_out.take().expect("data").to_vec();
        bytes[11] = 1;
        dirty.data_out = Some(Bytes::from(bytes));
        for (what, cmd) in [("short", short), ("reserved bytes set", dirty)] {
            let r = execute(&s, cmd).await.expect("fence");
            assert_eq!(check(&r).0, 2, "{what}: {}", describe(&r));
            assert_eq!(check(&r).1.map(|k| k.0), Some(5), "{what}: {}", describe(&r));
        }
        // x names y's session and its own S: neither is fenced.
        let r = execute(&s, fence_command(lun, &[session_ref(&b), session_ref(&s)]))
            .await
            .expect("fence");
        assert_eq!(r.status, 0, "{}", describe(&r));
        for (sess, block) in [(&b, 11), (&s, 12)] {
            let r = sess.execute(vol.write(block, 2)).await.expect("write");
            assert_eq!(r.status, 0, "a session the fence must not touch: {}", describe(&r));
        }
        // x fences its session A: A's next write is refused and not executed.
        let r = execute(&s, fence_command(lun, &[session_ref(&a)]))
            .await
            .expect("fence");
        assert_eq!(r.status, 0, "{}", describe(&r));
        let r = a.execute(vol.write(10, 2)).await.expect("write");
        assert_eq!(check(&r), (2, Some((6, 0x2a, 0x06))), "{}", describe(&r));
        let r = execute(&s, vol.read(10)).await.expect("read");
        assert_eq!(decode(&r.data), Content::Write { block: 10, id: 1 });
        // A read on the fenced session still works (nothing to refuse).
        let r = execute(&a, vol.read(11)).await.expect("read");
        assert_eq!(decode(&r.data), Content::Write { block: 11, id: 2 });
    });
    drop(c);
}
