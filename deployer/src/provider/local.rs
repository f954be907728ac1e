//! The local provider: each "VM" is a real `named` process on 127.0.0.1 with its own
//! directory `<state_dir>/local/<label>/` and its own port. Creating one makes the
//! directory and reserves a port (recorded in `instance.json`); the Ansible
//! `nameserver` role (connection local) writes `named.conf` and the zones there and
//! starts `named` with only relative paths, so renaming the directory (the rename step)
//! leaves the running process intact. Deleting stops the process and removes the
//! directory.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::{rollout_tag, Instance, Provider, ProviderError, MANAGED_TAG};
use crate::config::LoadBalancer;

/// Local instances under one directory.
pub struct Local {
    root: PathBuf,
    zones_dir: PathBuf,
}

const META: &str = "instance.json";

impl Local {
    /// Instances live in `<state_dir>/local`.
    pub fn new(state_dir: &Path, zones_dir: &Path) -> Self {
        Local {
            root: state_dir.join("local"),
            zones_dir: zones_dir.to_path_buf(),
        }
    }

    fn dir(&self, label: &str) -> PathBuf {
        self.root.join(label)
    }

    fn read(&self, label: &str) -> Result<Option<Instance>, ProviderError> {
        let path = self.dir(label).join(META);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mut inst: Instance = serde_json::from_str(&text)
                    .map_err(|e| ProviderError::Api(format!("{}: {e}", path.display())))?;
                // The directory name is the label: a rename is one atomic directory
                // rename, whatever instance.json still says.
                inst.label = label.to_string();
                inst.status = if named_running(&self.dir(label)) {
                    "running"
                } else {
                    "stopped"
                }
                .into();
                Ok(Some(inst))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn write(&self, inst: &Instance) -> Result<(), ProviderError> {
        let dir = self.dir(&inst.label);
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join("instance.json.tmp");
        let mut stored = inst.clone();
        stored.status = "created".into();
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&stored).expect("serializes"),
        )?;
        std::fs::rename(&tmp, dir.join(META))?;
        Ok(())
    }

    fn all(&self) -> Result<Vec<Instance>, ProviderError> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e.into()),
        };
        for e in entries.flatten() {
            if let Some(label) = e.file_name().to_str() {
                if let Some(inst) = self.read(label)? {
                    out.push(inst);
                }
            }
        }
        out.sort_by(|a, b| a.label.cmp(&b.label));
        Ok(out)
    }

    /// A loopback port for a new instance: not used by another instance, and free for
    /// UDP and TCP now. Taken from 20000-31999, below the kernel's ephemeral range
    /// (32768 and up), so that no client socket is handed it while Ansible provisions
    /// the instance and before named binds it; from a random start, so that two
    /// deployers (or tests) seldom try the same one.
    fn free_port(&self) -> Result<u16, ProviderError> {
        const BASE: u16 = 20000;
        const SPAN: u16 = 12000;
        let taken: Vec<u16> = self.all()?.iter().map(|i| i.dns_port).collect();
        let start = fastrand::u16(0..SPAN);
        for k in 0..SPAN {
            let port = BASE + (start + k) % SPAN;
            if !taken.contains(&port)
                && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            {
                return Ok(port);
            }
        }
        Err(ProviderError::Api("no free loopback port".into()))
    }
}

/// The pid in `<dir>/named.pid`, if that process is alive (and not a zombie).
pub fn named_pid(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join("named.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit(") ").next()?.chars().next()?;
    (state != 'Z').then_some(pid)
}

fn named_running(dir: &Path) -> bool {
    named_pid(dir).is_some()
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status();
}

impl Provider for Local {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn list(&self, _labels: &[String]) -> Result<Vec<Instance>, ProviderError> {
        self.all()
    }

    async fn find(&self, label: &str) -> Result<Option<Instance>, ProviderError> {
        self.read(label)
    }

    async fn get(&self, id: &str) -> Result<Option<Instance>, ProviderError> {
        Ok(self.all()?.into_iter().find(|i| i.id == id))
    }

