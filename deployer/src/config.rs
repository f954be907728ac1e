//! `deployer.toml` (SPEC §5): serde structs with `deny_unknown_fields`, defaults, and a
//! `validate()` that lists every problem. Relative paths are resolved against the
//! directory of the config file, so the deployer behaves the same from any cwd.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Every problem with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Invalid content; every problem listed.
    #[error("{} problem(s) in {path}:\n  - {}", problems.len(), problems.join("\n  - "))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The problems.
        problems: Vec<String>,
    },
}

/// Which cloud (or none) the nameservers live on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Real `named` processes on this machine.
    #[default]
    Local,
    /// Linode API v4.
    Linode,
}

/// `[provider]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    /// local or linode.
    #[serde(default)]
    pub kind: ProviderKind,
    /// Journal, lock, generated inventories, local instances.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Linode: API base URL.
    #[serde(default = "default_api_url")]
    pub api_url: String,
    /// Linode: environment variable holding the API token.
    #[serde(default = "default_token_env")]
    pub token_env: String,
    /// Linode: plan, e.g. "g6-nanode-1".
    #[serde(default, rename = "type")]
    pub instance_type: Option<String>,
    /// Linode: image, e.g. "linode/debian12".
    #[serde(default)]
    pub image: Option<String>,
    /// Linode: public keys installed for root.
    #[serde(default)]
    pub authorized_keys: Vec<String>,
    /// Linode: the SSH user Ansible connects as.
    #[serde(default = "default_ssh_user")]
    pub ssh_user: String,
    /// Linode: SSH port (22); tests point it at a local sshd-less port.
    #[serde(default = "default_ssh_port")]
    pub ssh_port: u16,
    /// Linode: how long a new instance may take to run and accept SSH.
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_s: u64,
    /// Linode: give load balancers the public address even in the same region.
    #[serde(default)]
    pub force_public_ip: bool,
    /// Linode: the port nameservers answer DNS on.
    #[serde(default = "default_dns_port")]
    pub dns_port: u16,
    /// How many instances are created (and waited for) at the same time.
    #[serde(default = "default_parallel")]
    pub max_parallel: usize,
    /// Linode: how long one API request may take before it counts as failed (and is
    /// retried, or looked up again for a create).
    #[serde(default = "default_request_timeout")]
    pub request_timeout_s: u64,
    /// Linode: milliseconds between two status polls of a booting instance.
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// Linode, tests only: provision each instance as a local `named` bound to the
    /// (loopback) address the API handed out, instead of over SSH. Lets a test run a
    /// whole rollout against an in-process fake of the API.
    #[serde(default)]
    pub provision_local: bool,
}

impl Default for Provider {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

fn default_state_dir() -> PathBuf {
    ".deployer".into()
}
fn default_api_url() -> String {
    "https://api.linode.com/v4".into()
}
fn default_token_env() -> String {
    "LINODE_TOKEN".into()
}
fn default_ssh_user() -> String {
    "root".into()
}
fn default_ssh_port() -> u16 {
    22
}
fn default_boot_timeout() -> u64 {
    300
}
fn default_dns_port() -> u16 {
    53
}
fn default_parallel() -> usize {
    8
}
fn default_request_timeout() -> u64 {
    30
}
fn default_poll_ms() -> u64 {
    2000
}
/// `[ansible]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Ansible {
    /// The playbook.
    #[serde(default = "default_playbook")]
    pub playbook: PathBuf,
    /// Every `<zone>.zone` here is served.
    #[serde(default = "default_zones_dir")]
    pub zones_dir: PathBuf,
    /// The ansible-playbook command.
    #[serde(default = "default_ansible_playbook")]
    pub command: String,
    /// Seconds one ansible-playbook run may take before it is killed (with its
    /// process group) and the step fails: a host that hangs (an SSH connection that
    /// never completes, an apt lock) must not stall a rollout forever.
    #[serde(default = "default_ansible_timeout")]
    pub timeout_s: u64,
    /// The dnslb binary the dnslb role installs on new load balancers (`rollout-lbs`);
    /// default: `dnslb` beside the deployer binary.
    #[serde(default)]
    pub dnslb_binary: Option<PathBuf>,
}

