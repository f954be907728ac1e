//! The backend set: one immutable [`Snapshot`] behind one `ArcSwap`, replaced whole by
//! serialized writers; and backend selection, which the hot path runs on a single
//! `load()` of that snapshot.
//!
//! What changes per query (queries in flight, health) lives in a [`BackendRuntime`]
//! shared by reference: a new snapshot carries the runtime of a backend over when it
//! keeps its name and address, so health, counters and in-flight accounting survive
//! swaps, and a query in flight keeps its backend's runtime alive after the backend
//! left the set. A backend that comes back under another name at the same address (a
//! rollout renames its servers) gets a fresh runtime that inherits the health.
//!
//! # Health
//! One model for every source (see docs/operations.md, "Health"):
//! - `unknown` (new, nothing decided yet) and `up` are usable; `down` is not.
//! - Active checks: `fall` failed checks in a row take an `unknown` or `up` backend
//!   down; one pass makes an `unknown` one `up`, `rise` passes in a row bring a `down`
//!   one back. A check of `require_healthy` counts like any other.
//! - Passive: one signal, judged by [`Snapshot::passive_round`]: a backend is failing
//!   if `fall` queries in a row timed out with no answer at all since they were sent,
//!   or if more than half of at least [`LOSS_WINDOW`] decided queries (answered or
//!   timed out) timed out. A failing backend goes down unless no other usable backend
//!   would be left: then it stays in use and that is logged.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::config::{BackendConfig, Policy};
use crate::metrics;

/// Decided queries (answered or timed out) the loss ratio is judged over.
pub const LOSS_WINDOW: u64 = 20;

/// Whether new queries may go to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Receives queries.
    #[default]
    Active,
    /// Receives no new queries; answers to queries in flight are still delivered.
    Draining,
}

/// What health checks and passive signals say about a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Nothing decided yet (new, or its checks have not settled): the backend is used.
    Unknown = 0,
    /// Passing.
    Up = 1,
    /// Failing: no queries go to it.
    Down = 2,
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            1 => Health::Up,
            2 => Health::Down,
            _ => Health::Unknown,
        }
    }
}

/// What the passive judge keeps between rounds: the loss window (the totals when it
/// began, and the verdict of the last full one), and whether "kept up" was logged
/// for the current failing spell (it is logged once per spell).
#[derive(Debug, Default)]
struct Window {
    answers: u64,
    timeouts: u64,
    /// Why the last full window failed, if it lost more than half of its queries.
    lossy: Option<String>,
    kept_up_logged: bool,
}

/// The mutable, shared side of one backend.
pub struct BackendRuntime {
    /// Name (unique in a snapshot).
    pub name: String,
    /// Where it answers.
    pub address: SocketAddr,
    health: AtomicU8,
    /// Consecutive passing checks.
    passes: AtomicU32,
    /// Consecutive failed checks.
    failures: AtomicU32,
    /// Query timeouts in a row with no answer since each was sent (the passive
    /// signal's "silent" half); any answer, to a query or a check, resets it.
    silent_timeouts: AtomicU32,
    /// When this runtime was made: the origin of `last_answer_ms`.
    born: Instant,
    /// Milliseconds from `born` to the latest answer, plus one (0: none yet).
    last_answer_ms: AtomicU64,
    outstanding: AtomicU64,
    queries: AtomicU64,
    /// Answers received (any RCODE).
    answers: AtomicU64,
    timeouts: AtomicU64,
    /// The passive judge's state (see [`Window`]); only the health loop takes it.
    window: Mutex<Window>,
    /// Per-backend metric series.
    pub metrics: metrics::Backend,
}

impl std::fmt::Debug for BackendRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendRuntime")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("health", &self.health())
            .finish_non_exhaustive()
    }
}

impl BackendRuntime {
    /// A fresh runtime: health unknown, counters zero.
    pub fn new(name: &str, address: SocketAddr) -> Self {
        BackendRuntime {
            name: name.to_string(),
            address,
            health: AtomicU8::new(Health::Unknown as u8),
            passes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            silent_timeouts: AtomicU32::new(0),
            born: Instant::now(),
            last_answer_ms: AtomicU64::new(0),
            outstanding: AtomicU64::new(0),
            queries: AtomicU64::new(0),
            answers: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            window: Mutex::new(Window::default()),
            metrics: metrics::Backend::default(),
        }
    }

