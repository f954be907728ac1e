//! Edge protection against the real binary and real BIND, on loopback: distinct
//! source addresses in 127.0.0.0/8 are distinct clients. ACL over UDP and TCP,
//! response rate limiting with slip under a flood beside a legitimate client, TCP
//! connections per client, connection lifetime and query caps, slowloris.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use dnslb::metrics::{DROPPED, RATE_LIMITED, TCP_CONNECTIONS_OPEN};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;

const T: Duration = Duration::from_secs(3);

/// A UDP socket whose queries come from `ip`.
fn udp_from(ip: &str) -> UdpSocket {
    let s = UdpSocket::bind((ip, 0)).unwrap();
    let s2 = socket2::SockRef::from(&s);
    let _ = s2.set_recv_buffer_size(8 << 20);
    s
}

/// A TCP connection from `ip` to `to`.
fn tcp_from(ip: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::new(ip.parse().unwrap(), 0).into())?;
    s.connect(&to.into())?;
    Ok(s.into())
}

/// Whether the server closed `s` (EOF or reset) within `limit`.
fn closed_by_server(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 512];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn answered_over_tcp(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(T)).unwrap();
    let q = query("www.example.test.", RecordType::A, true);
    if write_frame(s, &q).is_err() {
        return false;
    }
    match read_frame(s) {
        Ok(a) => Message::from_vec(&a).is_ok_and(|m| m.answers.len() == 2),
        Err(_) => false,
    }
}

#[test]
fn a_client_outside_the_acl_gets_nothing_over_udp_or_tcp_and_is_counted() {
    let ns = Named::start();
    let lb = Dnslb::start(&config(
        &[("ns1", ns.addr)],
        "[acl]\nallow = [\"127.0.0.0/8\", \"::1/128\"]\ndeny = [\"127.0.0.4/32\"]\n",
    ));
    let q = query("www.example.test.", RecordType::A, true);
    // Allowed: answered.
    let ok = udp_from("127.0.0.2");
    ok.set_read_timeout(Some(T)).unwrap();
    ok.send_to(&q, lb.dns).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = ok.recv_from(&mut buf).expect("allowed client answered");
    assert_eq!(Message::from_vec(&buf[..n]).unwrap().answers.len(), 2);
    // Denied: ten queries, no answer.
    let bad = udp_from("127.0.0.4");
    bad.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    for _ in 0..10 {
        bad.send_to(&q, lb.dns).unwrap();
    }
    assert!(
        bad.recv_from(&mut buf).is_err(),
        "denied client got an answer"
    );
    // TCP: the denied client's connection is closed at accept, unanswered.
    let mut t = tcp_from("127.0.0.4", lb.dns).unwrap();
    let _ = write_frame(&mut t, &q);
    assert!(closed_by_server(&mut t, T));
    let mut good = tcp_from("127.0.0.2", lb.dns).unwrap();
    assert!(answered_over_tcp(&mut good));
    let m = scrape(&lb);
    assert_eq!(
        metric(&m, DROPPED, &[("reason", "acl"), ("transport", "udp")]),
        10.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, DROPPED, &[("reason", "acl"), ("transport", "tcp")]),
        1.0,
        "{m}"
    );
}

#[test]
fn an_allow_list_refuses_everyone_else() {
    let ns = Named::start();
    // Health checks and the admin API are not subject to the ACL; only DNS clients.
    let lb = Dnslb::start(&config(
        &[("ns1", ns.addr)],
        "[acl]\nallow = [\"127.0.0.2/32\"]\n",
    ));
    let q = query("www.example.test.", RecordType::A, true);
    let mut buf = [0u8; 4096];
    let in_list = udp_from("127.0.0.2");
    in_list.set_read_timeout(Some(T)).unwrap();
    in_list.send_to(&q, lb.dns).unwrap();
    assert!(in_list.recv_from(&mut buf).is_ok());
    for ip in ["127.0.0.1", "127.0.0.3"] {
        let s = udp_from(ip);
        s.set_read_timeout(Some(Duration::from_millis(400)))
            .unwrap();
        s.send_to(&q, lb.dns).unwrap();
        assert!(s.recv_from(&mut buf).is_err(), "{ip} answered");
    }
}

/// Counts of one client's flood.
#[derive(Debug, Default)]
struct Flood {
    sent: u64,
    answered: u64,
    truncated: u64,
    elapsed: Duration,
}

