//! The TCP path (RFC 7766). Each worker accepts on its own SO_REUSEPORT listeners.
//!
//! Every query is forwarded as soon as its frame is read, so pipelined queries are
//! answered as their answers arrive, in any order. Towards backends each worker keeps
//! a small pool of long-lived connections per backend address and pipelines queries
//! on them with IDs of its own.
//!
//! The work is done where the bytes arrive, without a task per query: a client
//! connection's task reads whatever is buffered, turns every complete frame into a
//! frame on a backend connection, and writes each touched backend connection once; a
//! backend connection's task does the same with answers, writing each touched client
//! once. Writes go straight to the socket (`try_write`); only what the socket does
//! not take waits for a connection's writer task. At a fixed rate that is one read and
//! one write per query each way, like a byte-splicing proxy, and under load many
//! frames share each system call.
//!
//! A backend connection that dies with queries on it has them retried once on a fresh
//! connection; a backend that refuses the connection is charged and its queries are
//! retried on another backend. Queries past `query_timeout_ms` are expired by the
//! worker's tick, which charges the backend; the client gets no answer, as over UDP.
//!
//! Limits: `tcp.max_connections` (over all workers), `max_inflight_per_connection`
//! (reading pauses above it), `idle_timeout_ms` (no query in flight, or a frame half
//! sent), `max_message_size` (larger length prefixes close the connection).

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::io::{Read, Write};

use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backends::BackendRuntime;
use crate::packet::{self, Drop, QuestionKey};
use crate::server::{Tunables, Worker};

/// The TCP side of one worker.
pub(crate) struct Tcp {
    pub(crate) listeners: Vec<Rc<TcpListener>>,
    pools: RefCell<HashMap<SocketAddr, Vec<Rc<Upstream>>>>,
}

impl Tcp {
    pub(crate) fn new(listeners: Vec<TcpListener>) -> Self {
        Tcp {
            listeners: listeners.into_iter().map(Rc::new).collect(),
            pools: RefCell::new(HashMap::new()),
        }
    }

    /// Forgets closed backend connections and expires queries past their deadline,
    /// charging their backends (run on the worker's tick).
    pub(crate) fn tick(&self, now: Instant, fall: u32) {
        self.pools.borrow_mut().retain(|_, v| {
            v.retain(|u| u.alive());
            for u in v.iter() {
                for (_, p) in u.pending.borrow_mut().extract_if(|_, p| p.deadline <= now) {
                    p.backend.on_timeout(p.sent, fall);
                    p.client.answered();
                }
            }
            !v.is_empty()
        });
    }

    /// Gives up every query on a backend connection without charging its backend
    /// (hard stop at the end of the grace period).
    pub(crate) fn abandon_all(&self) {
        for u in self.pools.borrow().values().flatten() {
            for (_, p) in u.pending.borrow_mut().drain() {
                p.backend.on_abandon();
                p.client.answered();
            }
        }
    }

    /// A connection to `addr` with room for one more query, opening one if allowed.
    fn upstream(&self, w: &Rc<Worker>, addr: SocketAddr, tun: &Tunables) -> Rc<Upstream> {
        let mut pools = self.pools.borrow_mut();
        let pool = pools.entry(addr).or_default();
        pool.retain(|u| u.alive());
        let best = pool.iter().min_by_key(|u| u.load()).cloned();
        match best {
            Some(u) if u.load() < tun.tcp.backend_pipeline => u,
            Some(u) if pool.len() >= tun.tcp.backend_max_connections => u,
            _ => {
                let u = Upstream::spawn(w, addr, tun);
                pool.push(u.clone());
                u
            }
        }
    }
}

