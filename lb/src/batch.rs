//! Batched UDP system calls: `recvmmsg` to take every datagram waiting on a socket in
//! one call, `sendmmsg` to send several in one, the epoll instance every worker
//! thread sleeps in, and the one `ioctl` a closing TCP connection asks. This is the
//! crate's only `unsafe` code, kept to the small functions that fill the kernel's
//! arrays; everything they touch is owned by the structs here. The benchmark in
//! `bench/` is what justifies it: per query it saves the `recvfrom` that returned
//! EAGAIN, and under load it folds many datagrams into one system call each way.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Datagrams received (and the room for them) in one `recvmmsg`.
pub(crate) struct RecvBatch {
    size: usize,
    data: Vec<u8>,
    lens: Vec<usize>,
    addrs: Vec<libc::sockaddr_storage>,
    iovecs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    truncated: Vec<bool>,
}

impl RecvBatch {
    /// Room for `count` datagrams of up to `size` bytes each. Pages are only touched
    /// when a datagram lands in them, so a large `size` costs address space, not RSS.
    pub(crate) fn new(count: usize, size: usize) -> Self {
        RecvBatch {
            size,
            data: vec![0u8; count * size],
            lens: vec![0; count],
            // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs for which
            // all-zero bytes are a valid value.
            addrs: (0..count).map(|_| unsafe { zeroed() }).collect(),
            iovecs: (0..count).map(|_| unsafe { zeroed() }).collect(),
            hdrs: (0..count).map(|_| unsafe { zeroed() }).collect(),
            truncated: vec![false; count],
        }
    }

