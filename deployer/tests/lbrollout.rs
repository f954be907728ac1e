//! `deployer rollout-lbs` end to end on loopback: a real BIND serving the parent zone
//! (`test.`, glue TTL 2 s, updated with a TSIG-signed UPDATE), a real named behind
//! real dnslb processes (the new ones started by the dnslb role in local mode), and a
//! resolver-like client that follows the parent's glue, re-reading it after its TTL,
//! at about 1,000 queries per second.

#[path = "../../lb/tests/common/mod.rs"]
mod common;
mod parent;
mod support;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{dnslb_bin, query, Dnslb};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use support::{repo, Cli};

/// What the resolver-like client saw.
#[derive(Debug, Default)]
struct Seen {
    sent: AtomicU64,
    lost: AtomicU64,
    bad: AtomicU64,
}

/// The glue of ns1.example.test. and its TTL, as the parent serves it.
fn glue(parent: SocketAddr) -> (Vec<IpAddr>, u64) {
    let q = query("example.test.", RecordType::NS, false);
    let raw =
        common::udp_query_raw(parent, &q, Duration::from_secs(2)).expect("the parent answers");
    let m = Message::from_vec(&raw).unwrap();
    let mut ttl = 2;
    let ips = m
        .additionals
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => {
                ttl = u64::from(r.ttl);
                Some(IpAddr::V4(a.0))
            }
            _ => None,
        })
        .collect();
    (ips, ttl)
}

/// Four threads, each about 250 queries a second, each query to one of the glue
/// addresses (port `port`) read from the parent, read again once its TTL expired.
fn resolver(
    parent: SocketAddr,
    port: u16,
    stop: Arc<AtomicBool>,
    seen: Arc<Seen>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..4u16)
        .map(|k| {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                let sock = UdpSocket::bind("127.0.0.2:0").unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let (mut addrs, mut ttl) = glue(parent);
                let mut read_at = Instant::now();
                let mut id = k.wrapping_mul(16000);
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    if read_at.elapsed() >= Duration::from_secs(ttl) {
                        (addrs, ttl) = glue(parent);
                        read_at = Instant::now();
                    }
                    let to = SocketAddr::new(addrs[usize::from(id) % addrs.len()], port);
                    id = id.wrapping_add(1);
                    let mut q = query("www.example.test.", RecordType::A, false);
                    q[..2].copy_from_slice(&id.to_be_bytes());
                    seen.sent.fetch_add(1, Ordering::Relaxed);
                    sock.send_to(&q, to).unwrap();
                    loop {
                        match sock.recv_from(&mut buf) {
                            Ok((n, _)) if buf[..2] == id.to_be_bytes() => {
                                match Message::from_vec(&buf[..n]) {
                                    Ok(m)
                                        if m.metadata.response_code == ResponseCode::NoError
                                            && !m.answers.is_empty() => {}
                                    _ => {
                                        seen.bad.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                break;
                            }
                            Ok(_) => continue, // a late answer to an earlier query
                            Err(_) => {
                                seen.lost.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(4));
                }
            })
        })
        .collect()
}

/// The parent, a named bootstrapped behind a first load balancer made by hand, and
/// the deployer's config.
struct Setup {
    parent: parent::Parent,
    first: Dnslb,
    dir: tempfile::TempDir,
    cli: Cli,
    dns_port: u16,
}

fn setup() -> Setup {
    let parent = parent::start_parent_with(
        "$TTL 2\n@ SOA ns.test. admin.test. 1 3600 600 86400 2\n@ NS ns.test.\nns A 127.0.0.1\n\
         example NS ns1.example\nns1.example A 127.0.0.1\n",
    );
    let (dns_port, admin_port) = (common::free_port(), common::free_port());
    // The first load balancer, made by hand (as an operator has it before the deployer
    // manages load balancers): no backends until bootstrap.
    let first = Dnslb::start(&format!(
        "[listen]\ndns = [\"127.0.0.1:{dns_port}\"]\nadmin = \"127.0.0.1:{admin_port}\"\n[health]\nquery_name = \"example.test.\"\ninterval_ms = 200\ntimeout_ms = 200\n"
    ));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("deployer.toml");
    let repo = repo();
    std::fs::write(
        &cfg,
        format!(
            r#"[provider]
state_dir = "{state}"
[ansible]
playbook = "{repo}/ansible/playbook.yml"
zones_dir = "{repo}/ansible/zones"
dnslb_binary = "{bin}"
[[nameserver]]
name = "ns1"
[[load_balancer]]
name = "lb1"
admin_url = "http://127.0.0.1:{admin_port}"
dns = "127.0.0.1:{dns_port}"
nameservers = ["ns1"]
ns_name = "ns1.example.test."
[checks]
bake_s = 1
[registrar]
kind = "rfc2136"
zone = "example.test."
parent_servers = ["{parent}"]
tsig_key_file = "{key}"
drain_qps = 1
drain_window_s = 2
drain_margin_s = 30
"#,
            state = dir.path().join("state").display(),
            repo = repo.display(),
            bin = dnslb_bin().display(),
            parent = parent.addr,
            key = parent.dir.path().join("ddns.key").display(),
        ),
    )
    .unwrap();
    let cli = Cli {
        config: cfg,
        env: Vec::new(),
        secret: None,
    };
    cli.ok(&["bootstrap"]);
    Setup {
        parent,
        first,
        dir,
        cli,
        dns_port,
    }
}

