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

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::backends::BackendRuntime;
use crate::packet::{self, Drop, QuestionKey};
use crate::server::Worker;

/// Number of IDs towards backends per upstream socket.
const IDS: usize = 1 << 16;
/// Datagrams handled per readiness before yielding to the worker's other tasks.
const BATCH: usize = 64;

struct Slot {
    seq: u32,
    live: bool,
    client_id: u16,
    listener: u16,
    client: SocketAddr,
    key: QuestionKey,
    sent: Instant,
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

/// In-flight queries of one upstream socket, indexed by the ID sent to the backend.
/// Free IDs are handed out from a shuffled queue, so IDs are not predictable.
pub(crate) struct Inflight {
    slots: Vec<Slot>,
    free: VecDeque<u16>,
    /// (deadline in ms since `epoch`, id, seq) in send order; stale entries (the slot
    /// was answered or reused) are skipped by their seq.
    expiry: VecDeque<(u64, u16, u32)>,
    epoch: Instant,
    live: usize,
}

impl Inflight {
    pub(crate) fn new() -> Self {
        let mut ids: Vec<u16> = (0..=u16::MAX).collect();
        fastrand::shuffle(&mut ids);
        let slots = (0..IDS)
            .map(|_| Slot {
                seq: 0,
                live: false,
                client_id: 0,
                listener: 0,
                client: SocketAddr::from(([0, 0, 0, 0], 0)),
                key: QuestionKey::default(),
                sent: Instant::now(),
                backend: None,
            })
            .collect();
        Inflight {
            slots,
            free: ids.into(),
            expiry: VecDeque::with_capacity(4096),
            epoch: Instant::now(),
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
        let Origin {
            client,
            client_id,
            listener,
            key,
        } = from;
        let id = self.free.pop_front()?;
        let slot = &mut self.slots[usize::from(id)];
        slot.seq = slot.seq.wrapping_add(1);
        slot.live = true;
        slot.client = client;
        slot.client_id = client_id;
        slot.listener = listener;
        slot.key = key;
        slot.sent = now;
        slot.backend = Some(backend.clone());
        let deadline = now.duration_since(self.epoch).as_millis() as u64 + timeout_ms;
        self.expiry.push_back((deadline, id, slot.seq));
        self.live += 1;
        Some(id)
    }

    fn release(&mut self, id: u16) -> Done {
        let slot = &mut self.slots[usize::from(id)];
        slot.live = false;
        self.free.push_back(id);
        self.live -= 1;
        Done {
            client: slot.client,
            client_id: slot.client_id,
            listener: slot.listener,
            sent: slot.sent,
            backend: slot.backend.take().expect("live slot has a backend"),
        }
    }

    /// Validates a backend response against its slot and frees the slot on success.
    fn answer(&mut self, msg: &[u8], from: SocketAddr) -> Result<Done, Drop> {
        if msg.len() < packet::HEADER_LEN {
            return Err(Drop::Short);
        }
        let id = packet::id(msg);
        let slot = &self.slots[usize::from(id)];
        if !slot.live {
            return Err(Drop::UnknownId);
        }
        // Left in place on a mismatch: the genuine answer may still arrive.
        match &slot.backend {
            Some(b) if b.address == from => {}
            _ => return Err(Drop::WrongSource),
        }
        packet::response_matches(msg, &slot.key)?;
        Ok(self.release(id))
    }

    /// Frees every slot whose deadline has passed, handing each to `f`.
    fn expire(&mut self, now: Instant, mut f: impl FnMut(Done)) {
        let now_ms = now.duration_since(self.epoch).as_millis() as u64;
        while let Some(&(deadline, id, seq)) = self.expiry.front() {
            let slot = &self.slots[usize::from(id)];
            if slot.live && slot.seq == seq {
                if deadline > now_ms {
                    break;
                }
                self.expiry.pop_front();
                f(self.release(id));
            } else {
                self.expiry.pop_front();
            }
        }
    }

    /// Frees every slot (hard stop), handing each to `f`.
    pub(crate) fn clear(&mut self, mut f: impl FnMut(Done)) {
        while let Some((_, id, seq)) = self.expiry.pop_front() {
            let slot = &self.slots[usize::from(id)];
            if slot.live && slot.seq == seq {
                f(self.release(id));
            }
        }
    }
}

/// The UDP side of one worker.
pub(crate) struct Udp {
    pub(crate) listeners: Vec<Rc<UdpSocket>>,
    up4: Rc<UdpSocket>,
    up6: Option<Rc<UdpSocket>>,
    pub(crate) table: RefCell<Inflight>,
}

impl Udp {
    pub(crate) fn new(listeners: Vec<UdpSocket>, buffer: usize) -> io::Result<Self> {
        let up4 = upstream_socket(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), buffer)?;
        let up6 = match upstream_socket(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)), buffer) {
            Ok(s) => Some(Rc::new(s)),
            Err(e) => {
                tracing::debug!("no IPv6 upstream socket: {e}");
                None
            }
        };
        Ok(Udp {
            listeners: listeners.into_iter().map(Rc::new).collect(),
            up4: Rc::new(up4),
            up6,
            table: RefCell::new(Inflight::new()),
        })
    }
}

