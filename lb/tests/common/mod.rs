//! Test harness: real `named` processes and the real `dnslb` binary on loopback ports,
//! each cleaned up in `Drop`; plus small DNS clients built on hickory-proto.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use hickory_proto::serialize::binary::BinEncodable;

/// The zone every test backend serves.
pub fn zone_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ansible/zones/example.test.zone")
}

/// A loopback port free for both UDP and TCP. Ports come from 20000-31999, below the
/// kernel's ephemeral range (32768 and up), so no client socket (ours, dig's, named's)
/// can be handed the port between this check and the server binding it; and each
/// port is offered at most once per test process, so tests running in parallel never
/// get the same one. The start is spread by process ID across test binaries.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const BASE: u32 = 20000;
    const SPAN: u32 = 12000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (BASE + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free loopback port in {BASE}..{}", BASE + SPAN);
}

/// A real BIND process serving example.test on 127.0.0.1.
pub struct Named {
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Named {
    pub fn start() -> Named {
        Named::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Named {
        Named::start_serving(port, &std::fs::read_to_string(zone_file()).unwrap())
    }

    /// A named on `port` serving `zone` (the text of a zone file) as example.test.
    pub fn start_serving(port: u16, zone: &str) -> Named {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("example.test.zone"), zone).unwrap();
        let conf = format!(
            r#"options {{
    directory "{dir}";
    pid-file none;
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    notify no;
    minimal-responses no;
    rate-limit {{ responses-per-second 0; }};
}};
controls {{ }};
zone "example.test" {{ type primary; file "example.test.zone"; }};
"#,
            dir = d.display()
        );
        std::fs::write(d.join("named.conf"), conf).unwrap();
        let child = Command::new(named_bin())
            .args(["-g", "-n", "1", "-c"])
            .arg(d.join("named.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(d.join("named.log")).unwrap(),
            ))
            .spawn()
            .expect("named is installed (apt-get install bind9)");
        let mut n = Named {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: Some(child),
            dir,
        };
        n.wait_ready();
        n
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("named exited with {st}: {}", self.log());
            }
            if let Ok(m) = udp_query(
                self.addr,
                &query("example.test.", RecordType::SOA, false),
                Duration::from_millis(200),
            ) {
                if m.authoritative {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("named did not answer on {}: {}", self.addr, self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("named.log")).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let n = Named::start_on(self.addr.port());
        *self = n;
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        self.kill();
    }
}

fn named_bin() -> &'static str {
    if Path::new("/usr/sbin/named").exists() {
        "/usr/sbin/named"
    } else {
        "named"
    }
}

/// The dnslb binary: cargo's own when this file is compiled into dnslb's tests;
/// otherwise (the deployer's tests share this harness) the workspace's debug build,
/// built on first use.
pub fn dnslb_bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_dnslb") {
        return PathBuf::from(p);
    }
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let st = Command::new(cargo)
                .args(["build", "-q", "-p", "dnslb", "--bin", "dnslb"])
                .current_dir(&root)
                .status()
                .expect("cargo runs");
            assert!(st.success(), "building dnslb failed");
            root.join("target/debug/dnslb")
        })
        .clone()
}

/// The real dnslb binary with a generated config.
pub struct Dnslb {
    pub dns: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// Config text for backends (name, addr).
pub fn config(backends: &[(&str, SocketAddr)], extra: &str) -> String {
    let mut c = format!(
        r#"[listen]
dns = ["127.0.0.1:0"]
admin = "127.0.0.1:0"
[health]
query_name = "example.test."
interval_ms = 200
timeout_ms = 200
{extra}
"#
    );
    for (name, addr) in backends {
        c.push_str(&format!(
            "[[backend]]\nname = \"{name}\"\naddress = \"{addr}\"\n"
        ));
    }
    c
}

impl Dnslb {
    pub fn start(config_text: &str) -> Dnslb {
        let dir = tempfile::tempdir().unwrap();
        Dnslb::start_in(dir, config_text)
    }