    /// A fresh runtime for `name` that takes over the health of `from`, the runtime
    /// of the backend at the same address under another name (counters start at zero).
    fn inheriting(name: &str, from: &BackendRuntime) -> Self {
        let rt = BackendRuntime::new(name, from.address);
        rt.health
            .store(from.health.load(Ordering::Relaxed), Ordering::Relaxed);
        rt.passes
            .store(from.passes.load(Ordering::Relaxed), Ordering::Relaxed);
        rt.failures
            .store(from.failures.load(Ordering::Relaxed), Ordering::Relaxed);
        rt
    }

    /// Current health.
    #[inline]
    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }

    /// Queries in flight.
    #[inline]
    pub fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// What `/metrics` shows of it.
    pub fn sample(&self) -> metrics::BackendSample<'_> {
        metrics::BackendSample {
            name: &self.name,
            queries: self.queries_total(),
            timeouts: self.timeouts_total(),
            outstanding: self.outstanding(),
            up: self.health() != Health::Down,
            series: &self.metrics,
        }
    }

    /// Queries forwarded since the backend joined.
    pub fn queries_total(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Timeouts since the backend joined.
    pub fn timeouts_total(&self) -> u64 {
        self.timeouts.load(Ordering::Relaxed)
    }

    /// A query was sent to it.
    #[inline]
    pub fn on_forward(&self) {
        self.queries.fetch_add(1, Ordering::Relaxed);
        self.outstanding.fetch_add(1, Ordering::Relaxed);
    }

    /// Milliseconds from `born` to `t`, plus one.
    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.born).as_millis() as u64 + 1
    }

    /// The answer to a query sent at `sent` came back at `now`.
    #[inline]
    pub fn on_response(&self, rcode: u8, sent: Instant, now: Instant) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.answers.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .response(rcode, now.saturating_duration_since(sent));
        self.answered(now);
    }

    /// An answer (to a query or a check) came at `now`: it ends a silent streak.
    /// Read first so the common case does not write a shared cache line: the time of
    /// the latest answer is written at most once a millisecond.
    #[inline]
    fn answered(&self, now: Instant) {
        if self.silent_timeouts.load(Ordering::Relaxed) != 0 {
            self.silent_timeouts.store(0, Ordering::Relaxed);
        }
        let ms = self.ms(now);
        if self.last_answer_ms.load(Ordering::Relaxed) < ms {
            self.last_answer_ms.fetch_max(ms, Ordering::Relaxed);
        }
    }

    /// A query sent at `sent` was given up (timeout, or the connection carrying it
    /// died). It counts toward the silent streak only if the backend has not answered
    /// since `sent`: a datagram lost now and then (a backend's full receive buffer
    /// during a stall) says nothing about a backend that keeps answering, and the
    /// timeout sweep would otherwise find such losses "in a row" however many answers
    /// came between them. Health is judged by [`Snapshot::passive_round`], not here.
    pub fn on_timeout(&self, sent: Instant) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.timeouts.fetch_add(1, Ordering::Relaxed);
        if self.last_answer_ms.load(Ordering::Relaxed) > self.ms(sent) {
            return;
        }
        self.silent_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// A query was abandoned without charging the backend (it was never sent).
    pub fn on_abandon(&self) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
    }

    /// Why the passive signal says this backend is failing, if it does: `fall`
    /// silent timeouts in a row, or the last full loss window lost most of its
    /// queries. Closes the loss window if it holds [`LOSS_WINDOW`] decided queries.
    fn passive_failing(&self, fall: u32) -> Option<String> {
        let (answers, timeouts) = (
            self.answers.load(Ordering::Relaxed),
            self.timeouts.load(Ordering::Relaxed),
        );
        let lossy = {
            let mut w = self.window();
            let (answered, timed_out) = (answers - w.answers, timeouts - w.timeouts);
            if answered + timed_out >= LOSS_WINDOW {
                w.lossy = (timed_out > answered).then(|| {
                    format!(
                        "{timed_out} of the last {} queries timed out",
                        timed_out + answered
                    )
                });
                (w.answers, w.timeouts) = (answers, timeouts);
            }
            w.lossy.clone()
        };
        let silent = self.silent_timeouts.load(Ordering::Relaxed);
        if silent >= fall {
            return Some(format!(
                "{silent} query timeouts in a row with no answer since"
            ));
        }
        lossy
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets the passive signal (after the backend changed health): a backend that
    /// checks bring back starts with a clean slate, and one just taken down is not
    /// judged again on the same queries.
    fn reset_passive(&self) {
        let mut w = self.window();
        w.answers = self.answers.load(Ordering::Relaxed);
        w.timeouts = self.timeouts.load(Ordering::Relaxed);
        w.lossy = None;
        w.kept_up_logged = false;
        self.silent_timeouts.store(0, Ordering::Relaxed);
    }

    /// A health check passed: one makes an `unknown` backend `up`, `rise` in a row
    /// bring a `down` one back.
    pub fn record_pass(&self, rise: u32) {
        self.metrics.check(true);
        self.failures.store(0, Ordering::Relaxed);
        self.silent_timeouts.store(0, Ordering::Relaxed);
        let passes = self.passes.fetch_add(1, Ordering::Relaxed) + 1;
        let up = match self.health() {
            Health::Unknown => true,
            Health::Down => passes >= rise,
            Health::Up => false,
        };
        if up {
            if self.health() == Health::Down {
                self.reset_passive();
            }
            self.set_health(Health::Up, "health check passed");
        }
    }

    /// A health check failed: `fall` in a row take an `up` or `unknown` backend down.
    pub fn record_failure(&self, fall: u32, why: &str) {
        self.metrics.check(false);
        self.passes.store(0, Ordering::Relaxed);
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= fall && self.health() != Health::Down {
            self.set_health(
                Health::Down,
                &format!("{failures} health checks failed in a row, the last: {why}"),
            );
        }
    }

    /// Sets health; logs only on an actual change, once.
    pub fn set_health(&self, to: Health, why: &str) {
        let from = self.health.swap(to as u8, Ordering::AcqRel);
        if from != to as u8 {
            tracing::warn!(
                backend = %self.name,
                address = %self.address,
                from = ?Health::from_u8(from),
                to = ?to,
                "backend health changed: {why}"
            );
        }
    }
}