    /// Receives up to the batch's capacity without blocking. `Ok(0)` means nothing was
    /// waiting (EAGAIN).
    pub(crate) fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let count = self.lens.len();
        for i in 0..count {
            self.iovecs[i] = libc::iovec {
                iov_base: self.data[i * self.size..].as_mut_ptr().cast(),
                iov_len: self.size,
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovecs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points into buffers owned by `self` that outlive the
        // call (iovecs into `data`, names into `addrs`), with the lengths set above.
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                count as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        let n = n as usize;
        for i in 0..n {
            self.lens[i] = self.hdrs[i].msg_len as usize;
            self.truncated[i] = self.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        }
        Ok(n)
    }

    /// Capacity in datagrams.
    pub(crate) fn capacity(&self) -> usize {
        self.lens.len()
    }

    /// The first `len` bytes of datagram `i` of the last `recv`.
    pub(crate) fn bytes(&self, i: usize, len: usize) -> &[u8] {
        let start = i * self.size;
        &self.data[start..start + len.min(self.size)]
    }

    /// The whole buffer of datagram `i` of the last `recv` (room to write a longer
    /// answer over it), the datagram's length, its source, and whether it was cut.
    pub(crate) fn get_room(&mut self, i: usize) -> (&mut [u8], usize, Option<SocketAddr>, bool) {
        let addr = to_socket_addr(&self.addrs[i]);
        let start = i * self.size;
        let len = self.lens[i].min(self.size);
        (
            &mut self.data[start..start + self.size],
            len,
            addr,
            self.truncated[i],
        )
    }

    /// Datagram `i` of the last `recv`: its bytes (mutable, to rewrite the ID in place),
    /// its source, and whether it was cut to fit.
    pub(crate) fn get(&mut self, i: usize) -> (&mut [u8], Option<SocketAddr>, bool) {
        let addr = to_socket_addr(&self.addrs[i]);
        let start = i * self.size;
        let len = self.lens[i].min(self.size);
        (&mut self.data[start..start + len], addr, self.truncated[i])
    }
}

/// Scratch space for one `sendmmsg`.
pub(crate) struct SendBatch {
    addrs: Vec<libc::sockaddr_storage>,
    lens: Vec<libc::socklen_t>,
    iovecs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl SendBatch {
    /// Room for `count` datagrams per call.
    pub(crate) fn new(count: usize) -> Self {
        SendBatch {
            // SAFETY: as in `RecvBatch::new`, all-zero C structs.
            addrs: (0..count).map(|_| unsafe { zeroed() }).collect(),
            lens: vec![0; count],
            iovecs: (0..count).map(|_| unsafe { zeroed() }).collect(),
            hdrs: (0..count).map(|_| unsafe { zeroed() }).collect(),
        }
    }

    /// Sends `count` datagrams, the `k`-th being `packet(k)` = (destination, bytes),
    /// without blocking, in as few calls as the capacity allows. `failed(k)` is called
    /// for each one that was not sent (UDP: the caller counts it as dropped). A
    /// destination the kernel refuses (no route, filtered) costs only its own
    /// datagram; a full socket buffer drops the rest of the batch.
    pub(crate) fn send<'a>(
        &mut self,
        fd: BorrowedFd<'_>,
        count: usize,
        packet: impl Fn(usize) -> (SocketAddr, &'a [u8]),
        mut failed: impl FnMut(usize),
    ) {
        let mut sent = 0;
        while sent < count {
            let chunk = (count - sent).min(self.hdrs.len());
            for i in 0..chunk {
                let (addr, bytes) = packet(sent + i);
                let addr = &addr;
                self.lens[i] = from_socket_addr(addr, &mut self.addrs[i]);
                self.iovecs[i] = libc::iovec {
                    iov_base: bytes.as_ptr() as *mut libc::c_void,
                    iov_len: bytes.len(),
                };
                let h = &mut self.hdrs[i].msg_hdr;
                h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                h.msg_namelen = self.lens[i];
                h.msg_iov = &mut self.iovecs[i];
                h.msg_iovlen = 1;
                h.msg_control = std::ptr::null_mut();
                h.msg_controllen = 0;
                h.msg_flags = 0;
            }
            // SAFETY: the first `chunk` headers point at `self`'s addresses and
            // iovecs, which point at the caller's slices; all outlive the call, and
            // the kernel only reads from them.
            let n = unsafe {
                libc::sendmmsg(
                    fd.as_raw_fd(),
                    self.hdrs.as_mut_ptr(),
                    chunk as libc::c_uint,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n > 0 {
                // A short count means message `sent + n` failed; the next call
                // starts with it and reports its error.
                sent += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            let full = n == 0
                || matches!(e.kind(), io::ErrorKind::WouldBlock)
                || e.raw_os_error() == Some(libc::ENOBUFS);
            if full {
                (sent..count).for_each(&mut failed);
                return;
            }
            failed(sent);
            sent += 1;
        }
    }
}

/// An epoll instance: what a worker thread sleeps in. Each registered descriptor
/// carries a token that `wait` hands back when it is ready.
///
/// [`Poller::add`] registers for readability, level-triggered: a UDP socket or a
/// listener, whose sends never wait. [`Poller::add_stream`] registers a TCP stream for
/// both directions, edge-triggered: its owner reads until a short read and writes
/// until the socket is full, and hears of it again only when something changes.
pub(crate) struct Poller {
    epoll: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Poller {
    /// A new, empty epoll instance that reports up to 16 ready descriptors per wait.
    pub(crate) fn new() -> io::Result<Self> {
        Self::with_capacity(16)
    }

    /// A new, empty epoll instance that reports up to `events` ready descriptors per
    /// wait.
    pub(crate) fn with_capacity(events: usize) -> io::Result<Self> {
        // SAFETY: plain system call; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Poller {
            // SAFETY: `fd` was just returned by epoll_create1 and is owned by no one else.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            // SAFETY: epoll_event is a plain C struct; all-zero bytes are valid.
            events: (0..events.max(1)).map(|_| unsafe { zeroed() }).collect(),
        })
    }

    /// Wakes `wait` with `token` whenever `fd` is readable. The caller keeps `fd` open
    /// while it is registered.
    pub(crate) fn add(&self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        self.ctl(libc::EPOLL_CTL_ADD, fd, &mut ev)
    }

    /// Wakes `wait` with `token` whenever `fd` becomes readable or writable, or is
    /// closed by its peer (edge-triggered). The caller keeps `fd` open while it is
    /// registered; closing it unregisters it.
    pub(crate) fn add_stream(&self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: token,
        };
        self.ctl(libc::EPOLL_CTL_ADD, fd, &mut ev)
    }

    /// Stops watching `fd`.
    pub(crate) fn remove(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        // EPOLL_CTL_DEL ignores the event pointer (null is allowed since 2.6.9).
        self.ctl(libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut())
    }

    fn ctl(&self, op: i32, fd: BorrowedFd<'_>, ev: *mut libc::epoll_event) -> io::Result<()> {
        // SAFETY: `ev` is null (DEL) or points to an epoll_event that outlives the call.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd.as_raw_fd(), ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sleeps until a registered descriptor is ready or `timeout` passes; appends
    /// the tokens of the ready ones to `ready` (cleared first). A signal counts as a
    /// timeout.
    pub(crate) fn wait(
        &mut self,
        ready: &mut Vec<u64>,
        timeout: std::time::Duration,
    ) -> io::Result<()> {
        ready.clear();
        let events = self.wait_raw(timeout)?;
        ready.extend(events.iter().map(|e| e.u64));
        Ok(())
    }

    /// As [`Poller::wait`], with each token the `EPOLL*` flags it was reported with.
    pub(crate) fn wait_events(
        &mut self,
        ready: &mut Vec<(u64, u32)>,
        timeout: std::time::Duration,
    ) -> io::Result<()> {
        ready.clear();
        let events = self.wait_raw(timeout)?;
        ready.extend(events.iter().map(|e| (e.u64, e.events)));
        Ok(())
    }

    fn wait_raw(&mut self, timeout: std::time::Duration) -> io::Result<&[libc::epoll_event]> {
        // Rounded up, so a deadline is never woken for just before it passes.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: `events` is a live buffer of the length passed.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                self.events.as_mut_ptr(),
                self.events.len() as i32,
                ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(&[])
            } else {
                Err(e)
            };
        }
        Ok(&self.events[..n as usize])
    }
}

fn to_socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is
            // large enough and aligned for.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn from_socket_addr(addr: &SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in.
            let s =
                unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            s.sin_family = libc::AF_INET as libc::sa_family_t;
            s.sin_port = a.port().to_be();
            s.sin_addr = libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            };
            s.sin_zero = [0; 8];
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let s =
                unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            s.sin6_port = a.port().to_be();
            s.sin6_flowinfo = a.flowinfo();
            s.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            s.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Bytes a TCP socket has sent but the peer has not acknowledged, or not yet sent
/// (`SIOCOUTQ`; its FIN counts too). `None` if the kernel does not say.
pub(crate) fn unacknowledged(fd: BorrowedFd<'_>) -> Option<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ for TCP) writes one c_int through the pointer, which
    // points to `n` for the whole call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    (r == 0).then(|| usize::try_from(n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_batch_round_trips_many_datagrams_with_their_sources() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let payloads: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 10 + usize::from(i)]).collect();
        let mut send = SendBatch::new(8);
        let mut failed = Vec::new();
        send.send(
            tx.as_fd(),
            payloads.len(),
            |k| (to, payloads[k].as_slice()),
            |k| failed.push(k),
        );
        assert!(failed.is_empty(), "{failed:?}");
        let mut recv = RecvBatch::new(16, 64);
        let mut got = Vec::new();
        loop {
            let n = recv.recv(rx.as_fd()).unwrap();
            if n == 0 {
                break;
            }
            for i in 0..n {
                let (bytes, from, cut) = recv.get(i);
                assert_eq!(from, Some(tx.local_addr().unwrap()));
                assert!(!cut);
                got.push(bytes.to_vec());
            }
        }
        assert_eq!(got, payloads);
    }

