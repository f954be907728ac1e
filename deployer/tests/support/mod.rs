//! What the deployer's end-to-end tests share: the repository root and a runner for
//! the real `deployer` binary.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The repository root (for ansible/ and the zones).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// dig, through a load balancer, gets www.example.test's records.
pub fn assert_answers_through(dns: std::net::SocketAddr) {
    let out = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &dns.port().to_string(),
            "+short",
            "www.example.test.",
        ])
        .output()
        .expect("dig is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("192.0.2.20"), "dig through {dns}: {text}");
}

/// Runs `deployer --config <config>` with extra environment; output must never
/// contain `secret`.
pub struct Cli {
    /// The config file.
    pub config: PathBuf,
    /// Extra environment variables.
    pub env: Vec<(&'static str, String)>,
    /// A string no output may contain (an API token).
    pub secret: Option<&'static str>,
}

impl Cli {
    /// The command, ready to spawn.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_deployer"));
        c.arg("--config").arg(&self.config).args(args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs to completion; checks the secret never shows.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().unwrap();
        if let Some(secret) = self.secret {
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                !all.contains(secret),
                "secret leaked in the output of {args:?}"
            );
        }
        out
    }

    /// Runs and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "deployer {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

/// dnsperf in 3-second rounds until stopped; sums sent/lost/SERVFAIL.
pub struct Load {
    handle: std::thread::JoinHandle<(u64, u64, u64, String)>,
    stop: Arc<AtomicBool>,
}

impl Load {
    /// Stops after the round in progress: (sent, lost, SERVFAIL, each round's codes).
    pub fn finish(self) -> (u64, u64, u64, String) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap()
    }
}

/// Starts dnsperf against `dns` (1500 qps, 2 clients) with a few of the zone's names.
pub fn start_load(dns: SocketAddr, dir: &Path) -> Load {
    let qfile = dir.join("queries.txt");
    std::fs::write(&qfile, "www.example.test A\nexample.test SOA\nexample.test MX\nftp.example.test CNAME\nx.wild.example.test TXT\n").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let handle = std::thread::spawn(move || {
        let (mut sent, mut lost, mut servfail, mut log) = (0, 0, 0, String::new());
        while !stop2.load(Ordering::SeqCst) {
            let out = Command::new("dnsperf")
                .args(["-s", "127.0.0.1", "-p", &dns.port().to_string(), "-d"])
                .arg(&qfile)
                .args(["-l", "3", "-Q", "1500", "-c", "2", "-t", "3"])
                .output()
                .expect("dnsperf is installed");
            let r = crate::common::dnsperf_summary(&String::from_utf8_lossy(&out.stdout));
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

/// A TCP relay in front of a load balancer's admin API that a test can take down:
/// while down it closes every connection it has and every new one at once, as a
/// crashed or unreachable API would.
pub struct AdminProxy {
    /// Where the deployer is pointed.
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl AdminProxy {
    /// Relays to `target`, up.
    pub fn start(target: SocketAddr) -> AdminProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (up2, stop2) = (up.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = conn else { continue };
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let up = up2.clone();
                    std::thread::spawn(move || pump(from, to, &up));
                }
            }
        });
        AdminProxy { addr, up, stop }
    }

    /// Takes the API away (`false`) or gives it back.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, up: &AtomicBool) {
    from.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = [0u8; 16384];
    while up.load(Ordering::SeqCst) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

impl Drop for AdminProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}
