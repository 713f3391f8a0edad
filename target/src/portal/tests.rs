//! Portal behaviour over loopback TCP with a minimal raw initiator: the command router hook,
//! dynamic targets and peer portals in SendTargets.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use bytes::BytesMut;
use raftsan_proto::pdu::{
    self, Digests, Framing, LoginRequest, LoginResponse, LogoutRequest, Opcode, Pdu, ScsiCommand, ScsiResponse,
    TextRequest,
};
use raftsan_proto::scsi::sense::{self, status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::backing::MemStore;
use crate::catalog::{Backing, LunDef, derive_naa};

const TARGET: &str = "iqn.2024-01.test:routed";
const INITIATOR: &str = "iqn.2024-01.test:initiator";
const WAIT: Duration = Duration::from_secs(5);

fn target_def(name: &str) -> TargetDef {
    TargetDef {
        name: name.into(),
        tid: 1,
        alias: None,
        luns: vec![],
        incoming_users: vec![],
        outgoing_user: None,
        initiator_names: vec![],
        initiator_addresses: vec![],
    }
}

fn lus(name: &str) -> Arc<TargetLus> {
    let def = LunDef {
        lun: 1,
        backing: Backing::Memory { size_bytes: 1 << 20 },
        serial: "r1".into(),
        naa: derive_naa(name, 1),
        vendor: "RAFTSAN".into(),
        product: "VDISK".into(),
        revision: "0001".into(),
        block_size: 512,
        read_only: false,
        thin: false,
        write_cache: false,
    };
    Arc::new(TargetLus::with_stores(name, vec![(def, Box::new(MemStore::new(1 << 20)))]).unwrap())
}

/// What the fake router saw.
#[derive(Default)]
struct Seen {
    commands: Vec<(u64, Vec<u8>, usize, u32)>,
    joined: Vec<u64>,
    left: Vec<u64>,
    resets: Vec<Reset>,
}

/// Answers every command with NOT READY, ASYMMETRIC ACCESS STATE TRANSITION.
#[derive(Default)]
struct FakeRouter {
    seen: Mutex<Seen>,
}

impl CommandRouter for FakeRouter {
    fn execute(
        &self,
        target: Arc<TargetRuntime>,
        nexus: Nexus,
        cmd: OwnedCommand,
    ) -> Pin<Box<dyn Future<Output = Outcome> + Send>> {
        assert_eq!(target.def.name, TARGET);
        assert_eq!(nexus.initiator_name, INITIATOR);
        lock(&self.seen)
            .commands
            .push((cmd.lun, cmd.cdb, cmd.data_out.len(), cmd.expected_transfer_len));
        Box::pin(async { Outcome::check_code(sense::LOGICAL_UNIT_NOT_ACCESSIBLE_TRANSITIONING, false) })
    }

    fn nexus_joined(&self, nexus: &Nexus) {
        lock(&self.seen).joined.push(nexus.id);
    }

    fn nexus_left(&self, nexus: &Nexus) {
        lock(&self.seen).left.push(nexus.id);
    }

    fn reset(
        &self,
        _target: Arc<TargetRuntime>,
        _nexus: Nexus,
        reset: Reset,
    ) -> Pin<Box<dyn Future<Output = bool> + Send>> {
        lock(&self.seen).resets.push(reset);
        Box::pin(async move { reset != Reset::Lun(9) })
    }
}

async fn start(server: &Arc<PortalServer>) -> SocketAddr {
    let listener = server.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server.clone().serve(listener));
    addr
}

fn settings() -> PortalSettings {
    PortalSettings {
        nop_in_interval: Duration::ZERO,
        ..PortalSettings::default()
    }
}

