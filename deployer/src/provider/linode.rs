//! The Linode provider: the public Linode API v4 over reqwest.
//!
//! - create: `POST /linode/instances` with label, region, type, image, a random
//!   root_pass (never logged or stored), authorized_keys, `private_ip: true` and tags
//!   marking the instance as the deployer's and naming the rollout. Safe to retry:
//!   each attempt first looks the label up; an existing instance is reused only when
//!   it carries this run's tag and matches region, type and image, and is otherwise
//!   refused ([`ProviderError::Conflict`]) and left alone. The POST itself is never
//!   repeated blindly: after a 5xx, a cut-off answer or a transport error the label
//!   is looked up again before another POST;
//! - ready: poll `GET /linode/instances/{id}` until `running` within
//!   `boot_timeout_s`, waiting through `provisioning`/`booting`, and booting an
//!   `offline` one (`POST /linode/instances/{id}/boot`); read
//!   `GET /linode/instances/{id}/ips`, then wait until SSH answers with its banner;
//! - rename: `PUT /linode/instances/{id}`; delete: `DELETE /linode/instances/{id}`;
//! - find: `GET /linode/instances` with `X-Filter` (label, tags), following pages.
//!
//! 429 is retried after `Retry-After` (any call: Linode did not process it); 5xx and
//! transport errors of the other, repeatable calls with exponential backoff; other
//! errors surface Linode's `reason` and `field`, and a 403 says the token lacks the
//! Linodes read/write scope. The token comes from
//! the environment variable named by `token_env` and never appears in logs or errors.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Map, Value};
use tokio::io::AsyncReadExt;

use super::{rollout_tag, Instance, Provider, ProviderError, MANAGED_TAG};
use crate::config::{LoadBalancer, Provider as ProviderConfig};
use crate::retry::Backoff;

/// A Linode API client plus the settings for new instances.
pub struct Linode {
    http: reqwest::Client,
    api: String,
    token: String,
    cfg: ProviderConfig,
    zones_dir: PathBuf,
}

impl std::fmt::Debug for Linode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is deliberately left out.
        f.debug_struct("Linode")
            .field("api", &self.api)
            .finish_non_exhaustive()
    }
}

const MAX_ATTEMPTS: u32 = 8;
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

/// How one HTTP exchange ended, when it gave no answer to use.
enum Failure {
    /// 429: refused unprocessed; try again after this long (zero: no `Retry-After`).
    Throttled(Duration, String),
    /// A transport error, a cut-off answer or a 5xx: the request may or may not have
    /// taken effect.
    Unknown(String),
    /// A definite answer that retrying cannot change (4xx).
    Refused(Refusal),
}

/// A 4xx answer: its status, Linode's `{"errors": …}` body, and the message to show.
struct Refusal {
    status: StatusCode,
    body: Value,
    msg: String,
}

impl Refusal {
    /// Does Linode name `field` with a reason containing `reason`?
    fn says(&self, field: &str, reason: &str) -> bool {
        self.body["errors"].as_array().is_some_and(|errs| {
            errs.iter().any(|e| {
                e["field"] == field && e["reason"].as_str().is_some_and(|r| r.contains(reason))
            })
        })
    }
}

impl From<Failure> for ProviderError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Throttled(_, msg) | Failure::Unknown(msg) => ProviderError::Api(msg),
            Failure::Refused(r) => ProviderError::Api(r.msg),
        }
    }
}

