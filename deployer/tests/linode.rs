//! The Linode provider against an in-process fake of the Linode API v4 that hands out
//! loopback addresses; each "VM" is provisioned (connection local) as a real `named`
//! bound to its addresses, behind a real dnslb.

#[path = "../../lb/tests/common/mod.rs"]
mod common;
mod fake_linode;
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
        let lb = Dnslb::start(&lb_config(lb_backends, ""));
        let api = fake_linode::start(
            Ipv4Addr::new(127, net, 0, 0),
            ssh,
            common::free_port(),
            Duration::from_millis(300),
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
        let r = repo();
        let text = format!(
            r#"[provider]
kind = "linode"
state_dir = "{state}"
api_url = "{api}"
token_env = "LINODE_TOKEN"
type = "g6-nanode-1"
image = "linode/debian12"
authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDeployerTestKeyOnly deployer@test"]
boot_timeout_s = {boot_timeout_s}
ssh_port = {ssh}
dns_port = {dns}
poll_interval_ms = 100
provision_local = true
[ansible]
playbook = "{r}/ansible/playbook.yml"
zones_dir = "{r}/ansible/zones"
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
