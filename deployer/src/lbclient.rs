//! Client of the dnslb admin API (`GET`/`PUT /v1/backends`), over reqwest. The
//! bearer token, when configured, is read from the load balancer's `token_file` and
//! never printed.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::LoadBalancer;

/// A backend as the admin API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    /// Name.
    pub name: String,
    /// host:port.
    pub address: String,
    /// Weight.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// A load balancer's set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSet {
    /// Generation.
    pub generation: u64,
    /// Members (name, address, weight only).
    pub backends: Vec<Backend>,
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
            .timeout(Duration::from_secs(30))
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

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.lb.admin_url.trim_end_matches('/'))
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<serde_json::Value, LbError> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let http = |reason: String| LbError::Http {
            lb: self.lb.name.clone(),
            reason,
        };
        let resp = req
            .send()
            .await
            .map_err(|e| http(e.without_url().to_string()))?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
        if !status.is_success() {
            return Err(LbError::Refused {
                lb: self.lb.name.clone(),
                status: status.as_u16(),
                error: body["error"]
                    .as_str()
                    .unwrap_or("(no error text)")
                    .to_string(),
            });
        }
        Ok(body)
    }

    /// The current set.
    pub async fn get(&self) -> Result<BackendSet, LbError> {
        let v = self.send(self.http.get(self.url("/v1/backends"))).await?;
        serde_json::from_value(v).map_err(|e| LbError::Http {
            lb: self.lb.name.clone(),
            reason: format!("unexpected answer: {e}"),
        })
    }

    /// Replaces the set; returns the new generation.
    pub async fn put(
        &self,
        backends: &[Backend],
        expected_generation: Option<u64>,
        require_healthy: bool,
    ) -> Result<u64, LbError> {
        let mut body = json!({ "backends": backends, "require_healthy": require_healthy });
        if let Some(g) = expected_generation {
            body["expected_generation"] = json!(g);
        }
        let v = self
            .send(self.http.put(self.url("/v1/backends")).json(&body))
            .await?;
        v["generation"].as_u64().ok_or_else(|| LbError::Http {
            lb: self.lb.name.clone(),
            reason: format!("no generation in {v}"),
        })
    }
}
