//! The backend set: one immutable [`Snapshot`] behind one `ArcSwap`, replaced whole by
//! serialized writers; and backend selection, which the hot path runs on a single
//! `load()` of that snapshot.
//!
//! What changes per query (queries in flight, health) lives in a [`BackendRuntime`]
//! shared by reference: a new snapshot carries the runtime of a backend over by name
//! (and address), so health, counters and in-flight accounting survive swaps, and a
//! query in flight keeps its backend's runtime alive after the backend left the set.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::config::{BackendConfig, Policy};
use crate::metrics;

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
    /// No check has completed yet: the backend is used.
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
    /// Consecutive query timeouts (the passive signal); any answer resets it.
    timeouts_in_a_row: AtomicU32,
    /// When this runtime was made: the origin of `last_answer_ms`.
    born: Instant,
    /// Milliseconds from `born` to the latest answer, plus one (0: none yet).
    last_answer_ms: AtomicU64,
    outstanding: AtomicU64,
    queries: AtomicU64,
    /// Answers received (any RCODE).
    answers: AtomicU64,
    timeouts: AtomicU64,
    /// `(answers, timeouts)` when the health loop last looked (see `lost_most`).
    last_round: Mutex<(u64, u64)>,
    /// Metric handles.
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
        let m = metrics::Backend::new(name);
        m.up.set(1.0);
        BackendRuntime {
            name: name.to_string(),
            address,
            health: AtomicU8::new(Health::Unknown as u8),
            passes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            timeouts_in_a_row: AtomicU32::new(0),
            born: Instant::now(),
            last_answer_ms: AtomicU64::new(0),
            outstanding: AtomicU64::new(0),
            queries: AtomicU64::new(0),
            answers: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            last_round: Mutex::new((0, 0)),
            metrics: m,
        }
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

    /// Copies the counters the hot path keeps as plain atomics (queries, in flight)
    /// into their metric handles; run before `/metrics` is rendered, so the data
    /// plane does not touch the metrics registry for them per query.
    pub fn sync_metrics(&self) {
        self.metrics.queries.absolute(self.queries_total());
        self.metrics.outstanding.set(self.outstanding() as f64);
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
        self.metrics.response(rcode);
        self.metrics
            .latency
            .record(now.saturating_duration_since(sent).as_secs_f64());
        // Passive signal: an answer ends a streak of timeouts (and only that: failed
        // health checks keep counting). Read first so the common case does not write
        // a shared cache line: the time of the latest answer is written at most once a
        // millisecond.
        if self.timeouts_in_a_row.load(Ordering::Relaxed) != 0 {
            self.timeouts_in_a_row.store(0, Ordering::Relaxed);
        }
        let ms = self.ms(now);
        if self.last_answer_ms.load(Ordering::Relaxed) < ms {
            self.last_answer_ms.fetch_max(ms, Ordering::Relaxed);
        }
    }

    /// A query sent at `sent` was given up (timeout, or the connection carrying it
    /// died). Counts as a passive health failure unless the backend has answered since
    /// `sent`: a datagram lost now and then (a backend's full receive buffer during a
    /// stall) says nothing about a backend that keeps answering, and the timeout sweep
    /// would otherwise find such losses "in a row" however many answers came between
    /// them. `fall` timeouts in a row with no answer since mark the backend down.
    pub fn on_timeout(&self, sent: Instant, fall: u32) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.timeouts.fetch_add(1, Ordering::Relaxed);
        self.metrics.timeouts.increment(1);
        if self.last_answer_ms.load(Ordering::Relaxed) > self.ms(sent) {
            return;
        }
        self.passes.store(0, Ordering::Relaxed);
        let n = self.timeouts_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= fall && self.health() != Health::Down {
            self.set_health(Health::Down, &format!("{n} query timeouts in a row"));
        }
    }

    /// The passive signal's second rule (see [`Snapshot::loss_round`]): whether, since
    /// the last call, at least `fall` queries timed out and they are more than half of
    /// the queries whose fate was decided (answered or timed out). Returns why, if so
    /// and the backend is not down already.
    fn lost_most(&self, fall: u32) -> Option<String> {
        let (answers, timeouts) = (
            self.answers.load(Ordering::Relaxed),
            self.timeouts.load(Ordering::Relaxed),
        );
        let (answered, timed_out) = {
            let mut last = self.last_round.lock().unwrap_or_else(|e| e.into_inner());
            let d = (answers - last.0, timeouts - last.1);
            *last = (answers, timeouts);
            d
        };
        (timed_out >= u64::from(fall) && timed_out > answered && self.health() != Health::Down)
            .then(|| {
                format!(
                    "{timed_out} of {} queries timed out since the last check",
                    timed_out + answered
                )
            })
    }

    /// A query was abandoned without charging the backend (it was never sent).
    pub fn on_abandon(&self) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
    }

    /// A health check passed. The first completed check decides at once; after that,
    /// `rise` passes in a row bring a down backend up.
    pub fn record_pass(&self, rise: u32) {
        self.failures.store(0, Ordering::Relaxed);
        self.timeouts_in_a_row.store(0, Ordering::Relaxed);
        let passes = self.passes.fetch_add(1, Ordering::Relaxed) + 1;
        let target = match self.health() {
            Health::Unknown => true,
            Health::Down => passes >= rise,
            Health::Up => false,
        };
        if target {
            self.set_health(Health::Up, "health check passed");
        }
    }

    /// A health check failed. The first completed check decides at once; after that
    /// `fall` failed checks in a row take an up backend down.
    pub fn record_failure(&self, fall: u32, why: &str) {
        self.passes.store(0, Ordering::Relaxed);
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let down = match self.health() {
            Health::Unknown => true,
            Health::Up => failures >= fall,
            Health::Down => false,
        };
        if down {
            self.set_health(Health::Down, why);
        }
    }

    /// Sets health; logs and updates the gauge only on an actual change, once.
    pub fn set_health(&self, to: Health, why: &str) {
        let from = self.health.swap(to as u8, Ordering::AcqRel);
        if from != to as u8 {
            self.metrics
                .up
                .set(if to == Health::Down { 0.0 } else { 1.0 });
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
    /// The passive signal's second rule, run by the health loop once per round. A
    /// backend that loses most of its queries while answering some never builds a
    /// streak of timeouts (each answer ends it), so: a backend that lost at least
    /// `fall` queries since the last round, and more than half of those decided, goes
    /// down. One that loses a burst now and then (a stall) is not affected. Unless no
    /// usable backend would be left: when every backend loses most of its queries
    /// alike (an overload), SERVFAIL for every client would be worse than the answers
    /// that still get through, so they stay up and this is logged.
    pub fn loss_round(&self, fall: u32) {
        // One verdict per entry, in entry order.
        let lossy: Vec<Option<String>> = self
            .entries
            .iter()
            .map(|e| e.runtime.lost_most(fall))
            .collect();
        let others_usable = self
            .entries
            .iter()
            .zip(&lossy)
            .any(|(e, why)| why.is_none() && e.usable());
        for (e, why) in self.entries.iter().zip(lossy) {
            let Some(why) = why else { continue };
            let rt = &e.runtime;
            if others_usable {
                rt.passes.store(0, Ordering::Relaxed);
                rt.set_health(Health::Down, &why);
            } else {
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

    /// True when at least one active backend is up (what /healthz reports).
    pub fn any_active_up(&self) -> bool {
        self.entries
            .iter()
            .any(|e| e.state == AdminState::Active && e.runtime.health() == Health::Up)
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
/// address.
fn build(generation: u64, members: &[Member], prev: &Snapshot) -> Snapshot {
    let entries = members
        .iter()
        .map(|m| {
            let runtime = prev
                .get(&m.spec.name)
                .filter(|e| e.spec.address == m.spec.address)
                .map(|e| e.runtime.clone())
                .unwrap_or_else(|| Arc::new(BackendRuntime::new(&m.spec.name, m.spec.address)));
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

    #[test]
    fn passive_timeouts_take_a_backend_down_after_fall() {
        let rt = BackendRuntime::new("t", SocketAddr::from(([127, 0, 0, 1], 1)));
        rt.record_pass(2);
        assert_eq!(rt.health(), Health::Up);
        // It answered once, then went silent: three queries sent after that answer
        // time out.
        let t0 = Instant::now();
        rt.on_forward();
        rt.on_response(0, t0, t0);
        let later = t0 + std::time::Duration::from_millis(5);
        for _ in 0..3 {
            rt.on_forward();
        }
        rt.on_timeout(later, 3);
        rt.on_timeout(later, 3);
        assert_eq!(rt.health(), Health::Up);
        rt.on_timeout(later, 3);
        assert_eq!(rt.health(), Health::Down);
        assert_eq!(rt.timeouts_total(), 3);
        rt.record_pass(2);
        assert_eq!(rt.health(), Health::Down);
        rt.record_pass(2);
        assert_eq!(rt.health(), Health::Up);
    }

    #[test]
    fn timeouts_of_queries_sent_before_an_answer_are_not_a_streak() {
        // A backend that keeps answering but lost a burst of datagrams (its receive
        // buffer overflowed during a stall): the sweep finds the lost queries at once,
        // yet answers to later queries came back in between. It stays up.
        let rt = BackendRuntime::new("t", SocketAddr::from(([127, 0, 0, 1], 1)));
        rt.record_pass(2);
        let t0 = Instant::now();
        for _ in 0..11 {
            rt.on_forward();
        }
        rt.on_response(0, t0, t0 + std::time::Duration::from_millis(10));
        for _ in 0..10 {
            rt.on_timeout(t0, 3);
        }
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
                rt.on_timeout(t0, 3);
            } else {
                rt.on_response(0, t0, later);
            }
        }
    }

    #[test]
    fn losing_most_queries_takes_a_backend_down_though_some_are_answered() {
        let set = BackendSet::new(1, &[member("a", 1, 1), member("b", 2, 1)]).unwrap();
        let snap = set.load();
        let (a, b) = (&snap.entries[0].runtime, &snap.entries[1].runtime);
        a.record_pass(2);
        b.record_pass(2);
        // 1 % lost: stays up.
        traffic(a, 100, |i| i == 99);
        traffic(b, 100, |_| false);
        snap.loss_round(3);
        assert_eq!(a.health(), Health::Up);
        // 3 of 5 lost (never 3 in a row): down, the other stays up.
        traffic(a, 5, |i| i % 2 == 0);
        traffic(b, 5, |_| false);
        assert_eq!(a.health(), Health::Up);
        snap.loss_round(3);
        assert_eq!(a.health(), Health::Down);
        assert_eq!(b.health(), Health::Up);
        // Only what happened since the last round counts: a quiet round changes
        // nothing, and checks bring it back.
        snap.loss_round(3);
        a.record_pass(2);
        a.record_pass(2);
        snap.loss_round(3);
        assert_eq!(a.health(), Health::Up);
    }

    #[test]
    fn the_loss_rule_never_takes_down_the_last_usable_backend() {
        // Every backend loses most of its queries alike (an overload): they stay up,
        // since SERVFAIL for everyone would be worse.
        let set = BackendSet::new(1, &[member("a", 1, 1), member("b", 2, 1)]).unwrap();
        let snap = set.load();
        for e in &snap.entries {
            e.runtime.record_pass(2);
            traffic(&e.runtime, 5, |i| i % 2 == 0);
        }
        snap.loss_round(3);
        assert!(snap
            .entries
            .iter()
            .all(|e| e.runtime.health() == Health::Up));
        // One of them alone: the same.
        let only = BackendSet::new(1, &[member("a", 1, 1)]).unwrap();
        let only = only.load();
        only.entries[0].runtime.record_pass(2);
        traffic(&only.entries[0].runtime, 5, |i| i % 2 == 0);
        only.loss_round(3);
        assert_eq!(only.entries[0].runtime.health(), Health::Up);
    }

    #[test]
    fn answers_do_not_hide_failing_health_checks() {
        let rt = BackendRuntime::new("t", SocketAddr::from(([127, 0, 0, 1], 1)));
        rt.record_pass(2);
        for _ in 0..3 {
            rt.on_forward();
            let now = Instant::now();
            rt.on_response(5, now, now); // REFUSED, say
            rt.record_failure(3, "test");
        }
        assert_eq!(rt.health(), Health::Down);
    }
}
