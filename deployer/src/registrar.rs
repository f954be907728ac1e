//! Where the parent zone's delegation changes: the glue (A/AAAA) of the NS names that
//! point at the load balancers. [`Registrar`] is the interface a load-balancer rollout
//! uses; [`Rfc2136`] sends a TSIG-signed DNS UPDATE to the parent zone's primary
//! (with `nsupdate`, as an operator would), [`Manual`] prints the exact change for a
//! registrar's web form and waits until the parent serves it. A registrar API (Linode
//! Domains, or others) plugs in as another implementation.
//!
//! [`served_glue`] reads what the parent's authoritative servers actually serve: the
//! glue in the additional section of their referral for the delegated zone.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::AsyncWriteExt;

use crate::verify::{self, Transport};

/// Why a delegation could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum RegistrarError {
    /// A name is not a valid DNS name.
    #[error("{0:?} is not a valid DNS name")]
    Name(String),
    /// The update was refused or could not be sent.
    #[error("DNS UPDATE of {zone} at {server} failed: {reason}")]
    Update {
        /// The parent zone.
        zone: String,
        /// Where it was sent.
        server: SocketAddr,
        /// What nsupdate said.
        reason: String,
    },
    /// No parent server gave a usable referral.
    #[error("reading the delegation of {zone}: {reason}")]
    Read {
        /// The delegated zone.
        zone: String,
        /// Why.
        reason: String,
    },
    /// The change did not show on every parent server in time.
    #[error("{0}")]
    Timeout(String),
}

fn name(s: &str) -> Result<Name, RegistrarError> {
    Name::from_ascii(s)
        .map(|n| n.to_lowercase())
        .map_err(|_| RegistrarError::Name(s.into()))
}

/// The zone that holds the delegation of `zone` (and so its glue): its parent.
pub fn parent_of(zone: &str) -> Result<String, RegistrarError> {
    let z = name(zone)?;
    if z.is_root() {
        return Err(RegistrarError::Name(format!(
            "{zone} (the root has no parent)"
        )));
    }
    Ok(z.base_name().to_ascii())
}

/// Changes a delegation's glue.
#[allow(async_fn_in_trait)]
pub trait Registrar {
    /// Short name for logs.
    fn kind(&self) -> &'static str;
    /// Makes the glue of `ns` (an NS name of the delegated `zone`) exactly `addrs`.
    async fn set_glue(
        &self,
        zone: &str,
        ns: &str,
        addrs: &[IpAddr],
        ttl: u32,
    ) -> Result<(), RegistrarError>;
}

/// RFC 2136 DNS UPDATE, signed with a TSIG key, to the parent zone's primary.
pub struct Rfc2136 {
    /// The parent zone's primary.
    pub server: SocketAddr,
    /// A BIND key file (`key "name" { algorithm …; secret "…"; };`).
    pub key_file: PathBuf,
}

/// The nsupdate script that replaces `ns`'s A and AAAA glue in `parent` with `addrs`:
/// one UPDATE message, so the parent never serves a half-changed set.
pub fn update_script(
    server: SocketAddr,
    parent: &str,
    ns: &str,
    addrs: &[IpAddr],
    ttl: u32,
) -> String {
    let mut s = format!(
        "server {} {}\nzone {parent}\nupdate delete {ns} A\nupdate delete {ns} AAAA\n",
        server.ip(),
        server.port()
    );
    for a in addrs {
        let t = if a.is_ipv4() { "A" } else { "AAAA" };
        s.push_str(&format!("update add {ns} {ttl} {t} {a}\n"));
    }
    s.push_str("send\nanswer\n");
    s
}

impl Registrar for Rfc2136 {
    fn kind(&self) -> &'static str {
        "rfc2136"
    }

    async fn set_glue(
        &self,
        zone: &str,
        ns: &str,
        addrs: &[IpAddr],
        ttl: u32,
    ) -> Result<(), RegistrarError> {
        let parent = parent_of(zone)?;
        let ns = name(ns)?.to_ascii();
        let script = update_script(self.server, &parent, &ns, addrs, ttl);
        let fail = |reason: String| RegistrarError::Update {
            zone: parent.clone(),
            server: self.server,
            reason,
        };
        let mut child = tokio::process::Command::new("nsupdate")
            .arg("-k")
            .arg(&self.key_file)
            .arg("-t")
            .arg("10")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                fail(format!(
                    "running nsupdate (apt-get install bind9-dnsutils): {e}"
                ))
            })?;
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|e| fail(format!("writing to nsupdate: {e}")))?;
        drop(stdin);
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .map_err(|_| fail("nsupdate did not finish within 60 s".into()))?
            .map_err(|e| fail(e.to_string()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // `answer` prints the server's reply; anything but NOERROR is a refusal.
        let status = text
            .lines()
            .find_map(|l| l.split("status: ").nth(1))
            .map(|r| r.split(',').next().unwrap_or(r).trim().to_string());
        match (out.status.success(), status.as_deref()) {
            (true, Some("NOERROR")) => Ok(()),
            _ => Err(fail(
                text.lines()
                    .map(str::trim)
                    .filter(|l| {
                        l.contains("failed")
                            || l.contains("status:")
                            || l.contains("error")
                            || l.contains("could not")
                    })
                    .map(|l| l.trim_start_matches(';').trim())
                    .collect::<Vec<_>>()
                    .join("; "),
            )),
        }
    }
}

/// A registrar with no API: prints the change to make by hand and waits, up to
/// `timeout`, until every parent server serves it.
pub struct Manual {
    /// Where the delegation is read.
    pub parent_servers: Vec<SocketAddr>,
    /// How long to wait for the operator.
    pub timeout: Duration,
}

