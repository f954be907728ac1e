//! Verification of served zone data. Each checked zone file is canonicalized with
//! `named-checkzone -D` and parsed into RRsets; then every RRset is asked of a server
//! over UDP and over TCP with RD=0:
//!
//! - authoritative data must come back NOERROR with AA set and exactly the RRset
//!   (names case-insensitive; TTL and rdata exact);
//! - a delegation (an NS RRset below the apex) must come back as the referral a server
//!   gives: AA clear, no answer, exactly the NS RRset in the authority section, and
//!   the glue records of the zone in the additional section;
//! - data below a delegation (glue, occluded names) is only checked as glue;
//! - the SOA (and so its serial) is checked like any other RRset.
//!
//! The first mismatch is reported with server, transport, name, type, expected and
//! found records.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_proto::serialize::binary::BinEncodable;
use hickory_proto::serialize::txt::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// A verification failure.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// named-checkzone failed or its output did not parse.
    #[error("zone {zone}: {reason}")]
    Zone {
        /// Zone file.
        zone: String,
        /// Why.
        reason: String,
    },
    /// The server answered differently from the zone data.
    #[error("{server} over {transport}: {name} {rtype}: {reason}")]
    Mismatch {
        /// The server queried.
        server: SocketAddr,
        /// udp or tcp.
        transport: &'static str,
        /// Owner name.
        name: String,
        /// Type.
        rtype: String,
        /// What differed.
        reason: String,
    },
}

/// What one query must return.
#[derive(Debug, Clone)]
pub enum Expect {
    /// An authoritative answer of exactly these records.
    Answer {
        /// Owner.
        name: Name,
        /// Type.
        rtype: RecordType,
        /// Canonical text of each record, sorted.
        records: Vec<String>,
    },
    /// A referral for a delegation.
    Referral {
        /// The delegation point.
        name: Name,
        /// The NS RRset, canonical text, sorted.
        ns: Vec<String>,
        /// Glue (A/AAAA of in-bailiwick NS targets), canonical text, sorted.
        glue: Vec<String>,
    },
}

/// The checks of one zone.
#[derive(Debug, Clone)]
pub struct ZoneChecks {
    /// Zone name.
    pub origin: Name,
    /// SOA serial of the file.
    pub serial: u32,
    /// One per RRset (or delegation).
    pub expects: Vec<Expect>,
}

/// Canonical text of a record: lowercase owner, TTL, type, rdata.
fn canon(r: &Record) -> String {
    format!(
        "{} {} {} {}",
        r.name.to_ascii().to_ascii_lowercase(),
        r.ttl,
        r.record_type(),
        r.data
    )
}

/// Loads `path` (named `<zone>.zone`) through `named-checkzone -D` and derives the
/// checks.
pub fn load_zone(path: &Path) -> Result<ZoneChecks, VerifyError> {
    let zone = crate::config::zone_name(path).ok_or_else(|| VerifyError::Zone {
        zone: path.display().to_string(),
        reason: "file must be named <zone>.zone".into(),
    })?;
    let err = |reason: String| VerifyError::Zone {
        zone: zone.clone(),
        reason,
    };
    let out = std::process::Command::new(named_checkzone())
        .args(["-q", "-D", "-o", "-", &zone])
        .arg(path)
        .output()
        .map_err(|e| err(format!("running named-checkzone: {e}")))?;
    if !out.status.success() {
        let detail = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        return Err(err(format!("named-checkzone failed: {}", detail.trim())));
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let origin = Name::from_ascii(format!("{zone}.")).map_err(|e| err(e.to_string()))?;
    let (_, sets) = Parser::new(text, None, Some(origin.clone()))
        .parse()
        .map_err(|e| err(format!("parsing canonical zone: {e}")))?;
    let mut by_set: BTreeMap<(Name, RecordType), Vec<Record>> = BTreeMap::new();
    for set in sets.values() {
        for r in set.records_without_rrsigs() {
            by_set
                .entry((r.name.to_lowercase(), r.record_type()))
                .or_default()
                .push(r.clone());
        }
    }
    let cuts: Vec<Name> = by_set
        .keys()
        .filter(|(n, t)| *t == RecordType::NS && *n != origin)
        .map(|(n, _)| n.clone())
        .collect();
    let below_cut = |n: &Name| cuts.iter().any(|c| c.zone_of(n) && n != c);
    let mut serial = 0;
    let mut expects = Vec::new();
    for ((name, rtype), records) in &by_set {
        let sorted = |rs: &[Record]| {
            let mut v: Vec<String> = rs.iter().map(canon).collect();
            v.sort();
            v
        };
        if *rtype == RecordType::SOA {
            if let Some(hickory_proto::rr::RData::SOA(soa)) = records.first().map(|r| &r.data) {
                serial = soa.serial;
            }
        }
        if below_cut(name) {
            continue; // glue or occluded: checked with its referral
        }
        if cuts.contains(name) {
            if *rtype != RecordType::NS && *rtype != RecordType::DS {
                continue; // occluded by the delegation
            }
            if *rtype == RecordType::NS {
                let glue: Vec<Record> = records
                    .iter()
                    .filter_map(|r| match &r.data {
                        hickory_proto::rr::RData::NS(ns) => Some(ns.0.to_lowercase()),
                        _ => None,
                    })
                    .filter(|target| name.zone_of(target))
                    .flat_map(|target| {
                        [RecordType::A, RecordType::AAAA]
                            .into_iter()
                            .filter_map(|t| by_set.get(&(target.clone(), t)))
                            .flatten()
                            .cloned()
                            .collect::<Vec<_>>()
                    })
                    .collect();
                expects.push(Expect::Referral {
                    name: name.clone(),
                    ns: sorted(records),
                    glue: sorted(&glue),
                });
                continue;
            }
        }
        expects.push(Expect::Answer {
            name: name.clone(),
            rtype: *rtype,
            records: sorted(records),
        });
    }
    Ok(ZoneChecks {
        origin,
        serial,
        expects,
    })
}

fn named_checkzone() -> &'static str {
    if Path::new("/usr/sbin/named-checkzone").exists() {
        "/usr/sbin/named-checkzone"
    } else {
        "named-checkzone"
    }
}