struct Client {
    s: TcpStream,
    buf: BytesMut,
    cmdsn: u32,
    statsn: u32,
    itt: u32,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Client {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
            cmdsn: 1,
            statsn: 0,
            itt: 1,
        }
    }

    async fn send(&mut self, bhs: pdu::Bhs, data: &[u8]) {
        let mut out = BytesMut::new();
        pdu::encode_parts(bhs, &[], data, Digests::default(), &mut out);
        self.s.write_all(&out).await.unwrap();
    }

    /// The next PDU; None when the target closed the connection.
    async fn recv(&mut self) -> Option<Pdu> {
        loop {
            if let Framing::Complete { len } = pdu::check(&self.buf, Digests::default(), 1 << 24).unwrap() {
                return Some(pdu::decode(self.buf.split_to(len).freeze(), Digests::default()).unwrap());
            }
            let n = tokio::time::timeout(WAIT, self.s.read_buf(&mut self.buf))
                .await
                .expect("the target answers within the timeout")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    /// One-PDU login, security stage skipped; `target` None: a discovery session.
    async fn login(&mut self, target: Option<&str>) {
        let mut pairs = vec![("InitiatorName", INITIATOR)];
        match target {
            Some(t) => pairs.extend([("TargetName", t), ("SessionType", "Normal")]),
            None => pairs.push(("SessionType", "Discovery")),
        }
        pairs.extend([
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "No"),
        ]);
        let mut text = Vec::new();
        raftsan_proto::text::encode(&pairs, &mut text);
        let req = LoginRequest {
            transit: true,
            cont: false,
            csg: 1,
            nsg: 3,
            version_max: 0,
            version_min: 0,
            isid: [0x40, 0, 0, 0, 0, 1],
            tsih: 0,
            itt: 0,
            cid: 0,
            cmdsn: self.cmdsn,
            exp_statsn: 0,
        };
        self.send(req.to_bhs(), &text).await;
        let p = self.recv().await.expect("a Login Response");
        let r = LoginResponse::parse(&p.bhs);
        assert_eq!((r.status_class, r.status_detail, r.nsg), (0, 0, 3), "{r:?}");
        self.statsn = r.seq.statsn.wrapping_add(1);
    }

    /// Sends a SCSI command (with `data` as immediate data) and returns its SCSI Response and
    /// sense bytes.
    async fn command(&mut self, lun: u64, cdb: &[u8], read_len: u32, data: &[u8]) -> (ScsiResponse, Vec<u8>) {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        let cmd = ScsiCommand {
            immediate: false,
            final_: true,
            read: read_len > 0,
            write: !data.is_empty(),
            attr: 1,
            lun,
            itt: self.itt,
            expected_data_len: read_len.max(data.len() as u32),
            cmdsn: self.cmdsn,
            exp_statsn: self.statsn,
            cdb: c,
        };
        self.itt += 1;
        self.cmdsn += 1;
        self.send(cmd.to_bhs(), data).await;
        loop {
            let p = self.recv().await.expect("a SCSI Response");
            if p.bhs.opcode() == Opcode::ScsiResponse {
                let r = ScsiResponse::parse(&p.bhs);
                let sense = p.data.get(2..).map(<[u8]>::to_vec).unwrap_or_default();
                return (r, sense);
            }
        }
    }

    /// Sends a task management function and returns its response code.
    async fn task_mgmt(&mut self, function: u8, lun: u64) -> u8 {
        let t = pdu::TaskMgmtRequest {
            immediate: true,
            function,
            lun,
            itt: self.itt,
            referenced_task_tag: pdu::RESERVED_TAG,
            cmdsn: self.cmdsn,
            exp_statsn: self.statsn,
            ref_cmdsn: 0,
            exp_datasn: 0,
        };
        self.itt += 1;
        self.send(t.to_bhs(), &[]).await;
        loop {
            let p = self.recv().await.expect("a Task Management Response");
            if p.bhs.opcode() == Opcode::TaskMgmtResponse {
                return p.bhs.0[2];
            }
        }
    }

    async fn logout(&mut self) {
        let l = LogoutRequest {
            immediate: true,
            reason: 0,
            itt: self.itt,
            cid: 0,
            cmdsn: self.cmdsn,
            exp_statsn: self.statsn,
        };
        self.send(l.to_bhs(), &[]).await;
        let p = self.recv().await.expect("a Logout Response");
        assert_eq!(p.bhs.opcode(), Opcode::LogoutResponse);
    }

    /// SendTargets=All in a discovery session: the key-value pairs of the answer.
    async fn send_targets(&mut self) -> Vec<(String, String)> {
        let mut text = Vec::new();
        raftsan_proto::text::encode(&[("SendTargets", "All")], &mut text);
        let t = TextRequest {
            immediate: false,
            final_: true,
            cont: false,
            lun: 0,
            itt: self.itt,
            ttt: pdu::RESERVED_TAG,
            cmdsn: self.cmdsn,
            exp_statsn: self.statsn,
        };
        self.cmdsn += 1;
        self.send(t.to_bhs(), &text).await;
        let p = self.recv().await.expect("a Text Response");
        assert_eq!(p.bhs.opcode(), Opcode::TextResponse);
        raftsan_proto::text::parse(&p.data).unwrap()
    }
}

