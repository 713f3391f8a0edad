//! The multipath layer against fake paths: failover, failback, ALUA, identity checks and the
//! bounded wait while no path is usable. Real targets are in tests/tests/initiator_*.rs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use raftsan_initiator::multipath::{
    Connector, DiscoveredPortal, Multipath, MultipathConfig, MultipathError, PathConn, PathFailure, PathStatus, Reply,
    Request,
};
use raftsan_proto::scsi::fence::{self, SessionRef};
use tokio::sync::watch;

/// One fake node: is it reachable, which LU does it export, which port group is it.
#[derive(Clone)]
struct Node {
    up: bool,
    /// Last byte of the NAA identity.
    lu: u8,
    group: u16,
    /// Answer every media command with this sense (key, asc, ascq) instead of executing it.
    sense: Option<(u8, u8, u8)>,
    /// Media commands get no answer until the session dies (a hung path).
    hang: bool,
    /// Answer FENCE SESSIONS with INVALID COMMAND OPERATION CODE (a target without it).
    no_fence: bool,
}

#[derive(Default)]
struct World {
    nodes: HashMap<String, Node>,
    /// The port group reported Active/Optimized; the others are Active/Non-optimized.
    leader: u16,
    /// Which portal executed each WRITE, in order.
    writes: Vec<String>,
    /// WRITEs and FENCE SESSIONS in the order the nodes executed them: "write@a:1",
    /// "fence@b:1 1/7" (TPGT/TSIH of each fenced session).
    events: Vec<String>,
    /// TSIH of the last login.
    last_tsih: u16,
    /// Pending unit attention per portal (key 6 ASC/ASCQ), delivered once.
    ua: HashMap<String, (u8, u8)>,
    /// Live sessions, so a node "crash" can kill them.
    sessions: Vec<(String, watch::Sender<Option<String>>)>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<World>>);

impl Fake {
    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.0.lock().unwrap()
    }

    fn add(&self, portal: &str, lu: u8, group: u16) {
        self.world().nodes.insert(
            portal.into(),
            Node {
                up: true,
                lu,
                group,
                sense: None,
                hang: false,
                no_fence: false,
            },
        );
    }

    /// The node dies: its sessions drop and new logins fail.
    fn kill(&self, portal: &str) {
        let mut w = self.world();
        w.nodes.get_mut(portal).unwrap().up = false;
        for (p, tx) in &w.sessions {
            if p == portal {
                let _ = tx.send(Some(format!("{portal}: connection reset")));
            }
        }
    }

    fn revive(&self, portal: &str) {
        self.world().nodes.get_mut(portal).unwrap().up = true;
    }
}

#[derive(Clone)]
struct FakeConn {
    fake: Fake,
    portal: String,
    tpgt: u16,
    tsih: u16,
    dead: watch::Receiver<Option<String>>,
    kill: Arc<watch::Sender<Option<String>>>,
}

fn good(data: Vec<u8>) -> Reply {
    Reply {
        status: 0,
        sense: None,
        data: Bytes::from(data),
    }
}

fn check(key: u8, asc: u8, ascq: u8) -> Reply {
    let mut s = vec![0u8; 18];
    s[0] = 0x70;
    s[2] = key;
    s[7] = 10;
    s[12] = asc;
    s[13] = ascq;
    Reply {
        status: 2,
        sense: Some(Bytes::from(s)),
        data: Bytes::new(),
    }
}

