//! The UDP path. Each worker thread owns one SO_REUSEPORT socket per listen address,
//! one upstream socket per address family, and an [`Inflight`] table that maps the
//! 16-bit ID it sent to a backend back to the client. All of it is thread-local: the
//! hot path takes no lock, allocates nothing, and parses only the header and question.
//!
//! A query: validate header, one `load()` of the backend set, pick, take a free ID,
//! rewrite the ID, send. An answer: look up the ID, check source address, question
//! (or opcode) against the slot, restore the client's ID, send from the listener the
//! query came in on, so the client sees the address it queried.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use std::os::fd::AsRawFd;

use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

use crate::backends::BackendRuntime;
use crate::batch::{RecvBatch, SendBatch};
use crate::packet::{self, Drop, QuestionKey};
use crate::server::Worker;

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
}

/// Where a query came from and what its answer must match.
#[derive(Clone, Copy)]
struct Origin {
    client: SocketAddr,
    client_id: u16,
    listener: u16,
    key: QuestionKey,
}

/// A query forwarded and not yet answered.
pub(crate) struct Done {
    client: SocketAddr,
    client_id: u16,
    listener: u16,
    sent: Instant,
    backend: Arc<BackendRuntime>,
}

impl Done {
    /// Gives the query up at shutdown without charging the backend.
    pub(crate) fn abandon(self, _fall: u32) {
        self.backend.on_abandon();
    }
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
        from: Origin,
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
        };
        let index = match self.free_slots.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
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
        }
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

/// The UDP side of one worker. Sockets are registered for readability only: sends
/// never wait (a full socket buffer drops the datagram, counted), so no writable
/// events wake the worker.
pub(crate) struct Udp {
    pub(crate) listeners: Vec<Rc<AsyncFd<std::net::UdpSocket>>>,
    up4: Rc<AsyncFd<std::net::UdpSocket>>,
    up6: Option<Rc<AsyncFd<std::net::UdpSocket>>>,
    pub(crate) table: RefCell<Inflight>,
}

impl Udp {
    pub(crate) fn new(listeners: Vec<std::net::UdpSocket>, buffer: usize) -> io::Result<Self> {
        let up4 = upstream_socket(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), buffer)?;
        let up6 = match upstream_socket(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)), buffer) {
            Ok(s) => Some(Rc::new(s)),
            Err(e) => {
                tracing::debug!("no IPv6 upstream socket: {e}");
                None
            }
        };
        Ok(Udp {
            listeners: listeners
                .into_iter()
                .map(|s| readable(s).map(Rc::new))
                .collect::<io::Result<_>>()?,
            up4: Rc::new(up4),
            up6,
            table: RefCell::new(Inflight::new()),
        })
    }

    /// The upstream socket of an address family (IPv6 may be unavailable).
    fn upstream(&self, v6: bool) -> Option<&Rc<AsyncFd<std::net::UdpSocket>>> {
        if v6 {
            self.up6.as_ref()
        } else {
            Some(&self.up4)
        }
    }
}

fn readable(s: std::net::UdpSocket) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    s.set_nonblocking(true)?;
    crate::batch::register_readable(s)
}

fn upstream_socket(addr: SocketAddr, buffer: usize) -> io::Result<AsyncFd<std::net::UdpSocket>> {
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
    readable(s.into())
}

/// Datagrams taken per `recvmmsg`.
const RECV_BATCH: usize = 32;
/// Largest query accepted from a client (larger ones are cut, counted, dropped).
const QUERY_BUFFER: usize = 4096;
/// Batches handled per wake-up before yielding to the worker's other tasks.
const ROUNDS: usize = 4;

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