/// Every SCSI command of a routed target goes to the router (with its CDB, LUN and Data-Out),
/// and its outcome is what the initiator gets; the router hears of the session's start and end.
#[tokio::test]
async fn router_runs_every_command() {
    let server = PortalServer::empty(settings());
    let router = Arc::new(FakeRouter::default());
    server.set_targets(vec![TargetRuntime::new(
        target_def(TARGET),
        lus(TARGET),
        Some(router.clone()),
    )]);
    let addr = start(&server).await;
    let mut c = Client::connect(addr).await;
    c.login(Some(TARGET)).await;

    let (r, sense) = c.command(1, &[0; 6], 0, &[]).await;
    assert_eq!(r.status, status::CHECK_CONDITION);
    assert_eq!((sense[0], sense[2], sense[12], sense[13]), (0x70, 0x02, 0x04, 0x0a));
    // A write with its data as immediate data.
    let write10 = [0x2a, 0, 0, 0, 0, 4, 0, 0, 1, 0];
    let (r, _) = c.command(1, &write10, 0, &[7; 512]).await;
    assert_eq!(r.status, status::CHECK_CONDITION);
    // READ CAPACITY on LUN 0 (the controller, which has no such command locally): still routed.
    let (r, _) = c.command(0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8, &[]).await;
    assert_eq!(r.status, status::CHECK_CONDITION);
    c.logout().await;

    let deadline = tokio::time::Instant::now() + WAIT;
    while lock(&router.seen).left.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "nexus_left not called");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = lock(&router.seen);
    // The CDB is the whole CDB field of the PDU: 16 bytes, zero-padded.
    let cdb16 = |c: &[u8]| {
        let mut v = c.to_vec();
        v.resize(16, 0);
        v
    };
    assert_eq!(
        seen.commands,
        vec![
            (1, cdb16(&[0; 6]), 0, 0),
            (1, cdb16(&write10), 512, 512),
            (0, cdb16(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 0, 8),
        ]
    );
    assert_eq!(seen.joined.len(), 1);
    assert_eq!(seen.left, seen.joined);
    server.shutdown();
}

/// With a router, LOGICAL UNIT RESET and target resets reach the router (the cluster resets the
/// volume's leader), not the local LUs, and the local LUs hear nothing of the session (no
/// UNIT ATTENTION 29/00 raised here: the router decides where the nexus's state lives).
#[tokio::test]
async fn router_gets_the_resets() {
    let server = PortalServer::empty(settings());
    let router = Arc::new(FakeRouter::default());
    let local = lus(TARGET);
    server.set_targets(vec![TargetRuntime::new(
        target_def(TARGET),
        local.clone(),
        Some(router.clone()),
    )]);
    let addr = start(&server).await;
    let mut c = Client::connect(addr).await;
    c.login(Some(TARGET)).await;
    assert_eq!(c.task_mgmt(5, 1).await, 0, "LOGICAL UNIT RESET: function complete");
    assert_eq!(
        c.task_mgmt(5, 9).await,
        2,
        "LOGICAL UNIT RESET of a LUN the router lacks"
    );
    assert_eq!(c.task_mgmt(6, 0).await, 0, "TARGET WARM RESET");
    c.logout().await;
    assert_eq!(
        lock(&router.seen).resets,
        vec![Reset::Lun(1), Reset::Lun(9), Reset::Target]
    );
    // The local LU never learnt of the session: a local command of another nexus sees no UA
    // and the session's id has no unit attention queued.
    let nexus = Nexus {
        id: lock(&router.seen).joined[0],
        initiator_name: INITIATOR.into(),
        initiator_port: format!("{INITIATOR},i,0x400000000001"),
        isid: [0x40, 0, 0, 0, 0, 1],
        tsih: 1,
        target_port: crate::lu::TargetPort {
            target_name: TARGET.into(),
            tpgt: 1,
            relative_port_id: 1,
            port_group: 1,
        },
    };
    let tur = crate::lu::Command {
        lun: 1,
        cdb: &[0; 6],
        data_out: &[],
        expected_transfer_len: 0,
        task_attr: 0,
    };
    assert_eq!(local.execute_sync(&nexus, &tur).status, status::GOOD);
    server.shutdown();
}

