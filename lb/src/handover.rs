//! Listening sockets handed from one process to the next, so that a restart or an
//! upgrade loses no query: the kernel keeps queueing datagrams and connections on a
//! socket as long as any process holds it.
//!
//! - In: [`take_listen_fds`] takes sockets passed with systemd's `sd_listen_fds`
//!   protocol (`LISTEN_PID`, `LISTEN_FDS`, optional `LISTEN_FDNAMES`), from a
//!   `dnslb.socket` unit or from a parent dnslb during an upgrade.
//! - Out: [`spawn_upgrade`] starts a new dnslb (SIGUSR2) with every listening socket
//!   of this one passed the same way, plus a pipe on which the child says it is ready
//!   (`DNSLB_READY_FD`); [`report_ready`] is the child's side of that pipe.
//!
//! The two `unsafe` blocks of this module are the only ways to do this: adopting a
//! file descriptor number received from the environment, and placing descriptors at
//! fixed numbers in the child between fork and exec.

use std::ffi::OsString;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};

use socket2::{Socket, Type};

/// The first descriptor of the protocol (`SD_LISTEN_FDS_START`).
pub const FIRST_FD: RawFd = 3;

/// The variable that tells a child on which descriptor to say it is ready.
pub const READY_FD_VAR: &str = "DNSLB_READY_FD";

/// What a passed socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A UDP socket.
    Udp,
    /// A listening TCP socket.
    Tcp,
}

impl Kind {
    /// "UDP" or "TCP", for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Udp => "UDP",
            Kind::Tcp => "TCP",
        }
    }
}

/// A socket received from the service manager or a parent dnslb.
#[derive(Debug)]
pub struct Inherited {
    /// The socket (close-on-exec from now on).
    pub socket: Socket,
    /// The descriptor number it came on, for messages.
    pub fd: RawFd,
    /// Its name from `LISTEN_FDNAMES`, if any.
    pub name: Option<String>,
    /// Its bound address.
    pub addr: SocketAddr,
    /// UDP or listening TCP.
    pub kind: Kind,
}

/// Why passed sockets cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// A variable of the protocol is malformed.
    #[error("{var}={value:?}: {reason}")]
    Variable {
        /// Which variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A passed descriptor is unusable.
    #[error("passed descriptor {fd}: {reason}")]
    Descriptor {
        /// Its number.
        fd: RawFd,
        /// What is wrong.
        reason: String,
    },
}

/// Adopts descriptor `fd`, checking first that it is open.
fn adopt(fd: RawFd) -> Result<Socket, HandoverError> {
    // SAFETY: fcntl(F_GETFD) only reads the descriptor's flags; it fails with EBADF
    // on a number that is not open, and then nothing is adopted.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(HandoverError::Descriptor {
            fd,
            reason: "not open".into(),
        });
    }
    // SAFETY: the protocol hands descriptors FIRST_FD.. to this process, once; they
    // are adopted once here (the variables are removed below) and owned from now on.
    Ok(unsafe { Socket::from_raw_fd(fd) })
}

