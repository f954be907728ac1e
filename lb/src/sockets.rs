//! Binding the listening sockets. The caller binds (so tests can use port 0 and a
//! systemd unit could pass sockets in); the server only reports the real addresses.
//! Every `listen.dns` address gets one UDP socket per UDP worker and one TCP listener
//! per TCP worker, all with SO_REUSEPORT so the kernel spreads clients over them.

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;

/// Every socket the server needs, bound.
#[derive(Debug)]
pub struct Listeners {
    /// Per UDP worker: one socket per `listen.dns` address, in config order.
    pub udp: Vec<Vec<UdpSocket>>,
    /// Per TCP worker: one listener per `listen.dns` address, in config order.
    pub tcp: Vec<Vec<TcpListener>>,
    /// Admin API and metrics.
    pub admin: TcpListener,
}

impl Listeners {
    /// The DNS addresses actually bound (ports resolved), in config order.
    pub fn dns_addrs(&self) -> Vec<SocketAddr> {
        self.udp[0]
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

/// Binds every listener of `config`: per `listen.dns` address one UDP socket per UDP
/// worker and one TCP listener per TCP worker. A port of 0 is resolved once, by the
/// first UDP socket, and the same port is used for TCP and for every other worker.
pub fn bind(config: &Config) -> io::Result<Listeners> {
    let (udp_n, tcp_n) = (config.worker_count(), config.tcp_worker_count());
    let mut udp: Vec<Vec<UdpSocket>> = (0..udp_n).map(|_| Vec::new()).collect();
    let mut tcp: Vec<Vec<TcpListener>> = (0..tcp_n).map(|_| Vec::new()).collect();
    for &addr in &config.listen.dns {
        // With port 0 the kernel picks the UDP port; TCP may find it taken, so such an
        // address is retried with another port a few times.
        let attempts = if addr.port() == 0 { 20 } else { 1 };
        let mut last = None;
        for _ in 0..attempts {
            match bind_address(addr, udp_n, tcp_n, config.server.udp_socket_buffer) {
                Ok((u, t)) => {
                    for (w, s) in udp.iter_mut().zip(u) {
                        w.push(s);
                    }
                    for (w, s) in tcp.iter_mut().zip(t) {
                        w.push(s);
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
    Ok(Listeners { udp, tcp, admin })
}

/// `udp_n` UDP sockets and `tcp_n` TCP listeners on `addr`, all on the same port.
#[allow(clippy::type_complexity)]
fn bind_address(
    addr: SocketAddr,
    udp_n: usize,
    tcp_n: usize,
    buffer: usize,
) -> io::Result<(Vec<UdpSocket>, Vec<TcpListener>)> {
    let mut addr = addr;
    let mut udp = Vec::with_capacity(udp_n);
    for _ in 0..udp_n {
        let s = bind_udp(addr, buffer)
            .map_err(|e| io::Error::new(e.kind(), format!("binding UDP {addr}: {e}")))?;
        addr = s.local_addr()?;
        udp.push(s);
    }
    let tcp = (0..tcp_n)
        .map(|_| {
            bind_tcp(addr).map_err(|e| io::Error::new(e.kind(), format!("binding TCP {addr}: {e}")))
        })
        .collect::<io::Result<_>>()?;
    Ok((udp, tcp))
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