impl Default for Ansible {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

fn default_playbook() -> PathBuf {
    "ansible/playbook.yml".into()
}
fn default_zones_dir() -> PathBuf {
    "ansible/zones".into()
}
fn default_ansible_playbook() -> String {
    "ansible-playbook".into()
}
fn default_ansible_timeout() -> u64 {
    1800
}

/// One `[[nameserver]]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Nameserver {
    /// Label of the live instance; the new one is `<name>-next` during a rollout.
    pub name: String,
    /// Where it runs.
    #[serde(default = "default_region")]
    pub region: String,
}

fn default_region() -> String {
    "local".into()
}

/// One `[[load_balancer]]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancer {
    /// Name, for logs.
    pub name: String,
    /// dnslb admin API.
    pub admin_url: String,
    /// Bearer token file for the admin API.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// DNS address used to verify through the load balancer.
    pub dns: SocketAddr,
    /// Which nameservers it fronts.
    pub nameservers: Vec<String>,
    /// Its region, to pick private addresses of nameservers in the same region.
    #[serde(default)]
    pub region: Option<String>,
    /// The NS name of the delegated zone whose glue points at it (`rollout-lbs`).
    #[serde(default)]
    pub ns_name: Option<String>,
}

/// How the parent zone's delegation is changed (`[registrar] kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistrarKind {
    /// TSIG-signed DNS UPDATE to the parent zone's primary.
    Rfc2136,
    /// Print the change, then poll the parent until it is visible.
    Manual,
}

/// `[registrar]`: where `rollout-lbs` changes the delegation.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Registrar {
    /// rfc2136 or manual.
    pub kind: RegistrarKind,
    /// The delegated zone whose glue changes.
    pub zone: String,
    /// The parent's authoritative servers: where the delegation is read (and, with
    /// rfc2136, the first one is updated).
    pub parent_servers: Vec<SocketAddr>,
    /// rfc2136: a BIND key file.
    #[serde(default)]
    pub tsig_key_file: Option<PathBuf>,
    /// An old load balancer counts as idle below this many queries per second …
    #[serde(default = "default_drain_qps")]
    pub drain_qps: f64,
    /// … for this many seconds in a row.
    #[serde(default = "default_drain_window")]
    pub drain_window_s: u64,
    /// How long past the delegation's TTL and the window the drain may last before
    /// it fails (clients that ignore the TTL).
    #[serde(default = "default_drain_margin")]
    pub drain_margin_s: u64,
    /// How long the new glue may take to show on every parent server (manual: how
    /// long the operator has).
    #[serde(default = "default_propagation_timeout")]
    pub propagation_timeout_s: u64,
}

fn default_drain_qps() -> f64 {
    1.0
}
fn default_drain_window() -> u64 {
    30
}
fn default_drain_margin() -> u64 {
    60
}
fn default_propagation_timeout() -> u64 {
    600
}

/// `[checks]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Checks {
    /// Zone files whose every record is verified; default: every zone in zones_dir.
    #[serde(default)]
    pub zone_files: Vec<PathBuf>,
    /// Seconds of verification through the load balancers after the swap.
    #[serde(default = "default_bake")]
    pub bake_s: u64,
    /// How the load balancers are cut over: `canary` (the first, bake it, then each
    /// next one with a bake of its own) or `all` (every one, then one bake).
    #[serde(default)]
    pub cut_over: CutOver,
    /// The bake fails when more than this share of the queries a load balancer sent
    /// to the new servers during the bake timed out (rounded up: 0.01 of 50 is 1).
    #[serde(default = "default_timeout_ratio")]
    pub bake_max_timeout_ratio: f64,
    /// The bake fails when a load balancer gave more SERVFAIL answers than this during
    /// the bake (the new servers' own and its "no usable backend" ones).
    #[serde(default)]
    pub bake_max_servfail: u64,
    /// How long past `bake_s` the bake waits for new backends that no health check
    /// has judged yet (`unknown`) to come up; still unknown then fails the bake.
    #[serde(default = "default_settle")]
    pub bake_settle_s: u64,
}