/// One backend as a snapshot sees it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Name, address, weight.
    pub spec: BackendConfig,
    /// Active or draining.
    pub state: AdminState,
    /// Shared runtime.
    pub runtime: Arc<BackendRuntime>,
}

impl Entry {
    /// May new queries go here?
    #[inline]
    pub fn usable(&self) -> bool {
        self.state == AdminState::Active && self.runtime.health() != Health::Down
    }
}

/// One immutable version of the backend set.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Bumped by one on every change.
    pub generation: u64,
    /// In configuration order (first-available relies on it).
    pub entries: Vec<Entry>,
}

impl Snapshot {
    /// Applies the passive signal (see the module doc), run by the health loop a few
    /// times a second. Every backend the signal says is failing goes down, unless no
    /// usable backend would be left: when every backend fails alike (an overload that
    /// makes them all lose most queries, or a single backend that stopped answering
    /// queries but still answers checks), SERVFAIL for every client would be worse
    /// than the answers that still get through, so they stay in use and this is
    /// logged once per failing spell.
    pub fn passive_round(&self, fall: u32) {
        // One verdict per entry, in entry order.
        let failing: Vec<Option<String>> = self
            .entries
            .iter()
            .map(|e| e.runtime.passive_failing(fall))
            .collect();
        let others_usable = self
            .entries
            .iter()
            .zip(&failing)
            .any(|(e, why)| why.is_none() && e.usable());
        for (e, why) in self.entries.iter().zip(failing) {
            let rt = &e.runtime;
            let Some(why) = why else {
                rt.window().kept_up_logged = false;
                continue;
            };
            if rt.health() == Health::Down {
                continue;
            }
            if others_usable {
                rt.passes.store(0, Ordering::Relaxed);
                rt.set_health(Health::Down, &why);
                rt.reset_passive();
            } else if !std::mem::replace(&mut rt.window().kept_up_logged, true) {
                tracing::warn!(
                    backend = %rt.name,
                    address = %rt.address,
                    "{why}; kept up: no other usable backend would be left"
                );
            }
        }
    }
}

/// Per-worker selection state: round-robin position and a random generator, so the
/// hot path shares no counter between threads.
#[derive(Debug)]
pub struct Picker {
    next: usize,
    rng: fastrand::Rng,
}

