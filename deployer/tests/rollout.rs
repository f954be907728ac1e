//! The deployer end to end on this machine: real `named` processes created by the local
//! provider and provisioned by the project's Ansible roles, behind a real dnslb, cut
//! over through its admin API, with dnsperf querying throughout.

#[path = "../../lb/tests/common/mod.rs"]
mod common;
mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{config as lb_config, Dnslb};
use serde_json::Value;
use support::{repo, start_load, AdminProxy};

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
    /// The zone files the deployer provisions (the repository's unless a test edits
    /// a copy).
    zones_dir: PathBuf,
    /// Between the deployer and the load balancer's admin API, when a test needs to
    /// take the API away.
    proxy: Option<AdminProxy>,
}

impl Setup {
    fn new(extra_checks: &str) -> Setup {
        Setup::start(extra_checks, false)
    }

    /// The deployer reaches the admin API through an [`AdminProxy`].
    fn with_proxy(extra_checks: &str) -> Setup {
        Setup::start(extra_checks, true)
    }

    fn start(extra_checks: &str, proxied: bool) -> Setup {
        Setup::start_with(extra_checks, proxied, "", repo().join("ansible/zones"))
    }

    fn start_with(extra_checks: &str, proxied: bool, lb_extra: &str, zones_dir: PathBuf) -> Setup {
        let lb = Dnslb::start(&lb_config(&[], lb_extra));
        let dir = tempfile::tempdir().unwrap();
        let proxy = proxied.then(|| AdminProxy::start(lb.admin));
        let s = Setup {
            dir,
            lb,
            zones_dir,
            proxy,
        };
        s.write_config(extra_checks);
        s
    }

    fn admin_url(&self) -> String {
        format!(
            "http://{}",
            self.proxy.as_ref().map_or(self.lb.admin, |p| p.addr)
        )
    }

