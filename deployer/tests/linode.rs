//! The Linode provider against an in-process fake of the Linode API v4 that hands out
//! loopback addresses; each "VM" is provisioned (connection local) as a real `named`
//! bound to its addresses, behind a real dnslb.

#[path = "../../lb/tests/common/mod.rs"]
mod common;
mod fake_linode;
mod parent;
mod support;

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{config as lb_config, Dnslb, Named};
use fake_linode::TOKEN;
use serde_json::Value;
use support::repo;

struct Setup {
    dir: tempfile::TempDir,
    lb: Dnslb,
    api: fake_linode::Server,
    ports: (u16, u16),
}

impl Setup {
    /// `net` picks the 127.<net>.0.0/16 slice this test's instances live in.
    fn new(
        net: u8,
        ssh: bool,
        lb_backends: &[(&str, std::net::SocketAddr)],
        boot_timeout_s: u64,
    ) -> Setup {
        Setup::with_step(
            net,
            ssh,
            lb_backends,
            boot_timeout_s,
            Duration::from_millis(300),
        )
    }

    /// `step`: how long an instance of the fake stays in each of provisioning and
    /// booting.
    fn with_step(
        net: u8,
        ssh: bool,
        lb_backends: &[(&str, std::net::SocketAddr)],
        boot_timeout_s: u64,
        step: Duration,
    ) -> Setup {
        let lb = Dnslb::start(&lb_config(lb_backends, ""));
        let api = fake_linode::start(
            Ipv4Addr::new(127, net, 0, 0),
            ssh,
            common::free_port(),
            step,
        );
        let dir = tempfile::tempdir().unwrap();
        let s = Setup {
            dir,
            lb,
            ports: (api.fake.ssh_port, common::free_port()),
            api,
        };
        s.write_config(boot_timeout_s, "us-west");
        s
    }

    fn write_config(&self, boot_timeout_s: u64, region: &str) {
        self.write_config_with(boot_timeout_s, region, "linode/debian12", "");
    }

    /// `ansible_extra` goes into `[ansible]`.
    fn write_config_with(
        &self,
        boot_timeout_s: u64,
        region: &str,
        image: &str,
        ansible_extra: &str,
    ) {
        let r = repo();
        let text = format!(
            r#"[provider]
kind = "linode"
state_dir = "{state}"
api_url = "{api}"
token_env = "LINODE_TOKEN"
type = "g6-nanode-1"
image = "{image}"
authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDeployerTestKeyOnly deployer@test"]
boot_timeout_s = {boot_timeout_s}
ssh_port = {ssh}
dns_port = {dns}
poll_interval_ms = 100
provision_local = true
# One create at a time: these tests script which create meets which fault (the fake's
# fault counters fire in arrival order). The scale test below runs them concurrently.
max_parallel = 1
[ansible]
playbook = "{r}/ansible/playbook.yml"
zones_dir = "{r}/ansible/zones"
{ansible_extra}
[[nameserver]]
name = "ns1"
region = "{region}"
[[nameserver]]
name = "ns2"
region = "{region}"
[[load_balancer]]
name = "lb1"
admin_url = "http://{admin}"
dns = "{lbdns}"
region = "us-west"
nameservers = ["ns1", "ns2"]
[checks]
bake_s = 1
"#,
            state = self.dir.path().join("state").display(),
            api = self.api.url,
            ssh = self.ports.0,
            dns = self.ports.1,
            r = r.display(),
            admin = self.lb.admin,
            lbdns = self.lb.dns,
        );
        std::fs::write(self.dir.path().join("deployer.toml"), text).unwrap();
    }

