//! The packet cache against real BIND: cached answers are the backend's own bytes,
//! a swap makes no stale answer, the cache flushes by hand and stays in its bounds.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use dnslb::metrics::{CACHE_ENTRIES, CACHE_EVICTIONS, CACHE_HITS, CACHE_MISSES};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use hickory_proto::serialize::binary::BinEncodable;

const T: Duration = Duration::from_secs(5);

/// One exchange a [`Recorder`] passed on.
#[derive(Clone)]
struct Exchange {
    tcp: bool,
    query: Vec<u8>,
    answer: Vec<u8>,
}

/// A relay in front of a real named (UDP and TCP on one port) that records every
/// query it is sent and the backend's answer, byte for byte.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Exchange>>>,
    stop: Arc<AtomicBool>,
}

impl Recorder {
    fn start(named: SocketAddr) -> Recorder {
        let port = free_port();
        let udp = UdpSocket::bind(("127.0.0.1", port)).unwrap();
        let tcp = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let seen: Arc<Mutex<Vec<Exchange>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (seen, stop) = (seen.clone(), stop.clone());
            udp.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65535];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    let query = buf[..n].to_vec();
                    let Ok(answer) = udp_query_raw(named, &query, T) else {
                        continue;
                    };
                    seen.lock().unwrap().push(Exchange {
                        tcp: false,
                        query,
                        answer: answer.clone(),
                    });
                    let _ = udp.send_to(&answer, from);
                }
            });
        }
        {
            let seen = seen.clone();
            std::thread::spawn(move || {
                for conn in tcp.incoming() {
                    let Ok(mut conn) = conn else { continue };
                    let seen = seen.clone();
                    std::thread::spawn(move || {
                        while let Ok(query) = read_frame(&mut conn) {
                            let Ok(answer) = tcp_query_raw(named, &query) else {
                                return;
                            };
                            seen.lock().unwrap().push(Exchange {
                                tcp: true,
                                query,
                                answer: answer.clone(),
                            });
                            if write_frame(&mut conn, &answer).is_err() {
                                return;
                            }
                        }
                    });
                }
            });
        }
        Recorder {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            seen,
            stop,
        }
    }

    /// The exchanges over `tcp` (or UDP) whose question is `name`/`rtype`, any case.
    fn exchanges(&self, tcp: bool, name: &str, rtype: RecordType) -> Vec<Exchange> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.tcp == tcp)
            .filter(|e| {
                let q = &Message::from_vec(&e.query).unwrap().queries[0];
                q.name().to_ascii().eq_ignore_ascii_case(name) && q.query_type() == rtype
            })
            .cloned()
            .collect()
    }
}

impl Recorder {
    /// How many exchanges over `tcp` (or UDP) had a query equal to `q` but for the ID
    /// and the case of letters (dnslb's health checks ask example.test. SOA too, but
    /// without EDNS).
    fn exchanges_of(&self, tcp: bool, q: &[u8]) -> usize {
        let want = q[2..].to_ascii_lowercase();
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.tcp == tcp && e.query[2..].to_ascii_lowercase() == want)
            .count()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `name` with its letters' case flipped where `pattern`'s bits are set (DNS 0x20).
fn mixed(name: &str, pattern: u64) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            if pattern >> (i % 64) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// A query with an EDNS payload size (`None`: no OPT record) and the DO bit.
fn build(name: &str, rtype: RecordType, edns: Option<u16>, dnssec_ok: bool) -> Vec<u8> {
    let mut m = Message::new(fastrand::u16(..), MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size).set_dnssec_ok(dnssec_ok);
        m.set_edns(e);
    }
    m.to_bytes().unwrap()
}

fn ask(lb: &Dnslb, tcp: bool, q: &[u8]) -> Vec<u8> {
    if tcp {
        tcp_query_raw(lb.dns, q).unwrap()
    } else {
        udp_query_raw(lb.dns, q, T).unwrap()
    }
}

/// Where the question's name ends (the first name is never compressed).
fn name_end(msg: &[u8]) -> usize {
    let mut pos = 12;
    while msg[pos] != 0 {
        pos += 1 + msg[pos] as usize;
    }
    pos + 1
}

