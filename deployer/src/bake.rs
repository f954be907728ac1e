//! Bake analysis: what a load balancer itself says about the new servers while they
//! take its traffic. Replaying the zone through the load balancer is not enough: a
//! new server that dies is routed around, the replay still passes, and the old
//! servers would be deleted with the fleet on half its servers. So every bake round
//! also reads the load balancer's `GET /v1/backends` and `/metrics` and judges them
//! against the set it should serve and the thresholds of `[checks]`.

use dnslb::api::{BackendList, Health, MemberState};
use dnslb::metrics::{BACKEND_RESPONSES, NO_BACKEND};

use crate::config::Checks;
use crate::lbclient::Backend;

/// A load balancer's counters for the backends it should serve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// Queries forwarded to them.
    pub queries: u64,
    /// Of which timed out.
    pub timeouts: u64,
    /// SERVFAIL answers they gave.
    pub servfail_answers: u64,
    /// SERVFAIL answers the load balancer made itself (no usable backend).
    pub no_backend: u64,
}

/// The labels and value of one Prometheus sample line, if it is of `metric`.
fn sample_line<'a>(line: &'a str, metric: &str) -> Option<(Vec<(&'a str, &'a str)>, f64)> {
    let rest = line.strip_prefix(metric)?;
    let (labels, value) = match rest.strip_prefix('{') {
        Some(r) => {
            let (l, v) = r.split_once('}')?;
            (l, v)
        }
        None if rest.starts_with(' ') => ("", rest),
        None => return None,
    };
    let labels = labels
        .split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.trim(), v.trim().trim_matches('"')))
        })
        .collect();
    Some((labels, value.split_whitespace().next()?.parse().ok()?))
}

/// Sums `metric` over the lines whose labels all match `want`.
pub(crate) fn sum(text: &str, metric: &str, want: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter_map(|l| sample_line(l, metric))
        .filter(|(labels, _)| want.iter().all(|w| labels.contains(w)))
        .map(|(_, v)| v as u64)
        .sum()
}

/// The counters of `want`'s members in `list` and `metrics`.
pub fn sample(list: &BackendList, metrics: &str, want: &[Backend]) -> Sample {
    let mut s = Sample {
        no_backend: sum(metrics, NO_BACKEND, &[]),
        ..Sample::default()
    };
    for b in list
        .backends
        .iter()
        .filter(|b| want.iter().any(|w| w.name == b.name))
    {
        s.queries += b.queries_total;
        s.timeouts += b.timeouts_total;
        s.servfail_answers += sum(
            metrics,
            BACKEND_RESPONSES,
            &[("backend", &b.name), ("rcode", "SERVFAIL")],
        );
    }
    s
}

/// What one round found on one load balancer.
#[derive(Debug, Default, PartialEq)]
pub struct Verdict {
    /// Reasons to fail the bake now.
    pub problems: Vec<String>,
    /// New backends not checked yet (`unknown`): the bake waits for them.
    pub pending: Vec<String>,
}