impl PathConn for FakeConn {
    async fn execute(&self, req: Request) -> Result<Reply, PathFailure> {
        if let Some(why) = self.dead.borrow().clone() {
            return Err(PathFailure(why));
        }
        tokio::task::yield_now().await;
        let op = req.cdb[0];
        let hang = self.fake.world().nodes.get(&self.portal).is_some_and(|n| n.hang);
        if hang && !matches!(op, 0x12 | 0xa3) {
            let mut rx = self.dead.clone();
            let why = rx.wait_for(|d| d.is_some()).await.map(|d| d.clone()).ok().flatten();
            return Err(PathFailure(why.unwrap_or_else(|| "gone".into())));
        }
        let mut w = self.fake.world();
        let node = w.nodes.get(&self.portal).cloned().unwrap();
        if !node.up {
            return Err(PathFailure("connection reset".into()));
        }
        if op != 0x12
            && let Some((asc, ascq)) = w.ua.remove(&self.portal)
        {
            return Ok(check(6, asc, ascq));
        }
        match op {
            0x12 if req.cdb[1] & 1 == 0 => {
                let mut d = vec![0u8; 96];
                d[5] = 0x10; // TPGS implicit
                d[8..16].copy_from_slice(b"FAKE    ");
                d[16..32].copy_from_slice(b"DISK            ");
                Ok(good(d))
            }
            0x12 => {
                let mut d = vec![0, 0x83, 0, 0];
                d.extend([1, 0x03, 0, 8, 0x60, 0, 0, 0, 0, 0, 0, node.lu]);
                d.extend([1, 0x14, 0, 4, 0, 0, 0, node.group as u8]);
                d.extend([1, 0x15, 0, 4, 0, 0, 0, node.group as u8]);
                let n = (d.len() - 4) as u16;
                d[2..4].copy_from_slice(&n.to_be_bytes());
                Ok(good(d))
            }
            0xa3 => {
                let mut groups: Vec<u16> = w.nodes.values().map(|n| n.group).collect();
                groups.sort();
                groups.dedup();
                let mut d = vec![0u8; 4];
                for g in groups {
                    let state = match node.sense {
                        // A node in transition says so for its own group, as RTPG does.
                        Some((2, 4, 0x0a)) if g == node.group => 0x0f,
                        _ if g == w.leader => 0,
                        _ => 1,
                    };
                    d.extend([state, 0x01, 0, g as u8, 0, 0, 0, 1, 0, 0, 0, g as u8]);
                }
                let n = (d.len() - 4) as u32;
                d[0..4].copy_from_slice(&n.to_be_bytes());
                Ok(good(d))
            }
            fence::OPCODE if node.no_fence => {
                w.events.push(format!("fence-refused@{}", self.portal));
                Ok(check(5, 0x20, 0))
            }
            fence::OPCODE => {
                let list = fence::parse(&req.cdb, req.data_out.as_deref().unwrap_or_default()).unwrap();
                let named: Vec<String> = list.iter().map(|r| format!("{}/{}", r.tpgt, r.tsih)).collect();
                w.events.push(format!("fence@{} {}", self.portal, named.join(",")));
                Ok(good(Vec::new()))
            }
            _ => {
                if let Some((k, a, q)) = node.sense {
                    return Ok(check(k, a, q));
                }
                if op == 0x8a {
                    w.writes.push(self.portal.clone());
                    w.events.push(format!("write@{}", self.portal));
                }
                Ok(good(vec![0u8; req.data_in_len as usize]))
            }
        }
    }

    async fn closed(&self) -> PathFailure {
        let mut rx = self.dead.clone();
        match rx.wait_for(|d| d.is_some()).await {
            Ok(d) => PathFailure(d.clone().unwrap_or_default()),
            Err(_) => PathFailure("gone".into()),
        }
    }

    fn close_hard(&self) {
        let _ = self.kill.send(Some("closed hard".into()));
    }

    async fn logout(&self) {
        let _ = self.kill.send(Some("logged out".into()));
    }

    fn details(&self) -> Vec<(String, String)> {
        vec![
            ("portal".into(), self.portal.clone()),
            ("session".into(), format!("{}/{}", self.tpgt, self.tsih)),
        ]
    }

    fn session_ref(&self) -> Option<SessionRef> {
        Some(SessionRef {
            tpgt: self.tpgt,
            tsih: self.tsih,
            isid: [0x80, 0, 0, 0, 0, 1],
        })
    }
}

impl Connector for Fake {
    type Conn = FakeConn;

    async fn connect(&self, portal: &str, _target: &str) -> Result<FakeConn, PathFailure> {
        let mut w = self.world();
        let tpgt = match w.nodes.get(portal) {
            Some(n) if n.up => n.group,
            _ => return Err(PathFailure(format!("{portal}: connection refused"))),
        };
        let (tx, rx) = watch::channel(None);
        w.sessions.push((portal.into(), tx.clone()));
        w.last_tsih += 1;
        Ok(FakeConn {
            fake: self.clone(),
            portal: portal.into(),
            tpgt,
            tsih: w.last_tsih,
            dead: rx,
            kill: Arc::new(tx),
        })
    }

