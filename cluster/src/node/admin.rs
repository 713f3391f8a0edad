//! Cluster administration: catalogue changes through the metadata leader, the leader's duties
//! (group memberships follow the catalogue, images follow resizes), and the admin client the
//! `raftsan` CLI uses.
//!
//! Membership changes are the leaders' job and are serialized: the metadata leader keeps the
//! metadata group's voters equal to the catalogue's nodes; each volume leader keeps its group's
//! voters equal to the volume's replicas. A node is always added as a learner first and promoted
//! once it caught up (openraft `add_learner(blocking)` then `change_membership`, joint consensus).

use openraft::async_runtime::watch::WatchReceiver;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use openraft::{BasicNode, ChangeMembers};
use prost::Message;

use super::{Node, RaftGroup};
use crate::pb::cluster::cluster_client::ClusterClient;
use crate::pb::cluster::{Catalogue, MetaCommand, meta_command::Cmd};
use crate::raft::{Request, Response};
use crate::rpc::{Channels, TlsFiles};

/// How long a membership step may take before the leader retries it on its next round.
const MEMBERSHIP_STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Proposes a catalogue change on `raft` (which must lead the metadata group).
pub(crate) async fn propose_meta(raft: &RaftGroup, cmd: Cmd) -> Result<Response> {
    let bytes = MetaCommand { cmd: Some(cmd) }.encode_to_vec();
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        raft.client_write(Request::Meta(Bytes::from(bytes))),
    )
    .await
    .map_err(|_| anyhow!("the metadata group did not commit the change within 10 s (no quorum?)"))?
    .map_err(|e| anyhow!("{e}"))?;
    match resp.data.error {
        Some(e) => bail!("{e}"),
        None => Ok(resp.data),
    }
}

