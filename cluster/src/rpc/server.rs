//! The server side of the Raft RPC: one tonic service for every group of the node, dispatching by
//! the `group` of each request to the group's openraft handle from a [`GroupRegistry`].

use std::pin::Pin;
use std::sync::Arc;

use openraft::async_runtime::WatchReceiver;
use openraft::raft::{AppendEntriesResponse, TransferLeaderError, TransferLeaderRequest};
use openraft::storage::RaftStateMachine;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::snapshot::{self, SnapshotProgress};
use super::wire::{
    append_from_pb, log_id_to_pb, opt_log_id_from_pb, opt_log_id_to_pb, req_vote, stream_reply_to_pb, vote_to_pb,
};
use super::{GroupRegistry, MAX_MESSAGE_BYTES};
use crate::pb::raft as pb;
use crate::pb::raft::raft_server::{Raft as RaftRpc, RaftServer};
use crate::raft::{GroupId, SnapshotData, TypeConfig};

type RaftOf<SM> = openraft::Raft<TypeConfig, SM>;

/// The tonic service answering Raft RPCs for every group of this node.
pub struct RaftService<SM>
where
    SM: RaftStateMachine<TypeConfig, SnapshotData = SnapshotData>,
{
    registry: Arc<dyn GroupRegistry<SM>>,
    progress: SnapshotProgress,
}

/// The Raft RPC service of a node, with message size limits raised to
/// [`MAX_MESSAGE_BYTES`]; add it to [`super::server_builder`]. `progress` records incoming
/// snapshot transfers (share it with the node's [`super::NetworkFactory`]s).
pub fn raft_service<SM>(registry: Arc<dyn GroupRegistry<SM>>, progress: SnapshotProgress) -> RaftServer<RaftService<SM>>
where
    SM: RaftStateMachine<TypeConfig, SnapshotData = SnapshotData>,
{
    RaftServer::new(RaftService { registry, progress })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// This node's id as its Raft instance knows it.
fn node_id<SM>(raft: &RaftOf<SM>) -> u64
where
    SM: RaftStateMachine<TypeConfig, SnapshotData = SnapshotData>,
{
    raft.metrics().borrow_watched().id
}

fn fatal(group: GroupId, what: &str, e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("group {group}: {what}: {e}"))
}