    async fn discover(&self, _portal: &str) -> Result<Vec<(String, Vec<DiscoveredPortal>)>, PathFailure> {
        let w = self.world();
        let mut portals: Vec<DiscoveredPortal> = w
            .nodes
            .iter()
            .map(|(p, n)| DiscoveredPortal {
                address: p.clone(),
                tpgt: n.group,
            })
            .collect();
        portals.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(vec![("iqn.t:v".into(), portals)])
    }
}

fn config(portals: &[&str]) -> MultipathConfig {
    MultipathConfig {
        target: "iqn.t:v".into(),
        portals: portals.iter().map(|p| p.to_string()).collect(),
        discover: false,
        no_path_retry: Duration::from_millis(800),
        relogin_backoff: (Duration::from_millis(10), Duration::from_millis(50)),
        alua_refresh: Duration::from_millis(100),
        ..MultipathConfig::default()
    }
}

fn write() -> Request {
    Request {
        lun: 0,
        cdb: vec![0x8a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],
        data_out: None,
        data_in_len: 0,
    }
}

fn three_nodes() -> Fake {
    let fake = Fake::default();
    for (i, p) in ["a:1", "b:1", "c:1"].iter().enumerate() {
        fake.add(p, 9, i as u16 + 1);
    }
    fake.world().leader = 1;
    fake
}

