//! Provisioning with `ansible-playbook`: an inventory generated for the run (JSON,
//! which Ansible reads as YAML) in `<state_dir>/runs/<rollout>/`, never a file of the
//! repository; the output goes to `ansible.log` beside it, and its tail into the error
//! when the playbook fails.
//!
//! The playbook runs in its own process group under a deadline (`[ansible]
//! timeout_s`): when the deadline passes, the whole group (ansible-playbook and the
//! ssh and module processes it started) gets SIGTERM, then SIGKILL after
//! [`KILL_GRACE`], and the run fails with [`AnsibleError::Timeout`].

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Map, Value};

/// How long the process group has between SIGTERM and SIGKILL after a timeout.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// Provisioning failures.
#[derive(Debug, thiserror::Error)]
pub enum AnsibleError {
    /// Could not start or write files.
    #[error("ansible: {0}")]
    Io(#[from] std::io::Error),
    /// The playbook failed.
    #[error("ansible-playbook failed (exit {code:?}); full log {log}; last lines:\n{tail}")]
    Failed {
        /// Exit code.
        code: Option<i32>,
        /// Log path.
        log: PathBuf,
        /// The end of the output.
        tail: String,
    },
    /// The playbook ran longer than `[ansible] timeout_s` and was killed.
    #[error(
        "ansible-playbook did not finish within {secs}s ([ansible] timeout_s) and was killed with its process group; full log {log}; last lines:\n{tail}"
    )]
    Timeout {
        /// The limit.
        secs: u64,
        /// Log path.
        log: PathBuf,
        /// The end of the output.
        tail: String,
    },
}

/// One host to provision.
pub struct Host {
    /// Inventory name (the instance label).
    pub name: String,
    /// Its variables.
    pub vars: Map<String, Value>,
}