/// Without a router the same target serves its LUs itself (standalone mode).
#[tokio::test]
async fn no_router_runs_the_logical_units() {
    let server = PortalServer::empty(settings());
    server.set_targets(vec![TargetRuntime::new(target_def(TARGET), lus(TARGET), None)]);
    let addr = start(&server).await;
    let mut c = Client::connect(addr).await;
    c.login(Some(TARGET)).await;
    // POWER ON unit attention first, then GOOD.
    let (r, sense) = c.command(1, &[0; 6], 0, &[]).await;
    assert_eq!((r.status, sense[2], sense[12]), (status::CHECK_CONDITION, 0x06, 0x29));
    let (r, _) = c.command(1, &[0; 6], 0, &[]).await;
    assert_eq!(r.status, status::GOOD);
    server.shutdown();
}

/// set_targets: a removed target's sessions are closed and it can no longer be logged into;
/// SendTargets lists this node's portal, then the peers'.
#[tokio::test]
async fn dynamic_targets_and_peer_portals() {
    let server = PortalServer::empty(settings());
    let other = "iqn.2024-01.test:other";
    let routed = TargetRuntime::new(target_def(TARGET), lus(TARGET), None);
    server.set_targets(vec![
        routed.clone(),
        TargetRuntime::new(target_def(other), lus(other), None),
    ]);
    server.set_peer_portals(vec![
        ("10.0.0.2:3260".parse().unwrap(), 2),
        ("[fd00::3]:3260".parse().unwrap(), 3),
    ]);
    let addr = start(&server).await;

    let mut d = Client::connect(addr).await;
    d.login(None).await;
    let pairs = d.send_targets().await;
    let own = format!("{addr},1");
    let want: Vec<(String, String)> = [other, TARGET]
        .iter()
        .flat_map(|name| {
            [
                ("TargetName".to_string(), name.to_string()),
                ("TargetAddress".to_string(), own.clone()),
                ("TargetAddress".to_string(), "10.0.0.2:3260,2".to_string()),
                ("TargetAddress".to_string(), "[fd00::3]:3260,3".to_string()),
            ]
        })
        .collect();
    assert_eq!(pairs, want);

    let mut a = Client::connect(addr).await;
    a.login(Some(TARGET)).await;
    let mut b = Client::connect(addr).await;
    b.login(Some(other)).await;
    // `other` goes; TARGET stays (same Arc): its session keeps working.
    server.set_targets(vec![routed]);
    assert!(b.recv().await.is_none(), "the removed target's session is closed");
    let (r, _) = a.command(1, &[0; 6], 0, &[]).await;
    assert_eq!(r.status, status::CHECK_CONDITION); // POWER ON unit attention: still served
    let (r, _) = a.command(1, &[0; 6], 0, &[]).await;
    assert_eq!(r.status, status::GOOD);
    // Logging into the removed target fails: target not found (0x0203).
    let mut c = Client::connect(addr).await;
    let mut text = Vec::new();
    raftsan_proto::text::encode(
        &[
            ("InitiatorName", INITIATOR),
            ("TargetName", other),
            ("SessionType", "Normal"),
        ],
        &mut text,
    );
    let req = LoginRequest {
        transit: true,
        cont: false,
        csg: 1,
        nsg: 3,
        version_max: 0,
        version_min: 0,
        isid: [0x40, 0, 0, 0, 0, 2],
        tsih: 0,
        itt: 0,
        cid: 0,
        cmdsn: 1,
        exp_statsn: 0,
    };
    c.send(req.to_bhs(), &text).await;
    let r = LoginResponse::parse(&c.recv().await.unwrap().bhs);
    assert_eq!((r.status_class, r.status_detail), (0x02, 0x03));
    assert_eq!(server.show().targets.len(), 1);
    server.shutdown();
}

