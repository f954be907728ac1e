//! The registrar providers against a real BIND serving a parent zone (`test.`) that
//! delegates `example.test.` with glue, `update-policy` granting a TSIG key made by
//! `tsig-keygen`: the glue is read from the referral, changed by a signed UPDATE,
//! refused with a wrong key, and waited for by the manual registrar.

#[path = "../../lb/tests/common/mod.rs"]
mod common;
mod parent;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use deployer::registrar::{self, Manual, Registrar, RegistrarError, Rfc2136};

use parent::{keygen, start_parent_with, Parent};

fn start_parent() -> Parent {
    start_parent_with(
        "$TTL 300\n@ SOA ns.test. admin.test. 1 3600 600 86400 300\n@ NS ns.test.\nns A 127.0.0.1\n\
         example NS ns1.example\nexample NS ns2.example\nns1.example A 127.0.0.10\nns2.example A 127.0.0.11\n",
    )
}

fn ips(v: &[&str]) -> Vec<IpAddr> {
    v.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn rfc2136_changes_the_glue_the_parent_serves_and_a_wrong_key_is_refused() {
    let p = start_parent();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let glue = |ns: &str| {
        rt.block_on(registrar::served_glue(p.addr, "example.test.", ns))
            .unwrap()
    };
    assert_eq!(glue("ns1.example.test."), ips(&["127.0.0.10"]));
    let r = Rfc2136 {
        server: p.addr,
        key_file: p.dir.path().join("ddns.key"),
    };
    rt.block_on(r.set_glue(
        "example.test.",
        "ns1.example.test.",
        &ips(&["127.0.0.21", "127.0.0.20"]),
        60,
    ))
    .unwrap();
    assert_eq!(
        glue("ns1.example.test."),
        ips(&["127.0.0.20", "127.0.0.21"])
    );
    assert_eq!(
        glue("ns2.example.test."),
        ips(&["127.0.0.11"]),
        "the other NS untouched"
    );

    // Same key name, another secret: BIND refuses, nothing changes.
    let wrong = p.dir.path().join("wrong.key");
    keygen(&wrong);
    let bad = Rfc2136 {
        server: p.addr,
        key_file: wrong,
    };
    let e = rt
        .block_on(bad.set_glue(
            "example.test.",
            "ns1.example.test.",
            &ips(&["127.0.0.99"]),
            60,
        ))
        .unwrap_err();
    assert!(matches!(e, RegistrarError::Update { .. }), "{e}");
    assert!(
        e.to_string().contains("NOTAUTH") && e.to_string().contains("BADSIG"),
        "{e}"
    );
    assert_eq!(
        glue("ns1.example.test."),
        ips(&["127.0.0.20", "127.0.0.21"])
    );
}

#[test]
fn the_manual_registrar_waits_until_every_parent_server_serves_the_change() {
    let p = start_parent();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let manual = Manual {
        parent_servers: vec![p.addr],
        timeout: Duration::from_secs(2),
    };
    // Not made at the "registrar": it times out and says what is served.
    let e = rt
        .block_on(manual.set_glue(
            "example.test.",
            "ns2.example.test.",
            &ips(&["127.0.0.30"]),
            60,
        ))
        .unwrap_err();
    assert!(
        matches!(e, RegistrarError::Timeout(_)) && e.to_string().contains("127.0.0.11"),
        "{e}"
    );
    // Made meanwhile (here by a signed update, as a registrar would): it returns.
    let r = Rfc2136 {
        server: p.addr,
        key_file: p.dir.path().join("ddns.key"),
    };
    let change = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        r.set_glue(
            "example.test.",
            "ns2.example.test.",
            &ips(&["127.0.0.30"]),
            60,
        )
        .await
    };
    let want = ips(&["127.0.0.30"]);
    let (waited, changed) = rt.block_on(async {
        tokio::join!(
            manual.set_glue("example.test.", "ns2.example.test.", &want, 60),
            change
        )
    });
    changed.unwrap();
    waited.unwrap();
}

#[test]
fn the_delegation_lists_every_ns_name_its_glue_and_the_longest_ttl() {
    let p = start_parent();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let d = rt
        .block_on(registrar::delegation(p.addr, "example.test."))
        .unwrap();
    assert_eq!(
        d.ns,
        vec![
            ("ns1.example.test.".to_string(), ips(&["127.0.0.10"])),
            ("ns2.example.test.".to_string(), ips(&["127.0.0.11"])),
        ]
    );
    assert_eq!(d.ttl, 300, "the zone's $TTL");
    assert_eq!(d.addresses(), ips(&["127.0.0.10", "127.0.0.11"]));
    // A glue record with a longer TTL than the NS records sets the bound.
    let r = Rfc2136 {
        server: p.addr,
        key_file: p.dir.path().join("ddns.key"),
    };
    rt.block_on(r.set_glue(
        "example.test.",
        "ns2.example.test.",
        &ips(&["127.0.0.12"]),
        900,
    ))
    .unwrap();
    let d = rt
        .block_on(registrar::delegation(p.addr, "example.test."))
        .unwrap();
    assert_eq!(d.ttl, 900);
    assert_eq!(d.glue("NS2.example.test."), ips(&["127.0.0.12"]));
    // A zone the parent does not delegate is an error, not an empty delegation.
    let e = rt
        .block_on(registrar::delegation(p.addr, "other.test."))
        .unwrap_err();
    assert!(matches!(e, RegistrarError::Read { .. }), "{e}");
}

#[test]
fn status_shows_the_delegation_each_parent_server_serves() {
    let p = start_parent();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("deployer.toml");
    // The second parent server does not answer: its row says so.
    let dead = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    std::fs::write(
        &cfg,
        format!(
            "[provider]\nstate_dir = \"{state}\"\n[ansible]\nplaybook = \"{repo}/ansible/playbook.yml\"\nzones_dir = \"{repo}/ansible/zones\"\n\
             [[nameserver]]\nname = \"ns1\"\n\
             [registrar]\nkind = \"manual\"\nzone = \"example.test.\"\nparent_servers = [\"{parent}\", \"{dead}\"]\n",
            state = dir.path().join("state").display(),
            repo = repo.display(),
            parent = p.addr,
        ),
    )
    .unwrap();
    let run = |json: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_deployer"));
        c.arg("--config").arg(&cfg).arg("status");
        if json {
            c.arg("--json");
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let text = run(false);
    assert!(
        text.contains(&format!(
            "delegation of example.test. at {} (TTL 300s):",
            p.addr
        )) && text.contains("  ns1.example.test. -> 127.0.0.10")
            && text.contains("  ns2.example.test. -> 127.0.0.11")
            && text.contains(&format!(
                "delegation of example.test. at {dead}: unreadable"
            )),
        "{text}"
    );
    let v: serde_json::Value = serde_json::from_str(&run(true)).unwrap();
    assert_eq!(
        v["delegation"][0]["delegation"]["ns"][0],
        serde_json::json!(["ns1.example.test.", ["127.0.0.10"]])
    );
    assert!(v["delegation"][1]["error"].is_string(), "{v}");
}
