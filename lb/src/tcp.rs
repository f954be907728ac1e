//! The TCP path (RFC 7766). Each worker accepts on its own SO_REUSEPORT listeners.
//! A client connection is read frame by frame; every query is forwarded concurrently,
//! so pipelined queries are answered as their answers arrive, in any order, through
//! one writer that coalesces responses into few writes.
//!
//! Towards backends each worker keeps a small pool of long-lived connections per
//! backend address and pipelines queries on them with IDs of its own. A connection
//! that dies with queries on it has them retried once on a fresh connection; an idle
//! one is closed before BIND's own idle timeout would.
//!
//! Limits: `tcp.max_connections` (over all workers), `max_inflight_per_connection`
//! (reading pauses above it), `idle_timeout_ms` (no query in flight, or a frame half
//! sent), `max_message_size` (larger length prefixes close the connection).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
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

    /// Forgets closed backend connections (run on the worker's tick).
    pub(crate) fn prune(&self) {
        self.pools.borrow_mut().retain(|_, v| {
            v.retain(|u| !u.closed.get());
            !v.is_empty()
        });
    }

    /// A connection to `addr` with room for one more query, opening one if allowed.
    fn upstream(
        &self,
        addr: SocketAddr,
        tun: &Tunables,
        metrics: &crate::metrics::DataPlane,
    ) -> Rc<Upstream> {
        let mut pools = self.pools.borrow_mut();
        let pool = pools.entry(addr).or_default();
        pool.retain(|u| !u.closed.get());
        let best = pool.iter().min_by_key(|u| u.pending.get()).cloned();
        match best {
            Some(u) if u.pending.get() < tun.tcp.backend_pipeline => u,
            Some(u) if pool.len() >= tun.tcp.backend_max_connections => u,
            _ => {
                let u = Upstream::spawn(addr, tun, metrics.clone());
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
        let _ = stream.set_nodelay(true);
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

/// Outcome of reading one frame.
enum Frame {
    Message(Vec<u8>),
    /// Clean end: EOF between frames, reset, idle timeout.
    End,
    Bad(Drop),
}

/// Reads one length-prefixed message. Waiting for the first byte may last forever
/// while `busy()` (queries in flight); otherwise `idle` ends the connection. Once a
/// frame has started, all of it must arrive within `idle`.
async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    idle: Duration,
    max: usize,
    busy: impl Fn() -> bool,
) -> Frame {
    loop {
        match timeout(idle, rd.fill_buf()).await {
            Ok(Ok([])) | Ok(Err(_)) => return Frame::End,
            Ok(Ok(_)) => break,
            Err(_) if busy() => continue,
            Err(_) => return Frame::End,
        }
    }
    let body = async {
        let len = usize::from(rd.read_u16().await?);
        if !(packet::HEADER_LEN..=max).contains(&len) {
            return Ok(Err(Drop::BadLength));
        }
        let mut msg = vec![0u8; len];
        rd.read_exact(&mut msg).await?;
        Ok::<_, io::Error>(Ok(msg))
    };
    match timeout(idle, body).await {
        Ok(Ok(Ok(msg))) => Frame::Message(msg),
        Ok(Ok(Err(d))) => Frame::Bad(d),
        Ok(Err(_)) | Err(_) => Frame::Bad(Drop::PartialFrame),
    }
}

/// Writes frames from `rx` until every sender is gone, flushing only when no more are
/// queued so that answers arriving together leave in one segment.
async fn write_frames<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
) -> io::Result<()> {
    let mut wr = BufWriter::with_capacity(16 * 1024, wr);
    while let Some(msg) = rx.recv().await {
        wr.write_all(&(msg.len() as u16).to_be_bytes()).await?;
        wr.write_all(&msg).await?;
        if rx.is_empty() {
            wr.flush().await?;
        }
    }
    wr.flush().await?;
    wr.into_inner().shutdown().await
}

async fn serve_client(w: &Rc<Worker>, stream: TcpStream, cancel: CancellationToken) {
    let tun = w.tunables();
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(16 * 1024, rd);
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::task::spawn_local(write_frames(wr, rx));
    let max_inflight = tun.tcp.max_inflight_per_connection;
    let inflight = Arc::new(Semaphore::new(max_inflight));
    let idle = Duration::from_millis(tun.tcp.idle_timeout_ms);
    loop {
        let busy = || inflight.available_permits() < max_inflight;
        let frame = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            f = read_frame(&mut rd, idle, tun.tcp.max_message_size, busy) => f,
        };
        let msg = match frame {
            Frame::Message(m) => m,
            Frame::End => break,
            Frame::Bad(d) => {
                w.shared.metrics.drop_tcp(d);
                break;
            }
        };
        w.shared.metrics.queries_tcp.increment(1);
        let q = match packet::parse_query(&msg) {
            Ok(q) => q,
            Err(d) => {
                // Garbage on a stream loses the framing: close this connection only.
                w.shared.metrics.drop_tcp(d);
                break;
            }
        };
        let permit: OwnedSemaphorePermit = match inflight.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => break,
        };
        let w2 = w.clone();
        let tx2 = tx.clone();
        tokio::task::spawn_local(async move {
            if let Some(resp) = forward(&w2, msg, q).await {
                let _ = tx2.send(resp);
            }
            drop(permit);
        });
    }
    // Let the queries in flight finish; the writer ends when the last sender is gone.
    drop(tx);
    if let Err(e) = writer.await.unwrap_or_else(|e| Err(io::Error::other(e))) {
        tracing::trace!("tcp write to client failed: {e}");
    }
}