/// Judges one load balancer: it serves exactly `want`, every member active and not
/// down, and since `base` its timeouts and SERVFAILs stayed within `checks`.
pub fn judge(
    lb: &str,
    list: &BackendList,
    want: &[Backend],
    base: &Sample,
    now: &Sample,
    checks: &Checks,
) -> Verdict {
    let mut v = Verdict::default();
    for w in want {
        match list.backends.iter().find(|b| b.name == w.name) {
            None => v
                .problems
                .push(format!("{lb} no longer serves {} ({})", w.name, w.address)),
            Some(b) if b.address != w.address.to_string() => v.problems.push(format!(
                "{lb} serves {} at {}, not {}",
                b.name, b.address, w.address
            )),
            Some(b) => {
                if b.state != MemberState::Active {
                    v.problems.push(format!("{lb}: {} is draining", b.name));
                }
                match b.health {
                    Health::Down => v
                        .problems
                        .push(format!("{lb} marked {} ({}) down", b.name, b.address)),
                    Health::Unknown => v.pending.push(format!("{lb}: {}", b.name)),
                    Health::Up => {}
                }
            }
        }
    }
    for b in &list.backends {
        if !want.iter().any(|w| w.name == b.name) {
            v.problems.push(format!(
                "{lb} also serves {} ({}), which this rollout did not put there",
                b.name, b.address
            ));
        }
    }
    let queries = now.queries.saturating_sub(base.queries);
    let timeouts = now.timeouts.saturating_sub(base.timeouts);
    let allowed = (checks.bake_max_timeout_ratio * queries as f64).ceil() as u64;
    if timeouts > allowed {
        v.problems.push(format!(
            "{lb}: {timeouts} of {queries} queries to the new servers timed out during the bake (allowed: {allowed}, checks.bake_max_timeout_ratio = {})",
            checks.bake_max_timeout_ratio
        ));
    }
    let servfail = now.servfail_answers.saturating_sub(base.servfail_answers)
        + now.no_backend.saturating_sub(base.no_backend);
    if servfail > checks.bake_max_servfail {
        v.problems.push(format!(
            "{lb}: {servfail} SERVFAIL answer(s) during the bake (allowed: checks.bake_max_servfail = {})",
            checks.bake_max_servfail
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use dnslb::api::BackendView;

    fn view(name: &str, addr: &str, health: Health, q: u64, t: u64) -> BackendView {
        BackendView {
            name: name.into(),
            address: addr.into(),
            weight: 1,
            state: MemberState::Active,
            health,
            outstanding: 0,
            queries_total: q,
            timeouts_total: t,
        }
    }

    fn want(name: &str, addr: &str) -> Backend {
        Backend {
            name: name.into(),
            address: addr.parse().unwrap(),
            weight: 1,
        }
    }

    const METRICS: &str = "# TYPE dnslb_backend_responses_total counter\n\
        dnslb_backend_responses_total{backend=\"a\",rcode=\"NOERROR\"} 90\n\
        dnslb_backend_responses_total{rcode=\"SERVFAIL\",backend=\"a\"} 2\n\
        dnslb_backend_responses_total{backend=\"ab\",rcode=\"SERVFAIL\"} 7\n\
        dnslb_no_backend_servfail_total{transport=\"udp\"} 3\n\
        dnslb_no_backend_servfail_total{transport=\"tcp\"} 1\n";

    #[test]
    fn samples_read_both_sources_whatever_the_label_order() {
        let list = BackendList {
            generation: 4,
            backends: vec![
                view("a", "127.0.0.1:1", Health::Up, 100, 1),
                view("ab", "127.0.0.1:2", Health::Up, 50, 5),
            ],
        };
        let s = sample(&list, METRICS, &[want("a", "127.0.0.1:1")]);
        assert_eq!(
            s,
            Sample {
                queries: 100,
                timeouts: 1,
                servfail_answers: 2,
                no_backend: 4
            }
        );
    }

    #[test]
    fn judges_membership_health_timeouts_and_servfail() {
        let checks = Checks::default();
        let w = [want("a", "127.0.0.1:1"), want("b", "127.0.0.1:2")];
        let list = BackendList {
            generation: 4,
            backends: vec![
                view("a", "127.0.0.1:1", Health::Up, 0, 0),
                view("b", "127.0.0.1:2", Health::Unknown, 0, 0),
            ],
        };
        let base = Sample::default();
        let ok = judge("lb1", &list, &w, &base, &base, &checks);
        assert!(ok.problems.is_empty(), "{ok:?}");
        assert_eq!(ok.pending, ["lb1: b"]);

        let mut down = list.clone();
        down.backends[1].health = Health::Down;
        down.backends
            .push(view("x", "127.0.0.1:9", Health::Up, 0, 0));
        let v = judge("lb1", &down, &w, &base, &base, &checks);
        assert!(v.problems.iter().any(|p| p.contains("marked b")), "{v:?}");
        assert!(
            v.problems.iter().any(|p| p.contains("also serves x")),
            "{v:?}"
        );

        let lossy = Sample {
            queries: 1000,
            timeouts: 11,
            ..base
        };
        let v = judge("lb1", &list, &w, &base, &lossy, &checks);
        assert!(v.problems.iter().any(|p| p.contains("11 of 1000")), "{v:?}");
        let fine = Sample {
            timeouts: 10,
            ..lossy
        };
        assert!(judge("lb1", &list, &w, &base, &fine, &checks)
            .problems
            .is_empty());

        let servfail = Sample {
            no_backend: 1,
            ..base
        };
        let v = judge("lb1", &list, &w, &base, &servfail, &checks);
        assert!(v.problems.iter().any(|p| p.contains("SERVFAIL")), "{v:?}");
    }
}
