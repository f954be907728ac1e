//! Binding the listening sockets. The caller binds (so tests can use port 0 and a
//! systemd unit could pass sockets in); the server only reports the real addresses.
//! Every `listen.dns` address gets one UDP socket and one TCP listener per worker,
//! all with SO_REUSEPORT so the kernel spreads clients over the workers.

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;

/// The sockets of one data-plane worker.
#[derive(Debug)]
pub struct WorkerSockets {
    /// One per `listen.dns` address, in config order.
    pub udp: Vec<UdpSocket>,
    /// One per `listen.dns` address, in config order.
    pub tcp: Vec<TcpListener>,
}

/// Every socket the server needs, bound.
#[derive(Debug)]
pub struct Listeners {
    /// Per worker.
    pub workers: Vec<WorkerSockets>,
    /// Admin API and metrics.
    pub admin: TcpListener,
}

impl Listeners {
    /// The DNS addresses actually bound (ports resolved), in config order.
    pub fn dns_addrs(&self) -> Vec<SocketAddr> {
        self.workers[0]
            .udp
            .iter()
            .map(|s| s.local_addr().expect("bound socket has an address"))
            .collect()
    }

    /// The admin address actually bound.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("bound socket has an address")
    }
}

/// Binds every listener of `config` for `config.worker_count()` workers. A port of 0
/// is resolved once, by the first UDP socket, and the same port is used for TCP and
/// for every other worker.
pub fn bind(config: &Config) -> io::Result<Listeners> {
    let workers = config.worker_count();
    let mut out: Vec<WorkerSockets> = (0..workers)
        .map(|_| WorkerSockets {
            udp: Vec::new(),
            tcp: Vec::new(),
        })
        .collect();
    for &addr in &config.listen.dns {
        // With port 0 the kernel picks the UDP port; TCP may find it taken, so such an
        // address is retried with another port a few times.
        let attempts = if addr.port() == 0 { 20 } else { 1 };
        let mut last = None;
        for _ in 0..attempts {
            match bind_address(addr, workers, config.server.udp_socket_buffer) {
                Ok(per_worker) => {
                    for (w, (udp, tcp)) in out.iter_mut().zip(per_worker) {
                        w.udp.push(udp);
                        w.tcp.push(tcp);
                    }
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            return Err(e);
        }
    }
    let admin = TcpListener::bind(config.listen.admin).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("binding admin {}: {e}", config.listen.admin),
        )
    })?;
    admin.set_nonblocking(true)?;
    Ok(Listeners {
        workers: out,
        admin,
    })
}

/// One UDP socket and one TCP listener per worker on `addr`, all on the same port.
fn bind_address(
    addr: SocketAddr,
    workers: usize,
    buffer: usize,
) -> io::Result<Vec<(UdpSocket, TcpListener)>> {
    let mut addr = addr;
    let mut out = Vec::with_capacity(workers);
    for _ in 0..workers {
        let udp = bind_udp(addr, buffer)
            .map_err(|e| io::Error::new(e.kind(), format!("binding UDP {addr}: {e}")))?;
        addr = udp.local_addr()?;
        let tcp = bind_tcp(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("binding TCP {addr}: {e}")))?;
        out.push((udp, tcp));
    }
    Ok(out)
}

/// Sets SO_RCVBUF and SO_SNDBUF; the kernel may cap them (net.core.rmem_max), which is
/// not an error.
pub fn set_buffers(s: &Socket, bytes: usize) {
    let _ = s.set_recv_buffer_size(bytes);
    let _ = s.set_send_buffer_size(bytes);
}

fn bind_udp(addr: SocketAddr, buffer: usize) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_port(true)?;
    set_buffers(&s, buffer);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_tcp_nodelay(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}