#[test]
fn rollout_lbs_under_a_glue_following_client_loses_no_query_and_deletes_the_old_ones() {
    let Setup {
        parent,
        first,
        dir,
        cli,
        dns_port,
    } = setup();
    let state = dir.path().join("state");
    for round in 1..=2 {
        let before = glue(parent.addr).0;
        // `plan` tells what rollout-lbs is about to do, from the live delegation and set.
        let plan = cli.ok(&["plan"]);
        let delete = if round == 1 {
            format!("lb 8/9 delete-old: none for lb1 at {}:{dns_port} (not created by the deployer: left running)", before[0])
        } else {
            "lb 8/9 delete-old: lb1 (local-".to_string()
        };
        for want in [
            "and `deployer rollout-lbs` would now, for the delegation of example.test.:".to_string(),
            "lb 1/9 create: lb1-next in local (local provider)".to_string(),
            "lb 3/9 copy-set: lb1's set of generation ".to_string(),
            format!(
                "lb 5/9 delegate: ns1.example.test. glue {} -> the address of lb1-next (a TSIG-signed UPDATE to {})",
                before[0], parent.addr
            ),
            format!("lb 7/9 drain: until lb1 ({}:{dns_port}) get under 1 queries/s for 2s, not before the delegation's TTL (2s) has passed, at most 32s more", before[0]),
            delete,
        ] {
            assert!(plan.contains(&want), "round {round}: {want:?} not in\n{plan}");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Seen::default());
        let threads = resolver(parent.addr, dns_port, stop.clone(), seen.clone());
        std::thread::sleep(Duration::from_secs(1));
        let out = cli.run(&["rollout-lbs"]);
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        threads.into_iter().for_each(|t| t.join().unwrap());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "round {round}: {stderr}");
        let (sent, lost, bad) = (
            seen.sent.load(Ordering::Relaxed),
            seen.lost.load(Ordering::Relaxed),
            seen.bad.load(Ordering::Relaxed),
        );
        eprintln!("round {round}: {sent} queries, {lost} lost, {bad} not NOERROR");
        assert!(sent > 3000, "round {round}: only {sent} sent");
        assert_eq!(
            (lost, bad),
            (0, 0),
            "round {round} lost or failed queries: {stderr}"
        );
        // The parent serves the new glue, the recorded endpoint is the new one, and
        // `deployer status` shows both.
        let after = glue(parent.addr).0;
        assert_eq!(after.len(), 1);
        assert_ne!(after, before, "round {round}: the glue did not change");
        let endpoints: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(state.join("load_balancers.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            endpoints["lb1"]["dns"],
            serde_json::json!(format!("{}:{dns_port}", after[0]))
        );
        let status = cli.ok(&["status"]);
        assert!(
            status.contains(&format!("ns1.example.test. -> {}", after[0])),
            "{status}"
        );
        // Exactly one managed load balancer, labelled lb1, at the new address.
        let lbs: Vec<_> = std::fs::read_dir(state.join("local"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|l| l.starts_with("lb1"))
            .collect();
        assert_eq!(lbs, ["lb1"], "round {round}");
        if round == 1 {
            assert!(
                stderr.contains("was not created by the deployer: left running"),
                "{stderr}"
            );
        } else {
            assert!(stderr.contains("deleted lb1 ("), "{stderr}");
            // The old one's process is gone: its address no longer answers.
            let q = query("www.example.test.", RecordType::A, false);
            assert!(common::udp_query_raw(
                SocketAddr::new(before[0], dns_port),
                &q,
                Duration::from_millis(500)
            )
            .is_err());
        }
    }
    drop(first);
    // destroy deletes the load balancer it made too (its process stops), and the
    // config's endpoints apply again.
    let made = glue(parent.addr).0[0];
    let out = cli.ok(&["destroy", "--yes"]);
    assert!(out.contains("lb1 ("), "{out}");
    assert!(!state.join("load_balancers.json").exists());
    let q = query("www.example.test.", RecordType::A, false);
    assert!(common::udp_query_raw(
        SocketAddr::new(made, dns_port),
        &q,
        Duration::from_millis(500)
    )
    .is_err());
}

/// Runs `deployer rollout-lbs` and SIGKILLs it as soon as a line of its stderr
/// contains `marker`; returns whether the marker was seen.
fn killed_at(cli: &Cli, marker: &str) -> bool {
    use std::io::BufRead;
    let mut child = cli
        .cmd(&["rollout-lbs"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let mut seen = false;
    for line in std::io::BufReader::new(err).lines() {
        if line.unwrap().contains(marker) {
            child.kill().unwrap(); // SIGKILL
            seen = true;
            break;
        }
    }
    let _ = child.wait();
    seen
}

/// The fleet is coherent: exactly one load balancer directory for lb1 (no leaked or
/// duplicated `lb1-next`) unless `next_ok`, the parent's glue points only at
/// addresses that answer, and the recorded endpoint (if any) is the delegated one.
fn assert_converged(s: &Setup, what: &str) {
    let state = s.dir.path().join("state");
    let lbs: Vec<_> = std::fs::read_dir(state.join("local"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|l| l.starts_with("lb1"))
        .collect();
    assert!(
        lbs.len() <= 1 && lbs.iter().all(|l| l == "lb1"),
        "{what}: {lbs:?}"
    );
    let (glue_now, _) = glue(s.parent.addr);
    assert_eq!(glue_now.len(), 1, "{what}");
    let q = query("www.example.test.", RecordType::A, false);
    let answer = common::udp_query_raw(
        SocketAddr::new(glue_now[0], s.dns_port),
        &q,
        Duration::from_secs(2),
    );
    assert!(
        answer.is_ok(),
        "{what}: the delegated {} does not answer",
        glue_now[0]
    );
    if let Ok(text) = std::fs::read_to_string(state.join("load_balancers.json")) {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["lb1"]["dns"],
            serde_json::json!(format!("{}:{}", glue_now[0], s.dns_port)),
            "{what}"
        );
    }
    let status = s.cli.ok(&["status"]);
    assert!(
        status.contains("no unfinished rollout")
            && !status.contains("unfinished load balancer rollout"),
        "{what}: {status}"
    );
}

#[test]
fn sigkill_at_every_step_and_a_failed_verification_converge_on_the_next_run() {
    let s = setup();
    let steps = [
        "lb 1/9 create",
        "lb 2/9 provision",
        "lb 3/9 copy-set",
        "lb 4/9 verify",
        "lb 5/9 delegate",
        "lb 6/9 propagate",
        "lb 7/9 drain",
        "lb 8/9 delete-old",
        "lb 9/9 rename",
    ];
    for step in steps {
        for point in ["started", "ok"] {
            let marker = format!("step {step}: {point}");
            assert!(killed_at(&s.cli, &marker), "never saw {marker:?}");
            let out = s.cli.run(&["rollout-lbs"]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "SIGKILL at {marker:?}, then rollout-lbs: {stderr}"
            );
            assert!(
                stderr.contains("resuming load balancer rollout"),
                "{stderr}"
            );
            assert_converged(&s, &format!("SIGKILL at {marker:?}, then rollout-lbs"));
        }
    }
    // Killed after the delegation changed, then rolled back: the delegation is put
    // back first, the new load balancer drained and deleted.
    let old = glue(s.parent.addr).0;
    assert!(killed_at(&s.cli, "step lb 7/9 drain: started"));
    assert_ne!(glue(s.parent.addr).0, old);
    let out = s.cli.run(&["rollback"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(glue(s.parent.addr).0, old, "{stderr}");
    assert!(
        stderr.contains("delegation restored") && stderr.contains("deleted lb1-next"),
        "{stderr}"
    );
    assert_converged(&s, "SIGKILL at the drain, then rollback");

    // A failed verification: the new load balancer is given a backend that does
    // not answer before the verification runs; the rollout rolls back by itself and
    // the delegation is never touched.
    assert!(killed_at(&s.cli, "step lb 4/9 verify: started"));
    let next = s.dir.path().join("state/local/lb1-next");
    let inst: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(next.join("instance.json")).unwrap())
            .unwrap();
    let ip = inst["public_ipv4"].as_str().unwrap().to_string();
    let endpoints: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(s.dir.path().join("state/load_balancers.json")).unwrap(),
    )
    .unwrap();
    let admin_port: u16 = endpoints["lb1"]["admin_url"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let token_file = endpoints["lb1"]["token_file"].as_str().map(String::from);
    let token = token_file.map(|t| std::fs::read_to_string(t).unwrap().trim().to_string());
    let dead = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let mut curl = std::process::Command::new("curl");
    curl.args(["-sf", "-X", "PUT", "-H", "Content-Type: application/json"]);
    if let Some(t) = &token {
        curl.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let put = curl
        .arg("--data")
        .arg(format!(
            r#"{{"backends":[{{"name":"dead","address":"{dead}"}}]}}"#
        ))
        .arg(format!("http://{ip}:{admin_port}/v1/backends"))
        .output()
        .unwrap();
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let before = glue(s.parent.addr).0;
    let out = s.cli.run(&["rollout-lbs"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("verification failed") && stderr.contains("rolled back"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("step lb 5/9 delegate: started"),
        "{stderr}"
    );
    assert_eq!(glue(s.parent.addr).0, before);
    assert!(!next.exists(), "the new load balancer was deleted");
    assert_converged(&s, "a failed verification");
    // And the next rollout goes through.
    s.cli.ok(&["rollout-lbs"]);
    assert_converged(&s, "the rollout after the failed one");
    s.cli.ok(&["destroy", "--yes"]);
}