impl Registrar for Manual {
    fn kind(&self) -> &'static str {
        "manual"
    }

    async fn set_glue(
        &self,
        zone: &str,
        ns: &str,
        addrs: &[IpAddr],
        ttl: u32,
    ) -> Result<(), RegistrarError> {
        eprintln!(
            "deployer: at the registrar of {zone}, set the glue of {ns} to {} (TTL {ttl}); waiting until {} serve it",
            fmt_addrs(addrs),
            fmt_addrs(&self.parent_servers)
        );
        wait_for_glue(&self.parent_servers, zone, ns, addrs, self.timeout).await
    }
}

/// A delegation as one parent server serves it: each NS name with its glue (sorted),
/// and the longest TTL among the NS records and the glue, which is how long a
/// resolver may keep using what it read.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Delegation {
    /// NS name (lower case, fully qualified) and its glue; no glue for an NS name
    /// outside the zone.
    pub ns: Vec<(String, Vec<IpAddr>)>,
    /// Seconds.
    pub ttl: u32,
}

impl Delegation {
    /// Every glue address of every NS name.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self
            .ns
            .iter()
            .flat_map(|(_, a)| a.iter().copied())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The glue of `ns`.
    pub fn glue(&self, ns: &str) -> Vec<IpAddr> {
        let n = ns.to_ascii_lowercase();
        self.ns
            .iter()
            .find(|(name, _)| *name == n)
            .map(|(_, a)| a.clone())
            .unwrap_or_default()
    }
}

/// The delegation of `zone` that `server` gives in its referral (over TCP when the
/// UDP answer is truncated).
pub async fn delegation(server: SocketAddr, zone: &str) -> Result<Delegation, RegistrarError> {
    let z = name(zone)?;
    let read = |reason: String| RegistrarError::Read {
        zone: zone.into(),
        reason: format!("{server}: {reason}"),
    };
    let m = verify::ask(server, &z, RecordType::NS, Transport::Udp)
        .await
        .map_err(|e| read(e.to_string()))?;
    let m = if m.truncation {
        verify::ask(server, &z, RecordType::NS, Transport::Tcp)
            .await
            .map_err(|e| read(e.to_string()))?
    } else {
        m
    };
    let ns_records: Vec<_> = m
        .answers
        .iter()
        .chain(m.authorities.iter())
        .filter(|r| r.name.to_lowercase() == z && r.record_type() == RecordType::NS)
        .collect();
    if ns_records.is_empty() {
        return Err(read(format!(
            "no NS records for {zone} in its answer (rcode {:?})",
            m.metadata.response_code
        )));
    }
    let mut ttl = 0;
    let mut ns = Vec::new();
    for r in &ns_records {
        ttl = ttl.max(r.ttl);
        let RData::NS(target) = &r.data else { continue };
        let target = target.0.to_lowercase();
        let mut glue: Vec<IpAddr> = m
            .additionals
            .iter()
            .filter(|a| a.name.to_lowercase() == target)
            .filter_map(|a| {
                let ip = match &a.data {
                    RData::A(x) => IpAddr::V4(x.0),
                    RData::AAAA(x) => IpAddr::V6(x.0),
                    _ => return None,
                };
                ttl = ttl.max(a.ttl);
                Some(ip)
            })
            .collect();
        glue.sort();
        ns.push((target.to_ascii(), glue));
    }
    ns.sort();
    Ok(Delegation { ns, ttl })
}

/// The glue of `ns` that `server` gives in its referral for `zone`, sorted.
pub async fn served_glue(
    server: SocketAddr,
    zone: &str,
    ns: &str,
) -> Result<Vec<IpAddr>, RegistrarError> {
    let n = name(ns)?.to_ascii();
    Ok(delegation(server, zone).await?.glue(&n))
}

/// The addresses, comma separated.
pub fn fmt_addrs<T: std::fmt::Display>(addrs: &[T]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Waits until every server in `servers` serves exactly `addrs` as the glue of `ns`.
pub async fn wait_for_glue(
    servers: &[SocketAddr],
    zone: &str,
    ns: &str,
    addrs: &[IpAddr],
    timeout: Duration,
) -> Result<(), RegistrarError> {
    let mut want = addrs.to_vec();
    want.sort();
    let deadline = Instant::now() + timeout;
    loop {
        let mut behind = Vec::new();
        for &s in servers {
            match served_glue(s, zone, ns).await {
                Ok(g) if g == want => {}
                Ok(g) => behind.push(format!("{s} serves [{}]", fmt_addrs(&g))),
                Err(e) => behind.push(e.to_string()),
            }
        }
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(RegistrarError::Timeout(format!(
                "the glue of {ns} is not [{}] on every parent server after {}s: {}",
                fmt_addrs(&want),
                timeout.as_secs(),
                behind.join("; ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_and_the_update_script() {
        assert_eq!(parent_of("example.test.").unwrap(), "test.");
        assert_eq!(parent_of("Example.TEST").unwrap(), "test.");
        assert!(parent_of(".").is_err());
        let s = update_script(
            "127.0.0.1:5300".parse().unwrap(),
            "test.",
            "ns1.example.test.",
            &["127.0.0.20".parse().unwrap(), "::1".parse().unwrap()],
            300,
        );
        assert_eq!(
            s,
            "server 127.0.0.1 5300\nzone test.\nupdate delete ns1.example.test. A\nupdate delete ns1.example.test. AAAA\nupdate add ns1.example.test. 300 A 127.0.0.20\nupdate add ns1.example.test. 300 AAAA ::1\nsend\nanswer\n"
        );
    }
}
