//! How the server tells a worker thread (UDP or TCP) to drain or stop.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// A worker's state plus a socket that wakes it when the state is raised.
pub(crate) struct Control {
    state: AtomicU8,
    poke: UnixDatagram,
    wake: UnixDatagram,
}

const RUNNING: u8 = 0;
/// Stop reading queries; keep forwarding answers until none is in flight.
pub(crate) const DRAIN: u8 = 1;
/// Give up the queries still in flight and return.
pub(crate) const HARD_STOP: u8 = 2;

impl Control {
    pub(crate) fn new() -> io::Result<Arc<Self>> {
        let (poke, wake) = UnixDatagram::pair()?;
        poke.set_nonblocking(true)?;
        wake.set_nonblocking(true)?;
        Ok(Arc::new(Control {
            state: AtomicU8::new(RUNNING),
            poke,
            wake,
        }))
    }

    /// Stops reading queries; the worker returns once every answer is in.
    pub(crate) fn drain(&self) {
        self.raise(DRAIN);
    }

    /// The worker returns now, abandoning what is in flight.
    pub(crate) fn hard_stop(&self) {
        self.raise(HARD_STOP);
    }

    /// RUNNING, [`DRAIN`] or [`HARD_STOP`].
    pub(crate) fn state(&self) -> u8 {
        self.state.load(Ordering::SeqCst)
    }

    /// The descriptor that becomes readable when the state is raised.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// Consumes the wake-ups (the state itself stays raised).
    pub(crate) fn clear(&self) {
        let mut b = [0u8; 8];
        while self.wake.recv(&mut b).is_ok() {}
    }

    fn raise(&self, to: u8) {
        self.state.fetch_max(to, Ordering::SeqCst);
        // A full buffer means a wake-up is already pending.
        let _ = self.poke.send(&[to]);
    }
}