/// Which transport a query uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP with EDNS (4096 bytes).
    Udp,
    /// TCP.
    Tcp,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks `server` one question with RD=0.
pub async fn ask(
    server: SocketAddr,
    name: &Name,
    rtype: RecordType,
    transport: Transport,
) -> std::io::Result<Message> {
    let id = fastrand::u16(..);
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = false;
    m.add_query(Query::query(name.clone(), rtype));
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    m.set_edns(edns);
    let bytes = m.to_bytes().map_err(std::io::Error::other)?;
    let raw = match transport {
        Transport::Udp => {
            let mut last = None;
            let mut got = None;
            for _ in 0..3 {
                match tokio::time::timeout(QUERY_TIMEOUT, udp_once(server, &bytes, id)).await {
                    Ok(Ok(b)) => {
                        got = Some(b);
                        break;
                    }
                    Ok(Err(e)) => last = Some(e),
                    Err(_) => {
                        last = Some(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "no answer within 2s",
                        ))
                    }
                }
            }
            match got {
                Some(b) => b,
                None => return Err(last.expect("three attempts")),
            }
        }
        Transport::Tcp => tokio::time::timeout(QUERY_TIMEOUT * 2, tcp_once(server, &bytes))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 4s")
            })??,
    };
    let msg = Message::from_vec(&raw).map_err(std::io::Error::other)?;
    if msg.id != id {
        return Err(std::io::Error::other("answer with a different ID"));
    }
    Ok(msg)
}

