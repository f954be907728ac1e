//! The TCP path (RFC 7766). Each TCP worker is a plain thread (no async runtime) that
//! sleeps in its own epoll instance and owns its SO_REUSEPORT listeners, its client
//! connections, and a small pool of long-lived connections per backend address on
//! which it pipelines queries with IDs of its own.
//!
//! Every query is forwarded as soon as its frame is read, so pipelined queries are
//! answered as their answers arrive, in any order. The work is done where the bytes
//! arrive: a readable client connection has everything buffered read, every complete
//! frame turned into a frame on a backend connection; a readable backend connection
//! has its answers turned into client frames. Each connection touched is written once,
//! after every ready descriptor of the wake-up has been handled. Streams are
//! registered edge-triggered for both directions: a read that does not fill the
//! buffer took everything queued (no `recv` that returns EAGAIN), and what a socket
//! does not take is written when it becomes writable. At a fixed rate that is one
//! read and one write per query each way, like a byte-splicing proxy, and under load
//! many frames share each system call.
//!
//! Why no tokio here: as on the UDP path, a proxy's cost at a fixed rate is its
//! wake-ups. On a tokio `LocalSet` (a task per connection, wakers, a timer each) a
//! query cost 24–26 µs of CPU at 20k qps and a quarter of the samples were in user
//! space; this loop costs 18–21 µs, on par with nginx (docs/benchmarks.md).
//!
//! A backend connection that dies with queries on it has them retried once on a new
//! connection; a backend that refuses the connection (or does not accept it within
//! `query_timeout_ms`) is charged once and its queries are retried on another backend.
//! A retry keeps the query's deadline; a query past it is not retried.
//! Queries past `query_timeout_ms` are expired by the worker's tick, which charges the
//! backend; the client gets no answer, as over UDP.
//!
//! Limits: `tcp.max_connections` (over all workers), `max_inflight_per_connection`
//! (reading pauses at it), `idle_timeout_ms` (no query in flight, a frame half sent,
//! or answers the client does not read), `max_message_size` (larger length prefixes
//! close the connection), `max_connections_per_client` (checked at accept, with the
//! `[acl]`), `max_connection_lifetime_ms` and `max_queries_per_connection` (after
//! either the connection reads no more, has its answers written, and is closed).
//! Timers have the tick's resolution (50 ms).

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;

use crate::backends::{BackendRuntime, Picker};
use crate::batch::{self, Poller};
use crate::cache::{self, Cache, Epoch, Key, Probe, Transport};
use crate::control::{Control, DRAIN, HARD_STOP};
use crate::edge::ClientSlot;
use crate::packet::{self, Drop, QuestionKey};
use crate::shared::{Shared, Tunables, WORKER_TICK};

/// Answers waiting for a client that does not read pause its reading above this.
const OUTBOX_LIMIT: usize = 256 * 1024;
/// How long a finished client connection stays open at most after dnslb shut it
/// down for writing, until the peer has acknowledged every answer or closed. Closing
/// a socket with input unread (frames past `max_queries_per_connection`, or sent
/// during a drain) makes the kernel reset it and throw away answers not yet sent or
/// acknowledged; lingering reads that input and discards it (as nginx's lingering
/// close does).
const LINGER: Duration = Duration::from_secs(2);

/// Connections accepted per readiness event of a listener (it is level-triggered and
/// comes back at once if more are waiting).
const ACCEPTS_PER_EVENT: usize = 64;

/// A worker whose accepts have all failed for this long fails (dnslb exits 1 to be
/// restarted).
const ACCEPT_FAILING_LIMIT: Duration = Duration::from_secs(10);

/// Query buffers a worker keeps for reuse (a query in flight holds one, for its
/// retry).
const SPARE_QUERIES: usize = 1024;

/// Ready descriptors taken per `epoll_wait`.
const EVENTS: usize = 256;

/// Event flags that mean the peer closed its side or the connection broke.
const HUP: u32 = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;

/// Poller tokens: connections are `generation << 32 | slot`; these have high bits no
/// generation reaches.
const TOKEN_CONTROL: u64 = 1 << 63;
const TOKEN_LISTENER: u64 = 1 << 62;

/// A connection's place in the worker's table. The generation changes whenever the
/// slot is reused, so a stale token (an event or an answer for a connection closed
/// since) finds nothing.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Token(u64);

impl Token {
    fn new(slot: usize, generation: u32) -> Self {
        Token(u64::from(generation & 0x3fff_ffff) << 32 | slot as u64)
    }

    fn slot(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }
}

enum Conn {
    Client(Box<Client>),
    Upstream(Box<Upstream>),
}

impl Conn {
    /// The socket to register with the poller (an upstream whose socket could not be
    /// made has none).
    fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match self {
            Conn::Client(c) => Some(c.stream.as_fd()),
            Conn::Upstream(u) => u.stream.as_ref().map(|s| s.as_fd()),
        }
    }
}

struct Slot<C> {
    generation: u32,
    conn: Option<C>,
}

/// Every connection of a worker. A connection being worked on is taken out of its slot
/// and put back (the slot stays reserved), so that it can be borrowed beside the rest.
struct Table<C> {
    slots: Vec<Slot<C>>,
    free: Vec<usize>,
}

impl<C> Table<C> {
    fn new() -> Self {
        Table {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }

    fn insert(&mut self, conn: C) -> Token {
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    conn: None,
                });
                self.slots.len() - 1
            }
        };
        let s = &mut self.slots[slot];
        s.conn = Some(conn);
        Token::new(slot, s.generation)
    }

    fn live(&self, t: Token) -> Option<&Slot<C>> {
        self.slots
            .get(t.slot())
            .filter(|s| Token::new(t.slot(), s.generation) == t)
    }

    fn get_mut(&mut self, t: Token) -> Option<&mut C> {
        self.live(t)?;
        self.slots[t.slot()].conn.as_mut()
    }

    /// Takes a connection out to work on it; [`Table::put`] puts it back.
    fn take(&mut self, t: Token) -> Option<C> {
        self.live(t)?;
        self.slots[t.slot()].conn.take()
    }

    fn put(&mut self, t: Token, conn: C) {
        self.slots[t.slot()].conn = Some(conn);
    }

    /// Frees a slot whose connection was taken (or drops the one still in it).
    fn release(&mut self, t: Token) {
        if self.live(t).is_some() {
            let s = &mut self.slots[t.slot()];
            s.conn = None;
            s.generation = s.generation.wrapping_add(1);
            self.free.push(t.slot());
        }
    }

    fn tokens(&self) -> impl Iterator<Item = Token> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.conn.is_some())
            .map(|(i, s)| Token::new(i, s.generation))
    }
}

