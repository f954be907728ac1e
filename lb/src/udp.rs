//! The UDP path. Each UDP worker is a plain thread (no async runtime) that sleeps in
//! its own epoll instance and owns one SO_REUSEPORT socket per listen address, one
//! upstream socket per address family, and an [`Inflight`] table that maps the 16-bit
//! ID it sent to a backend back to the client. All of it is thread-local: the hot path
//! takes no lock, allocates nothing, and parses only the header and question.
//!
//! A query: validate header, one `load()` of the backend set, pick, take a free ID,
//! rewrite the ID, send. An answer: look up the ID, check source address, question
//! (or opcode) against the slot, restore the client's ID, send from the listener the
//! query came in on, so the client sees the address it queried.
//!
//! Why no tokio here: at a fixed 20k qps each datagram arrives alone, so a proxy's
//! cost is its wake-ups. A tokio worker spent 19–21 µs of CPU per query; the bare
//! epoll loop below costs 1.1–1.2× what a C relay that does nothing else costs
//! (`bench/floor-relay.c`; see docs/benchmarks.md). The TCP workers are plain epoll
//! threads too (tcp.rs).

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use crate::backends::{BackendRuntime, Picker};
use crate::batch::{Poller, RecvBatch, SendBatch};
use crate::cache::{self, Cache, Epoch, Key, Probe, Transport};
use crate::control::{Control, DRAIN, HARD_STOP};
use crate::edge::{RateLimiter, Verdict};
use crate::packet::{self, Drop, QuestionKey};
use crate::shared::{Shared, Tunables, WORKER_TICK};

/// Number of IDs towards backends per upstream socket.
const IDS: usize = 1 << 16;

struct Slot {
    live: bool,
    /// The ID this query carries towards the backend.
    wire_id: u16,
    client_id: u16,
    listener: u16,
    client: SocketAddr,
    key: QuestionKey,
    sent: Instant,
    deadline: Instant,
    backend: Option<Arc<BackendRuntime>>,
    /// Its cache key (bytes in [`Inflight::keys`]) and the epoch it was forwarded
    /// in, when its answer may be cached.
    cache: Option<(Epoch, Key)>,
}

/// Where a query came from and what its answer must match.
#[derive(Clone, Copy)]
struct Origin<'a> {
    client: SocketAddr,
    client_id: u16,
    listener: u16,
    key: QuestionKey,
    /// The cache key, with its bytes, when the answer may be cached.
    cache: Option<(Epoch, Key, &'a [u8])>,
}

/// A query that is finished (answered, expired or given up).
pub(crate) struct Done {
    client: SocketAddr,
    client_id: u16,
    listener: u16,
    sent: Instant,
    backend: Arc<BackendRuntime>,
    /// Its slot (whose key bytes stay until the next query takes it).
    slot: u32,
    cache: Option<(Epoch, Key)>,
}

/// In-flight queries of one worker. Wire IDs (towards backends) come from a shuffled
/// queue of all 65536, so they are not predictable; each maps to a slot in a dense
/// table that only grows to the peak number in flight, so memory follows the load
/// (a few hundred KiB at rest) and the timeout sweep scans only that many slots.
pub(crate) struct Inflight {
    /// Wire ID -> slot index + 1 (0: not in flight).
    by_id: Box<[u32]>,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    free_ids: VecDeque<u16>,
    live: usize,
    /// The cache key bytes of each slot's query (buffers reused with the slot).
    keys: Vec<Vec<u8>>,
}

impl Inflight {
    pub(crate) fn new() -> Self {
        let mut ids: Vec<u16> = (0..=u16::MAX).collect();
        fastrand::shuffle(&mut ids);
        Inflight {
            by_id: vec![0u32; IDS].into_boxed_slice(),
            slots: Vec::new(),
            free_slots: Vec::new(),
            free_ids: ids.into(),
            live: 0,
            keys: Vec::new(),
        }
    }

    /// Queries in flight.
    pub(crate) fn live(&self) -> usize {
        self.live
    }

