//! Active health checks: every `health.interval_ms`, each backend of the current set is
//! asked `health.query_name`/`health.query_type` over UDP with RD=0; a pass is an
//! answer with the same ID and question, NOERROR, and AA set, within
//! `health.timeout_ms`. Results feed the backend's rise/fall counters (see
//! [`BackendRuntime::record_pass`](crate::backends::BackendRuntime::record_pass)); a
//! check that panics is a failure. Beside the checks, every [`PASSIVE_TICK`] the
//! passive signal of the data plane (query timeouts and losses) is applied by
//! [`Snapshot::passive_round`](crate::backends::Snapshot::passive_round).

use std::future::Future;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use hickory_proto::serialize::binary::BinEncodable;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::backends::BackendRuntime;
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
    /// The check itself failed (its task panicked).
    #[error("the check failed to run: {0}")]
    Crashed(String),
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

/// How often the passive signal is applied.
pub const PASSIVE_TICK: Duration = Duration::from_millis(100);

/// Runs `check` on every target at once and returns each target's result, in no
/// particular order. A check that panics is a failure ([`CheckError::Crashed`]), never
/// a pass.
pub async fn check_all<T, F, Fut>(
    targets: Vec<(T, SocketAddr)>,
    check: F,
) -> Vec<(T, Result<(), CheckError>)>
where
    T: Send + 'static,
    F: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = Result<(), CheckError>> + Send + 'static,
{
    let mut checks = tokio::task::JoinSet::new();
    let mut by_task = std::collections::HashMap::new();
    for (target, addr) in targets {
        let id = checks.spawn(check(addr)).id();
        by_task.insert(id, target);
    }
    let mut results = Vec::with_capacity(by_task.len());
    while let Some(r) = checks.join_next_with_id().await {
        let (id, result) = match r {
            Ok((id, result)) => (id, result),
            Err(e) => (e.id(), Err(CheckError::Crashed(e.to_string()))),
        };
        if let Some(target) = by_task.remove(&id) {
            results.push((target, result));
        }
    }
    results
}

/// Records the result of one check of `rt`.
pub fn record(rt: &BackendRuntime, cfg: &HealthConfig, result: &Result<(), CheckError>) {
    match result {
        Ok(()) => rt.record_pass(cfg.rise),
        Err(e) => rt.record_failure(cfg.fall, &e.to_string()),
    }
}

/// Checks every backend of the current set each interval, and applies the passive
/// signal every [`PASSIVE_TICK`], until cancelled.
pub async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let passive = async {
        let mut tick = tokio::time::interval(PASSIVE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let fall = shared.tunables.load().health.fall;
            shared.set.load().passive_round(fall);
        }
    };
    let active = async {
        loop {
            let cfg = shared.tunables.load().health.clone();
            let snap = shared.set.snapshot();
            let round = async {
                let targets = snap
                    .entries
                    .iter()
                    .map(|e| (e.runtime.clone(), e.runtime.address))
                    .collect();
                let cfg2 = cfg.clone();
                let results = check_all(targets, move |addr| {
                    let cfg = cfg2.clone();
                    async move { check(addr, &cfg).await }
                })
                .await;
                for (rt, result) in results {
                    record(&rt, &cfg, &result);
                }
            };
            let interval = Duration::from_millis(cfg.interval_ms);
            tokio::join!(round, tokio::time::sleep(interval));
        }
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = passive => {}
        _ = active => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_check_that_panics_is_a_failure_not_a_pass() {
        let ok: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let crash: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let mut results = check_all(vec![("ok", ok), ("crash", crash)], move |addr| async move {
            if addr == crash {
                panic!("a bug in the check");
            }
            Ok(())
        })
        .await;
        results.sort_by_key(|r| r.0);
        assert_eq!(results.len(), 2);
        assert_eq!(results[0].0, "crash");
        assert!(
            matches!(results[0].1, Err(CheckError::Crashed(_))),
            "{:?}",
            results[0].1
        );
        assert!(results[1].1.is_ok());
        // Recorded, it counts as a failed check.
        let rt = BackendRuntime::new("crash", crash);
        let cfg = HealthConfig {
            fall: 1,
            ..HealthConfig::default()
        };
        record(&rt, &cfg, &results[0].1);
        assert_eq!(rt.health(), crate::backends::Health::Down);
    }
}