async fn udp_once(server: SocketAddr, q: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("literal");
    let s = UdpSocket::bind(bind).await?;
    s.connect(server).await?;
    s.send(q).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = s.recv(&mut buf).await?;
        if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn tcp_once(server: SocketAddr, q: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(server).await?;
    let mut frame = (q.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(q);
    s.write_all(&frame).await?;
    let len = s.read_u16().await?;
    let mut buf = vec![0u8; usize::from(len)];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

fn sorted_section(rs: &[Record], keep: impl Fn(&Record) -> bool) -> Vec<String> {
    let mut v: Vec<String> = rs.iter().filter(|r| keep(r)).map(canon).collect();
    v.sort();
    v
}

/// Checks one expectation against one answer; `Err(reason)` on a mismatch.
fn judge(expect: &Expect, m: &Message) -> Result<(), String> {
    if m.response_code != ResponseCode::NoError {
        return Err(format!("rcode {} (expected NOERROR)", m.response_code));
    }
    match expect {
        Expect::Answer { records, .. } => {
            if !m.authoritative {
                return Err("AA flag not set (not authoritative)".into());
            }
            if m.truncation {
                return Ok(()); // header is right; the TCP check compares the records
            }
            let got = sorted_section(&m.answers, |_| true);
            if &got != records {
                return Err(format!("expected {records:?}, got {got:?}"));
            }
        }
        Expect::Referral { name, ns, glue } => {
            if m.authoritative {
                return Err("AA set on a referral".into());
            }
            if !m.answers.is_empty() {
                return Err(format!(
                    "referral has an answer section: {:?}",
                    sorted_section(&m.answers, |_| true)
                ));
            }
            if m.truncation {
                return Ok(());
            }
            let got_ns = sorted_section(&m.authorities, |r| {
                r.record_type() == RecordType::NS && r.name.to_lowercase() == *name
            });
            if &got_ns != ns {
                return Err(format!("referral NS expected {ns:?}, got {got_ns:?}"));
            }
            let glue_names: Vec<String> = glue
                .iter()
                .map(|g| g.split(' ').next().unwrap_or_default().to_string())
                .collect();
            let got_glue = sorted_section(&m.additionals, |r| {
                matches!(r.record_type(), RecordType::A | RecordType::AAAA)
                    && glue_names.contains(&r.name.to_ascii().to_ascii_lowercase())
            });
            if &got_glue != glue {
                return Err(format!("referral glue expected {glue:?}, got {got_glue:?}"));
            }
        }
    }
    Ok(())
}

/// Verifies every expectation of every zone on `server` over UDP and TCP. Returns the
/// number of queries asked.
pub async fn verify_server(server: SocketAddr, zones: &[ZoneChecks]) -> Result<usize, VerifyError> {
    let mut asked = 0;
    for z in zones {
        for e in &z.expects {
            let (name, rtype) = match e {
                Expect::Answer { name, rtype, .. } => (name, *rtype),
                Expect::Referral { name, .. } => (name, RecordType::NS),
            };
            for transport in [Transport::Udp, Transport::Tcp] {
                let mismatch = |reason: String| VerifyError::Mismatch {
                    server,
                    transport: transport.as_str(),
                    name: name.to_ascii(),
                    rtype: rtype.to_string(),
                    reason,
                };
                let m = ask(server, name, rtype, transport)
                    .await
                    .map_err(|e| mismatch(format!("no usable answer: {e}")))?;
                asked += 1;
                judge(e, &m).map_err(mismatch)?;
            }
        }
    }
    Ok(asked)
}

/// Asks `server` for every zone's SOA over UDP: a cheap sign of life, checked each
/// bake round on each new server (answered with AA, the zone file's serial).
pub async fn answers_soa(server: SocketAddr, zones: &[ZoneChecks]) -> Result<(), VerifyError> {
    for z in zones {
        let mismatch = |reason: String| VerifyError::Mismatch {
            server,
            transport: Transport::Udp.as_str(),
            name: z.origin.to_ascii(),
            rtype: "SOA".into(),
            reason,
        };
        let m = ask(server, &z.origin, RecordType::SOA, Transport::Udp)
            .await
            .map_err(|e| mismatch(format!("no usable answer: {e}")))?;
        if m.response_code != ResponseCode::NoError || !m.authoritative {
            return Err(mismatch(format!(
                "rcode {}, AA {}",
                m.response_code, m.authoritative
            )));
        }
        let serial = m.answers.iter().find_map(|r| match &r.data {
            hickory_proto::rr::RData::SOA(soa) => Some(soa.serial),
            _ => None,
        });
        if serial != Some(z.serial) {
            return Err(mismatch(format!(
                "serial {serial:?}, the zone file has {}",
                z.serial
            )));
        }
    }
    Ok(())
}

/// Loads every zone file.
pub fn load_zones(files: &[std::path::PathBuf]) -> Result<Vec<ZoneChecks>, VerifyError> {
    files.iter().map(|f| load_zone(f)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone_path() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../ansible/zones/example.test.zone")
    }

    #[test]
    fn the_example_zone_yields_answers_a_referral_and_its_glue() {
        let z = load_zone(&zone_path()).expect("named-checkzone is installed");
        assert_eq!(z.serial, 2026112901);
        let referral = z
            .expects
            .iter()
            .find_map(|e| match e {
                Expect::Referral { name, ns, glue } => {
                    Some((name.clone(), ns.clone(), glue.clone()))
                }
                _ => None,
            })
            .expect("sub.example.test is delegated");
        assert_eq!(referral.0.to_ascii(), "sub.example.test.");
        assert_eq!(referral.1.len(), 2);
        assert_eq!(referral.2.len(), 2, "{:?}", referral.2);
        let answers: Vec<String> = z
            .expects
            .iter()
            .filter_map(|e| match e {
                Expect::Answer { name, rtype, .. } => Some(format!("{name} {rtype}")),
                _ => None,
            })
            .collect();
        assert!(
            answers.contains(&"*.wild.example.test. A".to_string()),
            "{answers:?}"
        );
        assert!(answers.contains(&"big.example.test. TXT".to_string()));
        // Glue is not checked as authoritative data.
        assert!(!answers.iter().any(|a| a.contains("ns1.sub")));
    }

    #[test]
    fn a_bad_zone_file_is_reported() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bad.test.zone");
        std::fs::write(&p, "$ORIGIN bad.test.\nwww IN A 1.2.3.4\n").unwrap();
        let e = load_zone(&p).unwrap_err().to_string();
        assert!(e.contains("named-checkzone failed"), "{e}");
    }
}