/// Accepts on one listener until cancelled.
pub(crate) async fn serve_listener(
    w: Rc<Worker>,
    index: usize,
    cancel: CancellationToken,
    tracker: TaskTracker,
) -> io::Result<()> {
    let listener = w.tcp.listeners[index].clone();
    let mut errors = 0u32;
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => { errors = 0; x }
                Err(e) => {
                    // EMFILE, ECONNABORTED and friends: back off briefly and go on.
                    errors += 1;
                    tracing::warn!("tcp accept error: {e}");
                    if errors > 1000 {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = w.shared.tcp_connections.clone().try_acquire_owned() else {
            w.shared.metrics.drop_tcp(Drop::TooManyConnections);
            drop(stream);
            continue;
        };
        w.shared.metrics.tcp_connections.increment(1);
        let w2 = w.clone();
        let c2 = cancel.clone();
        tracker.spawn_local(async move {
            w2.shared.metrics.tcp_open.increment(1.0);
            serve_client(&w2, stream, c2).await;
            w2.shared.metrics.tcp_open.decrement(1.0);
            drop(permit);
            tracing::trace!(%peer, "tcp connection closed");
        });
    }
}

/// A connection as the worker drives it: a std stream registered with the runtime, so
/// that a short read can clear readiness itself instead of spending a `recv` on EAGAIN.
type Stream = AsyncFd<std::net::TcpStream>;

fn registered(s: TcpStream) -> io::Result<Rc<Stream>> {
    let _ = s.set_nodelay(true);
    Ok(Rc::new(crate::batch::register_stream(s.into_std()?)?))
}

/// Bytes waiting to be written to one connection. Whoever has something to send
/// appends it and calls [`Outbox::flush`], which writes straight to the socket; what
/// the socket does not take is left to the connection's writer task.
struct Outbox {
    buf: RefCell<Vec<u8>>,
    /// Set once connected (backend connections queue while connecting).
    stream: OnceCell<Rc<Stream>>,
    /// Wakes the writer task: bytes are left over.
    more: Notify,
    /// The writer task emptied the buffer.
    drained: Notify,
    /// A write failed: the connection is dead.
    failed: Cell<bool>,
    /// On a list of outboxes to flush at the end of the current batch.
    queued: Cell<bool>,
}

impl Outbox {
    fn new() -> Self {
        Outbox {
            buf: RefCell::new(Vec::new()),
            stream: OnceCell::new(),
            more: Notify::new(),
            drained: Notify::new(),
            failed: Cell::new(false),
            queued: Cell::new(false),
        }
    }

    /// Appends one frame (length prefix, then `msg`); dropped if the connection died.
    fn push(&self, msg: &[u8]) {
        if self.failed.get() {
            return;
        }
        let mut b = self.buf.borrow_mut();
        b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        b.extend_from_slice(msg);
    }

    /// Writes what it can without waiting. Returns false if bytes are left over.
    fn write_now(&self) -> bool {
        let Some(s) = self.stream.get() else {
            return false;
        };
        let mut b = self.buf.borrow_mut();
        while !b.is_empty() {
            match s.get_ref().write(&b) {
                Ok(n) => {
                    b.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    tracing::trace!("tcp write failed: {e}");
                    self.failed.set(true);
                    b.clear();
                    // Whoever waits on this connection finds out now.
                    self.drained.notify_one();
                    return true;
                }
            }
        }
        true
    }

    /// Writes now; leaves what is left to the writer task.
    fn flush(&self) {
        if !self.write_now() && self.stream.get().is_some() {
            self.more.notify_one();
        }
    }

    fn len(&self) -> usize {
        self.buf.borrow().len()
    }

    /// Puts it on `batch` (once) to be flushed with the rest of the batch.
    fn queue(self: &Rc<Self>, batch: &mut Vec<Rc<Outbox>>) {
        if !self.queued.replace(true) {
            batch.push(self.clone());
        }
    }

    /// The writer task: waits for leftovers and for the socket to take them.
    async fn writer(self: Rc<Self>) {
        loop {
            self.more.notified().await;
            while !self.write_now() {
                let Some(s) = self.stream.get() else { break };
                // Wait for room; a stale readiness is cleared by the write that
                // meets EAGAIN.
                match s.writable().await {
                    Ok(mut g) => {
                        let mut b = self.buf.borrow_mut();
                        match g.try_io(|s| s.get_ref().write(&b)) {
                            Ok(Ok(n)) => {
                                b.drain(..n);
                            }
                            Ok(Err(_)) => self.failed.set(true),
                            Err(_would_block) => {}
                        }
                    }
                    Err(_) => self.failed.set(true),
                }
                if self.failed.get() {
                    self.buf.borrow_mut().clear();
                    break;
                }
            }
            self.drained.notify_one();
            if self.failed.get() {
                return;
            }
        }
    }
}

/// Answers waiting for a client that does not read pause its reading above this.
const OUTBOX_LIMIT: usize = 256 * 1024;

/// Reads length-prefixed frames from a stream into one growing buffer.
struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// What the next buffered bytes hold.
enum Next {
    /// A whole frame at `buf[start..end]` (without its prefix).
    Frame(usize, usize),
    /// More bytes are needed.
    Partial,
    /// The length prefix is out of bounds.
    Bad,
}

impl FrameReader {
    fn new() -> Self {
        FrameReader {
            buf: vec![0; 16 * 1024],
            start: 0,
            end: 0,
        }
    }

    fn has_partial(&self) -> bool {
        self.start < self.end
    }

    /// The next frame, if buffered whole; `max` bounds its length.
    fn next(&mut self, max: usize) -> Next {
        let avail = self.end - self.start;
        if avail < 2 {
            return Next::Partial;
        }
        let len = usize::from(u16::from_be_bytes([
            self.buf[self.start],
            self.buf[self.start + 1],
        ]));
        if !(packet::HEADER_LEN..=max).contains(&len) {
            return Next::Bad;
        }
        if avail < 2 + len {
            return Next::Partial;
        }
        let at = self.start + 2;
        self.start = at + len;
        Next::Frame(at, at + len)
    }

    /// Reads what the socket has (after waiting for it). Ok(0) is EOF. A read that
    /// leaves room in the buffer took everything queued, so readiness is cleared
    /// without the `recv` that would return EAGAIN (data arriving meanwhile raises
    /// a new readiness event, which the clear leaves alone).
    async fn fill(&mut self, s: &Stream) -> io::Result<usize> {
        self.make_room();
        loop {
            let mut g = s.readable().await?;
            let room = self.buf.len() - self.end;
            match g.try_io(|s| s.get_ref().read(&mut self.buf[self.end..])) {
                Ok(Ok(n)) => {
                    if n > 0 && n < room {
                        g.clear_ready();
                    }
                    self.end += n;
                    return Ok(n);
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Moves a partial frame to the front when the room after it runs short, and grows
    /// the buffer for a frame larger than it.
    fn make_room(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            return;
        }
        let need = if self.end - self.start >= 2 {
            2 + usize::from(u16::from_be_bytes([
                self.buf[self.start],
                self.buf[self.start + 1],
            ]))
        } else {
            2
        };
        if self.buf.len() - self.start < need || self.buf.len() - self.end < 1024 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() < need.max(self.end + 1024) {
                self.buf.resize(need.max(self.end + 1024), 0);
            }
        }
    }
}

/// One client connection, shared by its task and the backend connections that hold
/// its queries.
struct Client {
    out: Rc<Outbox>,
    inflight: Cell<usize>,
    /// Wakes the reader when a query is answered or expired.
    progress: Notify,
}

impl Client {
    /// One of its queries is finished (answered, expired or given up).
    fn answered(&self) {
        self.inflight.set(self.inflight.get().saturating_sub(1));
        self.progress.notify_one();
    }
}

async fn serve_client(w: &Rc<Worker>, stream: TcpStream, cancel: CancellationToken) {
    let tun = w.tunables();
    let Ok(stream) = registered(stream) else {
        return;
    };
    let client = Rc::new(Client {
        out: Rc::new(Outbox::new()),
        inflight: Cell::new(0),
        progress: Notify::new(),
    });
    let _ = client.out.stream.set(stream.clone());
    let writer = tokio::task::spawn_local(client.out.clone().writer());
    let idle = Duration::from_millis(tun.tcp.idle_timeout_ms);
    let max_inflight = tun.tcp.max_inflight_per_connection;
    let mut rd = FrameReader::new();
    let mut touched: Vec<Rc<Outbox>> = Vec::new();
    // One timer for the connection's life, pushed back lazily: a read does not touch
    // it, only its expiry looks at when the last read was and when the frame still
    // incomplete began.
    let mut last_read = Instant::now();
    let mut partial_since: Option<Instant> = None;
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    'read: loop {
        // The frames of one read arrived together: one clock read serves them, unless
        // reading pauses.
        let mut now = last_read;
        // Take every whole frame buffered. A drain does not cut this short: queries
        // already read are forwarded (room comes as answers arrive or queries expire).
        loop {
            while client.inflight.get() >= max_inflight || client.out.len() > OUTBOX_LIMIT {
                flush_batch(&client, &mut touched);
                if client.out.failed.get() {
                    break 'read;
                }
                let before = client.out.len();
                let woke = timeout(idle, async {
                    tokio::select! {
                        _ = client.progress.notified() => {}
                        _ = client.out.drained.notified() => {}
                    }
                })
                .await;
                if woke.is_err() && client.out.len() > OUTBOX_LIMIT && client.out.len() >= before {
                    // The client has not read an answer for `idle`: it is gone.
                    break 'read;
                }
                now = Instant::now();
            }
            match rd.next(tun.tcp.max_message_size) {
                Next::Frame(a, b) => {
                    if !on_query(w, &tun, &client, &mut rd.buf[a..b], now, &mut touched) {
                        break 'read;
                    }
                }
                Next::Partial => break,
                Next::Bad => {
                    w.shared.metrics.drop_tcp(Drop::BadLength);
                    break 'read;
                }
            }
        }
        flush_batch(&client, &mut touched);
        if client.out.failed.get() {
            break;
        }
        partial_since = match (rd.has_partial(), partial_since) {
            (false, _) => None,
            (true, None) => Some(last_read),
            (true, started) => started,
        };
        // Wait for more. With queries in flight the connection may stay quiet for
        // as long as it likes; otherwise `idle` ends it, and a frame that has begun
        // must be complete within `idle` of its first bytes.
        let read = loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break 'read,
                r = rd.fill(&stream) => break r,
                _ = &mut idle_timer => {
                    let now = Instant::now();
                    if let Some(started) = partial_since {
                        if started + idle <= now {
                            w.shared.metrics.drop_tcp(Drop::PartialFrame);
                            break 'read;
                        }
                    }
                    let quiet_until = last_read + idle;
                    let next = partial_since.map_or(quiet_until, |p| quiet_until.min(p + idle));
                    if next > now {
                        idle_timer.as_mut().reset(next.into());
                        continue;
                    }
                    if client.inflight.get() > 0 {
                        idle_timer.as_mut().reset((now + idle).into());
                        continue;
                    }
                    break 'read;
                }
            }
        };
        last_read = Instant::now();
        match read {
            Ok(0) => {
                if rd.has_partial() {
                    w.shared.metrics.drop_tcp(Drop::PartialFrame);
                }
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    flush_batch(&client, &mut touched);
    // Let the queries in flight finish (answered, or expired by the tick), then send
    // what is left and close.
    while client.inflight.get() > 0 && !client.out.failed.get() {
        client.progress.notified().await;
    }
    if client.out.len() > 0 && !client.out.failed.get() {
        client.out.flush();
        // A client that stopped reading gets `idle` to take the rest.
        let _ = timeout(idle, async {
            while client.out.len() > 0 && !client.out.failed.get() {
                client.out.drained.notified().await;
            }
        })
        .await;
    }
    writer.abort();
    let _ = stream.get_ref().shutdown(std::net::Shutdown::Write);
}

/// Writes what one batch of a client's frames produced: queries to each backend
/// connection touched, and replies made on the spot (SERVFAIL) to the client.
fn flush_batch(client: &Client, touched: &mut Vec<Rc<Outbox>>) {
    flush_all(touched);
    client.out.flush();
}

/// Flushes every outbox a batch queued, each once.
fn flush_all(batch: &mut Vec<Rc<Outbox>>) {
    for out in batch.drain(..) {
        out.queued.set(false);
        out.flush();
    }
}

/// Handles one query frame of a client. Returns false if the connection must close.
fn on_query(
    w: &Rc<Worker>,
    tun: &Tunables,
    client: &Rc<Client>,
    msg: &mut [u8],
    now: Instant,
    touched: &mut Vec<Rc<Outbox>>,
) -> bool {
    w.shared.metrics.queries_tcp.increment(1);
    let q = match packet::parse_query(msg) {
        Ok(q) => q,
        Err(d) => {
            // Garbage on a stream loses the framing: close this connection only.
            w.shared.metrics.drop_tcp(d);
            return false;
        }
    };
    let backend = {
        let snap = w.shared.set.load();
        match snap.pick(tun.policy, &mut w.picker.borrow_mut()) {
            Some(e) => e.runtime.clone(),
            None => {
                w.shared.metrics.no_backend_tcp.increment(1);
                let n = packet::servfail_in_place(msg, q.question_end);
                client.out.push(&msg[..n]); // written with the batch
                return true;
            }
        }
    };
    client.inflight.set(client.inflight.get() + 1);
    let p = Pending {
        client: client.clone(),
        client_id: q.id,
        key: q.key,
        backend,
        sent: now,
        deadline: now + Duration::from_millis(tun.query_timeout_ms),
        query: msg.to_vec(),
        retried: false,
    };
    p.backend.on_forward();
    send_upstream(w, tun, p, touched);
    true
}

/// Queues a query on a connection to its backend (written when `touched` is flushed).
fn send_upstream(w: &Rc<Worker>, tun: &Tunables, mut p: Pending, touched: &mut Vec<Rc<Outbox>>) {
    let up = w.tcp.upstream(w, p.backend.address, tun);
    let Some(id) = up.free_id() else {
        // 65535 queries on one connection: give this one up.
        p.backend.on_abandon();
        p.client.answered();
        return;
    };
    packet::set_id(&mut p.query, id);
    up.out.push(&p.query);
    up.pending.borrow_mut().insert(id, p);
    up.out.queue(touched);
}

/// A query on a backend connection, waiting for its answer.
struct Pending {
    client: Rc<Client>,
    client_id: u16,
    key: QuestionKey,
    backend: Arc<BackendRuntime>,
    sent: Instant,
    deadline: Instant,
    /// The query as sent (kept for one retry).
    query: Vec<u8>,
    retried: bool,
}

/// A pipelined connection to one backend: its reader task connects, then turns
/// answers into client frames.
struct Upstream {
    out: Rc<Outbox>,
    pending: RefCell<HashMap<u16, Pending>>,
    next_id: Cell<u16>,
    closed: Cell<bool>,
}

impl Upstream {
    fn spawn(w: &Rc<Worker>, addr: SocketAddr, tun: &Tunables) -> Rc<Upstream> {
        let up = Rc::new(Upstream {
            out: Rc::new(Outbox::new()),
            pending: RefCell::new(HashMap::new()),
            next_id: Cell::new(fastrand::u16(..)),
            closed: Cell::new(false),
        });
        let connect_timeout = Duration::from_millis(tun.query_timeout_ms);
        let idle = Duration::from_millis(tun.tcp.backend_idle_timeout_ms);
        tokio::task::spawn_local(run_upstream(
            w.clone(),
            up.clone(),
            addr,
            connect_timeout,
            idle,
        ));
        up
    }

    /// Neither closed nor failed: new queries may go on it.
    fn alive(&self) -> bool {
        !self.closed.get() && !self.out.failed.get()
    }

    /// Queries on it (pipelining depth).
    fn load(&self) -> usize {
        self.pending.borrow().len()
    }

    fn free_id(&self) -> Option<u16> {
        let map = self.pending.borrow();
        if map.len() >= usize::from(u16::MAX) {
            return None;
        }
        let mut id = self.next_id.get();
        while map.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_id.set(id.wrapping_add(1));
        Some(id)
    }
}

async fn run_upstream(
    w: Rc<Worker>,
    up: Rc<Upstream>,
    addr: SocketAddr,
    connect_timeout: Duration,
    idle: Duration,
) {
    let stream = match timeout(connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => registered(s).ok(),
        _ => None,
    };
    let connected = match stream {
        Some(stream) => {
            let _ = up.out.stream.set(stream.clone());
            let writer = tokio::task::spawn_local(up.out.clone().writer());
            up.out.flush();
            read_answers(&w, &up, &stream, idle).await;
            writer.abort();
            true
        }
        None => {
            tracing::debug!(%addr, "backend tcp connect failed");
            false
        }
    };
    // Closed: new queries go elsewhere. The ones on it get one retry: on a fresh
    // connection if this one had been open (idle close, reset), on another backend if
    // it was refused. A refused connection charges its backend one timeout, however
    // many queries were waiting for it.
    up.closed.set(true);
    let lost: Vec<Pending> = up.pending.borrow_mut().drain().map(|(_, p)| p).collect();
    // The refusal is charged as of the latest query that waited for the connection:
    // it counts toward the backend's streak unless the backend answered since.
    let latest = lost.iter().map(|p| p.sent).max();
    let tun = w.tunables();
    let mut touched = Vec::new();
    let mut charged = false;
    for mut p in lost {
        if p.retried {
            p.backend.on_timeout(p.sent, tun.fall);
            p.client.answered();
            continue;
        }
        p.retried = true;
        if !connected {
            if charged {
                p.backend.on_abandon();
            } else {
                p.backend.on_timeout(latest.unwrap_or(p.sent), tun.fall);
                charged = true;
            }
            let other = w
                .shared
                .set
                .load()
                .pick_other(tun.policy, &mut w.picker.borrow_mut(), addr)
                .map(|e| e.runtime.clone());
            if let Some(other) = other {
                p.backend = other;
            }
            p.backend.on_forward();
            p.sent = Instant::now();
        }
        send_upstream(&w, &tun, p, &mut touched);
    }
    flush_all(&mut touched);
}

/// Reads answers until the connection closes, fails, or stays idle for `idle`.
async fn read_answers(w: &Rc<Worker>, up: &Rc<Upstream>, stream: &Stream, idle: Duration) {
    let metrics = &w.shared.metrics;
    let mut rd = FrameReader::new();
    let mut clients: Vec<Rc<Outbox>> = Vec::new();
    let tick = idle.min(Duration::from_secs(1));
    let mut last_busy = Instant::now();
    // One timer, re-armed only when it fires (see `serve_client`).
    let idle_timer = tokio::time::sleep(tick);
    tokio::pin!(idle_timer);
    loop {
        if up.out.failed.get() {
            return;
        }
        tokio::select! {
            r = rd.fill(stream) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            // A failed write (checked above) or leftovers written: look again.
            _ = up.out.drained.notified() => continue,
            _ = &mut idle_timer => {
                // Stay open while anything is in flight or traffic was recent.
                if up.load() == 0 && last_busy.elapsed() >= idle {
                    return;
                }
                idle_timer.as_mut().reset((Instant::now() + tick).into());
                continue;
            }
        }
        let now = Instant::now();
        last_busy = now;
        let mut bad = false;
        loop {
            let (a, b) = match rd.next(packet::MAX_MESSAGE) {
                Next::Frame(a, b) => (a, b),
                Next::Partial => break,
                Next::Bad => {
                    // The stream has lost its framing: close it after sending the
                    // answers already taken from it.
                    metrics.drop_tcp(Drop::BadLength);
                    bad = true;
                    break;
                }
            };
            let msg = &mut rd.buf[a..b];
            let id = packet::id(msg);
            let verdict = match up.pending.borrow().get(&id) {
                None => Err(Drop::UnknownId),
                Some(p) => packet::response_matches(msg, &p.key),
            };
            if let Err(d) = verdict {
                metrics.drop_tcp(d);
                continue;
            }
            let p = up.pending.borrow_mut().remove(&id).expect("checked");
            packet::set_id(msg, p.client_id);
            p.backend.on_response(packet::rcode(msg), p.sent, now);
            p.client.out.push(msg);
            p.client.answered();
            p.client.out.queue(&mut clients);
        }
        flush_all(&mut clients);
        if bad {
            return;
        }
        if !rd.has_partial() && up.load() > 0 {
            // Everything received is consumed and more answers are due: ACK at
            // once. Without this, delayed ACKs meet the backend's Nagle and
            // pipelined answers stall for milliseconds (BIND: 1k instead of
            // 35k qps). With nothing else due, the next query carries the ACK.
            let _ = socket2::SockRef::from(stream.get_ref()).set_tcp_quickack(true);
        }
    }
}
