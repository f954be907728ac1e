//! `deployer rollout-lbs`: blue-green of the load balancers themselves, through the
//! parent zone's delegation (SPEC §5, "Load balancer rollout").
//!
//! For every `[[load_balancer]]`: create `<lb>-next` (a real dnslb process on a
//! loopback address of its own locally, an instance on Linode), provision it with the
//! dnslb role, give it the live set of the old one, verify every zone record through
//! it; then change the glue of each `ns_name` to the new addresses, wait until every
//! parent server serves it, wait until the old load balancers get no traffic
//! ([`crate::drain`]), delete them and rename the new ones. The new endpoints are
//! recorded in `<state_dir>/load_balancers.json`, which from then on overrides the
//! config's `admin_url`/`dns` for every command.
//!
//! Journal (`lb-journal.json`), lock, resume and automatic rollback as for the
//! nameserver rollout. The invariant: a load balancer is deleted only when no parent
//! server's delegation points at it. A rollback restores the delegation first, waits
//! until the new load balancers are idle, then deletes them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::ansible::{self, Group, Host};
use crate::config::{LoadBalancer, Registrar as RegistrarConfig, RegistrarKind};
use crate::drain;
use crate::journal::{self, load_json, save_json, Event, Lock};
use crate::lbclient::{same_members, LbClient};
use crate::provider::{Instance, Provider};
use crate::registrar::{self, fmt_addrs, Manual, Registrar, Rfc2136};
use crate::rollout::{DeployError, Deployer};
use crate::verify;

type Result<T, E = DeployError> = std::result::Result<T, E>;

/// Where a load balancer rollout stands. Ordered like [`crate::journal::Phase`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPhase {
    /// 1: create `<lb>-next`.
    Create,
    /// 2: ansible-playbook (dnslb role).
    Provision,
    /// 3: give each new one the old one's live set.
    Copy,
    /// 4: verify every record through each new one.
    Verify,
    /// 5: change the glue.
    Delegate,
    /// 6: wait until every parent server serves it.
    Propagate,
    /// 7: wait until the old ones get no traffic.
    Drain,
    /// 8: delete the old ones.
    DeleteOld,
    /// 9: rename, record the new endpoints.
    Rename,
    /// Finished.
    Done,
    /// Undone.
    RolledBack,
    /// Undoing.
    RollingBack,
}

impl LbPhase {
    /// Step number and name, for progress lines.
    pub fn label(self) -> &'static str {
        match self {
            LbPhase::Create => "lb 1/9 create",
            LbPhase::Provision => "lb 2/9 provision",
            LbPhase::Copy => "lb 3/9 copy-set",
            LbPhase::Verify => "lb 4/9 verify",
            LbPhase::Delegate => "lb 5/9 delegate",
            LbPhase::Propagate => "lb 6/9 propagate",
            LbPhase::Drain => "lb 7/9 drain",
            LbPhase::DeleteOld => "lb 8/9 delete-old",
            LbPhase::Rename => "lb 9/9 rename",
            LbPhase::Done => "done",
            LbPhase::RolledBack => "rolled back",
            LbPhase::RollingBack => "rolling back",
        }
    }
}

/// How the deployer reaches one load balancer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Admin API.
    pub admin_url: String,
    /// DNS address.
    pub dns: SocketAddr,
    /// Admin token file.
    pub token_file: Option<PathBuf>,
    /// The instance, when the deployer created it.
    pub instance: Option<Instance>,
}

/// The journal of one load balancer rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbJournal {
    /// Rollout ID.
    pub id: String,
    /// Unix seconds.
    pub started_at: u64,
    /// Current phase.
    pub phase: LbPhase,
    /// The live load balancers when it began.
    pub old: BTreeMap<String, Endpoint>,
    /// The new instances, by load balancer.
    pub new: BTreeMap<String, Instance>,
    /// The glue of each NS name before the change.
    pub glue_before: BTreeMap<String, Vec<IpAddr>>,
    /// The delegation's TTL before the change (the longest of every parent server).
    pub ttl: u32,
    /// Set before the first glue change is sent: a rollback must restore it.
    pub delegated: bool,
    /// When every parent server served the new glue (unix seconds).
    pub visible_at: Option<u64>,
    /// Where it stood when its rollback began.
    pub rollback_from: Option<LbPhase>,
    /// Why it is being rolled back.
    pub failure: Option<String>,
    /// Every step.
    pub events: Vec<Event>,
}

const JOURNAL: &str = "lb-journal.json";
/// The endpoints that override the config once a load balancer rollout finished.
pub const ENDPOINTS: &str = "load_balancers.json";