impl Linode {
    /// Reads the token from the environment variable `cfg.token_env`.
    pub fn new(cfg: &ProviderConfig, zones_dir: &std::path::Path) -> Result<Self, ProviderError> {
        let token = std::env::var(&cfg.token_env).map_err(|_| {
            ProviderError::Api(format!(
                "environment variable {} is not set (a Linode API token with Linodes read/write)",
                cfg.token_env
            ))
        })?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(cfg.request_timeout_s))
            .user_agent(concat!("dnslb-deployer/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProviderError::Api(format!("http client: {e}")))?;
        Ok(Linode {
            http,
            api: cfg.api_url.trim_end_matches('/').to_string(),
            token,
            cfg: cfg.clone(),
            zones_dir: zones_dir.to_path_buf(),
        })
    }

    /// One HTTP exchange, no retry. `filter` becomes the `X-Filter` header. A 404 is
    /// an answer: the caller decides what "gone" means.
    async fn exchange(
        &self,
        method: &Method,
        path: &str,
        query: &[(&str, String)],
        filter: Option<&Value>,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), Failure> {
        let what = format!("{method} {path}");
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.api))
            .bearer_auth(&self.token)
            .query(query);
        if let Some(f) = filter {
            req = req.header("X-Filter", f.to_string());
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Failure::Unknown(format!("linode {what}: {}", e.without_url())))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // An answer cut off half-way is lost, not empty.
        let text = resp.text().await.map_err(|e| {
            Failure::Unknown(format!(
                "linode {what}: {status}, but the answer was cut off: {}",
                e.without_url()
            ))
        })?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status == StatusCode::TOO_MANY_REQUESTS {
            let wait = retry_after.unwrap_or(Duration::ZERO).min(MAX_RETRY_AFTER);
            return Err(Failure::Throttled(wait, format!("linode {what}: 429")));
        }
        if status.is_server_error() {
            return Err(Failure::Unknown(format!(
                "linode {what}: {status}: {}",
                reasons(&value)
            )));
        }
        if status.is_success() && value.is_null() {
            return Err(Failure::Unknown(format!(
                "linode {what}: {status} with an unreadable answer"
            )));
        }
        if status.is_success() || status == StatusCode::NOT_FOUND {
            return Ok((status, value));
        }
        let mut msg = format!("linode {what}: {status}: {}", reasons(&value));
        if status == StatusCode::FORBIDDEN {
            msg.push_str(&format!(
                " (the token in {} lacks the Linodes read/write scope, linodes:read_write, or access to this Linode; not retried)",
                self.cfg.token_env
            ));
        }
        Err(Failure::Refused(Refusal {
            status,
            body: value,
            msg,
        }))
    }

    /// An API call that may safely be repeated (GET, PUT of a label, DELETE, boot),
    /// retried: 429 after `Retry-After`, 5xx and transport errors with exponential
    /// backoff, at most [`MAX_ATTEMPTS`] attempts.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        filter: Option<&Value>,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), ProviderError> {
        Ok(self.retrying(method, path, query, filter, body).await?)
    }

    /// [`Linode::call`], keeping a 4xx answer as it came for the caller to judge.
    async fn retrying(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        filter: Option<&Value>,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), Failure> {
        let mut backoff = Backoff::new(MAX_ATTEMPTS, Duration::from_millis(250), MAX_BACKOFF);
        loop {
            let (retry_after, msg) = match self.exchange(&method, path, query, filter, body).await {
                Ok(answer) => return Ok(answer),
                Err(Failure::Refused(r)) => return Err(Failure::Refused(r)),
                Err(Failure::Throttled(wait, msg)) => (wait, msg),
                Err(Failure::Unknown(msg)) => (Duration::ZERO, msg),
            };
            let Some(delay) = backoff.next_delay() else {
                return Err(Failure::Unknown(format!(
                    "{msg} (gave up after {MAX_ATTEMPTS} attempts)"
                )));
            };
            // A 429's Retry-After, when it gives one, wins over the backoff.
            let wait = if retry_after.is_zero() {
                delay
            } else {
                retry_after
            };
            eprintln!("deployer: {msg}, retrying after {wait:?}");
            tokio::time::sleep(wait).await;
        }
    }

    /// Why the existing instance `inst` may not be reused by `create` for run
    /// `rollout` in `region`; empty when it may.
    fn differences(&self, inst: &Instance, region: &str, rollout: &str) -> Vec<String> {
        let mut d = Vec::new();
        if !inst.managed() {
            d.push(format!(
                "it lacks the tag {MANAGED_TAG} (the deployer did not create it)"
            ));
        } else if !inst.created_by(rollout) {
            d.push(format!(
                "it lacks the tag {} (another run created it; its tags are {:?})",
                rollout_tag(rollout),
                inst.tags
            ));
        }
        if inst.region != region {
            d.push(format!("region {} (wanted {region})", inst.region));
        }
        let show = |v: Option<&str>| v.unwrap_or("none").to_string();
        let (want_type, want_image) =
            (self.cfg.instance_type.as_deref(), self.cfg.image.as_deref());
        if inst.instance_type.as_deref() != want_type {
            d.push(format!(
                "type {} (wanted {})",
                show(inst.instance_type.as_deref()),
                show(want_type)
            ));
        }
        if inst.image.as_deref() != want_image {
            d.push(format!(
                "image {} (wanted {})",
                show(inst.image.as_deref()),
                show(want_image)
            ));
        }
        d
    }

    /// The existing instance, if `create` may reuse it; otherwise a
    /// [`ProviderError::Conflict`] naming every difference.
    fn reuse(
        &self,
        inst: Instance,
        region: &str,
        rollout: &str,
    ) -> Result<Instance, ProviderError> {
        let d = self.differences(&inst, region, rollout);
        if d.is_empty() {
            eprintln!(
                "deployer: linode: reusing {} ({}), created by this run",
                inst.label, inst.id
            );
            return Ok(inst);
        }
        Err(ProviderError::Conflict(format!(
            "a Linode labelled {} already exists ({}) and cannot be used for {}: {}; it was left untouched: delete or rename it if it is not needed, then run again",
            inst.label,
            inst.id,
            rollout_tag(rollout),
            d.join("; ")
        )))
    }

    /// `POST /linode/instances/{id}/boot` for an instance that is offline. A 400 or
    /// 409 (it may have begun booting meanwhile) is logged and the wait goes on; any
    /// other error (a token without the scope, the instance gone) ends it.
    async fn boot(&self, inst: &Instance) -> Result<(), ProviderError> {
        eprintln!(
            "deployer: linode: {} ({}) is offline, booting it",
            inst.label, inst.id
        );
        let path = format!("/linode/instances/{}/boot", inst.id);
        match self.retrying(Method::POST, &path, &[], None, None).await {
            Ok(_) => Ok(()),
            Err(Failure::Refused(r))
                if matches!(r.status, StatusCode::BAD_REQUEST | StatusCode::CONFLICT) =>
            {
                eprintln!("deployer: {} (still waiting)", r.msg);
                Ok(())
            }
            Err(f) => Err(f.into()),
        }
    }

    /// Every page of a filtered listing.
    async fn list_filtered(&self, filter: &Value) -> Result<Vec<Value>, ProviderError> {
        let mut out = Vec::new();
        let mut page = 1u64;
        loop {
            let (_, v) = self
                .call(
                    Method::GET,
                    "/linode/instances",
                    &[("page", page.to_string()), ("page_size", "100".into())],
                    Some(filter),
                    None,
                )
                .await?;
            out.extend(v["data"].as_array().cloned().unwrap_or_default());
            let pages = v["pages"].as_u64().unwrap_or(1);
            if page >= pages {
                return Ok(out);
            }
            page += 1;
        }
    }

    async fn ips(&self, id: &str) -> Result<(Option<IpAddr>, Option<IpAddr>), ProviderError> {
        let (_, v) = self
            .call(
                Method::GET,
                &format!("/linode/instances/{id}/ips"),
                &[],
                None,
                None,
            )
            .await?;
        let first = |kind: &str| {
            v["ipv4"][kind]
                .as_array()
                .and_then(|a| a.first())
                .and_then(|a| a["address"].as_str())
                .and_then(|s| s.parse().ok())
        };
        Ok((first("public"), first("private")))
    }

    fn local_dir(&self, inst: &Instance) -> PathBuf {
        self.cfg.state_dir.join("linode-local").join(&inst.id)
    }
}

