//! The deployer end to end on this machine: real `named` processes created by the local
//! provider and provisioned by the project's Ansible roles, behind a real dnslb, cut
//! over through its admin API, with dnsperf querying throughout.

#[path = "../../lb/tests/common/mod.rs"]
mod common;
mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{config as lb_config, Dnslb};
use serde_json::Value;
use support::repo;

/// The rollout steps as the progress lines name them.
const STEPS: [&str; 7] = [
    "1/7 create",
    "2/7 provision",
    "3/7 verify",
    "4/7 swap",
    "5/7 bake",
    "6/7 delete-old",
    "7/7 rename",
];

/// A deployer setup: a temp dir with deployer.toml and a dnslb without backends.
struct Setup {
    dir: tempfile::TempDir,
    lb: Dnslb,
}

impl Setup {
    fn new(extra_checks: &str) -> Setup {
        let lb = Dnslb::start(&lb_config(&[], ""));
        let dir = tempfile::tempdir().unwrap();
        let s = Setup { dir, lb };
        s.write_config(extra_checks);
        s
    }

    fn write_config(&self, checks: &str) {
        let r = repo();
        let text = format!(
            r#"[provider]
kind = "local"
state_dir = "{state}"
[ansible]
playbook = "{r}/ansible/playbook.yml"
zones_dir = "{r}/ansible/zones"
[[nameserver]]
name = "ns1"
[[nameserver]]
name = "ns2"
[[load_balancer]]
name = "lb1"
admin_url = "http://{admin}"
dns = "{dns}"
nameservers = ["ns1", "ns2"]
[checks]
bake_s = 1
{checks}
"#,
            state = self.dir.path().join("state").display(),
            r = r.display(),
            admin = self.lb.admin,
            dns = self.lb.dns,
        );
        std::fs::write(self.dir.path().join("deployer.toml"), text).unwrap();
    }

    fn cli(&self) -> support::Cli {
        support::Cli {
            config: self.dir.path().join("deployer.toml"),
            env: Vec::new(),
            secret: None,
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        self.cli().cmd(args)
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cli().run(args)
    }

    fn ok(&self, args: &[&str]) -> String {
        self.cli().ok(args)
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).unwrap()
    }

    fn lb_set(&self) -> Value {
        serde_json::from_str(&self.lb.http("GET", "/v1/backends", None).1).unwrap()
    }