    fn cli(&self) -> support::Cli {
        support::Cli {
            config: self.dir.path().join("deployer.toml"),
            env: vec![("LINODE_TOKEN", TOKEN.to_string())],
            secret: Some(TOKEN),
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

    fn labels(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .api
            .fake
            .linodes()
            .iter()
            .map(|l| l.label.clone())
            .collect();
        v.sort();
        v
    }

    fn lb_set(&self) -> Value {
        serde_json::from_str(&self.lb.http("GET", "/v1/backends", None).1).unwrap()
    }

    /// No file in the state directory holds the token or a root password.
    fn assert_secrets_absent_from_state(&self) {
        let root_passes: Vec<String> = self
            .api
            .fake
            .requests()
            .iter()
            .filter_map(|(_, _, b)| b["root_pass"].as_str().map(String::from))
            .collect();
        assert!(!root_passes.is_empty());
        let mut stack = vec![self.dir.path().join("state")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(text) = std::fs::read_to_string(&p) {
                    assert!(!text.contains(TOKEN), "token in {}", p.display());
                    for rp in &root_passes {
                        assert!(!text.contains(rp.as_str()), "root_pass in {}", p.display());
                    }
                }
            }
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.cmd(&["destroy", "--yes"]).output();
    }
}

#[test]
fn a_full_rollout_against_the_fake_linode_api() {
    let s = Setup::new(61, true, &[], 30);
    s.ok(&["bootstrap"]);
    assert_eq!(s.labels(), ["ns1", "ns2"]);
    let old_ids: Vec<u64> = s.api.fake.linodes().iter().map(|l| l.id).collect();
    // The API throttles: the client waits out Retry-After and goes on.
    s.api.fake.throttle(2);
    let out = s.run(&["rollout"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("429"), "{stderr}");
    assert_eq!(s.labels(), ["ns1", "ns2"]);
    let new = s.api.fake.linodes();
    assert!(
        new.iter().all(|l| !old_ids.contains(&l.id)),
        "replaced by new instances"
    );
    // Same region as the load balancer: it was given the private addresses.
    let privates: Vec<String> = new
        .iter()
        .map(|l| format!("{}:{}", l.private.unwrap(), s.ports.1))
        .collect();
    for b in s.lb_set()["backends"].as_array().unwrap() {
        assert!(
            privates.contains(&b["address"].as_str().unwrap().to_string()),
            "{b} in {privates:?}"
        );
    }
    support::assert_answers_through(s.lb.dns);
    // What the API was asked to create.
    let creates: Vec<Value> = s
        .api
        .fake
        .requests()
        .into_iter()
        .filter(|(m, p, _)| m == "POST" && p == "/linode/instances")
        .map(|(_, _, b)| b)
        .collect();
    assert_eq!(creates.len(), 4, "two at bootstrap, two at the rollout");
    for c in &creates {
        assert_eq!(c["region"], "us-west");
        assert_eq!(c["type"], "g6-nanode-1");
        assert_eq!(c["image"], "linode/debian12");
        assert_eq!(c["private_ip"], true);
        assert!(c["authorized_keys"][0]
            .as_str()
            .unwrap()
            .starts_with("ssh-ed25519 "));
        let tags: Vec<&str> = c["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert!(
            tags.contains(&"dnslb-deployer")
                && tags.iter().any(|t| t.starts_with("dnslb-rollout-")),
            "{tags:?}"
        );
    }
    assert!(
        s.api
            .fake
            .requests()
            .iter()
            .any(|(m, _, b)| m == "PUT" && b["label"] == "ns1"),
        "renamed with PUT"
    );
    let status = s.ok(&["status"]);
    assert!(
        status.contains("ns1") && status.contains("running"),
        "{status}"
    );
    s.assert_secrets_absent_from_state();
}

#[test]
fn instances_that_never_become_reachable_are_deleted_and_the_load_balancer_is_untouched() {
    // The live fleet predates the deployer: hand-made, untagged, found by label.
    let ns1 = Named::start();
    let ns2 = Named::start();
    let s = Setup::new(62, false, &[("old1", ns1.addr), ("old2", ns2.addr)], 2);
    s.api.fake.add_preexisting("ns1", "us-west", &[]);
    s.api.fake.add_preexisting("ns2", "us-west", &["web"]);
    let members = |v: &Value| -> (Value, Vec<(Value, Value)>) {
        (
            v["generation"].clone(),
            v["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| (b["name"].clone(), b["address"].clone()))
                .collect(),
        )
    };
    let before = members(&s.lb_set());
    let out = s.run(&["rollout"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("SSH") && stderr.contains("did not answer within 2s"),
        "{stderr}"
    );
    assert!(stderr.contains("rolled back"), "{stderr}");
    assert_eq!(
        s.labels(),
        ["ns1", "ns2"],
        "every instance it created is deleted"
    );
    assert_eq!(members(&s.lb_set()), before, "load balancer untouched");
}

#[test]
fn a_resumed_rollout_reuses_the_instances_it_created() {
    let s = Setup::new(63, true, &[], 30);
    s.ok(&["bootstrap"]);
    let mut child = s
        .cmd(&["rollout"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        if line.unwrap().contains("step 1/7 create: ok") {
            child.kill().unwrap();
            break;
        }
    }
    child.wait().unwrap();
    assert_eq!(s.labels(), ["ns1", "ns1-next", "ns2", "ns2-next"]);
    s.ok(&["rollout"]);
    assert_eq!(s.labels(), ["ns1", "ns2"]);
    let next_creates = s
        .api
        .fake
        .requests()
        .iter()
        .filter(|(m, p, b)| {
            m == "POST"
                && p == "/linode/instances"
                && b["label"].as_str().unwrap().ends_with("-next")
        })
        .count();
    assert_eq!(next_creates, 2, "never duplicated");
}

#[test]
fn status_finds_its_instances_among_pages_of_others() {
    let s = Setup::new(64, true, &[], 30);
    for i in 0..230 {
        s.api
            .fake
            .add_preexisting(&format!("web-{i:03}"), "us-east", &["web"]);
    }
    // Left over by earlier demos: more managed instances than fit on one page.
    for i in 0..130 {
        s.api
            .fake
            .add_preexisting(&format!("stray-{i:03}"), "us-west", &["dnslb-deployer"]);
    }
    s.api.fake.add_preexisting("ns1", "us-west", &[]);
    let st: Value = serde_json::from_str(&s.ok(&["status", "--json"])).unwrap();
    let labels: Vec<&str> = st["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels.len(), 131, "{labels:?}");
    assert!(labels.contains(&"ns1") && labels.contains(&"stray-129"));
    assert!(!labels.iter().any(|l| l.starts_with("web-")));
    assert!(
        s.api
            .fake
            .requests()
            .iter()
            .any(|(m, p, q)| m == "GET" && p == "/linode/instances" && q["page"] == "2"),
        "followed pagination"
    );
}

#[test]
fn token_and_api_errors_are_reported_clearly() {
    let s = Setup::new(65, true, &[], 30);
    let out = s
        .cmd(&["status"])
        .env_remove("LINODE_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("LINODE_TOKEN is not set"));
    let out = s
        .cmd(&["status"])
        .env("LINODE_TOKEN", "wrong-token")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("401")
            && err.contains("Invalid Token")
            && !err.contains("wrong-token"),
        "{err}"
    );
    // Linode's reason and field surface.
    s.write_config(30, "mars-north");
    let out = s.run(&["bootstrap"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("region: region is not valid"),
        "{err}"
    );
    assert!(s.labels().is_empty());
}

// ---------------------------------------------------------------------------------
// Create is safe to retry (issue 14, item 6): every fault path of the API, each
// through the real binary.

impl Setup {
    fn creates_of(&self, label: &str) -> usize {
        self.api
            .fake
            .requests_to("POST", "/linode/instances")
            .iter()
            .filter(|b| b["label"] == label)
            .count()
    }

    /// How many instances the fake has made so far (hand-made ones included).
    fn made(&self) -> u64 {
        self.api.fake.inner.lock().unwrap().next_id
    }

    fn id_of(&self, label: &str) -> u64 {
        self.api
            .fake
            .linodes()
            .iter()
            .find(|l| l.label == label)
            .unwrap_or_else(|| panic!("no {label}"))
            .id
    }

    fn members(&self) -> (Value, Vec<(Value, Value)>) {
        let v = self.lb_set();
        (
            v["generation"].clone(),
            v["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| (b["name"].clone(), b["address"].clone()))
                .collect(),
        )
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn a_create_whose_outcome_is_unknown_is_looked_up_before_it_is_sent_again() {
    let s = Setup::new(66, true, &[], 30);
    s.ok(&["bootstrap"]);
    let made_before = s.made();
    // ns1-next: a 500 before anything is made, then a 500 after the instance was
    // made; ns2-next: made, but the answer is cut off half-way, and the next listing
    // does not show it yet.
    s.api.fake.faults(|f| {
        f.create_500_before = 1;
        f.create_500_after = 1;
        f.create_lost_response = 1;
        f.lost_hidden_from_lists = 1;
    });
    let out = s.run(&["rollout"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("500 Internal Server Error: Internal Server Error; it may have been created"),
        "{err}"
    );
    // The cut-off answer: whether hyper gets the status line out before it closes
    // the connection or not, the client cannot tell whether the POST took effect.
    assert!(
        err.lines()
            .any(|l| l.contains("it may have been created; looking ns2-next up again")),
        "{err}"
    );
    assert!(err.contains("looking ns1-next up again"), "{err}");
    assert!(
        err.contains("reusing ns1-next") && err.contains("reusing ns2-next"),
        "{err}"
    );
    // The POST that made nothing was sent again; the one answered 500 after it made
    // the instance was not: that instance was found and used. The lost one was sent
    // again because the lagging listing did not show it; Linode refused the label,
    // and the next lookup found the instance.
    assert_eq!(s.creates_of("ns1-next"), 2);
    assert_eq!(s.creates_of("ns2-next"), 2);
    assert!(err.contains("label: Label must be unique"), "{err}");
    assert_eq!(s.made() - made_before, 2, "no duplicate was ever made");
    assert_eq!(s.labels(), ["ns1", "ns2"]);
    support::assert_answers_through(s.lb.dns);
}

#[test]
fn creates_wait_out_429_and_instances_that_stay_offline_are_booted() {
    // Provisioning lasts long enough to be seen by the first poll even on a busy
    // machine.
    let s = Setup::with_step(67, true, &[], 30, Duration::from_millis(1500));
    s.ok(&["bootstrap"]);
    s.api.fake.faults(|f| {
        f.create_429 = 2;
        f.offline_after_provisioning = true;
    });
    let out = s.run(&["rollout"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("linode POST /linode/instances: 429"), "{err}");
    // A 429 was not processed, so the same POST goes again, after Retry-After (1 s).
    let times = s.api.fake.create_times("ns1-next");
    assert_eq!(times.len(), 3, "two refused, one made");
    for w in times.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(950),
            "Retry-After not honoured: {:?}",
            w[1] - w[0]
        );
    }
    assert_eq!(s.creates_of("ns2-next"), 1);
    assert_eq!(s.labels(), ["ns1", "ns2"]);
    // Each new instance came up offline and was booted exactly once, per the docs'
    // POST /linode/instances/{id}/boot; provisioning and booting were waited through.
    for l in s.api.fake.linodes() {
        let boots = s
            .api
            .fake
            .requests_to("POST", &format!("/linode/instances/{}/boot", l.id))
            .len();
        assert_eq!(boots, 1, "{}", l.label);
        let seen = s.api.fake.statuses_served(l.id);
        assert!(
            seen.ends_with(&["offline".into(), "booting".into(), "running".into()]),
            "{}: {seen:?}",
            l.label
        );
    }
    let first = s
        .api
        .fake
        .linodes()
        .into_iter()
        .min_by_key(|l| l.id)
        .unwrap();
    assert_eq!(
        s.api.fake.statuses_served(first.id),
        ["provisioning", "offline", "booting", "running"]
    );
    assert!(err.contains("is offline, booting it"), "{err}");
    support::assert_answers_through(s.lb.dns);
}

#[test]
fn a_token_without_linodes_read_write_is_refused_clearly_and_not_retried() {
    let s = Setup::new(68, true, &[], 30);
    s.api
        .fake
        .faults(|f| f.scope = fake_linode::Scope::ReadOnly);
    // Reading works; the first write is refused, once, and nothing is left behind.
    s.ok(&["status"]);
    let out = s.run(&["bootstrap"]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("linode POST /linode/instances: 403 Forbidden: Unauthorized")
            && err.contains("lacks the Linodes read/write scope"),
        "{err}"
    );
    assert_eq!(s.creates_of("ns1"), 1, "a 403 is not retried");
    assert!(s.labels().is_empty());
    // No Linodes scope at all: even reading is refused, once.
    s.api.fake.faults(|f| f.scope = fake_linode::Scope::None);
    let gets = s.api.fake.requests_to("GET", "/linode/instances").len();
    let out = s.run(&["status"]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("linode GET /linode/instances: 403 Forbidden")
            && err.contains("lacks the Linodes read/write scope"),
        "{err}"
    );
    assert_eq!(
        s.api.fake.requests_to("GET", "/linode/instances").len(),
        gets + 1
    );
}

#[test]
fn a_next_instance_this_rollout_did_not_create_is_refused_and_left_alone() {
    let s = Setup::new(69, true, &[], 30);
    s.ok(&["bootstrap"]);
    let before = s.members();
    // A leftover of another run, built with other settings.
    let stray = s.api.fake.add_made(
        "ns2-next",
        "us-east",
        "g6-standard-2",
        "linode/debian11",
        &["dnslb-deployer", "dnslb-rollout-r1700000000-0000"],
    );
    let out = s.run(&["rollout"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    for needle in [
        &format!("a Linode labelled ns2-next already exists ({})", stray.id)[..],
        "lacks the tag dnslb-rollout-r",
        "another run created it",
        "region us-east (wanted us-west)",
        "type g6-standard-2 (wanted g6-nanode-1)",
        "image linode/debian11 (wanted linode/debian12)",
        "left untouched",
        "rolled back",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    assert_eq!(s.creates_of("ns2-next"), 0, "never POSTed over it");
    // ns1-next, which this rollout made, is gone again; the stray one is not.
    assert_eq!(s.labels(), ["ns1", "ns2", "ns2-next"]);
    assert_eq!(s.id_of("ns2-next"), stray.id);
    assert_eq!(s.members(), before, "load balancer untouched");

    // Hand-made (no deployer tag) with exactly the configured settings: still not
    // adopted.
    {
        let mut g = s.api.fake.inner.lock().unwrap();
        let l = g.linodes.get_mut(&stray.id).unwrap();
        l.region = "us-west".into();
        l.ty = "g6-nanode-1".into();
        l.image = Some("linode/debian12".into());
        l.tags = vec!["web".into()];
    }
    let out = s.run(&["rollout"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("lacks the tag dnslb-deployer (the deployer did not create it)"),
        "{err}"
    );
    assert!(!err.contains("wanted"), "only the tag differs: {err}");
    assert_eq!(s.labels(), ["ns1", "ns2", "ns2-next"]);
    assert_eq!(s.id_of("ns2-next"), stray.id);
    assert_eq!(s.members(), before);
}

#[test]
fn a_resumed_rollout_does_not_adopt_a_next_built_from_another_image() {
    let s = Setup::new(70, true, &[], 30);
    s.ok(&["bootstrap"]);
    let mut child = s
        .cmd(&["rollout"])
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Killed while it waits for its new instances to boot (step 1).
    let t0 = std::time::Instant::now();
    while s.labels().len() < 4 {
        assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", s.labels());
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let posts = s.api.fake.requests_to("POST", "/linode/instances").len();
    // The image changes before the rollout is resumed: the instances it made from
    // the old image must not be used.
    s.write_config_with(30, "us-west", "linode/debian13", "");
    let out = s.run(&["rollout"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("a Linode labelled ns1-next already exists")
            && err.contains("image linode/debian12 (wanted linode/debian13)"),
        "{err}"
    );
    assert!(
        !err.contains("lacks the tag"),
        "it is this rollout's: {err}"
    );
    assert_eq!(
        s.api.fake.requests_to("POST", "/linode/instances").len(),
        posts,
        "nothing new was created"
    );
    // They were this rollout's own: the rollback deletes them.
    assert!(err.contains("rolled back"), "{err}");
    assert_eq!(s.labels(), ["ns1", "ns2"]);
}

#[test]
fn provisioning_that_hangs_is_killed_after_timeout_s_and_rolled_back() {
    let s = Setup::new(71, true, &[], 30);
    let script = s.dir.path().join("hanging-ansible-playbook");
    let pid_file = s.dir.path().join("hanging.pid");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho PLAY [Nameservers]\nsleep 120 &\necho $! > {}\nwait\n",
            pid_file.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    s.write_config_with(
        30,
        "us-west",
        "linode/debian12",
        &format!("command = \"{}\"\ntimeout_s = 1", script.display()),
    );
    let t0 = std::time::Instant::now();
    let out = s.run(&["bootstrap"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("ansible-playbook did not finish within 1s ([ansible] timeout_s)")
            && err.contains("PLAY [Nameservers]"),
        "{err}"
    );
    assert!(err.contains("rolled back"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    assert!(s.labels().is_empty(), "{:?}", s.labels());
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let gone = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
            .map(|st| st.rsplit(") ").next().unwrap_or("").starts_with('Z'))
            .unwrap_or(true)
    };
    let t = std::time::Instant::now();
    while !gone(&pid) && t.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(gone(&pid), "a process the playbook started survived");
}

/// Provider calls that fail or time out, under dnsperf load through the load
/// balancer: the deployer rides out what is transient, and what is not leaves a
/// journal that the next run converges from. Every case ends with one instance per
/// nameserver, the load balancer on exactly those, and no SERVFAIL or lost query.
#[test]
fn fault_matrix_provider_calls_that_fail_or_time_out_converge_under_load() {
    let s = Setup::new(72, true, &[], 30);
    let cfg = s.dir.path().join("deployer.toml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "provision_local = true",
        "provision_local = true\nrequest_timeout_s = 2",
    );
    std::fs::write(&cfg, &text).unwrap();
    s.ok(&["bootstrap"]);
    let ids = || -> Vec<u64> {
        let mut v: Vec<u64> = s.api.fake.linodes().iter().map(|l| l.id).collect();
        v.sort();
        v
    };
    let converged = |case: &str| {
        assert_eq!(
            s.labels(),
            ["ns1", "ns2"],
            "{case}: one instance per nameserver"
        );
        let st: Value = serde_json::from_str(&s.ok(&["status", "--json"])).unwrap();
        assert!(st["unfinished_rollout"].is_null(), "{case}: {st}");
        let mut want: Vec<String> = s
            .api
            .fake
            .linodes()
            .iter()
            .map(|l| format!("{}:{}", l.private.unwrap(), s.ports.1))
            .collect();
        want.sort();
        let mut got: Vec<String> = s.lb_set()["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["address"].as_str().unwrap().to_string())
            .collect();
        got.sort();
        assert_eq!(
            got, want,
            "{case}: the load balancer serves exactly the live instances"
        );
        support::assert_answers_through(s.lb.dns);
    };
    let mut report = Vec::new();
    let mut case = |name: &str, body: &dyn Fn()| {
        let load = support::start_load(s.lb.dns, s.dir.path());
        std::thread::sleep(Duration::from_millis(500));
        body();
        converged(name);
        let (sent, lost, servfail, log) = load.finish();
        assert!(sent > 1000, "{name}: {sent}");
        assert_eq!((lost, servfail), (0, 0), "{name}\n{log}");
        report.push(format!(
            "  {name:<75} sent {sent:>6} lost {lost} SERVFAIL {servfail}"
        ));
    };

    let before = ids();
    case(
        "DELETE answers 500 twice in step 6: retried, the rollout completes",
        &|| {
            s.api.fake.faults(|f| f.delete_500 = 2);
            s.ok(&["rollout"]);
        },
    );
    assert!(ids().iter().all(|i| !before.contains(i)), "new instances");

    let before = ids();
    case(
        "a DELETE applied but answered after the request timeout: retried, 404 counts as gone",
        &|| {
            s.api.fake.faults(|f| {
                f.delete_slow = 1;
                f.delete_slow_for = Duration::from_secs(4);
            });
            let out = s.run(&["rollout"]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{stderr}");
            assert!(
                stderr.contains("retrying"),
                "the timeout was seen: {stderr}"
            );
        },
    );
    assert!(ids().iter().all(|i| !before.contains(i)), "new instances");

    let before = ids();
    case(
        "DELETE fails for good inside a rollback: incomplete, then `deployer rollback`",
        &|| {
            // A checked zone with a record the servers do not serve fails step 3.
            let bad = s.dir.path().join("checks");
            std::fs::create_dir_all(&bad).unwrap();
            let mut zone =
                std::fs::read_to_string(repo().join("ansible/zones/example.test.zone")).unwrap();
            zone.push_str("extra        IN A   192.0.2.99\n");
            std::fs::write(bad.join("example.test.zone"), zone).unwrap();
            std::fs::write(
                &cfg,
                format!(
                    "{text}zone_files = [\"{}\"]\n",
                    bad.join("example.test.zone").display()
                ),
            )
            .unwrap();
            // Every attempt at the first delete fails (the client tries 8 times).
            s.api.fake.faults(|f| f.delete_500 = 8);
            let out = s.run(&["rollout"]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success());
            assert!(
                stderr.contains("3/7 verify: FAILED")
                    && stderr.contains("rollback failed too")
                    && stderr.contains("could not delete"),
                "{stderr}"
            );
            let st: Value = serde_json::from_str(&s.ok(&["status", "--json"])).unwrap();
            assert_eq!(st["unfinished_rollout"]["step"], "rolling back", "{st}");
            std::fs::write(&cfg, &text).unwrap();
            s.ok(&["rollback"]);
        },
    );
    assert_eq!(ids(), before, "the old instances kept, the new ones gone");
    eprintln!(
        "fault matrix: provider faults: {} cases\n{}",
        report.len(),
        report.join("\n")
    );
}

/// A fleet of 20 nameservers behind 10 load balancers (two each) against the fake:
/// bootstrap, a full rollout of the nameservers and one of the load balancers
/// (through a real parent zone, one NS name per load balancer) complete, creates and
/// waits run concurrently but at most `max_parallel` at a time (read from the order
/// of the fake's requests), and the time each takes is reported.
#[test]
fn scale_a_rollout_of_twenty_nameservers_behind_ten_load_balancers() {
    const NS: usize = 20;
    const LBS: usize = 10;
    const PARALLEL: usize = 4;
    let lbs: Vec<Dnslb> = (0..LBS)
        .map(|_| Dnslb::start(&lb_config(&[], "")))
        .collect();
    let api = fake_linode::start(
        Ipv4Addr::new(127, 73, 0, 0),
        true,
        common::free_port(),
        Duration::from_millis(300),
    );
    let mut zone = String::from(
        "$TTL 2\n@ SOA ns.test. admin.test. 1 3600 600 86400 2\n@ NS ns.test.\nns A 127.0.0.1\n",
    );
    for k in 1..=LBS {
        zone.push_str(&format!(
            "example NS ns{k}.example\nns{k}.example A 127.0.0.1\n"
        ));
    }
    let parent = parent::start_parent_with(&zone);
    let dir = tempfile::tempdir().unwrap();
    let dns_port = common::free_port();
    let r = repo();
    let mut text = format!(
        r#"[provider]
kind = "linode"
state_dir = "{state}"
api_url = "{api}"
type = "g6-nanode-1"
image = "linode/debian12"
authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDeployerTestKeyOnly deployer@test"]
ssh_port = {ssh}
dns_port = {dns_port}
poll_interval_ms = 100
provision_local = true
max_parallel = {PARALLEL}
[ansible]
playbook = "{r}/ansible/playbook.yml"
zones_dir = "{r}/ansible/zones"
dnslb_binary = "{bin}"
[checks]
bake_s = 1
[registrar]
kind = "rfc2136"
zone = "example.test."
parent_servers = ["{parent}"]
tsig_key_file = "{key}"
drain_window_s = 1
"#,
        state = dir.path().join("state").display(),
        api = api.url,
        ssh = api.fake.ssh_port,
        r = r.display(),
        bin = common::dnslb_bin().display(),
        parent = parent.addr,
        key = parent.dir.path().join("ddns.key").display(),
    );
    for i in 1..=NS {
        text.push_str(&format!(
            "[[nameserver]]\nname = \"ns{i}\"\nregion = \"us-west\"\n"
        ));
    }
    for (k, lb) in lbs.iter().enumerate() {
        text.push_str(&format!(
            "[[load_balancer]]\nname = \"lb{}\"\nadmin_url = \"http://{}\"\ndns = \"{}\"\nregion = \"us-west\"\nnameservers = [\"ns{}\", \"ns{}\"]\nns_name = \"ns{}.example.test.\"\n",
            k + 1,
            lb.admin,
            lb.dns,
            2 * k + 1,
            2 * k + 2,
            k + 1
        ));
    }
    std::fs::write(dir.path().join("deployer.toml"), text).unwrap();
    let cli = support::Cli {
        config: dir.path().join("deployer.toml"),
        env: vec![("LINODE_TOKEN", TOKEN.to_string())],
        secret: Some(TOKEN),
    };
    let t0 = std::time::Instant::now();
    cli.ok(&["bootstrap"]);
    let bootstrap_s = t0.elapsed().as_secs_f64();
    let first_ids: Vec<u64> = api.fake.linodes().iter().map(|l| l.id).collect();
    let skip = api.fake.requests().len();
    let t1 = std::time::Instant::now();
    let out = cli.run(&["rollout"]);
    let rollout_s = t1.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let now = api.fake.linodes();
    assert_eq!(now.len(), NS, "one instance per nameserver");
    assert!(
        now.iter().all(|l| !first_ids.contains(&l.id)),
        "all replaced"
    );
    for lb in &lbs {
        let set: Value = serde_json::from_str(&lb.http("GET", "/v1/backends", None).1).unwrap();
        assert_eq!(set["backends"].as_array().unwrap().len(), 2, "{set}");
        support::assert_answers_through(lb.dns);
    }
    // Waits overlap, at most PARALLEL at a time: an instance is "being waited for"
    // from its first status poll to the read of its addresses, which ends the wait.
    let log: Vec<String> = api.fake.requests()[skip..]
        .iter()
        .filter(|(m, _, _)| m == "GET")
        .map(|(_, p, _)| p.clone())
        .collect();
    let spans: Vec<(usize, usize)> = now
        .iter()
        .filter_map(|l| {
            let poll = format!("/linode/instances/{}", l.id);
            let start = log.iter().position(|p| *p == poll)?;
            let end = log.iter().position(|p| *p == format!("{poll}/ips"))?;
            Some((start, end))
        })
        .collect();
    assert_eq!(spans.len(), NS, "every new instance was waited for");
    let most = (0..log.len())
        .map(|k| spans.iter().filter(|(a, b)| *a <= k && k <= *b).count())
        .max()
        .unwrap_or(0);
    assert!(
        (2..=PARALLEL).contains(&most),
        "{most} instances waited for at once (want 2..={PARALLEL})"
    );
    // Then the load balancers themselves: ten new ones, each on its own address, the
    // parent's glue of each NS name moved to it, the old ones (made by hand) left.
    let t2 = std::time::Instant::now();
    let out = cli.run(&["rollout-lbs"]);
    let lbs_s = t2.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let all = api.fake.linodes();
    assert_eq!(
        all.len(),
        NS + LBS,
        "one instance per nameserver and load balancer"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let d = rt
        .block_on(deployer::registrar::delegation(
            parent.addr,
            "example.test.",
        ))
        .unwrap();
    for k in 1..=LBS {
        let lb = all
            .iter()
            .find(|l| l.label == format!("lb{k}"))
            .unwrap_or_else(|| panic!("no instance lb{k}: {stderr}"));
        let glue = d.glue(&format!("ns{k}.example.test."));
        assert_eq!(glue.len(), 1, "ns{k}: {glue:?}");
        let through = std::net::SocketAddr::new(glue[0], lbs[k - 1].dns.port());
        let out = Command::new("dig")
            .args([
                &format!("@{}", through.ip()),
                "-p",
                &through.port().to_string(),
                "+short",
                "www.example.test.",
            ])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("192.0.2.20"),
            "lb{k} ({}) at {through}",
            lb.id
        );
    }
    eprintln!(
        "scale: {NS} nameservers behind {LBS} load balancers: bootstrap {bootstrap_s:.1}s, rollout {rollout_s:.1}s, rollout-lbs {lbs_s:.1}s (max_parallel {PARALLEL}, {most} waited for at once)"
    );
    let _ = cli.run(&["destroy", "--yes"]);
}
