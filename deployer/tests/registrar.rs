//! The registrar providers against a real BIND serving a parent zone (`test.`) that
//! delegates `example.test.` with glue, `update-policy` granting a TSIG key made by
//! `tsig-keygen`: the glue is read from the referral, changed by a signed UPDATE,
//! refused with a wrong key, and waited for by the manual registrar.

#[path = "../../lb/tests/common/mod.rs"]
mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use deployer::registrar::{self, Manual, Registrar, RegistrarError, Rfc2136};

struct Parent {
    addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Parent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sbin(tool: &str) -> String {
    let p = format!("/usr/sbin/{tool}");
    if Path::new(&p).exists() {
        p
    } else {
        tool.into()
    }
}

fn keygen(path: &Path) {
    let out = Command::new(sbin("tsig-keygen"))
        .args(["-a", "hmac-sha256", "ddns-key"])
        .output()
        .expect("tsig-keygen (bind9) is installed");
    assert!(out.status.success());
    std::fs::write(path, out.stdout).unwrap();
}

fn start_parent() -> Parent {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    keygen(&d.join("ddns.key"));
    std::fs::write(
        d.join("test.zone"),
        "$TTL 300\n@ SOA ns.test. admin.test. 1 3600 600 86400 300\n@ NS ns.test.\nns A 127.0.0.1\n\
         example NS ns1.example\nexample NS ns2.example\nns1.example A 127.0.0.10\nns2.example A 127.0.0.11\n",
    )
    .unwrap();
    let port = common::free_port();
    std::fs::write(
        d.join("named.conf"),
        format!(
            r#"include "{dir}/ddns.key";
options {{
    directory "{dir}";
    pid-file none;
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    notify no;
}};
controls {{ }};
zone "test" {{ type primary; file "test.zone"; update-policy {{ grant ddns-key zonesub ANY; }}; }};
"#,
            dir = d.display()
        ),
    )
    .unwrap();
    let child = Command::new(sbin("named"))
        .args(["-g", "-n", "1", "-c"])
        .arg(d.join("named.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(d.join("named.log")).unwrap(),
        ))
        .spawn()
        .expect("named is installed");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let p = Parent { addr, child, dir };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while rt
        .block_on(registrar::served_glue(
            addr,
            "example.test.",
            "ns1.example.test.",
        ))
        .map_or(true, |g| g.is_empty())
    {
        assert!(
            Instant::now() < deadline,
            "parent named did not start: {}",
            std::fs::read_to_string(p.dir.path().join("named.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p
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