impl LbJournal {
    fn new() -> Self {
        let t = journal::now();
        LbJournal {
            id: format!("l{t}-{:04x}", fastrand::u16(..)),
            started_at: t,
            phase: LbPhase::Create,
            old: BTreeMap::new(),
            new: BTreeMap::new(),
            glue_before: BTreeMap::new(),
            ttl: 0,
            delegated: false,
            visible_at: None,
            rollback_from: None,
            failure: None,
            events: Vec::new(),
        }
    }

    /// Is there something left to finish or undo?
    pub fn unfinished(&self) -> bool {
        !matches!(self.phase, LbPhase::Done | LbPhase::RolledBack)
    }

    /// Reads it, if any.
    pub fn load(dir: &Path) -> std::io::Result<Option<Self>> {
        load_json(&dir.join(JOURNAL))
    }

    fn save(&self, dir: &Path) -> std::io::Result<()> {
        save_json(&dir.join(JOURNAL), self)
    }

    fn record(
        &mut self,
        dir: &Path,
        step: &str,
        status: &str,
        detail: &str,
    ) -> std::io::Result<()> {
        self.events.push(Event {
            at: journal::now(),
            step: step.into(),
            status: status.into(),
            detail: detail.into(),
        });
        self.save(dir)
    }
}

/// The endpoints recorded by finished load balancer rollouts.
pub fn load_endpoints(dir: &Path) -> std::io::Result<BTreeMap<String, Endpoint>> {
    Ok(load_json(&dir.join(ENDPOINTS))?.unwrap_or_default())
}

/// Applies recorded endpoints over the config's.
pub fn apply_endpoints(lbs: &mut [LoadBalancer], endpoints: &BTreeMap<String, Endpoint>) {
    for lb in lbs {
        if let Some(e) = endpoints.get(&lb.name) {
            lb.admin_url = e.admin_url.clone();
            lb.dns = e.dns;
            lb.token_file = e.token_file.clone();
        }
    }
}

/// The registrar the config names.
enum AnyRegistrar {
    Rfc2136(Rfc2136),
    Manual(Manual),
}

impl AnyRegistrar {
    fn new(r: &RegistrarConfig) -> Self {
        match r.kind {
            RegistrarKind::Rfc2136 => AnyRegistrar::Rfc2136(Rfc2136 {
                server: r.parent_servers[0],
                key_file: r.tsig_key_file.clone().unwrap_or_default(),
            }),
            RegistrarKind::Manual => AnyRegistrar::Manual(Manual {
                parent_servers: r.parent_servers.clone(),
                timeout: Duration::from_secs(r.propagation_timeout_s),
            }),
        }
    }

    async fn set_glue(&self, zone: &str, ns: &str, addrs: &[IpAddr], ttl: u32) -> Result<()> {
        let r = match self {
            AnyRegistrar::Rfc2136(r) => r.set_glue(zone, ns, addrs, ttl).await,
            AnyRegistrar::Manual(r) => r.set_glue(zone, ns, addrs, ttl).await,
        };
        r.map_err(|e| DeployError::Refused(e.to_string()))
    }
}

fn next_label(lb: &str) -> String {
    format!("{lb}-next")
}

/// The port of an `http://host:port` admin URL.
fn admin_port(url: &str) -> Result<u16> {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.port_or_known_default())
        .ok_or_else(|| DeployError::Refused(format!("admin_url {url:?} has no port")))
}

impl<P: Provider> Deployer<P> {
    fn registrar_cfg(&self) -> Result<&RegistrarConfig> {
        let cfg = self.config();
        let r = cfg.registrar.as_ref().ok_or_else(|| {
            DeployError::Refused("rollout-lbs needs a [registrar] section".into())
        })?;
        let missing: Vec<&str> = cfg
            .load_balancers
            .iter()
            .filter(|lb| lb.ns_name.is_none())
            .map(|lb| lb.name.as_str())
            .collect();
        if !missing.is_empty() || cfg.load_balancers.is_empty() {
            return Err(DeployError::Refused(format!(
                "rollout-lbs needs at least one [[load_balancer]], each with ns_name (missing on: {})",
                missing.join(", ")
            )));
        }
        Ok(r)
    }

    /// The endpoint of the new load balancer of `lb`.
    fn new_endpoint(&self, lb: &LoadBalancer, inst: &Instance) -> Result<Endpoint> {
        let ip = inst.public_ipv4.or(inst.private_ipv4).ok_or_else(|| {
            DeployError::Refused(format!("{} ({}) has no address", inst.label, inst.id))
        })?;
        let host = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        Ok(Endpoint {
            admin_url: format!("http://{host}:{}", admin_port(&lb.admin_url)?),
            dns: SocketAddr::new(ip, lb.dns.port()),
            token_file: Some(self.token_file(lb)?),
            instance: Some(inst.clone()),
        })
    }

