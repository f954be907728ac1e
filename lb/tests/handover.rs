//! Restart and upgrade without a lost query, against real BIND under dnsperf load:
//! socket-activated restarts (a holder process does what systemd does: binds the
//! sockets once, execs dnslb with `LISTEN_FDS`, restarts it with SIGTERM then a new
//! start), SIGUSR2 upgrades, a failed upgrade, and pipelined TCP clients across
//! upgrades.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{config, dnslb_bin, dnsperf_summary, free_port, Dnslb, Dnsperf, Named};

/// dnsperf at `qps` for `seconds` against `dns`, in a thread.
fn load(dns: SocketAddr, dir: &Path, qps: u32, seconds: u32) -> std::thread::JoinHandle<Output> {
    let qfile = dir.join("queries.txt");
    std::fs::write(
        &qfile,
        "www.example.test A\nwww.example.test AAAA\nexample.test MX\nftp.example.test CNAME\nexample.test SOA\n",
    )
    .unwrap();
    let (port, qps, secs) = (dns.port().to_string(), qps.to_string(), seconds.to_string());
    std::thread::spawn(move || {
        Command::new("dnsperf")
            .args(["-s", "127.0.0.1", "-p", &port, "-d"])
            .arg(&qfile)
            .args(["-l", &secs, "-Q", &qps, "-c", "4", "-t", "3"])
            .output()
            .expect("dnsperf is installed")
    })
}

/// Joins a load and checks it lost nothing and got no SERVFAIL.
fn assert_nothing_lost(perf: std::thread::JoinHandle<Output>, min_sent: u64) -> Dnsperf {
    let out = perf.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let r = dnsperf_summary(&text);
    eprintln!("dnsperf: sent {} lost {} codes {}", r.sent, r.lost, r.codes);
    assert!(r.sent >= min_sent, "steady load: {text}");
    assert_eq!(r.lost, 0, "{text}");
    assert_eq!(r.servfail, 0, "{text}");
    r
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(") ").next().and_then(|r| r.chars().next()))
        .is_some_and(|state| state != 'Z')
}

fn kill(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -{sig} {pid}");
}

