//! Black-box mutation test: the real binary in front of a real `named` takes thousands
//! of mutated datagrams and TCP streams made from real queries (every header bit
//! flipped, counts at their extremes, compression pointers that loop or point out of
//! bounds, truncated, extended, huge and tiny length prefixes) and afterwards is
//! alive, answers a normal query over UDP and TCP, and has counted every input.
//! Bounded to a few seconds.

mod common;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use dnslb::metrics::{BACKEND_QUERIES, DROPPED, NO_BACKEND, QUERIES};
use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;

const T: Duration = Duration::from_secs(3);

/// A counter's value as a count.
fn count(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    metric(text, name, labels) as u64
}

/// What the client-side counters say: messages received, and where they went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    received: u64,
    forwarded: u64,
    servfail: u64,
    dropped: u64,
}

fn counts(lb: &Dnslb, transport: &str, reasons: &[&str]) -> Counts {
    let (st, m) = lb.http("GET", "/metrics", None);
    assert_eq!(st, 200);
    Counts {
        received: count(&m, QUERIES, &[("transport", transport)]),
        forwarded: count(&m, BACKEND_QUERIES, &[]),
        servfail: count(&m, NO_BACKEND, &[("transport", transport)]),
        dropped: reasons
            .iter()
            .map(|r| count(&m, DROPPED, &[("reason", r), ("transport", transport)]))
            .sum(),
    }
}

fn bases() -> Vec<Vec<u8>> {
    vec![
        query("www.example.test.", RecordType::A, true),
        query("example.test.", RecordType::SOA, false),
        query("a.b.c.d.e.f.wild.example.test.", RecordType::TXT, true),
        query("missing.example.test.", RecordType::AAAA, false),
    ]
}

/// Every mutation of `q` (a query with one question starting at offset 12).
fn mutations(q: &[u8], rng: &mut fastrand::Rng) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    // Every header bit.
    for bit in 0..12 * 8 {
        let mut m = q.to_vec();
        m[bit / 8] ^= 1 << (bit % 8);
        out.push(m);
    }
    // Each count at its extremes.
    for at in [4, 6, 8, 10] {
        for v in [0u16, 1, 2, 0x7fff, 0xffff] {
            let mut m = q.to_vec();
            m[at..at + 2].copy_from_slice(&v.to_be_bytes());
            out.push(m);
        }
    }
    // Compression pointers: to itself, forward, out of bounds, a two-pointer loop,
    // a pointer into the header, and reserved label types.
    let name_end = 12 + q[12..].iter().position(|&b| b == 0).unwrap() + 1;
    let tail = q[name_end..].to_vec();
    for name in [
        vec![0xc0, 12],
        vec![0xc0, 14],
        vec![0xff, 0xff],
        vec![0xc0, 14, 0xc0, 12],
        vec![1, b'a', 0xc0, 12],
        vec![0xc0, 2],
        vec![0x80, 1, 0],
        vec![0x40, 1, 0],
        vec![63],
        vec![64, b'a', 0],
    ] {
        let mut m = q[..12].to_vec();
        m.extend(&name);
        m.extend(&tail);
        out.push(m);
    }
    // A name of 128 labels (over 255 bytes) and one that is a chain of pointers.
    let mut long = q[..12].to_vec();
    for _ in 0..128 {
        long.extend([1, b'x']);
    }
    long.push(0);
    long.extend(&tail);
    out.push(long);
    let mut chain = q.to_vec();
    let first = chain.len();
    chain.extend([0xc0, 12]);
    for i in 0..100 {
        let prev = (first + 2 * i) as u16;
        chain.extend((0xc000 | prev).to_be_bytes());
    }
    chain[5] = 2;
    out.push(chain);
    // Truncated at every length, extended with garbage and zeros.
    for n in 0..q.len() {
        out.push(q[..n].to_vec());
    }
    for extra in [1usize, 17, 512, 3000] {
        let mut m = q.to_vec();
        m.extend((0..extra).map(|_| rng.u8(..)));
        out.push(m);
        let mut z = q.to_vec();
        z.resize(q.len() + extra, 0);
        out.push(z);
    }
    // Random multi-byte corruption.
    for _ in 0..700 {
        let mut m = q.to_vec();
        for _ in 0..rng.usize(1..6) {
            let i = rng.usize(..m.len());
            m[i] = rng.u8(..);
        }
        out.push(m);
    }
    out
}