impl Table<Conn> {
    fn client(&mut self, t: Token) -> Option<&mut Client> {
        match self.get_mut(t) {
            Some(Conn::Client(c)) => Some(c),
            _ => None,
        }
    }

    fn upstream(&mut self, t: Token) -> Option<&mut Upstream> {
        match self.get_mut(t) {
            Some(Conn::Upstream(u)) => Some(u),
            _ => None,
        }
    }
}

/// Bytes waiting to be written to one connection.
struct Outbox {
    buf: Vec<u8>,
    /// A write failed: the connection is dead.
    failed: bool,
    /// On the worker's list of outboxes to write at the end of the wake-up.
    queued: bool,
    /// When the socket last took bytes, or bytes were queued on an empty outbox.
    progress: Instant,
}

impl Outbox {
    fn new(now: Instant) -> Self {
        Outbox {
            buf: Vec::new(),
            failed: false,
            queued: false,
            progress: now,
        }
    }

    /// Appends one frame (length prefix, then `msg`); dropped if the connection died.
    fn push(&mut self, msg: &[u8], now: Instant) {
        if self.failed {
            return;
        }
        if self.buf.is_empty() {
            self.progress = now;
        }
        self.buf
            .extend_from_slice(&(msg.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(msg);
    }

    /// Writes what the socket takes without waiting; the rest waits for writability.
    fn write(&mut self, mut s: &TcpStream, now: Instant) {
        while !self.buf.is_empty() && !self.failed {
            match s.write(&self.buf) {
                Ok(n) => {
                    self.buf.drain(..n);
                    self.progress = now;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::trace!("tcp write failed: {e}");
                    self.failed = true;
                    self.buf = Vec::new();
                }
            }
        }
    }
}

/// Puts connection `t` on `list` once (its `queued` flag says whether it is on it).
fn queue(list: &mut Vec<Token>, t: Token, queued: &mut bool) {
    if !*queued {
        *queued = true;
        list.push(t);
    }
}

/// Reads length-prefixed frames from a stream into one growing buffer.
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// What the next buffered bytes hold.
pub(crate) enum Next {
    /// A whole frame at `buf[start..end]` (without its prefix).
    Frame(usize, usize),
    /// More bytes are needed.
    Partial,
    /// The length prefix is out of bounds.
    Bad,
}

/// What one read did.
enum Filled {
    /// Some bytes; `true` if they filled the room (more may be queued).
    Read(bool),
    /// The peer closed its side.
    Eof,
    /// Nothing was queued.
    Empty,
    /// The connection is broken.
    Failed,
}

impl FrameReader {
    pub(crate) fn new() -> Self {
        FrameReader {
            buf: vec![0; 16 * 1024],
            start: 0,
            end: 0,
        }
    }

    pub(crate) fn has_partial(&self) -> bool {
        self.start < self.end
    }

    /// The next frame, if buffered whole; `max` bounds its length.
    pub(crate) fn next(&mut self, max: usize) -> Next {
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

    /// One read of what the socket has queued.
    fn fill(&mut self, mut s: &TcpStream) -> Filled {
        self.make_room();
        let room = self.buf.len() - self.end;
        loop {
            return match s.read(&mut self.buf[self.end..]) {
                Ok(0) => Filled::Eof,
                Ok(n) => {
                    self.end += n;
                    Filled::Read(n == room)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Filled::Empty,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => Filled::Failed,
            };
        }
    }

    /// The bytes of a frame [`FrameReader::next`] returned.
    pub(crate) fn frame(&self, a: usize, b: usize) -> &[u8] {
        &self.buf[a..b]
    }

    /// Takes bytes as a read of the socket would (for the fuzz targets): up to the
    /// room one read has; returns how many it took.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> usize {
        self.make_room();
        let n = bytes.len().min(self.buf.len() - self.end);
        self.buf[self.end..self.end + n].copy_from_slice(&bytes[..n]);
        self.end += n;
        n
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

/// One client connection.
struct Client {
    stream: TcpStream,
    rd: FrameReader,
    out: Outbox,
    /// Its queries on backend connections.
    inflight: usize,
    /// False once it is done sending queries (EOF, idle, bad frame, drain): it closes
    /// when its last answer is written.
    reading: bool,
    /// At its in-flight cap or over [`OUTBOX_LIMIT`]: frames wait unread.
    paused: bool,
    /// The worker is draining: the whole frames already read are forwarded, nothing
    /// more is read.
    draining: bool,
    /// On the worker's list of clients to look at again.
    woken: bool,
    /// Its latest read, or the latest of its queries to finish: an idle client is
    /// one with nothing in flight since.
    last_active: Instant,
    /// The peer closed or reset: read until EOF, not just until a short read.
    hup: bool,
    /// When the frame still incomplete began.
    partial_since: Option<Instant>,
    /// Held while the connection is open (`tcp.max_connections`).
    _permit: OwnedSemaphorePermit,
    /// Held while the connection is open (`tcp.max_connections_per_client`).
    _client_slot: ClientSlot,
    /// When it was accepted (`tcp.max_connection_lifetime_ms`).
    opened: Instant,
    /// Queries read from it (`tcp.max_queries_per_connection`).
    queries: u64,
    /// Once it is done and shut down for writing: held open until the peer has every
    /// answer, or until this deadline ([`LINGER`]) at most.
    linger_until: Option<Instant>,
}

/// A query on a backend connection, waiting for its answer.
struct Pending {
    client: Token,
    client_id: u16,
    key: QuestionKey,
    backend: Arc<BackendRuntime>,
    sent: Instant,
    deadline: Instant,
    /// The query as sent (kept for one retry).
    query: Vec<u8>,
    retried: bool,
    /// The epoch it was forwarded in and its cache key, when its answer may be cached.
    cache: Option<(Epoch, Key)>,
}

type PendingMap = HashMap<u16, Pending, BuildHasherDefault<cache::OwnKeyHasher>>;

/// A pipelined connection to one backend.
struct Upstream {
    /// `None` if connecting failed at once (it is closed at the end of the wake-up).
    stream: Option<TcpStream>,
    addr: SocketAddr,
    /// The connection was established (its queued queries went out).
    connected: bool,
    opened: Instant,
    rd: FrameReader,
    out: Outbox,
    pending: PendingMap,
    next_id: u16,
    last_busy: Instant,
    /// The peer closed or reset: read until EOF, not just until a short read.
    hup: bool,
}

impl Upstream {
    /// Starts connecting to `addr` (non-blocking).
    fn connect(addr: SocketAddr, now: Instant) -> Upstream {
        let (stream, connected) = match start_connect(addr) {
            Ok((s, connected)) => (Some(s), connected),
            Err(e) => {
                tracing::debug!(%addr, "backend tcp connect failed: {e}");
                (None, false)
            }
        };
        Upstream {
            stream,
            addr,
            connected,
            opened: now,
            rd: FrameReader::new(),
            out: Outbox::new(now),
            pending: PendingMap::default(),
            next_id: fastrand::u16(..),
            last_busy: now,
            hup: false,
        }
    }

    /// Finishes a connect that was in progress: Ok(true) once established, Ok(false)
    /// if still in progress.
    fn check_connected(&mut self) -> io::Result<bool> {
        let Some(s) = &self.stream else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        if self.connected {
            return Ok(true);
        }
        if let Some(e) = s.take_error()? {
            return Err(e);
        }
        match s.peer_addr() {
            Ok(_) => {
                self.connected = true;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn free_id(&mut self) -> Option<u16> {
        if self.pending.len() >= usize::from(u16::MAX) {
            return None;
        }
        let mut id = self.next_id;
        while self.pending.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1);
        Some(id)
    }
}

/// Since when every accept has failed for want of resources.
#[derive(Default)]
struct AcceptHealth {
    failing_since: Option<Instant>,
}

impl AcceptHealth {
    /// A connection was accepted, or the queue was found empty.
    fn works(&mut self) {
        self.failing_since = None;
    }

    /// An accept failed; true once they have all failed for [`ACCEPT_FAILING_LIMIT`].
    fn fails(&mut self, now: Instant) -> bool {
        let since = *self.failing_since.get_or_insert(now);
        now.duration_since(since) >= ACCEPT_FAILING_LIMIT
    }
}

/// An accept error that leaves the connection queued: the process is out of
/// descriptors or memory, and every accept fails until that changes.
fn out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// A non-blocking socket connecting (or, rarely at once, connected) to `addr`.
fn start_connect(addr: SocketAddr) -> io::Result<(TcpStream, bool)> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    let connected = match s.connect(&addr.into()) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => false,
        Err(e) => return Err(e),
    };
    Ok((s.into(), connected))
}

/// One TCP worker: everything its thread owns.
pub(crate) struct TcpWorker {
    shared: Arc<Shared>,
    tunables: Arc<Tunables>,
    picker: Picker,
    poller: Poller,
    /// `None` once draining.
    listeners: Vec<Option<TcpListener>>,
    /// Listeners taken out of the poller after an accept error, until the next tick.
    resting: Vec<usize>,
    /// Whether accepting works.
    accepting: AcceptHealth,
    conns: Table<Conn>,
    clients: usize,
    /// Backend connections by address.
    pools: HashMap<SocketAddr, Vec<Token>>,
    /// Connections with bytes to write at the end of the wake-up.
    touched: Vec<Token>,
    /// Clients to look at again: paused ones that got room, finished ones to close.
    woken: Vec<Token>,
    /// Backend connections that failed, to close (retrying their queries). None of
    /// them is in a pool: `retire` takes them out, and `open_upstream` puts a
    /// connection here only instead of pooling it.
    dead: Vec<Token>,
    /// Room for the lists above while they are handled (see `settle`).
    spare_list: Vec<Token>,
    /// Buffers of finished queries, for the next ones.
    spare_queries: Vec<Vec<u8>>,
    /// This worker's packet cache (`None`: off), and room to build a key.
    cache: Option<Cache>,
    key_buf: Vec<u8>,
}

impl TcpWorker {
    pub(crate) fn new(shared: Arc<Shared>, listeners: Vec<TcpListener>) -> io::Result<Self> {
        for l in &listeners {
            l.set_nonblocking(true)?;
        }
        let poller = Poller::with_capacity(EVENTS)?;
        let cache = shared
            .cache
            .enabled()
            .then(|| Cache::new(shared.cache.tcp_entries, shared.cache.max_ttl));
        for (i, l) in listeners.iter().enumerate() {
            poller.add(l.as_fd(), TOKEN_LISTENER | i as u64)?;
        }
        Ok(TcpWorker {
            tunables: shared.tunables.load_full(),
            shared,
            picker: Picker::default(),
            poller,
            listeners: listeners.into_iter().map(Some).collect(),
            resting: Vec::new(),
            accepting: AcceptHealth::default(),
            conns: Table::new(),
            clients: 0,
            pools: HashMap::new(),
            touched: Vec::new(),
            woken: Vec::new(),
            dead: Vec::new(),
            spare_list: Vec::new(),
            spare_queries: Vec::new(),
            cache,
            key_buf: Vec::new(),
        })
    }

    /// Serves until drained (every client finished) or hard-stopped; what is still in
    /// flight then is given up without charging its backend. If its listeners keep
    /// failing, it calls `failing` (which starts the process's shutdown), drains its
    /// connections like a shutdown would, and returns the error.
    pub(crate) fn run(mut self, control: &Control, failing: &dyn Fn()) -> io::Result<()> {
        let result = self.serve(control, failing);
        for t in self.conns.tokens().collect::<Vec<_>>() {
            if let Some(u) = self.conns.upstream(t) {
                for (_, p) in u.pending.drain() {
                    p.backend.on_abandon();
                }
            }
        }
        result
    }

    fn serve(&mut self, control: &Control, failing: &dyn Fn()) -> io::Result<()> {
        self.poller.add(control.fd(), TOKEN_CONTROL)?;
        let mut ready = Vec::new();
        let mut next_tick = Instant::now() + WORKER_TICK;
        let mut draining = false;
        let mut failure = None;
        loop {
            let state = control.state();
            if state == HARD_STOP || (draining && self.clients == 0) {
                return failure.map_or(Ok(()), Err);
            }
            if (state == DRAIN || failure.is_some()) && !draining {
                draining = true;
                self.stop_accepting(Instant::now());
                continue;
            }
            let now = Instant::now();
            if now >= next_tick {
                self.tick(now);
                next_tick = now + WORKER_TICK;
            }
            self.poller
                .wait_events(&mut ready, next_tick.saturating_duration_since(now))?;
            // Before anything that woke it: a query read after a reload returned is
            // handled with the reloaded tunables, on connections open before it too.
            self.shared.refresh_tunables(&mut self.tunables);
            let now = Instant::now();
            for &(token, flags) in &ready {
                match token {
                    TOKEN_CONTROL => control.clear(),
                    t if t & TOKEN_LISTENER != 0 => {
                        if let Err(e) = self.accept((t & !TOKEN_LISTENER) as usize, now) {
                            if failure.is_none() {
                                tracing::error!(
                                    "data-plane worker failing: TCP accept: {e}; draining its connections"
                                );
                                failing();
                                failure = Some(e);
                            }
                        }
                    }
                    t => self.ready(Token(t), flags & HUP != 0, now),
                }
            }
            self.settle(now);
        }
    }

    /// Closes the listeners and lets every client finish the queries it has sent.
    fn stop_accepting(&mut self, now: Instant) {
        for l in self.listeners.iter_mut() {
            if let Some(l) = l.take() {
                let _ = self.poller.remove(l.as_fd());
            }
        }
        for t in self.conns.tokens().collect::<Vec<_>>() {
            if let Some(c) = self.conns.client(t) {
                c.draining = true;
                queue(&mut self.woken, t, &mut c.woken);
            }
        }
        self.settle(now);
    }

    fn accept(&mut self, index: usize, now: Instant) -> io::Result<()> {
        for _ in 0..ACCEPTS_PER_EVENT {
            let Some(listener) = &self.listeners[index] else {
                return Ok(());
            };
            let (stream, peer) = match listener.accept() {
                Ok(accepted) => {
                    self.accepting.works();
                    accepted
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The queue is empty: accepting works.
                    self.accepting.works();
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if !out_of_resources(&e) => {
                    // ECONNABORTED, EPROTO, EPERM (a firewall) and the network errors
                    // Linux passes on: that connection only.
                    tracing::debug!("tcp accept error (one connection): {e}");
                    continue;
                }
                Err(e) => {
                    // EMFILE and friends: the connection stays queued. Rest the
                    // listener until the next tick and go on, unless accepting has
                    // failed for too long.
                    tracing::warn!("tcp accept error: {e}");
                    if self.accepting.fails(now) {
                        return Err(e);
                    }
                    self.poller.remove(listener.as_fd())?;
                    self.resting.push(index);
                    return Ok(());
                }
            };
            let metrics = &self.shared.metrics;
            let tun = &self.tunables.tcp;
            if !self.tunables.acl.allows(peer.ip()) {
                metrics.drop_tcp(Drop::Acl);
                continue;
            }
            let Some(client_slot) = self
                .shared
                .client_connections
                .try_acquire(peer.ip(), tun.max_connections_per_client)
            else {
                metrics.drop_tcp(Drop::ClientConnections);
                continue;
            };
            let Ok(permit) = self.shared.tcp_connections.clone().try_acquire_owned() else {
                metrics.drop_tcp(Drop::TooManyConnections);
                continue;
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = stream.set_nodelay(true);
            metrics.tcp_connections.increment(1);
            let t = self.conns.insert(Conn::Client(Box::new(Client {
                stream,
                rd: FrameReader::new(),
                out: Outbox::new(now),
                inflight: 0,
                reading: true,
                paused: false,
                draining: false,
                woken: false,
                last_active: now,
                hup: false,
                partial_since: None,
                _permit: permit,
                _client_slot: client_slot,
                opened: now,
                queries: 0,
                linger_until: None,
            })));
            // Bytes that arrived before registering are reported at once.
            let fd = self.conns.get_mut(t).and_then(|c| c.fd());
            if let Err(e) = fd.map_or(Ok(()), |fd| self.poller.add_stream(fd, t.0)) {
                tracing::warn!("tcp connection not registered: {e}");
                self.conns.release(t);
                continue;
            }
            self.clients += 1;
            metrics.tcp_open.increment(1.0);
        }
        Ok(())
    }

    /// A connection's descriptor is ready (readable, writable, or closed: `hup`).
    fn ready(&mut self, t: Token, hup: bool, now: Instant) {
        match self.conns.take(t) {
            Some(Conn::Client(mut c)) => {
                c.hup |= hup;
                if !c.out.buf.is_empty() {
                    c.out.write(&c.stream, now);
                    self.after_client_write(t, &mut c);
                }
                self.read_client(t, &mut c, now);
                if !c.reading {
                    queue(&mut self.woken, t, &mut c.woken);
                }
                self.conns.put(t, Conn::Client(c));
            }
            Some(Conn::Upstream(mut u)) => {
                u.hup |= hup;
                let ok = self.read_upstream(&mut u, now);
                self.conns.put(t, Conn::Upstream(u));
                if !ok {
                    self.retire(t);
                }
            }
            None => {}
        }
    }

    /// Forwards every whole frame buffered, then reads what the socket has, until a
    /// read leaves the socket empty, the client pauses or it is done.
    fn read_client(&mut self, t: Token, c: &mut Client, now: Instant) {
        let mut forwarded = false;
        loop {
            forwarded |= self.client_frames(t, c, now);
            if !c.reading || c.paused || c.out.failed {
                break;
            }
            if c.draining {
                // Every whole frame read is forwarded; a partial one is dropped.
                c.reading = false;
                break;
            }
            match c.rd.fill(&c.stream) {
                Filled::Read(more) => {
                    c.last_active = now;
                    if !more && !c.hup {
                        forwarded |= self.client_frames(t, c, now);
                        break;
                    }
                }
                Filled::Empty => break,
                Filled::Eof => {
                    if c.rd.has_partial() {
                        self.shared.metrics.drop_tcp(Drop::PartialFrame);
                    }
                    c.reading = false;
                }
                Filled::Failed => c.reading = false,
            }
        }
        // The frame still incomplete began with this read if one before it was
        // finished.
        c.partial_since = match (c.rd.has_partial(), c.partial_since) {
            (false, _) => None,
            (true, None) => Some(now),
            (true, _) if forwarded => Some(now),
            (true, started) => started,
        };
    }

    /// Forwards the whole frames buffered while the client is under its caps.
    /// Returns whether it took any.
    fn client_frames(&mut self, t: Token, c: &mut Client, now: Instant) -> bool {
        let tun = self.tunables.clone();
        let mut took = false;
        // A client whose connection failed is closed at the end of the wake-up:
        // nothing more of it is forwarded.
        while c.reading && !c.out.failed {
            if c.queries >= tun.tcp.max_queries_per_connection {
                // Its last query is answered, then it is closed.
                c.reading = false;
                return took;
            }
            if c.inflight >= tun.tcp.max_inflight_per_connection || c.out.buf.len() > OUTBOX_LIMIT {
                c.paused = true;
                return took;
            }
            match c.rd.next(tun.tcp.max_message_size) {
                Next::Frame(a, b) => {
                    took = true;
                    c.queries += 1;
                    if !self.on_query(t, c, a, b, &tun, now) {
                        c.reading = false;
                    }
                }
                Next::Partial => return took,
                Next::Bad => {
                    self.shared.metrics.drop_tcp(Drop::BadLength);
                    c.reading = false;
                }
            }
        }
        took
    }

    /// Handles the query frame at `c.rd.buf[a..b]`. Returns false if the connection
    /// must close.
    fn on_query(
        &mut self,
        t: Token,
        c: &mut Client,
        a: usize,
        b: usize,
        tun: &Tunables,
        now: Instant,
    ) -> bool {
        let metrics = &self.shared.metrics;
        metrics.queries_tcp.increment(1);
        let msg = &mut c.rd.buf[a..b];
        let q = match packet::parse_query(msg) {
            Ok(q) => q,
            Err(d) => {
                // Garbage on a stream loses the framing: close this connection only.
                metrics.drop_tcp(d);
                return false;
            }
        };
        let snap = self.shared.set.load();
        let mut cached = None;
        if let Some(cache) = &mut self.cache {
            let epoch = self.shared.cache_epoch(snap.generation);
            match cache.probe(msg, &q, Transport::Tcp, &mut self.key_buf, epoch, now) {
                Probe::Hit(answer, name_end) => {
                    let at = c.out.buf.len() + 2;
                    c.out.push(answer, now);
                    // Not pushed if writing to the client failed (it is closing).
                    if c.out.buf.len() == at + answer.len() {
                        cache::address_to(&mut c.out.buf[at..], msg, name_end);
                    }
                    queue(&mut self.touched, t, &mut c.out.queued);
                    return true;
                }
                Probe::Miss(epoch, key) => cached = Some((epoch, key)),
                Probe::Never => {}
            }
        }
        let backend = match snap.pick(tun.policy, &mut self.picker) {
            Some(e) => e.runtime.clone(),
            None => {
                metrics.no_backend_tcp.increment(1);
                let n = packet::servfail_in_place(msg, q.question_end);
                c.out.push(&msg[..n], now);
                queue(&mut self.touched, t, &mut c.out.queued);
                return true;
            }
        };
        c.inflight += 1;
        let query = self.query_buffer(msg);
        let p = Pending {
            client: t,
            client_id: q.id,
            key: q.key,
            backend,
            sent: now,
            deadline: now + Duration::from_millis(tun.query_timeout_ms),
            query,
            retried: false,
            cache: cached,
        };
        p.backend.on_forward();
        if self.send_upstream(p, None, now).is_err() {
            c.inflight -= 1;
        }
        true
    }

    /// Queues a query on a connection to its backend (`on`, or one from the pool),
    /// written at the end of the wake-up. Err(client) if it had to be given up.
    fn send_upstream(
        &mut self,
        mut p: Pending,
        on: Option<Token>,
        now: Instant,
    ) -> Result<(), Token> {
        let u = match on {
            Some(u) => u,
            None => self.upstream_for(p.backend.address, now),
        };
        let up = self
            .conns
            .upstream(u)
            .expect("a pooled connection is in the table");
        let Some(id) = up.free_id() else {
            // 65535 queries on one connection: give this one up.
            p.backend.on_abandon();
            return Err(p.client);
        };
        packet::set_id(&mut p.query, id);
        up.out.push(&p.query, now);
        up.pending.insert(id, p);
        up.last_busy = now;
        queue(&mut self.touched, u, &mut up.out.queued);
        Ok(())
    }

    /// A connection to `addr` with room for one more query, opening one if allowed.
    fn upstream_for(&mut self, addr: SocketAddr, now: Instant) -> Token {
        let tun = &self.tunables.tcp;
        let pool = self.pools.entry(addr).or_default();
        let conns = &mut self.conns;
        let best = pool
            .iter()
            .filter_map(|&t| Some((t, conns.upstream(t)?.pending.len())))
            .min_by_key(|&(_, load)| load);
        match best {
            Some((t, load)) if load < tun.backend_pipeline => t,
            Some((t, _)) if pool.len() >= tun.backend_max_connections => t,
            _ => self.open_upstream(addr, now),
        }
    }

    /// Opens a new connection to `addr` and adds it to the pool.
    fn open_upstream(&mut self, addr: SocketAddr, now: Instant) -> Token {
        let up = Upstream::connect(addr, now);
        let t = self.conns.insert(Conn::Upstream(Box::new(up)));
        let fd = self.conns.get_mut(t).and_then(|c| c.fd());
        let registered = fd.is_some_and(|fd| self.poller.add_stream(fd, t.0).is_ok());
        if registered {
            self.pools.entry(addr).or_default().push(t);
        } else {
            // Its queries move to another backend when it is closed, at the end of
            // the wake-up; it takes no more meanwhile.
            self.dead.push(t);
        }
        t
    }

    /// Takes a backend connection out of its pool, so that no query (a retry above
    /// all) goes on it, and closes it at the end of the wake-up.
    fn retire(&mut self, t: Token) {
        let Some(addr) = self.conns.upstream(t).map(|u| u.addr) else {
            return;
        };
        if let Some(pool) = self.pools.get_mut(&addr) {
            pool.retain(|&x| x != t);
            if pool.is_empty() {
                self.pools.remove(&addr);
            }
        }
        self.dead.push(t);
    }
}

impl TcpWorker {
    /// Writes what a backend connection has queued, reads its answers and hands them
    /// to their clients. Returns false if the connection is dead.
    fn read_upstream(&mut self, u: &mut Upstream, now: Instant) -> bool {
        match u.check_connected() {
            Ok(true) => {}
            Ok(false) => return true,
            Err(e) => {
                tracing::debug!(addr = %u.addr, "backend tcp connect failed: {e}");
                return false;
            }
        }
        let Some(s) = &u.stream else { return false };
        if !u.out.buf.is_empty() {
            u.out.write(s, now);
            if u.out.failed {
                return false;
            }
        }
        loop {
            let Some(s) = &u.stream else { return false };
            match u.rd.fill(s) {
                Filled::Read(more) => {
                    u.last_busy = now;
                    if !self.answers(u, now) {
                        return false;
                    }
                    if !more && !u.hup {
                        break;
                    }
                }
                Filled::Empty => break,
                Filled::Eof | Filled::Failed => return false,
            }
        }
        if !u.rd.has_partial() && !u.pending.is_empty() {
            // Everything received is consumed and more answers are due: ACK at once.
            // Without this, delayed ACKs meet the backend's Nagle (BIND does not set
            // TCP_NODELAY) and pipelined answers stall: 40 ms per round for a client
            // that waits for two answers at a time (the test
            // pipelined_answers_are_not_held_back_by_a_delayed_ack), and under load
            // answers wait for the next query to carry the ACK. Measured at 20k qps:
            // without it, 15.1-16.0 instead of 17.6-18.0 µs of CPU per query (the
            // answers come with the ACK a query carries, while this thread is awake),
            // but 2.3-3.2 instead of 0.66-0.84 ms average latency (nginx, which does
            // not do this: 0.8-1.3 ms). Sending the ACK only if no query carried it within
            // a millisecond cost as much CPU as this. With nothing else due, the next
            // query carries the ACK.
            if let Some(s) = &u.stream {
                let _ = socket2::SockRef::from(s).set_tcp_quickack(true);
            }
        }
        true
    }

    /// Hands every whole answer buffered on a backend connection to its client.
    /// Returns false if the stream lost its framing (the answers before are sent).
    fn answers(&mut self, u: &mut Upstream, now: Instant) -> bool {
        loop {
            let (a, b) = match u.rd.next(packet::MAX_MESSAGE) {
                Next::Frame(a, b) => (a, b),
                Next::Partial => return true,
                Next::Bad => {
                    self.shared.metrics.drop_tcp(Drop::BadLength);
                    return false;
                }
            };
            let msg = &mut u.rd.buf[a..b];
            let id = packet::id(msg);
            let verdict = match u.pending.get(&id) {
                None => Err(Drop::UnknownId),
                Some(p) => packet::response_matches(msg, &p.key),
            };
            if let Err(d) = verdict {
                self.shared.metrics.drop_tcp(d);
                continue;
            }
            let p = u.pending.remove(&id).expect("checked");
            if let (Some(cache), Some((epoch, key))) = (&mut self.cache, p.cache) {
                cache::fill_key(&p.query, key.name_end, Transport::Tcp, &mut self.key_buf);
                cache.store(epoch, &key, &self.key_buf, msg, packet::MAX_MESSAGE, now);
            }
            packet::set_id(msg, p.client_id);
            p.backend.on_response(packet::rcode(msg), p.sent, now);
            if let Some(c) = self.conns.client(p.client) {
                c.out.push(msg, now);
                queue(&mut self.touched, p.client, &mut c.out.queued);
                done(&mut self.woken, p.client, c, now);
            }
            self.recycle(p.query);
        }
    }

    /// A query of client `t` finished without an answer (expired or given up).
    fn client_done(&mut self, t: Token, now: Instant) {
        if let Some(c) = self.conns.client(t) {
            done(&mut self.woken, t, c, now);
        }
    }

    /// After writing to a client: look at it again if that changes what it may do.
    fn after_client_write(&mut self, t: Token, c: &mut Client) {
        let room = c.paused && c.out.buf.len() <= OUTBOX_LIMIT;
        let finished = !c.reading && c.out.buf.is_empty();
        if c.out.failed || room || finished {
            queue(&mut self.woken, t, &mut c.woken);
        }
    }

    /// Until nothing is left to do: closes dead backend connections (retrying their
    /// queries), resumes or closes the clients woken, writes every outbox touched.
    fn settle(&mut self, now: Instant) {
        while !(self.dead.is_empty() && self.woken.is_empty() && self.touched.is_empty()) {
            // Each list is handled from the spare one, whose room it gets meanwhile:
            // new entries go on while the old ones are handled, and no wake-up
            // allocates.
            let mut batch = std::mem::take(&mut self.spare_list);
            std::mem::swap(&mut batch, &mut self.dead);
            for t in batch.drain(..) {
                self.close_upstream(t, now);
            }
            std::mem::swap(&mut batch, &mut self.woken);
            for t in batch.drain(..) {
                self.wake_client(t, now);
            }
            // Counted before the answers are written: a client that sees one sees it
            // counted.
            if let Some(c) = &mut self.cache {
                c.report(&self.shared.metrics, Transport::Tcp);
            }
            std::mem::swap(&mut batch, &mut self.touched);
            for t in batch.drain(..) {
                self.flush(t, now);
            }
            self.spare_list = batch;
        }
    }

    /// A buffer for a query kept for its retry (from those of finished queries).
    fn query_buffer(&mut self, msg: &[u8]) -> Vec<u8> {
        let mut b = self.spare_queries.pop().unwrap_or_default();
        b.clear();
        b.extend_from_slice(msg);
        b
    }

    /// Keeps a finished query's buffer for the next query.
    fn recycle(&mut self, query: Vec<u8>) {
        if self.spare_queries.len() < SPARE_QUERIES && query.capacity() <= 4096 {
            self.spare_queries.push(query);
        }
    }

    /// Resumes a paused client that has room again; closes one that is finished.
    fn wake_client(&mut self, t: Token, now: Instant) {
        let mut c = match self.conns.take(t) {
            Some(Conn::Client(c)) => c,
            Some(other) => return self.conns.put(t, other),
            None => return,
        };
        c.woken = false;
        let max_inflight = self.tunables.tcp.max_inflight_per_connection;
        let room = c.inflight < max_inflight && c.out.buf.len() <= OUTBOX_LIMIT;
        if !c.out.failed && ((c.paused && room) || (c.draining && c.reading && !c.paused)) {
            c.paused = false;
            self.read_client(t, &mut c, now);
        }
        // A client that failed is gone; one that is done sending and has every
        // answer written is shut down for writing and closed once the peer has every
        // answer (it lingers until then). Otherwise it waits for answers (or the tick).
        let finished = !c.reading && c.inflight == 0 && c.out.buf.is_empty();
        if finished && !c.out.failed && !lingered(&mut c, now) {
            self.conns.put(t, Conn::Client(c));
            return;
        }
        if c.out.failed || finished {
            self.conns.release(t);
            self.clients -= 1;
            self.shared.metrics.tcp_open.decrement(1.0);
            tracing::trace!("tcp connection closed");
            return;
        }
        self.conns.put(t, Conn::Client(c));
    }

    /// Writes an outbox queued during the wake-up.
    fn flush(&mut self, t: Token, now: Instant) {
        match self.conns.take(t) {
            Some(Conn::Client(mut c)) => {
                c.out.queued = false;
                c.out.write(&c.stream, now);
                self.after_client_write(t, &mut c);
                self.conns.put(t, Conn::Client(c));
            }
            Some(Conn::Upstream(mut u)) => {
                u.out.queued = false;
                // A connection still connecting sends its queue once connected.
                if let (true, Some(s)) = (u.connected, &u.stream) {
                    u.out.write(s, now);
                }
                let failed = u.out.failed;
                self.conns.put(t, Conn::Upstream(u));
                if failed {
                    self.retire(t);
                }
            }
            None => {}
        }
    }

    /// Closes a backend connection. The queries on it get one retry, within their
    /// deadline: on a fresh connection if this one had been open (idle close, reset),
    /// on another backend if it never connected. A connection that never connected
    /// charges its backend one timeout, however many queries were waiting for it.
    fn close_upstream(&mut self, t: Token, now: Instant) {
        let u = match self.conns.take(t) {
            Some(Conn::Upstream(u)) => u,
            Some(other) => return self.conns.put(t, other),
            None => return,
        };
        self.conns.release(t);
        let (addr, connected) = (u.addr, u.connected);
        let lost: Vec<Pending> = u.pending.into_values().collect();
        // The refusal is charged as of the latest query that waited for the
        // connection: it counts toward the backend's streak unless the backend
        // answered since.
        let latest = lost.iter().map(|p| p.sent).max();
        let tun = self.tunables.clone();
        let mut charged = false;
        // Retries on the same backend go on one new connection: any other pooled one
        // may be about to fail as well (a backend restart resets them all).
        let mut fresh = None;
        for mut p in lost {
            // Out of retries or out of time: the query is over, unanswered.
            let over = p.retried || p.deadline <= now;
            if connected {
                if over {
                    p.backend.on_timeout(p.sent);
                    self.client_done(p.client, now);
                    continue;
                }
            } else {
                if charged {
                    p.backend.on_abandon();
                } else {
                    p.backend.on_timeout(latest.unwrap_or(p.sent));
                    charged = true;
                }
                if over {
                    self.client_done(p.client, now);
                    continue;
                }
                let other = self
                    .shared
                    .set
                    .load()
                    .pick_other(tun.policy, &mut self.picker, addr)
                    .map(|e| e.runtime.clone());
                if let Some(other) = other {
                    p.backend = other;
                }
                p.backend.on_forward();
                p.sent = now;
            }
            p.retried = true;
            let on = if connected {
                Some(*fresh.get_or_insert_with(|| self.open_upstream(addr, now)))
            } else {
                None
            };
            if let Err(c) = self.send_upstream(p, on, now) {
                self.client_done(c, now);
            }
        }
    }

    /// Picks up reloaded tunables, puts rested listeners back, and enforces the
    /// timers: idle and half-sent clients, clients that do not read their answers,
    /// queries past their deadline, connects that take too long, idle backend
    /// connections.
    fn tick(&mut self, now: Instant) {
        self.shared.refresh_tunables(&mut self.tunables);
        for i in std::mem::take(&mut self.resting) {
            if let Some(l) = &self.listeners[i] {
                if let Err(e) = self.poller.add(l.as_fd(), TOKEN_LISTENER | i as u64) {
                    tracing::warn!("tcp listener not re-registered: {e}");
                    self.resting.push(i);
                }
            }
        }
        let tun = self.tunables.clone();
        let idle = Duration::from_millis(tun.tcp.idle_timeout_ms);
        let lifetime = Duration::from_millis(tun.tcp.max_connection_lifetime_ms);
        let connect_timeout = Duration::from_millis(tun.query_timeout_ms);
        let backend_idle = Duration::from_millis(tun.tcp.backend_idle_timeout_ms);
        let (mut expired, mut retired) = (Vec::new(), Vec::new());
        for t in self.conns.tokens().collect::<Vec<_>>() {
            match self.conns.get_mut(t) {
                Some(Conn::Client(c)) => {
                    if c.linger_until.is_some() {
                        // Whether the peer has every answer now (or its time is up).
                        queue(&mut self.woken, t, &mut c.woken);
                        continue;
                    }
                    if c.reading && !c.paused {
                        let half_sent = c.partial_since.is_some_and(|p| p + idle <= now);
                        let quiet = c.inflight == 0 && c.last_active + idle <= now;
                        if half_sent {
                            self.shared.metrics.drop_tcp(Drop::PartialFrame);
                        }
                        // Old enough: reads no more, closes once its answers are
                        // written (a frame half read is dropped with it).
                        let old = c.opened + lifetime <= now;
                        if half_sent || old || (quiet && !c.rd.has_partial()) {
                            c.reading = false;
                            queue(&mut self.woken, t, &mut c.woken);
                        }
                    }
                    // Answers the client has not taken for `idle`: it is gone.
                    let stuck = !c.out.buf.is_empty() && c.out.progress + idle <= now;
                    if stuck && (c.out.buf.len() > OUTBOX_LIMIT || !c.reading) {
                        c.out.failed = true;
                        c.out.buf = Vec::new();
                        queue(&mut self.woken, t, &mut c.woken);
                    }
                }
                Some(Conn::Upstream(u)) => {
                    // Its queries are dealt with when it is closed (one charge).
                    if !u.connected && u.opened + connect_timeout <= now {
                        retired.push(t);
                        continue;
                    }
                    for (_, p) in u.pending.extract_if(|_, p| p.deadline <= now) {
                        p.backend.on_timeout(p.sent);
                        expired.push((p.client, p.query));
                    }
                    if u.connected && u.pending.is_empty() && u.last_busy + backend_idle <= now {
                        retired.push(t);
                    }
                }
                None => {}
            }
        }
        for (c, query) in expired {
            self.client_done(c, now);
            self.recycle(query);
        }
        for t in retired {
            self.retire(t);
        }
        self.settle(now);
    }
}

/// A finished client: shuts it down for writing (the first time), discards what it
/// still sends, and says whether it may be closed now: the peer has acknowledged
/// every answer (a reset can then lose none), or closed, or [`LINGER`] is over.
fn lingered(c: &mut Client, now: Instant) -> bool {
    let until = *c.linger_until.get_or_insert_with(|| {
        let _ = c.stream.shutdown(std::net::Shutdown::Write);
        now + LINGER
    });
    // At most 64 KiB a wake-up (the tick comes back for more), so a peer that keeps
    // sending cannot hold the worker.
    let mut sink = [0u8; 4096];
    let mut peer_closed = false;
    for _ in 0..16 {
        match (&c.stream).read(&mut sink) {
            Ok(0) => peer_closed = true,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => peer_closed = true,
        }
        break;
    }
    // After the shutdown the FIN counts as one byte: at most one left means the peer
    // has acknowledged every answer (its acknowledgment of the FIN may be delayed).
    peer_closed || now >= until || batch::unacknowledged(c.stream.as_fd()).is_none_or(|n| n <= 1)
}

/// One of client `t`'s queries finished: look at the client again if it was waiting
/// for that (paused at its cap, or done sending).
fn done(woken: &mut Vec<Token>, t: Token, c: &mut Client, now: Instant) {
    c.inflight = c.inflight.saturating_sub(1);
    c.last_active = now;
    if c.paused || !c.reading {
        queue(woken, t, &mut c.woken);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_goes_stale_when_its_connection_is_released_and_the_slot_reused() {
        let mut t: Table<&str> = Table::new();
        let a = t.insert("a");
        let b = t.insert("b");
        assert_eq!(t.get_mut(a), Some(&mut "a"));
        t.release(a);
        assert_eq!(t.get_mut(a), None);
        let c = t.insert("c");
        assert_eq!(c.slot(), a.slot(), "the slot is reused");
        assert_eq!(
            t.get_mut(a),
            None,
            "the old token does not reach the new one"
        );
        assert_eq!(t.take(a), None);
        assert_eq!(t.get_mut(c), Some(&mut "c"));
        assert_eq!(t.tokens().collect::<Vec<_>>(), vec![c, b]);
    }

    #[test]
    fn a_connection_taken_out_keeps_its_slot_until_put_back_or_released() {
        let mut t: Table<&str> = Table::new();
        let a = t.insert("a");
        assert_eq!(t.take(a), Some("a"));
        let b = t.insert("b");
        assert_ne!(a.slot(), b.slot(), "a taken slot is not free");
        assert_eq!(t.tokens().collect::<Vec<_>>(), vec![b]);
        t.put(a, "a again");
        assert_eq!(t.get_mut(a), Some(&mut "a again"));
        assert_eq!(t.take(a), Some("a again"));
        t.release(a);
        t.release(a);
        assert_eq!(t.free, vec![a.slot()], "released once");
    }

    #[test]
    fn accepting_fails_only_after_failing_without_a_break_for_the_limit() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut a = AcceptHealth::default();
        assert!(!a.fails(t0));
        assert!(!a.fails(t0 + 9 * s));
        assert!(a.fails(t0 + ACCEPT_FAILING_LIMIT));
        // Two errors far apart, with the queue found empty between them, are not a
        // failing listener.
        let mut a = AcceptHealth::default();
        assert!(!a.fails(t0));
        a.works();
        assert!(!a.fails(t0 + 30 * s));
        assert!(!a.fails(t0 + 39 * s));
        assert!(a.fails(t0 + 40 * s));
    }

    #[test]
    fn only_resource_errors_count_against_accepting() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(
                out_of_resources(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        for errno in [
            libc::ECONNABORTED,
            libc::EPROTO,
            libc::EPERM,
            libc::ENETDOWN,
        ] {
            assert!(
                !out_of_resources(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
    }

    #[test]
    fn tokens_never_collide_with_the_listener_and_control_tokens() {
        let t = Token::new(u32::MAX as usize, u32::MAX);
        assert_eq!(t.0 & (TOKEN_CONTROL | TOKEN_LISTENER), 0);
    }

    #[test]
    fn frames_are_cut_at_their_length_prefix_and_bad_lengths_are_reported() {
        let mut r = FrameReader::new();
        let frame = |len: usize| {
            let mut f = (len as u16).to_be_bytes().to_vec();
            f.extend(std::iter::repeat_n(7u8, len));
            f
        };
        let mut bytes = frame(12);
        bytes.extend(frame(20));
        bytes.extend(&frame(30)[..10]);
        r.buf[..bytes.len()].copy_from_slice(&bytes);
        r.end = bytes.len();
        assert!(matches!(r.next(100), Next::Frame(2, 14)));
        assert!(matches!(r.next(100), Next::Frame(16, 36)));
        assert!(matches!(r.next(100), Next::Partial));
        assert!(r.has_partial());
        // A partial frame near the end of the buffer is moved to the front.
        r.start = 0;
        r.end = 0;
        let big = frame(packet::HEADER_LEN);
        let at = r.buf.len() - 5;
        r.buf[at..].copy_from_slice(&big[..5]);
        (r.start, r.end) = (at, r.buf.len());
        r.make_room();
        assert_eq!((r.start, r.end), (0, 5));
        assert_eq!(&r.buf[..5], &big[..5]);
        // Lengths below a header or above the limit lose the framing.
        let mut r = FrameReader::new();
        r.buf[..2].copy_from_slice(&5u16.to_be_bytes());
        r.end = 2;
        assert!(matches!(r.next(100), Next::Bad));
        r.buf[..2].copy_from_slice(&101u16.to_be_bytes());
        assert!(matches!(r.next(100), Next::Bad));
    }
}