impl<SM> RaftService<SM>
where
    SM: RaftStateMachine<TypeConfig, SnapshotData = SnapshotData>,
{
    /// The group's Raft, checking the request was meant for this node.
    fn raft(&self, group: GroupId, target: u64, what: &str) -> Result<RaftOf<SM>, Status> {
        registry_raft(self.registry.as_ref(), group, target, what)
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotReply, Status>> + Send + 'static>>;
type AppendStream = Pin<Box<dyn Stream<Item = Result<pb::StreamAppendReply, Status>> + Send + 'static>>;

/// Replies a StreamAppend may have outstanding toward the client before the follower stops
/// taking requests (openraft itself pipelines at most 64 requests per stream).
const STREAM_REPLY_BUFFER: usize = 64;

/// Serves one StreamAppend: the first request names the group; every request is checked as a
/// unary Append is (same group and target, entries following prev_log_id) before openraft's
/// pipelined `stream_append` sees it. A malformed request ends the stream with an error after the
/// replies to the requests before it.
async fn serve_stream_append<SM>(
    service: Arc<dyn GroupRegistry<SM>>,
    mut inbound: Streaming<pb::AppendRequest>,
    tx: mpsc::Sender<Result<pb::StreamAppendReply, Status>>,
) where
    SM: RaftStateMachine<TypeConfig, SnapshotData = SnapshotData>,
{
    use futures_util::StreamExt;
    let first = match inbound.message().await {
        Ok(Some(m)) => m,
        Ok(None) => return,
        Err(s) => {
            let _ = tx.send(Err(s)).await;
            return;
        }
    };
    let (group, target) = (first.group, first.target);
    let raft = match registry_raft(service.as_ref(), group, target, "stream append") {
        Ok(r) => r,
        Err(s) => {
            let _ = tx.send(Err(s)).await;
            return;
        }
    };
    let refused: Arc<std::sync::Mutex<Option<Status>>> = Arc::default();
    let refused_in = refused.clone();
    let registry = service.clone();
    let input = futures_util::stream::once(std::future::ready(Ok(first)))
        .chain(inbound)
        .scan((), move |_, m: Result<pb::AppendRequest, Status>| {
            let r = m.and_then(|m| {
                // A group this node closed (removed, deleted, shutting down) takes no more
                // requests: its Raft is stopping, as a unary Append would find.
                if registry.raft(group).is_none() {
                    return Err(Status::not_found(format!(
                        "stream append: Raft group {group} closed on this node"
                    )));
                }
                if m.group != group || m.target != target {
                    return Err(Status::invalid_argument(format!(
                        "stream append (group {group}): a request for group {} node {} in a stream for node {target}",
                        m.group, m.target
                    )));
                }
                append_from_pb(&m).map_err(|e| Status::invalid_argument(format!("stream append (group {group}): {e}")))
            });
            std::future::ready(match r {
                Ok(rpc) => Some(rpc),
                Err(s) => {
                    *refused_in.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                    None
                }
            })
        });
    let out = raft.stream_append(input);
    futures_util::pin_mut!(out);
    while let Some(r) = out.next().await {
        let (reply, last) = match r {
            Ok(res) => (Ok(stream_reply_to_pb(&res)), res.is_err()),
            Err(e) => (Err(fatal(group, "stream append", e)), true),
        };
        if tx.send(reply).await.is_err() || last {
            return;
        }
    }
    let refused = refused.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(s) = refused {
        let _ = tx.send(Err(s)).await;
    }
}

/// The group's Raft from `registry`, checking the request was meant for this node.
fn registry_raft<SM>(
    registry: &dyn GroupRegistry<SM>,
    group: GroupId,
    target: u64,
    what: &str,
) -> Result<RaftOf<SM>, Status>
where
    SM: RaftStateMachine<TypeConfig, SnapshotData = SnapshotData>,
{
    let raft = registry
        .raft(group)
        .ok_or_else(|| Status::not_found(format!("{what}: no Raft group {group} on this node")))?;
    let me = node_id(&raft);
    if me != target {
        return Err(Status::failed_precondition(format!(
            "{what} for node {target} (group {group}) reached node {me}: wrong peer address"
        )));
    }
    Ok(raft)
}

#[tonic::async_trait]
impl<SM> RaftRpc for RaftService<SM>
where
    SM: RaftStateMachine<TypeConfig, SnapshotData = SnapshotData>,
{
    async fn append(&self, request: Request<pb::AppendRequest>) -> Result<Response<pb::AppendResponse>, Status> {
        let r = request.into_inner();
        let raft = self.raft(r.group, r.target, "append")?;
        let rpc =
            append_from_pb(&r).map_err(|m| Status::invalid_argument(format!("append (group {}): {m}", r.group)))?;
        let resp = raft
            .append_entries(rpc)
            .await
            .map_err(|e| fatal(r.group, "append", e))?;
        use pb::append_response::Kind;
        let out = match resp {
            AppendEntriesResponse::Success => pb::AppendResponse {
                kind: Kind::Success as i32,
                ..Default::default()
            },
            AppendEntriesResponse::PartialSuccess(l) => pb::AppendResponse {
                kind: Kind::PartialSuccess as i32,
                partial: opt_log_id_to_pb(&l),
                vote: None,
            },
            AppendEntriesResponse::Conflict => pb::AppendResponse {
                kind: Kind::Conflict as i32,
                ..Default::default()
            },
            AppendEntriesResponse::HigherVote(v) => pb::AppendResponse {
                kind: Kind::HigherVote as i32,
                partial: None,
                vote: Some(vote_to_pb(&v)),
            },
        };
        Ok(Response::new(out))
    }

    type StreamAppendStream = AppendStream;

    async fn stream_append(
        &self,
        request: Request<Streaming<pb::AppendRequest>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        // Answered at once (the group is named by the first request, which the leader sends only
        // once it has something to replicate); errors travel as the stream's status.
        let (tx, rx) = mpsc::channel(STREAM_REPLY_BUFFER);
        tokio::spawn(serve_stream_append(self.registry.clone(), request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn vote(&self, request: Request<pb::VoteRequest>) -> Result<Response<pb::VoteResponse>, Status> {
        let r = request.into_inner();
        let raft = self.raft(r.group, r.target, "vote")?;
        let rpc = openraft::raft::VoteRequest {
            vote: req_vote(&r.vote, "vote")?,
            last_log_id: opt_log_id_from_pb(&r.last_log_id),
            leadership_transfer: r.leadership_transfer,
        };
        let resp = if r.pre_vote {
            raft.pre_vote(rpc).await
        } else {
            raft.vote(rpc).await
        }
        .map_err(|e| fatal(r.group, "vote", e))?;
        Ok(Response::new(pb::VoteResponse {
            vote: Some(vote_to_pb(&resp.vote)),
            vote_granted: resp.vote_granted,
            last_log_id: opt_log_id_to_pb(&resp.last_log_id),
        }))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let r = request.into_inner();
        let raft = self.raft(r.group, r.target, "transfer leader")?;
        let req = TransferLeaderRequest::new(
            req_vote(&r.from_leader, "transfer leader")?,
            r.to_node_id,
            opt_log_id_from_pb(&r.last_log_id),
        );
        let resp = raft
            .handle_transfer_leader(req)
            .await
            .map_err(|e| fatal(r.group, "transfer leader", e))?;
        use pb::transfer_leader_response::Kind;
        let out = match resp {
            Ok(()) => pb::TransferLeaderResponse {
                kind: Kind::Ok as i32,
                ..Default::default()
            },
            Err(TransferLeaderError::VoteChanged { expected, actual }) => pb::TransferLeaderResponse {
                kind: Kind::VoteChanged as i32,
                expected_vote: Some(vote_to_pb(&expected)),
                actual_vote: Some(vote_to_pb(&actual)),
                ..Default::default()
            },
            Err(TransferLeaderError::LogNotFlushed { expected, actual }) => pb::TransferLeaderResponse {
                kind: Kind::LogNotFlushed as i32,
                expected_log_id: expected.as_ref().map(log_id_to_pb),
                actual_log_id: actual.as_ref().map(log_id_to_pb),
                ..Default::default()
            },
        };
        Ok(Response::new(out))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(
        &self,
        request: Request<Streaming<pb::SnapshotRequest>>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(snapshot::IDLE_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("snapshot: no Begin message"))??;
        let begin = match first {
            Some(pb::SnapshotRequest {
                msg: Some(pb::snapshot_request::Msg::Begin(b)),
            }) => b,
            _ => return Err(Status::invalid_argument("snapshot: the stream must open with Begin")),
        };
        let b = snapshot::begin(self.registry.as_ref(), begin, node_id)?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(snapshot::receive(b, inbound, tx, self.progress.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
