//! A paced UDP latency probe for the benchmark harness: sends DNS queries at a fixed
//! rate (each at its own scheduled time, not in bursts), times every answer by ID and
//! prints one JSON line: sent, answered, how many answers were SERVFAIL (a proxy's
//! own SERVFAIL is fast, and would flatter its latency), and p50/p90/p99/p99.9/max in
//! microseconds over every query sent, an unanswered one counting as slower than any
//! answer (`null` where a percentile lands on one).
//!
//! ```text
//! cargo run --release --example latency -- 127.0.0.1:5353 20000 5
//! cargo run --release --example latency -- 127.0.0.1:5353 20000 5 unique
//! ```
//!
//! With `unique`, query n asks for `q<n>.wild.example.test. TXT` (a wildcard of the
//! test zone), so that every packet of it, on both sides of a proxy, can be told from
//! every other query's in a capture (bench/residence.py).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use hickory_proto::serialize::binary::BinEncodable;

fn queries() -> Vec<Vec<u8>> {
    [
        ("www.example.test.", RecordType::A),
        ("example.test.", RecordType::SOA),
        ("example.test.", RecordType::MX),
        ("ftp.example.test.", RecordType::CNAME),
        ("x.wild.example.test.", RecordType::TXT),
    ]
    .iter()
    .map(|(n, t)| {
        let mut m = Message::new(0, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = false;
        m.add_query(Query::query(Name::from_ascii(n).unwrap(), *t));
        m.to_bytes().unwrap()
    })
    .collect()
}

/// One query per name: `q<n>.wild.example.test. TXT` for n in 0..count.
fn unique_queries(count: u64) -> Vec<Vec<u8>> {
    (0..count)
        .map(|n| {
            let mut m = Message::new(0, MessageType::Query, OpCode::Query);
            m.metadata.recursion_desired = false;
            let name = Name::from_ascii(format!("q{n}.wild.example.test.")).unwrap();
            m.add_query(Query::query(name, RecordType::TXT));
            m.to_bytes().unwrap()
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let unique = match (args.len(), args.get(4).map(String::as_str)) {
        (4, _) => Some(false),
        (5, Some("unique")) => Some(true),
        _ => None,
    };
    let Some(unique) = unique else {
        eprintln!("usage: latency SERVER:PORT QPS SECONDS [unique]");
        std::process::exit(2);
    };
    let server: SocketAddr = args[1].parse().expect("server address");
    let rate: f64 = args[2].parse().expect("qps");
    let seconds: f64 = args[3].parse().expect("seconds");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(server).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    // Send time (ns since start, +1; 0 = nothing outstanding) by ID.
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..65536).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));
    let receiver = {
        let (sock, sent_at, done) = (sock.try_clone().unwrap(), sent_at.clone(), done.clone());
        std::thread::spawn(move || {
            let mut rtts: Vec<u64> = Vec::with_capacity(1 << 20);
            let mut servfail = 0u64;
            let mut buf = [0u8; 4096];
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) if n >= 2 => {
                        let now = start.elapsed().as_nanos() as u64 + 1;
                        let id = u16::from_be_bytes([buf[0], buf[1]]);
                        let t = sent_at[usize::from(id)].swap(0, Ordering::AcqRel);
                        if t != 0 {
                            rtts.push(now - t);
                            if n >= 4 && buf[3] & 0x0f == 2 {
                                servfail += 1;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) if done.load(Ordering::Acquire) => return (rtts, servfail),
                    Err(_) => {}
                }
            }
        })
    };
    let total = (rate * seconds) as u64;
    let qs = if unique {
        unique_queries(total)
    } else {
        queries()
    };
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut sent = 0u64;
    while sent < total {
        let due = interval * sent as u32;
        let now = start.elapsed();
        if due > now {
            std::thread::sleep(due - now);
        }
        // Send everything that is due now (after an oversleep, a few at once).
        let now = start.elapsed();
        while sent < total && interval * (sent as u32) <= now {
            let id = (sent % 65536) as u16;
            let mut q = qs[(sent % qs.len() as u64) as usize].clone();
            q[..2].copy_from_slice(&id.to_be_bytes());
            sent_at[usize::from(id)]
                .store(start.elapsed().as_nanos() as u64 + 1, Ordering::Release);
            let _ = sock.send(&q);
            sent += 1;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, Ordering::Release);
    let (mut rtts, servfail) = receiver.join().unwrap();
    rtts.sort_unstable();
    // Percentiles over every query sent, not only the answered ones: a query that got
    // no answer counts as slower than any answer (`null` when a percentile lands on
    // one). Otherwise a proxy that drops queries while it stalls (a small socket
    // buffer) would look faster at p99 than one that queues them and answers late.
    let pct = |p: f64| -> String {
        let rank = ((p / 100.0) * (sent.max(1) - 1) as f64).round() as usize;
        match rtts.get(rank) {
            Some(ns) => format!("{:.1}", *ns as f64 / 1000.0),
            None => "null".into(),
        }
    };
    println!(
        "{{\"sent\": {sent}, \"answered\": {}, \"servfail\": {servfail}, \"p50_us\": {}, \"p90_us\": {}, \"p99_us\": {}, \"p999_us\": {}, \"max_us\": {}}}",
        rtts.len(),
        pct(50.0),
        pct(90.0),
        pct(99.0),
        pct(99.9),
        pct(100.0)
    );
}
