//! Where nameserver instances come from. [`Provider`] is the interface the rollout
//! engine uses; [`local`] makes real `named` processes on this machine, [`linode`]
//! speaks the Linode API v4. [`AnyProvider`] picks one from the config.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::config::LoadBalancer;

pub mod linode;
pub mod local;

/// The tag every instance the deployer creates carries.
pub const MANAGED_TAG: &str = "dnslb-deployer";

/// The tag naming the run (rollout ID, or `bootstrap-<time>`) that created an
/// instance; the same for every provider. Linode tags are 3–50 characters, which a
/// rollout ID (`r<unix time>-<4 hex>`) fits with room to spare.
pub fn rollout_tag(rollout: &str) -> String {
    format!("dnslb-rollout-{rollout}")
}

/// The tag the local provider wrote before [`rollout_tag`] (still read, so that
/// instances of a journal from before the change are recognized).
fn legacy_local_rollout_tag(rollout: &str) -> String {
    format!("rollout:{rollout}")
}

/// A server, as the deployer sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The provider's ID.
    pub id: String,
    /// Its label (hostname-like name).
    pub label: String,
    /// Region.
    pub region: String,
    /// Provider status (running, booting, provisioning, offline, …).
    pub status: String,
    /// Public IPv4, if any.
    pub public_ipv4: Option<IpAddr>,
    /// Private IPv4, if any.
    pub private_ipv4: Option<IpAddr>,
    /// Port DNS is served on (53 on VMs).
    pub dns_port: u16,
    /// Tags.
    pub tags: Vec<String>,
    /// Plan (Linode `type`), when the provider has one: a `<name>-next` is reused
    /// only when it matches the configured plan.
    #[serde(default)]
    pub instance_type: Option<String>,
    /// Image it was deployed from, when the provider has one: a leftover built from
    /// another image is never adopted (immutability).
    #[serde(default)]
    pub image: Option<String>,
}

impl Instance {
    /// Was it created by the deployer (versus found by label)?
    pub fn managed(&self) -> bool {
        self.tags.iter().any(|t| t == MANAGED_TAG)
    }

    /// Was it created by the run `rollout` (a rollout ID, or `bootstrap-<time>`)?
    /// True only with the managed tag and that run's [`rollout_tag`] (or the local
    /// provider's older `rollout:<id>`). Rollback deletes a `<name>-next` found by
    /// label only when this holds.
    pub fn created_by(&self, rollout: &str) -> bool {
        let (tag, legacy) = (rollout_tag(rollout), legacy_local_rollout_tag(rollout));
        self.managed() && self.tags.iter().any(|t| *t == tag || *t == legacy)
    }

    /// Where to query it directly.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.public_ipv4
            .or(self.private_ipv4)
            .map(|ip| SocketAddr::new(ip, self.dns_port))
    }
}

/// Failures of a provider.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The API (or the local machine) said no.
    #[error("{0}")]
    Api(String),
    /// An instance did not become ready in time.
    #[error("{0}")]
    Timeout(String),
    /// Local I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// An instance with the label exists but may not be used: not created by this
    /// run, or built with another region, plan or image. Nothing was changed.
    #[error("{0}")]
    Conflict(String),
}

/// What the rollout engine needs from a provider. Every call is idempotent where it
/// can be: `create` of a label that exists returns the existing instance when that
/// instance was created by the same run (and, where the provider has them, with the
/// same region, plan and image); any other is refused with
/// [`ProviderError::Conflict`] and left alone.
#[allow(async_fn_in_trait)]
pub trait Provider {
    /// Short name for logs.
    fn kind(&self) -> &'static str;
    /// Every instance the deployer manages or whose label is one of `labels`.
    async fn list(&self, labels: &[String]) -> Result<Vec<Instance>, ProviderError>;
    /// The instance with this label, if any.
    async fn find(&self, label: &str) -> Result<Option<Instance>, ProviderError>;
    /// The instance with this ID, if it still exists.
    async fn get(&self, id: &str) -> Result<Option<Instance>, ProviderError>;
    /// Creates `label` tagged with [`rollout_tag`]`(rollout)`, or returns the existing
    /// one if [`Instance::created_by`]`(rollout)` and it matches the settings.
    async fn create(
        &self,
        label: &str,
        region: &str,
        rollout: &str,
    ) -> Result<Instance, ProviderError>;
    /// Waits until the instance runs and can be provisioned.
    async fn wait_ready(&self, inst: &Instance) -> Result<Instance, ProviderError>;
    /// Renames an instance.
    async fn rename(&self, inst: &Instance, label: &str) -> Result<Instance, ProviderError>;
    /// Deletes an instance; deleting one that is gone is not an error.
    async fn delete(&self, inst: &Instance) -> Result<(), ProviderError>;
    /// Creates a load balancer `label` (same reuse rules as `create`) that will listen
    /// on `ports` (DNS, admin) of its address: the local provider picks a loopback
    /// address of its own where they are free.
    async fn create_lb(
        &self,
        label: &str,
        region: &str,
        rollout: &str,
        ports: &[u16],
    ) -> Result<Instance, ProviderError>;
    /// Ansible host variables for provisioning this instance.
    fn host_vars(&self, inst: &Instance) -> serde_json::Map<String, serde_json::Value>;
    /// Ansible host variables for provisioning this instance as a load balancer (the
    /// connection, and `dnslb_local`/`dnslb_root` where it runs on this machine); the
    /// rollout adds the dnslb role's own variables.
    fn lb_host_vars(&self, inst: &Instance) -> serde_json::Map<String, serde_json::Value>;
    /// The address a load balancer should use for this instance.
    fn backend_addr(&self, inst: &Instance, lb: &LoadBalancer) -> Option<SocketAddr>;
}

