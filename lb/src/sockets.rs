//! Binding the listening sockets. The caller binds (so tests can use port 0 and a
//! systemd unit can pass sockets in); the server only reports the real addresses.
//! Every `listen.dns` address gets one UDP socket per UDP worker and one TCP listener
//! per TCP worker, all with SO_REUSEPORT so the kernel spreads clients over them.
//! Sockets passed in ([`crate::handover`]) are used instead of binding: matched to
//! `listen.dns` and `listen.admin` by bound address and type.

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;
use crate::handover::{Inherited, Kind};

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

    /// A copy of every listening socket (each worker's UDP socket and TCP listener of
    /// every address, and the admin listener), named as [`crate::handover`] passes
    /// them on: kept by the process to hand to the next one on an upgrade.
    pub fn handover_copies(&self) -> io::Result<Vec<(OwnedFd, &'static str)>> {
        let mut out = Vec::new();
        for s in self.udp.iter().flatten() {
            out.push((s.as_fd().try_clone_to_owned()?, "dns-udp"));
        }
        for s in self.tcp.iter().flatten() {
            out.push((s.as_fd().try_clone_to_owned()?, "dns-tcp"));
        }
        out.push((self.admin.as_fd().try_clone_to_owned()?, "admin"));
        Ok(out)
    }
}

/// Like [`bind`], but uses the sockets in `inherited` for the addresses they are
/// bound to, and binds nothing itself for those. For an address with passed
/// sockets, both kinds must be there; each worker gets one of them (workers share a
/// socket when fewer were passed than there are workers, and there are as many
/// workers as sockets when more were passed). A passed socket that matches no
/// `listen.dns` or `listen.admin` address is an error; every problem is listed.
pub fn bind_with(config: &Config, inherited: Vec<Inherited>) -> io::Result<Listeners> {
    if inherited.is_empty() {
        return bind(config);
    }
    let mut problems = Vec::new();
    let mut admin = None;
    let mut per_addr: Vec<(Vec<Socket>, Vec<Socket>)> = config
        .listen
        .dns
        .iter()
        .map(|_| (Vec::new(), Vec::new()))
        .collect();
    let mut ports: Vec<Option<u16>> = vec![None; config.listen.dns.len()];
    for i in inherited {
        let what = format!(
            "passed descriptor {} ({} {}{})",
            i.fd,
            i.kind.as_str(),
            i.addr,
            i.name
                .as_deref()
                .map(|n| format!(", name {n:?}"))
                .unwrap_or_default()
        );
        // A configured port 0 stands for whatever port the passed socket has (the
        // parent of an upgrade bound it so): the first such address with that IP.
        let is_admin = i.name.as_deref() == Some("admin");
        let exact = config.listen.dns.iter().position(|a| *a == i.addr);
        let wildcard = || {
            config.listen.dns.iter().enumerate().position(|(k, a)| {
                a.port() == 0
                    && a.ip() == i.addr.ip()
                    && ports[k].is_none_or(|p| p == i.addr.port())
            })
        };
        let admin_matches = i.kind == Kind::Tcp
            && admin.is_none()
            && (i.addr == config.listen.admin
                || (config.listen.admin.port() == 0 && config.listen.admin.ip() == i.addr.ip()));
        if is_admin && admin_matches {
            admin = Some(i.socket);
        } else if let Some(k) = exact.or_else(wildcard).filter(|_| !is_admin) {
            ports[k] = Some(i.addr.port());
            match i.kind {
                Kind::Udp => per_addr[k].0.push(i.socket),
                Kind::Tcp => per_addr[k].1.push(i.socket),
            }
        } else if admin_matches && i.addr == config.listen.admin {
            admin = Some(i.socket);
        } else {
            problems.push(format!(
                "{what} matches no listen.dns address ({}) nor listen.admin ({})",
                config
                    .listen
                    .dns
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                config.listen.admin
            ));
        }
    }
    for (addr, (u, t)) in config.listen.dns.iter().zip(&per_addr) {
        if u.is_empty() != t.is_empty() {
            problems.push(format!(
                "listen.dns {addr}: a {} socket was passed but no {} socket (pass both, e.g. ListenDatagram= and ListenStream=)",
                if u.is_empty() { "TCP" } else { "UDP" },
                if u.is_empty() { "UDP" } else { "TCP" }
            ));
        }
    }
    if !problems.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "passed sockets do not match the configuration:\n  - {}",
                problems.join("\n  - ")
            ),
        ));
    }
    let udp_n = per_addr
        .iter()
        .map(|(u, _)| u.len())
        .chain([config.worker_count()])
        .max()
        .unwrap_or(1);
    let tcp_n = per_addr
        .iter()
        .map(|(_, t)| t.len())
        .chain([config.tcp_worker_count()])
        .max()
        .unwrap_or(1);
    let mut udp: Vec<Vec<UdpSocket>> = (0..udp_n).map(|_| Vec::new()).collect();
    let mut tcp: Vec<Vec<TcpListener>> = (0..tcp_n).map(|_| Vec::new()).collect();
    for (&addr, (u, t)) in config.listen.dns.iter().zip(per_addr) {
        if u.is_empty() {
            let (bu, bt) = bind_address(addr, udp_n, tcp_n, config.server.udp_socket_buffer)?;
            for (w, s) in udp.iter_mut().zip(bu) {
                w.push(s);
            }
            for (w, s) in tcp.iter_mut().zip(bt) {
                w.push(s);
            }
            continue;
        }
        for s in &u {
            set_buffers(s, config.server.udp_socket_buffer);
        }
        for (w, sockets) in udp.iter_mut().enumerate() {
            sockets.push(u[w % u.len()].try_clone()?.into());
        }
        for (w, listeners) in tcp.iter_mut().enumerate() {
            listeners.push(t[w % t.len()].try_clone()?.into());
        }
    }
    let admin = match admin {
        Some(s) => s.into(),
        None => bind_admin(config)?,
    };
    Ok(Listeners { udp, tcp, admin })
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
    let admin = bind_admin(config)?;
    Ok(Listeners { udp, tcp, admin })
}

fn bind_admin(config: &Config) -> io::Result<TcpListener> {
    let admin = TcpListener::bind(config.listen.admin).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("binding admin {}: {e}", config.listen.admin),
        )
    })?;
    admin.set_nonblocking(true)?;
    Ok(admin)
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
