//! The multipath layer's paths as real iSCSI sessions.

use std::net::SocketAddr;
use std::time::Duration;

use crate::multipath::{Connector, DiscoveredPortal, PathConn, PathFailure, Reply, Request};
use crate::session::{self, Command, Negotiated, Session, SessionConfig};

/// "host" or "host:port" (IPv6 as "[addr]:port") to "host:port", port 3260 by default.
pub fn normalize_portal(p: &str) -> String {
    let p = p.trim();
    // A TargetAddress may carry ",tpgt".
    let p = p.split(',').next().unwrap_or(p);
    let has_port = if p.starts_with('[') {
        p.contains("]:")
    } else {
        p.matches(':').count() == 1
    };
    if has_port { p.to_string() } else { format!("{p}:3260") }
}

/// Resolves a portal to its first socket address.
pub async fn resolve(portal: &str) -> Result<SocketAddr, PathFailure> {
    let p = normalize_portal(portal);
    match tokio::net::lookup_host(&p).await {
        Ok(mut addrs) => addrs.next().ok_or_else(|| PathFailure(format!("{p}: no address"))),
        Err(e) => Err(PathFailure(format!("{p}: {e}"))),
    }
}

/// Negotiated parameters as `session -P 3` prints them (iscsiadm's names).
pub fn describe(n: &Negotiated) -> Vec<(String, String)> {
    let p = &n.params;
    let yes_no = |b: bool| if b { "Yes" } else { "No" }.to_string();
    let digest = |b: bool| if b { "CRC32C" } else { "None" }.to_string();
    let mut v = vec![
        ("Portal".to_string(), n.portal.to_string()),
        (
            "TPGT".to_string(),
            n.tpgt.map(|t| t.to_string()).unwrap_or_else(|| "?".into()),
        ),
        ("ISID".to_string(), n.isid.iter().map(|b| format!("{b:02x}")).collect()),
        ("TSIH".to_string(), n.tsih.to_string()),
        ("HeaderDigest".to_string(), digest(p.header_digest)),
        ("DataDigest".to_string(), digest(p.data_digest)),
        (
            "MaxRecvDataSegmentLength".to_string(),
            p.initiator_max_recv_data_segment_length.to_string(),
        ),
        (
            "MaxXmitDataSegmentLength".to_string(),
            p.target_max_recv_data_segment_length.to_string(),
        ),
        ("FirstBurstLength".to_string(), p.first_burst_length.to_string()),
        ("MaxBurstLength".to_string(), p.max_burst_length.to_string()),
        ("ImmediateData".to_string(), yes_no(p.immediate_data)),
        ("InitialR2T".to_string(), yes_no(p.initial_r2t)),
        ("MaxOutstandingR2T".to_string(), p.max_outstanding_r2t.to_string()),
    ];
    let auth = match n.chap_algorithm {
        Some(a) if n.target_authenticated => format!("CHAP ({a:?}), mutual"),
        Some(a) => format!("CHAP ({a:?})"),
        None => "None".into(),
    };
    v.push(("Authentication".to_string(), auth));
    v
}

/// Logs in with one session configuration (the target name is set per path).
pub struct IscsiConnector {
    pub cfg: SessionConfig,
}

/// One logged-in session.
#[derive(Clone)]
pub struct IscsiPath {
    session: Session,
    portal: String,
}

impl PathConn for IscsiPath {
    async fn execute(&self, req: Request) -> Result<Reply, PathFailure> {
        let cmd = Command {
            lun: req.lun,
            cdb: req.cdb,
            data_out: req.data_out,
            data_in_len: req.data_in_len,
        };
        match self.session.execute(cmd).await {
            Ok(r) => Ok(Reply {
                status: r.status,
                sense: r.sense,
                data: r.data,
            }),
            Err(e) => Err(PathFailure(format!("{}: {e}", self.portal))),
        }
    }

    async fn closed(&self) -> PathFailure {
        PathFailure(format!("{}: {}", self.portal, self.session.closed().await))
    }

    fn close_hard(&self) {
        self.session.close_hard();
    }

    async fn logout(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(3), self.session.logout()).await;
        self.session.close_hard();
    }

    fn details(&self) -> Vec<(String, String)> {
        describe(self.session.negotiated())
    }

    fn session_ref(&self) -> Option<raftsan_proto::scsi::fence::SessionRef> {
        let n = self.session.negotiated();
        Some(raftsan_proto::scsi::fence::SessionRef {
            tpgt: n.tpgt?,
            tsih: n.tsih,
            isid: n.isid,
        })
    }
}

impl Connector for IscsiConnector {
    type Conn = IscsiPath;

    async fn connect(&self, portal: &str, target: &str) -> Result<IscsiPath, PathFailure> {
        let addr = resolve(portal).await?;
        let cfg = SessionConfig {
            target_name: Some(target.to_string()),
            ..self.cfg.clone()
        };
        match Session::login(addr, cfg).await {
            Ok(session) => Ok(IscsiPath {
                session,
                portal: normalize_portal(portal),
            }),
            Err(e) => Err(PathFailure(format!("{}: {e}", normalize_portal(portal)))),
        }
    }

    async fn discover(&self, portal: &str) -> Result<Vec<(String, Vec<DiscoveredPortal>)>, PathFailure> {
        let addr = resolve(portal).await?;
        let cfg = SessionConfig {
            target_name: None,
            ..self.cfg.clone()
        };
        let targets = session::discover(addr, &cfg)
            .await
            .map_err(|e| PathFailure(format!("{portal}: {e}")))?;
        Ok(targets
            .into_iter()
            .map(|t| {
                let portals = t
                    .portals
                    .into_iter()
                    .map(|p| DiscoveredPortal {
                        address: normalize_portal(&p.address),
                        tpgt: p.tpgt,
                    })
                    .collect();
                (t.name, portals)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_portal;

    #[test]
    fn portals_get_the_default_port() {
        assert_eq!(normalize_portal("127.0.0.11"), "127.0.0.11:3260");
        assert_eq!(normalize_portal("127.0.0.11:3261"), "127.0.0.11:3261");
        assert_eq!(normalize_portal("127.0.0.11:3260,2"), "127.0.0.11:3260");
        assert_eq!(normalize_portal("[::1]"), "[::1]:3260");
        assert_eq!(normalize_portal("[::1]:3262"), "[::1]:3262");
        assert_eq!(normalize_portal("sv1"), "sv1:3260");
    }
}
