//! The drain wait of `rollout-lbs` against a real dnslb in front of a real named: busy
//! while a client queries it, idle one window after the client stops, and a deadline
//! that passes under load is an error naming the rate.

#[path = "../../lb/tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config, query, udp_query_raw, Dnslb, Named};
use deployer::config::LoadBalancer;
use deployer::drain::wait_idle;
use deployer::lbclient::LbClient;
use hickory_proto::rr::RecordType;

/// Queries `lb` at about 50 qps until `stop`; returns when the last one was sent.
fn load(dns: std::net::SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Instant> {
    std::thread::spawn(move || {
        let q = query("www.example.test.", RecordType::A, false);
        while !stop.load(Ordering::Relaxed) {
            let _ = udp_query_raw(dns, &q, Duration::from_millis(500));
            std::thread::sleep(Duration::from_millis(20));
        }
        Instant::now()
    })
}

#[test]
fn busy_until_the_clients_stop_then_idle_after_the_window() {
    let named = Named::start();
    let lb = Dnslb::start(&config(&[("ns1", named.addr)], ""));
    let client = LbClient::new(&LoadBalancer {
        name: "lb1".into(),
        admin_url: format!("http://{}", lb.admin),
        token_file: None,
        dns: lb.dns,
        nameservers: vec!["ns1".into()],
        region: None,
        ns_name: None,
    })
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let window = Duration::from_secs(2);

    // Under load the deadline passes, and the error says how busy it is.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = load(lb.dns, stop.clone());
    let t0 = Instant::now();
    let e = rt
        .block_on(wait_idle(
            &[&client],
            1.0,
            window,
            t0,
            t0 + Duration::from_secs(4),
        ))
        .unwrap_err();
    assert!(e.contains("lb1 at ") && e.contains("qps"), "{e}");

    // The load stops 2 s into the next wait: idle only a window after that.
    let stopper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            stop.store(true, Ordering::Relaxed);
        })
    };
    let t1 = Instant::now();
    let ok = rt
        .block_on(wait_idle(
            &[&client],
            1.0,
            window,
            t1,
            t1 + Duration::from_secs(30),
        ))
        .unwrap();
    let idle_at = Instant::now();
    stopper.join().unwrap();
    let last_query = sender.join().unwrap();
    assert!(ok.contains("lb1 idle"), "{ok}");
    assert!(
        idle_at >= last_query + window - Duration::from_millis(1100),
        "idle {:?} after the last query, window {window:?}",
        idle_at.saturating_duration_since(last_query)
    );

    // Not before the TTL: quiet from the start, idle only once `not_before` passed.
    let t2 = Instant::now();
    rt.block_on(wait_idle(
        &[&client],
        1.0,
        window,
        t2 + Duration::from_secs(5),
        t2 + Duration::from_secs(30),
    ))
    .unwrap();
    assert!(t2.elapsed() >= Duration::from_secs(5));

    // A load balancer that is gone serves nobody: idle at once.
    drop(lb);
    let t3 = Instant::now();
    let ok = rt
        .block_on(wait_idle(
            &[&client],
            1.0,
            window,
            t3,
            t3 + Duration::from_secs(30),
        ))
        .unwrap();
    assert!(ok.contains("unreachable"), "{ok}");
}
