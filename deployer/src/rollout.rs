//! The engine behind every command: bootstrap, the seven-step blue-green rollout with
//! its journal and automatic rollback, rollback of an interrupted rollout, plan,
//! status and destroy. Generic over the [`Provider`]; the load balancers are driven
//! through their admin API ([`LbClient`]) and servers are provisioned with Ansible.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use serde::Serialize;

use crate::ansible::{self, AnsibleError, Host};
use crate::bake;
use crate::config::{Config, CutOver, LoadBalancer};
use crate::journal::{Journal, Lock, LockError, Phase};
use crate::lbclient::{describe, same_members, Backend, BackendSet, LbClient, LbError};
use crate::provider::{Instance, Provider, ProviderError};
use crate::registrar::{self, Delegation};
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

/// How long a rollback waits between restoring a load balancer and deleting the
/// servers it no longer sends to: dnslb's default `balance.query_timeout_ms`, after
/// which every query in flight to them has been answered or has timed out.
const RESTORE_DRAIN: Duration = Duration::from_secs(2);

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

/// Is `b` (a member of `lb`'s set) this instance? Either the address the provider
/// gives that load balancer for it, or any of its own addresses with its DNS port.
fn points_at(provider: &impl Provider, lb: &LoadBalancer, b: &Backend, inst: &Instance) -> bool {
    provider.backend_addr(inst, lb) == Some(b.address)
        || [inst.public_ipv4, inst.private_ipv4]
            .into_iter()
            .flatten()
            .any(|ip| SocketAddr::new(ip, inst.dns_port) == b.address)
}

/// Splits `doomed` into the instances no set in `sets` serves and, for the others,
/// which load balancer and backend still serve them.
fn split_served(
    provider: &impl Provider,
    sets: &[(&LoadBalancer, BackendSet)],
    doomed: Vec<Instance>,
) -> (Vec<Instance>, Vec<String>) {
    let mut free = Vec::new();
    let mut kept = Vec::new();
    for inst in doomed {
        let refs: Vec<String> = sets
            .iter()
            .flat_map(|(lb, s)| {
                s.backends
                    .iter()
                    .filter(|b| points_at(provider, lb, b, &inst))
                    .map(|b| format!("{} (backend {} {})", lb.name, b.name, b.address))
            })
            .collect();
        if refs.is_empty() {
            free.push(inst);
        } else {
            kept.push(format!(
                "{} ({}) is still served by {}",
                inst.label,
                inst.id,
                refs.join(", ")
            ));
        }
    }
    (free, kept)
}

/// Prints one progress line for a step.
fn progress(what: &str, t0: Instant, outcome: &str) {
    eprintln!(
        "deployer: step {what}: {outcome} ({:.2}s)",
        t0.elapsed().as_secs_f64()
    );
}