/// Every record kind of the test zone, a wildcard, a referral, NXDOMAIN and NODATA,
/// with and without EDNS, with DO, and an answer too large for 512 bytes.
const CASES: &[(&str, RecordType, Option<u16>, bool)] = &[
    ("example.test.", RecordType::SOA, Some(1232), false),
    ("example.test.", RecordType::NS, Some(1232), false),
    ("example.test.", RecordType::MX, Some(1232), false),
    ("example.test.", RecordType::TXT, None, false),
    ("example.test.", RecordType::CAA, Some(1232), true),
    ("www.example.test.", RecordType::A, Some(1232), false),
    ("www.example.test.", RecordType::A, None, false),
    ("www.example.test.", RecordType::AAAA, Some(4096), true),
    ("ftp.example.test.", RecordType::A, Some(1232), false),
    ("ftp.example.test.", RecordType::CNAME, Some(1232), false),
    (
        "_sip._udp.example.test.",
        RecordType::SRV,
        Some(1232),
        false,
    ),
    ("x.wild.example.test.", RecordType::TXT, Some(1232), false),
    ("host.sub.example.test.", RecordType::A, Some(1232), false),
    ("nope.example.test.", RecordType::A, Some(1232), false),
    ("www.example.test.", RecordType::MX, Some(1232), false),
    ("big.example.test.", RecordType::TXT, Some(4096), false),
];

#[test]
fn a_cached_answer_is_the_backends_bytes_but_for_the_id_and_the_question_case() {
    let ns = Named::start();
    let rec = Recorder::start(ns.addr);
    let lb = Dnslb::start(&config(
        &[("rec", rec.addr)],
        "[cache]\nmax_entries = 10000\n[server]\nworkers = 1\ntcp_workers = 1\n",
    ));
    let mut hits = 0;
    for tcp in [false, true] {
        for (i, &(name, rtype, edns, dnssec_ok)) in CASES.iter().enumerate() {
            let what = format!("{name} {rtype} edns={edns:?} do={dnssec_ok} tcp={tcp}");
            let first = build(&mixed(name, 0x5555 + i as u64), rtype, edns, dnssec_ok);
            let a1 = ask(&lb, tcp, &first);
            let seen = rec.exchanges_of(tcp, &first);
            assert_eq!(seen, 1, "{what}: the first query reached the backend");
            let backend = &rec
                .exchanges(tcp, name, rtype)
                .into_iter()
                .rev()
                .find(|e| e.query[2..].eq_ignore_ascii_case(&first[2..]))
                .unwrap()
                .answer;
            // A miss passes the backend's answer through: all but the ID.
            assert_eq!(&a1[..2], &first[..2], "{what}");
            assert_eq!(&a1[2..], &backend[2..], "{what}");
            let second = build(&mixed(name, 0xaaaa + i as u64), rtype, edns, dnssec_ok);
            assert_ne!(&second[12..], &first[12..], "{what}: the case differs");
            let a2 = ask(&lb, tcp, &second);
            if Message::from_vec(backend).unwrap().metadata.truncation {
                // BIND sends at most 1232 bytes over UDP: TC=1, never cached.
                assert!(!tcp, "{what}");
                assert_eq!(rec.exchanges_of(tcp, &first), seen + 1, "{what}");
                continue;
            }
            assert_eq!(
                rec.exchanges_of(tcp, &first),
                seen,
                "{what}: the second query was answered from the cache"
            );
            let end = name_end(&second);
            assert_eq!(&a2[..2], &second[..2], "{what}: the client's ID");
            assert_eq!(&a2[2..12], &backend[2..12], "{what}: header");
            assert_eq!(&a2[12..end], &second[12..end], "{what}: the client's case");
            assert_eq!(
                &a2[end..],
                &backend[end..],
                "{what}: the rest, byte for byte"
            );
            let m = Message::from_vec(&a2).unwrap();
            assert!(
                !m.answers.is_empty()
                    || !m.authorities.is_empty()
                    || m.metadata.response_code == ResponseCode::NXDomain,
                "{what}: {m:?}"
            );
            hits += 1;
        }
    }
    let m = scrape(&lb);
    let udp = metric(&m, CACHE_HITS, &[("transport", "udp")]);
    let tcp = metric(&m, CACHE_HITS, &[("transport", "tcp")]);
    assert_eq!((udp + tcp) as usize, hits, "{m}");
    assert_eq!(tcp as usize, CASES.len(), "{m}");
    assert!(udp as usize >= CASES.len() - 1, "{m}");
    assert!(
        metric(&m, CACHE_MISSES, &[]) >= (2 * CASES.len()) as f64,
        "{m}"
    );
    // Each answer stored once per transport (health checks bypass the cache).
    assert_eq!(metric(&m, CACHE_ENTRIES, &[]) as usize, hits, "{m}");
}

