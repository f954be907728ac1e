//! Persistence of the live backend set. Every change is written to the state file
//! (write to a temporary file, fsync, rename over, fsync the directory) before the
//! admin call returns; on start the state file wins over `[[backend]]`, and a state
//! file that cannot be read stops start-up with a message naming it, never a silent
//! fallback to stale backends.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backends::Member;

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
    let io = |source| StateError::Io {
        path: path.into(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io)?;
    let tmp = path.with_extension("json.tmp");
    let mut f = fs::File::create(&tmp).map_err(io)?;
    let mut body = serde_json::to_vec_pretty(state).expect("state serializes");
    body.push(b'\n');
    f.write_all(&body).map_err(io)?;
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
}