    /// Starts with `config_text` (a `[state]` path in `dir` is added unless present).
    pub fn start_in(dir: tempfile::TempDir, config_text: &str) -> Dnslb {
        let mut text = config_text.to_string();
        if !text.contains("[state]") {
            text.push_str(&format!(
                "[state]\npath = \"{}\"\n",
                dir.path().join("state.json").display()
            ));
        }
        std::fs::write(dir.path().join("dnslb.toml"), &text).unwrap();
        let mut child = Command::new(dnslb_bin())
            .arg("--config")
            .arg(dir.path().join("dnslb.toml"))
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line.clone());
                log2.lock().unwrap().push(line);
            }
        });
        let (mut dns, mut admin) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(20);
        while dns.is_none() || admin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("dnslb did not start: {:?}", log.lock().unwrap()));
            if let Some(rest) = line.split("listening for UDP and TCP on ").nth(1) {
                dns = Some(rest.split_whitespace().next().unwrap().parse().unwrap());
            }
            if let Some(rest) = line.split("admin API listening on http://").nth(1) {
                admin = Some(rest.trim().parse().unwrap());
            }
        }
        Dnslb {
            dns: dns.unwrap(),
            admin: admin.unwrap(),
            dir,
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
    }

    pub fn alive(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Waits for exit and returns the exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().unwrap();
        while Instant::now() < deadline {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn logs(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Takes the state directory, stopping the process (for restart tests).
    pub fn stop(mut self) -> tempfile::TempDir {
        self.signal("TERM");
        self.wait(Duration::from_secs(10));
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    /// A blocking HTTP request to the admin API; returns (status, body).
    pub fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        http(self.admin, method, path, body, None)
    }

    /// `GET /v1/backends/<name>`, parsed.
    pub fn backend(&self, name: &str) -> serde_json::Value {
        let body = self.http("GET", &format!("/v1/backends/{name}"), None).1;
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }
}

impl Drop for Dnslb {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Minimal HTTP/1.1 client (one request per connection).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    // Chunked bodies: strip chunk sizes crudely (axum sends content-length for JSON).
    (status, body)
}

/// Builds a query.
pub fn query(name: &str, rtype: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::new(fastrand::u16(..), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = false;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m.to_bytes().unwrap()
}

pub fn udp_query_raw(server: SocketAddr, q: &[u8], limit: Duration) -> std::io::Result<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(limit))?;
    s.send_to(q, server)?;
    let mut buf = vec![0u8; 65535];
    let (n, _) = s.recv_from(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

pub fn udp_query(server: SocketAddr, q: &[u8], limit: Duration) -> std::io::Result<Message> {
    let b = udp_query_raw(server, q, limit)?;
    Message::from_vec(&b).map_err(|e| std::io::Error::other(e.to_string()))
}

pub fn tcp_query_raw(server: SocketAddr, q: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(server)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write_frame(&mut s, q)?;
    read_frame(&mut s)
}

/// `q` with its two-byte length prefix (RFC 1035 4.2.2).
pub fn frame(q: &[u8]) -> Vec<u8> {
    let mut b = (q.len() as u16).to_be_bytes().to_vec();
    b.extend_from_slice(q);
    b
}

pub fn write_frame(s: &mut TcpStream, q: &[u8]) -> std::io::Result<()> {
    s.write_all(&frame(q))
}

pub fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// A comparable form of an answer: header bytes after the ID, then each section's
/// records as sorted text (BIND may rotate RRset order between two answers).
pub fn canonical(msg: &[u8]) -> (Vec<u8>, Vec<Vec<String>>) {
    let m = Message::from_vec(msg).expect("answer parses");
    let section = |rs: &[hickory_proto::rr::Record]| {
        let mut v: Vec<String> = rs.iter().map(|r| r.to_string()).collect();
        v.sort();
        v
    };
    let edns = m
        .edns
        .as_ref()
        .map(|e| format!("{e:?}"))
        .into_iter()
        .collect();
    (
        msg[2..12].to_vec(),
        vec![
            m.queries.iter().map(|q| q.to_string()).collect(),
            section(&m.answers),
            section(&m.authorities),
            section(&m.additionals),
            edns,
        ],
    )
}

/// Runs a command and returns stdout; panics with stderr on failure.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Polls `f` until it returns true or `limit` passes.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The summary numbers dnsperf prints.
#[derive(Debug, Clone, Default)]
pub struct Dnsperf {
    pub sent: u64,
    pub completed: u64,
    pub lost: u64,
    /// Answers with RCODE SERVFAIL.
    pub servfail: u64,
    /// The "Response codes:" line.
    pub codes: String,
}

/// Parses dnsperf's output; panics (showing it) if a number is missing.
pub fn dnsperf_summary(out: &str) -> Dnsperf {
    let num = |key: &str| -> u64 {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{key} in dnsperf output:\n{out}"))
    };
    let codes = out
        .lines()
        .find(|l| l.contains("Response codes:"))
        .unwrap_or("")
        .trim()
        .to_string();
    let servfail = codes
        .split("SERVFAIL ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .map_or(0, |n| n.parse().expect("SERVFAIL count"));
    Dnsperf {
        sent: num("Queries sent:"),
        completed: num("Queries completed:"),
        lost: num("Queries lost:"),
        servfail,
        codes,
    }
}

/// `GET /metrics` of a running dnslb.
pub fn scrape(lb: &Dnslb) -> String {
    let (st, body) = lb.http("GET", "/metrics", None);
    assert_eq!(st, 200);
    body
}

/// The sum of metric `name` over the series whose labels include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
