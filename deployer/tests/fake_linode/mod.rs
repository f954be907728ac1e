//! An in-process fake of the Linode API v4 (axum), written from the public API
//! documentation, not from the client: bearer-token auth (401), the
//! `{"errors":[{"reason","field"}]}` format, label rules and uniqueness, pagination
//! with `page`/`page_size` (`data`, `page`, `pages`, `results`), `X-Filter` on label and
//! tags, statuses provisioning -> booting -> running (or provisioning -> offline for
//! `booted: false`, until `POST /linode/instances/{id}/boot`), `/ips` with public and
//! private IPv4, rename with PUT, DELETE, and 429 with `Retry-After`.
//!
//! Faults a test can switch on ([`Faults`]): a create that makes the instance and then
//! answers 500, a 500 before anything is made, a create whose response is cut off
//! mid-way (the instance exists, the client never learns its ID), instances that come
//! out of provisioning `offline` although `booted` was true, a listing that lags
//! behind a create whose answer was lost, 429 on creates, and a
//! restricted token (read-only, or no Linodes scope: 403 `Unauthorized`).
//!
//! It hands out loopback addresses only (127.0.0.0/8), and brings each one up as a /32
//! on `lo` (`ip addr add`, removed again on delete), as a cloud brings up a VM's
//! network: `named` listens only on addresses an interface carries. A running
//! instance of the fake also "boots SSH": a listener on its public address and
//! `ssh_port` that sends an SSH banner, unless `ssh` is off (an instance that never
//! becomes reachable).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

pub const TOKEN: &str = "fake-linode-token-5f2b9c1e7d";

#[derive(Clone, Debug)]
pub struct Linode {
    pub id: u64,
    pub label: String,
    pub region: String,
    pub ty: String,
    pub image: Option<String>,
    pub tags: Vec<String>,
    pub public: Ipv4Addr,
    pub private: Option<Ipv4Addr>,
    pub created: Instant,
    /// Pre-existing, already running (made by hand).
    pub preexisting: bool,
    /// Comes out of provisioning `offline` (created with `booted: false`, or the
    /// offline fault) until a boot request.
    pub offline: bool,
    /// When `POST .../boot` was accepted.
    pub boot_requested: Option<Instant>,
}

/// What the token may do, as a personal access token's `linodes` scope.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// `linodes:read_write`.
    #[default]
    ReadWrite,
    /// `linodes:read_only`: every write answers 403.
    ReadOnly,
    /// No `linodes` scope: every request answers 403.
    None,
}

/// Faults to inject; counters are decremented as they fire.
#[derive(Debug, Default)]
pub struct Faults {
    /// Creates that make the instance, then answer 500.
    pub create_500_after: u32,
    /// Creates that answer 500 without making anything.
    pub create_500_before: u32,
    /// Creates that make the instance, then cut the response off.
    pub create_lost_response: u32,
    /// An instance whose create answer was cut off stays out of this many of the
    /// following listings (a listing that lags behind the create).
    pub lost_hidden_from_lists: u32,
    /// Creates that answer 429 with `Retry-After: 1`.
    pub create_429: u32,
    /// New instances stop `offline` after provisioning even with `booted: true`.
    pub offline_after_provisioning: bool,
    /// The token's scope.
    pub scope: Scope,
    /// Deletes that answer 500 without deleting.
    pub delete_500: u32,
    /// Deletes that delete, then take this long to answer (past a client's timeout).
    pub delete_slow: u32,
    /// How long a slow delete takes to answer.
    pub delete_slow_for: Duration,
}

#[derive(Default)]
pub struct Inner {
    pub linodes: BTreeMap<u64, Linode>,
    pub next_id: u64,
    pub next_host: u32,
    /// Every request: (method, path, body).
    pub requests: Vec<(String, String, Value)>,
    /// When each of `requests` arrived.
    pub arrived: Vec<Instant>,
    /// Every status `GET /linode/instances/{id}` answered: (id, status).
    pub served: Vec<(u64, String)>,
    /// How many of the next requests answer 429.
    pub throttle: u32,
    /// Injected faults.
    pub faults: Faults,
    /// Instances left out of the next N listings: id -> N.
    pub hidden: BTreeMap<u64, u32>,
    pub ssh_listeners: BTreeMap<u64, tokio::task::JoinHandle<()>>,
}

