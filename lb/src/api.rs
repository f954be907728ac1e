//! The admin API's request and response bodies: one definition, used by the server
//! ([`crate::admin`]) and by every client (the deployer), so the contract cannot drift.
//! Errors are always [`ErrorBody`].

use serde::{Deserialize, Serialize};

pub use crate::backends::{AdminState as MemberState, Health};
pub use crate::config::BackendConfig as BackendSpec;

/// `GET /v1/backends`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendList {
    /// Generation of the set; every change bumps it by one.
    pub generation: u64,
    /// Every member, in the set's order.
    pub backends: Vec<BackendView>,
}

/// A backend as the API shows it (`GET /v1/backends`, `GET /v1/backends/{name}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendView {
    /// Name.
    pub name: String,
    /// Address.
    pub address: String,
    /// Weight.
    pub weight: u32,
    /// active / draining.
    pub state: MemberState,
    /// up / down / unknown.
    pub health: Health,
    /// Queries in flight.
    pub outstanding: u64,
    /// Queries forwarded.
    pub queries_total: u64,
    /// Queries timed out.
    pub timeouts_total: u64,
}

/// Body of `PUT /v1/backends`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplaceSet {
    /// The whole new set (not empty; unique names).
    pub backends: Vec<BackendSpec>,
    /// 409 unless the set is still at this generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_generation: Option<u64>,
    /// 422 (and nothing changes) unless every backend new to the set passes a health
    /// check first.
    #[serde(default)]
    pub require_healthy: bool,
}

/// What every change answers: the set's new generation.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Changed {
    /// The generation the change produced.
    pub generation: u64,
}

/// Every error: `{"error": "..."}` with a fitting status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// Why.
    pub error: String,
}