    fn write_config(&self, checks: &str) {
        let r = repo();
        let text = format!(
            r#"[provider]
kind = "local"
state_dir = "{state}"
[ansible]
playbook = "{r}/ansible/playbook.yml"
zones_dir = "{zones}"
[[nameserver]]
name = "ns1"
[[nameserver]]
name = "ns2"
[[load_balancer]]
name = "lb1"
admin_url = "{admin}"
dns = "{dns}"
nameservers = ["ns1", "ns2"]
[checks]
bake_s = 1
{checks}
"#,
            state = self.dir.path().join("state").display(),
            r = r.display(),
            zones = self.zones_dir.display(),
            admin = self.admin_url(),
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

    /// The SOA serial of the zone file the deployer provisions.
    fn serial(&self) -> String {
        let zone = std::fs::read_to_string(self.zones_dir.join("example.test.zone")).unwrap();
        let line = zone.lines().find(|l| l.contains("; serial")).unwrap();
        line.split_whitespace().next().unwrap().to_string()
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
                out.contains(&self.serial()),
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
    let (sent, lost, servfail, log) = load.finish();
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

/// With the load balancer's packet cache on and full of the old servers' answers, a
/// rollout to servers with changed zone data still verifies the new servers through
/// it: the swap flushed the cache, so the bake sees the new data or fails.
#[test]
fn a_rollout_through_a_caching_load_balancer_verifies_the_new_servers_data() {
    let zones = tempfile::tempdir().unwrap();
    let zone_file = zones.path().join("example.test.zone");
    let original = std::fs::read_to_string(repo().join("ansible/zones/example.test.zone")).unwrap();
    std::fs::write(&zone_file, &original).unwrap();
    let s = Setup::start_with(
        "",
        false,
        "[cache]\nmax_entries = 10000\nmax_ttl_s = 3600\n",
        zones.path().to_path_buf(),
    );
    s.ok(&["bootstrap"]);
    s.assert_converged();
    let dig = |name: &str, rtype: &str| {
        common::run(
            "dig",
            &[
                "@127.0.0.1",
                "-p",
                &s.lb.dns.port().to_string(),
                // dig's EDNS cookie is new in each run, and part of the cache key.
                "+nocookie",
                "+short",
                name,
                rtype,
            ],
        )
    };
    // Warm the cache with the old data, the way the deployer's checks ask it.
    for _ in 0..3 {
        assert!(dig("mail.example.test.", "A").contains("192.0.2.30"));
        assert!(dig("example.test.", "SOA").contains("2026112901"));
    }
    let hits = |s: &Setup| {
        common::metric(
            &common::scrape(&s.lb),
            dnslb::metrics::CACHE_HITS,
            &[("transport", "udp")],
        )
    };
    assert!(hits(&s) >= 4.0, "the load balancer caches");
    // The next generation serves other data.
    let changed = original
        .replace("2026112901", "2026112902")
        .replace("192.0.2.30", "192.0.2.130");
    std::fs::write(&zone_file, changed).unwrap();
    let out = s.run(&["rollout"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("5/7 bake: ok"), "{stderr}");
    s.assert_converged();
    assert_eq!(dig("mail.example.test.", "A").trim(), "192.0.2.130");
    assert!(dig("example.test.", "SOA").contains("2026112902"));
}

/// Runs `deployer <args>`; when a line of its stderr contains `marker` calls `act`,
/// and when one contains `kill_at` SIGKILLs it. Returns whether it succeeded and its
/// stderr. Both markers must show: a case whose fault point never came did not test
/// anything.
fn run_until(
    s: &Setup,
    args: &[&str],
    marker: &str,
    act: impl FnOnce(),
    kill_at: Option<&str>,
) -> (bool, String) {
    let mut child = s
        .cmd(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut seen = String::new();
    let mut act = Some(act);
    let mut killed = false;
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(marker) {
            if let Some(a) = act.take() {
                a();
            }
        }
        if kill_at.is_some_and(|k| line.contains(k)) {
            child.kill().unwrap(); // SIGKILL
            killed = true;
            break;
        }
    }
    let st = child.wait().unwrap();
    assert!(act.is_none(), "{args:?} never printed {marker:?}:\n{seen}");
    assert!(
        killed || kill_at.is_none(),
        "{args:?} never printed {kill_at:?}:\n{seen}"
    );
    (st.success(), seen)
}

/// Runs `deployer rollout` and SIGKILLs it as soon as a line contains `marker`.
fn killed_at(s: &Setup, marker: &str) {
    let (ok, seen) = run_until(s, &["rollout"], marker, || (), Some(marker));
    assert!(!ok, "killed at {marker:?}; saw {seen}");
}

/// SIGKILLs the `named` of a local instance.
fn kill_named(s: &Setup, label: &str) {
    let pid = std::fs::read_to_string(s.dir.path().join(format!("state/local/{label}/named.pid")))
        .unwrap();
    let st = Command::new("kill")
        .args(["-KILL", pid.trim()])
        .status()
        .unwrap();
    assert!(st.success(), "kill named of {label}");
}

/// What one case of a fault matrix cost the load balancer's clients.
struct Case {
    name: String,
    sent: u64,
    lost: u64,
    servfail: u64,
}

/// Runs one case under dnsperf load, then checks that the fleet converged: one
/// answering instance per nameserver, none leaked or duplicated, the load balancer
/// on exactly those, and no SERVFAIL from it (its fleet always had a live server).
/// `old_kept`: the case must end on the servers it started with. `may_lose`: the case
/// kills a serving `named`, so queries in flight to it may be lost.
fn case(
    s: &Setup,
    cases: &mut Vec<Case>,
    name: &str,
    old_kept: Option<bool>,
    may_lose: bool,
    body: impl FnOnce(),
) {
    eprintln!("=== case: {name}");
    let before = s.assert_converged();
    let load = start_load(s.lb.dns, s.dir.path());
    std::thread::sleep(Duration::from_millis(500));
    body();
    let after = s.assert_converged();
    let (sent, lost, servfail, log) = load.finish();
    match old_kept {
        Some(true) => assert_eq!(after, before, "{name}: old servers kept"),
        Some(false) => {
            for (b, a) in before.iter().zip(&after) {
                assert_ne!(b.1, a.1, "{name}: {} is a new instance", a.0);
            }
        }
        None => {}
    }
    assert!(sent > 1000, "{name}: load ran: {sent}");
    assert_eq!(servfail, 0, "{name}: no SERVFAIL with a live server\n{log}");
    if !may_lose {
        assert_eq!(lost, 0, "{name}: no query lost\n{log}");
    }
    cases.push(Case {
        name: name.into(),
        sent,
        lost,
        servfail,
    });
}

fn report(title: &str, cases: &[Case]) {
    eprintln!("{title}: {} cases", cases.len());
    for c in cases {
        eprintln!(
            "  {:<60} sent {:>6} lost {:>3} SERVFAIL {}",
            c.name, c.sent, c.lost, c.servfail
        );
    }
}

/// The deployer SIGKILLed at the start and at the end of every step, under load:
/// the next run converges. A kill inside steps 1–5 is undone with `deployer
/// rollback` (back to the old servers); every other one is finished by `deployer
/// rollout`.
#[test]
fn fault_matrix_a_deployer_killed_at_every_step_converges() {
    let s = Setup::new("");
    s.ok(&["bootstrap"]);
    let mut cases = Vec::new();
    for (i, step) in STEPS.iter().enumerate() {
        for point in ["started", "ok"] {
            let marker = format!("step {step}: {point}");
            let roll_back = point == "started" && i < 5;
            let how = if roll_back { "rollback" } else { "rollout" };
            case(
                &s,
                &mut cases,
                &format!("SIGKILL at {marker:?}, then {how}"),
                Some(roll_back),
                false,
                || {
                    killed_at(&s, &marker);
                    let st = s.status();
                    if marker != "step 7/7 rename: ok" {
                        assert!(
                            !st["unfinished_rollout"].is_null(),
                            "journal records the interrupted rollout at {marker}: {st}"
                        );
                    }
                    let out = s.run(&[how]);
                    assert!(
                        out.status.success(),
                        "{how} after a kill at {marker}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                },
            );
        }
    }
    report("fault matrix: kills at every step", &cases);
}

/// A new server that dies during the bake, and the rollback that follows killed
/// after its restore and during its deletes.
#[test]
fn fault_matrix_a_new_server_dying_in_the_bake_and_kills_inside_the_rollback() {
    let s = Setup::new("");
    s.ok(&["bootstrap"]);
    let mut cases = Vec::new();
    case(
        &s,
        &mut cases,
        "a new named dies during the bake: rolled back",
        Some(true),
        true,
        || {
            let (ok, seen) = run_until(
                &s,
                &["rollout"],
                "step 4/7 swap: ok",
                || kill_named(&s, "ns1-next"),
                None,
            );
            assert!(!ok, "{seen}");
            assert!(
                seen.contains("5/7 bake: FAILED") && seen.contains("rolled back"),
                "{seen}"
            );
            assert!(seen.contains("lb1 restored"), "{seen}");
        },
    );
    // The case above let its rollback finish; these two kill it.
    for (marker, then) in [
        ("rollback: lb1 restored", "rollout"),
        ("rollback: deleted", "rollback"),
    ] {
        case(
            &s,
            &mut cases,
            &format!("a new named dies in the bake, SIGKILL at {marker:?}, then {then}"),
            Some(true),
            true,
            || {
                run_until(
                    &s,
                    &["rollout"],
                    "step 4/7 swap: ok",
                    || kill_named(&s, "ns1-next"),
                    Some(marker),
                );
                let st = s.status();
                assert_eq!(
                    st["unfinished_rollout"]["step"], "rolling back",
                    "the journal says rolling back: {st}"
                );
                let out = s.run(&[then]);
                let stderr = String::from_utf8_lossy(&out.stderr);
                if then == "rollout" {
                    // It finishes the rollback and does not go forward.
                    assert!(!out.status.success(), "{stderr}");
                    assert!(
                        stderr.contains("finishing the rollback")
                            && stderr.contains("now rolled back"),
                        "{stderr}"
                    );
                    assert!(!stderr.contains("step 5/7 bake: started"), "{stderr}");
                } else {
                    assert!(out.status.success(), "{stderr}");
                }
            },
        );
    }
    report("fault matrix: bake death and rollback kills", &cases);
}

/// The admin API down during the swap and at a resume, and a load balancer changed
/// behind the rollout's back (409 on restore).
#[test]
fn fault_matrix_admin_api_down_or_changed_behind_the_rollout() {
    let s = Setup::with_proxy("");
    s.ok(&["bootstrap"]);
    let proxy = s.proxy.as_ref().unwrap();
    let mut cases = Vec::new();
    case(
        &s,
        &mut cases,
        "admin API down from the swap on: rollback incomplete, then rollback",
        Some(true),
        false,
        || {
            let (ok, seen) = run_until(
                &s,
                &["rollout"],
                "step 3/7 verify: ok",
                || proxy.set_up(false),
                None,
            );
            assert!(!ok, "{seen}");
            assert!(
                seen.contains("4/7 swap: FAILED") && seen.contains("rollback failed too"),
                "{seen}"
            );
            // New servers are kept: nothing shows no load balancer serves them.
            assert_eq!(s.status()["instances"].as_array().unwrap().len(), 4);
            proxy.set_up(true);
            s.ok(&["rollback"]);
        },
    );
    case(
        &s,
        &mut cases,
        "SIGKILL after the swap, admin API down at the resume, then rollout",
        Some(false),
        false,
        || {
            killed_at(&s, "step 4/7 swap: ok");
            proxy.set_up(false);
            let out = s.run(&["rollout"]);
            assert!(!out.status.success());
            assert_eq!(
                s.status()["instances"].as_array().unwrap().len(),
                4,
                "nothing deleted while the load balancer cannot be read"
            );
            proxy.set_up(true);
            s.ok(&["rollout"]);
        },
    );
    case(
        &s,
        &mut cases,
        "SIGKILL after the swap, the load balancer changed by hand: resume and rollback refuse, rollback --force restores",
        Some(true),
        false,
        || {
            killed_at(&s, "step 4/7 swap: ok");
            let old_addr = s.status()["instances"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["label"] == "ns1")
                .map(|i| format!("127.0.0.1:{}", i["dns_port"]))
                .unwrap();
            let (st, body) = s.lb.http(
                "POST",
                "/v1/backends",
                Some(&format!(r#"{{"name":"by-hand","address":"{old_addr}"}}"#)),
            );
            assert_eq!(st, 201, "{body}");
            let out = s.run(&["rollout"]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success());
            assert!(
                err.contains("not where rollout") && err.contains("by-hand"),
                "{err}"
            );
            let out = s.run(&["rollback"]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success());
            assert!(
                err.contains("someone changed it") && err.contains("--force"),
                "{err}"
            );
            assert_eq!(s.status()["instances"].as_array().unwrap().len(), 4);
            s.ok(&["rollback", "--force"]);
        },
    );
    report("fault matrix: admin API faults", &cases);
}

#[test]
fn rollback_after_the_swap_restores_the_load_balancer_and_deletes_new_servers() {
    let s = Setup::new("");
    s.ok(&["bootstrap"]);
    let before = s.assert_converged();
    let set_before = s.lb_members();
    killed_at(&s, "step 4/7 swap: ok");
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
    // Canary order: lb1 is swapped and baked before lb2 is touched.
    let at = |needle: &str| {
        stderr
            .find(needle)
            .unwrap_or_else(|| panic!("{needle}:\n{stderr}"))
    };
    assert!(
        at("4/7 swap: ok, lb1 -> generation") < at("5/7 bake: ok")
            && at("5/7 bake: ok") < at("4/7 swap: FAILED"),
        "{stderr}"
    );
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

#[test]
fn a_second_load_balancer_changed_during_the_canary_bake_is_left_alone_and_the_first_restored() {
    let s = Setup::new("");
    let lb2 = Dnslb::start(&lb_config(&[], ""));
    s.write_config(&format!(
        "\n[[load_balancer]]\nname = \"lb2\"\nadmin_url = \"http://{}\"\ndns = \"{}\"\nnameservers = [\"ns1\", \"ns2\"]\n",
        lb2.admin, lb2.dns
    ));
    s.ok(&["bootstrap"]);
    let before = s.assert_converged();
    let set_before = s.lb_members();
    // While lb1 bakes, someone adds a backend to lb2: its swap must get 409.
    let by_hand = || {
        let (st, body) = lb2.http(
            "POST",
            "/v1/backends",
            Some(r#"{"name":"by-hand","address":"127.0.0.1:9"}"#),
        );
        assert_eq!(st, 201, "{body}");
    };
    let (ok, seen) = run_until(&s, &["rollout"], "step 5/7 bake: started", by_hand, None);
    assert!(!ok, "{seen}");
    assert!(
        seen.contains("4/7 swap: FAILED") && seen.contains("409") && seen.contains("lb2 changed"),
        "{seen}"
    );
    assert!(seen.contains("lb1 restored"), "{seen}");
    assert_eq!(s.lb_members(), set_before, "lb1 is put back");
    let lb2_now: Value = serde_json::from_str(&lb2.http("GET", "/v1/backends", None).1).unwrap();
    assert!(
        lb2_now["backends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["name"] == "by-hand"),
        "the hand-made change on lb2 is kept: {lb2_now}"
    );
    assert_eq!(
        lb2_now["backends"].as_array().unwrap().len(),
        3,
        "{lb2_now}"
    );
    assert_eq!(
        s.assert_converged(),
        before,
        "old servers kept, new ones gone"
    );
}