#[derive(Clone)]
pub struct Fake {
    pub inner: Arc<Mutex<Inner>>,
    pub base: Ipv4Addr,
    pub ssh: bool,
    pub ssh_port: u16,
    pub step: Duration,
}

/// Adds or removes a loopback address on `lo` (needs root, as the tests run in CI).
fn lo_addr(op: &str, ip: Ipv4Addr) {
    let out = std::process::Command::new("ip")
        .args(["addr", op, &format!("{ip}/32"), "dev", "lo"])
        .output()
        .expect("ip (iproute2) is installed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            || err.contains("File exists")
            || err.contains("already assigned")
            || err.contains("Cannot assign"),
        "ip addr {op} {ip}: {err}"
    );
}

fn bring_up(l: &Linode) {
    lo_addr("add", l.public);
    if let Some(p) = l.private {
        lo_addr("add", p);
    }
}

fn tear_down(l: &Linode) {
    lo_addr("del", l.public);
    if let Some(p) = l.private {
        lo_addr("del", p);
    }
}

fn err(status: StatusCode, reason: &str, field: Option<&str>) -> Response {
    let mut e = json!({ "reason": reason });
    if let Some(f) = field {
        e["field"] = json!(f);
    }
    (status, Json(json!({ "errors": [e] }))).into_response()
}

/// Linode's label rule.
fn label_ok(l: &str) -> bool {
    let chars = l
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    let first = l.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let last = l.chars().last().is_some_and(|c| c.is_ascii_alphanumeric());
    (3..=64).contains(&l.len())
        && chars
        && first
        && last
        && !["--", "__", ".."].iter().any(|d| l.contains(d))
}

const REGIONS: &[&str] = &["us-west", "us-east", "eu-central", "ap-south"];

