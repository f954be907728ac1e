//! Active health checks: every `health.interval_ms`, each backend of the current set is
//! asked `health.query_name`/`health.query_type` over UDP with RD=0; a pass is an
//! answer with the same ID and question, NOERROR, and AA set, within
//! `health.timeout_ms`. Results feed the backend's rise/fall counters (see
//! [`BackendRuntime::record_pass`](crate::backends::BackendRuntime::record_pass)), as do
//! the passive signals of the data plane (query timeouts).

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use hickory_proto::serialize::binary::BinEncodable;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::config::HealthConfig;
use crate::shared::Shared;

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Socket error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// An answer, but not a passing one.
    #[error("{0}")]
    Bad(String),
}

/// Runs one check of the backend at `addr`.
pub async fn check(addr: SocketAddr, cfg: &HealthConfig) -> Result<(), CheckError> {
    let limit = Duration::from_millis(cfg.timeout_ms);
    tokio::time::timeout(limit, check_inner(addr, cfg))
        .await
        .map_err(|_| CheckError::Timeout(limit))?
}

async fn check_inner(addr: SocketAddr, cfg: &HealthConfig) -> Result<(), CheckError> {
    let name = Name::from_ascii(&cfg.query_name).map_err(|e| CheckError::Bad(e.to_string()))?;
    let rtype = RecordType::from_str(&cfg.query_type.to_ascii_uppercase())
        .map_err(|e| CheckError::Bad(e.to_string()))?;
    let id = fastrand::u16(..);
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = false;
    msg.add_query(Query::query(name.clone(), rtype));
    let bytes = msg.to_bytes().map_err(|e| CheckError::Bad(e.to_string()))?;
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(addr).await?;
    sock.send(&bytes).await?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = sock.recv(&mut buf).await?;
        let Ok(resp) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let q = resp.queries.first();
        let same_question = q.is_some_and(|q| q.name() == &name && q.query_type() == rtype);
        if resp.id != id || resp.message_type != MessageType::Response || !same_question {
            continue; // not ours: keep waiting until the timeout
        }
        if resp.response_code != ResponseCode::NoError {
            return Err(CheckError::Bad(format!("rcode {}", resp.response_code)));
        }
        if !resp.authoritative {
            return Err(CheckError::Bad(format!(
                "answer for {name} {rtype} is not authoritative (AA clear)"
            )));
        }
        return Ok(());
    }
}

/// Checks every backend of the current set each interval until cancelled.
pub async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        let cfg = shared.tunables.load().health.clone();
        let snap = shared.set.snapshot();
        snap.loss_round(cfg.fall);
        let round = async {
            let mut checks = tokio::task::JoinSet::new();
            for e in &snap.entries {
                let rt = e.runtime.clone();
                let cfg = cfg.clone();
                checks.spawn(async move {
                    match check(rt.address, &cfg).await {
                        Ok(()) => {
                            rt.metrics.checks_pass.increment(1);
                            rt.record_pass(cfg.rise);
                        }
                        Err(e) => {
                            rt.metrics.checks_fail.increment(1);
                            rt.record_failure(cfg.fall, &format!("health check failed: {e}"));
                        }
                    }
                });
            }
            while checks.join_next().await.is_some() {}
        };
        let interval = Duration::from_millis(cfg.interval_ms);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = async { tokio::join!(round, tokio::time::sleep(interval)); } => {}
        }
    }
}