/// Receives queries on one listener until cancelled; forwards them in batches.
pub(crate) async fn serve_listener(
    w: Rc<Worker>,
    index: usize,
    cancel: CancellationToken,
) -> io::Result<()> {
    let sock = w.udp.listeners[index].clone();
    let listener = index as u16;
    let mut batch = RecvBatch::new(RECV_BATCH, QUERY_BUFFER);
    let mut send = SendBatch::new(RECV_BATCH);
    let (mut up4, mut up6, mut back) = (
        Vec::with_capacity(RECV_BATCH),
        Vec::new(),
        Vec::with_capacity(RECV_BATCH),
    );
    recv_loop(&sock, &cancel, &w, &mut batch, |batch, n| {
        w.shared.metrics.queries_udp.increment(n as u64);
        let now = Instant::now();
        up4.clear();
        up6.clear();
        back.clear();
        for i in 0..n {
            let Some((bytes, from)) = datagram(&w, batch, i) else {
                continue;
            };
            match on_query(&w, listener, bytes, from, now) {
                Action::Forward { to, id } => {
                    let out = Out {
                        index: i,
                        to,
                        via: id,
                        len: bytes.len(),
                    };
                    if to.is_ipv4() {
                        up4.push(out)
                    } else {
                        up6.push(out)
                    }
                }
                Action::Reply(len) => back.push(Out {
                    index: i,
                    to: from,
                    via: listener,
                    len,
                }),
                Action::None => {}
            }
        }
        for (outs, v6) in [(&up4, false), (&up6, true)] {
            if outs.is_empty() {
                continue;
            }
            let Some(up) = w.udp.upstream(v6) else {
                continue;
            };
            let sent = send.send(up.get_ref().as_raw_fd(), outs.len(), |k| {
                (outs[k].to, batch.bytes(outs[k].index, outs[k].len))
            });
            for o in &outs[sent..] {
                // Never left: free the slot without charging the backend.
                let done = w.udp.table.borrow_mut().release(o.via);
                done.backend.on_abandon();
                w.shared.metrics.drop_udp(Drop::SendFailed);
            }
        }
        if !back.is_empty() {
            let sent = send.send(sock.get_ref().as_raw_fd(), back.len(), |k| {
                (back[k].to, batch.bytes(back[k].index, back[k].len))
            });
            for _ in sent..back.len() {
                w.shared.metrics.drop_udp(Drop::SendFailed);
            }
        }
    })
    .await
}

/// Receives backend answers on one upstream socket until `stop` is cancelled; sends
/// them to their clients in batches, per listener.
pub(crate) async fn serve_upstream(
    w: Rc<Worker>,
    v6: bool,
    stop: CancellationToken,
) -> io::Result<()> {
    let sock = if v6 {
        match &w.udp.up6 {
            Some(s) => s.clone(),
            None => return Ok(()),
        }
    } else {
        w.udp.up4.clone()
    };
    // Answers can be as large as a backend's EDNS buffer allows: room for the largest.
    let mut batch = RecvBatch::new(RECV_BATCH / 2, packet::MAX_MESSAGE + 1);
    let mut send = SendBatch::new(RECV_BATCH);
    let mut replies: Vec<Out> = Vec::with_capacity(RECV_BATCH);
    recv_loop(&sock, &stop, &w, &mut batch, |batch, n| {
        replies.clear();
        let now = Instant::now();
        for i in 0..n {
            let Some((bytes, from)) = datagram(&w, batch, i) else {
                continue;
            };
            if let Some((listener, client)) = on_answer(&w, bytes, from, now) {
                replies.push(Out {
                    index: i,
                    to: client,
                    via: listener,
                    len: bytes.len(),
                });
            }
        }
        // Usually every answer leaves from the same listener: one call for all.
        let mut rest = &mut replies[..];
        while let Some(first) = rest.first().map(|o| o.via) {
            let split = partition(rest, |o| o.via == first);
            let (group, tail) = rest.split_at_mut(split);
            let fd = w.udp.listeners[usize::from(first)].get_ref().as_raw_fd();
            let sent = send.send(fd, group.len(), |k| {
                (group[k].to, batch.bytes(group[k].index, group[k].len))
            });
            for _ in sent..group.len() {
                w.shared.metrics.drop_udp(Drop::SendFailed);
            }
            rest = tail;
        }
    })
    .await
}

