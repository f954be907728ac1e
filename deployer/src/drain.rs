//! When an old load balancer no longer gets traffic (`rollout-lbs`, step drain): its
//! client query rate, from the `dnslb_queries_total` counter of its `/metrics`, must
//! stay below `[registrar] drain_qps` for `drain_window_s` in a row, and not before
//! the delegation's TTL has passed since the parent began serving the new glue (a
//! resolver may use the glue it read for that long, busy or not). [`Drain`] is that
//! judgement over successive readings, kept free of I/O so it can be tested exactly.

use std::time::{Duration, Instant};

use dnslb::metrics::QUERIES;

use crate::lbclient::LbClient;

/// Queries the load balancer has received from clients (every transport).
pub fn queries_total(metrics: &str) -> u64 {
    crate::bake::sum(metrics, QUERIES, &[])
}

/// The drain judgement of one load balancer.
#[derive(Debug, Clone)]
pub struct Drain {
    qps: f64,
    window: Duration,
    not_before: Instant,
    last: Option<(Instant, u64)>,
    quiet_since: Option<Instant>,
    rate: Option<f64>,
}

impl Drain {
    /// Idle below `qps` for `window`, and not before `not_before`.
    pub fn new(qps: f64, window: Duration, not_before: Instant) -> Self {
        Drain {
            qps,
            window,
            not_before,
            last: None,
            quiet_since: None,
            rate: None,
        }
    }

    /// Takes a reading of the counter at `t`. A counter that went down (the process
    /// restarted) starts the measurement again.
    pub fn observe(&mut self, t: Instant, total: u64) {
        if let Some((t0, n0)) = self.last {
            let dt = t.saturating_duration_since(t0).as_secs_f64();
            if total < n0 {
                self.quiet_since = None;
                self.rate = None;
            } else if dt > 0.0 {
                let rate = (total - n0) as f64 / dt;
                self.rate = Some(rate);
                if rate < self.qps {
                    self.quiet_since.get_or_insert(t0);
                } else {
                    self.quiet_since = None;
                }
            }
        }
        self.last = Some((t, total));
    }

    /// The last measured rate, queries per second.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// Has it been quiet for the whole window, and is the TTL over?
    pub fn idle(&self, t: Instant) -> bool {
        t >= self.not_before
            && self
                .quiet_since
                .is_some_and(|q| t.saturating_duration_since(q) >= self.window)
    }
}

/// Reads every load balancer's `/metrics` once a second until each is [`Drain::idle`]
/// (an unreadable one counts as idle: it serves nobody), or `deadline` passes: then
/// the error names each busy one with its rate.
pub async fn wait_idle(
    lbs: &[&LbClient],
    qps: f64,
    window: Duration,
    not_before: Instant,
    deadline: Instant,
) -> Result<String, String> {
    let mut drains: Vec<Drain> = lbs
        .iter()
        .map(|_| Drain::new(qps, window, not_before))
        .collect();
    let mut gone = vec![false; lbs.len()];
    loop {
        let t = Instant::now();
        for (k, lb) in lbs.iter().enumerate() {
            match lb.metrics().await {
                Ok(text) => drains[k].observe(t, queries_total(&text)),
                Err(_) => gone[k] = true,
            }
        }
        let busy: Vec<String> = lbs
            .iter()
            .zip(&drains)
            .zip(&gone)
            .filter(|((_, d), gone)| !**gone && !d.idle(t))
            .map(|((lb, d), _)| match d.rate() {
                Some(r) => format!("{} at {r:.1} qps", lb.lb.name),
                None => format!("{} (rate not measured yet)", lb.lb.name),
            })
            .collect();
        if busy.is_empty() {
            return Ok(lbs
                .iter()
                .zip(&gone)
                .map(|(lb, gone)| match gone {
                    true => format!("{} unreachable (serves nobody)", lb.lb.name),
                    false => format!("{} idle", lb.lb.name),
                })
                .collect::<Vec<_>>()
                .join(", "));
        }
        if t >= deadline {
            return Err(format!(
                "still receiving queries: {} (below {qps} qps for {}s was required)",
                busy.join(", "),
                window.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn busy_never_idle_quiet_for_the_window_idle_and_traffic_starts_it_again() {
        let t0 = Instant::now();
        let mut d = Drain::new(1.0, 3 * S, t0);
        // 10 queries a second for 10 s: never idle.
        for k in 0..=10u32 {
            d.observe(t0 + k * S, u64::from(k) * 10);
            assert!(!d.idle(t0 + k * S), "busy at {k}s");
        }
        assert_eq!(d.rate(), Some(10.0));
        // Silent from 10 s on: idle once 3 s of quiet have been seen, not before.
        for k in 11..=12u32 {
            d.observe(t0 + k * S, 100);
            assert!(!d.idle(t0 + k * S), "only {}s quiet", k - 10);
        }
        d.observe(t0 + 13 * S, 100);
        assert!(d.idle(t0 + 13 * S));
        // A query a second is not below 1 qps: the quiet ends.
        d.observe(t0 + 14 * S, 101);
        assert!(!d.idle(t0 + 14 * S));
        // A counter that went down is a restart, not a negative rate.
        d.observe(t0 + 15 * S, 3);
        assert!(!d.idle(t0 + 15 * S));
        assert_eq!(d.rate(), None);
    }

    #[test]
    fn quiet_before_the_ttl_is_over_is_not_enough() {
        let t0 = Instant::now();
        let mut d = Drain::new(1.0, 2 * S, t0 + 10 * S);
        for k in 0..=12u32 {
            d.observe(t0 + k * S, 7);
            assert_eq!(d.idle(t0 + k * S), k >= 10, "at {k}s");
        }
    }

    #[test]
    fn the_counter_is_summed_over_transports() {
        let text = "# TYPE dnslb_queries_total counter\n\
            dnslb_queries_total{transport=\"udp\"} 1200\n\
            dnslb_queries_total{transport=\"tcp\"} 34\n\
            dnslb_queries_totally_other 5\n";
        assert_eq!(queries_total(text), 1234);
    }
}