    /// The load balancer's members as (name, address), without run-time counters.
    fn lb_members(&self) -> Vec<(String, String)> {
        self.lb_set()["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["name"].as_str().unwrap().to_string(),
                    b["address"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Exactly one instance per nameserver, named after it, answering, and the load
    /// balancer pointing at exactly those.
    fn assert_converged(&self) -> Vec<(String, String, u16)> {
        let st = self.status();
        let mut inst: Vec<(String, String, u16)> = st["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["label"].as_str().unwrap().to_string(),
                    i["id"].as_str().unwrap().to_string(),
                    i["dns_port"].as_u64().unwrap() as u16,
                )
            })
            .collect();
        inst.sort();
        let labels: Vec<&str> = inst.iter().map(|i| i.0.as_str()).collect();
        assert_eq!(labels, ["ns1", "ns2"], "{st}");
        assert!(st["unfinished_rollout"].is_null(), "{st}");
        let mut lb_ports: Vec<u16> = self.lb_set()["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                b["address"]
                    .as_str()
                    .unwrap()
                    .rsplit(':')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        lb_ports.sort();
        let mut ports: Vec<u16> = inst.iter().map(|i| i.2).collect();
        ports.sort();
        assert_eq!(lb_ports, ports, "load balancer points at the live servers");
        for (_, _, port) in &inst {
            let out = common::run(
                "dig",
                &[
                    "@127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "+norec",
                    "+short",
                    "example.test.",
                    "SOA",
                ],
            );
            assert!(
                out.contains("2026112901"),
                "server on {port} answers: {out}"
            );
        }
        support::assert_answers_through(self.lb.dns);
        inst
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.run(&["destroy", "--yes"]);
    }
}

/// dnsperf in 3-second rounds until `stop` is set; sums sent/lost/SERVFAIL.
struct Load {
    handle: std::thread::JoinHandle<(u64, u64, u64, String)>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

fn start_load(dns: std::net::SocketAddr, dir: &Path) -> Load {
    let qfile = dir.join("queries.txt");
    std::fs::write(&qfile, "www.example.test A\nexample.test SOA\nexample.test MX\nftp.example.test CNAME\nx.wild.example.test TXT\n").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let handle = std::thread::spawn(move || {
        let (mut sent, mut lost, mut servfail, mut log) = (0, 0, 0, String::new());
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            let out = Command::new("dnsperf")
                .args(["-s", "127.0.0.1", "-p", &dns.port().to_string(), "-d"])
                .arg(&qfile)
                .args(["-l", "3", "-Q", "1500", "-c", "2", "-t", "3"])
                .output()
                .expect("dnsperf is installed");
            let r = common::dnsperf_summary(&String::from_utf8_lossy(&out.stdout));
            sent += r.sent;
            lost += r.lost;
            servfail += r.servfail;
            log.push_str(&r.codes);
            log.push('\n');
        }
        (sent, lost, servfail, log)
    });
    Load { handle, stop }
}

#[test]
fn bootstrap_then_rollout_under_steady_load_loses_no_query() {
    let s = Setup::new("");
    // No backends yet: SERVFAIL, as the spec says.
    let out = common::run(
        "dig",
        &[
            "@127.0.0.1",
            "-p",
            &s.lb.dns.port().to_string(),
            "www.example.test.",
        ],
    );
    assert!(out.contains("SERVFAIL"), "{out}");
    s.ok(&["bootstrap"]);
    let before = s.assert_converged();
    let plan = s.ok(&["plan"]);
    assert!(
        plan.contains("ns1-next") && plan.contains("delete ns1"),
        "{plan}"
    );
    let load = start_load(s.lb.dns, s.dir.path());
    std::thread::sleep(Duration::from_secs(1));
    let out = s.run(&["rollout"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    std::thread::sleep(Duration::from_secs(1));
    load.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (sent, lost, servfail, log) = load.handle.join().unwrap();
    assert!(out.status.success(), "{stderr}");
    for step in STEPS {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(step) && l.contains("ok") && l.ends_with("s)")),
            "{step} line with duration:\n{stderr}"
        );
    }
    eprintln!("load during rollout: sent {sent}, lost {lost}, SERVFAIL {servfail}\n{log}");
    assert!(sent > 10_000, "steady load ran throughout: {sent}");
    assert_eq!(lost, 0, "{log}");
    assert_eq!(servfail, 0, "{log}");
    let after = s.assert_converged();
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(b.1, a.1, "{} is a new instance", a.0);
    }
    // The old servers are gone: their processes no longer answer.
    for (_, _, port) in &before {
        let out = Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &port.to_string(),
                "+tries=1",
                "+time=1",
                "example.test.",
                "SOA",
            ])
            .output()
            .unwrap();
        assert!(!String::from_utf8_lossy(&out.stdout).contains("2026112901"));
    }
    // No repository file was touched: the inventory was generated in the state dir.
    assert!(s.dir.path().join("state/runs").read_dir().unwrap().count() >= 1);
}