/// Datagram `i` of a batch with its source, or `None` (counted) if it was cut to fit.
fn datagram<'a>(
    w: &Worker,
    batch: &'a mut RecvBatch,
    i: usize,
) -> Option<(&'a mut [u8], SocketAddr)> {
    let (bytes, from, cut) = batch.get(i);
    if cut {
        w.shared.metrics.drop_udp(Drop::Oversized);
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

/// Drains a socket in batches: one `recvmmsg` takes everything waiting; a short batch
/// means the queue is empty, so readiness is cleared without the extra `recvfrom`
/// that would return EAGAIN. Transient errors are counted and skipped; a long run of
/// errors with no success ends the loop with the error.
async fn recv_loop(
    sock: &AsyncFd<std::net::UdpSocket>,
    cancel: &CancellationToken,
    w: &Worker,
    batch: &mut RecvBatch,
    mut on_batch: impl FnMut(&mut RecvBatch, usize),
) -> io::Result<()> {
    let fd = sock.get_ref().as_raw_fd();
    let mut errors = 0u32;
    loop {
        let mut guard = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            g = sock.readable() => g?,
        };
        let mut more = false;
        for _ in 0..ROUNDS {
            match batch.recv(fd) {
                Ok(0) => {
                    guard.clear_ready();
                    break;
                }
                Ok(n) => {
                    errors = 0;
                    on_batch(batch, n);
                    if n < batch.capacity() {
                        guard.clear_ready();
                        break;
                    }
                    more = true;
                }
                Err(e) => {
                    errors += 1;
                    w.shared.metrics.drop_udp(Drop::ReceiveFailed);
                    tracing::debug!("udp receive error (transient): {e}");
                    if errors > 1000 {
                        return Err(e);
                    }
                    break;
                }
            }
        }
        drop(guard);
        if more {
            tokio::task::yield_now().await;
        }
    }
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
fn on_query(w: &Worker, listener: u16, msg: &mut [u8], client: SocketAddr, now: Instant) -> Action {
    let m = &w.shared.metrics;
    let q = match packet::parse_query(msg) {
        Ok(q) => q,
        Err(d) => {
            m.drop_udp(d);
            return Action::None;
        }
    };
    let tun = w.tunables();
    let snap = w.shared.set.load();
    let picked = snap
        .pick(tun.policy, &mut w.picker.borrow_mut())
        .map(|e| &e.runtime);
    let Some(backend) = picked else {
        m.no_backend_udp.increment(1);
        return Action::Reply(packet::servfail_in_place(msg, q.question_end));
    };
    if w.udp.upstream(backend.address.is_ipv6()).is_none() {
        m.drop_udp(Drop::SendFailed);
        return Action::None;
    }
    let origin = Origin {
        client,
        client_id: q.id,
        listener,
        key: q.key,
    };
    let id = w
        .udp
        .table
        .borrow_mut()
        .insert(now, tun.query_timeout_ms, origin, backend);
    let Some(id) = id else {
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
    w: &Worker,
    msg: &mut [u8],
    from: SocketAddr,
    now: Instant,
) -> Option<(u16, SocketAddr)> {
    let done = match w.udp.table.borrow_mut().answer(msg, from) {
        Ok(d) => d,
        Err(d) => {
            w.shared.metrics.drop_udp(d);
            return None;
        }
    };
    packet::set_id(msg, done.client_id);
    done.backend
        .on_response(packet::rcode(msg), now.saturating_duration_since(done.sent));
    Some((done.listener, done.client))
}

/// Frees timed-out slots and charges their backends.
pub(crate) fn expire(w: &Worker, now: Instant) {
    let fall = w.tunables().fall;
    w.udp
        .table
        .borrow_mut()
        .expire(now, |done| done.backend.on_timeout(fall));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(client: SocketAddr, client_id: u16, key: QuestionKey) -> Origin {
        Origin {
            client,
            client_id,
            listener: 0,
            key,
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