/// "field: reason; reason" from Linode's `{"errors":[{"reason","field"}]}`.
fn reasons(v: &Value) -> String {
    let list: Vec<String> = v["errors"]
        .as_array()
        .map(|errs| {
            errs.iter()
                .map(|e| match (e["field"].as_str(), e["reason"].as_str()) {
                    (Some(f), Some(r)) => format!("{f}: {r}"),
                    (None, Some(r)) => r.to_string(),
                    _ => e.to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    if list.is_empty() {
        "no error details".into()
    } else {
        list.join("; ")
    }
}

fn to_instance(v: &Value, dns_port: u16) -> Option<Instance> {
    let ips: Vec<IpAddr> = v["ipv4"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()?.parse().ok()).collect())
        .unwrap_or_default();
    let private = |ip: &IpAddr| matches!(ip, IpAddr::V4(v4) if v4.is_private());
    Some(Instance {
        id: v["id"].as_u64()?.to_string(),
        label: v["label"].as_str()?.to_string(),
        region: v["region"].as_str().unwrap_or_default().to_string(),
        status: v["status"].as_str().unwrap_or("unknown").to_string(),
        public_ipv4: ips.iter().find(|ip| !private(ip)).copied(),
        private_ipv4: ips.iter().find(|ip| private(ip)).copied(),
        dns_port,
        tags: v["tags"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
        instance_type: v["type"].as_str().map(String::from),
        image: v["image"].as_str().map(String::from),
    })
}

/// A random root password from the OS's cryptographic RNG: never logged, never
/// stored; access is by SSH key.
fn root_pass() -> Result<String, ProviderError> {
    use std::io::Read;
    let alphabet = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789-_!";
    // Rejection sampling keeps every character equally likely.
    let limit = 256 - 256 % alphabet.len();
    let mut out = String::new();
    let mut urandom = std::fs::File::open("/dev/urandom")?;
    while out.len() < 32 {
        let mut b = [0u8; 1];
        urandom.read_exact(&mut b)?;
        if usize::from(b[0]) < limit {
            out.push(char::from(alphabet[usize::from(b[0]) % alphabet.len()]));
        }
    }
    Ok(out)
}

/// Waits until `addr` accepts TCP and sends an SSH banner.
async fn ssh_ready(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let mut buf = [0u8; 8];
        s.read_exact(&mut buf[..4]).await.ok()?;
        (&buf[..4] == b"SSH-").then_some(())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
        .is_some()
}

impl Provider for Linode {
    fn kind(&self) -> &'static str {
        "linode"
    }

    async fn list(&self, labels: &[String]) -> Result<Vec<Instance>, ProviderError> {
        let mut by_id = BTreeMap::new();
        let mut raw = self.list_filtered(&json!({ "tags": MANAGED_TAG })).await?;
        for l in labels {
            raw.extend(self.list_filtered(&json!({ "label": l })).await?);
        }
        for v in raw {
            if let Some(i) = to_instance(&v, self.cfg.dns_port) {
                by_id.insert(i.id.clone(), i);
            }
        }
        let mut v: Vec<Instance> = by_id.into_values().collect();
        v.sort_by(|a, b| a.label.cmp(&b.label));
        Ok(v)
    }

    async fn find(&self, label: &str) -> Result<Option<Instance>, ProviderError> {
        let found = self.list_filtered(&json!({ "label": label })).await?;
        // Labels are unique per account; the filter is exact, but check anyway.
        Ok(found
            .iter()
            .filter_map(|v| to_instance(v, self.cfg.dns_port))
            .find(|i| i.label == label))
    }

    async fn get(&self, id: &str) -> Result<Option<Instance>, ProviderError> {
        let (status, v) = self
            .call(
                Method::GET,
                &format!("/linode/instances/{id}"),
                &[],
                None,
                None,
            )
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(to_instance(&v, self.cfg.dns_port))
    }

    async fn create(
        &self,
        label: &str,
        region: &str,
        rollout: &str,
    ) -> Result<Instance, ProviderError> {
        let body = json!({
            "label": label,
            "region": region,
            "type": self.cfg.instance_type,
            "image": self.cfg.image,
            "root_pass": root_pass()?,
            "authorized_keys": self.cfg.authorized_keys,
            "private_ip": true,
            "booted": true,
            "tags": [MANAGED_TAG, rollout_tag(rollout)],
        });
        // POST is not idempotent: it is never repeated blindly. Every attempt first
        // looks the label up, so a POST that took effect although its answer was lost
        // (a 5xx, a cut-off answer, a transport error) is found, not duplicated, and
        // only an instance this run created, with these settings, is reused.
        let mut backoff = Backoff::new(MAX_ATTEMPTS, Duration::from_millis(500), MAX_BACKOFF);
        loop {
            if let Some(existing) = self.find(label).await? {
                return self.reuse(existing, region, rollout);
            }
            let (fixed, msg) = match self
                .exchange(&Method::POST, "/linode/instances", &[], None, Some(&body))
                .await
            {
                Ok((_, v)) => {
                    return to_instance(&v, self.cfg.dns_port).ok_or_else(|| {
                        ProviderError::Api(format!(
                            "linode POST /linode/instances: unexpected answer {v}"
                        ))
                    })
                }
                // Linode refused it unprocessed: the same POST may go again.
                Err(Failure::Throttled(wait, msg)) => ((!wait.is_zero()).then_some(wait), msg),
                Err(Failure::Unknown(msg)) => (None, format!("{msg}; it may have been created")),
                // Created meanwhile by someone else (or by a lost earlier attempt):
                // the next lookup decides whether it may be reused.
                Err(Failure::Refused(r)) if r.says("label", "unique") => {
                    (Some(Duration::ZERO), r.msg)
                }
                Err(f @ Failure::Refused(_)) => return Err(f.into()),
            };
            let Some(delay) = backoff.next_delay() else {
                return Err(ProviderError::Api(format!(
                    "{msg} (gave up creating {label} after {MAX_ATTEMPTS} attempts)"
                )));
            };
            // A 429's Retry-After, or at once after a unique-label refusal; else the
            // backoff.
            let wait = fixed.unwrap_or(delay);
            eprintln!("deployer: {msg}; looking {label} up again after {wait:?}");
            tokio::time::sleep(wait).await;
        }
    }

    /// A load balancer is a Linode like any other; its ports are the dnslb role's.
    async fn create_lb(
        &self,
        label: &str,
        region: &str,
        rollout: &str,
        _ports: &[u16],
    ) -> Result<Instance, ProviderError> {
        self.create(label, region, rollout).await
    }

    async fn wait_ready(&self, inst: &Instance) -> Result<Instance, ProviderError> {
        let deadline = Instant::now() + Duration::from_secs(self.cfg.boot_timeout_s);
        let poll = Duration::from_millis(self.cfg.poll_interval_ms);
        // An offline instance is booted, and booted again if it is still offline a
        // while later (Linode may take a moment to start the boot job).
        let reboot_after = Duration::from_secs(10).max(poll * 5);
        let mut booted_at: Option<Instant> = None;
        let mut cur = loop {
            let Some(cur) = self.get(&inst.id).await? else {
                return Err(ProviderError::Api(format!(
                    "instance {} ({}) disappeared",
                    inst.label, inst.id
                )));
            };
            match cur.status.as_str() {
                "running" => break cur,
                "offline" | "stopped" if booted_at.is_none_or(|t| t.elapsed() >= reboot_after) => {
                    self.boot(&cur).await?;
                    booted_at = Some(Instant::now());
                }
                // provisioning, booting, rebooting, migrating, …: wait through them.
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(ProviderError::Timeout(format!(
                    "{} ({}) still {} after {}s",
                    inst.label, inst.id, cur.status, self.cfg.boot_timeout_s
                )));
            }
            tokio::time::sleep(poll).await;
        };
        let (public, private) = self.ips(&cur.id).await?;
        cur.public_ipv4 = public.or(cur.public_ipv4);
        cur.private_ipv4 = private.or(cur.private_ipv4);
        let Some(ip) = cur.public_ipv4 else {
            return Err(ProviderError::Api(format!(
                "{} ({}) has no public IPv4",
                cur.label, cur.id
            )));
        };
        let ssh = SocketAddr::new(ip, self.cfg.ssh_port);
        while !ssh_ready(ssh).await {
            if Instant::now() >= deadline {
                return Err(ProviderError::Timeout(format!(
                    "{} ({}) runs but SSH on {ssh} did not answer within {}s",
                    cur.label, cur.id, self.cfg.boot_timeout_s
                )));
            }
            tokio::time::sleep(poll).await;
        }
        Ok(cur)
    }

    async fn rename(&self, inst: &Instance, label: &str) -> Result<Instance, ProviderError> {
        let (status, v) = self
            .call(
                Method::PUT,
                &format!("/linode/instances/{}", inst.id),
                &[],
                None,
                Some(&json!({ "label": label })),
            )
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Err(ProviderError::Api(format!(
                "cannot rename {}: instance {} is gone",
                inst.label, inst.id
            )));
        }
        let mut out = to_instance(&v, self.cfg.dns_port).unwrap_or_else(|| inst.clone());
        out.label = label.into();
        out.private_ipv4 = out.private_ipv4.or(inst.private_ipv4);
        out.public_ipv4 = out.public_ipv4.or(inst.public_ipv4);
        Ok(out)
    }

    async fn delete(&self, inst: &Instance) -> Result<(), ProviderError> {
        self.call(
            Method::DELETE,
            &format!("/linode/instances/{}", inst.id),
            &[],
            None,
            None,
        )
        .await?;
        // Its address may be handed to a future instance with another host key.
        let known_hosts = self.cfg.state_dir.join("known_hosts");
        if let (Some(ip), true) = (inst.public_ipv4, known_hosts.exists()) {
            let _ = std::process::Command::new("ssh-keygen")
                .arg("-f")
                .arg(&known_hosts)
                .args(["-R", &ip.to_string()])
                .output();
        }
        if self.cfg.provision_local {
            let dir = self.local_dir(inst);
            super::local::stop_processes(&dir).await;
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(())
    }

    fn host_vars(&self, inst: &Instance) -> Map<String, Value> {
        let ip = inst.public_ipv4.map(|i| i.to_string()).unwrap_or_default();
        let listen: Vec<String> = inst
            .public_ipv4
            .iter()
            .chain(inst.private_ipv4.iter())
            .map(|a| a.to_string())
            .collect();
        let vars = if self.cfg.provision_local {
            json!({
                "ansible_connection": "local",
                "ansible_python_interpreter": "auto_silent",
                "common_local": true,
                "nameserver_local": true,
                "nameserver_root": self.local_dir(inst),
                "nameserver_port": self.cfg.dns_port,
                "nameserver_listen_address": listen,
                "nameserver_zones_dir": self.zones_dir,
            })
        } else {
            let known_hosts = self.cfg.state_dir.join("known_hosts");
            json!({
                "ansible_host": ip,
                "ansible_user": self.cfg.ssh_user,
                "ansible_port": self.cfg.ssh_port,
                "ansible_ssh_common_args": format!(
                    "-o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={}",
                    known_hosts.display()
                ),
                "common_local": false,
                "nameserver_local": false,
                "nameserver_port": self.cfg.dns_port,
                "nameserver_zones_dir": self.zones_dir,
            })
        };
        super::object(vars)
    }

    fn lb_host_vars(&self, inst: &Instance) -> Map<String, Value> {
        let mut vars = self.host_vars(inst);
        vars.retain(|k, _| !k.starts_with("nameserver_"));
        if self.cfg.provision_local {
            vars.insert("dnslb_local".into(), true.into());
            vars.insert("dnslb_root".into(), json!(self.local_dir(inst)));
        } else {
            vars.insert("dnslb_local".into(), false.into());
        }
        vars
    }

    fn backend_addr(&self, inst: &Instance, lb: &LoadBalancer) -> Option<SocketAddr> {
        let same_region = lb.region.as_deref() == Some(inst.region.as_str());
        let ip = match inst.private_ipv4 {
            Some(p) if same_region && !self.cfg.force_public_ip => Some(p),
            _ => inst.public_ipv4,
        }?;
        Some(SocketAddr::new(ip, self.cfg.dns_port))
    }
}