impl Fake {
    fn status(&self, l: &Linode) -> &'static str {
        if l.preexisting {
            return "running";
        }
        let age = l.created.elapsed();
        if age < self.step {
            return "provisioning";
        }
        let boot_started = match (l.offline, l.boot_requested) {
            (true, None) => return "offline",
            (_, Some(t)) => t.elapsed(),
            (false, None) => age - self.step,
        };
        if boot_started < self.step {
            "booting"
        } else {
            "running"
        }
    }

    fn view(&self, l: &Linode) -> Value {
        let mut ipv4 = vec![json!(l.public.to_string())];
        if let Some(p) = l.private {
            ipv4.push(json!(p.to_string()));
        }
        json!({
            "id": l.id,
            "label": l.label,
            "region": l.region,
            "type": l.ty,
            "image": l.image,
            "status": self.status(l),
            "ipv4": ipv4,
            "ipv6": format!("2600:3c00::{:x}/128", l.id),
            "tags": l.tags,
            "created": "2026-11-29T00:00:00",
            "updated": "2026-11-29T00:00:00",
            "hypervisor": "kvm",
            "specs": { "disk": 25600, "memory": 1024, "vcpus": 1, "transfer": 1000 },
        })
    }

    /// Adds a running instance made by hand (no deployer tags).
    pub fn add_preexisting(&self, label: &str, region: &str, tags: &[&str]) -> Linode {
        let mut g = self.inner.lock().unwrap();
        let mut l = self.new_linode(&mut g, label, region, true);
        l.tags = tags.iter().map(|t| t.to_string()).collect();
        bring_up(&l);
        g.linodes.insert(l.id, l.clone());
        l
    }

    /// A new instance with the next ID and addresses; the caller fills in the rest.
    fn new_linode(&self, g: &mut Inner, label: &str, region: &str, pre: bool) -> Linode {
        g.next_id += 1;
        g.next_host += 1;
        let [a, b, _, _] = self.base.octets();
        let (c, host) = ((g.next_host / 250) as u8, (g.next_host % 250 + 1) as u8);
        Linode {
            id: 40_000_000 + g.next_id,
            label: label.into(),
            region: region.into(),
            ty: "g6-nanode-1".into(),
            image: None,
            tags: Vec::new(),
            public: Ipv4Addr::new(a, b, c, host),
            private: Some(Ipv4Addr::new(a, b, c + 100, host)),
            created: Instant::now(),
            preexisting: pre,
            offline: false,
            boot_requested: None,
        }
    }

    /// Starts the banner listener of a running instance, once.
    fn boot_ssh(&self, g: &mut Inner, l: &Linode) {
        if !self.ssh || g.ssh_listeners.contains_key(&l.id) || self.status(l) != "running" {
            return;
        }
        let addr = SocketAddr::from((l.public, self.ssh_port));
        // SO_REUSEADDR: the banner connections the listener closed first linger in
        // TIME_WAIT on this address and port. A failure is said (the next GET tries
        // again) so that an instance whose SSH never answers shows why.
        let bound = tokio::net::TcpSocket::new_v4().and_then(|sock| {
            sock.set_reuseaddr(true)?;
            sock.bind(addr)?;
            sock.listen(128)
        });
        let listener = match bound {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("fake linode: SSH banner listener on {addr} not bound: {e}");
                return;
            }
        };
        let h = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(b"SSH-2.0-FakeLinode_1.0\r\n").await;
            }
        });
        g.ssh_listeners.insert(l.id, h);
    }

    pub fn linodes(&self) -> Vec<Linode> {
        self.inner
            .lock()
            .unwrap()
            .linodes
            .values()
            .cloned()
            .collect()
    }

    pub fn requests(&self) -> Vec<(String, String, Value)> {
        self.inner.lock().unwrap().requests.clone()
    }

    pub fn throttle(&self, n: u32) {
        self.inner.lock().unwrap().throttle = n;
    }

    /// Changes the injected faults.
    pub fn faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.inner.lock().unwrap().faults);
    }

    /// Adds an instance as a deployer would have made it, running, with these
    /// type, image and tags (a leftover of another run, say).
    pub fn add_made(
        &self,
        label: &str,
        region: &str,
        ty: &str,
        image: &str,
        tags: &[&str],
    ) -> Linode {
        let mut g = self.inner.lock().unwrap();
        let mut l = self.new_linode(&mut g, label, region, true);
        l.ty = ty.into();
        l.image = Some(image.into());
        l.tags = tags.iter().map(|t| t.to_string()).collect();
        bring_up(&l);
        g.linodes.insert(l.id, l.clone());
        l
    }

    /// The statuses `GET /linode/instances/{id}` answered for `id`, repeats removed.
    pub fn statuses_served(&self, id: u64) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for (i, st) in &self.inner.lock().unwrap().served {
            if *i == id && v.last() != Some(st) {
                v.push(st.clone());
            }
        }
        v
    }

    /// When the `POST /linode/instances` requests for `label` arrived.
    pub fn create_times(&self, label: &str) -> Vec<Instant> {
        let g = self.inner.lock().unwrap();
        g.requests
            .iter()
            .zip(&g.arrived)
            .filter(|((m, p, b), _)| m == "POST" && p == "/linode/instances" && b["label"] == label)
            .map(|(_, t)| *t)
            .collect()
    }

    /// The requests with this method and path.
    pub fn requests_to(&self, method: &str, path: &str) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|(m, p, _)| m == method && p == path)
            .map(|(_, _, b)| b)
            .collect()
    }
}