impl Default for Picker {
    fn default() -> Self {
        Picker {
            next: fastrand::usize(..1024),
            rng: fastrand::Rng::new(),
        }
    }
}

impl Snapshot {
    /// Chooses the backend for one query, or `None` if no backend is active and not
    /// down. Never allocates; a linear scan, since sets hold a handful of backends.
    #[inline]
    pub fn pick(&self, policy: Policy, p: &mut Picker) -> Option<&Entry> {
        let n = self.entries.len();
        if n == 0 {
            return None;
        }
        match policy {
            Policy::FirstAvailable => self.entries.iter().find(|e| e.usable()),
            Policy::RoundRobin => {
                let start = p.next;
                p.next = p.next.wrapping_add(1);
                (0..n)
                    .map(|i| &self.entries[(start + i) % n])
                    .find(|e| e.usable())
            }
            Policy::WeightedRandom => {
                let total: u64 = self
                    .entries
                    .iter()
                    .filter(|e| e.usable())
                    .map(|e| u64::from(e.spec.weight))
                    .sum();
                if total == 0 {
                    return None;
                }
                let mut r = p.rng.u64(..total);
                for e in self.entries.iter().filter(|e| e.usable()) {
                    let w = u64::from(e.spec.weight);
                    if r < w {
                        return Some(e);
                    }
                    r -= w;
                }
                None
            }
            Policy::LeastOutstanding => {
                // Rotate the starting point so ties (the common case at low load) are
                // spread evenly instead of all landing on the first backend.
                let start = p.next;
                p.next = p.next.wrapping_add(1);
                let mut best: Option<(&Entry, u64)> = None;
                for i in 0..n {
                    let e = &self.entries[(start + i) % n];
                    if !e.usable() {
                        continue;
                    }
                    let o = e.runtime.outstanding();
                    let better = match best {
                        None => true,
                        // o/w < bo/bw without division.
                        Some((b, bo)) => {
                            u128::from(o) * u128::from(b.spec.weight)
                                < u128::from(bo) * u128::from(e.spec.weight)
                        }
                    };
                    if better {
                        best = Some((e, o));
                    }
                }
                best.map(|(e, _)| e)
            }
        }
    }

    /// Like [`pick`](Self::pick), but never the backend at `not` (used to retry a
    /// query elsewhere); `None` if no other backend is usable.
    pub fn pick_other(&self, policy: Policy, p: &mut Picker, not: SocketAddr) -> Option<&Entry> {
        for _ in 0..self.entries.len() {
            match self.pick(policy, p) {
                Some(e) if e.spec.address != not => return Some(e),
                None => return None,
                Some(_) => {}
            }
        }
        self.entries
            .iter()
            .find(|e| e.usable() && e.spec.address != not)
    }

    /// The entry called `name`.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.spec.name == name)
    }

    /// True when at least one backend is usable: active and up or unknown, as
    /// routing sees it (what /healthz reports).
    pub fn any_usable(&self) -> bool {
        self.entries.iter().any(Entry::usable)
    }
}

/// Serializable form of a backend in the set (state file, admin API input).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Name, address, weight.
    #[serde(flatten)]
    pub spec: BackendConfig,
    /// Active or draining.
    #[serde(default)]
    pub state: AdminState,
}

/// Why a change of the set was refused.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    /// The proposed set breaks a rule; every problem is listed.
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
    /// Compare-and-swap lost: the set changed since the caller read it.
    #[error("backend set is at generation {current}, not {expected}")]
    Conflict {
        /// What the caller expected.
        expected: u64,
        /// What it is.
        current: u64,
    },
    /// A backend of that name already exists.
    #[error("backend {0:?} already exists")]
    Exists(String),
    /// No backend of that name.
    #[error("no backend named {0:?}")]
    NotFound(String),
    /// The hook that runs before the swap (persistence) failed.
    #[error("{0}")]
    Rejected(String),
    /// The change is refused as unsafe (e.g. removing the last backend).
    #[error("{0}")]
    Refused(String),
}

/// The live backend set: readers `load()`, writers go through [`BackendSet::update`],
/// which holds one mutex so read-modify-write cannot race.
pub struct BackendSet {
    current: ArcSwap<Snapshot>,
    writer: Mutex<()>,
}