/// The map inside a JSON object literal (host variables are written as `json!({…})`).
fn object(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m,
        other => unreachable!("host variables are an object literal, not {other}"),
    }
}

/// The provider chosen by the config.
pub enum AnyProvider {
    /// Local processes.
    Local(local::Local),
    /// Linode.
    Linode(Box<linode::Linode>),
}

macro_rules! dispatch {
    ($self:ident, $p:ident => $e:expr) => {
        match $self {
            AnyProvider::Local($p) => $e,
            AnyProvider::Linode($p) => $e,
        }
    };
}

impl Provider for AnyProvider {
    fn kind(&self) -> &'static str {
        dispatch!(self, p => p.kind())
    }
    async fn list(&self, labels: &[String]) -> Result<Vec<Instance>, ProviderError> {
        dispatch!(self, p => p.list(labels).await)
    }
    async fn find(&self, label: &str) -> Result<Option<Instance>, ProviderError> {
        dispatch!(self, p => p.find(label).await)
    }
    async fn get(&self, id: &str) -> Result<Option<Instance>, ProviderError> {
        dispatch!(self, p => p.get(id).await)
    }
    async fn create(
        &self,
        label: &str,
        region: &str,
        rollout: &str,
    ) -> Result<Instance, ProviderError> {
        dispatch!(self, p => p.create(label, region, rollout).await)
    }
    async fn wait_ready(&self, inst: &Instance) -> Result<Instance, ProviderError> {
        dispatch!(self, p => p.wait_ready(inst).await)
    }
    async fn rename(&self, inst: &Instance, label: &str) -> Result<Instance, ProviderError> {
        dispatch!(self, p => p.rename(inst, label).await)
    }
    async fn delete(&self, inst: &Instance) -> Result<(), ProviderError> {
        dispatch!(self, p => p.delete(inst).await)
    }
    async fn create_lb(
        &self,
        label: &str,
        region: &str,
        rollout: &str,
        ports: &[u16],
    ) -> Result<Instance, ProviderError> {
        dispatch!(self, p => p.create_lb(label, region, rollout, ports).await)
    }
    fn host_vars(&self, inst: &Instance) -> serde_json::Map<String, serde_json::Value> {
        dispatch!(self, p => p.host_vars(inst))
    }
    fn lb_host_vars(&self, inst: &Instance) -> serde_json::Map<String, serde_json::Value> {
        dispatch!(self, p => p.lb_host_vars(inst))
    }
    fn backend_addr(&self, inst: &Instance, lb: &LoadBalancer) -> Option<SocketAddr> {
        dispatch!(self, p => p.backend_addr(inst, lb))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tagged(tags: &[&str]) -> Instance {
        Instance {
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..Instance::default()
        }
    }

    #[test]
    fn created_by_needs_the_managed_tag_and_this_runs_tag() {
        let id = "r1764686400-3f9a";
        assert!(tagged(&[MANAGED_TAG, &rollout_tag(id)]).created_by(id));
        // The local provider's former tag is still recognized.
        assert!(tagged(&[MANAGED_TAG, "rollout:r1764686400-3f9a"]).created_by(id));
        assert!(!tagged(&[MANAGED_TAG, &rollout_tag("r1764686400-0000")]).created_by(id));
        assert!(!tagged(&[&rollout_tag(id)]).created_by(id), "not managed");
        assert!(!tagged(&[MANAGED_TAG]).created_by(id));
        assert!(!tagged(&[MANAGED_TAG, "dnslb-rollout-r1764686400-3f9a-x"]).created_by(id));
        assert!(rollout_tag(&format!("bootstrap-{}", u64::MAX)).len() <= 50);
    }

    #[test]
    fn journals_without_type_and_image_still_load() {
        let old = r#"{"id":"1","label":"ns1","region":"us-west","status":"running",
            "public_ipv4":"127.0.0.1","private_ipv4":null,"dns_port":53,"tags":[]}"#;
        let i: Instance = serde_json::from_str(old).unwrap();
        assert_eq!((i.instance_type, i.image), (None, None));
    }
}
