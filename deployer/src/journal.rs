//! The journal and the lock, both in the state directory.
//!
//! The journal (`journal.json`, rewritten atomically and fsynced) records the current
//! operation: its phase, every step before and after it runs, the instances found
//! (old) and created (new) with their provider IDs, and each load balancer's set before
//! the swap. A killed deployer leaves it behind; the next `rollout` finishes the
//! operation, `rollback` undoes it.
//!
//! The lock (`lock`) is an advisory `flock` held for the whole command, so it dies with
//! the process; the file also names its holder (pid, host, start time, command) so a
//! refused second run can say who holds it, and a run that finds a holder recorded but
//! no lock held knows the holder died and takes over with a warning.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::lbclient::BackendSet;
use crate::provider::Instance;

/// Where an operation stands. Ordered: a phase implies every earlier one is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// 1: create `<name>-next`.
    Create,
    /// 2: ansible-playbook.
    Provision,
    /// 3: verify each new server directly.
    Verify,
    /// 4: swap the load balancers.
    Swap,
    /// 5: verify through the load balancers over the bake window.
    Bake,
    /// 6: delete the old servers.
    DeleteOld,
    /// 7: rename `<name>-next` to `<name>`.
    Rename,
    /// Finished.
    Done,
    /// Undone.
    RolledBack,
    /// Undoing: journaled before the rollback touches anything, so a rollout found
    /// here finishes the rollback and never goes forward.
    RollingBack,
}

impl Phase {
    /// Step number and name, for progress lines.
    pub fn label(self) -> &'static str {
        match self {
            Phase::Create => "1/7 create",
            Phase::Provision => "2/7 provision",
            Phase::Verify => "3/7 verify",
            Phase::Swap => "4/7 swap",
            Phase::Bake => "5/7 bake",
            Phase::DeleteOld => "6/7 delete-old",
            Phase::Rename => "7/7 rename",
            Phase::Done => "done",
            Phase::RolledBack => "rolled back",
            Phase::RollingBack => "rolling back",
        }
    }
}

/// One journal event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unix seconds.
    pub at: u64,
    /// Which step.
    pub step: String,
    /// started / done / failed.
    pub status: String,
    /// Details (errors).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// The journal of one rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// Rollout ID.
    pub id: String,
    /// Unix seconds.
    pub started_at: u64,
    /// Current phase.
    pub phase: Phase,
    /// The live servers when the rollout began, by nameserver.
    pub old: BTreeMap<String, Instance>,
    /// The servers created, by nameserver.
    pub new: BTreeMap<String, Instance>,
    /// Each load balancer's set before the swap.
    pub lb_before: BTreeMap<String, BackendSet>,
    /// The generation the swap's own PUT returned, by load balancer: what a restore
    /// expects to find (anything else means someone changed it since).
    #[serde(default)]
    pub lb_after: BTreeMap<String, u64>,
    /// Load balancers whose bake passed (canary order bakes them one at a time).
    #[serde(default)]
    pub baked: Vec<String>,
    /// Where the rollout stood when its rollback began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_from: Option<Phase>,
    /// Why it is being rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Every step, before and after.
    pub events: Vec<Event>,
}

/// Reads a JSON state file, if it exists.
pub fn load_json<T: serde::de::DeserializeOwned>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is corrupt: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes a JSON state file atomically and durably (temporary file, fsync, rename,
/// fsync of the directory).
pub fn save_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(value).expect("serializes"))?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Unix seconds now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Journal {
    /// A fresh journal.
    pub fn new() -> Self {
        let t = now();
        Journal {
            id: format!("r{t}-{:04x}", fastrand::u16(..)),
            started_at: t,
            phase: Phase::Create,
            old: BTreeMap::new(),
            new: BTreeMap::new(),
            lb_before: BTreeMap::new(),
            lb_after: BTreeMap::new(),
            baked: Vec::new(),
            rollback_from: None,
            failure: None,
            events: Vec::new(),
        }
    }

    /// Is there something left to finish or undo?
    pub fn unfinished(&self) -> bool {
        !matches!(self.phase, Phase::Done | Phase::RolledBack)
    }

    fn path(dir: &Path) -> PathBuf {
        dir.join("journal.json")
    }

    /// Reads the journal, if any.
    pub fn load(dir: &Path) -> std::io::Result<Option<Journal>> {
        load_json(&Self::path(dir))
    }

    /// Writes it atomically and durably.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        save_json(&Self::path(dir), self)
    }

    /// Records an event and saves.
    pub fn record(
        &mut self,
        dir: &Path,
        step: &str,
        status: &str,
        detail: &str,
    ) -> std::io::Result<()> {
        self.events.push(Event {
            at: now(),
            step: step.into(),
            status: status.into(),
            detail: detail.into(),
        });
        self.save(dir)
    }

    /// Moves a finished journal aside (kept as history).
    pub fn archive(&self, dir: &Path) -> std::io::Result<()> {
        archive(&Self::path(dir), dir, &self.id)
    }
}

