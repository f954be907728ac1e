//! A real BIND serving a parent zone (`test.`) that delegates `example.test.`, with
//! `update-policy` granting a TSIG key made by `tsig-keygen`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common;
use deployer::registrar;

pub struct Parent {
    pub addr: SocketAddr,
    child: Child,
    pub dir: tempfile::TempDir,
}

impl Drop for Parent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn sbin(tool: &str) -> String {
    let p = format!("/usr/sbin/{tool}");
    if Path::new(&p).exists() {
        p
    } else {
        tool.into()
    }
}

pub fn keygen(path: &Path) {
    let out = Command::new(sbin("tsig-keygen"))
        .args(["-a", "hmac-sha256", "ddns-key"])
        .output()
        .expect("tsig-keygen (bind9) is installed");
    assert!(out.status.success());
    std::fs::write(path, out.stdout).unwrap();
}

/// A BIND serving `test.` from `zone` (its text), with `update-policy` for the
/// TSIG key in `<dir>/ddns.key`; returns once it serves the delegation of
/// example.test.
pub fn start_parent_with(zone: &str) -> Parent {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    keygen(&d.join("ddns.key"));
    std::fs::write(d.join("test.zone"), zone).unwrap();
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
