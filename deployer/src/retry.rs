//! The one retry policy for calls to remote APIs (the load balancers' admin APIs and
//! the Linode API): a bounded number of attempts with exponential backoff. Only
//! transient failures (transport errors, 5xx, 429) are retried; an answer that
//! refuses is final.

use std::time::Duration;

/// Attempts left and the wait before the next one.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
    left: u32,
}

impl Backoff {
    /// `attempts` tries in all, waiting `first`, then twice as long each time, at
    /// most `max`.
    pub fn new(attempts: u32, first: Duration, max: Duration) -> Self {
        Backoff {
            next: first,
            max,
            left: attempts.saturating_sub(1),
        }
    }

    /// For a load balancer's admin API: 6 attempts over about 6 s, enough to ride out
    /// a restart of dnslb, short enough that a rollback reaches every load balancer.
    pub fn admin() -> Self {
        Backoff::new(6, Duration::from_millis(200), Duration::from_secs(3))
    }

    /// The wait before the next attempt, or `None` when every attempt is used.
    pub fn next_delay(&mut self) -> Option<Duration> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_exponentially_up_to_the_cap_and_stops() {
        let mut b = Backoff::new(5, Duration::from_millis(100), Duration::from_millis(300));
        let waits: Vec<_> = std::iter::from_fn(|| b.next_delay()).collect();
        assert_eq!(
            waits,
            [100, 200, 300, 300].map(Duration::from_millis).to_vec()
        );
        assert_eq!(
            Backoff::new(1, Duration::ZERO, Duration::ZERO).next_delay(),
            None
        );
    }
}
