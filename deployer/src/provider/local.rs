//! The local provider: each "VM" is a real `named` process on 127.0.0.1 with its own
//! directory `<state_dir>/local/<label>/` and its own port. Creating one makes the
//! directory and reserves a port (recorded in `instance.json`); the Ansible
//! `nameserver` role (connection local) writes `named.conf` and the zones there and
//! starts `named` with only relative paths, so renaming the directory (the rename step)
//! leaves the running process intact. Deleting stops the process and removes the
//! directory.
//!
//! A load balancer (`create_lb`) is the same kind of directory, with a loopback
//! address of its own (127.0.0.10–127.0.0.250, where its DNS and admin ports are free)
//! instead of a port of its own; the dnslb role (local mode) starts `dnslb` there.

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
                inst.status = if running(&self.dir(label)) {
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

    /// A loopback address for a new load balancer: no other instance has it, and
    /// every one of `ports` is free on it for UDP and TCP now. From a random start in
    /// 127.0.0.10–127.0.0.250, so that two deployers (or tests) seldom try the same.
    fn free_address(&self, ports: &[u16]) -> Result<Ipv4Addr, ProviderError> {
        const FIRST: u16 = 10;
        const SPAN: u16 = 241;
        let taken: Vec<IpAddr> = self.all()?.iter().filter_map(|i| i.public_ipv4).collect();
        let start = fastrand::u16(0..SPAN);
        for k in 0..SPAN {
            let last = u8::try_from(FIRST + (start + k) % SPAN).expect("at most 250");
            let ip = Ipv4Addr::new(127, 0, 0, last);
            let free = |&port: &u16| {
                std::net::UdpSocket::bind((ip, port)).is_ok()
                    && std::net::TcpListener::bind((ip, port)).is_ok()
            };
            if !taken.contains(&IpAddr::V4(ip)) && ports.iter().all(free) {
                return Ok(ip);
            }
        }
        Err(ProviderError::Api(format!(
            "no loopback address in 127.0.0.{FIRST}-127.0.0.250 has ports {ports:?} free"
        )))
    }
}

/// The pid in `<dir>/named.pid`, if that process is alive (and not a zombie).
pub fn named_pid(dir: &Path) -> Option<u32> {
    pid_in(dir, "named.pid")
}

/// The pid of a local instance's process (`named.pid` or `dnslb.pid`), if alive.
fn pid_in(dir: &Path, file: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join(file))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit(") ").next()?.chars().next()?;
    (state != 'Z').then_some(pid)
}

fn running(dir: &Path) -> bool {
    named_pid(dir).is_some() || pid_in(dir, "dnslb.pid").is_some()
}

/// Stops the processes of a local instance directory (named and/or dnslb): SIGTERM,
/// up to 5 s, then SIGKILL.
pub async fn stop_processes(dir: &Path) {
    for file in ["named.pid", "dnslb.pid"] {
        let Some(pid) = pid_in(dir, file) else {
            continue;
        };
        signal(pid, "-TERM");
        for _ in 0..100 {
            if pid_in(dir, file).is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(pid) = pid_in(dir, file) {
            signal(pid, "-KILL");
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status();
}

impl Local {
    /// `create`, and for a load balancer (`lb_ports`: DNS, admin) an address of its
    /// own instead of a port of its own.
    async fn make(
        &self,
        label: &str,
        region: &str,
        rollout: &str,
        lb_ports: Option<&[u16]>,
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
        let (ip, dns_port) = match lb_ports {
            None => (Ipv4Addr::LOCALHOST, self.free_port()?),
            Some(ports) => (self.free_address(ports)?, ports[0]),
        };
        let inst = Instance {
            id: format!("local-{:08x}", fastrand::u32(..)),
            label: label.into(),
            region: region.into(),
            status: "created".into(),
            public_ipv4: Some(IpAddr::V4(ip)),
            private_ipv4: None,
            dns_port,
            tags: vec![MANAGED_TAG.into(), rollout_tag(rollout)],
            instance_type: None,
            image: None,
        };
        self.write(&inst)?;
        Ok(inst)
    }
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
        self.make(label, region, rollout, None).await
    }

    async fn create_lb(
        &self,
        label: &str,
        region: &str,
        rollout: &str,
        ports: &[u16],
    ) -> Result<Instance, ProviderError> {
        self.make(label, region, rollout, Some(ports)).await
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
        stop_processes(&dir).await;
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

    fn lb_host_vars(&self, inst: &Instance) -> Map<String, Value> {
        super::object(json!({
            "ansible_connection": "local",
            "ansible_python_interpreter": "auto_silent",
            "common_local": true,
            "dnslb_local": true,
            "dnslb_root": self.dir(&inst.label),
        }))
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

    #[tokio::test]
    async fn a_load_balancer_gets_a_loopback_address_of_its_own_with_its_ports_free() {
        let d = tempfile::tempdir().unwrap();
        let p = Local::new(d.path(), d.path());
        let (dns, admin) = (free_test_port(), free_test_port());
        let a = p
            .create_lb("lb1-next", "local", "r1-aaaa", &[dns, admin])
            .await
            .unwrap();
        let b = p
            .create_lb("lb2-next", "local", "r1-aaaa", &[dns, admin])
            .await
            .unwrap();
        let (ia, ib) = (a.public_ipv4.unwrap(), b.public_ipv4.unwrap());
        assert_ne!(ia, ib, "two load balancers never share an address");
        for ip in [ia, ib] {
            let IpAddr::V4(v4) = ip else { panic!("{ip}") };
            assert!(
                v4.octets()[..3] == [127, 0, 0] && v4.octets()[3] >= 10,
                "{ip}"
            );
        }
        assert_eq!(
            (a.dns_port, b.dns_port),
            (dns, dns),
            "the same port as asked"
        );
        // The same run gets the same one back; the lb host vars run it locally there.
        let again = p
            .create_lb("lb1-next", "local", "r1-aaaa", &[dns, admin])
            .await
            .unwrap();
        assert_eq!(again.public_ipv4, a.public_ipv4);
        let vars = p.lb_host_vars(&a);
        assert_eq!(vars["dnslb_local"], json!(true));
        assert_eq!(vars["dnslb_root"], json!(d.path().join("local/lb1-next")));
        // An address whose port is taken is not handed out: with the port held on
        // every address of the range but one, that one is chosen.
        let spare = Ipv4Addr::new(127, 0, 0, 77);
        let port = free_test_port();
        let _held: Vec<_> = (10..=250u8)
            .map(|x| Ipv4Addr::new(127, 0, 0, x))
            .filter(|ip| *ip != spare && ![ia, ib].contains(&IpAddr::V4(*ip)))
            .filter_map(|ip| std::net::UdpSocket::bind((ip, port)).ok())
            .collect();
        let c = p
            .create_lb("lb3-next", "local", "r1-aaaa", &[port])
            .await
            .unwrap();
        assert_eq!(c.public_ipv4, Some(IpAddr::V4(spare)));
    }

    fn free_test_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}