    async fn create(
        &self,
        label: &str,
        region: &str,
        rollout: &str,
    ) -> Result<Instance, ProviderError> {
        if let Some(existing) = self.read(label)? {
            if existing.created_by(rollout) {
                return Ok(existing);
            }
            return Err(ProviderError::Conflict(format!(
                "{label} exists ({}, tags {:?}) but was not created by this run ({}): it is left alone; remove {} if it is not needed, then run again",
                existing.id,
                existing.tags,
                rollout_tag(rollout),
                self.dir(label).display()
            )));
        }
        let inst = Instance {
            id: format!("local-{:08x}", fastrand::u32(..)),
            label: label.into(),
            region: region.into(),
            status: "created".into(),
            public_ipv4: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            private_ipv4: None,
            dns_port: self.free_port()?,
            tags: vec![MANAGED_TAG.into(), rollout_tag(rollout)],
            instance_type: None,
            image: None,
        };
        self.write(&inst)?;
        Ok(inst)
    }

    async fn wait_ready(&self, inst: &Instance) -> Result<Instance, ProviderError> {
        // A directory is ready at once; `named` is started by provisioning.
        self.read(&inst.label)?
            .ok_or_else(|| ProviderError::Api(format!("instance {} vanished", inst.label)))
    }

    async fn rename(&self, inst: &Instance, label: &str) -> Result<Instance, ProviderError> {
        let (from, to) = (self.dir(&inst.label), self.dir(label));
        if to.exists() {
            return Err(ProviderError::Api(format!(
                "cannot rename {} to {label}: it exists",
                inst.label
            )));
        }
        // named keeps running: its cwd follows the directory, and its config uses
        // relative paths only.
        std::fs::rename(&from, &to)?;
        let renamed = self.read(label)?.ok_or_else(|| {
            ProviderError::Api(format!("instance {label} vanished after the rename"))
        })?;
        self.write(&renamed)?;
        Ok(renamed)
    }

    async fn delete(&self, inst: &Instance) -> Result<(), ProviderError> {
        // Find it by ID: the label may have changed since the caller looked.
        let Some(cur) = self.get(&inst.id).await? else {
            return Ok(());
        };
        let dir = self.dir(&cur.label);
        if let Some(pid) = named_pid(&dir) {
            signal(pid, "-TERM");
            for _ in 0..100 {
                if named_pid(&dir).is_none() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if let Some(pid) = named_pid(&dir) {
                signal(pid, "-KILL");
            }
        }
        std::fs::remove_dir_all(&dir).or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        Ok(())
    }

    fn host_vars(&self, inst: &Instance) -> Map<String, Value> {
        let vars = json!({
            "ansible_connection": "local",
            "ansible_python_interpreter": "auto_silent",
            "common_local": true,
            "nameserver_local": true,
            "nameserver_root": self.dir(&inst.label),
            "nameserver_port": inst.dns_port,
            "nameserver_listen_address": "127.0.0.1",
            "nameserver_zones_dir": self.zones_dir,
        });
        super::object(vars)
    }

    fn backend_addr(&self, inst: &Instance, _lb: &LoadBalancer) -> Option<SocketAddr> {
        Some(SocketAddr::from((Ipv4Addr::LOCALHOST, inst.dns_port)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn create_reuses_only_what_the_same_run_made() {
        let d = tempfile::tempdir().unwrap();
        let p = Local::new(d.path(), d.path());
        let made = p.create("ns1-next", "local", "r1-aaaa").await.unwrap();
        assert!(made.created_by("r1-aaaa"));
        assert_eq!(made.tags, [MANAGED_TAG, "dnslb-rollout-r1-aaaa"]);
        // The same run (a resumed rollout) gets the same instance back.
        let again = p.create("ns1-next", "local", "r1-aaaa").await.unwrap();
        assert_eq!(again.id, made.id);
        // Another run is refused, and the instance is left as it was.
        let err = p.create("ns1-next", "local", "r2-bbbb").await.unwrap_err();
        assert!(matches!(err, ProviderError::Conflict(_)), "{err}");
        assert!(err.to_string().contains("not created by this run"), "{err}");
        assert_eq!(p.find("ns1-next").await.unwrap().unwrap().id, made.id);
        // An instance.json written before the tag change is still this run's.
        let mut old = made.clone();
        old.tags = vec![MANAGED_TAG.into(), "rollout:r1-aaaa".into()];
        p.write(&old).unwrap();
        let reused = p.create("ns1-next", "local", "r1-aaaa").await.unwrap();
        assert_eq!(reused.id, made.id);
    }
}