/// The last 25 lines of the log.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// Sends `sig` to every process of group `pgid` (no error if it is gone).
fn signal_group(pgid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args(["-s", sig, "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
}

/// Which play of the playbook a host belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// `nameservers` (roles common, nameserver).
    Nameservers,
    /// `load_balancers` (roles common, dnslb).
    LoadBalancers,
}

/// Writes the inventory and runs the playbook on `hosts` (all in `group`), killing it
/// (and its process group) when it runs longer than `timeout`.
pub async fn provision(
    command: &str,
    playbook: &Path,
    run_dir: &Path,
    hosts: &[Host],
    group: Group,
    timeout: Duration,
) -> Result<(), AnsibleError> {
    std::fs::create_dir_all(run_dir)?;
    let mut members = Map::new();
    for h in hosts {
        members.insert(h.name.clone(), Value::Object(h.vars.clone()));
    }
    let (nameservers, load_balancers) = match group {
        Group::Nameservers => (members, Map::new()),
        Group::LoadBalancers => (Map::new(), members),
    };
    let inventory = json!({
        "all": { "children": {
            "nameservers": { "hosts": nameservers },
            "load_balancers": { "hosts": load_balancers },
        }}
    });
    let inv_path = run_dir.join("inventory.json");
    std::fs::write(
        &inv_path,
        serde_json::to_vec_pretty(&inventory).expect("serializes"),
    )?;
    let log = run_dir.join("ansible.log");
    // stdout and stderr share one open file (and so one offset): lines interleave as
    // they were written, and the log can be followed while the playbook runs.
    let out = std::fs::File::create(&log)?;
    let limit: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    let mut child = tokio::process::Command::new(command)
        .arg("-i")
        .arg(&inv_path)
        .arg(playbook)
        .arg("--limit")
        .arg(limit.join(","))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "False")
        .env("ANSIBLE_LOCALHOST_WARNING", "False")
        .env("ANSIBLE_INVENTORY_UNPARSED_WARNING", "False")
        .env("ANSIBLE_HOST_KEY_CHECKING", "True")
        .env("ANSIBLE_FORKS", "10")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        // Its own process group, so that a timeout can end everything it started.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let pgid = child.id();
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => status?,
        Err(_) => {
            if let Some(pgid) = pgid {
                signal_group(pgid, "TERM");
                if tokio::time::timeout(KILL_GRACE, child.wait())
                    .await
                    .is_err()
                {
                    signal_group(pgid, "KILL");
                }
                // Stragglers of the group that outlived the leader get SIGKILL too.
                signal_group(pgid, "KILL");
            }
            let _ = child.wait().await;
            return Err(AnsibleError::Timeout {
                secs: timeout.as_secs(),
                tail: tail(&log),
                log,
            });
        }
    };
    if status.success() {
        return Ok(());
    }
    Err(AnsibleError::Failed {
        code: status.code(),
        tail: tail(&log),
        log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    /// A stand-in for ansible-playbook: `body` as a shell script.
    fn fake_command(dir: &Path, body: &str) -> String {
        let path = dir.join("fake-ansible-playbook");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    fn alive(pid: &str) -> bool {
        // A zombie (reaped later by init) counts as gone.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(") ").next().map(|r| !r.starts_with('Z')))
            .unwrap_or(false)
    }

    fn host() -> Vec<Host> {
        vec![Host {
            name: "ns1-next".into(),
            vars: Map::new(),
        }]
    }

    #[tokio::test]
    async fn a_playbook_that_runs_too_long_is_killed_with_its_process_group() {
        let d = tempfile::tempdir().unwrap();
        // It starts a grandchild in the same group, as ansible-playbook starts ssh,
        // and ignores nothing: both must be gone after the timeout.
        let cmd = fake_command(
            d.path(),
            &format!(
                "echo provisioning started\nsleep 300 &\necho $! > {dir}/child.pid\necho $$ > {dir}/leader.pid\nwait",
                dir = d.path().display()
            ),
        );
        let t0 = Instant::now();
        let err = provision(
            &cmd,
            Path::new("playbook.yml"),
            &d.path().join("run"),
            &host(),
            Group::Nameservers,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(4), "took {took:?}");
        let msg = err.to_string();
        assert!(
            matches!(err, AnsibleError::Timeout { secs: 1, .. }),
            "{msg}"
        );
        assert!(
            msg.contains("did not finish within 1s") && msg.contains("provisioning started"),
            "{msg}"
        );
        let leader = std::fs::read_to_string(d.path().join("leader.pid")).unwrap();
        let child = std::fs::read_to_string(d.path().join("child.pid")).unwrap();
        assert!(!alive(leader.trim()), "ansible-playbook still runs");
        // The group was signalled: the grandchild is gone within moments.
        let t = Instant::now();
        while alive(child.trim()) && t.elapsed() < Duration::from_secs(2) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(child.trim()), "a process it started survived");
    }

    #[tokio::test]
    async fn a_playbook_that_ignores_sigterm_is_killed_after_the_grace() {
        let d = tempfile::tempdir().unwrap();
        let cmd = fake_command(d.path(), "trap '' TERM\nwhile :; do sleep 0.1; done");
        let t0 = Instant::now();
        let err = provision(
            &cmd,
            Path::new("playbook.yml"),
            &d.path().join("run"),
            &host(),
            Group::Nameservers,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, AnsibleError::Timeout { .. }), "{err}");
        let took = t0.elapsed();
        assert!(
            took >= KILL_GRACE && took < KILL_GRACE + Duration::from_secs(4),
            "took {took:?}"
        );
    }

    #[tokio::test]
    async fn success_and_failure_within_the_timeout() {
        let d = tempfile::tempdir().unwrap();
        let ok = fake_command(d.path(), "echo \"$@\"");
        provision(
            &ok,
            Path::new("playbook.yml"),
            &d.path().join("run"),
            &host(),
            Group::Nameservers,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        let logged = std::fs::read_to_string(d.path().join("run/ansible.log")).unwrap();
        assert!(logged.contains("--limit ns1-next"), "{logged}");
        let bad = fake_command(d.path(), "echo to stdout\necho to stderr >&2\nexit 3");
        let err = provision(
            &bad,
            Path::new("playbook.yml"),
            &d.path().join("run"),
            &host(),
            Group::Nameservers,
            Duration::from_secs(30),
        )
        .await
        .unwrap_err();
        match err {
            AnsibleError::Failed { code, tail, .. } => {
                assert_eq!(code, Some(3));
                assert!(
                    tail.contains("to stdout") && tail.contains("to stderr"),
                    "{tail}"
                );
            }
            other => panic!("{other}"),
        }
    }
}