    fn insert(
        &mut self,
        now: Instant,
        timeout_ms: u64,
        from: Origin<'_>,
        backend: &Arc<BackendRuntime>,
    ) -> Option<u16> {
        let wire_id = self.free_ids.pop_front()?;
        let slot = Slot {
            live: true,
            wire_id,
            client_id: from.client_id,
            listener: from.listener,
            client: from.client,
            key: from.key,
            sent: now,
            deadline: now + std::time::Duration::from_millis(timeout_ms),
            backend: Some(backend.clone()),
            cache: from.cache.map(|(epoch, key, _)| (epoch, key)),
        };
        let index = match self.free_slots.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                self.keys.push(Vec::new());
                (self.slots.len() - 1) as u32
            }
        };
        if let Some((_, _, bytes)) = from.cache {
            let k = &mut self.keys[index as usize];
            k.clear();
            k.extend_from_slice(bytes);
        }
        self.by_id[usize::from(wire_id)] = index + 1;
        self.live += 1;
        Some(wire_id)
    }

    fn release_slot(&mut self, index: u32) -> Done {
        let slot = &mut self.slots[index as usize];
        slot.live = false;
        self.by_id[usize::from(slot.wire_id)] = 0;
        self.free_ids.push_back(slot.wire_id);
        self.free_slots.push(index);
        self.live -= 1;
        Done {
            client: slot.client,
            client_id: slot.client_id,
            listener: slot.listener,
            sent: slot.sent,
            backend: slot.backend.take().expect("live slot has a backend"),
            slot: index,
            cache: slot.cache,
        }
    }

    /// The cache key bytes of a finished query (see [`Done::slot`]).
    fn key_bytes(&self, slot: u32) -> &[u8] {
        &self.keys[slot as usize]
    }

    /// Frees the slot of a query that never left (its wire ID is `id`).
    fn release(&mut self, id: u16) -> Done {
        let index = self.by_id[usize::from(id)];
        assert!(index != 0, "release of an ID not in flight");
        self.release_slot(index - 1)
    }

    /// Validates a backend response against its slot and frees the slot on success.
    fn answer(&mut self, msg: &[u8], from: SocketAddr) -> Result<Done, Drop> {
        if msg.len() < packet::HEADER_LEN {
            return Err(Drop::Short);
        }
        let index = self.by_id[usize::from(packet::id(msg))];
        if index == 0 {
            return Err(Drop::UnknownId);
        }
        let slot = &self.slots[index as usize - 1];
        // Left in place on a mismatch: the genuine answer may still arrive.
        match &slot.backend {
            Some(b) if b.address == from => {}
            _ => return Err(Drop::WrongSource),
        }
        packet::response_matches(msg, &slot.key)?;
        Ok(self.release_slot(index - 1))
    }

    /// Frees every slot whose deadline has passed, handing each to `f`.
    fn expire(&mut self, now: Instant, mut f: impl FnMut(Done)) {
        if self.live == 0 {
            return;
        }
        for i in 0..self.slots.len() {
            if self.slots[i].live && self.slots[i].deadline <= now {
                f(self.release_slot(i as u32));
            }
        }
    }

    /// Frees every slot (hard stop), handing each to `f`.
    pub(crate) fn clear(&mut self, mut f: impl FnMut(Done)) {
        for i in 0..self.slots.len() {
            if self.slots[i].live {
                f(self.release_slot(i as u32));
            }
        }
    }
}

/// Poller tokens: listeners are `0..n`.
const TOKEN_UP4: u64 = 1 << 32;
const TOKEN_UP6: u64 = (1 << 32) + 1;
const TOKEN_CONTROL: u64 = (1 << 32) + 2;