fn upstream_socket(addr: SocketAddr, buffer: usize) -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    crate::sockets::set_buffers(&s, buffer);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// Receives on one listener until cancelled.
pub(crate) async fn serve_listener(
    w: Rc<Worker>,
    index: usize,
    cancel: CancellationToken,
) -> io::Result<()> {
    let sock = w.udp.listeners[index].clone();
    let listener = index as u16;
    recv_loop(&sock, &cancel, &w, |buf, len, from| {
        on_query(&w, listener, buf, len, from)
    })
    .await
}

/// Receives backend answers on one upstream socket until `stop` is cancelled.
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
    recv_loop(&sock, &stop, &w, |buf, len, from| {
        on_answer(&w, buf, len, from)
    })
    .await
}

/// Drains a socket in batches; transient errors are counted and skipped, a run of
/// errors with no success in between ends the loop with the error.
async fn recv_loop(
    sock: &UdpSocket,
    cancel: &CancellationToken,
    w: &Worker,
    mut on_packet: impl FnMut(&mut [u8], usize, SocketAddr),
) -> io::Result<()> {
    let mut buf = vec![0u8; packet::MAX_MESSAGE + 1];
    let mut errors = 0u32;
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            r = sock.readable() => r?,
        }
        for _ in 0..BATCH {
            match sock.try_recv_from(&mut buf) {
                Ok((n, from)) => {
                    errors = 0;
                    on_packet(&mut buf, n, from);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    errors += 1;
                    w.shared.metrics.drop_udp(Drop::ReceiveFailed);
                    tracing::debug!("udp receive error (transient): {e}");
                    if errors > 1000 {
                        return Err(e);
                    }
                }
            }
        }
        tokio::task::yield_now().await;
    }
}

fn on_query(w: &Worker, listener: u16, buf: &mut [u8], len: usize, client: SocketAddr) {
    let m = &w.shared.metrics;
    m.queries_udp.increment(1);
    let msg = &mut buf[..len];
    let q = match packet::parse_query(msg) {
        Ok(q) => q,
        Err(d) => return m.drop_udp(d),
    };
    let tun = w.tunables();
    let snap = w.shared.set.load();
    let picked = snap
        .pick(tun.policy, &mut w.picker.borrow_mut())
        .map(|e| &e.runtime);
    let sock = &w.udp.listeners[usize::from(listener)];
    let Some(backend) = picked else {
        m.no_backend_udp.increment(1);
        let n = packet::servfail_in_place(msg, q.question_end);
        if sock.try_send_to(&msg[..n], client).is_err() {
            m.drop_udp(Drop::SendFailed);
        }
        return;
    };
    let upstream = match (backend.address, &w.udp.up6) {
        (SocketAddr::V4(_), _) => &w.udp.up4,
        (SocketAddr::V6(_), Some(s)) => s,
        (SocketAddr::V6(_), None) => return m.drop_udp(Drop::SendFailed),
    };
    let now = Instant::now();
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
        let n = packet::servfail_in_place(msg, q.question_end);
        let _ = sock.try_send_to(&msg[..n], client);
        return;
    };
    packet::set_id(msg, id);
    backend.on_forward();
    if upstream.try_send_to(msg, backend.address).is_err() {
        w.udp.table.borrow_mut().release(id);
        backend.on_abandon();
        m.drop_udp(Drop::SendFailed);
    }
}

fn on_answer(w: &Worker, buf: &mut [u8], len: usize, from: SocketAddr) {
    let msg = &mut buf[..len];
    let done = match w.udp.table.borrow_mut().answer(msg, from) {
        Ok(d) => d,
        Err(d) => return w.shared.metrics.drop_udp(d),
    };
    packet::set_id(msg, done.client_id);
    done.backend
        .on_response(packet::rcode(msg), done.sent.elapsed());
    let sock = &w.udp.listeners[usize::from(done.listener)];
    if sock.try_send_to(msg, done.client).is_err() {
        w.shared.metrics.drop_udp(Drop::SendFailed);
    }
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