async fn all_up(mp: &Multipath<Fake>, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while mp.view().paths.iter().filter(|p| p.status == PathStatus::Up).count() < n {
        assert!(
            Instant::now() < deadline,
            "paths did not come up: {:?}",
            mp.view().paths
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn io_goes_to_the_optimized_path_fails_over_and_fails_back() {
    let fake = three_nodes();
    let mp = Multipath::start(fake.clone(), config(&["a:1", "b:1", "c:1"]));
    all_up(&mp, 3).await;
    for _ in 0..10 {
        mp.execute(write()).await.unwrap();
    }
    assert!(
        fake.world().writes.iter().all(|p| p == "a:1"),
        "{:?}",
        fake.world().writes
    );
    let v = mp.view();
    assert_eq!(
        v.paths.iter().find(|p| p.portal == "a:1").unwrap().alua,
        "active/optimized"
    );
    assert_eq!(v.identity.as_deref(), Some("naa:6000000000000009"));

    // The optimized node dies and another becomes the leader: nothing fails, I/O moves.
    fake.kill("a:1");
    fake.world().leader = 2;
    fake.world().writes.clear();
    for _ in 0..10 {
        mp.execute(write()).await.unwrap();
    }
    assert!(fake.world().writes.iter().all(|p| p != "a:1"));
    assert!(mp.view().failovers >= 1);

    // Wait for the refresh to see b as optimized: then all I/O goes to b.
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.world().writes.clear();
    for _ in 0..5 {
        mp.execute(write()).await.unwrap();
    }
    assert!(
        fake.world().writes.iter().all(|p| p == "b:1"),
        "{:?}",
        fake.world().writes
    );

    // a comes back and leads again: immediate failback.
    fake.revive("a:1");
    fake.world().leader = 1;
    all_up(&mp, 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.world().writes.clear();
    for _ in 0..5 {
        mp.execute(write()).await.unwrap();
    }
    assert!(
        fake.world().writes.iter().all(|p| p == "a:1"),
        "{:?}",
        fake.world().writes
    );
    mp.shutdown().await;
}

#[tokio::test]
async fn a_portal_exporting_another_lu_is_refused() {
    let fake = three_nodes();
    fake.add("x:1", 7, 9);
    let mut cfg = config(&["a:1", "x:1"]);
    cfg.relogin_backoff = (Duration::from_secs(5), Duration::from_secs(5));
    let mp = Multipath::start(fake.clone(), cfg);
    all_up(&mp, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let v = mp.view();
    let x = v.paths.iter().find(|p| p.portal == "x:1").unwrap();
    assert_ne!(x.status, PathStatus::Up);
    assert!(x.last_error.as_deref().unwrap_or("").contains("different LU"), "{x:?}");
}

#[tokio::test]
async fn commands_wait_a_bounded_time_without_paths_then_fail_clearly() {
    let fake = three_nodes();
    let mp = Multipath::start(fake.clone(), config(&["a:1", "b:1"]));
    all_up(&mp, 2).await;
    fake.kill("a:1");
    fake.kill("b:1");
    let t = Instant::now();
    let err = mp.execute(write()).await.unwrap_err();
    let waited = t.elapsed();
    assert!(matches!(err, MultipathError::NoPath { .. }), "{err}");
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert!(err.to_string().contains("a:1"), "{err}");

    // A path that returns within the window carries the queued command.
    let pending = {
        let mp = mp.clone();
        tokio::spawn(async move { mp.execute(write()).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished());
    assert!(mp.view().queued_commands >= 1);
    fake.revive("b:1");
    pending.await.unwrap().unwrap();
}

#[tokio::test]
async fn unit_attention_and_transitioning_are_retried_and_bounded() {
    let fake = three_nodes();
    let mp = Multipath::start(fake.clone(), config(&["a:1", "b:1"]));
    all_up(&mp, 2).await;
    // 2A/06 on the optimized path: the command is re-sent and succeeds.
    fake.world().ua.insert("a:1".into(), (0x2a, 0x06));
    mp.execute(write()).await.unwrap();
    assert!(mp.view().retried_commands >= 1);

    // a says transitioning: the command goes to b instead.
    fake.world().nodes.get_mut("a:1").unwrap().sense = Some((2, 4, 0x0a));
    fake.world().writes.clear();
    assert_eq!(mp.execute(write()).await.unwrap().status, 0);
    assert_eq!(fake.world().writes, vec!["b:1".to_string()]);

    // Both transitioning forever: the command ends with the target's answer after the retries.
    fake.world().nodes.get_mut("b:1").unwrap().sense = Some((2, 4, 0x0a));
    let reply = tokio::time::timeout(Duration::from_secs(20), mp.execute(write()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.status, 2);
    assert!(reply.good().unwrap_err().contains("04h/0ah"));
}

#[tokio::test]
async fn disabled_paths_log_out_and_come_back_when_enabled() {
    let fake = three_nodes();
    let mp = Multipath::start(fake.clone(), config(&["a:1", "b:1"]));
    all_up(&mp, 2).await;
    assert!(mp.disable("a:1"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let v = mp.view();
    assert_eq!(
        v.paths.iter().find(|p| p.portal == "a:1").unwrap().status,
        PathStatus::Disabled
    );
    fake.world().writes.clear();
    mp.execute(write()).await.unwrap();
    assert_eq!(fake.world().writes, vec!["b:1".to_string()]);
    assert!(mp.enable("a:1"));
    all_up(&mp, 2).await;
    assert!(!mp.disable("nope:1"));
}

#[tokio::test]
async fn discovery_adds_every_portal_of_the_target() {
    let fake = three_nodes();
    let mut cfg = config(&["a:1"]);
    cfg.discover = true;
    let mp = Multipath::start(fake.clone(), cfg);
    all_up(&mp, 3).await;
    let v = mp.view();
    let mut portals: Vec<_> = v.paths.iter().map(|p| (p.portal.clone(), p.tpgt)).collect();
    portals.sort();
    assert_eq!(
        portals,
        vec![
            ("a:1".into(), Some(1)),
            ("b:1".into(), Some(2)),
            ("c:1".into(), Some(3))
        ]
    );
}

/// The session of `portal` as the fake target numbered it (TPGT/TSIH).
fn session_of(mp: &Multipath<Fake>, portal: &str) -> String {
    let p = mp.view().paths.into_iter().find(|p| p.portal == portal).unwrap();
    p.details.get("session").cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_path_abandoned_with_a_write_in_flight_is_fenced_before_anything_else_runs() {
    let fake = three_nodes();
    let mp = Multipath::start(fake.clone(), config(&["a:1", "b:1", "c:1"]));
    all_up(&mp, 3).await;
    let a_session = session_of(&mp, "a:1");
    mp.execute(write()).await.unwrap();
    // a's path hangs with a write on it; the session then fails (keepalive timeout).
    fake.world().nodes.get_mut("a:1").unwrap().hang = true;
    let m = mp.clone();
    let stuck = tokio::spawn(async move { m.execute(write()).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!stuck.is_finished());
    fake.world().leader = 2;
    fake.kill("a:1");
    stuck.await.unwrap().unwrap();
    mp.execute(write()).await.unwrap();
    let events = fake.world().events.clone();
    assert_eq!(events.len(), 4, "{events:?}");
    assert_eq!(events[0], "write@a:1");
    // The re-sent write went after a fence of a's session, through the same node.
    let fence = &events[1];
    assert!(fence.starts_with("fence@"), "{events:?}");
    assert!(
        fence.ends_with(&format!(" {a_session}")),
        "{events:?} (a's session {a_session})"
    );
    let via = fence.trim_start_matches("fence@").split(' ').next().unwrap();
    assert_eq!(events[2], format!("write@{via}"), "{events:?}");
    // Fenced once: the next write goes straight through.
    assert!(events[3].starts_with("write@"), "{events:?}");
    mp.shutdown().await;
}

#[tokio::test]
async fn a_path_lost_while_idle_needs_no_fence_and_a_target_without_fencing_is_asked_once() {
    let fake = three_nodes();
    for n in fake.world().nodes.values_mut() {
        n.no_fence = true;
    }
    let mp = Multipath::start(fake.clone(), config(&["a:1", "b:1", "c:1"]));
    all_up(&mp, 3).await;
    // Idle: nothing of unknown fate, nothing to fence.
    fake.world().leader = 2;
    fake.kill("a:1");
    tokio::time::sleep(Duration::from_millis(100)).await;
    mp.execute(write()).await.unwrap();
    assert_eq!(fake.world().events.len(), 1, "{:?}", fake.world().events);
    // A hung path with a write on it: the fence is refused (20/00), the write still completes,
    // and the next failure does not ask again.
    let b = "b:1";
    fake.world().nodes.get_mut(b).unwrap().hang = true;
    let m = mp.clone();
    let stuck = tokio::spawn(async move { m.execute(write()).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    fake.world().leader = 3;
    fake.kill(b);
    stuck.await.unwrap().unwrap();
    let events = fake.world().events.clone();
    assert_eq!(events, ["write@b:1", "fence-refused@c:1", "write@c:1"], "{events:?}");
    // b comes back; c hangs with a write on it: no second fence attempt.
    fake.revive(b);
    fake.world().nodes.get_mut(b).unwrap().hang = false;
    fake.world().nodes.get_mut("c:1").unwrap().hang = true;
    all_up(&mp, 2).await;
    let m = mp.clone();
    let stuck = tokio::spawn(async move { m.execute(write()).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    fake.world().leader = 2;
    fake.kill("c:1");
    stuck.await.unwrap().unwrap();
    let events = fake.world().events.clone();
    assert_eq!(events[3..], ["write@b:1"], "{events:?}");
    mp.shutdown().await;
}

/// A leadership move can keep every path Transitioning for seconds on a loaded cluster, then
/// greet the command with a unit attention. Answers that say "not executed" are retried for
/// `no_path_retry`, however many there are; only failed paths count against `max_retries`.
#[tokio::test]
async fn a_long_transition_ending_in_a_unit_attention_does_not_fail_the_command() {
    let fake = three_nodes();
    let mut cfg = config(&["a:1", "b:1"]);
    cfg.no_path_retry = Duration::from_secs(20);
    cfg.max_retries = 8;
    let mp = Multipath::start(fake.clone(), cfg);
    all_up(&mp, 2).await;
    for p in ["a:1", "b:1"] {
        fake.world().nodes.get_mut(p).unwrap().sense = Some((2, 4, 0x0a));
    }
    let pending = {
        let mp = mp.clone();
        tokio::spawn(async move { mp.execute(write()).await })
    };
    // Far more than max_retries answers of 04/0A (one each 50 ms).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!pending.is_finished(), "{:?}", pending.await);
    {
        let mut w = fake.world();
        for p in ["a:1", "b:1"] {
            w.nodes.get_mut(p).unwrap().sense = None;
            w.ua.insert(p.into(), (0x2a, 0x06));
        }
        w.leader = 2;
    }
    let reply = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("the command ends once a leader serves it")
        .unwrap()
        .unwrap();
    assert_eq!(reply.status, 0, "{:?}", reply.clone().good());
    assert!(mp.view().retried_commands >= 20, "{}", mp.view().retried_commands);
    mp.shutdown().await;
}

/// Paths that answer "unavailable" (04/0C) to every command while their ALUA report keeps
/// saying active: the command is re-sent with a growing pause, not in a tight loop, and ends
/// with the target's answer after `no_path_retry`.
#[tokio::test]
async fn paths_that_keep_answering_unavailable_are_retried_with_backoff_until_no_path_retry() {
    let fake = three_nodes();
    let mp = Multipath::start(fake.clone(), config(&["a:1", "b:1"]));
    all_up(&mp, 2).await;
    for p in ["a:1", "b:1"] {
        fake.world().nodes.get_mut(p).unwrap().sense = Some((2, 4, 0x0c));
    }
    let before = mp.view().retried_commands;
    let t = Instant::now();
    let reply = tokio::time::timeout(Duration::from_secs(10), mp.execute(write()))
        .await
        .unwrap()
        .unwrap();
    let (took, resent) = (t.elapsed(), mp.view().retried_commands - before);
    assert!(reply.good().unwrap_err().contains("04h/0ch"));
    assert!(took >= Duration::from_millis(800), "{took:?}");
    assert!((3..=60).contains(&resent), "re-sent {resent} times in {took:?}");
    mp.shutdown().await;
}

/// The only other path failed earlier and waits out a long relogin backoff; its node is back.
/// When the working path dies, that path logs in again at once instead of at the end of its
/// backoff (chaos: a restarted node left unused for 2 s while commands had no path).
#[tokio::test]
async fn a_failed_path_logs_in_again_at_once_when_commands_have_no_other() {
    let fake = three_nodes();
    let mut cfg = config(&["a:1", "b:1"]);
    cfg.relogin_backoff = (Duration::from_secs(6), Duration::from_secs(6));
    cfg.no_path_retry = Duration::from_secs(20);
    let mp = Multipath::start(fake.clone(), cfg);
    all_up(&mp, 2).await;
    fake.kill("b:1");
    let deadline = Instant::now() + Duration::from_secs(5);
    let failed = |mp: &Multipath<Fake>| {
        mp.view()
            .paths
            .iter()
            .any(|p| p.portal == "b:1" && p.status == PathStatus::Failed)
    };
    while !failed(&mp) {
        assert!(Instant::now() < deadline, "{:?}", mp.view().paths);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // b's login failed and it sleeps 6 s; past the rate limit of the kicks, b comes back and
    // a dies.
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.revive("b:1");
    fake.kill("a:1");
    fake.world().leader = 2;
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(15), mp.execute(write()))
        .await
        .unwrap()
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the command waited {:?}, b's backoff is 6 s",
        t.elapsed()
    );
    assert_eq!(fake.world().writes.last().map(String::as_str), Some("b:1"));
    mp.shutdown().await;
}

/// A node that joined after the last SendTargets round is found when a path fails, not at the
/// next periodic round (60 s).
#[tokio::test]
async fn a_path_failure_looks_for_portals_that_joined_since() {
    let fake = Fake::default();
    fake.add("a:1", 9, 1);
    fake.add("b:1", 9, 2);
    fake.world().leader = 1;
    let mut cfg = config(&["a:1"]);
    cfg.discover = true;
    cfg.no_path_retry = Duration::from_secs(20);
    let mp = Multipath::start(fake.clone(), cfg);
    all_up(&mp, 2).await;
    // Past REDISCOVER_EVERY since the first round.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    fake.add("c:1", 9, 3);
    fake.kill("a:1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !mp
        .view()
        .paths
        .iter()
        .any(|p| p.portal == "c:1" && p.status == PathStatus::Up)
    {
        assert!(Instant::now() < deadline, "c:1 not found: {:?}", mp.view().paths);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The configured portal is down: later rounds ask the others.
    mp.execute(write()).await.unwrap();
    mp.shutdown().await;
}