/// One UDP worker: everything its thread owns.
pub(crate) struct UdpWorker {
    shared: Arc<Shared>,
    listeners: Vec<std::net::UdpSocket>,
    up4: std::net::UdpSocket,
    up6: Option<std::net::UdpSocket>,
    table: Inflight,
    picker: Picker,
    tunables: Arc<Tunables>,
    queries: RecvBatch,
    answers: RecvBatch,
    send: SendBatch,
    /// Outgoing datagrams of the batch being handled: upstream v4, v6, replies.
    out: [Vec<Out>; 3],
    /// This worker's response rate limiter (see `edge` for why per worker).
    limiter: RateLimiter,
    /// Counts of the batch being handled, added to the shared counters once per batch.
    edge: EdgeCounts,
    /// This worker's packet cache (`None`: off), and room to build a key.
    cache: Option<Cache>,
    key_buf: Vec<u8>,
}

/// Edge-protection counts of one batch: under a flood nearly every datagram is one
/// of these, so they are added to the shared counters once per batch, not per query.
#[derive(Default)]
struct EdgeCounts {
    acl: u64,
    limited_drop: u64,
    limited_slip: u64,
}

impl UdpWorker {
    pub(crate) fn new(
        shared: Arc<Shared>,
        listeners: Vec<std::net::UdpSocket>,
        buffer: usize,
    ) -> io::Result<Self> {
        let up4 = upstream_socket(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), buffer)?;
        let up6 = match upstream_socket(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)), buffer) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!("no IPv6 upstream socket: {e}");
                None
            }
        };
        for l in &listeners {
            l.set_nonblocking(true)?;
        }
        let tunables = shared.tunables.load_full();
        let limiter = RateLimiter::new(tunables.rate_limit.as_ref(), shared.udp_workers);
        let cache = shared
            .cache
            .enabled()
            .then(|| Cache::new(shared.cache.udp_entries, shared.cache.max_ttl));
        Ok(UdpWorker {
            cache,
            key_buf: Vec::new(),
            limiter,
            edge: EdgeCounts::default(),
            shared,
            listeners,
            up4,
            up6,
            table: Inflight::new(),
            picker: Picker::default(),
            tunables,
            queries: RecvBatch::new(RECV_BATCH, QUERY_BUFFER),
            // Answers can be as large as a backend's EDNS buffer allows: room for the largest.
            answers: RecvBatch::new(ANSWER_BATCH, packet::MAX_MESSAGE + 1),
            send: SendBatch::new(RECV_BATCH),
            out: std::array::from_fn(|_| Vec::with_capacity(RECV_BATCH)),
        })
    }

    /// Serves until `control` says stop and the drain is over. An error means the
    /// worker can no longer serve (its sockets failed). Either way, queries still in
    /// flight are given up without charging their backends.
    pub(crate) fn run(mut self, control: &Control) -> io::Result<()> {
        let result = self.serve(control);
        self.table.clear(|d| d.backend.on_abandon());
        result
    }

    fn serve(&mut self, control: &Control) -> io::Result<()> {
        let mut poller = Poller::new()?;
        for (i, l) in self.listeners.iter().enumerate() {
            poller.add(l.as_fd(), i as u64)?;
        }
        poller.add(self.up4.as_fd(), TOKEN_UP4)?;
        if let Some(up6) = &self.up6 {
            poller.add(up6.as_fd(), TOKEN_UP6)?;
        }
        poller.add(control.fd(), TOKEN_CONTROL)?;
        let mut ready = Vec::new();
        let mut next_tick = Instant::now() + WORKER_TICK;
        let mut draining = false;
        let mut errors = 0u32;
        loop {
            let state = control.state();
            if state == HARD_STOP || (draining && self.table.live() == 0) {
                break;
            }
            if state == DRAIN && !draining {
                draining = true;
                for l in &self.listeners {
                    poller.remove(l.as_fd())?;
                }
                continue;
            }
            let now = Instant::now();
            if now >= next_tick {
                self.tick(now);
                next_tick = now + WORKER_TICK;
            }
            poller.wait(&mut ready, next_tick.saturating_duration_since(now))?;
            // Before anything that woke it: a query read after a reload returned is
            // handled with the reloaded tunables.
            if self.shared.refresh_tunables(&mut self.tunables) {
                self.limiter.configure(self.tunables.rate_limit.as_ref());
            }
            // Answers first: they finish queries already in flight, and after a stall
            // they would otherwise queue behind the new queries of the same wake-up.
            ready.sort_unstable_by_key(|&t| !matches!(t, TOKEN_UP4 | TOKEN_UP6));
            let now = Instant::now();
            for &token in &ready {
                let r = match token {
                    TOKEN_CONTROL => {
                        control.clear();
                        Ok(())
                    }
                    TOKEN_UP4 | TOKEN_UP6 => self.answers_ready(token == TOKEN_UP6, now),
                    i => self.queries_ready(i as usize, now),
                };
                match r {
                    Ok(()) => errors = 0,
                    Err(e) => {
                        errors += 1;
                        self.shared.metrics.drop_udp(Drop::ReceiveFailed);
                        tracing::debug!("udp receive error (transient): {e}");
                        if errors > 1000 {
                            return Err(e);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Adds the batch's edge-protection counts to the shared counters.
    fn count_edge(&mut self) {
        let e = std::mem::take(&mut self.edge);
        let m = &self.shared.metrics;
        if e.acl > 0 {
            m.drop_udp_n(Drop::Acl, e.acl);
        }
        if e.limited_drop > 0 {
            m.rate_limited_drop.increment(e.limited_drop);
        }
        if e.limited_slip > 0 {
            m.rate_limited_slip.increment(e.limited_slip);
        }
        let evicted = self.limiter.take_evicted();
        if evicted > 0 {
            m.rate_limit_evicted.increment(evicted);
        }
        if let Some(c) = &mut self.cache {
            c.report(m, Transport::Udp);
        }
    }

    /// Frees timed-out slots, charging their backends.
    fn tick(&mut self, now: Instant) {
        self.table
            .expire(now, |done| done.backend.on_timeout(done.sent));
    }

    /// Drains listener `index` in batches: a short batch means the queue is empty.
    /// Stops after a few full batches so answers are not starved (the poller is
    /// level-triggered and comes back at once).
    fn queries_ready(&mut self, index: usize, now: Instant) -> io::Result<()> {
        let listener = index as u16;
        for _ in 0..ROUNDS {
            let n = self.queries.recv(self.listeners[index].as_fd())?;
            if n == 0 {
                break;
            }
            self.shared.metrics.queries_udp.increment(n as u64);
            for o in &mut self.out {
                o.clear();
            }
            for i in 0..n {
                let (room, len, from, cut) = self.queries.get_room(i);
                if cut {
                    self.shared.metrics.drop_udp(Drop::Oversized);
                    continue;
                }
                let Some(from) = from else {
                    continue;
                };
                match on_query(
                    &self.shared,
                    &self.tunables,
                    &mut self.picker,
                    &mut self.table,
                    (&mut self.limiter, &mut self.edge),
                    (&mut self.cache, &mut self.key_buf),
                    self.up6.is_some(),
                    listener,
                    (room, len),
                    from,
                    now,
                ) {
                    Action::Forward { to, id } => self.out[usize::from(to.is_ipv6())].push(Out {
                        index: i,
                        to,
                        via: id,
                        len,
                    }),
                    Action::Reply(len) => self.out[2].push(Out {
                        index: i,
                        to: from,
                        via: listener,
                        len,
                    }),
                    Action::None => {}
                }
            }
            self.count_edge();
            for v6 in [false, true] {
                let outs = &self.out[usize::from(v6)];
                if outs.is_empty() {
                    continue;
                }
                let Some(fd) = (if v6 {
                    self.up6.as_ref()
                } else {
                    Some(&self.up4)
                })
                .map(|s| s.as_fd()) else {
                    continue;
                };
                let (batch, table, shared) = (&self.queries, &mut self.table, &self.shared);
                self.send.send(
                    fd,
                    outs.len(),
                    |k| (outs[k].to, batch.bytes(outs[k].index, outs[k].len)),
                    |k| {
                        // Never left: free the slot without charging the backend.
                        table.release(outs[k].via).backend.on_abandon();
                        shared.metrics.drop_udp(Drop::SendFailed);
                    },
                );
            }
            let back = &self.out[2];
            if !back.is_empty() {
                let (batch, shared) = (&self.queries, &self.shared);
                self.send.send(
                    self.listeners[index].as_fd(),
                    back.len(),
                    |k| (back[k].to, batch.bytes(back[k].index, back[k].len)),
                    |_| shared.metrics.drop_udp(Drop::SendFailed),
                );
            }
            if n < self.queries.capacity() {
                break;
            }
        }
        Ok(())
    }

    /// Drains an upstream socket: answers go to their clients in batches, one
    /// `sendmmsg` per listener, up to as many answers per readiness as a listener
    /// takes queries ([`ANSWER_ROUNDS`]).
    fn answers_ready(&mut self, v6: bool, now: Instant) -> io::Result<()> {
        let Some(fd) = (if v6 {
            self.up6.as_ref()
        } else {
            Some(&self.up4)
        })
        .map(|s| s.as_fd()) else {
            return Ok(());
        };
        for _ in 0..ANSWER_ROUNDS {
            let n = self.answers.recv(fd)?;
            if n == 0 {
                break;
            }
            let replies = &mut self.out[2];
            replies.clear();
            for i in 0..n {
                let Some((bytes, from)) = datagram(&self.shared, &mut self.answers, i) else {
                    continue;
                };
                if let Some((listener, client)) = on_answer(
                    &self.shared,
                    &mut self.table,
                    &mut self.cache,
                    bytes,
                    from,
                    now,
                ) {
                    replies.push(Out {
                        index: i,
                        to: client,
                        via: listener,
                        len: bytes.len(),
                    });
                }
            }
            // Counted before the answers leave: a client that sees one sees it counted.
            if let Some(c) = &mut self.cache {
                c.report(&self.shared.metrics, Transport::Udp);
            }
            // Usually every answer leaves from the same listener: one call for all.
            let mut rest = &mut replies[..];
            while let Some(first) = rest.first().map(|o| o.via) {
                let split = partition(rest, |o| o.via == first);
                let (group, tail) = rest.split_at_mut(split);
                let (batch, shared) = (&self.answers, &self.shared);
                let fd = self.listeners[usize::from(first)].as_fd();
                self.send.send(
                    fd,
                    group.len(),
                    |k| (group[k].to, batch.bytes(group[k].index, group[k].len)),
                    |_| shared.metrics.drop_udp(Drop::SendFailed),
                );
                rest = tail;
            }
            if n < self.answers.capacity() {
                break;
            }
        }
        Ok(())
    }
}

fn upstream_socket(addr: SocketAddr, buffer: usize) -> io::Result<std::net::UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    crate::sockets::set_buffers(&s, buffer);
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Datagrams taken per `recvmmsg`.
const RECV_BATCH: usize = 32;
/// Largest query accepted from a client (larger ones are cut, counted, dropped).
const QUERY_BUFFER: usize = 4096;
/// Batches handled per readiness before looking at the other sockets.
const ROUNDS: usize = 4;
/// Answers taken per `recvmmsg` (their buffers are 64 KiB each).
const ANSWER_BATCH: usize = RECV_BATCH / 2;
/// Answer batches per readiness: as many answers as a listener's rounds take queries,
/// so that after a stall answers drain as fast as the queries that caused them. (With
/// `ROUNDS` here, a capture showed dnslb holding answers longer than queries at p99:
/// 9.4-18.4 against 5.6-17.6 ms over five rounds; docs/benchmarks.md.)
const ANSWER_ROUNDS: usize = ROUNDS * RECV_BATCH / ANSWER_BATCH;

/// What to do with one datagram of a batch once it has been looked at.
#[derive(Clone, Copy)]
struct Out {
    /// Index in the receive batch (bytes rewritten in place).
    index: usize,
    /// Where it goes.
    to: SocketAddr,
    /// Listener it leaves from (client answers), or the upstream ID (queries).
    via: u16,
    /// The length to send (SERVFAILs are shorter than the query).
    len: usize,
}

/// Datagram `i` of a batch with its source, or `None` (counted) if it was cut to fit.
fn datagram<'a>(
    shared: &Shared,
    batch: &'a mut RecvBatch,
    i: usize,
) -> Option<(&'a mut [u8], SocketAddr)> {
    let (bytes, from, cut) = batch.get(i);
    if cut {
        shared.metrics.drop_udp(Drop::Oversized);
        return None;
    }
    Some((bytes, from?))
}

/// Moves the elements matching `pred` to the front; returns how many there are.
fn partition<T>(v: &mut [T], pred: impl Fn(&T) -> bool) -> usize {
    let mut k = 0;
    for i in 0..v.len() {
        if pred(&v[i]) {
            v.swap(i, k);
            k += 1;
        }
    }
    k
}

/// What a query turned into.
enum Action {
    /// Send it upstream to `to` (its ID is now `id`).
    Forward { to: SocketAddr, id: u16 },
    /// Send the first `len` bytes back to the client (a SERVFAIL made in place).
    Reply(usize),
    /// Dropped (counted).
    None,
}

/// `now` is read once per batch: the datagrams of a batch arrived together.
#[allow(clippy::too_many_arguments)]
fn on_query(
    shared: &Shared,
    tun: &Tunables,
    picker: &mut Picker,
    table: &mut Inflight,
    (limiter, counts): (&mut RateLimiter, &mut EdgeCounts),
    (cache, key_buf): (&mut Option<Cache>, &mut Vec<u8>),
    have_v6: bool,
    listener: u16,
    (room, len): (&mut [u8], usize),
    client: SocketAddr,
    now: Instant,
) -> Action {
    let m = &shared.metrics;
    let msg = &mut room[..len];
    if !tun.acl.allows(client.ip()) {
        counts.acl += 1;
        return Action::None;
    }
    let q = match packet::parse_query(msg) {
        Ok(q) => q,
        Err(d) => {
            m.drop_udp(d);
            return Action::None;
        }
    };
    // Limited before it is forwarded: its answer would not be sent (see `edge`).
    match limiter.check(client.ip(), now) {
        Verdict::Pass => {}
        // A slipped answer echoes the question: one that did not parse gets none.
        Verdict::Slip if q.question_end.is_some() => {
            counts.limited_slip += 1;
            return Action::Reply(packet::truncated_in_place(msg, q.question_end));
        }
        Verdict::Drop | Verdict::Slip => {
            counts.limited_drop += 1;
            return Action::None;
        }
    }
    let snap = shared.set.load();
    let mut cached = None;
    if let Some(cache) = cache {
        let epoch = shared.cache_epoch(snap.generation);
        match cache.probe(msg, &q, Transport::Udp, key_buf, epoch, now) {
            Probe::Hit(answer, name_end) => {
                return Action::Reply(cache::answer_in_place(room, answer, name_end));
            }
            Probe::Miss(epoch, key) => cached = Some((epoch, key, &key_buf[..])),
            Probe::Never => {}
        }
    }
    let Some(backend) = snap.pick(tun.policy, picker).map(|e| &e.runtime) else {
        m.no_backend_udp.increment(1);
        return Action::Reply(packet::servfail_in_place(msg, q.question_end));
    };
    if backend.address.is_ipv6() && !have_v6 {
        m.drop_udp(Drop::SendFailed);
        return Action::None;
    }
    let origin = Origin {
        client,
        client_id: q.id,
        listener,
        key: q.key,
        cache: cached,
    };
    let Some(id) = table.insert(now, tun.query_timeout_ms, origin, backend) else {
        m.drop_udp(Drop::IdsExhausted);
        return Action::Reply(packet::servfail_in_place(msg, q.question_end));
    };
    packet::set_id(msg, id);
    backend.on_forward();
    Action::Forward {
        to: backend.address,
        id,
    }
}

/// Validates an answer and restores the client's ID in place; returns the listener and
/// client it goes to.
fn on_answer(
    shared: &Shared,
    table: &mut Inflight,
    cache: &mut Option<Cache>,
    msg: &mut [u8],
    from: SocketAddr,
    now: Instant,
) -> Option<(u16, SocketAddr)> {
    let done = match table.answer(msg, from) {
        Ok(d) => d,
        Err(d) => {
            shared.metrics.drop_udp(d);
            return None;
        }
    };
    if let (Some(cache), Some((epoch, key))) = (cache, done.cache) {
        // A hit is written over the query's buffer: no larger than that.
        cache.store(
            epoch,
            &key,
            table.key_bytes(done.slot),
            msg,
            QUERY_BUFFER,
            now,
        );
    }
    packet::set_id(msg, done.client_id);
    done.backend.on_response(packet::rcode(msg), done.sent, now);
    Some((done.listener, done.client))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(client: SocketAddr, client_id: u16, key: QuestionKey) -> Origin<'static> {
        Origin {
            client,
            client_id,
            listener: 0,
            key,
            cache: None,
        }
    }

    fn rt(port: u16) -> Arc<BackendRuntime> {
        Arc::new(BackendRuntime::new(
            "t",
            SocketAddr::from(([127, 0, 0, 1], port)),
        ))
    }

    #[test]
    fn ids_are_unique_until_released_and_exhaustion_is_reported() {
        let mut t = Inflight::new();
        let b = rt(1);
        let c = SocketAddr::from(([127, 0, 0, 1], 9));
        let now = Instant::now();
        let mut seen = std::collections::HashSet::new();
        for i in 0..IDS {
            let id = t
                .insert(now, 1000, origin(c, i as u16, QuestionKey::default()), &b)
                .unwrap();
            assert!(seen.insert(id));
        }
        assert!(t
            .insert(now, 1000, origin(c, 0, QuestionKey::default()), &b)
            .is_none());
        t.clear(|_| {});
        assert_eq!(t.live(), 0);
    }

    #[test]
    fn expiry_frees_only_overdue_unanswered_slots() {
        let mut t = Inflight::new();
        let b = rt(1);
        let c = SocketAddr::from(([127, 0, 0, 1], 9));
        let now = Instant::now();
        let key = QuestionKey {
            hash: Some(1),
            opcode: 0,
            had_question: true,
        };
        let a = t.insert(now, 100, origin(c, 1, key), &b).unwrap();
        let _b2 = t.insert(now, 100, origin(c, 2, key), &b).unwrap();
        t.release(a);
        assert_eq!(t.live(), 1);
        let mut expired = vec![];
        t.expire(now + std::time::Duration::from_millis(50), |d| {
            expired.push(d.client_id)
        });
        assert!(expired.is_empty());
        t.expire(now + std::time::Duration::from_millis(150), |d| {
            expired.push(d.client_id)
        });
        assert_eq!(expired, vec![2]);
        assert_eq!(t.live(), 0);
    }

    #[test]
    fn answers_must_come_from_the_backend_and_match() {
        let mut t = Inflight::new();
        let b = rt(53);
        let c = SocketAddr::from(([127, 0, 0, 1], 9));
        let mut msg = vec![0u8; 12];
        msg[2] = 0x80; // QR, empty question, opcode 0
        let id = t
            .insert(
                Instant::now(),
                1000,
                origin(
                    c,
                    7,
                    QuestionKey {
                        hash: None,
                        opcode: 0,
                        had_question: false,
                    },
                ),
                &b,
            )
            .unwrap();
        packet::set_id(&mut msg, id);
        let wrong = SocketAddr::from(([127, 0, 0, 2], 53));
        assert_eq!(t.answer(&msg, wrong).err(), Some(Drop::WrongSource));
        let done = t.answer(&msg, b.address).unwrap();
        assert_eq!(done.client_id, 7);
        assert_eq!(t.answer(&msg, b.address).err(), Some(Drop::UnknownId));
    }
}