#[test]
fn a_truncated_answer_is_never_cached_and_zone_transfers_bypass_the_cache() {
    let ns = Named::start();
    let rec = Recorder::start(ns.addr);
    let lb = Dnslb::start(&config(
        &[("rec", rec.addr)],
        "[cache]\nmax_entries = 1000\n",
    ));
    // Without EDNS the big TXT set does not fit 512 bytes: TC=1, every time.
    for _ in 0..3 {
        let a = ask(
            &lb,
            false,
            &build("big.example.test.", RecordType::TXT, None, false),
        );
        assert!(Message::from_vec(&a).unwrap().metadata.truncation);
    }
    assert_eq!(
        rec.exchanges(false, "big.example.test.", RecordType::TXT)
            .len(),
        3
    );
    // Over TCP the client gets the whole answer; a TC answer was never stored for it.
    let a = ask(
        &lb,
        true,
        &build("big.example.test.", RecordType::TXT, None, false),
    );
    let m = Message::from_vec(&a).unwrap();
    assert!(!m.metadata.truncation && m.answers.len() == 12, "{m:?}");
    // AXFR: every transfer goes to the backend.
    let out = run(
        "dig",
        &[
            "+tcp",
            "+noall",
            "+answer",
            "-p",
            &lb.dns.port().to_string(),
            "@127.0.0.1",
            "example.test.",
            "AXFR",
        ],
    );
    assert!(out.contains("big.example.test."), "{out}");
    run(
        "dig",
        &[
            "+tcp",
            "-p",
            &lb.dns.port().to_string(),
            "@127.0.0.1",
            "example.test.",
            "AXFR",
        ],
    );
    assert_eq!(
        rec.exchanges(true, "example.test.", RecordType::AXFR).len(),
        2
    );
}

#[test]
fn a_manual_flush_needs_the_token_and_the_cache_stays_within_max_entries() {
    let ns = Named::start();
    let rec = Recorder::start(ns.addr);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "cache-token-1\n").unwrap();
    // One UDP and one TCP worker: three quarters (3 entries) for the UDP one.
    let lb = Dnslb::start(&config(
        &[("rec", rec.addr)],
        &format!(
            "[admin]\ntoken_file = \"{}\"\n[cache]\nmax_entries = 4\n[server]\nworkers = 1\ntcp_workers = 1\n",
            token_file.display()
        ),
    ));
    let www = || build("www.example.test.", RecordType::A, Some(1232), false);
    ask(&lb, false, &www());
    ask(&lb, false, &www());
    assert_eq!(
        rec.exchanges(false, "www.example.test.", RecordType::A)
            .len(),
        1
    );
    assert_eq!(http(lb.admin, "DELETE", "/v1/cache", None, None).0, 401);
    ask(&lb, false, &www());
    assert_eq!(
        rec.exchanges(false, "www.example.test.", RecordType::A)
            .len(),
        1,
        "a refused flush flushed nothing"
    );
    let (st, body) = http(lb.admin, "DELETE", "/v1/cache", None, Some("cache-token-1"));
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("\"enabled\":true"), "{body}");
    ask(&lb, false, &www());
    assert_eq!(
        rec.exchanges(false, "www.example.test.", RecordType::A)
            .len(),
        2,
        "after the flush the backend answers again"
    );
    // Six names into a worker holding three: three are evicted, three stay.
    for name in ["a", "b", "c", "d", "e"] {
        let n = format!("{name}.wild.example.test.");
        ask(&lb, false, &build(&n, RecordType::A, Some(1232), false));
    }
    let m = scrape(&lb);
    assert_eq!(metric(&m, CACHE_ENTRIES, &[]), 3.0, "{m}");
    assert!(metric(&m, CACHE_EVICTIONS, &[]) >= 3.0, "{m}");
}

/// The two backend sets of the stale-answer test: the same names, different data.
fn zone_with(address: &str) -> String {
    std::fs::read_to_string(zone_file())
        .unwrap()
        .replace("192.0.2.20", address)
}

/// One answer seen during the swaps: when its query left and the answer came.
struct Seen {
    sent: Instant,
    got: Instant,
    address: String,
}