/// The value of the `raftsan_scsi_check_conditions_total` series of `target`, LUN 1 and
/// `sense_key` in Prometheus text `text` (0 when absent).
fn check_conditions(text: &str, target: &str, sense_key: &str) -> u64 {
    let labels = format!("{{target=\"{target}\",lun=\"1\",sense_key=\"{sense_key}\"}}");
    text.lines()
        .find_map(|l| {
            l.strip_prefix("raftsan_scsi_check_conditions_total")?
                .strip_prefix(labels.as_str())
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Commands the connection layer answers itself, without running them, count in
/// `raftsan_scsi_check_conditions_total` like those the LUs answer: a transfer length above
/// the limit (ILLEGAL REQUEST) and a write whose Data-Out phase failed (ABORTED COMMAND 4B/00).
#[tokio::test]
async fn check_conditions_of_the_connection_layer_are_counted() {
    let target = "iqn.2024-01.test:counted";
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    // The handles are registered with the target: they keep recording into this recorder
    // after the scope ends, without a global recorder shared by the other tests.
    let runtime = metrics::with_local_recorder(&recorder, || TargetRuntime::new(target_def(target), lus(target), None));
    let server = PortalServer::empty(PortalSettings {
        max_transfer_bytes: 64 << 10,
        ..settings()
    });
    server.set_targets(vec![runtime]);
    let addr = start(&server).await;
    let mut c = Client::connect(addr).await;
    c.login(Some(target)).await;
    assert_eq!(check_conditions(&metrics.render(), target, "illegal_request"), 0);

    // READ(10) of 129 blocks: 512 bytes over the transfer limit.
    let read10 = [0x28, 0, 0, 0, 0, 0, 0, 0, 129, 0];
    let (r, sense) = c.command(1, &read10, 129 * 512, &[]).await;
    assert_eq!((r.status, sense[2]), (status::CHECK_CONDITION, 0x05));
    assert_eq!(check_conditions(&metrics.render(), target, "illegal_request"), 1);

    // WRITE(10) of 2 blocks whose unsolicited Data-Out (InitialR2T=No) skips DataSN 0.
    let write10 = [0x2a, 0, 0, 0, 0, 0, 0, 0, 2, 0];
    let mut cdb = [0u8; 16];
    cdb[..10].copy_from_slice(&write10);
    let cmd = ScsiCommand {
        immediate: false,
        final_: false,
        read: false,
        write: true,
        attr: 1,
        lun: 1,
        itt: c.itt,
        expected_data_len: 1024,
        cmdsn: c.cmdsn,
        exp_statsn: c.statsn,
        cdb,
    };
    c.send(cmd.to_bhs(), &[]).await;
    let data = pdu::DataOut {
        final_: true,
        lun: 1,
        itt: c.itt,
        ttt: pdu::RESERVED_TAG,
        exp_statsn: c.statsn,
        datasn: 1,
        buffer_offset: 0,
    };
    c.send(data.to_bhs(), &[9; 1024]).await;
    let p = c.recv().await.expect("a SCSI Response");
    assert_eq!(p.bhs.opcode(), Opcode::ScsiResponse);
    let sense = &p.data[2..];
    assert_eq!(
        (ScsiResponse::parse(&p.bhs).status, sense[2], sense[12], sense[13]),
        (status::CHECK_CONDITION, 0x0b, 0x4b, 0x00)
    );
    let text = metrics.render();
    assert_eq!(check_conditions(&text, target, "aborted_command"), 1, "{text}");
    assert_eq!(check_conditions(&text, target, "illegal_request"), 1);
    server.shutdown();
}
