//! The `Cluster` gRPC service (proto/rpc/cluster.proto): SCSI forwarding between nodes and the
//! admin API. Admin calls that change the catalogue run on the metadata leader; any other node
//! forwards them there.

use openraft::async_runtime::watch::WatchReceiver;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tonic::{Request, Response, Status};

use super::Node;
use super::admin::propose_meta;
use super::volume::nexus_from_pb;
use crate::pb::cluster::cluster_server::Cluster;
use crate::pb::cluster::meta_command::Cmd;
use crate::pb::cluster::*;
use raftsan_target::portal::OwnedCommand;

/// Implements the service for one node.
pub struct ClusterService {
    pub node: Arc<Node>,
}

fn err(e: anyhow::Error) -> Status {
    Status::failed_precondition(format!("{e:#}"))
}

impl ClusterService {
    /// The metadata leader's client when this node is not the leader (None: handle locally).
    fn leader_client(&self) -> Result<Option<cluster_client::ClusterClient<tonic::transport::Channel>>, Status> {
        let meta = self.node.meta();
        if meta.raft.is_leader() {
            return Ok(None);
        }
        let (id, addr) = self
            .node
            .meta_leader()
            .ok_or_else(|| Status::unavailable("the metadata group has no leader right now; retry in a moment"))?;
        if id == self.node.id {
            return Ok(None);
        }
        self.node
            .cluster_client(&addr)
            .map(Some)
            .map_err(|e| Status::unavailable(format!("{e:#}")))
    }

    async fn change(&self, cmd: Cmd) -> Result<crate::raft::Response, Status> {
        propose_meta(&self.node.meta().raft, cmd).await.map_err(err)
    }