impl std::fmt::Debug for BackendSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendSet")
            .field("generation", &self.load().generation)
            .finish()
    }
}

impl BackendSet {
    /// A set at `generation` holding `members`.
    pub fn new(generation: u64, members: &[Member]) -> Result<Self, SetError> {
        check(members)?;
        let snap = build(generation, members, &Snapshot::default());
        metrics_generation(generation);
        Ok(BackendSet {
            current: ArcSwap::from_pointee(snap),
            writer: Mutex::new(()),
        })
    }

    /// The current snapshot: one atomic load, for the hot path.
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The current snapshot as an owned `Arc`.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Applies `change` to the current members under the writer lock. `commit` runs
    /// with the proposed members and generation before anything is visible (to persist
    /// them, or to refuse); only if it succeeds is the new snapshot stored. Returns the
    /// new generation.
    pub fn update(
        &self,
        change: impl FnOnce(&Snapshot) -> Result<Vec<Member>, SetError>,
        commit: impl FnOnce(u64, &[Member]) -> Result<(), SetError>,
    ) -> Result<u64, SetError> {
        let _guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.current.load_full();
        let members = change(&cur)?;
        check(&members)?;
        let generation = cur.generation + 1;
        commit(generation, &members)?;
        self.current
            .store(Arc::new(build(generation, &members, &cur)));
        metrics_generation(generation);
        Ok(generation)
    }
}

fn metrics_generation(g: u64) {
    ::metrics::gauge!(metrics::GENERATION).set(g as f64);
}

fn check(members: &[Member]) -> Result<(), SetError> {
    let specs: Vec<BackendConfig> = members.iter().map(|m| m.spec.clone()).collect();
    let problems = crate::config::validate_backends(&specs);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(SetError::Invalid(problems))
    }
}

/// Builds a snapshot, reusing the runtime of every member that keeps its name and
/// address; a member new by name at an address the set had gets a fresh runtime with
/// the health of the runtime there (a rollout renames `ns1-next` to `ns1`).
fn build(generation: u64, members: &[Member], prev: &Snapshot) -> Snapshot {
    let entries = members
        .iter()
        .map(|m| {
            let (name, address) = (&m.spec.name, m.spec.address);
            let same = prev.get(name).filter(|e| e.spec.address == address);
            let runtime = match same {
                Some(e) => e.runtime.clone(),
                None => Arc::new(
                    match prev.entries.iter().find(|e| e.spec.address == address) {
                        Some(e) => BackendRuntime::inheriting(name, &e.runtime),
                        None => BackendRuntime::new(name, address),
                    },
                ),
            };
            Entry {
                spec: m.spec.clone(),
                state: m.state,
                runtime,
            }
        })
        .collect();
    Snapshot {
        generation,
        entries,
    }
}