#[test]
fn mutated_datagrams_and_streams_are_all_counted_and_dnslb_keeps_answering() {
    let ns = Named::start();
    let lb = Dnslb::start(&config(
        &[("ns1", ns.addr)],
        "[tcp]\nidle_timeout_ms = 1000\nmax_connections_per_client = 1000\n\
         [balance]\nquery_timeout_ms = 500\n",
    ));
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(17);
    let udp_reasons = [
        "short",
        "response_to_listener",
        "oversized",
        "ids_exhausted",
    ];

    // UDP: thousands of mutated datagrams, paced so the kernel drops none of them.
    let before = counts(&lb, "udp", &udp_reasons);
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_nonblocking(true).unwrap();
    let mut datagrams: Vec<Vec<u8>> = bases()
        .iter()
        .flat_map(|q| mutations(q, &mut rng))
        .collect();
    // Larger than dnslb takes from a client: cut, dropped, counted.
    datagrams.push(vec![0; 5000]);
    let mut sink = vec![0u8; 65536];
    for (i, d) in datagrams.iter().enumerate() {
        s.send_to(d, lb.dns).unwrap();
        if i % 50 == 49 {
            while s.recv_from(&mut sink).is_ok() {}
            std::thread::sleep(Duration::from_millis(3));
        }
    }
    let sent = datagrams.len() as u64;
    assert!(sent >= 3000, "{sent}");
    // Every datagram received and accounted: forwarded, answered with SERVFAIL, or
    // dropped for a reason.
    let mut after = before;
    let settled = eventually(T, || {
        after = counts(&lb, "udp", &udp_reasons);
        after.received - before.received == sent
            && after.forwarded - before.forwarded
                + (after.servfail - before.servfail)
                + (after.dropped - before.dropped)
                == sent
    });
    assert!(settled, "sent {sent}: before {before:?} after {after:?}");
    assert!(after.dropped - before.dropped > 100 && after.forwarded - before.forwarded > 100);

    // TCP: one connection per stream, all at once.
    let tcp_reasons = ["response_to_listener", "short"];
    let before = counts(&lb, "tcp", &tcp_reasons);
    let (st, m0) = lb.http("GET", "/metrics", None);
    assert_eq!(st, 200);
    let tail_drops = |m: &str| {
        (
            count(
                m,
                DROPPED,
                &[("reason", "bad_length"), ("transport", "tcp")],
            ),
            count(
                m,
                DROPPED,
                &[("reason", "partial_frame"), ("transport", "tcp")],
            ),
        )
    };
    let (bad0, partial0) = tail_drops(&m0);
    let q = query("www.example.test.", RecordType::A, true);
    let mut streams: Vec<Vec<u8>> = Vec::new();
    let mut frames_read = 0u64;
    // A single frame with one header bit flipped: read and counted (forwarded, or
    // dropped as a response).
    for bit in 0..12 * 8 {
        let mut m = q.clone();
        m[bit / 8] ^= 1 << (bit % 8);
        streams.push(frame(&m));
        frames_read += 1;
    }
    // Two good frames, then a bad tail: a length too small for a header ...
    let (mut bad_tails, mut partial_tails) = (0, 0);
    let good = [frame(&q), frame(&q)].concat();
    for len in 0u16..12 {
        let mut st = good.clone();
        st.extend(len.to_be_bytes());
        st.extend((0..len).map(|_| rng.u8(..)));
        streams.push(st);
        frames_read += 2;
        bad_tails += 1;
    }
    // ... or a frame cut short (huge prefixes among them), then EOF.
    for (prefix, body) in [
        (0xffffu16, 10usize),
        (0x8000, 3000),
        (0x1000, 0),
        (q.len() as u16, q.len() - 1),
        (q.len() as u16, 5),
        (q.len() as u16, 0),
    ] {
        let mut st = good.clone();
        st.extend(prefix.to_be_bytes());
        st.extend((0..body).map(|_| rng.u8(..)));
        streams.push(st);
        frames_read += 2;
        partial_tails += 1;
    }
    // Half a length prefix.
    let mut st = good.clone();
    st.push(0);
    streams.push(st);
    frames_read += 2;
    partial_tails += 1;
    let mut conns: Vec<TcpStream> = streams
        .iter()
        .map(|st| {
            let mut c = TcpStream::connect(lb.dns).unwrap();
            c.write_all(st).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            c
        })
        .collect();
    // Each is closed by dnslb once what it read is answered or given up.
    for c in &mut conns {
        c.set_read_timeout(Some(T)).unwrap();
        let mut buf = Vec::new();
        let r = c.read_to_end(&mut buf);
        assert!(
            r.is_ok()
                || r.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "closed: {r:?}"
        );
    }
    let mut after = before;
    let (mut bad, mut partial) = (0, 0);
    let settled = eventually(T, || {
        after = counts(&lb, "tcp", &tcp_reasons);
        let (st, m) = lb.http("GET", "/metrics", None);
        assert_eq!(st, 200);
        (bad, partial) = tail_drops(&m);
        after.received - before.received == frames_read
            && after.forwarded - before.forwarded
                + (after.servfail - before.servfail)
                + (after.dropped - before.dropped)
                == frames_read
            && bad - bad0 == bad_tails
            && partial - partial0 == partial_tails
    });
    assert!(
        settled,
        "frames {frames_read}, bad {bad_tails}, partial {partial_tails}: before {before:?} \
         after {after:?}; bad_length {} partial_frame {}",
        bad - bad0,
        partial - partial0
    );

    // Alive, and answering normally over both transports.
    let mut lb = lb;
    assert!(lb.alive());
    let a = udp_query(lb.dns, &q, T).unwrap();
    assert_eq!(a.answers.len(), 2);
    let t = Message::from_vec(&tcp_query_raw(lb.dns, &q).unwrap()).unwrap();
    assert_eq!(t.answers.len(), 2);
    let dig = run(
        "dig",
        &[
            "@127.0.0.1",
            "-p",
            &lb.dns.port().to_string(),
            "+time=2",
            "+tries=1",
            "www.example.test",
            "A",
        ],
    );
    assert!(
        dig.contains("status: NOERROR") && dig.contains("192.0.2."),
        "{dig}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}