/// Takes the sockets passed with the `sd_listen_fds` protocol, if any: none unless
/// `LISTEN_PID` is this process. The variables are removed so that nothing started
/// later takes them for its own. Call it before any thread starts (it changes the
/// environment).
pub fn take_listen_fds() -> Result<Vec<Inherited>, HandoverError> {
    let var = |k: &str| std::env::var(k).ok();
    let (Some(pid), Some(fds)) = (var("LISTEN_PID"), var("LISTEN_FDS")) else {
        return Ok(Vec::new());
    };
    let names = var("LISTEN_FDNAMES");
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    let pid: u32 = pid.trim().parse().map_err(|_| HandoverError::Variable {
        var: "LISTEN_PID",
        value: pid.clone(),
        reason: "not a process ID",
    })?;
    if pid != std::process::id() {
        return Ok(Vec::new()); // meant for another process
    }
    let n: RawFd = fds
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=1024).contains(n))
        .ok_or(HandoverError::Variable {
            var: "LISTEN_FDS",
            value: fds.clone(),
            reason: "not a count of descriptors (0-1024)",
        })?;
    let names: Vec<String> = names
        .map(|s| s.split(':').map(String::from).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for (i, fd) in (FIRST_FD..FIRST_FD + n).enumerate() {
        let socket = adopt(fd)?;
        let bad = |reason: String| HandoverError::Descriptor { fd, reason };
        socket.set_cloexec(true).map_err(|e| bad(format!("{e}")))?;
        let kind = match socket
            .r#type()
            .map_err(|e| bad(format!("not a socket: {e}")))?
        {
            Type::DGRAM => Kind::Udp,
            Type::STREAM if socket.is_listener().unwrap_or(false) => Kind::Tcp,
            Type::STREAM => return Err(bad("a TCP socket that is not listening".into())),
            other => return Err(bad(format!("a socket of type {other:?}"))),
        };
        let addr = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| bad("not bound to an IP address".into()))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| bad(format!("{e}")))?;
        out.push(Inherited {
            socket,
            fd,
            name: names.get(i).filter(|n| !n.is_empty()).cloned(),
            addr,
            kind,
        });
    }
    Ok(out)
}

/// The child's side of the ready pipe: if this process was started by
/// [`spawn_upgrade`], tells the parent it serves now. Also sends `MAINPID=` to the
/// service manager, so that it follows the child (the unit needs `NotifyAccess=all`).
pub fn report_ready() {
    let Some(fd) = std::env::var(READY_FD_VAR)
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok())
    else {
        return;
    };
    std::env::remove_var(READY_FD_VAR);
    if let Err(e) = crate::systemd::notify(&format!("MAINPID={}", std::process::id())) {
        tracing::warn!("sd_notify MAINPID failed: {e}");
    }
    match adopt(fd) {
        Ok(s) => {
            let mut s = UnixStream::from(OwnedFd::from(s));
            if let Err(e) = s.write_all(b"ready\n") {
                tracing::warn!("telling the parent dnslb we are ready: {e}");
            }
        }
        Err(e) => tracing::warn!("{READY_FD_VAR}: {e}"),
    }
}

/// Starts `exe args…` as the next dnslb: every socket of `sockets` becomes one of its
/// descriptors from [`FIRST_FD`] on, named in `LISTEN_FDNAMES`, with `LISTEN_PID` its
/// own process ID (set by `/bin/sh`'s `exec`, which keeps the ID); the returned
/// stream reads the child's "ready".
pub fn spawn_upgrade(
    exe: &Path,
    args: &[OsString],
    sockets: &[(RawFd, &str)],
) -> io::Result<(Child, UnixStream)> {
    let (ours, theirs) = UnixStream::pair()?;
    let mut fds: Vec<RawFd> = sockets.iter().map(|(fd, _)| *fd).collect();
    fds.push(theirs.as_raw_fd());
    let n = sockets.len();
    let names: Vec<&str> = sockets.iter().map(|(_, name)| *name).collect();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
        .arg(exe)
        .args(args)
        .env("LISTEN_FDS", n.to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env(READY_FD_VAR, (FIRST_FD + n as RawFd).to_string());
    // Above every descriptor involved, so the first pass cannot overwrite a source.
    let spare = fds
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(FIRST_FD + fds.len() as RawFd)
        + 1;
    // SAFETY: runs in the forked child before exec and calls only fcntl and dup2,
    // which are async-signal-safe, on descriptors this process holds open. First
    // every source is copied above `spare` (close-on-exec), then each copy is placed
    // at its number (dup2 clears close-on-exec there); the copies vanish at exec.
    unsafe {
        cmd.pre_exec(move || {
            let mut copies = [0 as RawFd; 1025];
            for (i, fd) in fds.iter().enumerate() {
                let c = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, spare);
                if c < 0 {
                    return Err(io::Error::last_os_error());
                }
                copies[i] = c;
            }
            for (i, c) in copies.iter().take(fds.len()).enumerate() {
                if libc::dup2(*c, FIRST_FD + i as RawFd) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(theirs);
    Ok((child, ours))
}
