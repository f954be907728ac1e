//! Persistence of the live backend set. Every change is written to the state file
//! (write to a temporary file, fsync, rename over, fsync the directory) before the
//! admin call returns; on start the state file wins over `[[backend]]`, and a state
//! file that cannot be read stops start-up with a message naming it, never a silent
//! fallback to stale backends.
//!
//! Beside it, `<state file>.health` carries each backend's health from one process to
//! the next (written when a process stops or hands over to an upgrade, read at start
//! when it is fresh), so a restart or an upgrade neither sends queries to a backend
//! known to be down nor forgets that the others are up.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::backends::{Health, Member};

/// A health file older than this is ignored: what a process long gone knew.
pub const HEALTH_MAX_AGE_S: u64 = 60;

/// What `<state file>.health` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthFile {
    /// Unix seconds when it was written.
    pub written_at: u64,
    /// Each backend's health, by name and address.
    pub backends: Vec<CarriedHealth>,
}

/// One backend's health in a [`HealthFile`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedHealth {
    /// Name.
    pub name: String,
    /// Address: health is carried only to the same name at the same address.
    pub address: SocketAddr,
    /// Its health then.
    pub health: Health,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where the health beside `state` lives.
pub fn health_path(state: &Path) -> PathBuf {
    let mut p = state.as_os_str().to_owned();
    p.push(".health");
    PathBuf::from(p)
}

/// Writes the health beside `state` (atomically, like the state file).
pub fn save_health(state: &Path, backends: Vec<CarriedHealth>) -> Result<(), StateError> {
    let h = HealthFile {
        written_at: unix_now(),
        backends,
    };
    write_atomic(
        &health_path(state),
        &serde_json::to_vec_pretty(&h).expect("health serializes"),
    )
}

/// The health beside `state`, if it is there, readable and at most
/// [`HEALTH_MAX_AGE_S`] old. A bad file is not an error: health is then learnt anew.
pub fn load_health(state: &Path) -> Option<HealthFile> {
    let path = health_path(state);
    let text = fs::read_to_string(&path).ok()?;
    match serde_json::from_str::<HealthFile>(&text) {
        Ok(h) if unix_now().saturating_sub(h.written_at) <= HEALTH_MAX_AGE_S => Some(h),
        Ok(h) => {
            tracing::info!(
                path = %path.display(),
                age_s = unix_now().saturating_sub(h.written_at),
                "health file too old; every backend starts unknown"
            );
            None
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), "health file ignored: {e}");
            None
        }
    }
}

/// What the state file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    /// Generation of the set.
    pub generation: u64,
    /// The members in order.
    pub backends: Vec<Member>,
}

/// Failures reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// I/O on the file or its directory.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The file exists but is not a valid state file.
    #[error("state file {path} is corrupt: {reason} (fix or remove it; dnslb will not guess the backend set)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Reads the state file; `Ok(None)` if it does not exist.
pub fn load(path: &Path) -> Result<Option<StateFile>, StateError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Io {
                path: path.into(),
                source,
            })
        }
    };
    let state: StateFile = serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let specs: Vec<_> = state.backends.iter().map(|m| m.spec.clone()).collect();
    let problems = crate::config::validate_backends(&specs);
    if !problems.is_empty() {
        return Err(StateError::Corrupt {
            path: path.into(),
            reason: problems.join("; "),
        });
    }
    Ok(Some(state))
}

/// Writes the state file atomically and durably.
pub fn save(path: &Path, state: &StateFile) -> Result<(), StateError> {
    let mut body = serde_json::to_vec_pretty(state).expect("state serializes");
    body.push(b'\n');
    write_atomic(path, &body)
}

/// Temporary file, fsync, rename over `path`, fsync of the directory.
fn write_atomic(path: &Path, body: &[u8]) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: path.into(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = fs::File::create(&tmp).map_err(io)?;
    f.write_all(body).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    fs::rename(&tmp, path).map_err(io)?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::AdminState;
    use crate::config::BackendConfig;

    #[test]
    fn round_trip_and_corruption_is_reported_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        assert!(load(&path).unwrap().is_none());
        let state = StateFile {
            generation: 4,
            backends: vec![Member {
                spec: BackendConfig {
                    name: "ns1".into(),
                    address: "127.0.0.1:5301".parse().unwrap(),
                    weight: 2,
                },
                state: AdminState::Draining,
            }],
        };
        save(&path, &state).unwrap();
        assert_eq!(load(&path).unwrap(), Some(state));
        fs::write(&path, "{not json").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.contains("state.json") && err.contains("corrupt"),
            "{err}"
        );
    }

    #[test]
    fn health_is_carried_only_while_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        assert!(load_health(&state).is_none());
        let b = vec![CarriedHealth {
            name: "ns1".into(),
            address: "127.0.0.1:5301".parse().unwrap(),
            health: Health::Down,
        }];
        save_health(&state, b.clone()).unwrap();
        assert_eq!(load_health(&state).unwrap().backends, b);
        let old = HealthFile {
            written_at: unix_now() - HEALTH_MAX_AGE_S - 5,
            backends: b,
        };
        fs::write(health_path(&state), serde_json::to_vec(&old).unwrap()).unwrap();
        assert!(load_health(&state).is_none());
        fs::write(health_path(&state), "{not json").unwrap();
        assert!(load_health(&state).is_none());
    }
}