#[test]
fn a_record_the_servers_do_not_serve_fails_the_rollout_and_changes_nothing() {
    let s = Setup::new("");
    s.ok(&["bootstrap"]);
    let before = s.assert_converged();
    let gen_before = s.lb_set()["generation"].clone();
    // The checked copy of the zone has one record more than what is deployed.
    let bad = s.dir.path().join("checks");
    std::fs::create_dir_all(&bad).unwrap();
    let mut zone = std::fs::read_to_string(repo().join("ansible/zones/example.test.zone")).unwrap();
    zone.push_str("extra        IN A   192.0.2.99\n");
    std::fs::write(bad.join("example.test.zone"), zone).unwrap();
    s.write_config(&format!(
        "zone_files = [\"{}\"]",
        bad.join("example.test.zone").display()
    ));
    let out = s.run(&["rollout"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("extra.example.test.") && stderr.contains("3/7 verify: FAILED"),
        "{stderr}"
    );
    assert!(stderr.contains("rolled back"), "{stderr}");
    assert_eq!(
        s.lb_set()["generation"],
        gen_before,
        "load balancer untouched"
    );
    s.write_config("");
    assert_eq!(
        s.assert_converged(),
        before,
        "no new instance left behind, old ones intact"
    );
}

/// Runs `deployer rollout` and SIGKILLs it as soon as `step` reports done.
fn rollout_killed_after(s: &Setup, step: &str) {
    let mut child = s
        .cmd(&["rollout"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.contains(&format!("step {step}: ok")) {
            child.kill().unwrap(); // SIGKILL
            break;
        }
    }
    let st = child.wait().unwrap();
    assert!(!st.success(), "killed after {step}; saw {seen:?}");
}

#[test]
fn a_deployer_killed_after_any_step_is_finished_by_the_next_rollout() {
    let s = Setup::new("");
    s.ok(&["bootstrap"]);
    s.assert_converged();
    for step in STEPS {
        rollout_killed_after(&s, step);
        let st = s.status();
        if step != "7/7 rename" {
            assert!(
                !st["unfinished_rollout"].is_null(),
                "journal records the interrupted rollout after {step}: {st}"
            );
        }
        let out = s.run(&["rollout"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "after kill at {step}: {stderr}");
        s.assert_converged();
    }
}

#[test]
fn rollback_after_the_swap_restores_the_load_balancer_and_deletes_new_servers() {
    let s = Setup::new("");
    s.ok(&["bootstrap"]);
    let before = s.assert_converged();
    let set_before = s.lb_members();
    rollout_killed_after(&s, "4/7 swap");
    assert_ne!(s.lb_members(), set_before, "the swap happened");
    let out = s.ok(&["rollback"]);
    assert!(out.contains("restored") && out.contains("deleted"), "{out}");
    assert_eq!(s.lb_members(), set_before);
    assert_eq!(s.assert_converged(), before);
    assert!(s.ok(&["rollback"]).contains("nothing to roll back"));
}

#[test]
fn a_second_rollout_is_refused_while_one_runs_and_a_stale_lock_is_taken_over() {
    let s = Setup::new("");
    s.ok(&["bootstrap"]);
    // A longer bake keeps the first rollout busy.
    let cfg = std::fs::read_to_string(s.dir.path().join("deployer.toml"))
        .unwrap()
        .replace("bake_s = 1", "bake_s = 6");
    std::fs::write(s.dir.path().join("deployer.toml"), cfg).unwrap();
    let mut first = s
        .cmd(&["rollout"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(first.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let l = lines.next().unwrap().unwrap();
        if l.contains("step 4/7 swap: ok") {
            break;
        }
    }
    let second = s.run(&["rollout"]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert!(
        err.contains("another deployer holds the lock")
            && err.contains(&format!("pid {}", first.id()))
            && err.contains("since"),
        "{err}"
    );
    for l in lines.map_while(Result::ok) {
        let _ = l;
    }
    assert!(first.wait().unwrap().success());
    s.assert_converged();
    // A lock file naming a dead holder: taken over with a warning.
    std::fs::write(
        s.dir.path().join("state/lock"),
        r#"{"pid":999999,"host":"gone","since":1,"command":"rollout"}"#,
    )
    .unwrap();
    let out = s.run(&["rollback"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("taking over a stale lock"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ansible_playbook_syntax_and_roles_are_idempotent() {
    let r = repo();
    let out = Command::new("ansible-playbook")
        .args(["--syntax-check", "-i"])
        .arg(r.join("ansible/inventory.example.yml"))
        .arg(r.join("ansible/playbook.yml"))
        .output()
        .expect("ansible-playbook is installed");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("bash")
        .arg(r.join("ansible/tests/run.sh"))
        .arg(common::dnslb_bin())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_swap_refused_by_a_second_load_balancer_puts_the_first_one_back() {
    let s = Setup::new("");
    s.ok(&["bootstrap"]);
    let before = s.assert_converged();
    let set_before = s.lb_members();
    // lb2 health-checks a name the servers do not serve, so its require_healthy gate
    // refuses the new servers (422) after lb1 has already been swapped.
    let lb2 = Dnslb::start(&lb_config(&[], "").replace("example.test.", "not-served.test."));
    for (name, addr) in &set_before {
        let (st, body) = lb2.http(
            "POST",
            "/v1/backends",
            Some(&format!(r#"{{"name":"{name}","address":"{addr}"}}"#)),
        );
        assert_eq!(st, 201, "{body}");
    }
    let lb2_before: serde_json::Value =
        serde_json::from_str(&lb2.http("GET", "/v1/backends", None).1).unwrap();
    s.write_config(&format!(
        "\n[[load_balancer]]\nname = \"lb2\"\nadmin_url = \"http://{}\"\ndns = \"{}\"\nnameservers = [\"ns1\", \"ns2\"]\n",
        lb2.admin, lb2.dns
    ));
    let out = s.run(&["rollout"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("4/7 swap: FAILED") && stderr.contains("422"),
        "{stderr}"
    );
    assert!(stderr.contains("lb1 restored"), "{stderr}");
    assert_eq!(s.lb_members(), set_before, "lb1 is put back");
    let lb2_after: serde_json::Value =
        serde_json::from_str(&lb2.http("GET", "/v1/backends", None).1).unwrap();
    assert_eq!(
        lb2_after["generation"], lb2_before["generation"],
        "lb2 never changed"
    );
    s.write_config("");
    assert_eq!(
        s.assert_converged(),
        before,
        "no new server left, old ones intact"
    );
}