/// Checks auth and throttling; records the request.
fn gate(f: &Fake, headers: &HeaderMap, method: &str, path: &str, body: &Value) -> Option<Response> {
    let mut g = f.inner.lock().unwrap();
    g.requests.push((method.into(), path.into(), body.clone()));
    g.arrived.push(Instant::now());
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth != format!("Bearer {TOKEN}") {
        return Some(err(StatusCode::UNAUTHORIZED, "Invalid Token", None));
    }
    // A valid token without the scope the operation needs: 403, as Linode answers.
    let allowed = match g.faults.scope {
        Scope::ReadWrite => true,
        Scope::ReadOnly => method == "GET",
        Scope::None => false,
    };
    if !allowed {
        return Some(err(StatusCode::FORBIDDEN, "Unauthorized", None));
    }
    if g.throttle > 0 {
        g.throttle -= 1;
        let mut r = err(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests", None);
        r.headers_mut().insert("retry-after", "1".parse().unwrap());
        return Some(r);
    }
    None
}

fn matches_filter(l: &Value, filter: &Value) -> bool {
    let Some(obj) = filter.as_object() else {
        return true;
    };
    obj.iter().all(|(k, want)| match k.as_str() {
        "label" => l["label"] == *want,
        "tags" => l["tags"].as_array().is_some_and(|t| t.contains(want)),
        "region" => l["region"] == *want,
        "+and" => want
            .as_array()
            .is_some_and(|a| a.iter().all(|f| matches_filter(l, f))),
        "+or" => want
            .as_array()
            .is_some_and(|a| a.iter().any(|f| matches_filter(l, f))),
        _ => false,
    })
}

async fn list(
    State(f): State<Fake>,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    if let Some(r) = gate(&f, &headers, "GET", "/linode/instances", &json!(q)) {
        return r;
    }
    let page: usize = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
    let size: usize = q
        .get("page_size")
        .and_then(|p| p.parse().ok())
        .unwrap_or(100);
    if !(25..=500).contains(&size) {
        return err(
            StatusCode::BAD_REQUEST,
            "Must be between 25 and 500",
            Some("page_size"),
        );
    }
    let filter: Value = match headers.get("x-filter") {
        Some(v) => match serde_json::from_slice(v.as_bytes()) {
            Ok(f) => f,
            Err(_) => return err(StatusCode::BAD_REQUEST, "Invalid JSON", Some("X-Filter")),
        },
        None => json!({}),
    };
    let mut g = f.inner.lock().unwrap();
    let mut all: Vec<Linode> = g.linodes.values().cloned().collect();
    for l in &all {
        f.boot_ssh(&mut g, l);
    }
    all.retain(|l| !g.hidden.contains_key(&l.id));
    for n in g.hidden.values_mut() {
        *n -= 1;
    }
    g.hidden.retain(|_, n| *n > 0);
    let matching: Vec<Value> = all
        .iter()
        .map(|l| f.view(l))
        .filter(|v| matches_filter(v, &filter))
        .collect();
    let pages = matching.len().div_ceil(size).max(1);
    if page == 0 || page > pages {
        return err(StatusCode::BAD_REQUEST, "Invalid page", Some("page"));
    }
    let data: Vec<Value> = matching
        .iter()
        .skip((page - 1) * size)
        .take(size)
        .cloned()
        .collect();
    Json(json!({ "data": data, "page": page, "pages": pages, "results": matching.len() }))
        .into_response()
}

async fn create(State(f): State<Fake>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if let Some(r) = gate(&f, &headers, "POST", "/linode/instances", &body) {
        return r;
    }
    let mut errors = Vec::new();
    let label = body["label"].as_str().unwrap_or_default().to_string();
    let region = body["region"].as_str().unwrap_or_default().to_string();
    let ty = body["type"].as_str().unwrap_or_default().to_string();
    if !REGIONS.contains(&region.as_str()) {
        errors.push(json!({"reason": "region is not valid", "field": "region"}));
    }
    if ty.is_empty() {
        errors.push(json!({"reason": "type is required", "field": "type"}));
    }
    if !label_ok(&label) {
        errors.push(json!({"reason": "Label must be 3-64 characters, begin and end with a letter or number, and contain only letters, numbers, dashes, underscores, or periods, without two in a row", "field": "label"}));
    }
    let image = body["image"].as_str().map(String::from);
    if image.is_some() && body["root_pass"].as_str().is_none_or(|p| p.len() < 11) {
        errors.push(json!({"reason": "root_pass is required when creating from an Image", "field": "root_pass"}));
    }
    if body["authorized_keys"].as_array().is_some_and(|k| {
        k.iter()
            .any(|k| !k.as_str().unwrap_or("").starts_with("ssh-"))
    }) {
        errors.push(json!({"reason": "Invalid SSH public key", "field": "authorized_keys"}));
    }
    let mut g = f.inner.lock().unwrap();
    if g.faults.create_429 > 0 {
        g.faults.create_429 -= 1;
        let mut r = err(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests", None);
        r.headers_mut().insert("retry-after", "1".parse().unwrap());
        return r;
    }
    if g.faults.create_500_before > 0 {
        g.faults.create_500_before -= 1;
        return err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal Server Error",
            None,
        );
    }
    if g.linodes.values().any(|l| l.label == label) {
        errors.push(json!({"reason": "Label must be unique among your Linodes", "field": "label"}));
    }
    if !errors.is_empty() {
        return (StatusCode::BAD_REQUEST, Json(json!({ "errors": errors }))).into_response();
    }
    let tags = body["tags"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let mut l = f.new_linode(&mut g, &label, &region, false);
    l.ty = ty;
    l.image = image;
    l.tags = tags;
    if body["private_ip"] != json!(true) {
        l.private = None;
    }
    // `booted` defaults to true; false leaves it offline after provisioning.
    l.offline = body["booted"] == json!(false) || g.faults.offline_after_provisioning;
    bring_up(&l);
    g.linodes.insert(l.id, l.clone());
    if g.faults.create_500_after > 0 {
        g.faults.create_500_after -= 1;
        return err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal Server Error",
            None,
        );
    }
    if g.faults.create_lost_response > 0 {
        g.faults.create_lost_response -= 1;
        let hide = g.faults.lost_hidden_from_lists;
        if hide > 0 {
            g.hidden.insert(l.id, hide);
        }
        return cut_off(f.view(&l));
    }
    Json(f.view(&l)).into_response()
}

/// A 200 whose body stops half-way: it promises the whole JSON in Content-Length,
/// sends the first half and closes the connection, as a response lost to a network
/// failure. The client cannot read the instance's ID.
fn cut_off(v: Value) -> Response {
    let text = v.to_string();
    let half = text[..text.len() / 2].to_string();
    let mut r = (StatusCode::OK, half).into_response();
    r.headers_mut().insert(
        axum::http::header::CONTENT_LENGTH,
        text.len().to_string().parse().unwrap(),
    );
    r
}

async fn boot(State(f): State<Fake>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Some(r) = gate(
        &f,
        &headers,
        "POST",
        &format!("/linode/instances/{id}/boot"),
        &Value::Null,
    ) {
        return r;
    }
    let mut g = f.inner.lock().unwrap();
    let Some(l) = g.linodes.get(&id).cloned() else {
        return err(StatusCode::NOT_FOUND, "Not found", None);
    };
    if f.status(&l) != "offline" {
        return err(
            StatusCode::BAD_REQUEST,
            &format!("Linode {id} is busy ({})", f.status(&l)),
            None,
        );
    }
    g.linodes.get_mut(&id).unwrap().boot_requested = Some(Instant::now());
    Json(json!({})).into_response()
}

async fn one(State(f): State<Fake>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Some(r) = gate(
        &f,
        &headers,
        "GET",
        &format!("/linode/instances/{id}"),
        &Value::Null,
    ) {
        return r;
    }
    let mut g = f.inner.lock().unwrap();
    let Some(l) = g.linodes.get(&id).cloned() else {
        return err(StatusCode::NOT_FOUND, "Not found", None);
    };
    f.boot_ssh(&mut g, &l);
    let v = f.view(&l);
    g.served
        .push((id, v["status"].as_str().unwrap().to_string()));
    Json(v).into_response()
}

async fn ips(State(f): State<Fake>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Some(r) = gate(
        &f,
        &headers,
        "GET",
        &format!("/linode/instances/{id}/ips"),
        &Value::Null,
    ) {
        return r;
    }
    let g = f.inner.lock().unwrap();
    let Some(l) = g.linodes.get(&id) else {
        return err(StatusCode::NOT_FOUND, "Not found", None);
    };
    let addr = |a: Ipv4Addr, public: bool| {
        json!({"address": a.to_string(), "gateway": null, "linode_id": l.id, "prefix": if public {24} else {17},
               "public": public, "rdns": null, "region": l.region, "subnet_mask": "255.255.255.0", "type": "ipv4"})
    };
    Json(json!({
        "ipv4": {
            "public": [addr(l.public, true)],
            "private": l.private.map(|p| vec![addr(p, false)]).unwrap_or_default(),
            "shared": [], "reserved": [],
        },
        "ipv6": { "link_local": null, "slaac": null, "global": [] },
    }))
    .into_response()
}

async fn update(
    State(f): State<Fake>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Json(body): Json<Value>,
) -> Response {
    if let Some(r) = gate(
        &f,
        &headers,
        "PUT",
        &format!("/linode/instances/{id}"),
        &body,
    ) {
        return r;
    }
    let mut g = f.inner.lock().unwrap();
    if !g.linodes.contains_key(&id) {
        return err(StatusCode::NOT_FOUND, "Not found", None);
    }
    if let Some(label) = body["label"].as_str() {
        if !label_ok(label) {
            return err(StatusCode::BAD_REQUEST, "Label is invalid", Some("label"));
        }
        if g.linodes.values().any(|l| l.label == label && l.id != id) {
            return err(
                StatusCode::BAD_REQUEST,
                "Label must be unique among your Linodes",
                Some("label"),
            );
        }
        g.linodes.get_mut(&id).unwrap().label = label.into();
    }
    let l = g.linodes[&id].clone();
    Json(f.view(&l)).into_response()
}

async fn delete(State(f): State<Fake>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Some(r) = gate(
        &f,
        &headers,
        "DELETE",
        &format!("/linode/instances/{id}"),
        &Value::Null,
    ) {
        return r;
    }
    let slow = {
        let mut g = f.inner.lock().unwrap();
        if g.faults.delete_500 > 0 {
            g.faults.delete_500 -= 1;
            return err(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal Server Error",
                None,
            );
        }
        let Some(l) = g.linodes.remove(&id) else {
            return err(StatusCode::NOT_FOUND, "Not found", None);
        };
        tear_down(&l);
        if let Some(h) = g.ssh_listeners.remove(&id) {
            h.abort();
        }
        (g.faults.delete_slow > 0).then(|| {
            g.faults.delete_slow -= 1;
            g.faults.delete_slow_for
        })
    };
    if let Some(d) = slow {
        tokio::time::sleep(d).await;
    }
    Json(json!({})).into_response()
}

/// A running fake: its base URL (".../v4") and state.
pub struct Server {
    pub url: String,
    pub fake: Fake,
    _rt: tokio::runtime::Runtime,
}

impl Drop for Server {
    fn drop(&mut self) {
        for l in self.fake.linodes() {
            tear_down(&l);
        }
    }
}

/// Starts a fake whose instances get addresses 127.<b>.<0..99>.N (private
/// 127.<b>.<100..199>.N).
pub fn start(base: Ipv4Addr, ssh: bool, ssh_port: u16, step: Duration) -> Server {
    assert!(
        base.is_loopback(),
        "the fake hands out loopback addresses only"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let fake = Fake {
        inner: Arc::new(Mutex::new(Inner::default())),
        base,
        ssh,
        ssh_port,
        step,
    };
    let app = Router::new()
        .route("/v4/linode/instances", get(list).post(create))
        .route(
            "/v4/linode/instances/{id}",
            get(one).put(update).delete(delete),
        )
        .route("/v4/linode/instances/{id}/ips", get(ips))
        .route("/v4/linode/instances/{id}/boot", axum::routing::post(boot))
        .with_state(fake.clone());
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server {
        url: format!("http://{addr}/v4"),
        fake,
        _rt: rt,
    }
}