/// Moves a finished journal file to `<dir>/history/<id>.json`.
pub fn archive(path: &Path, dir: &Path, id: &str) -> std::io::Result<()> {
    let hist = dir.join("history");
    std::fs::create_dir_all(&hist)?;
    std::fs::rename(path, hist.join(format!("{id}.json")))
}

impl Default for Journal {
    fn default() -> Self {
        Self::new()
    }
}

/// Who holds the lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Process ID.
    pub pid: u32,
    /// Hostname.
    pub host: String,
    /// Unix seconds.
    pub since: u64,
    /// The command.
    pub command: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on host {} running `deployer {}` since {}",
            self.pid,
            self.host,
            self.command,
            rfc3339(self.since)
        )
    }
}

/// RFC 3339 UTC time of a Unix timestamp (civil-from-days, proleptic Gregorian).
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86400) as i64;
    let secs = unix % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Lock failures.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Someone else runs.
    #[error("another deployer holds the lock {path}: {holder}")]
    Held {
        /// The lock file.
        path: PathBuf,
        /// Who.
        holder: String,
    },
    /// I/O.
    #[error("lock {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// A held lock; released on drop (and by the kernel if the process dies).
pub struct Lock {
    file: File,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl Lock {
    /// Takes the lock for `command`, or says who holds it.
    pub fn acquire(dir: &Path, command: &str) -> Result<Lock, LockError> {
        let path = dir.join("lock");
        let io = |e| LockError::Io(path.clone(), e);
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut text = String::new();
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let _ = file.read_to_string(&mut text);
                let holder = serde_json::from_str::<Holder>(&text)
                    .map(|h| h.to_string())
                    .unwrap_or_else(|_| "an unknown process".into());
                return Err(LockError::Held { path, holder });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        file.read_to_string(&mut text).map_err(io)?;
        if let Ok(stale) = serde_json::from_str::<Holder>(&text) {
            eprintln!("deployer: warning: taking over a stale lock: its holder, {stale}, is no longer running");
        }
        let me = Holder {
            pid: std::process::id(),
            host: hostname(),
            since: now(),
            command: command.into(),
        };
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        file.write_all(serde_json::to_string(&me).expect("serializes").as_bytes())
            .map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(Lock { file })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // An empty file means "released cleanly"; then the kernel lock goes.
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_is_right() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_083_199), "2026-11-30T23:59:59Z");
    }

    #[test]
    fn journal_round_trips_and_phases_order() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::new();
        j.record(d.path(), "create", "started", "").unwrap();
        assert_eq!(Journal::load(d.path()).unwrap().unwrap(), j);
        assert!(Phase::Swap < Phase::DeleteOld);
        j.phase = Phase::Done;
        assert!(!j.unfinished());
    }

    #[test]
    fn lock_refuses_a_second_holder_and_takes_over_a_stale_one() {
        let d = tempfile::tempdir().unwrap();
        let l = Lock::acquire(d.path(), "rollout").unwrap();
        let e = Lock::acquire(d.path(), "rollout")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&format!("pid {}", std::process::id())) && e.contains("rollout"),
            "{e}"
        );
        drop(l);
        // A holder recorded but no lock held: a dead process.
        std::fs::write(
            d.path().join("lock"),
            r#"{"pid":999999,"host":"x","since":1,"command":"rollout"}"#,
        )
        .unwrap();
        assert!(Lock::acquire(d.path(), "rollout").is_ok());
    }
}
