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
        let mut addr = addr;
        for w in out.iter_mut() {
            let udp = bind_udp(addr, config.server.udp_socket_buffer)
                .map_err(|e| io::Error::new(e.kind(), format!("binding UDP {addr}: {e}")))?;
            addr = udp.local_addr()?;
            w.udp.push(udp);
            let tcp = bind_tcp(addr)
                .map_err(|e| io::Error::new(e.kind(), format!("binding TCP {addr}: {e}")))?;
            w.tcp.push(tcp);
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