/// The holder (`tests/sd_holder.py`), talking over its stdin/stdout.
struct Holder {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Holder {
    fn start(dns: SocketAddr, config_path: &Path, log: &Path) -> Holder {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sd_holder.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--udp", &dns.to_string(), "--tcp", &dns.to_string(), "--"])
            .arg(dnslb_bin())
            .arg("--config")
            .arg(config_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
            .spawn()
            .expect("python3 is installed");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Holder {
            child,
            stdin,
            stdout,
        }
    }

    fn command(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    /// `start`/`restart`: the new main PID once it sent READY=1.
    fn ready(&mut self, cmd: &str, log: &Path) -> u32 {
        let out = self.command(cmd);
        out.strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "{cmd}: {out}\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            })
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "stop");
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
    }
}

/// A config file for a dnslb on fixed ports (a holder binds them before dnslb runs).
fn fixed_config(
    dir: &Path,
    dns: SocketAddr,
    backends: &[(&str, SocketAddr)],
    extra: &str,
) -> std::path::PathBuf {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let text = config(backends, extra)
        .replace("dns = [\"127.0.0.1:0\"]", &format!("dns = [\"{dns}\"]"))
        .replace("admin = \"127.0.0.1:0\"", &format!("admin = \"{admin}\""))
        + &format!("[state]\npath = \"{}\"\n", dir.join("state.json").display());
    let path = dir.join("dnslb.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn twenty_socket_activated_restarts_under_udp_load_lose_nothing() {
    let ns = [Named::start(), Named::start()];
    let dir = tempfile::tempdir().unwrap();
    let dns = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let cfg = fixed_config(dir.path(), dns, &[("a", ns[0].addr), ("b", ns[1].addr)], "");
    let log = dir.path().join("dnslb.log");
    let mut holder = Holder::start(dns, &cfg, &log);
    let mut pid = holder.ready("start", &log);
    let perf = load(dns, dir.path(), 10_000, 16);
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..20 {
        let next = holder.ready("restart", &log);
        assert_ne!(next, pid, "restart {i} started a new process");
        assert!(!pid_alive(pid), "the old process exited");
        pid = next;
        std::thread::sleep(Duration::from_millis(300));
    }
    let r = assert_nothing_lost(perf, 100_000);
    eprintln!(
        "20 socket-activated restarts: sent {}, lost {}",
        r.sent, r.lost
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("listening for UDP and TCP on {dns}")),
        "{text}"
    );
}

#[test]
fn passed_sockets_that_match_no_listen_address_stop_start_up_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let dns = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let other = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // The config listens on `other`; the holder passes sockets for `dns`.
    let cfg = fixed_config(dir.path(), other, &[], "");
    let log = dir.path().join("dnslb.log");
    let mut holder = Holder::start(dns, &cfg, &log);
    let out = holder.command("start");
    assert!(out.starts_with("error dnslb exited"), "{out}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("passed sockets do not match the configuration")
            && text.contains(&format!("UDP {dns}"))
            && text.contains(&format!("TCP {dns}"))
            && text.contains("matches no listen.dns address"),
        "{text}"
    );
}

/// The PID the last "handing over" line names, once there are `n` of them.
fn handed_over_to(lb: &Dnslb, n: usize) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lines: Vec<String> = lb
            .logs()
            .into_iter()
            .filter(|l| l.contains("handing over"))
            .collect();
        if lines.len() >= n {
            let l = &lines[n - 1];
            return l
                .split("pid=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("no pid in {l}"));
        }
        if let Some(l) = lb.logs().iter().find(|l| l.contains("upgrade failed")) {
            panic!("{l}");
        }
        assert!(Instant::now() < deadline, "upgrade {n}: {:#?}", lb.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while pid_alive(pid) {
        assert!(Instant::now() < deadline, "pid {pid} still runs");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn twenty_sigusr2_upgrades_under_udp_load_lose_nothing() {
    let ns = [Named::start(), Named::start()];
    let lb = Dnslb::start(&config(&[("a", ns[0].addr), ("b", ns[1].addr)], ""));
    let generation = lb.http("GET", "/v1/backends", None).1;
    let dir = tempfile::tempdir().unwrap();
    let perf = load(lb.dns, dir.path(), 10_000, 16);
    std::thread::sleep(Duration::from_millis(500));
    let mut pid = lb.pid() as u32;
    for i in 1..=20 {
        kill(pid, "USR2");
        let next = handed_over_to(&lb, i);
        assert_ne!(next, pid);
        wait_gone(pid);
        pid = next;
        std::thread::sleep(Duration::from_millis(300));
    }
    let r = assert_nothing_lost(perf, 100_000);
    eprintln!("20 SIGUSR2 upgrades: sent {}, lost {}", r.sent, r.lost);
    // The last one serves the same set, on the same admin address.
    let now: serde_json::Value =
        serde_json::from_str(&lb.http("GET", "/v1/backends", None).1).unwrap();
    let before: serde_json::Value = serde_json::from_str(&generation).unwrap();
    assert_eq!(now["generation"], before["generation"]);
    assert_eq!(now["backends"].as_array().unwrap().len(), 2);
    kill(pid, "TERM");
    wait_gone(pid);
}

#[test]
fn a_failed_upgrade_leaves_the_old_process_serving() {
    let ns = Named::start();
    let lb = Dnslb::start(&config(
        &[("a", ns.addr)],
        "[server]\nupgrade_binary = \"/bin/false\"\n",
    ));
    let dir = tempfile::tempdir().unwrap();
    let perf = load(lb.dns, dir.path(), 5_000, 4);
    std::thread::sleep(Duration::from_millis(500));
    lb.signal("USR2");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lb
        .logs()
        .iter()
        .any(|l| l.contains("upgrade failed, still serving"))
    {
        assert!(Instant::now() < deadline, "{:#?}", lb.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    let line = lb
        .logs()
        .into_iter()
        .find(|l| l.contains("upgrade failed"))
        .unwrap();
    assert!(line.contains("exited before it was ready"), "{line}");
    assert_nothing_lost(perf, 15_000);
    assert!(pid_alive(lb.pid() as u32));
    let (st, _) = lb.http("GET", "/healthz", None);
    assert_eq!(st, 200);
}

/// One pipelined TCP batch: the answers read before the connection ended.
fn tcp_batch(dns: SocketAddr, batch: usize) -> Result<usize, String> {
    let mut s = TcpStream::connect(dns).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    for i in 0..batch {
        let q = common::query(
            &format!("n{i}.wild.example.test."),
            hickory_proto::rr::RecordType::TXT,
            false,
        );
        out.extend_from_slice(&(q.len() as u16).to_be_bytes());
        out.extend_from_slice(&q);
    }
    s.write_all(&out).map_err(|e| format!("write: {e}"))?;
    let mut answered = 0;
    while answered < batch {
        let mut len = [0u8; 2];
        match s.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(answered),
            Err(e) => return Err(format!("after {answered} answers: {e}")),
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut msg)
            .map_err(|e| format!("after {answered} answers, mid-message: {e}"))?;
        answered += 1;
    }
    Ok(answered)
}

#[test]
fn pipelined_tcp_clients_get_every_answer_across_upgrades() {
    let ns = [Named::start(), Named::start()];
    let lb = Dnslb::start(&config(&[("a", ns[0].addr), ("b", ns[1].addr)], ""));
    let dns = lb.dns;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut full, mut closed, mut bad) = (0, 0, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match tcp_batch(dns, 10) {
                        Ok(10) => full += 1,
                        // Closed before reading the batch: a clean FIN, no answer owed.
                        Ok(0) => closed += 1,
                        Ok(n) => bad.push(format!("{n} of 10 answered, then FIN")),
                        Err(e) => bad.push(e),
                    }
                }
                (full, closed, bad)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut pid = lb.pid() as u32;
    for i in 1..=10 {
        kill(pid, "USR2");
        let next = handed_over_to(&lb, i);
        wait_gone(pid);
        pid = next;
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut full, mut closed) = (0, 0);
    for c in clients {
        let (f, c, bad) = c.join().unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        full += f;
        closed += c;
    }
    eprintln!("pipelined TCP across 10 upgrades: {full} batches answered in full, {closed} closed before any was read");
    assert!(full > 100, "{full}");
    kill(pid, "TERM");
    wait_gone(pid);
}

#[test]
fn an_upgrade_carries_health_to_the_next_process() {
    let mut ns = [Named::start(), Named::start()];
    let lb = Dnslb::start(&config(&[("a", ns[0].addr), ("b", ns[1].addr)], ""));
    ns[1].kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while lb.backend("b")["health"] != "down" || lb.backend("a")["health"] != "up" {
        assert!(Instant::now() < deadline, "{:?}", lb.backend("b"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = lb.pid() as u32;
    kill(pid, "USR2");
    let next = handed_over_to(&lb, 1);
    // Until the parent's admin API has stopped, either process may answer: wait for
    // the child's.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&lb.http("GET", "/v1/status", None).1).unwrap();
        if status["pid"] == next {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The child started from the health the parent left: the dead backend down (no
    // query was sent to it), the live one up; it never had to learn either anew.
    assert_eq!(lb.backend("b")["health"], "down");
    assert_eq!(lb.backend("a")["health"], "up");
    let logs = lb.logs();
    let after = logs
        .iter()
        .position(|l| l.contains("handing over"))
        .unwrap();
    let child_lines = &logs[after..];
    assert!(
        child_lines.iter().chain(&logs[..after]).any(|l| l
            .contains("carried over from the previous dnslb process")
            && l.contains("backend=b")),
        "{logs:#?}"
    );
    assert!(
        !child_lines
            .iter()
            .any(|l| l.contains("health checks failed in a row") && l.contains("backend=b")),
        "the child had to find b down by itself: {logs:#?}"
    );
    wait_gone(pid);
    kill(next, "TERM");
    wait_gone(next);
}

#[test]
fn a_stop_during_an_upgrade_stops_the_child_too() {
    let ns = Named::start();
    let dir = tempfile::tempdir().unwrap();
    // A "new binary" that starts and never becomes ready.
    let slow = dir.path().join("slow-dnslb");
    std::fs::write(
        &slow,
        "#!/bin/sh\necho $$ > \"$(dirname \"$0\")/child.pid\"\nexec sleep 60\n",
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&slow).status().unwrap();
    let mut lb = Dnslb::start(&config(
        &[("a", ns.addr)],
        &format!("[server]\nupgrade_binary = \"{}\"\n", slow.display()),
    ));
    lb.signal("USR2");
    let pidfile = dir.path().join("child.pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pidfile.exists() {
        assert!(Instant::now() < deadline, "the child never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let child: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(pid_alive(child));
    lb.signal("TERM");
    assert_eq!(
        lb.wait(Duration::from_secs(10)),
        Some(0),
        "{:#?}",
        lb.logs()
    );
    assert!(
        lb.logs()
            .iter()
            .any(|l| l.contains("stop requested during the upgrade")),
        "{:#?}",
        lb.logs()
    );
    wait_gone(child);
}
