//! Provisioning with `ansible-playbook`: an inventory generated for the run (JSON,
//! which Ansible reads as YAML) in `<state_dir>/runs/<rollout>/`, never a file of the
//! repository; the output goes to `ansible.log` beside it, and its tail into the error
//! when the playbook fails.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

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
}

/// One host to provision.
pub struct Host {
    /// Inventory name (the instance label).
    pub name: String,
    /// Its variables.
    pub vars: Map<String, Value>,
}

/// Writes the inventory and runs the playbook on `hosts` (group `nameservers`).
pub async fn provision(
    command: &str,
    playbook: &Path,
    run_dir: &Path,
    hosts: &[Host],
) -> Result<(), AnsibleError> {
    std::fs::create_dir_all(run_dir)?;
    let mut nameservers = Map::new();
    for h in hosts {
        nameservers.insert(h.name.clone(), Value::Object(h.vars.clone()));
    }
    let inventory = json!({
        "all": { "children": {
            "nameservers": { "hosts": nameservers },
            "load_balancers": { "hosts": {} },
        }}
    });
    let inv_path = run_dir.join("inventory.json");
    std::fs::write(
        &inv_path,
        serde_json::to_vec_pretty(&inventory).expect("serializes"),
    )?;
    let log = run_dir.join("ansible.log");
    let limit: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    let out = tokio::process::Command::new(command)
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
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    let mut text = String::from_utf8_lossy(&out.stdout).to_string();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    std::fs::write(&log, &text)?;
    if out.status.success() {
        return Ok(());
    }
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(25)..].join("\n");
    Err(AnsibleError::Failed {
        code: out.status.code(),
        log,
        tail,
    })
}