#[test]
fn no_answer_from_the_old_set_follows_a_swap_under_load() {
    const SWAPS: usize = 40;
    let blue = Named::start_serving(free_port(), &zone_with("198.51.100.1"));
    let green = Named::start_serving(free_port(), &zone_with("198.51.100.2"));
    let sets = [
        ("blue", blue.addr, "198.51.100.1"),
        ("green", green.addr, "198.51.100.2"),
    ];
    let lb = Dnslb::start(&config(
        &[("blue", blue.addr)],
        "[cache]\nmax_entries = 10000\nmax_ttl_s = 300\n",
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let asked = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (stop, asked, dns) = (stop.clone(), asked.clone(), lb.dns);
        clients.push(std::thread::spawn(move || {
            let tcp = c == 3;
            let mut seen = Vec::new();
            let udp = UdpSocket::bind(format!("127.0.0.{}:0", 2 + c)).unwrap();
            udp.set_read_timeout(Some(T)).unwrap();
            let mut stream: Option<TcpStream> = None;
            let mut buf = vec![0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                let q = build("www.example.test.", RecordType::A, Some(1232), false);
                let sent = Instant::now();
                let answer = if tcp {
                    // dnslb closes a connection after tcp.max_queries_per_connection:
                    // open the next one, as a client would.
                    let exchange = |stream: &mut Option<TcpStream>| {
                        let s = stream.get_or_insert_with(|| TcpStream::connect(dns).unwrap());
                        write_frame(s, &q).and_then(|()| read_frame(s))
                    };
                    match exchange(&mut stream) {
                        Ok(a) => a,
                        Err(_) => {
                            stream = None;
                            exchange(&mut stream).unwrap()
                        }
                    }
                } else {
                    udp.send_to(&q, dns).unwrap();
                    let n = udp.recv(&mut buf).expect("an answer within 5 s");
                    buf[..n].to_vec()
                };
                let got = Instant::now();
                let m = Message::from_vec(&answer).unwrap();
                assert_eq!(m.metadata.id, u16::from_be_bytes([q[0], q[1]]));
                let address = m
                    .answers
                    .iter()
                    .find_map(|r| match &r.data {
                        RData::A(a) if a.0.octets()[0] == 198 => Some(a.0.to_string()),
                        _ => None,
                    })
                    .unwrap_or_default();
                seen.push(Seen { sent, got, address });
                asked.fetch_add(1, Ordering::Relaxed);
            }
            seen
        }));
    }
    // (started, returned, the set now live)
    let mut swaps: Vec<(Instant, Instant, &str)> = Vec::new();
    let mut hits_between = Vec::new();
    for i in 0..SWAPS {
        std::thread::sleep(Duration::from_millis(100));
        let before = metric(&scrape(&lb), CACHE_HITS, &[]);
        std::thread::sleep(Duration::from_millis(100));
        hits_between.push(metric(&scrape(&lb), CACHE_HITS, &[]) - before);
        let (name, addr, data) = sets[(i + 1) % 2];
        let body = format!(r#"{{"backends":[{{"name":"{name}","address":"{addr}"}}]}}"#);
        let started = Instant::now();
        let (st, resp) = lb.http("PUT", "/v1/backends", Some(&body));
        assert_eq!(st, 200, "{resp}");
        swaps.push((started, Instant::now(), data));
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let seen: Vec<Seen> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    let total = asked.load(Ordering::Relaxed);
    assert!(total > 2000, "load: {total} queries");
    assert!(
        hits_between.iter().all(|&h| h > 0.0),
        "the cache answered between every two swaps: {hits_between:?}"
    );
    let mut stale = Vec::new();
    for s in &seen {
        // A swap in progress while the query was out may or may not apply to it.
        if swaps.iter().any(|&(a, b, _)| a < s.got && b > s.sent) {
            continue;
        }
        let live = swaps
            .iter()
            .rev()
            .find(|&&(_, b, _)| b <= s.sent)
            .map_or(sets[0].2, |&(_, _, d)| d);
        if s.address != live {
            stale.push((s.address.clone(), live));
        }
    }
    let m = scrape(&lb);
    assert!(metric(&m, CACHE_HITS, &[]) > total as f64 / 2.0, "{m}");
    assert!(
        stale.is_empty(),
        "{} stale answers of {}: {:?}",
        stale.len(),
        seen.len(),
        &stale[..stale.len().min(5)]
    );
    eprintln!("{} answers, {SWAPS} swaps, 0 stale", seen.len());
}