    /// Waits (bounded) until this node sees volume `id` with a leader.
    async fn wait_volume_leader(&self, id: u64, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if let Some(g) = self.node.group(id)
                && g.raft.metrics().borrow_watched().current_leader.is_some()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    fn local_status(&self) -> NodeStatus {
        let cat = self.node.catalogue();
        let mut groups = Vec::new();
        let all: Vec<_> = self.node.read_groups().values().cloned().collect();
        for g in all {
            let m = g.raft.metrics().borrow_watched().clone();
            let name = super::group_name(&cat, g.id);
            let last = m.last_log_index.unwrap_or(0);
            let followers = m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .filter(|(id, _)| **id != self.node.id)
                        .map(|(id, matched)| {
                            let idx = matched.as_ref().map(|l| l.index).unwrap_or(0);
                            FollowerStatus {
                                node: *id,
                                matched_index: idx,
                                lag_entries: last.saturating_sub(idx),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            let membership = m.membership_config.membership();
            groups.push(GroupStatus {
                group: g.id,
                name,
                leader: m.current_leader.unwrap_or(0),
                term: m.current_term,
                commit_index: m.cluster_committed.as_ref().map(|l| l.index).unwrap_or(0),
                applied_index: m.last_applied.as_ref().map(|l| l.index).unwrap_or(0),
                followers,
                voters: membership.voter_ids().collect(),
                learners: membership.learner_ids().collect(),
                snapshot_progress: self
                    .node
                    .progress
                    .group(g.id)
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        }
        groups.sort_by_key(|g| g.group);
        NodeStatus {
            id: self.node.id,
            rpc_addr: self.node.self_info.rpc_addr.clone(),
            portals: self.node.self_info.portals.clone(),
            metrics_addr: self.node.self_info.metrics_addr.clone(),
            reachable: true,
            error: String::new(),
            groups,
        }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn execute(&self, request: Request<ExecuteRequest>) -> Result<Response<ExecuteResponse>, Status> {
        let req = request.into_inner();
        let not_leader = ExecuteResponse {
            not_leader: true,
            ..Default::default()
        };
        let Some(v) = self.node.group(req.volume).and_then(|g| g.volume.clone()) else {
            return Ok(Response::new(not_leader));
        };
        let nexus = req
            .nexus
            .as_ref()
            .and_then(nexus_from_pb)
            .ok_or_else(|| Status::invalid_argument("forwarded command without a valid nexus"))?;
        if req.lu_reset {
            if !v.reset_as_leader(req.term, &nexus) {
                return Ok(Response::new(not_leader));
            }
            return Ok(Response::new(ExecuteResponse::default()));
        }
        let cmd = OwnedCommand {
            lun: req.lun,
            cdb: req.cdb.to_vec(),
            data_out: req.data_out,
            expected_transfer_len: req.expected_transfer_len,
            task_attr: u8::try_from(req.task_attr).unwrap_or(0),
        };
        match v.execute_as_leader(req.term, nexus, cmd).await {
            None => Ok(Response::new(not_leader)),
            Some(o) => Ok(Response::new(ExecuteResponse {
                status: u32::from(o.status),
                sense: o.sense.map(Bytes::from),
                data_in: Bytes::from(o.data_in),
                scsi_transfer_len: o.scsi_transfer_len,
                not_leader: false,
            })),
        }
    }

    async fn forget_nexus(&self, request: Request<NexusLeft>) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        if let Some(v) = self.node.group(r.volume).and_then(|g| g.volume.clone()) {
            v.forget_nexus(r.nexus_id);
        }
        Ok(Response::new(Empty {}))
    }

    async fn add_node(&self, request: Request<AddNodeRequest>) -> Result<Response<Catalogue>, Status> {
        if let Some(mut c) = self.leader_client()? {
            return c.add_node(request.into_inner()).await;
        }
        let n = request
            .into_inner()
            .node
            .ok_or_else(|| Status::invalid_argument("add-node without a node"))?;
        let cat = self.node.catalogue();
        let already = cat.nodes.iter().any(|x| x.id == n.id && x.rpc_addr == n.rpc_addr);
        if !already {
            self.change(Cmd::AddNode(n)).await?;
        }
        Ok(Response::new((*self.node.catalogue()).clone()))
    }

    async fn remove_node(&self, request: Request<RemoveNodeRequest>) -> Result<Response<Catalogue>, Status> {
        if let Some(mut c) = self.leader_client()? {
            return c.remove_node(request.into_inner()).await;
        }
        let id = request.into_inner().id;
        let cat = self.node.catalogue();
        if cat.nodes.len() <= 1 {
            return Err(Status::failed_precondition(
                "refusing to remove the last node of the cluster",
            ));
        }
        self.change(Cmd::RemoveNode(id)).await?;
        Ok(Response::new((*self.node.catalogue()).clone()))
    }

    async fn create_volume(&self, request: Request<CreateVolume>) -> Result<Response<VolumeInfo>, Status> {
        if let Some(mut c) = self.leader_client()? {
            return c.create_volume(request.into_inner()).await;
        }
        let mut req = request.into_inner();
        // This node is up: it creates the volume's group.
        req.initializer = self.node.id;
        let name = req.name.clone();
        let id = self.change(Cmd::CreateVolume(req)).await?.value;
        let info = self
            .node
            .catalogue()
            .volumes
            .iter()
            .find(|v| v.id == id)
            .cloned()
            .ok_or_else(|| Status::internal(format!("volume {name} was created but is not in the catalogue")))?;
        // Usable once its group has a leader (bounded; the volume exists either way).
        if info.replicas.contains(&self.node.id) && !self.wait_volume_leader(id, Duration::from_secs(20)).await {
            tracing::warn!(volume = %name, "created, but no leader elected within 20 s");
        }
        Ok(Response::new(info))
    }

    async fn delete_volume(&self, request: Request<VolumeRequest>) -> Result<Response<Empty>, Status> {
        if let Some(mut c) = self.leader_client()? {
            return c.delete_volume(request.into_inner()).await;
        }
        self.change(Cmd::DeleteVolume(request.into_inner().name)).await?;
        Ok(Response::new(Empty {}))
    }

    async fn resize_volume(&self, request: Request<ResizeVolume>) -> Result<Response<VolumeInfo>, Status> {
        if let Some(mut c) = self.leader_client()? {
            return c.resize_volume(request.into_inner()).await;
        }
        let req = request.into_inner();
        let name = req.name.clone();
        self.change(Cmd::ResizeVolume(req)).await?;
        let info = self
            .node
            .catalogue()
            .volumes
            .iter()
            .find(|v| v.name == name)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no volume named {name:?}")))?;
        Ok(Response::new(info))
    }

    async fn list_volumes(&self, _request: Request<Empty>) -> Result<Response<VolumeList>, Status> {
        Ok(Response::new(VolumeList {
            volumes: self.node.catalogue().volumes.clone(),
        }))
    }

    async fn put_target(&self, request: Request<TargetInfo>) -> Result<Response<Empty>, Status> {
        if let Some(mut c) = self.leader_client()? {
            return c.put_target(request.into_inner()).await;
        }
        self.change(Cmd::PutTarget(request.into_inner())).await?;
        Ok(Response::new(Empty {}))
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let cat = self.node.catalogue();
        let mut ids: Vec<(u64, String)> = cat.nodes.iter().map(|n| (n.id, n.rpc_addr.clone())).collect();
        if !ids.iter().any(|(id, _)| *id == self.node.id) {
            ids.push((self.node.id, self.node.self_info.rpc_addr.clone()));
        }
        let mut nodes = Vec::new();
        let calls = ids.into_iter().map(|(id, addr)| {
            let node = self.node.clone();
            let local = (id == self.node.id).then(|| self.local_status());
            async move {
                if let Some(s) = local {
                    return s;
                }
                let fail = |e: String| NodeStatus {
                    id,
                    rpc_addr: addr.clone(),
                    reachable: false,
                    error: e,
                    ..Default::default()
                };
                let mut c = match node.cluster_client(&addr) {
                    Ok(c) => c,
                    Err(e) => return fail(format!("{e:#}")),
                };
                let mut req = Request::new(StatusRequest {});
                req.set_timeout(Duration::from_secs(2));
                match c.local_status(req).await {
                    Ok(r) => r.into_inner().node.unwrap_or_else(|| fail("empty answer".into())),
                    Err(s) => fail(s.message().to_string()),
                }
            }
        });
        for s in futures_util::future::join_all(calls).await {
            nodes.push(s);
        }
        nodes.sort_by_key(|n| n.id);
        Ok(Response::new(StatusResponse {
            answered_by: self.node.id,
            nodes,
            catalogue: Some((*cat).clone()),
        }))
    }

    async fn local_status(&self, _request: Request<StatusRequest>) -> Result<Response<LocalStatusResponse>, Status> {
        Ok(Response::new(LocalStatusResponse {
            node: Some(self.local_status()),
        }))
    }

    async fn step_down(&self, _request: Request<Empty>) -> Result<Response<Empty>, Status> {
        let groups: Vec<_> = self.node.read_groups().values().cloned().collect();
        for g in groups {
            let m = g.raft.metrics().borrow_watched().clone();
            if m.current_leader != Some(self.node.id) {
                continue;
            }
            if let Some(to) = m
                .membership_config
                .membership()
                .voter_ids()
                .find(|v| *v != self.node.id)
            {
                let _ = g.raft.trigger().transfer_leader(to).await;
            }
        }
        Ok(Response::new(Empty {}))
    }
}