    /// The admin token file new load balancers get: the old one's, or one the
    /// deployer makes (0600) in the state directory.
    fn token_file(&self, lb: &LoadBalancer) -> Result<PathBuf> {
        if let Some(t) = &lb.token_file {
            return Ok(t.clone());
        }
        let path = self
            .state_dir()
            .join("tokens")
            .join(format!("{}.token", lb.name));
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::create_dir_all(path.parent().expect("has a parent"))?;
            let token: String = std::iter::repeat_with(fastrand::alphanumeric)
                .take(32)
                .collect();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            std::io::Write::write_all(&mut f, token.as_bytes())?;
        }
        Ok(path)
    }

    fn client(&self, lb: &LoadBalancer, e: &Endpoint) -> Result<LbClient> {
        let mut l = lb.clone();
        l.admin_url = e.admin_url.clone();
        l.dns = e.dns;
        l.token_file = e.token_file.clone();
        Ok(LbClient::new(&l)?)
    }

    fn lb_begin(&self, j: &mut LbJournal, phase: LbPhase) -> Result<Instant> {
        j.phase = phase;
        j.record(self.state_dir(), phase.label(), "started", "")?;
        eprintln!("deployer: step {}: started", phase.label());
        Ok(Instant::now())
    }

    fn lb_end(
        &self,
        j: &mut LbJournal,
        phase: LbPhase,
        t0: Instant,
        r: &Result<String>,
    ) -> Result<()> {
        let (status, text) = match r {
            Ok(s) => ("done", format!("ok, {s}")),
            Err(e) => (
                "failed",
                format!(
                    "FAILED: {}",
                    e.to_string().lines().next().unwrap_or_default()
                ),
            ),
        };
        j.record(
            self.state_dir(),
            phase.label(),
            status,
            &r.as_ref().map_or_else(|e| e.to_string(), |s| s.clone()),
        )?;
        eprintln!(
            "deployer: step {}: {text} ({:.2}s)",
            phase.label(),
            t0.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// The deployer's own instance serving as `lb` now (named after it, at its
    /// address), if the deployer made it; `None` for one made by hand.
    async fn serving_instance(&self, lb: &LoadBalancer) -> Result<Option<Instance>> {
        Ok(self
            .provider()
            .find(&lb.name)
            .await?
            .filter(|i| i.managed() && i.public_ipv4.or(i.private_ipv4) == Some(lb.dns.ip())))
    }

    /// What every parent server serves; all must agree.
    async fn delegation_now(&self, r: &RegistrarConfig) -> Result<Vec<registrar::Delegation>> {
        let mut out = Vec::new();
        for &s in &r.parent_servers {
            out.push(
                registrar::delegation(s, &r.zone)
                    .await
                    .map_err(|e| DeployError::Refused(e.to_string()))?,
            );
        }
        Ok(out)
    }

    /// What `deployer rollout-lbs` would do now, for `deployer plan`: nothing without
    /// a `[registrar]`. Reads the parent's delegation and each load balancer's set;
    /// changes nothing.
    pub(crate) async fn plan_lbs(&self) -> Result<Vec<String>> {
        let cfg = self.config();
        let Some(r) = cfg.registrar.as_ref() else {
            return Ok(Vec::new());
        };
        let mut out = vec![format!(
            "and `deployer rollout-lbs` would now, for the delegation of {}:",
            r.zone
        )];
        if let Some(j) = LbJournal::load(self.state_dir())?.filter(|j| j.unfinished()) {
            out.push(format!(
                "an unfinished load balancer rollout {} stopped at step {}: `deployer rollout-lbs` resumes it, `deployer rollback` undoes it",
                j.id,
                j.phase.label()
            ));
        }
        if let Err(e) = self.registrar_cfg() {
            out.push(format!("nothing: {e}"));
            return Ok(out);
        }
        let lbs = &cfg.load_balancers;
        let served = self.delegation_now(r).await;
        out.push(format!(
            "{}: {} ({} provider)",
            LbPhase::Create.label(),
            lbs.iter()
                .map(|lb| format!(
                    "{} in {}",
                    next_label(&lb.name),
                    lb.region.as_deref().unwrap_or("local")
                ))
                .collect::<Vec<_>>()
                .join(", "),
            self.provider().kind()
        ));
        out.push(format!(
            "{}: the new ones with the dnslb role (ansible-playbook {})",
            LbPhase::Provision.label(),
            cfg.ansible.playbook.display()
        ));
        for lb in lbs {
            out.push(match LbClient::new(lb)?.members().await {
                Ok(s) => format!(
                    "{}: {}'s set of generation {} [{}] onto {}",
                    LbPhase::Copy.label(),
                    lb.name,
                    s.generation,
                    s.backends
                        .iter()
                        .map(|b| format!("{} {}", b.name, b.address))
                        .collect::<Vec<_>>()
                        .join(", "),
                    next_label(&lb.name)
                ),
                Err(e) => format!(
                    "{}: {}: cannot read its backend set: {e}",
                    LbPhase::Copy.label(),
                    lb.name
                ),
            });
        }
        out.push(format!(
            "{}: every record of the checked zones through each new one, over UDP and TCP",
            LbPhase::Verify.label()
        ));
        let how = match r.kind {
            RegistrarKind::Rfc2136 => format!(
                "a TSIG-signed UPDATE to {}",
                r.parent_servers
                    .first()
                    .map_or_else(String::new, |s| s.to_string())
            ),
            RegistrarKind::Manual => "printed for you to make at the registrar".into(),
        };
        let (ttl, glue) = match &served {
            Ok(d) if !d.is_empty() => (d.iter().map(|d| d.ttl).max().unwrap_or(0), Some(&d[0])),
            _ => (0, None),
        };
        for lb in lbs {
            let ns = lb.ns_name.clone().expect("checked").to_ascii_lowercase();
            let now = match glue.map(|d| d.glue(&ns)) {
                Some(a) if !a.is_empty() => fmt_addrs(&a),
                Some(_) => "none".into(),
                None => "unknown".into(),
            };
            out.push(format!(
                "{}: {ns} glue {now} -> the address of {} ({how})",
                LbPhase::Delegate.label(),
                next_label(&lb.name)
            ));
        }
        out.push(format!(
            "{}: until {} serve it (at most {}s)",
            LbPhase::Propagate.label(),
            fmt_addrs(&r.parent_servers),
            r.propagation_timeout_s
        ));
        if let Err(e) = &served {
            out.push(format!(
                "  (the parent's delegation cannot be read now: {e})"
            ));
        }
        out.push(format!(
            "{}: until {} get under {} queries/s for {}s, not before the delegation's TTL ({ttl}s) has passed, at most {}s more",
            LbPhase::Drain.label(),
            lbs.iter()
                .map(|lb| format!("{} ({})", lb.name, lb.dns))
                .collect::<Vec<_>>()
                .join(", "),
            r.drain_qps,
            r.drain_window_s,
            r.drain_window_s + r.drain_margin_s
        ));
        let mut delete = Vec::new();
        for lb in lbs {
            delete.push(match self.serving_instance(lb).await? {
                Some(i) => format!("{} ({})", i.label, i.id),
                None => format!(
                    "none for {} at {} (not created by the deployer: left running)",
                    lb.name, lb.dns
                ),
            });
        }
        out.push(format!(
            "{}: {}",
            LbPhase::DeleteOld.label(),
            delete.join(", ")
        ));
        out.push(format!(
            "{}: {}, and record the new endpoints in {}",
            LbPhase::Rename.label(),
            lbs.iter()
                .map(|lb| format!("{} -> {}", next_label(&lb.name), lb.name))
                .collect::<Vec<_>>()
                .join(", "),
            self.state_dir().join(ENDPOINTS).display()
        ));
        Ok(out)
    }

    /// `deployer rollout-lbs`.
    pub async fn rollout_lbs(&self) -> Result<String> {
        let r = self.registrar_cfg()?.clone();
        let _lock = Lock::acquire(self.state_dir(), "rollout-lbs")?;
        if let Some(j) = crate::journal::Journal::load(self.state_dir())? {
            if j.unfinished() {
                return Err(DeployError::Refused(format!(
                    "nameserver rollout {} is unfinished (step {}): run `deployer rollout` or `deployer rollback` first",
                    j.id,
                    j.phase.label()
                )));
            }
        }
        let started = Instant::now();
        let mut j = match LbJournal::load(self.state_dir())? {
            Some(mut j) if j.phase == LbPhase::RollingBack => {
                let summary = self.lb_undo(&mut j, &r).await?;
                return Err(DeployError::Refused(format!(
                    "load balancer rollout {} had failed and is now rolled back: {summary}",
                    j.id
                )));
            }
            Some(j) if j.unfinished() => {
                eprintln!(
                    "deployer: resuming load balancer rollout {} at step {}",
                    j.id,
                    j.phase.label()
                );
                j
            }
            Some(old) => {
                journal::archive(&self.state_dir().join(JOURNAL), self.state_dir(), &old.id)?;
                LbJournal::new()
            }
            None => LbJournal::new(),
        };
        eprintln!("deployer: load balancer rollout {}", j.id);
        match self.lb_forward(&mut j, &r).await {
            Ok(()) => {
                j.phase = LbPhase::Done;
                j.record(self.state_dir(), "rollout-lbs", "done", "")?;
                Ok(format!(
                    "load balancer rollout {} completed in {:.1}s; now: {}",
                    j.id,
                    started.elapsed().as_secs_f64(),
                    j.new
                        .iter()
                        .map(|(lb, i)| {
                            let ip = i.public_ipv4.or(i.private_ipv4);
                            format!("{lb}={} ({})", i.label, ip.map_or_else(|| "-".into(), |a| a.to_string()))
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
            Err(e) if j.phase <= LbPhase::Propagate => {
                eprintln!("deployer: load balancer rollout {} failed at step {}; rolling back", j.id, j.phase.label());
                j.failure = Some(e.to_string());
                match self.lb_undo(&mut j, &r).await {
                    Ok(summary) => Err(DeployError::RolledBack { failure: Box::new(e), summary }),
                    Err(r) => Err(DeployError::RollbackFailed { failure: Box::new(e), rollback: Box::new(r) }),
                }
            }
            Err(e) if j.phase == LbPhase::Drain => Err(DeployError::Refused(format!(
                "{e}\nthe new load balancers serve and the delegation points at them; `deployer rollout-lbs` waits again, `deployer rollback` points the delegation back"
            ))),
            Err(e) => Err(DeployError::Refused(format!(
                "{e}\nthe old load balancers were already being deleted: run `deployer rollout-lbs` again to finish"
            ))),
        }
    }

    async fn lb_forward(&self, j: &mut LbJournal, r: &RegistrarConfig) -> Result<()> {
        let lbs = self.config().load_balancers.clone();
        let dir = self.state_dir().to_path_buf();
        if j.old.is_empty() {
            // What serves now, and the delegation before any change.
            for lb in &lbs {
                let inst = self.serving_instance(lb).await?;
                j.old.insert(
                    lb.name.clone(),
                    Endpoint {
                        admin_url: lb.admin_url.clone(),
                        dns: lb.dns,
                        token_file: lb.token_file.clone(),
                        instance: inst,
                    },
                );
            }
            let served = self.delegation_now(r).await?;
            if served.windows(2).any(|w| w[0].ns != w[1].ns) {
                return Err(DeployError::Refused(format!(
                    "the parent servers of {} do not serve the same delegation yet; run again once they agree",
                    r.zone
                )));
            }
            j.ttl = served.iter().map(|d| d.ttl).max().unwrap_or(0);
            for lb in &lbs {
                let ns = lb.ns_name.clone().expect("checked").to_ascii_lowercase();
                j.glue_before.insert(ns.clone(), served[0].glue(&ns));
            }
            j.save(&dir)?;
        }
        if j.phase <= LbPhase::Create {
            let t0 = self.lb_begin(j, LbPhase::Create)?;
            let res = self.lb_create(j, &lbs).await;
            self.lb_end(j, LbPhase::Create, t0, &res)?;
            res?;
        }
        if j.phase <= LbPhase::Provision {
            let t0 = self.lb_begin(j, LbPhase::Provision)?;
            let res = self.lb_provision(j, &lbs, r).await;
            self.lb_end(j, LbPhase::Provision, t0, &res)?;
            res?;
        }
        if j.phase <= LbPhase::Copy {
            let t0 = self.lb_begin(j, LbPhase::Copy)?;
            let res = async {
                let mut done = Vec::new();
                for lb in &lbs {
                    let old = self.client(lb, &j.old[&lb.name])?.members().await?;
                    if old.backends.is_empty() {
                        return Err(DeployError::Refused(format!(
                            "{} has no backends to copy: run `deployer bootstrap` first",
                            lb.name
                        )));
                    }
                    let new = self.client(lb, &self.new_endpoint(lb, &j.new[&lb.name])?)?;
                    let cur = new.members().await?;
                    if !same_members(&cur.backends, &old.backends) {
                        let g = new.put(&old.backends, Some(cur.generation), true).await?;
                        done.push(format!("{} -> generation {g}", next_label(&lb.name)));
                    }
                }
                Ok(done.join(", "))
            }
            .await;
            self.lb_end(j, LbPhase::Copy, t0, &res)?;
            res?;
        }
        if j.phase <= LbPhase::Verify {
            let t0 = self.lb_begin(j, LbPhase::Verify)?;
            let res = async {
                let zones = verify::load_zones(&self.config().checked_zone_files()?)?;
                let mut n = 0;
                for lb in &lbs {
                    let e = self.new_endpoint(lb, &j.new[&lb.name])?;
                    let deadline = Instant::now() + Duration::from_secs(5);
                    loop {
                        match verify::verify_server(e.dns, &zones).await {
                            Ok(k) => {
                                n += k;
                                break;
                            }
                            Err(_) if Instant::now() < deadline => {
                                tokio::time::sleep(Duration::from_millis(250)).await
                            }
                            Err(err) => return Err(err.into()),
                        }
                    }
                }
                Ok(format!(
                    "{} load balancer(s), {n} queries over UDP and TCP, all exact",
                    lbs.len()
                ))
            }
            .await;
            self.lb_end(j, LbPhase::Verify, t0, &res)?;
            res?;
        }
        let want = self.new_glue(j, &lbs)?;
        if j.phase <= LbPhase::Delegate {
            let t0 = self.lb_begin(j, LbPhase::Delegate)?;
            j.delegated = true;
            j.save(&dir)?;
            let reg = AnyRegistrar::new(r);
            let res = async {
                for (ns, addrs) in &want {
                    reg.set_glue(&r.zone, ns, addrs, j.ttl.max(1)).await?;
                }
                Ok(want
                    .iter()
                    .map(|(ns, a)| format!("{ns} -> {}", fmt_addrs(a)))
                    .collect::<Vec<_>>()
                    .join(", "))
            }
            .await;
            self.lb_end(j, LbPhase::Delegate, t0, &res)?;
            res?;
        }
        if j.phase <= LbPhase::Propagate {
            let t0 = self.lb_begin(j, LbPhase::Propagate)?;
            let res = self.glue_visible(r, &want).await;
            if res.is_ok() {
                j.visible_at = Some(journal::now());
            }
            self.lb_end(j, LbPhase::Propagate, t0, &res)?;
            res?;
        }
        if j.phase <= LbPhase::Drain {
            let t0 = self.lb_begin(j, LbPhase::Drain)?;
            let old: Vec<LbClient> = lbs
                .iter()
                .map(|lb| self.client(lb, &j.old[&lb.name]))
                .collect::<Result<_>>()?;
            let res = self
                .drain(r, &old, j.visible_at.unwrap_or_else(journal::now), j.ttl)
                .await;
            self.lb_end(j, LbPhase::Drain, t0, &res)?;
            res?;
        }
        if j.phase <= LbPhase::DeleteOld {
            let t0 = self.lb_begin(j, LbPhase::DeleteOld)?;
            let res = async {
                let olds: Vec<(String, Endpoint)> = j.old.clone().into_iter().collect();
                self.refuse_if_delegated(r, &olds).await?;
                let mut done = Vec::new();
                for (name, e) in olds {
                    match &e.instance {
                        Some(i) => {
                            self.provider().delete(i).await?;
                            done.push(format!("deleted {} ({})", i.label, i.id));
                        }
                        None => done.push(format!(
                            "{name} at {} was not created by the deployer: left running (it gets no traffic now; stop it yourself)",
                            e.dns
                        )),
                    }
                }
                Ok(done.join(", "))
            }
            .await;
            self.lb_end(j, LbPhase::DeleteOld, t0, &res)?;
            res?;
        }
        if j.phase <= LbPhase::Rename {
            let t0 = self.lb_begin(j, LbPhase::Rename)?;
            let res = async {
                let mut endpoints = load_endpoints(&dir)?;
                let mut done = Vec::new();
                for lb in &lbs {
                    let inst = &j.new[&lb.name];
                    let cur = self.provider().get(&inst.id).await?.ok_or_else(|| {
                        DeployError::Refused(format!(
                            "new load balancer {} ({}) has disappeared",
                            inst.label, inst.id
                        ))
                    })?;
                    let renamed = if cur.label != lb.name {
                        let r = self.provider().rename(&cur, &lb.name).await?;
                        done.push(format!("{} -> {}", cur.label, r.label));
                        r
                    } else {
                        cur
                    };
                    j.new.insert(lb.name.clone(), renamed.clone());
                    j.save(&dir)?;
                    endpoints.insert(lb.name.clone(), self.new_endpoint(lb, &renamed)?);
                }
                save_json(&dir.join(ENDPOINTS), &endpoints)?;
                Ok(if done.is_empty() {
                    "nothing to rename".into()
                } else {
                    done.join(", ")
                })
            }
            .await;
            self.lb_end(j, LbPhase::Rename, t0, &res)?;
            res?;
        }
        Ok(())
    }

    /// The glue each NS name gets: the addresses of every new load balancer with it.
    fn new_glue(
        &self,
        j: &LbJournal,
        lbs: &[LoadBalancer],
    ) -> Result<BTreeMap<String, Vec<IpAddr>>> {
        let mut want: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        for lb in lbs {
            let ns = lb.ns_name.clone().expect("checked").to_ascii_lowercase();
            if let Some(inst) = j.new.get(&lb.name) {
                want.entry(ns)
                    .or_default()
                    .push(self.new_endpoint(lb, inst)?.dns.ip());
            }
        }
        want.values_mut().for_each(|v| v.sort());
        Ok(want)
    }

    async fn glue_visible(
        &self,
        r: &RegistrarConfig,
        want: &BTreeMap<String, Vec<IpAddr>>,
    ) -> Result<String> {
        for (ns, addrs) in want {
            registrar::wait_for_glue(
                &r.parent_servers,
                &r.zone,
                ns,
                addrs,
                Duration::from_secs(r.propagation_timeout_s),
            )
            .await
            .map_err(|e| DeployError::Refused(e.to_string()))?;
        }
        Ok(format!(
            "{} parent server(s) serve the new glue",
            r.parent_servers.len()
        ))
    }

    /// Waits until `lbs` get no traffic: not before `ttl` after `since`, at most
    /// `ttl` + window + margin after it.
    async fn drain(
        &self,
        r: &RegistrarConfig,
        lbs: &[LbClient],
        since: u64,
        ttl: u32,
    ) -> Result<String> {
        let passed = journal::now().saturating_sub(since);
        let now = Instant::now();
        let not_before = now + Duration::from_secs(u64::from(ttl).saturating_sub(passed));
        let deadline = not_before + Duration::from_secs(r.drain_window_s + r.drain_margin_s);
        let refs: Vec<&LbClient> = lbs.iter().collect();
        drain::wait_idle(
            &refs,
            r.drain_qps,
            Duration::from_secs(r.drain_window_s),
            not_before,
            deadline,
        )
        .await
        .map_err(DeployError::Refused)
    }

    /// The invariant before deleting load balancers: no parent server's delegation
    /// points at any of them (an unreadable parent server keeps them all).
    async fn refuse_if_delegated(
        &self,
        r: &RegistrarConfig,
        doomed: &[(String, Endpoint)],
    ) -> Result<()> {
        let served = self.delegation_now(r).await?;
        let mut still = Vec::new();
        for (name, e) in doomed {
            for (server, d) in r.parent_servers.iter().zip(&served) {
                if d.addresses().contains(&e.dns.ip()) {
                    still.push(format!(
                        "{name} ({}) is in the delegation {server} serves",
                        e.dns.ip()
                    ));
                }
            }
        }
        if still.is_empty() {
            Ok(())
        } else {
            Err(DeployError::Refused(format!(
                "refusing to delete: {}",
                still.join("; ")
            )))
        }
    }

    async fn lb_create(&self, j: &mut LbJournal, lbs: &[LoadBalancer]) -> Result<String> {
        let parallel = self.config().provider.max_parallel;
        let id = j.id.clone();
        let mut creates = stream::iter(lbs)
            .map(|lb| {
                let id = &id;
                async move {
                    let ports = [lb.dns.port(), admin_port(&lb.admin_url)?];
                    let region = lb.region.clone().unwrap_or_else(|| "local".into());
                    let i = self
                        .provider()
                        .create_lb(&next_label(&lb.name), &region, id, &ports)
                        .await?;
                    let i = self.provider().wait_ready(&i).await?;
                    Ok::<_, DeployError>((lb.name.clone(), i))
                }
            })
            .buffer_unordered(parallel);
        while let Some(r) = creates.next().await {
            let (name, i) = r?;
            j.new.insert(name, i);
            j.save(self.state_dir())?;
        }
        Ok(j.new
            .values()
            .map(|i| format!("{} ({})", i.label, i.id))
            .collect::<Vec<_>>()
            .join(", "))
    }

    async fn lb_provision(
        &self,
        j: &LbJournal,
        lbs: &[LoadBalancer],
        r: &RegistrarConfig,
    ) -> Result<String> {
        let binary = match &self.config().ansible.dnslb_binary {
            Some(b) => b.clone(),
            None => std::env::current_exe()?.with_file_name("dnslb"),
        };
        let mut hosts = Vec::new();
        for lb in lbs {
            let inst = &j.new[&lb.name];
            let e = self.new_endpoint(lb, inst)?;
            let token = std::fs::read_to_string(e.token_file.as_ref().expect("set"))?;
            let admin = e.admin_url.trim_start_matches("http://").to_string();
            let mut vars = self.provider().lb_host_vars(inst);
            for (k, v) in [
                ("dnslb_binary_src", json!(binary)),
                ("dnslb_listen_dns", json!([e.dns.to_string()])),
                ("dnslb_admin_listen", json!(admin)),
                ("dnslb_admin_token", json!(token.trim())),
                ("dnslb_backends", json!([])),
                ("dnslb_health_query_name", json!(r.zone)),
            ] {
                vars.insert(k.into(), v);
            }
            hosts.push(Host {
                name: inst.label.clone(),
                vars,
            });
        }
        ansible::provision(
            &self.config().ansible.command,
            &self.config().ansible.playbook,
            &self.state_dir().join("runs").join(&j.id),
            &hosts,
            Group::LoadBalancers,
            Duration::from_secs(self.config().ansible.timeout_s),
        )
        .await?;
        Ok(format!(
            "{} load balancer(s) with the dnslb role",
            hosts.len()
        ))
    }

    /// Undoes an unfinished load balancer rollout that has not begun deleting the old
    /// ones: the delegation restored first (and waited for), the new load balancers
    /// drained, then deleted if no parent server points at them.
    pub(crate) async fn lb_undo(&self, j: &mut LbJournal, r: &RegistrarConfig) -> Result<String> {
        let dir = self.state_dir().to_path_buf();
        if j.phase != LbPhase::RollingBack && j.phase >= LbPhase::DeleteOld {
            return Err(DeployError::Refused(format!(
                "load balancer rollout {} already began deleting the old load balancers; run `deployer rollout-lbs` to finish it",
                j.id
            )));
        }
        if j.phase != LbPhase::RollingBack {
            j.rollback_from = Some(j.phase);
            j.phase = LbPhase::RollingBack;
            j.record(&dir, "rollback", "started", "")?;
        }
        let lbs = self.config().load_balancers.clone();
        let mut summary = Vec::new();
        if j.delegated {
            let reg = AnyRegistrar::new(r);
            for (ns, addrs) in &j.glue_before {
                reg.set_glue(&r.zone, ns, addrs, j.ttl.max(1)).await?;
            }
            self.glue_visible(r, &j.glue_before).await?;
            summary.push(format!(
                "delegation restored ({})",
                j.glue_before
                    .iter()
                    .map(|(ns, a)| format!("{ns} -> {}", fmt_addrs(a)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            let new: Vec<LbClient> = lbs
                .iter()
                .filter_map(|lb| j.new.get(&lb.name).map(|i| (lb, i)))
                .map(|(lb, i)| self.client(lb, &self.new_endpoint(lb, i)?))
                .collect::<Result<_>>()?;
            summary.push(self.drain(r, &new, journal::now(), j.ttl).await?);
        }
        let mut doomed: BTreeMap<String, Instance> = BTreeMap::new();
        for lb in &lbs {
            if let Some(i) = j.new.get(&lb.name) {
                doomed.insert(lb.name.clone(), i.clone());
            } else if let Some(i) = self.provider().find(&next_label(&lb.name)).await? {
                if i.created_by(&j.id) {
                    doomed.insert(lb.name.clone(), i);
                }
            }
        }
        let ends: Vec<(String, Endpoint)> = lbs
            .iter()
            .filter_map(|lb| doomed.get(&lb.name).map(|i| (lb, i)))
            .map(|(lb, i)| Ok((lb.name.clone(), self.new_endpoint(lb, i)?)))
            .collect::<Result<_>>()?;
        self.refuse_if_delegated(r, &ends).await?;
        for i in doomed.values() {
            self.provider().delete(i).await?;
            summary.push(format!("deleted {} ({})", i.label, i.id));
        }
        j.phase = LbPhase::RolledBack;
        j.record(&dir, "rollback", "done", &summary.join(", "))?;
        eprintln!("deployer: rollback: {}", summary.join(", "));
        Ok(if summary.is_empty() {
            "nothing had changed".into()
        } else {
            summary.join(", ")
        })
    }

    /// `deployer rollback` of an unfinished load balancer rollout, if there is one.
    pub(crate) async fn lb_rollback(&self) -> Result<Option<String>> {
        let Some(mut j) = LbJournal::load(self.state_dir())?.filter(LbJournal::unfinished) else {
            return Ok(None);
        };
        let r = self.registrar_cfg()?.clone();
        eprintln!(
            "deployer: rolling back load balancer rollout {} (stopped at step {})",
            j.id,
            j.rollback_from.unwrap_or(j.phase).label()
        );
        self.lb_undo(&mut j, &r).await.map(Some)
    }
}
