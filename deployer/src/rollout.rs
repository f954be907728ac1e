//! The engine behind every command: bootstrap, the seven-step blue-green rollout with
//! its journal and automatic rollback, rollback of an interrupted rollout, plan,
//! status and destroy. Generic over the [`Provider`]; the load balancers are driven
//! through their admin API ([`LbClient`]) and servers are provisioned with Ansible.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ansible::{self, AnsibleError, Host};
use crate::config::Config;
use crate::journal::{Journal, Lock, LockError, Phase};
use crate::lbclient::{Backend, BackendSet, LbClient, LbError};
use crate::provider::{Instance, Provider, ProviderError};
use crate::verify::{self, VerifyError, ZoneChecks};

/// Everything that can stop a command.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// Provider API or local instances.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// ansible-playbook.
    #[error(transparent)]
    Ansible(#[from] AnsibleError),
    /// Served data differs from the zone files.
    #[error("verification failed: {0}")]
    Verify(#[from] VerifyError),
    /// A load balancer's admin API.
    #[error(transparent)]
    Lb(#[from] LbError),
    /// Another deployer runs.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// Journal or state directory I/O.
    #[error("state directory: {0}")]
    Io(#[from] std::io::Error),
    /// A precondition does not hold.
    #[error("{0}")]
    Refused(String),
    /// The operation failed and was rolled back.
    #[error("{failure}\nrolled back: {summary}")]
    RolledBack {
        /// What failed.
        failure: Box<DeployError>,
        /// What the rollback did.
        summary: String,
    },
    /// The operation failed and so did its rollback.
    #[error("{failure}\nrollback failed too: {rollback}\nrun `deployer rollback` once the cause is fixed")]
    RollbackFailed {
        /// What failed.
        failure: Box<DeployError>,
        /// Why the rollback failed.
        rollback: Box<DeployError>,
    },
}

type Result<T, E = DeployError> = std::result::Result<T, E>;

/// What a finished rollout reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Rollout ID.
    pub id: String,
    /// Wall time.
    pub seconds: f64,
    /// The new servers, by nameserver.
    pub servers: BTreeMap<String, Instance>,
    /// Queries asked during verification.
    pub verification_queries: usize,
}

/// The deployer: config, provider, load balancer clients.
pub struct Deployer<P: Provider> {
    cfg: Config,
    provider: P,
    lbs: Vec<LbClient>,
    dir: PathBuf,
}

fn next_label(ns: &str) -> String {
    format!("{ns}-next")
}

/// The backend name a load balancer gets for a server: nameserver plus the provider
/// ID's last part, so the old and new sets never share a name and a rename of the
/// instance does not touch the load balancer.
pub fn backend_name(ns: &str, inst: &Instance) -> String {
    let id = inst.id.rsplit('-').next().unwrap_or(&inst.id);
    format!("{ns}-{id}")
}

fn same_members(a: &[Backend], b: &[Backend]) -> bool {
    let key = |v: &[Backend]| {
        let mut k: Vec<_> = v
            .iter()
            .map(|x| (x.name.clone(), x.address.clone(), x.weight))
            .collect();
        k.sort();
        k
    };
    key(a) == key(b)
}

/// Prints one progress line for a step.
fn progress(what: &str, t0: Instant, outcome: &str) {
    eprintln!(
        "deployer: step {what}: {outcome} ({:.2}s)",
        t0.elapsed().as_secs_f64()
    );
}

impl<P: Provider> Deployer<P> {
    /// Validated config plus a provider.
    pub fn new(cfg: Config, provider: P) -> Result<Self> {
        let lbs = cfg
            .load_balancers
            .iter()
            .map(LbClient::new)
            .collect::<Result<Vec<_>, _>>()?;
        let dir = cfg.provider.state_dir.clone();
        Ok(Deployer {
            cfg,
            provider,
            lbs,
            dir,
        })
    }

    fn zones(&self) -> Result<Vec<ZoneChecks>> {
        Ok(verify::load_zones(&self.cfg.checked_zone_files()?)?)
    }

    fn desired(&self, lb: &LbClient, servers: &BTreeMap<String, Instance>) -> Result<Vec<Backend>> {
        lb.lb
            .nameservers
            .iter()
            .map(|ns| {
                let inst = servers.get(ns).ok_or_else(|| {
                    DeployError::Refused(format!("no server for nameserver {ns}"))
                })?;
                let addr = self.provider.backend_addr(inst, &lb.lb).ok_or_else(|| {
                    DeployError::Refused(format!(
                        "{} ({}) has no address for {}",
                        inst.label, inst.id, lb.lb.name
                    ))
                })?;
                Ok(Backend {
                    name: backend_name(ns, inst),
                    address: addr.to_string(),
                    weight: 1,
                })
            })
            .collect()
    }

    fn begin(&self, j: &mut Journal, phase: Phase) -> Result<Instant> {
        j.phase = phase;
        j.record(&self.dir, phase.label(), "started", "")?;
        Ok(Instant::now())
    }

    fn end(&self, j: &mut Journal, phase: Phase, t0: Instant, r: &Result<String>) -> Result<()> {
        match r {
            Ok(summary) => {
                j.record(&self.dir, phase.label(), "done", summary)?;
                progress(phase.label(), t0, &format!("ok, {summary}"));
            }
            Err(e) => {
                j.record(&self.dir, phase.label(), "failed", &e.to_string())?;
                // One line per step: the full error (with any log tail) comes at the end.
                let first = e.to_string().lines().next().unwrap_or_default().to_string();
                progress(phase.label(), t0, &format!("FAILED: {first}"));
            }
        }
        Ok(())
    }

    /// Verifies every server in `servers` directly, retrying briefly while `named`
    /// finishes loading.
    async fn verify_direct(
        &self,
        servers: &BTreeMap<String, Instance>,
        zones: &[ZoneChecks],
    ) -> Result<usize> {
        let mut asked = 0;
        for inst in servers.values() {
            let addr = inst
                .dns_addr()
                .ok_or_else(|| DeployError::Refused(format!("{} has no address", inst.label)))?;
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match verify::verify_server(addr, zones).await {
                    Ok(n) => {
                        asked += n;
                        break;
                    }
                    Err(_) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(250)).await
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(asked)
    }

    async fn provision(&self, run: &str, servers: &BTreeMap<String, Instance>) -> Result<String> {
        let hosts: Vec<Host> = servers
            .values()
            .map(|i| Host {
                name: i.label.clone(),
                vars: self.provider.host_vars(i),
            })
            .collect();
        ansible::provision(
            &self.cfg.ansible.command,
            &self.cfg.ansible.playbook,
            &self.dir.join("runs").join(run),
            &hosts,
            Duration::from_secs(self.cfg.ansible.timeout_s),
        )
        .await?;
        Ok(format!(
            "{} server(s) with {}",
            hosts.len(),
            self.cfg.ansible.playbook.display()
        ))
    }

    /// `deployer rollout`: runs (or resumes) the blue-green rollout; on a failure in
    /// steps 1–5 rolls back by itself.
    pub async fn rollout(&self) -> Result<Report> {
        let _lock = Lock::acquire(&self.dir, "rollout")?;
        let started = Instant::now();
        let mut j = match Journal::load(&self.dir)? {
            Some(j) if j.unfinished() => {
                eprintln!(
                    "deployer: resuming rollout {} at step {}",
                    j.id,
                    j.phase.label()
                );
                j
            }
            Some(old) => {
                old.archive(&self.dir)?;
                Journal::new()
            }
            None => Journal::new(),
        };
        let zones = self.zones()?;
        eprintln!("deployer: rollout {}", j.id);
        let mut asked = 0;
        match self.forward(&mut j, &zones, &mut asked).await {
            Ok(()) => {
                j.phase = Phase::Done;
                j.record(&self.dir, "rollout", "done", "")?;
                eprintln!("deployer: rollout {} done in {:.1}s", j.id, started.elapsed().as_secs_f64());
                Ok(Report {
                    id: j.id.clone(),
                    seconds: started.elapsed().as_secs_f64(),
                    servers: j.new.clone(),
                    verification_queries: asked,
                })
            }
            Err(e) if j.phase <= Phase::Bake => {
                eprintln!("deployer: rollout {} failed at step {}; rolling back", j.id, j.phase.label());
                match self.undo(&mut j).await {
                    Ok(summary) => Err(DeployError::RolledBack {
                        failure: Box::new(e),
                        summary,
                    }),
                    Err(r) => Err(DeployError::RollbackFailed {
                        failure: Box::new(e),
                        rollback: Box::new(r),
                    }),
                }
            }
            Err(e) => Err(DeployError::Refused(format!(
                "{e}\nthe old servers were already being deleted, so the rollout can only go forward: run `deployer rollout` again to finish it"
            ))),
        }
    }

    async fn forward(
        &self,
        j: &mut Journal,
        zones: &[ZoneChecks],
        asked: &mut usize,
    ) -> Result<()> {
        if j.phase <= Phase::Create {
            let t0 = self.begin(j, Phase::Create)?;
            let r = self.step_create(j).await;
            self.end(j, Phase::Create, t0, &r)?;
            r?;
        }
        if j.phase <= Phase::Provision {
            let t0 = self.begin(j, Phase::Provision)?;
            let r = self.provision(&j.id, &j.new).await;
            self.end(j, Phase::Provision, t0, &r)?;
            r?;
        }
        if j.phase <= Phase::Verify {
            let t0 = self.begin(j, Phase::Verify)?;
            let r = self.verify_direct(&j.new, zones).await.map(|n| {
                *asked += n;
                format!(
                    "{} server(s), {n} queries over UDP and TCP, all exact",
                    j.new.len()
                )
            });
            self.end(j, Phase::Verify, t0, &r)?;
            r?;
        }
        if j.phase <= Phase::Swap {
            let t0 = self.begin(j, Phase::Swap)?;
            let r = self.step_swap(j).await;
            self.end(j, Phase::Swap, t0, &r)?;
            r?;
        }
        if j.phase <= Phase::Bake {
            let t0 = self.begin(j, Phase::Bake)?;
            let r = self.step_bake(zones).await.map(|(rounds, n)| {
                *asked += n;
                format!(
                    "{rounds} round(s) through {} load balancer(s), {n} queries",
                    self.lbs.len()
                )
            });
            self.end(j, Phase::Bake, t0, &r)?;
            r?;
        }
        if j.phase <= Phase::DeleteOld {
            let t0 = self.begin(j, Phase::DeleteOld)?;
            let r = async {
                let mut names = Vec::new();
                for old in j.old.values() {
                    self.provider.delete(old).await?;
                    names.push(format!("{} ({})", old.label, old.id));
                }
                Ok(format!("deleted {}", names.join(", ")))
            }
            .await;
            self.end(j, Phase::DeleteOld, t0, &r)?;
            r?;
        }
        if j.phase <= Phase::Rename {
            let t0 = self.begin(j, Phase::Rename)?;
            let r = self.step_rename(j).await;
            self.end(j, Phase::Rename, t0, &r)?;
            r?;
        }
        Ok(())
    }

    async fn step_create(&self, j: &mut Journal) -> Result<String> {
        if j.old.is_empty() {
            for ns in &self.cfg.nameservers {
                match self.provider.find(&ns.name).await? {
                    Some(i) => {
                        j.old.insert(ns.name.clone(), i);
                    }
                    None => {
                        return Err(DeployError::Refused(format!(
                            "no server labelled {} exists: run `deployer bootstrap` first",
                            ns.name
                        )))
                    }
                }
            }
            j.save(&self.dir)?;
        }
        for ns in &self.cfg.nameservers {
            // Reuses an instance left by an interrupted run (found by label).
            let inst = self
                .provider
                .create(&next_label(&ns.name), &ns.region, &j.id)
                .await?;
            j.new.insert(ns.name.clone(), inst);
            j.save(&self.dir)?;
        }
        for (ns, inst) in j.new.clone() {
            let ready = self.provider.wait_ready(&inst).await?;
            j.new.insert(ns, ready);
            j.save(&self.dir)?;
        }
        Ok(j.new
            .values()
            .map(|i| format!("{} ({})", i.label, i.id))
            .collect::<Vec<_>>()
            .join(", "))
    }

    async fn step_swap(&self, j: &mut Journal) -> Result<String> {
        // Record every load balancer's set before changing any of them.
        for lb in &self.lbs {
            if !j.lb_before.contains_key(&lb.lb.name) {
                let cur = lb.get().await?;
                j.lb_before.insert(lb.lb.name.clone(), cur);
            }
        }
        j.save(&self.dir)?;
        // A set that was empty could not be restored (dnslb refuses an empty set), so
        // such a load balancer is refused before any is changed.
        if let Some((name, _)) = j.lb_before.iter().find(|(_, s)| s.backends.is_empty()) {
            return Err(DeployError::Refused(format!(
                "load balancer {name} has no backends, so a failed rollout could not restore it: run `deployer bootstrap` first"
            )));
        }
        let mut done = Vec::new();
        for lb in &self.lbs {
            let desired = self.desired(lb, &j.new)?;
            let cur = lb.get().await?;
            if same_members(&cur.backends, &desired) {
                done.push(format!("{} (already)", lb.lb.name));
                continue;
            }
            let g = lb.put(&desired, Some(cur.generation), true).await?;
            done.push(format!("{} -> generation {g}", lb.lb.name));
        }
        Ok(done.join(", "))
    }

    async fn step_bake(&self, zones: &[ZoneChecks]) -> Result<(usize, usize)> {
        let until = Instant::now() + Duration::from_secs(self.cfg.checks.bake_s);
        let (mut rounds, mut asked) = (0, 0);
        loop {
            for lb in &self.lbs {
                asked += verify::verify_server(lb.lb.dns, zones).await?;
            }
            rounds += 1;
            if Instant::now() >= until {
                return Ok((rounds, asked));
            }
            tokio::time::sleep(Duration::from_millis(500).min(until - Instant::now())).await;
        }
    }

    async fn step_rename(&self, j: &mut Journal) -> Result<String> {
        let mut done = Vec::new();
        for (ns, inst) in j.new.clone() {
            let cur = self.provider.get(&inst.id).await?.ok_or_else(|| {
                DeployError::Refused(format!(
                    "new server {} ({}) has disappeared",
                    inst.label, inst.id
                ))
            })?;
            if cur.label != ns {
                let renamed = self.provider.rename(&cur, &ns).await?;
                done.push(format!("{} -> {}", cur.label, renamed.label));
                j.new.insert(ns, renamed);
                j.save(&self.dir)?;
            }
        }
        Ok(if done.is_empty() {
            "nothing to rename".into()
        } else {
            done.join(", ")
        })
    }

    /// Undoes an unfinished rollout that has not started deleting old servers: puts
    /// every load balancer back first, then deletes the new servers.
    async fn undo(&self, j: &mut Journal) -> Result<String> {
        if j.phase >= Phase::DeleteOld {
            return Err(DeployError::Refused(format!(
                "rollout {} already began deleting the old servers (step 6); it can only be finished: run `deployer rollout`",
                j.id
            )));
        }
        let t0 = Instant::now();
        let mut summary = Vec::new();
        for lb in &self.lbs {
            let Some(before) = j.lb_before.get(&lb.lb.name) else {
                continue;
            };
            let cur = lb.get().await?;
            if same_members(&cur.backends, &before.backends) {
                continue;
            }
            if before.backends.is_empty() {
                return Err(DeployError::Refused(format!(
                    "load balancer {} had no backends before; cannot restore an empty set",
                    lb.lb.name
                )));
            }
            let g = lb
                .put(&before.backends, Some(cur.generation), false)
                .await?;
            summary.push(format!("{} restored (generation {g})", lb.lb.name));
        }
        // Only now that no load balancer points at them: delete the new servers,
        // including any created but not yet journaled (found by label).
        let mut doomed: BTreeMap<String, Instance> =
            j.new.values().map(|i| (i.id.clone(), i.clone())).collect();
        for ns in &self.cfg.nameservers {
            if let Some(i) = self.provider.find(&next_label(&ns.name)).await? {
                if j.old.values().any(|o| o.id == i.id) || doomed.contains_key(&i.id) {
                    continue;
                }
                if i.created_by(&j.id) {
                    doomed.insert(i.id.clone(), i);
                } else {
                    summary.push(format!(
                        "left {} ({}) alone: rollout {} did not create it",
                        i.label, i.id, j.id
                    ));
                }
            }
        }
        for inst in doomed.values() {
            self.provider.delete(inst).await?;
            summary.push(format!("deleted {} ({})", inst.label, inst.id));
        }
        j.phase = Phase::RolledBack;
        j.record(&self.dir, "rollback", "done", &summary.join(", "))?;
        progress(
            "rollback",
            t0,
            &format!(
                "ok, {}",
                if summary.is_empty() {
                    "nothing to undo".into()
                } else {
                    summary.join(", ")
                }
            ),
        );
        Ok(if summary.is_empty() {
            "nothing had changed".into()
        } else {
            summary.join(", ")
        })
    }

    /// `deployer rollback`.
    pub async fn rollback(&self) -> Result<String> {
        let _lock = Lock::acquire(&self.dir, "rollback")?;
        match Journal::load(&self.dir)? {
            Some(mut j) if j.unfinished() => {
                eprintln!(
                    "deployer: rolling back rollout {} (stopped at step {})",
                    j.id,
                    j.phase.label()
                );
                self.undo(&mut j).await
            }
            _ => Ok("no unfinished rollout: nothing to roll back".into()),
        }
    }

    /// `deployer bootstrap`: creates the first servers (reusing any that exist),
    /// provisions and verifies them, and points every load balancer at them.
    pub async fn bootstrap(&self) -> Result<BTreeMap<String, Instance>> {
        let _lock = Lock::acquire(&self.dir, "bootstrap")?;
        if let Some(j) = Journal::load(&self.dir)? {
            if j.unfinished() {
                return Err(DeployError::Refused(format!(
                    "rollout {} is unfinished (step {}): run `deployer rollout` or `deployer rollback` first",
                    j.id,
                    j.phase.label()
                )));
            }
        }
        let zones = self.zones()?;
        let run = format!("bootstrap-{}", crate::journal::now());
        let mut servers = BTreeMap::new();
        let mut created = Vec::new();
        let t0 = Instant::now();
        let result = async {
            for ns in &self.cfg.nameservers {
                let inst = match self.provider.find(&ns.name).await? {
                    Some(i) => i,
                    None => {
                        let i = self.provider.create(&ns.name, &ns.region, &run).await?;
                        created.push(i.clone());
                        i
                    }
                };
                servers.insert(ns.name.clone(), inst);
            }
            for (ns, inst) in servers.clone() {
                servers.insert(ns, self.provider.wait_ready(&inst).await?);
            }
            progress(
                "create",
                t0,
                &format!(
                    "ok, {} new, {} existing",
                    created.len(),
                    servers.len() - created.len()
                ),
            );
            let t = Instant::now();
            let s = self.provision(&run, &servers).await?;
            progress("provision", t, &format!("ok, {s}"));
            let t = Instant::now();
            let n = self.verify_direct(&servers, &zones).await?;
            progress("verify", t, &format!("ok, {n} queries"));
            Ok::<_, DeployError>(())
        }
        .await;
        if let Err(e) = result {
            // No load balancer points at them yet: delete what this run created, and
            // report every deletion that failed rather than stop at the first.
            let mut summary = Vec::new();
            for i in &created {
                match self.provider.delete(i).await {
                    Ok(()) => summary.push(format!("deleted {} ({})", i.label, i.id)),
                    Err(d) => summary.push(format!("could NOT delete {} ({}): {d}", i.label, i.id)),
                }
            }
            return Err(DeployError::RolledBack {
                failure: Box::new(e),
                summary: if summary.is_empty() {
                    "nothing was created".into()
                } else {
                    summary.join(", ")
                },
            });
        }
        let t = Instant::now();
        let mut done = Vec::new();
        for lb in &self.lbs {
            let desired = self.desired(lb, &servers)?;
            let cur = lb.get().await?;
            if !same_members(&cur.backends, &desired) {
                let g = lb.put(&desired, Some(cur.generation), true).await?;
                done.push(format!("{} -> generation {g}", lb.lb.name));
            }
        }
        progress(
            "swap",
            t,
            &format!(
                "ok, {}",
                if done.is_empty() {
                    "already pointing there".into()
                } else {
                    done.join(", ")
                }
            ),
        );
        let t = Instant::now();
        let mut n = 0;
        for lb in &self.lbs {
            n += verify::verify_server(lb.lb.dns, &zones).await?;
        }
        progress(
            "verify through load balancers",
            t,
            &format!("ok, {n} queries"),
        );
        Ok(servers)
    }

    fn all_labels(&self) -> Vec<String> {
        self.cfg
            .nameservers
            .iter()
            .flat_map(|n| [n.name.clone(), next_label(&n.name)])
            .collect()
    }

    /// `deployer status`.
    pub async fn status(&self) -> Result<Status> {
        let instances = self.provider.list(&self.all_labels()).await?;
        let mut load_balancers = BTreeMap::new();
        for lb in &self.lbs {
            let v = match lb.get().await {
                Ok(s) => LbStatus {
                    set: Some(s),
                    error: None,
                },
                Err(e) => LbStatus {
                    set: None,
                    error: Some(e.to_string()),
                },
            };
            load_balancers.insert(lb.lb.name.clone(), v);
        }
        let unfinished = Journal::load(&self.dir)?
            .filter(|j| j.unfinished())
            .map(|j| UnfinishedRollout {
                id: j.id,
                step: j.phase.label().into(),
                new: j
                    .new
                    .values()
                    .map(|i| format!("{} ({})", i.label, i.id))
                    .collect(),
            });
        Ok(Status {
            provider: self.provider.kind().into(),
            instances,
            load_balancers,
            unfinished_rollout: unfinished,
        })
    }

    /// `deployer plan`: what a rollout would do now; changes nothing.
    pub async fn plan(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        if let Some(j) = Journal::load(&self.dir)?.filter(|j| j.unfinished()) {
            out.push(format!(
                "an unfinished rollout {} stopped at step {}: `deployer rollout` resumes it, `deployer rollback` undoes it",
                j.id,
                j.phase.label()
            ));
        }
        let zones = self.zones()?;
        let checks: usize = zones.iter().map(|z| z.expects.len()).sum();
        let mut live = BTreeMap::new();
        for ns in &self.cfg.nameservers {
            match self.provider.find(&ns.name).await? {
                Some(i) => {
                    out.push(format!(
                        "{}: live server {} ({}, {}, {})",
                        ns.name,
                        i.label,
                        i.id,
                        i.region,
                        i.dns_addr().map(|a| a.to_string()).unwrap_or_default()
                    ));
                    live.insert(ns.name.clone(), i);
                }
                None => out.push(format!(
                    "{}: no live server: run `deployer bootstrap` first",
                    ns.name
                )),
            }
        }
        out.push(format!(
            "1. create {} ({} provider)",
            self.cfg
                .nameservers
                .iter()
                .map(|n| format!("{} in {}", next_label(&n.name), n.region))
                .collect::<Vec<_>>()
                .join(", "),
            self.provider.kind()
        ));
        out.push(format!(
            "2. provision them with ansible-playbook {}",
            self.cfg.ansible.playbook.display()
        ));
        out.push(format!(
            "3. verify {checks} RRsets of {} zone(s) (serial {}) on each, over UDP and TCP",
            zones.len(),
            zones
                .iter()
                .map(|z| format!("{} {}", z.origin, z.serial))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        for lb in &self.lbs {
            match lb.get().await {
                Ok(s) => out.push(format!(
                    "4. {}: swap generation {} [{}] to the new servers of {:?} (expected_generation {}, require_healthy)",
                    lb.lb.name,
                    s.generation,
                    s.backends.iter().map(|b| format!("{} {}", b.name, b.address)).collect::<Vec<_>>().join(", "),
                    lb.lb.nameservers,
                    s.generation
                )),
                Err(e) => out.push(format!("4. {}: cannot read its backend set: {e}", lb.lb.name)),
            }
        }
        out.push(format!(
            "5. verify the same records through {} for {}s",
            self.lbs
                .iter()
                .map(|l| l.lb.dns.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            self.cfg.checks.bake_s
        ));
        out.push(format!(
            "6. delete {}",
            live.values()
                .map(|i| format!("{} ({})", i.label, i.id))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        out.push(format!(
            "7. rename {}",
            self.cfg
                .nameservers
                .iter()
                .map(|n| format!("{} -> {}", next_label(&n.name), n.name))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        Ok(out)
    }

    /// `deployer destroy --yes`: deletes every instance of this configuration (the
    /// configured labels and their `-next`, and any instance the journal names) and
    /// archives the journal. Other instances in the account, tagged or not, are left
    /// alone.
    pub async fn destroy(&self) -> Result<Vec<String>> {
        let _lock = Lock::acquire(&self.dir, "destroy")?;
        let labels = self.all_labels();
        let journal = Journal::load(&self.dir)?;
        let journaled: Vec<String> = journal
            .iter()
            .flat_map(|j| j.old.values().chain(j.new.values()).map(|i| i.id.clone()))
            .collect();
        let mut done = Vec::new();
        for inst in self.provider.list(&labels).await? {
            if labels.contains(&inst.label) || journaled.contains(&inst.id) {
                self.provider.delete(&inst).await?;
                done.push(format!("{} ({})", inst.label, inst.id));
            }
        }
        if let Some(j) = journal {
            j.archive(&self.dir)?;
        }
        Ok(done)
    }
}

/// `deployer status` output.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Provider kind.
    pub provider: String,
    /// Managed (or configured-label) instances.
    pub instances: Vec<Instance>,
    /// Each load balancer's set (or why it could not be read).
    pub load_balancers: BTreeMap<String, LbStatus>,
    /// An interrupted rollout, if any.
    pub unfinished_rollout: Option<UnfinishedRollout>,
}

/// One load balancer in `status`.
#[derive(Debug, Serialize)]
pub struct LbStatus {
    /// Its set.
    pub set: Option<BackendSet>,
    /// Or the error.
    pub error: Option<String>,
}

/// An interrupted rollout in `status`.
#[derive(Debug, Serialize)]
pub struct UnfinishedRollout {
    /// ID.
    pub id: String,
    /// Where it stopped.
    pub step: String,
    /// Servers it created.
    pub new: Vec<String>,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "provider: {}", self.provider)?;
        writeln!(f, "instances:")?;
        if self.instances.is_empty() {
            writeln!(f, "  (none)")?;
        }
        for i in &self.instances {
            writeln!(
                f,
                "  {:<16} id {:<16} region {:<10} {:<10} public {} private {} dns port {}{}",
                i.label,
                i.id,
                i.region,
                i.status,
                i.public_ipv4
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "-".into()),
                i.private_ipv4
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "-".into()),
                i.dns_port,
                if i.managed() {
                    ""
                } else {
                    " (not created by the deployer)"
                }
            )?;
        }
        writeln!(f, "load balancers:")?;
        for (name, lb) in &self.load_balancers {
            match (&lb.set, &lb.error) {
                (Some(s), _) => writeln!(
                    f,
                    "  {name}: generation {}: {}",
                    s.generation,
                    if s.backends.is_empty() {
                        "(no backends)".into()
                    } else {
                        s.backends
                            .iter()
                            .map(|b| format!("{} {}", b.name, b.address))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                )?,
                (None, e) => writeln!(f, "  {name}: unreachable: {}", e.as_deref().unwrap_or("?"))?,
            }
        }
        match &self.unfinished_rollout {
            Some(u) => writeln!(
                f,
                "unfinished rollout {} stopped at step {} (new: {}): `deployer rollout` finishes it, `deployer rollback` undoes it",
                u.id,
                u.step,
                u.new.join(", ")
            ),
            None => writeln!(f, "no unfinished rollout"),
        }
    }
}