/// Sends `qps` queries a second from `ip` for `dur`, counting answers (plain and
/// TC=1) until a moment after the last query.
fn flood(ip: &'static str, to: SocketAddr, qps: u64, dur: Duration) -> Flood {
    let s = Arc::new(udp_from(ip));
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let (answered, truncated) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let rx = {
        let (s, done, answered, truncated) =
            (s.clone(), done.clone(), answered.clone(), truncated.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut quiet_since = None;
            loop {
                match s.recv_from(&mut buf) {
                    Ok((n, _)) => {
                        quiet_since = None;
                        let m = Message::from_vec(&buf[..n]).expect("an answer parses");
                        if m.metadata.truncation {
                            assert!(m.answers.is_empty(), "a slipped answer is empty");
                            assert_eq!(m.response_code, ResponseCode::NoError);
                            truncated.fetch_add(1, Ordering::Relaxed);
                        } else {
                            assert_eq!(m.answers.len(), 2);
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) if done.load(Ordering::Relaxed) => {
                        let q = *quiet_since.get_or_insert_with(Instant::now);
                        if q.elapsed() > Duration::from_millis(500) {
                            return;
                        }
                    }
                    Err(_) => {}
                }
            }
        })
    };
    let q = query("www.example.test.", RecordType::A, true);
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < dur {
        let due = (start.elapsed().as_secs_f64() * qps as f64) as u64;
        while sent < due {
            let mut m = q.clone();
            m[..2].copy_from_slice(&(sent as u16).to_be_bytes());
            if s.send_to(&m, to).is_ok() {
                sent += 1;
            }
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let elapsed = start.elapsed();
    done.store(true, Ordering::Relaxed);
    rx.join().unwrap();
    Flood {
        sent,
        answered: answered.load(Ordering::Relaxed),
        truncated: truncated.load(Ordering::Relaxed),
        elapsed,
    }
}

/// The acceptance test. `ipv4_prefix = 32` so that 127.0.0.2 and 127.0.0.3,
/// one /24, are two clients (with the default 24 they would share a bucket). Two UDP
/// workers, so the per-worker share of the rate is exercised: the flood comes from
/// one socket, which the kernel hashes to one worker.
#[test]
fn a_flooding_client_is_held_to_its_rate_with_slip_while_another_loses_nothing() {
    const RATE: u64 = 2000;
    const BURST: u64 = 200;
    let ns = Named::start();
    let lb = Dnslb::start(&config(
        &[("ns1", ns.addr)],
        &format!(
            "[server]\nworkers = 2\n[rate_limit]\nresponses_per_second = {RATE}\nburst = {BURST}\n\
             ipv4_prefix = 32\nslip = 2\nexempt = []\n"
        ),
    ));
    let dur = Duration::from_secs(3);
    let to = lb.dns;
    let attacker = std::thread::spawn(move || flood("127.0.0.3", to, 20_000, dur));
    let legit = flood("127.0.0.2", lb.dns, 500, dur);
    let attacker = attacker.join().unwrap();
    eprintln!("attacker {attacker:?}\nlegit {legit:?}");
    // The legitimate client: every query answered, none truncated.
    assert!(legit.sent >= 1400, "{legit:?}");
    assert_eq!(legit.answered, legit.sent, "{legit:?}");
    assert_eq!(legit.truncated, 0);
    // The flood: real answers at most rate x duration + burst; the limited rest is
    // half TC=1 answers (slip = 2), half nothing.
    assert!(attacker.sent >= 50_000, "the flood was sent: {attacker:?}");
    let bound = (RATE as f64 * attacker.elapsed.as_secs_f64()) as u64 + BURST;
    assert!(attacker.answered <= bound, "{attacker:?} over {bound}");
    // Not everything was refused: its worker's share (RATE / 2) did get through.
    assert!(
        attacker.answered as f64 >= 0.8 * (RATE / 2) as f64 * dur.as_secs_f64(),
        "{attacker:?}"
    );
    let m = scrape(&lb);
    let (slip, drop) = (
        metric(&m, RATE_LIMITED, &[("action", "slip")]) as u64,
        metric(&m, RATE_LIMITED, &[("action", "drop")]) as u64,
    );
    assert_eq!(
        attacker.answered + slip + drop,
        attacker.sent,
        "every flood query answered or limited: {attacker:?} slip {slip} drop {drop}"
    );
    assert!(slip.abs_diff(drop) <= 1, "slip 2: every 2nd: {slip} {drop}");
    // Loopback does not lose them: the client got every slipped answer.
    assert!(attacker.truncated >= slip * 99 / 100 && attacker.truncated <= slip);
}

#[test]
fn exempt_clients_are_not_limited() {
    let ns = Named::start();
    let lb = Dnslb::start(&config(
        &[("ns1", ns.addr)],
        "[rate_limit]\nresponses_per_second = 10\nburst = 10\nipv4_prefix = 32\n\
         exempt = [\"127.0.0.2/32\"]\n",
    ));
    let exempt = flood("127.0.0.2", lb.dns, 1000, Duration::from_secs(1));
    assert_eq!(exempt.answered, exempt.sent, "{exempt:?}");
    let other = flood("127.0.0.3", lb.dns, 1000, Duration::from_secs(1));
    assert!(other.answered <= 10 + 15, "{other:?}");
}

#[test]
fn tcp_connections_per_client_are_capped_while_another_client_still_connects() {
    const CAP: usize = 20;
    let ns = Named::start();
    let lb = Dnslb::start(&config(
        &[("ns1", ns.addr)],
        &format!("[tcp]\nmax_connections_per_client = {CAP}\n"),
    ));
    let mut conns: Vec<TcpStream> = (0..500)
        .filter_map(|_| tcp_from("127.0.0.3", lb.dns).ok())
        .collect();
    assert_eq!(conns.len(), 500, "the kernel accepted all 500 handshakes");
    std::thread::sleep(Duration::from_millis(300));
    let served = conns
        .iter_mut()
        .map(answered_over_tcp)
        .filter(|&ok| ok)
        .count();
    assert_eq!(served, CAP);
    let mut other = tcp_from("127.0.0.2", lb.dns).unwrap();
    assert!(
        answered_over_tcp(&mut other),
        "another client still connects"
    );
    let m = scrape(&lb);
    assert_eq!(
        metric(
            &m,
            DROPPED,
            &[
                ("reason", "too_many_client_connections"),
                ("transport", "tcp")
            ]
        ),
        (500 - CAP) as f64,
        "{m}"
    );
    // Closing them gives the slots back.
    drop(conns);
    assert!(eventually(T, || {
        tcp_from("127.0.0.3", lb.dns).is_ok_and(|mut s| answered_over_tcp(&mut s))
    }));
}

#[test]
fn a_connection_past_its_lifetime_is_closed_after_its_answers() {
    let ns = Named::start();
    let lb = Dnslb::start(&config(
        &[("ns1", ns.addr)],
        "[tcp]\nmax_connection_lifetime_ms = 600\n",
    ));
    let mut s = TcpStream::connect(lb.dns).unwrap();
    let start = Instant::now();
    let mut answered = 0;
    while answered_over_tcp(&mut s) {
        answered += 1;
        std::thread::sleep(Duration::from_millis(50));
        assert!(start.elapsed() < Duration::from_secs(5), "never closed");
    }
    let took = start.elapsed();
    assert!(answered >= 5, "served until then: {answered}");
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}

#[test]
fn a_connection_reads_at_most_max_queries_then_closes() {
    let ns = Named::start();
    let lb = Dnslb::start(&config(
        &[("ns1", ns.addr)],
        "[tcp]\nmax_queries_per_connection = 3\n",
    ));
    let mut s = TcpStream::connect(lb.dns).unwrap();
    let mut burst = Vec::new();
    for _ in 0..5 {
        burst.extend(frame(&query("www.example.test.", RecordType::A, true)));
    }
    s.write_all(&burst).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut got = 0;
    while let Ok(a) = read_frame(&mut s) {
        assert_eq!(Message::from_vec(&a).unwrap().answers.len(), 2);
        got += 1;
    }
    assert_eq!(got, 3);
}

/// A client that pipelines more queries than `max_queries_per_connection` and reads
/// slowly still gets every answer to the queries read, then a clean close: the
/// connection is not reset while answers wait in dnslb's send queue (closing a socket
/// with unread input resets it and discards what it had not yet sent).
#[test]
fn a_slow_reader_past_max_queries_gets_every_answer_then_a_clean_close() {
    let ns = Named::start();
    let lb = Dnslb::start(&config(
        &[("ns1", ns.addr)],
        "[tcp]\nmax_queries_per_connection = 40\n",
    ));
    // A small receive window: most answers wait in dnslb's send queue.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&lb.dns.into()).unwrap();
    let mut s: TcpStream = sock.into();
    let burst = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|_| frame(&query("big.example.test.", RecordType::TXT, false)))
            .collect()
    };
    s.write_all(&burst(40)).unwrap();
    // dnslb reads the 40 and stops reading; the next 20 wait unread in its socket
    // while it answers the 40 (about 50 KB), before the client reads.
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(&burst(20)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    s.set_read_timeout(Some(T)).unwrap();
    let mut got = 0;
    let end = loop {
        match read_frame(&mut s) {
            Ok(a) => {
                assert_eq!(Message::from_vec(&a).unwrap().answers.len(), 12);
                got += 1;
            }
            Err(e) => break e,
        }
    };
    assert_eq!(got, 40, "answers to the queries read (then: {end})");
    assert_eq!(end.kind(), std::io::ErrorKind::UnexpectedEof, "{end}");
}

/// A client that sends one byte a second never finishes a frame: it holds its slot
/// (here its client's only one) no longer than the idle timeout.
#[test]
fn a_slowloris_client_holds_no_slot_past_the_idle_timeout() {
    let ns = Named::start();
    let lb = Dnslb::start(&config(
        &[("ns1", ns.addr)],
        "[tcp]\nidle_timeout_ms = 1500\nmax_connections_per_client = 1\n",
    ));
    let frame = frame(&query("www.example.test.", RecordType::A, true));
    let mut slow = tcp_from("127.0.0.5", lb.dns).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(1000)))
        .unwrap();
    // The handshake completes in the kernel before dnslb accepts: wait until the
    // slow connection holds the slot, or the second one below could take it first
    // (another worker's listener may accept it earlier).
    assert!(eventually(T, || metric(
        &scrape(&lb),
        TCP_CONNECTIONS_OPEN,
        &[]
    ) >= 1.0));
    let start = Instant::now();
    let mut checked_cap = false;
    for byte in &frame {
        if slow.write_all(&[*byte]).is_err() {
            break;
        }
        if !checked_cap {
            // Meanwhile the slot is taken: a second connection is refused.
            let mut second = tcp_from("127.0.0.5", lb.dns).unwrap();
            assert!(!answered_over_tcp(&mut second));
            checked_cap = true;
        }
        // One byte a second (the read waits that long, or sees the close).
        if closed_by_server(&mut slow, Duration::from_secs(1)) {
            break;
        }
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(3000),
        "the slowloris kept its slot for {took:?}"
    );
    // Its slot is free again.
    assert!(eventually(T, || tcp_from("127.0.0.5", lb.dns)
        .is_ok_and(|mut s| answered_over_tcp(&mut s))));
}