    #[test]
    fn a_refused_destination_costs_only_its_own_datagram() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let good = rx.local_addr().unwrap();
        // Port 0 is not a destination: the kernel refuses that one message (EINVAL).
        let bad = SocketAddr::from(([127, 0, 0, 1], 0));
        let to = [good, bad, good, bad, good];
        let payloads: Vec<[u8; 12]> = (0..to.len()).map(|k| [k as u8; 12]).collect();
        let mut send = SendBatch::new(8);
        let mut failed = Vec::new();
        send.send(
            tx.as_fd(),
            to.len(),
            |k| (to[k], &payloads[k][..]),
            |k| failed.push(k),
        );
        assert_eq!(failed, vec![1, 3]);
        let mut recv = RecvBatch::new(8, 64);
        let n = recv.recv(rx.as_fd()).unwrap();
        let firsts: Vec<u8> = (0..n).map(|i| recv.get(i).0[0]).collect();
        assert_eq!(firsts, vec![0, 2, 4]);
    }

    #[test]
    fn an_oversized_datagram_is_reported_as_truncated() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&[7u8; 100], rx.local_addr().unwrap()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut recv = RecvBatch::new(2, 32);
        assert_eq!(recv.recv(rx.as_fd()).unwrap(), 1);
        let (bytes, _, cut) = recv.get(0);
        assert!(cut && bytes.len() == 32);
    }

    #[test]
    fn ipv6_addresses_convert_both_ways() {
        let a: SocketAddr = "[2001:db8::1]:5353".parse().unwrap();
        // SAFETY: all-zero sockaddr_storage is valid.
        let mut s: libc::sockaddr_storage = unsafe { zeroed() };
        from_socket_addr(&a, &mut s);
        assert_eq!(to_socket_addr(&s), Some(a));
    }
}