/// Runs forever: whatever this node leads, it keeps in line with the catalogue.
pub(super) async fn leader_duties(node: Arc<Node>) {
    let mut shutdown = node.shutdown.subscribe();
    loop {
        if let Err(e) = duty_round(&node).await {
            tracing::warn!("leader duties: {e:#}");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn duty_round(node: &Arc<Node>) -> Result<()> {
    let cat = node.catalogue();
    let meta = node.meta();
    if meta.raft.is_leader() && !cat.nodes.is_empty() {
        let want: BTreeMap<u64, BasicNode> = cat
            .nodes
            .iter()
            .map(|n| {
                (
                    n.id,
                    BasicNode {
                        addr: n.rpc_addr.clone(),
                    },
                )
            })
            .collect();
        align_voters(&meta.raft, &want, "metadata").await?;
    }
    let groups: Vec<_> = node.read_groups().values().cloned().collect();
    for g in groups {
        let Some(v) = &g.volume else { continue };
        if !g.raft.is_leader() {
            continue;
        }
        let Some(info) = cat.volumes.iter().find(|x| x.id == g.id) else {
            continue;
        };
        let want = super::replica_members(&cat, info);
        if !want.is_empty() {
            align_voters(&g.raft, &want, &info.name).await?;
        }
        let size =
            g.sm.image()
                .map(|i| raftsan_target::backing::BackingStore::size_bytes(&*i));
        if size.is_some_and(|s| s < info.size_bytes) {
            tracing::info!(volume = %info.name, size_bytes = info.size_bytes, "growing the volume");
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                g.raft.client_write(Request::Resize {
                    size_bytes: info.size_bytes,
                }),
            )
            .await;
            if !matches!(r, Ok(Ok(_))) {
                tracing::warn!(volume = %info.name, "resize not committed yet; retrying");
            }
        }
        let _ = v;
        spread_leadership(node, &g.raft, info);
    }
    Ok(())
}

/// How long a node leads a volume before it hands the volume to its preferred leader.
const SPREAD_AFTER: Duration = Duration::from_secs(5);

/// The node that should lead volume `info`: the replicas take turns by volume id, so the leaders
/// of different volumes spread over the nodes.
pub(crate) fn preferred_leader(info: &crate::pb::cluster::VolumeInfo) -> Option<u64> {
    let mut r = info.replicas.clone();
    r.sort_unstable();
    let n = u64::try_from(r.len()).ok().filter(|n| *n > 0)?;
    r.get(usize::try_from(info.id % n).ok()?).copied()
}

/// On the leader of a volume that is not its preferred leader: once this node has led for a
/// while and the preferred node is a voter that holds every entry, hand leadership over.
fn spread_leadership(node: &Arc<Node>, raft: &RaftGroup, info: &crate::pb::cluster::VolumeInfo) {
    let Some(want) = preferred_leader(info).filter(|w| *w != node.id) else {
        return;
    };
    let m = raft.metrics().borrow_watched().clone();
    let since = {
        let mut led = node.led_since.lock().unwrap_or_else(|p| p.into_inner());
        led.retain(|(v, t), _| *v != info.id || *t == m.current_term);
        *led.entry((info.id, m.current_term))
            .or_insert_with(std::time::Instant::now)
    };
    if since.elapsed() < SPREAD_AFTER || !m.membership_config.membership().voter_ids().any(|v| v == want) {
        return;
    }
    let last = m.last_log_index.unwrap_or(0);
    let caught_up = m
        .replication
        .as_ref()
        .and_then(|r| r.get(&want).cloned())
        .flatten()
        .is_some_and(|l| l.index >= last);
    if caught_up {
        tracing::info!(volume = %info.name, to = want, "handing leadership to the volume's preferred leader");
        let raft = raft.clone();
        tokio::spawn(async move {
            let _ = raft.trigger().transfer_leader(want).await;
        });
    }
}

/// One step towards `want` as the voter set of the group `raft` leads: add a missing node as a
/// learner (blocking until it caught up), else change the voters.
async fn align_voters(raft: &RaftGroup, want: &BTreeMap<u64, BasicNode>, name: &str) -> Result<()> {
    let m = raft.metrics().borrow_watched().membership_config.clone();
    let membership = m.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let known: BTreeSet<u64> = membership.nodes().map(|(id, _)| *id).collect();
    let target: BTreeSet<u64> = want.keys().copied().collect();
    if voters == target && known == target {
        return Ok(());
    }
    for (id, n) in want {
        if !known.contains(id) {
            tracing::info!(group = name, node = id, "adding node as learner");
            tokio::time::timeout(MEMBERSHIP_STEP_TIMEOUT, raft.add_learner(*id, n.clone(), true))
                .await
                .map_err(|_| anyhow!("{name}: node {id} did not catch up within {MEMBERSHIP_STEP_TIMEOUT:?}"))?
                .map_err(|e| anyhow!("{name}: adding node {id} as learner: {e}"))?;
        }
    }
    if voters != target {
        tracing::info!(group = name, from = ?voters, to = ?target, "changing voters");
        tokio::time::timeout(
            MEMBERSHIP_STEP_TIMEOUT,
            raft.change_membership(ChangeMembers::ReplaceAllVoters(target.clone()), false),
        )
        .await
        .map_err(|_| anyhow!("{name}: membership change timed out"))?
        .map_err(|e| anyhow!("{name}: changing voters to {target:?}: {e}"))?;
    } else {
        // Voters are right; drop learners that are no longer wanted.
        let extra: BTreeSet<u64> = known.difference(&target).copied().collect();
        if !extra.is_empty() {
            raft.change_membership(ChangeMembers::RemoveNodes(extra.clone()), false)
                .await
                .map_err(|e| anyhow!("{name}: removing learners {extra:?}: {e}"))?;
        }
    }
    Ok(())
}

impl Node {
    /// A client of node `addr`'s Cluster service over the node's mTLS channels.
    pub(crate) fn cluster_client(&self, addr: &str) -> Result<ClusterClient<tonic::transport::Channel>> {
        let ch = self
            .channels
            .get(addr)
            .map_err(|e| anyhow!("connecting to {addr}: {e}"))?;
        Ok(ClusterClient::new(ch)
            .max_decoding_message_size(crate::rpc::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::rpc::MAX_MESSAGE_BYTES))
    }

    /// The metadata leader's id and RPC address, if one is known.
    pub(crate) fn meta_leader(&self) -> Option<(u64, String)> {
        let leader = self.meta().raft.metrics().borrow_watched().current_leader?;
        Some((leader, self.rpc_addr_of(leader)?))
    }

    pub(super) async fn forget_remote_nexus(&self, leader: u64, volume: u64, nexus_id: u64) {
        let Some(addr) = self.rpc_addr_of(leader) else { return };
        if let Ok(mut c) = self.cluster_client(&addr) {
            let _ = c.forget_nexus(crate::pb::cluster::NexusLeft { volume, nexus_id }).await;
        }
    }
}

/// The CLI's connection to a node's admin API (mutual TLS with an admin or node certificate).
pub struct AdminClient {
    client: ClusterClient<tonic::transport::Channel>,
    channel: tonic::transport::Channel,
    pub addr: String,
}

impl AdminClient {
    pub fn connect(addr: &str, tls: TlsFiles) -> Result<Self> {
        let channels = Channels::new(Some(tls)).context("loading the admin certificate")?;
        let ch = channels.get(addr).map_err(|e| anyhow!("connecting to {addr}: {e}"))?;
        Ok(AdminClient {
            channel: ch.clone(),
            client: ClusterClient::new(ch)
                .max_decoding_message_size(crate::rpc::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(crate::rpc::MAX_MESSAGE_BYTES),
            addr: addr.to_string(),
        })
    }

    pub fn inner(&mut self) -> &mut ClusterClient<tonic::transport::Channel> {
        &mut self.client
    }

    /// The node's `Testing` service (storage fault injection, `raftsan fault`).
    pub fn testing(&self) -> crate::pb::cluster::testing_client::TestingClient<tonic::transport::Channel> {
        crate::pb::cluster::testing_client::TestingClient::new(self.channel.clone())
    }

    pub async fn catalogue(&mut self) -> Result<Catalogue> {
        let s = self
            .client
            .status(crate::pb::cluster::StatusRequest {})
            .await
            .map_err(|s| anyhow!("{}: {}", self.addr, s.message()))?;
        Ok(s.into_inner().catalogue.unwrap_or_default())
    }
}

/// The `Testing` gRPC service: storage fault injection for tests and chaos runs
/// (`raftsan fault inject|clear`). It refuses everything with FAILED_PRECONDITION, changing
/// nothing, unless the node's config has `[testing] fault_injection = true`. Faults are armed on
/// this node only, in memory (a restart clears them), through the [`FaultSwitch`]es every group's
/// image and Raft log check before their I/O.
///
/// [`FaultSwitch`]: raftsan_target::backing::FaultSwitch
pub struct TestingService {
    pub node: Arc<Node>,
}

impl TestingService {
    fn enabled(&self) -> Result<(), tonic::Status> {
        if self.node.settings.fault_injection {
            Ok(())
        } else {
            Err(tonic::Status::failed_precondition(format!(
                "fault injection is off on node {}: it is for testing only, enabled by \
                 `[testing] fault_injection = true` in the node's config",
                self.node.id
            )))
        }
    }

    /// The volume groups named `volume` (empty: every volume group on this node), with names.
    fn volume_groups(&self, volume: &str) -> Result<Vec<(String, Arc<super::Group>)>, tonic::Status> {
        let cat = self.node.catalogue();
        let mut out: Vec<(String, Arc<super::Group>)> = self
            .node
            .read_groups()
            .values()
            .filter(|g| g.volume.is_some())
            .map(|g| (super::group_name(&cat, g.id), g.clone()))
            .filter(|(name, _)| volume.is_empty() || name == volume)
            .collect();
        out.sort_by_key(|(_, g)| g.id);
        if out.is_empty() && !volume.is_empty() {
            return Err(tonic::Status::not_found(format!(
                "node {} holds no replica of volume {volume:?}",
                self.node.id
            )));
        }
        Ok(out)
    }

    fn armed(&self) -> crate::pb::cluster::FaultsResponse {
        let mut armed = Vec::new();
        if let Ok(groups) = self.volume_groups("") {
            for (name, g) in groups {
                for (target, switch) in [
                    (pbf::FaultTarget::Image, &g.faults.image),
                    (pbf::FaultTarget::Log, &g.faults.log),
                ] {
                    for f in switch.armed() {
                        armed.push(crate::pb::cluster::ArmedFault {
                            volume: name.clone(),
                            target: target as i32,
                            op: op_to_pb(f.op) as i32,
                            error: errno_to_pb(f.errno) as i32,
                            after_ops: f.after_ops,
                        });
                    }
                }
            }
        }
        crate::pb::cluster::FaultsResponse {
            node: self.node.id,
            armed,
        }
    }
}

/// The proto's fault enums.
mod pbf {
    pub use crate::pb::cluster::{FaultErrno, FaultOp, FaultTarget};
}

fn op_to_pb(op: FaultOp) -> pbf::FaultOp {
    match op {
        FaultOp::Read => pbf::FaultOp::Read,
        FaultOp::Write => pbf::FaultOp::Write,
        FaultOp::Flush => pbf::FaultOp::Flush,
    }
}

fn errno_to_pb(errno: i32) -> pbf::FaultErrno {
    match errno {
        libc::ENOSPC => pbf::FaultErrno::Enospc,
        libc::EIO => pbf::FaultErrno::Eio,
        _ => pbf::FaultErrno::Unspecified,
    }
}

use raftsan_target::backing::{Fault, FaultOp};

#[tonic::async_trait]
impl crate::pb::cluster::testing_server::Testing for TestingService {
    async fn inject_fault(
        &self,
        request: tonic::Request<crate::pb::cluster::InjectFaultRequest>,
    ) -> Result<tonic::Response<crate::pb::cluster::FaultsResponse>, tonic::Status> {
        self.enabled()?;
        let r = request.into_inner();
        let bad = |what: &str| tonic::Status::invalid_argument(format!("{what} is missing or not known"));
        let target = pbf::FaultTarget::try_from(r.target)
            .ok()
            .filter(|t| *t != pbf::FaultTarget::Unspecified)
            .ok_or_else(|| bad("target"))?;
        let op = match pbf::FaultOp::try_from(r.op).map_err(|_| bad("op"))? {
            pbf::FaultOp::Write => FaultOp::Write,
            pbf::FaultOp::Flush => FaultOp::Flush,
            pbf::FaultOp::Read => FaultOp::Read,
            pbf::FaultOp::Unspecified => return Err(bad("op")),
        };
        let errno = match pbf::FaultErrno::try_from(r.error).map_err(|_| bad("error"))? {
            pbf::FaultErrno::Eio => libc::EIO,
            pbf::FaultErrno::Enospc => libc::ENOSPC,
            pbf::FaultErrno::Unspecified => return Err(bad("error")),
        };
        let groups = self.volume_groups(&r.volume)?;
        for (name, g) in &groups {
            let switch = match target {
                pbf::FaultTarget::Image => &g.faults.image,
                _ => &g.faults.log,
            };
            switch.inject(Fault {
                op,
                after_ops: r.after_ops,
                range: None,
                errno,
            });
            tracing::warn!(
                volume = %name,
                target = target.as_str_name(),
                op = op.label(),
                errno = %std::io::Error::from_raw_os_error(errno),
                after_ops = r.after_ops,
                "testing: storage fault armed (fault injection is on)"
            );
        }
        Ok(tonic::Response::new(self.armed()))
    }

    async fn clear_faults(
        &self,
        request: tonic::Request<crate::pb::cluster::ClearFaultsRequest>,
    ) -> Result<tonic::Response<crate::pb::cluster::FaultsResponse>, tonic::Status> {
        self.enabled()?;
        let r = request.into_inner();
        for (name, g) in self.volume_groups(&r.volume)? {
            g.faults.image.clear();
            g.faults.log.clear();
            tracing::info!(volume = %name, "testing: storage faults cleared");
        }
        Ok(tonic::Response::new(self.armed()))
    }
}