/// `[acl]` and `[rate_limit]` are SIGHUP tunables: turned on, then off, while the
/// process runs.
#[test]
fn acl_and_rate_limit_are_reloaded_on_sighup() {
    let ns = Named::start();
    let lb = Dnslb::start(&config(&[("ns1", ns.addr)], ""));
    let before = flood("127.0.0.3", lb.dns, 500, Duration::from_millis(500));
    assert_eq!(before.answered, before.sent, "no limit yet: {before:?}");
    let path = lb.dir.path().join("dnslb.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let reloads = |lb: &Dnslb| {
        lb.logs()
            .iter()
            .filter(|l| l.contains("configuration reloaded"))
            .count()
    };
    std::fs::write(
        &path,
        format!(
            "{text}[rate_limit]\nresponses_per_second = 10\nburst = 10\nipv4_prefix = 32\nslip = 0\n\
             [acl]\ndeny = [\"127.0.0.4/32\"]\n"
        ),
    )
    .unwrap();
    lb.signal("HUP");
    assert!(eventually(T, || reloads(&lb) == 1));
    let limited = flood("127.0.0.3", lb.dns, 500, Duration::from_millis(500));
    assert!(limited.answered <= 10 + 10, "{limited:?}");
    assert_eq!(limited.truncated, 0, "slip = 0");
    let denied = flood("127.0.0.4", lb.dns, 100, Duration::from_millis(300));
    assert_eq!(denied.answered + denied.truncated, 0, "{denied:?}");
    // Off again.
    std::fs::write(&path, &text).unwrap();
    lb.signal("HUP");
    assert!(eventually(T, || reloads(&lb) == 2));
    let after = flood("127.0.0.3", lb.dns, 500, Duration::from_millis(500));
    assert_eq!(after.answered, after.sent, "{after:?}");
}