/// `[checks] cut_over`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CutOver {
    /// One load balancer at a time, each baked before the next is swapped.
    #[default]
    Canary,
    /// Every load balancer, then one bake.
    All,
}

impl Default for Checks {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

fn default_bake() -> u64 {
    10
}
fn default_timeout_ratio() -> f64 {
    0.01
}
fn default_settle() -> u64 {
    30
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[provider]`
    #[serde(default)]
    pub provider: Provider,
    /// `[ansible]`
    #[serde(default)]
    pub ansible: Ansible,
    /// `[[nameserver]]`
    #[serde(default, rename = "nameserver")]
    pub nameservers: Vec<Nameserver>,
    /// `[[load_balancer]]`
    #[serde(default, rename = "load_balancer")]
    pub load_balancers: Vec<LoadBalancer>,
    /// `[checks]`
    #[serde(default)]
    pub checks: Checks,
    /// `[registrar]` (needed by `rollout-lbs` only).
    #[serde(default)]
    pub registrar: Option<Registrar>,
}

/// Linode's label rule (3–64 characters, starts with a letter, letters, digits and
/// `-_.`, no two of `-_.` in a row), which is strict enough for every provider.
pub fn label_problem(label: &str) -> Option<String> {
    let ok_chars = label
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    let starts = label
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic());
    let ends = label
        .chars()
        .last()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let doubled = ["--", "__", ".."].iter().any(|d| label.contains(d));
    if (3..=64).contains(&label.len()) && ok_chars && starts && ends && !doubled {
        None
    } else {
        Some(format!(
            "{label:?} is not a valid instance label (3-64 characters, a letter first, letters/digits/-_. and no doubled -_.)"
        ))
    }
}

impl Registrar {
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if hickory_proto::rr::Name::from_ascii(&self.zone).is_err() || !self.zone.ends_with('.') {
            p.push(format!(
                "registrar.zone {:?} must be a fully qualified DNS name (ending in a dot)",
                self.zone
            ));
        }
        if self.parent_servers.is_empty() {
            p.push("registrar.parent_servers must name at least one server".into());
        }
        match (&self.kind, &self.tsig_key_file) {
            (RegistrarKind::Rfc2136, None) => {
                p.push("registrar.tsig_key_file is required with kind = \"rfc2136\"".into())
            }
            (RegistrarKind::Rfc2136, Some(k)) if !k.is_file() => p.push(format!(
                "registrar.tsig_key_file {} does not exist",
                k.display()
            )),
            _ => {}
        }
        if !(self.drain_qps.is_finite() && self.drain_qps > 0.0) {
            p.push("registrar.drain_qps must be > 0".into());
        }
        if self.drain_window_s == 0 {
            p.push("registrar.drain_window_s must be > 0".into());
        }
        if self.propagation_timeout_s == 0 {
            p.push("registrar.propagation_timeout_s must be > 0".into());
        }
        p
    }
}

impl Config {
    /// Reads, parses, resolves paths and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Config::parse(&text, base).map_err(|problems| ConfigError::Invalid {
            path: path.into(),
            problems,
        })
    }

    /// Parses `text`, resolving relative paths against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, Vec<String>> {
        let mut c: Config = toml::from_str(text).map_err(|e| vec![e.message().to_string()])?;
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut c.provider.state_dir);
        abs(&mut c.ansible.playbook);
        abs(&mut c.ansible.zones_dir);
        c.checks.zone_files.iter_mut().for_each(abs);
        if let Some(b) = &mut c.ansible.dnslb_binary {
            abs(b);
        }
        if let Some(k) = c.registrar.as_mut().and_then(|r| r.tsig_key_file.as_mut()) {
            abs(k);
        }
        for lb in &mut c.load_balancers {
            if let Some(t) = &mut lb.token_file {
                abs(t);
            }
        }
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        if self.nameservers.is_empty() {
            p.push("at least one [[nameserver]] is needed".to_string());
        }
        let mut names = HashSet::new();
        for ns in &self.nameservers {
            if !names.insert(ns.name.as_str()) {
                p.push(format!("nameserver {:?} is listed twice", ns.name));
            }
            for label in [ns.name.clone(), format!("{}-next", ns.name)] {
                p.extend(label_problem(&label));
            }
        }
        let mut lb_names = HashSet::new();
        for lb in &self.load_balancers {
            if !lb_names.insert(lb.name.as_str()) {
                p.push(format!("load_balancer {:?} is listed twice", lb.name));
            }
            if !(lb.admin_url.starts_with("http://") || lb.admin_url.starts_with("https://")) {
                p.push(format!(
                    "load_balancer {:?}: admin_url must be an http(s) URL",
                    lb.name
                ));
            }
            if lb.nameservers.is_empty() {
                p.push(format!(
                    "load_balancer {:?}: nameservers must not be empty",
                    lb.name
                ));
            }
            for n in &lb.nameservers {
                if !names.contains(n.as_str()) {
                    p.push(format!(
                        "load_balancer {:?}: unknown nameserver {n:?}",
                        lb.name
                    ));
                }
            }
            if let Some(t) = &lb.token_file {
                if !t.is_file() {
                    p.push(format!(
                        "load_balancer {:?}: token_file {} does not exist",
                        lb.name,
                        t.display()
                    ));
                }
            }
        }
        if !self.ansible.playbook.is_file() {
            p.push(format!(
                "ansible.playbook {} does not exist",
                self.ansible.playbook.display()
            ));
        }
        if self.ansible.timeout_s == 0 {
            p.push("ansible.timeout_s must be > 0".into());
        }
        match self.zone_files_in_dir() {
            Ok(z) if z.is_empty() => p.push(format!(
                "ansible.zones_dir {} holds no <zone>.zone file",
                self.ansible.zones_dir.display()
            )),
            Ok(_) => {}
            Err(e) => p.push(format!(
                "ansible.zones_dir {}: {e}",
                self.ansible.zones_dir.display()
            )),
        }
        for z in &self.checks.zone_files {
            if !z.is_file() {
                p.push(format!("checks.zone_files: {} does not exist", z.display()));
            } else if zone_name(z).is_none() {
                p.push(format!(
                    "checks.zone_files: {} must be named <zone>.zone",
                    z.display()
                ));
            }
        }
        if let Some(r) = &self.registrar {
            p.extend(r.problems());
        }
        for lb in &self.load_balancers {
            if let Some(n) = &lb.ns_name {
                if hickory_proto::rr::Name::from_ascii(n).is_err() || !n.ends_with('.') {
                    p.push(format!(
                        "load_balancer {:?}: ns_name {n:?} must be a fully qualified DNS name (ending in a dot)",
                        lb.name
                    ));
                } else if let Some(r) = &self.registrar {
                    let zone = r.zone.trim_end_matches('.').to_ascii_lowercase();
                    let n = n.trim_end_matches('.').to_ascii_lowercase();
                    if n != zone && !n.ends_with(&format!(".{zone}")) {
                        p.push(format!(
                            "load_balancer {:?}: ns_name {n:?} is not inside {} and so has no glue to change",
                            lb.name, r.zone
                        ));
                    }
                }
            }
            p.extend(label_problem(&format!("{}-next", lb.name)));
        }
        if !(1..=64).contains(&self.provider.max_parallel) {
            p.push("provider.max_parallel must be within 1..=64".into());
        }
        if !(0.0..=1.0).contains(&self.checks.bake_max_timeout_ratio) {
            p.push("checks.bake_max_timeout_ratio must be between 0 and 1".into());
        }
        if self.provider.kind == ProviderKind::Linode {
            let pr = &self.provider;
            if pr.instance_type.is_none() {
                p.push("provider.type is required for linode (e.g. \"g6-nanode-1\")".into());
            }
            if pr.image.is_none() {
                p.push("provider.image is required for linode (e.g. \"linode/debian12\")".into());
            }
            if pr.authorized_keys.is_empty() {
                p.push(
                    "provider.authorized_keys must hold at least one public key for linode".into(),
                );
            }
            if pr.request_timeout_s == 0 {
                p.push("provider.request_timeout_s must be > 0".into());
            }
            if pr.boot_timeout_s == 0 {
                p.push("provider.boot_timeout_s must be > 0".into());
            }
            if pr.poll_interval_ms < 50 {
                p.push("provider.poll_interval_ms must be >= 50".into());
            }
            for ns in &self.nameservers {
                if ns.region == "local" {
                    p.push(format!(
                        "nameserver {:?}: set region to a Linode region (e.g. \"us-east\")",
                        ns.name
                    ));
                }
            }
            // rollout-lbs creates load balancers in their region.
            if self.registrar.is_some() {
                for lb in &self.load_balancers {
                    if lb.region.as_deref().is_none_or(|r| r == "local") {
                        p.push(format!(
                            "load_balancer {:?}: set region to a Linode region (e.g. \"us-east\"): rollout-lbs creates its successor there",
                            lb.name
                        ));
                    }
                }
            }
            if !(pr.api_url.starts_with("https://")
                || pr.api_url.starts_with("http://127.")
                || pr.api_url.starts_with("http://localhost"))
            {
                p.push(
                    "provider.api_url must be https (plain http only to loopback, for tests)"
                        .into(),
                );
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }

    /// Every `<zone>.zone` in zones_dir, sorted.
    pub fn zone_files_in_dir(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.ansible.zones_dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| zone_name(p).is_some())
            .collect();
        v.sort();
        Ok(v)
    }

    /// The zone files to verify.
    pub fn checked_zone_files(&self) -> std::io::Result<Vec<PathBuf>> {
        if self.checks.zone_files.is_empty() {
            self.zone_files_in_dir()
        } else {
            Ok(self.checks.zone_files.clone())
        }
    }
}

/// `example.test` for `.../example.test.zone`.
pub fn zone_name(path: &Path) -> Option<String> {
    let f = path.file_name()?.to_str()?;
    let z = f.strip_suffix(".zone")?;
    (!z.is_empty()).then(|| z.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("ansible/zones")).unwrap();
        std::fs::write(d.path().join("ansible/playbook.yml"), "- hosts: all\n").unwrap();
        std::fs::write(d.path().join("ansible/zones/example.test.zone"), "").unwrap();
        let p = d.path().to_path_buf();
        (d, p)
    }

    #[test]
    fn spec_example_parses_and_paths_resolve() {
        let (_d, b) = base();
        let c = Config::parse(
            r#"
            [provider]
            kind = "local"
            [[nameserver]]
            name = "ns1"
            region = "us-west"
            [[load_balancer]]
            name = "lb1"
            admin_url = "http://127.0.0.1:8053"
            dns = "127.0.0.1:5353"
            nameservers = ["ns1"]
            [checks]
            bake_s = 2
            "#,
            &b,
        )
        .unwrap();
        assert_eq!(c.provider.state_dir, b.join(".deployer"));
        assert_eq!(
            c.checked_zone_files().unwrap(),
            vec![b.join("ansible/zones/example.test.zone")]
        );
    }

    #[test]
    fn every_problem_is_listed() {
        let (_d, b) = base();
        let err = Config::parse(
            r#"
            [provider]
            kind = "linode"
            [[nameserver]]
            name = "n"
            [[nameserver]]
            name = "n"
            [[load_balancer]]
            name = "lb1"
            admin_url = "ftp://x"
            dns = "127.0.0.1:53"
            nameservers = ["ns9"]
            [checks]
            zone_files = ["nope.zone"]
            "#,
            &b,
        )
        .unwrap_err();
        for needle in [
            "listed twice",
            "not a valid instance label",
            "admin_url",
            "unknown nameserver",
            "does not exist",
            "provider.type",
            "provider.image",
            "authorized_keys",
        ] {
            assert!(err.iter().any(|e| e.contains(needle)), "{needle}: {err:?}");
        }
        let err = Config::parse("[provider]\nkind = \"local\"\nbogus = 1\n", &b).unwrap_err();
        assert!(err[0].contains("bogus"), "{err:?}");
    }

    #[test]
    fn ansible_timeout_defaults_to_half_an_hour_and_must_be_positive() {
        let (_d, b) = base();
        let ns = "[[nameserver]]\nname = \"ns1\"\n";
        let c = Config::parse(ns, &b).unwrap();
        assert_eq!(c.ansible.timeout_s, 1800);
        let c = Config::parse(&format!("[ansible]\ntimeout_s = 5\n{ns}"), &b).unwrap();
        assert_eq!(c.ansible.timeout_s, 5);
        let err = Config::parse(&format!("[ansible]\ntimeout_s = 0\n{ns}"), &b).unwrap_err();
        assert!(
            err.iter()
                .any(|e| e.contains("ansible.timeout_s must be > 0")),
            "{err:?}"
        );
    }

    #[test]
    fn registrar_and_ns_names_are_checked() {
        let (_d, b) = base();
        let lb = |ns_name: &str| {
            format!(
                "[[nameserver]]\nname = \"ns1\"\n[[load_balancer]]\nname = \"lb1\"\nadmin_url = \"http://127.0.0.1:8053\"\ndns = \"127.0.0.1:5353\"\nnameservers = [\"ns1\"]\nns_name = \"{ns_name}\"\n"
            )
        };
        let ok = format!(
            "{}[registrar]\nkind = \"manual\"\nzone = \"example.test.\"\nparent_servers = [\"127.0.0.1:5300\"]\n",
            lb("ns1.example.test.")
        );
        let c = Config::parse(&ok, &b).unwrap();
        let r = c.registrar.unwrap();
        assert_eq!((r.drain_qps, r.drain_window_s), (1.0, 30));
        assert_eq!(
            c.load_balancers[0].ns_name.as_deref(),
            Some("ns1.example.test.")
        );
        let bad = format!(
            "{}[registrar]\nkind = \"rfc2136\"\nzone = \"example.test\"\nparent_servers = []\ndrain_qps = 0\ndrain_window_s = 0\n",
            lb("ns1.other.test.")
        );
        let err = Config::parse(&bad, &b).unwrap_err();
        for needle in [
            "registrar.zone",
            "parent_servers",
            "tsig_key_file is required",
            "drain_qps",
            "drain_window_s",
            "is not inside",
        ] {
            assert!(err.iter().any(|e| e.contains(needle)), "{needle}: {err:?}");
        }
        let err = Config::parse(&lb("ns1"), &b).unwrap_err();
        assert!(err.iter().any(|e| e.contains("fully qualified")), "{err:?}");
        // On Linode, rollout-lbs needs each load balancer's region.
        let region = "load_balancer \"lb1\": set region to a Linode region";
        let err = Config::parse(&format!("[provider]\nkind = \"linode\"\n{ok}"), &b).unwrap_err();
        assert!(err.iter().any(|e| e.contains(region)), "{err:?}");
        let with = ok.replace(
            "nameservers = [\"ns1\"]\n",
            "nameservers = [\"ns1\"]\nregion = \"us-east\"\n",
        );
        let err = Config::parse(&format!("[provider]\nkind = \"linode\"\n{with}"), &b).unwrap_err();
        assert!(!err.iter().any(|e| e.contains(region)), "{err:?}");
    }
}
