//! Client of the dnslb admin API (`GET`/`PUT /v1/backends`, `/metrics`), over reqwest,
//! with the request and response types of [`dnslb::api`] so the two cannot drift.
//! Transient failures (transport, 5xx, 429) are retried with [`Backoff::admin`]; a
//! refusal (400, 401, 404, 409, 422) is final. The bearer token, when configured, is
//! read from the load balancer's `token_file` and never printed.

use std::net::SocketAddr;
use std::time::Duration;

use dnslb::api::{BackendList, Changed, ErrorBody, ReplaceSet};
use reqwest::Method;
use serde::{Deserialize, Serialize};

pub use dnslb::api::BackendSpec as Backend;

use crate::config::LoadBalancer;
use crate::retry::Backoff;

/// A load balancer's members without run-time counters: what the journal records and
/// what a restore puts back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSet {
    /// Generation.
    pub generation: u64,
    /// Members (name, address, weight only).
    pub backends: Vec<Backend>,
}

impl From<&BackendList> for BackendSet {
    fn from(l: &BackendList) -> Self {
        BackendSet {
            generation: l.generation,
            backends: l
                .backends
                .iter()
                .filter_map(|b| {
                    Some(Backend {
                        name: b.name.clone(),
                        address: b.address.parse().ok()?,
                        weight: b.weight,
                    })
                })
                .collect(),
        }
    }
}

/// Do two sets have the same members (order aside)?
pub fn same_members(a: &[Backend], b: &[Backend]) -> bool {
    fn key(v: &[Backend]) -> Vec<(&str, SocketAddr, u32)> {
        let mut k: Vec<_> = v
            .iter()
            .map(|x| (x.name.as_str(), x.address, x.weight))
            .collect();
        k.sort();
        k
    }
    key(a) == key(b)
}

/// Members as "name address, …" for messages.
pub fn describe(v: &[Backend]) -> String {
    if v.is_empty() {
        return "(no backends)".into();
    }
    v.iter()
        .map(|b| format!("{} {}", b.name, b.address))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Admin API failures.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    /// Transport.
    #[error("load balancer {lb}: {reason}")]
    Http {
        /// Which.
        lb: String,
        /// Why.
        reason: String,
    },
    /// The API refused (status and its {"error"}).
    #[error("load balancer {lb}: {status}: {error}")]
    Refused {
        /// Which.
        lb: String,
        /// HTTP status.
        status: u16,
        /// Its error text.
        error: String,
    },
}

impl LbError {
    /// Worth another attempt: the transport failed, or the server was unwell.
    pub fn transient(&self) -> bool {
        match self {
            LbError::Http { .. } => true,
            LbError::Refused { status, .. } => *status >= 500 || *status == 429,
        }
    }

    /// 409: the set is not at the generation the call expected.
    pub fn conflict(&self) -> bool {
        matches!(self, LbError::Refused { status: 409, .. })
    }
}

/// One load balancer's admin API.
pub struct LbClient {
    /// Its config.
    pub lb: LoadBalancer,
    http: reqwest::Client,
    token: Option<String>,
}

impl LbClient {
    /// Reads the token file, if any.
    pub fn new(lb: &LoadBalancer) -> Result<Self, LbError> {
        let token = match &lb.token_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| LbError::Http {
                        lb: lb.name.clone(),
                        reason: format!("token file {}: {e}", p.display()),
                    })?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| LbError::Http {
                lb: lb.name.clone(),
                reason: e.to_string(),
            })?;
        Ok(LbClient {
            lb: lb.clone(),
            http,
            token,
        })
    }

    fn http_error(&self, reason: String) -> LbError {
        LbError::Http {
            lb: self.lb.name.clone(),
            reason,
        }
    }

    /// One attempt: the body of a 2xx answer, or the error.
    async fn once(
        &self,
        method: &Method,
        path: &str,
        body: Option<&ReplaceSet>,
    ) -> Result<Vec<u8>, LbError> {
        let url = format!("{}{path}", self.lb.admin_url.trim_end_matches('/'));
        let mut req = self.http.request(method.clone(), url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| self.http_error(e.without_url().to_string()))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| self.http_error(e.without_url().to_string()))?;
        if !status.is_success() {
            let error = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| "(no error text)".into());
            return Err(LbError::Refused {
                lb: self.lb.name.clone(),
                status: status.as_u16(),
                error,
            });
        }
        Ok(bytes.to_vec())
    }

    /// A call with retries of transient failures.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&ReplaceSet>,
    ) -> Result<Vec<u8>, LbError> {
        let mut backoff = Backoff::admin();
        loop {
            match self.once(&method, path, body).await {
                Ok(b) => return Ok(b),
                Err(e) if e.transient() => match backoff.next_delay() {
                    Some(wait) => {
                        eprintln!("deployer: {e} ({method} {path}; retrying in {wait:?})");
                        tokio::time::sleep(wait).await;
                    }
                    None => return Err(e),
                },
                Err(e) => return Err(e),
            }
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, b: &[u8]) -> Result<T, LbError> {
        serde_json::from_slice(b).map_err(|e| self.http_error(format!("unexpected answer: {e}")))
    }

    /// The current set with each backend's health and counters.
    pub async fn get(&self) -> Result<BackendList, LbError> {
        let b = self.call(Method::GET, "/v1/backends", None).await?;
        self.decode(&b)
    }

    /// The current members and generation.
    pub async fn members(&self) -> Result<BackendSet, LbError> {
        Ok(BackendSet::from(&self.get().await?))
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> Result<String, LbError> {
        let b = self.call(Method::GET, "/metrics", None).await?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// Replaces the set; returns the new generation. A PUT that meets a 409 reads the
    /// set back: one at `expected + 1` with exactly these members is this change (an
    /// earlier attempt was applied and its answer lost), anything else is the 409.
    pub async fn put(
        &self,
        backends: &[Backend],
        expected_generation: Option<u64>,
        require_healthy: bool,
    ) -> Result<u64, LbError> {
        let body = ReplaceSet {
            backends: backends.to_vec(),
            expected_generation,
            require_healthy,
        };
        match self.call(Method::PUT, "/v1/backends", Some(&body)).await {
            Ok(b) => Ok(self.decode::<Changed>(&b)?.generation),
            Err(e) if e.conflict() => {
                let now = self.members().await?;
                match expected_generation {
                    Some(g) if now.generation == g + 1 && same_members(&now.backends, backends) => {
                        Ok(now.generation)
                    }
                    _ => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }
}