impl<P: Provider> Deployer<P> {
    /// Validated config plus a provider. Load balancers replaced by `rollout-lbs`
    /// are reached where it recorded them (`<state_dir>/load_balancers.json`).
    pub fn new(mut cfg: Config, provider: P) -> Result<Self> {
        let endpoints = crate::lbrollout::load_endpoints(&cfg.provider.state_dir)?;
        crate::lbrollout::apply_endpoints(&mut cfg.load_balancers, &endpoints);
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

    /// The config (with recorded load balancer endpoints applied).
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The provider.
    pub fn provider(&self) -> &P {
        &self.provider
    }

    /// The state directory.
    pub fn state_dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Refuses while a load balancer rollout is unfinished.
    fn no_lb_rollout(&self) -> Result<()> {
        match crate::lbrollout::LbJournal::load(&self.dir)? {
            Some(j) if j.unfinished() => Err(DeployError::Refused(format!(
                "load balancer rollout {} is unfinished (step {}): run `deployer rollout-lbs` or `deployer rollback` first",
                j.id,
                j.phase.label()
            ))),
            _ => Ok(()),
        }
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
                    address: addr,
                    weight: 1,
                })
            })
            .collect()
    }

    fn begin(&self, j: &mut Journal, phase: Phase) -> Result<Instant> {
        j.phase = phase;
        j.record(&self.dir, phase.label(), "started", "")?;
        eprintln!("deployer: step {}: started", phase.label());
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
            ansible::Group::Nameservers,
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
    /// steps 1–5 rolls back by itself. A rollout found rolling back is only finished
    /// rolling back; one resumed at or past the swap first checks that every load
    /// balancer still serves what the journal says it left there.
    pub async fn rollout(&self) -> Result<Report> {
        let _lock = Lock::acquire(&self.dir, "rollout")?;
        self.no_lb_rollout()?;
        let started = Instant::now();
        let mut j = match Journal::load(&self.dir)? {
            Some(mut j) if j.phase == Phase::RollingBack => {
                eprintln!(
                    "deployer: rollout {} was being rolled back (it had stopped at step {}): finishing the rollback, not going forward",
                    j.id,
                    j.rollback_from.map_or("?", Phase::label)
                );
                let summary = self.undo(&mut j, false).await?;
                return Err(DeployError::Refused(format!(
                    "rollout {} had failed{} and is now rolled back: {summary}\nrun `deployer rollout` again for a new rollout",
                    j.id,
                    j.failure
                        .as_deref()
                        .map(|f| format!(" ({})", f.lines().next().unwrap_or_default()))
                        .unwrap_or_default()
                )));
            }
            Some(j) if j.unfinished() => {
                eprintln!(
                    "deployer: resuming rollout {} at step {}",
                    j.id,
                    j.phase.label()
                );
                if j.phase >= Phase::Swap {
                    let mut j = j;
                    self.reconcile(&mut j).await?;
                    j
                } else {
                    j
                }
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
                j.failure = Some(e.to_string());
                match self.undo(&mut j, false).await {
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

    /// The load balancers in cut-over groups: canary swaps and bakes one at a time.
    fn cut_over_groups(&self) -> Vec<Vec<&LbClient>> {
        match self.cfg.checks.cut_over {
            CutOver::Canary => self.lbs.iter().map(|lb| vec![lb]).collect(),
            CutOver::All if self.lbs.is_empty() => Vec::new(),
            CutOver::All => vec![self.lbs.iter().collect()],
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
        if j.phase <= Phase::Bake {
            let mut swapped: Vec<&LbClient> = Vec::new();
            for group in self.cut_over_groups() {
                swapped.extend(group.iter().copied());
                if group.iter().any(|lb| !j.lb_after.contains_key(&lb.lb.name)) {
                    let t0 = self.begin(j, Phase::Swap)?;
                    let r = self.step_swap(j, &group).await;
                    self.end(j, Phase::Swap, t0, &r)?;
                    r?;
                }
                if group.iter().any(|lb| !j.baked.contains(&lb.lb.name)) {
                    let t0 = self.begin(j, Phase::Bake)?;
                    let r = self.step_bake(j, zones, &swapped).await.map(|(rounds, n)| {
                        *asked += n;
                        format!(
                            "{rounds} round(s) through {}, {n} queries, every new backend up, timeouts and SERVFAIL within [checks]",
                            swapped.iter().map(|l| l.lb.name.as_str()).collect::<Vec<_>>().join(", ")
                        )
                    });
                    self.end(j, Phase::Bake, t0, &r)?;
                    r?;
                    j.baked.extend(group.iter().map(|lb| lb.lb.name.clone()));
                    j.save(&self.dir)?;
                }
            }
            // The invariant, checked while a failure can still roll back: no load
            // balancer serves a server about to be deleted.
            let (_, kept) = self.unreferenced(j.old.values().cloned().collect()).await;
            if !kept.is_empty() {
                return Err(DeployError::Refused(format!(
                    "refusing to delete the old servers: {}",
                    kept.join("; ")
                )));
            }
        }
        if j.phase <= Phase::DeleteOld {
            let t0 = self.begin(j, Phase::DeleteOld)?;
            let r = async {
                // Checked again right before deleting: a resumed run, or a change
                // since the bake, must not take a served server away.
                let (free, kept) = self.unreferenced(j.old.values().cloned().collect()).await;
                if !kept.is_empty() {
                    return Err(DeployError::Refused(format!(
                        "refusing to delete: {}",
                        kept.join("; ")
                    )));
                }
                let mut names = Vec::new();
                for old in free {
                    self.provider.delete(&old).await?;
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

    /// The invariant before every delete: reads every load balancer's live set and
    /// splits `doomed` into what no load balancer serves and, with the reason, what
    /// must be kept. A load balancer that cannot be read keeps everything: nothing
    /// can be shown unreferenced.
    async fn unreferenced(&self, doomed: Vec<Instance>) -> (Vec<Instance>, Vec<String>) {
        let mut sets = Vec::new();
        let mut unreadable = Vec::new();
        for lb in &self.lbs {
            match lb.members().await {
                Ok(s) => sets.push((&lb.lb, s)),
                Err(e) => unreadable.push(e.to_string()),
            }
        }
        if !unreadable.is_empty() {
            let kept = doomed
                .iter()
                .map(|i| {
                    format!(
                        "{} ({}) kept: cannot read every load balancer's set ({})",
                        i.label,
                        i.id,
                        unreadable.join("; ")
                    )
                })
                .collect();
            return (Vec::new(), kept);
        }
        split_served(&self.provider, &sets, doomed)
    }

    /// On resume at or past the swap: every load balancer must be where the journal
    /// left it. A PUT that landed but whose answer (or journal write) was lost is
    /// recognised — generation one past the recorded one, exactly the new set — and
    /// journaled; anything else stops the rollout and says what changed.
    async fn reconcile(&self, j: &mut Journal) -> Result<()> {
        let mut changed = Vec::new();
        for lb in &self.lbs {
            let name = &lb.lb.name;
            let cur = lb.members().await?;
            let desired = self.desired(lb, &j.new)?;
            match (j.lb_after.get(name), j.lb_before.get(name)) {
                (Some(&g), _) => {
                    if cur.generation != g || !same_members(&cur.backends, &desired) {
                        changed.push(format!(
                            "{name}: the rollout left it at generation {g} serving the new servers; it is at generation {} serving {}",
                            cur.generation,
                            describe(&cur.backends)
                        ));
                    }
                }
                (None, Some(before)) => {
                    if cur.generation == before.generation
                        && same_members(&cur.backends, &before.backends)
                    {
                        // Not swapped yet.
                    } else if cur.generation == before.generation + 1
                        && same_members(&cur.backends, &desired)
                    {
                        eprintln!(
                            "deployer: {name} took the swap (generation {}) before the last run could journal it",
                            cur.generation
                        );
                        j.lb_after.insert(name.clone(), cur.generation);
                        j.save(&self.dir)?;
                    } else {
                        changed.push(format!(
                            "{name}: it was at generation {} before the swap; it is at generation {} serving {}",
                            before.generation,
                            cur.generation,
                            describe(&cur.backends)
                        ));
                    }
                }
                (None, None) => {}
            }
            if j.phase >= Phase::DeleteOld && !j.lb_after.contains_key(name) {
                changed.push(format!("{name} was never swapped to the new servers"));
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        let next = if j.phase >= Phase::DeleteOld {
            "make every load balancer serve the new servers again, then run `deployer rollout`"
        } else {
            "`deployer rollback` puts back what the rollout changed (`--force` restores over changes made since)"
        };
        Err(DeployError::Refused(format!(
            "the load balancers are not where rollout {} left them, so it does not go on:\n  - {}\n{next}",
            j.id,
            changed.join("\n  - ")
        )))
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
        // Creates, then waits, at most `provider.max_parallel` at a time; each result
        // is journaled the moment it arrives. Reuses an instance left by an
        // interrupted run (found by label).
        let parallel = self.cfg.provider.max_parallel;
        let id = j.id.clone();
        let mut creates = stream::iter(&self.cfg.nameservers)
            .map(|ns| {
                let id = &id;
                async move {
                    let r = self
                        .provider
                        .create(&next_label(&ns.name), &ns.region, id)
                        .await;
                    (ns.name.clone(), r)
                }
            })
            .buffer_unordered(parallel);
        while let Some((ns, r)) = creates.next().await {
            j.new.insert(ns, r?);
            j.save(&self.dir)?;
        }
        drop(creates);
        let waiting = j.new.clone();
        let mut waits = stream::iter(&waiting)
            .map(|(ns, inst)| async move { (ns.clone(), self.provider.wait_ready(inst).await) })
            .buffer_unordered(parallel);
        while let Some((ns, r)) = waits.next().await {
            j.new.insert(ns, r?);
            j.save(&self.dir)?;
        }
        Ok(j.new
            .values()
            .map(|i| format!("{} ({})", i.label, i.id))
            .collect::<Vec<_>>()
            .join(", "))
    }

    /// Swaps each load balancer of `group` to the new servers, expecting the
    /// generation journaled before any swap, and journals what each PUT returned.
    async fn step_swap(&self, j: &mut Journal, group: &[&LbClient]) -> Result<String> {
        // Record every load balancer's set before changing any of them.
        for lb in &self.lbs {
            if !j.lb_before.contains_key(&lb.lb.name) {
                let cur = lb.members().await?;
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
        for lb in group {
            let name = &lb.lb.name;
            if j.lb_after.contains_key(name) {
                continue;
            }
            let before = j.lb_before[name].generation;
            let desired = self.desired(lb, &j.new)?;
            let g = lb
                .put(&desired, Some(before), true)
                .await
                .map_err(|e| match e.conflict() {
                    true => DeployError::Refused(format!(
                        "{name} changed since the rollout recorded it at generation {before}, so it is not swapped: {e}"
                    )),
                    false => e.into(),
                })?;
            j.lb_after.insert(name.clone(), g);
            j.save(&self.dir)?;
            done.push(format!("{name} -> generation {g}"));
        }
        Ok(done.join(", "))
    }

    /// Bake rounds over every load balancer swapped so far: the zone replayed through
    /// each, each new server asked directly, and each load balancer's own view judged
    /// ([`bake::judge`]). Lasts `bake_s`, longer (up to `bake_settle_s` more) while a
    /// new backend is still unchecked.
    async fn step_bake(
        &self,
        j: &Journal,
        zones: &[ZoneChecks],
        lbs: &[&LbClient],
    ) -> Result<(usize, usize)> {
        let checks = &self.cfg.checks;
        let until = Instant::now() + Duration::from_secs(checks.bake_s);
        let give_up = until + Duration::from_secs(checks.bake_settle_s);
        let mut wants = Vec::new();
        for lb in lbs {
            let want = self.desired(lb, &j.new)?;
            let base = bake::sample(&lb.get().await?, &lb.metrics().await?, &want);
            wants.push((lb, want, base));
        }
        let (mut rounds, mut asked) = (0, 0);
        loop {
            for (lb, _, _) in &wants {
                asked += verify::verify_server(lb.lb.dns, zones).await?;
            }
            for inst in j.new.values() {
                if let Some(addr) = inst.dns_addr() {
                    verify::answers_soa(addr, zones).await?;
                    asked += zones.len();
                }
            }
            let mut pending = Vec::new();
            for (lb, want, base) in &wants {
                let list = lb.get().await?;
                let now = bake::sample(&list, &lb.metrics().await?, want);
                let v = bake::judge(&lb.lb.name, &list, want, base, &now, checks);
                if !v.problems.is_empty() {
                    return Err(DeployError::Refused(format!(
                        "bake analysis: {}",
                        v.problems.join("; ")
                    )));
                }
                pending.extend(v.pending);
            }
            rounds += 1;
            let t = Instant::now();
            if t >= until && pending.is_empty() {
                return Ok((rounds, asked));
            }
            if t >= give_up {
                return Err(DeployError::Refused(format!(
                    "bake analysis: no health check judged {} within {}s after the bake (checks.bake_settle_s)",
                    pending.join(", "),
                    checks.bake_settle_s
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
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

    /// Puts one load balancer back to its set before the swap, only if it is still
    /// where the rollout left it (or `force`). `Ok(None)`: nothing to do.
    async fn restore(&self, j: &Journal, lb: &LbClient, force: bool) -> Result<Option<String>> {
        let name = &lb.lb.name;
        let Some(before) = j.lb_before.get(name) else {
            return Ok(None);
        };
        let cur = lb.members().await?;
        if same_members(&cur.backends, &before.backends) {
            return Ok(None);
        }
        let desired = self.desired(lb, &j.new).ok();
        let ours = match j.lb_after.get(name) {
            Some(&g) => cur.generation == g,
            // A swap that landed but was never journaled.
            None => {
                cur.generation == before.generation + 1
                    && desired.is_some_and(|d| same_members(&cur.backends, &d))
            }
        };
        if !ours && !j.lb_after.contains_key(name) && !force {
            // The rollout never changed it: whatever it serves is someone else's.
            return Ok(None);
        }
        if !ours && !force {
            return Err(DeployError::Refused(format!(
                "{name} is at generation {} serving {}, not at generation {} where the rollout left it: someone changed it, so it is not restored over that (`deployer rollback --force` restores anyway)",
                cur.generation,
                describe(&cur.backends),
                j.lb_after[name]
            )));
        }
        let g = lb
            .put(&before.backends, Some(cur.generation), false)
            .await?;
        Ok(Some(format!("{name} restored (generation {g})")))
    }

    /// Undoes an unfinished rollout that has not started deleting old servers. The
    /// rollback is journaled as its own phase before it touches anything; it tries
    /// every load balancer, deletes only new servers that no load balancer serves
    /// (and, of those found by label, only the ones this rollout created), and
    /// reports every failure together. It stays in `rolling back` until all is done.
    async fn undo(&self, j: &mut Journal, force: bool) -> Result<String> {
        if j.phase != Phase::RollingBack && j.phase >= Phase::DeleteOld {
            return Err(DeployError::Refused(format!(
                "rollout {} already began deleting the old servers (step 6); it can only be finished: run `deployer rollout`",
                j.id
            )));
        }
        if j.phase != Phase::RollingBack {
            let from = j.phase;
            j.rollback_from = Some(from);
            j.phase = Phase::RollingBack;
            j.record(
                &self.dir,
                "rollback",
                "started",
                &format!("from step {}", from.label()),
            )?;
        }
        let t0 = Instant::now();
        let mut summary = Vec::new();
        let mut failures = Vec::new();
        for lb in &self.lbs {
            match self.restore(j, lb, force).await {
                Ok(Some(s)) => {
                    eprintln!("deployer: rollback: {s}");
                    summary.push(s)
                }
                Ok(None) => {}
                Err(e) => failures.push(e.to_string()),
            }
        }
        // Queries forwarded to the new servers just before a restore are still
        // answered by them: let them finish (dnslb's default query timeout) before
        // those servers are deleted.
        if !summary.is_empty() {
            tokio::time::sleep(RESTORE_DRAIN).await;
        }
        // The new servers, including any created but not yet journaled (found by
        // label, and only if this rollout's tag is on it).
        let mut doomed: BTreeMap<String, Instance> =
            j.new.values().map(|i| (i.id.clone(), i.clone())).collect();
        for ns in &self.cfg.nameservers {
            match self.provider.find(&next_label(&ns.name)).await {
                Ok(Some(i)) if j.old.values().any(|o| o.id == i.id) => {}
                Ok(Some(i)) if doomed.contains_key(&i.id) => {}
                Ok(Some(i)) if i.created_by(&j.id) => {
                    doomed.insert(i.id.clone(), i);
                }
                Ok(Some(i)) => summary.push(format!(
                    "left {} ({}) alone: rollout {} did not create it",
                    i.label, i.id, j.id
                )),
                Ok(None) => {}
                Err(e) => failures.push(e.to_string()),
            }
        }
        let (free, kept) = self.unreferenced(doomed.into_values().collect()).await;
        failures.extend(kept);
        for inst in free {
            match self.provider.delete(&inst).await {
                Ok(()) => {
                    let s = format!("deleted {} ({})", inst.label, inst.id);
                    eprintln!("deployer: rollback: {s}");
                    summary.push(s)
                }
                Err(e) => failures.push(format!(
                    "could not delete {} ({}): {e}",
                    inst.label, inst.id
                )),
            }
        }
        if !failures.is_empty() {
            j.record(&self.dir, "rollback", "failed", &failures.join("; "))?;
            progress(
                "rollback",
                t0,
                &format!("INCOMPLETE: {}", failures.join("; ")),
            );
            return Err(DeployError::Refused(format!(
                "the rollback of {} is not complete{}:\n  - {}\nrun `deployer rollback` again once the cause is fixed",
                j.id,
                if summary.is_empty() {
                    String::new()
                } else {
                    format!(" (done: {})", summary.join(", "))
                },
                failures.join("\n  - ")
            )));
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

    /// `deployer rollback [--force]`.
    pub async fn rollback(&self, force: bool) -> Result<String> {
        let _lock = Lock::acquire(&self.dir, "rollback")?;
        if let Some(s) = self.lb_rollback().await? {
            return Ok(s);
        }
        match Journal::load(&self.dir)? {
            Some(mut j) if j.unfinished() => {
                eprintln!(
                    "deployer: rolling back rollout {} (stopped at step {})",
                    j.id,
                    j.rollback_from.unwrap_or(j.phase).label()
                );
                self.undo(&mut j, force).await
            }
            _ => Ok("no unfinished rollout: nothing to roll back".into()),
        }
    }

    /// `deployer bootstrap`: creates the first servers (reusing any that exist),
    /// provisions and verifies them, and points every load balancer at them.
    pub async fn bootstrap(&self) -> Result<BTreeMap<String, Instance>> {
        let _lock = Lock::acquire(&self.dir, "bootstrap")?;
        self.no_lb_rollout()?;
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
            let cur = lb.members().await?;
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
            .chain(self.lb_labels())
            .collect()
    }

    /// The labels load balancers made by `rollout-lbs` have.
    fn lb_labels(&self) -> Vec<String> {
        self.cfg
            .load_balancers
            .iter()
            .flat_map(|l| [l.name.clone(), next_label(&l.name)])
            .collect()
    }

    /// `deployer status`.
    pub async fn status(&self) -> Result<Status> {
        let instances = self.provider.list(&self.all_labels()).await?;
        let mut load_balancers = BTreeMap::new();
        for lb in &self.lbs {
            let v = match lb.members().await {
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
            .map(|j| UnfinishedRollout::new(j.id, j.phase.label(), &j.new));
        let mut delegation = Vec::new();
        if let Some(r) = &self.cfg.registrar {
            for &server in &r.parent_servers {
                let (d, error) = match registrar::delegation(server, &r.zone).await {
                    Ok(d) => (Some(d), None),
                    Err(e) => (None, Some(e.to_string())),
                };
                delegation.push(DelegationStatus {
                    zone: r.zone.clone(),
                    server,
                    delegation: d,
                    error,
                });
            }
        }
        let unfinished_lb = crate::lbrollout::LbJournal::load(&self.dir)?
            .filter(|j| j.unfinished())
            .map(|j| UnfinishedRollout::new(j.id, j.phase.label(), &j.new));
        Ok(Status {
            provider: self.provider.kind().into(),
            instances,
            load_balancers,
            delegation,
            unfinished_rollout: unfinished,
            unfinished_lb_rollout: unfinished_lb,
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
            match lb.members().await {
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
            "5. verify the same records through {} for {}s, judging each load balancer's backends and metrics (timeouts <= {} of queries, SERVFAIL <= {}); cut-over {}",
            self.lbs
                .iter()
                .map(|l| l.lb.dns.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            self.cfg.checks.bake_s,
            self.cfg.checks.bake_max_timeout_ratio,
            self.cfg.checks.bake_max_servfail,
            match self.cfg.checks.cut_over {
                CutOver::Canary => "canary: one load balancer at a time, each baked",
                CutOver::All => "all at once, one bake",
            }
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
        out.extend(self.plan_lbs().await?);
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
        let lb_labels = self.lb_labels();
        let mut done = Vec::new();
        for inst in self.provider.list(&labels).await? {
            // A load balancer only if the deployer made it.
            let doomed = if lb_labels.contains(&inst.label) {
                inst.managed()
            } else {
                labels.contains(&inst.label) || journaled.contains(&inst.id)
            };
            if doomed {
                self.provider.delete(&inst).await?;
                done.push(format!("{} ({})", inst.label, inst.id));
            }
        }
        if let Some(j) = journal {
            j.archive(&self.dir)?;
        }
        // The load balancers it made are gone: the config's endpoints apply again.
        if let Some(j) = crate::lbrollout::LbJournal::load(&self.dir)? {
            crate::journal::archive(&self.dir.join("lb-journal.json"), &self.dir, &j.id)?;
        }
        match std::fs::remove_file(self.dir.join(crate::lbrollout::ENDPOINTS)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
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
    /// The delegation of `[registrar] zone` as each parent server serves it (empty
    /// without `[registrar]`).
    pub delegation: Vec<DelegationStatus>,
    /// An interrupted rollout, if any.
    pub unfinished_rollout: Option<UnfinishedRollout>,
    /// An interrupted load balancer rollout, if any.
    pub unfinished_lb_rollout: Option<UnfinishedRollout>,
}

/// The delegation one parent server serves, in `status`.
#[derive(Debug, Serialize)]
pub struct DelegationStatus {
    /// The delegated zone.
    pub zone: String,
    /// The parent server asked.
    pub server: SocketAddr,
    /// What it serves.
    pub delegation: Option<Delegation>,
    /// Or why it could not be read.
    pub error: Option<String>,
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

impl UnfinishedRollout {
    fn new(id: String, step: &str, new: &BTreeMap<String, Instance>) -> Self {
        UnfinishedRollout {
            id,
            step: step.into(),
            new: new
                .values()
                .map(|i| format!("{} ({})", i.label, i.id))
                .collect(),
        }
    }
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
        for d in &self.delegation {
            match (&d.delegation, &d.error) {
                (Some(del), _) => {
                    writeln!(
                        f,
                        "delegation of {} at {} (TTL {}s):",
                        d.zone, d.server, del.ttl
                    )?;
                    for (ns, glue) in &del.ns {
                        writeln!(
                            f,
                            "  {ns} -> {}",
                            if glue.is_empty() {
                                "(no glue)".into()
                            } else {
                                registrar::fmt_addrs(glue)
                            }
                        )?;
                    }
                }
                (None, e) => writeln!(
                    f,
                    "delegation of {} at {}: unreadable: {}",
                    d.zone,
                    d.server,
                    e.as_deref().unwrap_or("?")
                )?,
            }
        }
        if let Some(u) = &self.unfinished_lb_rollout {
            writeln!(
                f,
                "unfinished load balancer rollout {} stopped at step {} (new: {}): `deployer rollout-lbs` finishes it, `deployer rollback` undoes it",
                u.id,
                u.step,
                u.new.join(", ")
            )?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::local::Local;
    use std::net::{IpAddr, Ipv4Addr};

    fn inst(id: &str, port: u16) -> Instance {
        Instance {
            id: id.into(),
            label: format!("ns-{id}"),
            region: "local".into(),
            status: "running".into(),
            public_ipv4: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            private_ipv4: None,
            dns_port: port,
            tags: Vec::new(),
            ..Instance::default()
        }
    }

    #[test]
    fn an_instance_any_load_balancer_serves_is_kept_and_named() {
        let d = tempfile::tempdir().unwrap();
        let local = Local::new(d.path(), d.path());
        let lb = |name: &str| LoadBalancer {
            name: name.into(),
            admin_url: "http://127.0.0.1:1".into(),
            token_file: None,
            dns: "127.0.0.1:53".parse().unwrap(),
            nameservers: vec!["ns1".into()],
            region: None,
            ns_name: None,
        };
        let (lb1, lb2) = (lb("lb1"), lb("lb2"));
        let set = |addrs: &[&str]| BackendSet {
            generation: 3,
            backends: addrs
                .iter()
                .enumerate()
                .map(|(i, a)| Backend {
                    name: format!("b{i}"),
                    address: a.parse().unwrap(),
                    weight: 1,
                })
                .collect(),
        };
        let sets = [
            (&lb1, set(&["127.0.0.1:5301"])),
            (&lb2, set(&["127.0.0.1:5399", "127.0.0.1:5302"])),
        ];
        let (free, kept) = split_served(
            &local,
            &sets,
            vec![inst("a", 5301), inst("b", 5302), inst("c", 5303)],
        );
        assert_eq!(free, vec![inst("c", 5303)]);
        assert_eq!(
            kept,
            [
                "ns-a (a) is still served by lb1 (backend b0 127.0.0.1:5301)",
                "ns-b (b) is still served by lb2 (backend b1 127.0.0.1:5302)",
            ]
        );
    }
}