/// Sends one query to a backend and returns the answer with the client's ID, a
/// SERVFAIL if no backend is usable, or `None` if the query timed out.
async fn forward(w: &Rc<Worker>, mut msg: Vec<u8>, q: packet::Query) -> Option<Vec<u8>> {
    let tun = w.tunables();
    let mut backend: Arc<BackendRuntime> = {
        let snap = w.shared.set.load();
        let picked = snap.pick(tun.policy, &mut w.picker.borrow_mut());
        match picked {
            Some(e) => e.runtime.clone(),
            None => {
                w.shared.metrics.no_backend_tcp.increment(1);
                let n = packet::servfail_in_place(&mut msg, q.question_end);
                msg.truncate(n);
                return Some(msg);
            }
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(tun.query_timeout_ms);
    backend.on_forward();
    let mut sent = Instant::now();
    for attempt in 0..2 {
        let up = w.tcp.upstream(backend.address, &tun, &w.shared.metrics);
        match up.query(msg.clone(), q.key, deadline).await {
            Ok(mut resp) => {
                packet::set_id(&mut resp, q.id);
                backend.on_response(packet::rcode(&resp), sent.elapsed());
                return Some(resp);
            }
            Err(UpError::Lost) if attempt == 0 => {
                if up.connected.get() {
                    continue; // an open connection closed (idle, reset): retry on a new one
                }
                // The backend refused the connection: charge it (passive health) and
                // retry the query on another backend, if there is one.
                let snap = w.shared.set.load();
                let other = snap
                    .pick_other(tun.policy, &mut w.picker.borrow_mut(), backend.address)
                    .map(|e| e.runtime.clone());
                if let Some(other) = other {
                    backend.on_timeout(tun.fall);
                    backend = other;
                    backend.on_forward();
                    sent = Instant::now();
                }
            }
            Err(_) => break,
        }
    }
    backend.on_timeout(tun.fall);
    None
}

#[derive(Debug)]
enum UpError {
    /// The connection closed (or never opened) before the answer came.
    Lost,
    /// No answer by the deadline.
    Timeout,
}

struct Request {
    msg: Vec<u8>,
    key: QuestionKey,
    reply: oneshot::Sender<Vec<u8>>,
}

/// A pipelined connection to one backend, driven by its own task.
struct Upstream {
    tx: mpsc::UnboundedSender<Request>,
    pending: Cell<usize>,
    closed: Cell<bool>,
    /// The connection was established (a loss after that is not a refusal).
    connected: Cell<bool>,
}

impl Upstream {
    fn spawn(addr: SocketAddr, tun: &Tunables, metrics: crate::metrics::DataPlane) -> Rc<Upstream> {
        let (tx, rx) = mpsc::unbounded_channel();
        let up = Rc::new(Upstream {
            tx,
            pending: Cell::new(0),
            closed: Cell::new(false),
            connected: Cell::new(false),
        });
        let connect_timeout = Duration::from_millis(tun.query_timeout_ms);
        let idle = Duration::from_millis(tun.tcp.backend_idle_timeout_ms);
        tokio::task::spawn_local(run_upstream(
            up.clone(),
            addr,
            rx,
            connect_timeout,
            idle,
            metrics,
        ));
        up
    }

    async fn query(
        &self,
        msg: Vec<u8>,
        key: QuestionKey,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<u8>, UpError> {
        let (reply, rx) = oneshot::channel();
        self.pending.set(self.pending.get() + 1);
        let result = if self.tx.send(Request { msg, key, reply }).is_err() {
            Err(UpError::Lost)
        } else {
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(resp)) => Ok(resp),
                Ok(Err(_)) => Err(UpError::Lost),
                Err(_) => Err(UpError::Timeout),
            }
        };
        self.pending.set(self.pending.get() - 1);
        result
    }
}

struct InFlight {
    key: QuestionKey,
    reply: oneshot::Sender<Vec<u8>>,
}

async fn run_upstream(
    up: Rc<Upstream>,
    addr: SocketAddr,
    mut rx: mpsc::UnboundedReceiver<Request>,
    connect_timeout: Duration,
    idle: Duration,
    metrics: crate::metrics::DataPlane,
) {
    let inflight: RefCell<HashMap<u16, InFlight>> = RefCell::new(HashMap::new());
    if let Ok(Ok(stream)) = timeout(connect_timeout, TcpStream::connect(addr)).await {
        up.connected.set(true);
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        let writer = async {
            let mut wr = BufWriter::with_capacity(16 * 1024, wr);
            let mut next_id: u16 = fastrand::u16(..);
            while let Some(mut req) = rx.recv().await {
                if req.reply.is_closed() {
                    continue;
                }
                let id = {
                    let mut map = inflight.borrow_mut();
                    if map.len() >= usize::from(u16::MAX) {
                        continue; // dropping `reply` reports the query lost
                    }
                    while map.contains_key(&next_id) {
                        next_id = next_id.wrapping_add(1);
                    }
                    let id = next_id;
                    next_id = next_id.wrapping_add(1);
                    map.insert(
                        id,
                        InFlight {
                            key: req.key,
                            reply: req.reply,
                        },
                    );
                    id
                };
                packet::set_id(&mut req.msg, id);
                wr.write_all(&(req.msg.len() as u16).to_be_bytes()).await?;
                wr.write_all(&req.msg).await?;
                if rx.is_empty() {
                    wr.flush().await?;
                }
            }
            Ok::<(), io::Error>(())
        };
        let reader = async {
            let mut rd = BufReader::with_capacity(16 * 1024, rd);
            let tick = idle.min(Duration::from_secs(1));
            let last_busy = Cell::new(Instant::now());
            loop {
                // Forget queries whose client gave up; stay open while anything is in
                // flight or queued, or traffic was recent.
                let busy = || {
                    let mut map = inflight.borrow_mut();
                    map.retain(|_, f| !f.reply.is_closed());
                    !map.is_empty() || up.pending.get() > 0 || last_busy.get().elapsed() < idle
                };
                let Frame::Message(msg) =
                    read_frame(&mut rd, tick, packet::MAX_MESSAGE, busy).await
                else {
                    return;
                };
                last_busy.set(Instant::now());
                let id = packet::id(&msg);
                let mut map = inflight.borrow_mut();
                if rd.buffer().is_empty() && map.len() > 1 {
                    // Everything received is consumed and more answers are due: ACK at
                    // once. Without this, delayed ACKs meet the backend's Nagle and
                    // pipelined answers stall for milliseconds (BIND: 1k instead of
                    // 35k qps). With nothing else due, the next query carries the ACK.
                    let _ = socket2::SockRef::from(rd.get_ref().as_ref()).set_tcp_quickack(true);
                }
                let verdict = match map.get(&id) {
                    None => Err(Drop::UnknownId),
                    Some(f) => packet::response_matches(&msg, &f.key),
                };
                match verdict {
                    Ok(()) => {
                        let f = map.remove(&id).expect("checked");
                        let _ = f.reply.send(msg);
                    }
                    Err(d) => metrics.drop_tcp(d),
                }
            }
        };
        tokio::select! {
            r = writer => if let Err(e) = r { tracing::debug!(%addr, "backend tcp write failed: {e}") },
            _ = reader => {},
        }
    } else {
        tracing::debug!(%addr, "backend tcp connect failed");
    }
    // Closed: new queries go elsewhere; queued and in-flight ones are reported lost
    // (their replies are dropped) so the caller retries once on a fresh connection.
    up.closed.set(true);
    rx.close();
    while rx.try_recv().is_ok() {}
    inflight.borrow_mut().clear();
}
