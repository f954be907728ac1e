//! The admin API, health checks, persistence, auth and metrics, against the real
//! binary and real named processes.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use dnslb::metrics as m;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use serde_json::Value;

const T: Duration = Duration::from_secs(3);

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn raw_http(addr: std::net::SocketAddr, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn generation(lb: &Dnslb) -> u64 {
    json(&lb.http("GET", "/v1/backends", None).1)["generation"]
        .as_u64()
        .unwrap()
}

#[test]
fn every_route_answers_with_the_documented_status_and_json_errors() {
    let ns1 = Named::start();
    let ns2 = Named::start();
    let lb = Dnslb::start(&config(&[("ns1", ns1.addr)], ""));
    let g0 = generation(&lb);

    let (st, body) = lb.http(
        "POST",
        "/v1/backends",
        Some(&format!(
            r#"{{"name":"ns2","address":"{}","weight":2}}"#,
            ns2.addr
        )),
    );
    assert_eq!(st, 201, "{body}");
    assert_eq!(json(&body)["generation"], g0 + 1);
    let (st, body) = lb.http(
        "POST",
        "/v1/backends",
        Some(&format!(r#"{{"name":"ns2","address":"{}"}}"#, ns2.addr)),
    );
    assert_eq!(st, 409);
    assert!(json(&body)["error"].as_str().unwrap().contains("ns2"));

    let (st, body) = lb.http("GET", "/v1/backends/ns2", None);
    assert_eq!(st, 200);
    let b = json(&body);
    assert_eq!(b["weight"], 2);
    assert_eq!(b["state"], "active");
    for k in [
        "health",
        "outstanding",
        "queries_total",
        "timeouts_total",
        "address",
    ] {
        assert!(b.get(k).is_some(), "{k} in {body}");
    }
    assert_eq!(lb.http("GET", "/v1/backends/nope", None).0, 404);
    assert!(json(&lb.http("GET", "/v1/backends/nope", None).1)["error"].is_string());

    assert_eq!(lb.http("POST", "/v1/backends/ns2/drain", None).0, 200);
    assert_eq!(
        json(&lb.http("GET", "/v1/backends/ns2", None).1)["state"],
        "draining"
    );
    assert_eq!(lb.http("POST", "/v1/backends/ns2/undrain", None).0, 200);
    assert_eq!(
        json(&lb.http("GET", "/v1/backends/ns2", None).1)["state"],
        "active"
    );
    assert_eq!(lb.http("POST", "/v1/backends/nope/drain", None).0, 404);
    assert_eq!(lb.http("DELETE", "/v1/backends/ns2", None).0, 200);
    assert_eq!(lb.http("DELETE", "/v1/backends/ns2", None).0, 404);
    // The last backend is not removed by accident (PUT refuses an empty set too).
    let (st, body) = lb.http("DELETE", "/v1/backends/ns1", None);
    assert_eq!(st, 409, "{body}");
    assert!(json(&body)["error"]
        .as_str()
        .unwrap()
        .contains("last backend"));
    assert_eq!(generation(&lb), g0 + 4);
    // Errors axum makes itself are JSON too.
    let (st, body) = lb.http("PATCH", "/v1/backends", Some("{}"));
    assert_eq!(st, 405);
    let raw = raw_http(
        lb.admin,
        "PATCH /v1/backends HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(raw.to_ascii_lowercase().contains("allow: "), "{raw}");
    assert!(json(&body)["error"].is_string(), "{body}");

    // PUT: every kind of bad body is a 400 with a reason, and changes nothing.
    let g = generation(&lb);
    for (body, needle) in [
        (r#"{"backends":[]}"#.to_string(), "empty"),
        (
            format!(
                r#"{{"backends":[{{"name":"a","address":"{0}"}},{{"name":"a","address":"{0}"}}]}}"#,
                ns1.addr
            ),
            "twice",
        ),
        (
            r#"{"backends":[{"name":"a","address":"not-an-address"}]}"#.to_string(),
            "invalid",
        ),
        (
            format!(
                r#"{{"backends":[{{"name":"a","address":"{}","weight":0}}]}}"#,
                ns1.addr
            ),
            "weight",
        ),
        (
            format!(
                r#"{{"backends":[{{"name":"a","address":"{}"}}],"expected_generaton":1}}"#,
                ns1.addr
            ),
            "unknown field",
        ),
        ("{".to_string(), "invalid"),
    ] {
        let (st, resp) = lb.http("PUT", "/v1/backends", Some(&body));
        assert_eq!(st, 400, "{body} -> {resp}");
        assert!(
            json(&resp)["error"].as_str().unwrap().contains(needle),
            "{needle}: {resp}"
        );
    }
    assert_eq!(generation(&lb), g);

    // Compare-and-swap.
    let put = |expected: u64| {
        format!(
            r#"{{"backends":[{{"name":"n1","address":"{}"}},{{"name":"n2","address":"{}"}}],"expected_generation":{expected}}}"#,
            ns1.addr, ns2.addr
        )
    };
    assert_eq!(lb.http("PUT", "/v1/backends", Some(&put(g + 5))).0, 409);
    let (st, body) = lb.http("PUT", "/v1/backends", Some(&put(g)));
    assert_eq!(st, 200, "{body}");
    assert_eq!(json(&body)["generation"], g + 1);

    // require_healthy: a new backend that does not answer -> 422, nothing changes.
    let dead = format!("127.0.0.1:{}", free_port());
    let body = format!(
        r#"{{"backends":[{{"name":"n1","address":"{}"}},{{"name":"dead","address":"{dead}"}}],"require_healthy":true}}"#,
        ns1.addr
    );
    let (st, resp) = lb.http("PUT", "/v1/backends", Some(&body));
    assert_eq!(st, 422, "{resp}");
    assert!(json(&resp)["error"].as_str().unwrap().contains("dead"));
    assert_eq!(generation(&lb), g + 1);
    let names: Vec<_> = json(&lb.http("GET", "/v1/backends", None).1)["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["n1", "n2"]);
    let body = format!(
        r#"{{"backends":[{{"name":"n3","address":"{}"}}],"require_healthy":true}}"#,
        ns2.addr
    );
    assert_eq!(lb.http("PUT", "/v1/backends", Some(&body)).0, 200);

    let st = json(&lb.http("GET", "/v1/status", None).1);
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert!(st["uptime_s"].is_u64());
    assert_eq!(st["generation"], g + 2);
    assert_eq!(lb.http("GET", "/v1/nothing", None).0, 404);
}

#[test]
fn changes_persist_across_restarts_and_a_corrupt_state_file_stops_startup() {
    let ns1 = Named::start();
    let ns2 = Named::start();
    let lb = Dnslb::start(&config(&[("ns1", ns1.addr)], ""));
    lb.http(
        "POST",
        "/v1/backends",
        Some(&format!(r#"{{"name":"ns2","address":"{}"}}"#, ns2.addr)),
    );
    lb.http("POST", "/v1/backends/ns1/drain", None);
    let before = json(&lb.http("GET", "/v1/backends", None).1);
    let dir = lb.stop();
    // Restart with a config whose [[backend]] differs: the state file wins.
    let state = dir.path().join("state.json");
    let text = config(&[("other", ns1.addr)], "");
    let lb = Dnslb::start_in(
        dir,
        &format!("{text}[state]\npath = \"{}\"\n", state.display()),
    );
    let after = json(&lb.http("GET", "/v1/backends", None).1);
    assert_eq!(after["generation"], before["generation"]);
    let strip = |v: &Value| -> Vec<(String, String, String)> {
        v["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["name"].to_string(),
                    b["address"].to_string(),
                    b["state"].to_string(),
                )
            })
            .collect()
    };
    assert_eq!(strip(&after), strip(&before));
    // Corrupt file: start-up fails and names the file.
    let dir = lb.stop();
    std::fs::write(&state, "{\"generation\": 3, \"backends\": [").unwrap();
    std::fs::write(
        dir.path().join("dnslb.toml"),
        format!("{text}[state]\npath = \"{}\"\n", state.display()),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dnslb"))
        .arg("--config")
        .arg(dir.path().join("dnslb.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&state.display().to_string()) && err.contains("corrupt"),
        "{err}"
    );
}

#[test]
fn token_protects_every_route_but_healthz_and_metrics() {
    let ns = Named::start();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let text = config(
        &[("ns1", ns.addr)],
        &format!("[admin]\ntoken_file = \"{}\"\n", token_file.display()),
    );
    let lb = Dnslb::start_in(dir, &text);
    for (method, path) in [
        ("GET", "/v1/backends"),
        ("GET", "/v1/status"),
        ("GET", "/v1/backends/ns1"),
        ("POST", "/v1/backends/ns1/drain"),
        ("PUT", "/v1/backends"),
        ("DELETE", "/v1/backends/ns1"),
    ] {
        let (st, body) = http(lb.admin, method, path, Some("{}"), None);
        assert_eq!(st, 401, "{method} {path}");
        assert!(json(&body)["error"].is_string());
        assert_eq!(
            http(lb.admin, method, path, Some("{}"), Some("wrong-token!")).0,
            401
        );
    }
    assert_eq!(
        http(lb.admin, "GET", "/v1/backends", None, Some("s3cret-token")).0,
        200
    );
    assert_eq!(http(lb.admin, "GET", "/metrics", None, None).0, 200);
    assert!(eventually(T, || http(
        lb.admin, "GET", "/healthz", None, None
    )
    .0 == 200));
}

#[test]
fn a_killed_named_is_marked_down_in_time_traffic_moves_and_it_comes_back() {
    let ns1 = Named::start();
    let mut ns2 = Named::start();
    // interval 200 ms, timeout 200 ms, fall 3: down within 3*200+200 = 800 ms.
    let lb = Dnslb::start(&config(&[("ns1", ns1.addr), ("ns2", ns2.addr)], ""));
    assert!(eventually(T, || json(
        &lb.http("GET", "/v1/backends/ns2", None).1
    )["health"]
        == "up"));
    assert_eq!(lb.http("GET", "/healthz", None).0, 200);
    ns2.kill();
    let killed = Instant::now();
    assert!(eventually(T, || json(
        &lb.http("GET", "/v1/backends/ns2", None).1
    )["health"]
        == "down"));
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_millis(800 + 400),
        "marked down after {took:?}"
    );
    assert!(
        lb.logs()
            .iter()
            .filter(|l| l.contains("health changed") && l.contains("ns2"))
            .count()
            >= 1
    );
    // All traffic now goes to ns1, none fails.
    for _ in 0..100 {
        let q = query("www.example.test.", RecordType::A, true);
        let m = udp_query(lb.dns, &q, T).expect("answered");
        assert_eq!(m.response_code, ResponseCode::NoError);
    }
    let metrics = lb.http("GET", "/metrics", None).1;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(m::BACKEND_UP) && l.contains("ns2") && l.ends_with(" 0")),
        "{metrics}"
    );
    // Restarted, it comes back up.
    ns2.restart();
    assert!(eventually(Duration::from_secs(5), || json(
        &lb.http("GET", "/v1/backends/ns2", None).1
    )["health"]
        == "up"));
    // With every backend gone, /healthz is 503 and clients get SERVFAIL.
    drop(ns1);
    ns2.kill();
    assert!(eventually(T, || lb.http("GET", "/healthz", None).0 == 503));
    let m = Message::from_vec(
        &udp_query_raw(lb.dns, &query("www.example.test.", RecordType::A, true), T).unwrap(),
    )
    .unwrap();
    assert_eq!(m.response_code, ResponseCode::ServFail);
    let logged = lb
        .logs()
        .iter()
        .filter(|l| l.contains("health changed") && l.contains("ns2") && l.contains("to=Down"))
        .count();
    assert_eq!(logged, 2, "each change logged once: {:?}", lb.logs());
}

#[test]
fn metrics_expose_backends_drops_connections_and_generation() {
    let ns = Named::start();
    let lb = Dnslb::start(&config(&[("ns1", ns.addr)], ""));
    for _ in 0..20 {
        udp_query(lb.dns, &query("www.example.test.", RecordType::A, true), T).unwrap();
        udp_query(
            lb.dns,
            &query("missing.example.test.", RecordType::A, true),
            T,
        )
        .unwrap();
    }
    tcp_query_raw(lb.dns, &query("www.example.test.", RecordType::A, true)).unwrap();
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .send_to(&[1, 2], lb.dns)
        .unwrap();
    lb.http("POST", "/v1/backends/ns1/drain", None);
    lb.http("POST", "/v1/backends/ns1/undrain", None);
    std::thread::sleep(Duration::from_millis(100));
    let text = lb.http("GET", "/metrics", None).1;
    let value = |name: &str, labels: &[&str]| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(value(m::BACKEND_QUERIES, &["ns1"]) >= 41.0, "{text}");
    assert!(value(m::BACKEND_RESPONSES, &["ns1", "NOERROR"]) >= 21.0);
    assert!(value(m::BACKEND_RESPONSES, &["ns1", "NXDOMAIN"]) >= 20.0);
    assert!(text.contains(m::BACKEND_TIMEOUTS));
    assert_eq!(value(m::BACKEND_OUTSTANDING, &["ns1"]), 0.0);
    assert_eq!(value(m::BACKEND_UP, &["ns1"]), 1.0);
    assert!(
        value(&format!("{}_count", m::BACKEND_LATENCY), &["ns1"]) >= 41.0,
        "{text}"
    );
    assert!(text.contains(&format!("{}_bucket", m::BACKEND_LATENCY)));
    assert!(value(m::DROPPED, &["reason=\"short\""]) >= 1.0);
    assert!(value(m::TCP_CONNECTIONS, &[]) >= 1.0);
    assert_eq!(value(m::GENERATION, &[]), 3.0);
    assert!(value(m::HEALTH_CHECKS, &["pass"]) >= 1.0);
    assert!(value(m::QUERIES, &["udp"]) >= 40.0);
}

#[test]
fn forty_swaps_under_steady_dnsperf_load_lose_nothing() {
    let a = [Named::start(), Named::start()];
    let b = [Named::start(), Named::start()];
    let lb = Dnslb::start(&config(&[("a0", a[0].addr), ("a1", a[1].addr)], ""));
    let dir = tempfile::tempdir().unwrap();
    let qfile = dir.path().join("queries.txt");
    let mut lines = String::new();
    for (n, t) in [
        ("www.example.test", "A"),
        ("www.example.test", "AAAA"),
        ("example.test", "MX"),
        ("ftp.example.test", "CNAME"),
        ("x.wild.example.test", "TXT"),
        ("example.test", "SOA"),
    ] {
        lines.push_str(&format!("{n} {t}\n"));
    }
    std::fs::write(&qfile, lines).unwrap();
    let port = lb.dns.port().to_string();
    let perf = Command::new("dnsperf")
        .args(["-s", "127.0.0.1", "-p", &port, "-d"])
        .arg(&qfile)
        .args(["-l", "12", "-Q", "3000", "-c", "4", "-t", "3"])
        .output();
    let perf = std::thread::spawn(move || perf);
    // Start swapping once the load runs; 40 swaps, alternating sets, with CAS.
    std::thread::sleep(Duration::from_millis(500));
    let sets = [&a, &b];
    for i in 0..40 {
        let set = sets[(i + 1) % 2];
        let g = generation(&lb);
        let body = format!(
            r#"{{"backends":[{{"name":"s{i}x","address":"{}"}},{{"name":"s{i}y","address":"{}"}}],"expected_generation":{g}}}"#,
            set[0].addr, set[1].addr
        );
        let (st, resp) = lb.http("PUT", "/v1/backends", Some(&body));
        assert_eq!(st, 200, "{resp}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let out = perf.join().unwrap().expect("dnsperf is installed");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{text}");
    let Dnsperf {
        sent,
        completed,
        lost,
        codes,
        ..
    } = dnsperf_summary(&text);
    assert!(sent >= 30_000, "steady load: {text}");
    assert_eq!(lost, 0, "{text}");
    assert_eq!(completed, sent);
    assert!(!codes.contains("SERVFAIL"), "{codes}");
    assert!(codes.contains("NOERROR"), "{codes}");
}

/// `config` with health checks every minute: a test sees the health a change leaves
/// behind, not what the next round makes of it.
fn checks_rarely(config: String) -> String {
    config.replace("interval_ms = 200", "interval_ms = 60000")
}

#[test]
fn healthz_is_200_right_after_a_put_and_passing_require_healthy_checks_count() {
    let old = Named::start();
    let new1 = Named::start();
    let new2 = Named::start();
    let lb = Dnslb::start(&checks_rarely(config(&[("old", old.addr)], "")));
    assert!(eventually(T, || lb.backend("old")["health"] == "up"));
    // A whole new set, not checked: unknown, usable, and /healthz says so.
    let body = format!(
        r#"{{"backends":[{{"name":"n1","address":"{}"}}]}}"#,
        new1.addr
    );
    let (st, resp) = lb.http("PUT", "/v1/backends", Some(&body));
    assert_eq!(st, 200, "{resp}");
    assert_eq!(lb.backend("n1")["health"], "unknown");
    let (st, resp) = lb.http("GET", "/healthz", None);
    assert_eq!(st, 200, "{resp}");
    // With require_healthy, the check that let the swap happen counts: up at once.
    let body = format!(
        r#"{{"backends":[{{"name":"n2","address":"{}"}}],"require_healthy":true}}"#,
        new2.addr
    );
    let (st, resp) = lb.http("PUT", "/v1/backends", Some(&body));
    assert_eq!(st, 200, "{resp}");
    assert_eq!(lb.backend("n2")["health"], "up");
    assert_eq!(lb.http("GET", "/healthz", None).0, 200);
    // A rollout renames n2 to ns1 at the same address: its health goes with it.
    let body = format!(
        r#"{{"backends":[{{"name":"ns1","address":"{}"}}]}}"#,
        new2.addr
    );
    assert_eq!(lb.http("PUT", "/v1/backends", Some(&body)).0, 200);
    assert_eq!(lb.backend("ns1")["health"], "up");
}

#[test]
fn removed_backends_vanish_from_metrics_and_a_readded_name_starts_clean() {
    let ns1 = Named::start();
    let ns2 = Named::start();
    let lb = Dnslb::start(&config(&[("ns1", ns1.addr), ("ns2", ns2.addr)], ""));
    for _ in 0..20 {
        udp_query(lb.dns, &query("www.example.test.", RecordType::A, true), T).unwrap();
    }
    let series = |text: &str, name: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&format!("backend=\"{name}\"")))
            .map(String::from)
            .collect()
    };
    let value = |text: &str, metric: &str, name: &str| -> f64 {
        series(text, name)
            .iter()
            .filter(|l| l.starts_with(&format!("{metric}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let text = lb.http("GET", "/metrics", None).1;
    assert!(value(&text, m::BACKEND_QUERIES, "ns2") >= 1.0, "{text}");
    assert_eq!(value(&text, m::BACKEND_UP, "ns2"), 1.0, "{text}");
    assert_eq!(lb.http("DELETE", "/v1/backends/ns2", None).0, 200);
    let text = lb.http("GET", "/metrics", None).1;
    assert_eq!(series(&text, "ns2"), Vec::<String>::new(), "{text}");
    assert!(!series(&text, "ns1").is_empty());
    // Added again (elsewhere): its counters start from zero.
    let body = format!(r#"{{"name":"ns2","address":"{}"}}"#, ns1.addr);
    assert_eq!(lb.http("POST", "/v1/backends", Some(&body)).0, 201);
    let text = lb.http("GET", "/metrics", None).1;
    assert_eq!(value(&text, m::BACKEND_QUERIES, "ns2"), 0.0, "{text}");
    assert_eq!(
        value(&text, &format!("{}_count", m::BACKEND_LATENCY), "ns2"),
        0.0,
        "{text}"
    );
    // A whole new set: only its names remain.
    let body = format!(
        r#"{{"backends":[{{"name":"x1","address":"{}"}}]}}"#,
        ns2.addr
    );
    assert_eq!(lb.http("PUT", "/v1/backends", Some(&body)).0, 200);
    let text = lb.http("GET", "/metrics", None).1;
    assert!(
        series(&text, "ns1").is_empty() && series(&text, "ns2").is_empty(),
        "{text}"
    );
    assert_eq!(value(&text, m::BACKEND_UP, "x1"), 1.0, "{text}");
}

#[test]
fn a_state_file_write_that_hangs_does_not_stall_healthz_or_health_checks() {
    // The state file's temporary file is a FIFO: writing the set blocks until someone
    // reads it, like a disk that does not answer. Meanwhile the admin API and the
    // health checks, which share one runtime, go on.
    let ns = Named::start();
    let lb = Dnslb::start(&config(&[("ns1", ns.addr)], ""));
    assert!(eventually(T, || lb.backend("ns1")["health"] == "up"));
    let tmp = lb.dir.path().join("state.json.tmp");
    run("mkfifo", &[tmp.to_str().unwrap()]);
    let admin = lb.admin;
    let body = format!(r#"{{"name":"ns2","address":"{}"}}"#, ns.addr);
    let put = std::thread::spawn(move || http(admin, "POST", "/v1/backends", Some(&body), None));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!put.is_finished(), "the write is stuck on the FIFO");
    let before = lb.http("GET", "/metrics", None).1;
    let checks = |text: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(m::HEALTH_CHECKS) && l.contains("pass"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(lb.http("GET", "/healthz", None).0, 200);
    // Checks keep running (every 200 ms) while the write hangs.
    assert!(eventually(T, || checks(
        &lb.http("GET", "/metrics", None).1
    ) >= checks(&before) + 2.0));
    // Unblock the write: a FIFO cannot be fsynced, so the change fails as a whole
    // (500, and nothing changed), the way a failing disk does.
    let reader = std::thread::spawn(move || std::fs::read(&tmp).unwrap());
    let (st, resp) = put.join().unwrap();
    assert_eq!(st, 500, "{resp}");
    assert!(!reader.join().unwrap().is_empty());
    assert_eq!(lb.http("GET", "/v1/backends/ns2", None).0, 404);
}

/// A UDP relay to `named` that loses the health checks whose number (1 = the first
/// it sees) is in `lost`, and answers everything else.
fn losing_checks(named: std::net::SocketAddr, lost: &'static [usize]) -> std::net::SocketAddr {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        let mut checks = 0;
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let q = buf[..n].to_vec();
            // dnslb's check: example.test. SOA (the load below never asks it).
            if q.windows(4).any(|w| w == [0, 0, 6, 0]) {
                checks += 1;
                if lost.contains(&checks) {
                    continue;
                }
            }
            let sock = sock.try_clone().unwrap();
            std::thread::spawn(move || {
                if let Ok(a) = udp_query_raw(named, &q, T) {
                    let _ = sock.send_to(&a, from);
                }
            });
        }
    });
    addr
}

#[test]
fn new_backends_that_lose_their_first_checks_stay_in_service_through_a_swap_under_load() {
    // BIND drops bursts of datagrams under load: the first checks of a new backend may
    // be lost. Each lost check is one failure of `fall` (3), so the new set stays in
    // use and no client gets SERVFAIL.
    let a = [Named::start(), Named::start()];
    let named = [Named::start(), Named::start()];
    // Set b loses its first two checks; set c its first two after the require_healthy
    // one.
    let b = [
        losing_checks(named[0].addr, &[1, 2]),
        losing_checks(named[1].addr, &[1, 2]),
    ];
    let c = [
        losing_checks(named[0].addr, &[2, 3]),
        losing_checks(named[1].addr, &[2, 3]),
    ];
    let lb = Dnslb::start(&config(&[("a0", a[0].addr), ("a1", a[1].addr)], ""));
    let dir = tempfile::tempdir().unwrap();
    let qfile = dir.path().join("queries.txt");
    std::fs::write(
        &qfile,
        "www.example.test A\nwww.example.test AAAA\nexample.test MX\nx.wild.example.test TXT\n",
    )
    .unwrap();
    let port = lb.dns.port().to_string();
    let perf = Command::new("dnsperf")
        .args(["-s", "127.0.0.1", "-p", &port, "-d"])
        .arg(&qfile)
        .args(["-l", "6", "-Q", "1000", "-c", "2", "-t", "3"])
        .output();
    let perf = std::thread::spawn(move || perf);
    std::thread::sleep(Duration::from_millis(500));
    let put = |set: &[std::net::SocketAddr; 2], names: [&str; 2], require_healthy: bool| {
        let body = format!(
            r#"{{"backends":[{{"name":"{}","address":"{}"}},{{"name":"{}","address":"{}"}}],"expected_generation":{},"require_healthy":{require_healthy}}}"#,
            names[0],
            set[0],
            names[1],
            set[1],
            generation(&lb)
        );
        let (st, resp) = lb.http("PUT", "/v1/backends", Some(&body));
        assert_eq!(st, 200, "{resp}");
    };
    put(&b, ["b0", "b1"], false);
    std::thread::sleep(Duration::from_millis(2000));
    for name in ["b0", "b1"] {
        assert_ne!(lb.backend(name)["health"], "down", "{:?}", lb.logs());
    }
    put(&c, ["c0", "c1"], true);
    std::thread::sleep(Duration::from_millis(1000));
    for name in ["c0", "c1"] {
        assert_ne!(lb.backend(name)["health"], "down", "{:?}", lb.logs());
    }
    let out = perf.join().unwrap().expect("dnsperf is installed");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let Dnsperf {
        sent,
        lost,
        servfail,
        codes,
        ..
    } = dnsperf_summary(&text);
    assert!(sent >= 4000, "steady load: {text}");
    assert_eq!(servfail, 0, "{codes}\n{:?}", lb.logs());
    assert_eq!(lost, 0, "{text}");
    assert!(
        lb.logs()
            .iter()
            .all(|l| !(l.contains("health changed") && l.contains("to=Down"))),
        "{:?}",
        lb.logs()
    );
}