/// The members of a snapshot, in order.
pub fn members(s: &Snapshot) -> Vec<Member> {
    s.entries
        .iter()
        .map(|e| Member {
            spec: e.spec.clone(),
            state: e.state,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, port: u16, weight: u32) -> Member {
        Member {
            spec: BackendConfig {
                name: name.into(),
                address: SocketAddr::from(([127, 0, 0, 1], port)),
                weight,
            },
            state: AdminState::Active,
        }
    }

    fn counts(set: &BackendSet, policy: Policy, n: usize) -> Vec<usize> {
        let snap = set.load();
        let mut p = Picker::default();
        let mut c = vec![0; snap.entries.len()];
        for _ in 0..n {
            let e = snap.pick(policy, &mut p).unwrap();
            let i = snap
                .entries
                .iter()
                .position(|x| x.spec.name == e.spec.name)
                .unwrap();
            c[i] += 1;
        }
        c
    }

    #[test]
    fn pick_other_avoids_one_backend_under_every_policy() {
        let set = BackendSet::new(1, &[member("a", 1, 1), member("b", 2, 1)]).unwrap();
        let not = SocketAddr::from(([127, 0, 0, 1], 1));
        let snap = set.load();
        let mut p = Picker::default();
        for policy in [
            Policy::RoundRobin,
            Policy::WeightedRandom,
            Policy::LeastOutstanding,
            Policy::FirstAvailable,
        ] {
            for _ in 0..10 {
                assert_eq!(snap.pick_other(policy, &mut p, not).unwrap().spec.name, "b");
            }
        }
        let only = BackendSet::new(1, &[member("a", 1, 1)]).unwrap();
        assert!(only
            .load()
            .pick_other(Policy::RoundRobin, &mut p, not)
            .is_none());
    }

    #[test]
    fn round_robin_is_exact() {
        let set = BackendSet::new(
            1,
            &[member("a", 1, 1), member("b", 2, 1), member("c", 3, 1)],
        )
        .unwrap();
        assert_eq!(counts(&set, Policy::RoundRobin, 300), vec![100, 100, 100]);
    }

    #[test]
    fn weighted_random_follows_weights() {
        let set = BackendSet::new(1, &[member("a", 1, 1), member("b", 2, 3)]).unwrap();
        let c = counts(&set, Policy::WeightedRandom, 40_000);
        let share = c[1] as f64 / 40_000.0;
        assert!((0.72..0.78).contains(&share), "{c:?}");
    }

    #[test]
    fn first_available_prefers_config_order_and_skips_down() {
        let set = BackendSet::new(1, &[member("a", 1, 1), member("b", 2, 1)]).unwrap();
        assert_eq!(counts(&set, Policy::FirstAvailable, 10), vec![10, 0]);
        set.load().entries[0]
            .runtime
            .set_health(Health::Down, "test");
        assert_eq!(counts(&set, Policy::FirstAvailable, 10), vec![0, 10]);
    }

    #[test]
    fn least_outstanding_avoids_busy_and_spreads_ties() {
        let set = BackendSet::new(1, &[member("a", 1, 1), member("b", 2, 1)]).unwrap();
        assert_eq!(counts(&set, Policy::LeastOutstanding, 100), vec![50, 50]);
        set.load().entries[0].runtime.on_forward();
        assert_eq!(counts(&set, Policy::LeastOutstanding, 10), vec![0, 10]);
    }

    #[test]
    fn draining_and_down_are_skipped_and_none_left_is_none() {
        let mut a = member("a", 1, 1);
        a.state = AdminState::Draining;
        let set = BackendSet::new(1, &[a, member("b", 2, 1)]).unwrap();
        for policy in [
            Policy::RoundRobin,
            Policy::WeightedRandom,
            Policy::LeastOutstanding,
            Policy::FirstAvailable,
        ] {
            assert_eq!(counts(&set, policy, 20), vec![0, 20], "{policy:?}");
        }
        set.load().entries[1]
            .runtime
            .set_health(Health::Down, "test");
        let mut p = Picker::default();
        assert!(set.load().pick(Policy::RoundRobin, &mut p).is_none());
    }

    #[test]
    fn update_bumps_generation_keeps_runtime_and_checks() {
        let set = BackendSet::new(7, &[member("a", 1, 1)]).unwrap();
        let rt = set.load().entries[0].runtime.clone();
        rt.set_health(Health::Up, "test");
        let g = set
            .update(
                |s| Ok(members(s).into_iter().chain([member("b", 2, 1)]).collect()),
                |_, _| Ok(()),
            )
            .unwrap();
        assert_eq!(g, 8);
        let snap = set.load();
        assert!(Arc::ptr_eq(&snap.entries[0].runtime, &rt));
        assert_eq!(snap.entries[1].runtime.health(), Health::Unknown);
        // Duplicate names are refused and change nothing.
        let err = set.update(
            |_| Ok(vec![member("x", 1, 1), member("x", 2, 1)]),
            |_, _| Ok(()),
        );
        assert!(matches!(err, Err(SetError::Invalid(_))));
        // A refusing commit changes nothing either.
        let err = set.update(
            |_| Ok(vec![member("y", 1, 1)]),
            |_, _| Err(SetError::Rejected("no".into())),
        );
        assert!(err.is_err());
        assert_eq!(set.load().generation, 8);
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// A set of `n` backends, every one up.
    fn up_set(n: u16) -> BackendSet {
        let members: Vec<_> = (1..=n).map(|i| member(&format!("b{i}"), i, 1)).collect();
        let set = BackendSet::new(1, &members).unwrap();
        for e in &set.load().entries {
            e.runtime.record_pass(2);
            assert_eq!(e.runtime.health(), Health::Up);
        }
        set
    }

    /// `n` queries to `rt` that time out with no answer since they were sent.
    fn silent(rt: &BackendRuntime, n: usize) {
        let later = Instant::now() + std::time::Duration::from_millis(5);
        for _ in 0..n {
            rt.on_forward();
            rt.on_timeout(later);
        }
    }

    #[test]
    fn a_new_backend_needs_fall_failed_checks_to_go_down_like_an_up_one() {
        let rt = BackendRuntime::new("t", addr(1));
        rt.record_failure(3, "lost");
        rt.record_failure(3, "lost");
        assert_eq!(
            rt.health(),
            Health::Unknown,
            "two lost checks decide nothing"
        );
        rt.record_pass(2);
        assert_eq!(rt.health(), Health::Up, "one pass makes it up");
        rt.record_failure(3, "lost");
        rt.record_failure(3, "lost");
        assert_eq!(rt.health(), Health::Up);
        rt.record_failure(3, "lost");
        assert_eq!(rt.health(), Health::Down);
        // `rise` passes in a row bring it back; a failure between restarts the count.
        rt.record_pass(2);
        rt.record_failure(3, "lost");
        rt.record_pass(2);
        assert_eq!(rt.health(), Health::Down);
        rt.record_pass(2);
        assert_eq!(rt.health(), Health::Up);
        // Never checked, `fall` failures take a new one down.
        let fresh = BackendRuntime::new("f", addr(2));
        for _ in 0..3 {
            fresh.record_failure(3, "refused");
        }
        assert_eq!(fresh.health(), Health::Down);
    }

    #[test]
    fn fall_silent_timeouts_take_a_backend_down_when_another_is_usable() {
        let set = up_set(2);
        let snap = set.load();
        let rt = &snap.entries[0].runtime;
        // It answered once, then went silent: queries sent after that answer time out.
        let t0 = Instant::now();
        rt.on_forward();
        rt.on_response(0, t0, t0);
        silent(rt, 2);
        snap.passive_round(3);
        assert_eq!(rt.health(), Health::Up);
        silent(rt, 1);
        snap.passive_round(3);
        assert_eq!(rt.health(), Health::Down);
        assert_eq!(snap.entries[1].runtime.health(), Health::Up);
        assert_eq!(rt.timeouts_total(), 3);
        // Checks bring it back, with a clean passive slate.
        rt.record_pass(2);
        rt.record_pass(2);
        snap.passive_round(3);
        assert_eq!(rt.health(), Health::Up);
    }

    #[test]
    fn timeouts_of_queries_sent_before_an_answer_are_not_a_streak() {
        // A backend that keeps answering but lost a burst of datagrams (its receive
        // buffer overflowed during a stall): the sweep finds the lost queries at once,
        // yet answers to later queries came back in between. It stays up.
        let set = up_set(2);
        let snap = set.load();
        let rt = &snap.entries[0].runtime;
        let t0 = Instant::now();
        for _ in 0..11 {
            rt.on_forward();
        }
        rt.on_response(0, t0, t0 + std::time::Duration::from_millis(10));
        for _ in 0..10 {
            rt.on_timeout(t0);
        }
        snap.passive_round(3);
        assert_eq!(rt.health(), Health::Up);
        assert_eq!(rt.timeouts_total(), 10);
        assert_eq!(rt.outstanding(), 0);
    }

    /// `n` queries to `rt`, of which those with `lost(i)` time out (each right after
    /// an answer, so never a streak).
    fn traffic(rt: &BackendRuntime, n: usize, lost: impl Fn(usize) -> bool) {
        let t0 = Instant::now();
        let later = t0 + std::time::Duration::from_millis(10);
        for i in 0..n {
            rt.on_forward();
            if lost(i) {
                rt.on_timeout(t0);
            } else {
                rt.on_response(0, t0, later);
            }
        }
    }

    #[test]
    fn losing_most_of_a_window_takes_a_backend_down_though_some_are_answered() {
        let set = up_set(2);
        let snap = set.load();
        let (a, b) = (&snap.entries[0].runtime, &snap.entries[1].runtime);
        // 1 % lost: stays up.
        traffic(a, 100, |i| i == 99);
        traffic(b, 100, |_| false);
        snap.passive_round(3);
        assert_eq!(a.health(), Health::Up);
        // 3 of every 5 lost (never 3 in a row), but fewer queries than a window: no
        // verdict yet.
        let window = LOSS_WINDOW as usize;
        traffic(a, window - 5, |i| i % 5 < 3);
        snap.passive_round(3);
        assert_eq!(a.health(), Health::Up);
        // The window fills: down, the other stays up.
        traffic(a, 5, |i| i % 5 < 3);
        snap.passive_round(3);
        assert_eq!(a.health(), Health::Down);
        assert_eq!(b.health(), Health::Up);
        // Checks bring it back; the window it went down for is not judged again.
        a.record_pass(2);
        a.record_pass(2);
        snap.passive_round(3);
        assert_eq!(a.health(), Health::Up);
    }

    #[test]
    fn no_passive_rule_takes_down_the_last_usable_backend() {
        // Every backend loses most of its queries alike (an overload): they stay up,
        // since SERVFAIL for everyone would be worse.
        let set = up_set(2);
        let snap = set.load();
        for e in &snap.entries {
            traffic(&e.runtime, LOSS_WINDOW as usize, |i| {
                i % 2 == 0 || i % 3 == 0
            });
        }
        snap.passive_round(3);
        assert!(snap
            .entries
            .iter()
            .all(|e| e.runtime.health() == Health::Up));
        // Both silent: the same.
        for e in &snap.entries {
            silent(&e.runtime, 5);
        }
        snap.passive_round(3);
        assert!(snap
            .entries
            .iter()
            .all(|e| e.runtime.health() == Health::Up));
        // A single backend, silent or lossy, new or up: kept.
        for checked in [false, true] {
            let only = BackendSet::new(1, &[member("a", 1, 1)]).unwrap();
            let only = only.load();
            let rt = &only.entries[0].runtime;
            if checked {
                rt.record_pass(2);
            }
            silent(rt, 5);
            only.passive_round(3);
            traffic(rt, LOSS_WINDOW as usize, |i| i % 5 < 3);
            only.passive_round(3);
            assert_ne!(rt.health(), Health::Down);
        }
        // One other usable backend is enough, draining ones are not.
        let mut draining = member("d", 2, 1);
        draining.state = AdminState::Draining;
        let set = BackendSet::new(1, &[member("a", 1, 1), draining]).unwrap();
        let snap = set.load();
        silent(&snap.entries[0].runtime, 5);
        snap.passive_round(3);
        assert_eq!(snap.entries[0].runtime.health(), Health::Unknown);
    }

    #[test]
    fn answers_do_not_hide_failing_health_checks() {
        let rt = BackendRuntime::new("t", addr(1));
        rt.record_pass(2);
        for _ in 0..3 {
            rt.on_forward();
            let now = Instant::now();
            rt.on_response(5, now, now); // REFUSED, say
            rt.record_failure(3, "test");
        }
        assert_eq!(rt.health(), Health::Down);
    }

    #[test]
    fn health_is_carried_across_a_swap_by_address_when_the_name_changes() {
        let set = BackendSet::new(1, &[member("ns1-next", 1, 1), member("gone", 2, 1)]).unwrap();
        let next = set.load().entries[0].runtime.clone();
        next.record_pass(2);
        next.on_forward();
        set.load().entries[1].runtime.record_pass(2);
        for _ in 0..3 {
            set.load().entries[1].runtime.record_failure(3, "test");
        }
        // The rollout renames ns1-next to ns1; "fresh" takes the address of "gone".
        set.update(
            |_| Ok(vec![member("ns1", 1, 1), member("fresh", 2, 1)]),
            |_, _| Ok(()),
        )
        .unwrap();
        let snap = set.load();
        let ns1 = &snap.entries[0].runtime;
        assert!(!Arc::ptr_eq(ns1, &next), "a new name gets its own runtime");
        assert_eq!(ns1.name, "ns1");
        assert_eq!(ns1.health(), Health::Up);
        assert_eq!(ns1.queries_total(), 0, "counters start clean");
        assert_eq!(snap.entries[1].runtime.health(), Health::Down);
        // A new address starts unknown.
        set.update(|_| Ok(vec![member("ns1", 9, 1)]), |_, _| Ok(()))
            .unwrap();
        assert_eq!(set.load().entries[0].runtime.health(), Health::Unknown);
        assert!(
            set.load().any_usable(),
            "unknown is usable, as routing sees it"
        );
    }
}
