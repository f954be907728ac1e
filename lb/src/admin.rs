//! The admin API (JSON over HTTP, axum). Routes:
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/backends` | `{"generation", "backends": [Backend…]}` |
//! | `PUT /v1/backends` | replace the set atomically; `expected_generation` (409), `require_healthy` (422) |
//! | `POST /v1/backends` | add one backend: 201, 409 if the name exists |
//! | `GET /v1/backends/{name}` | one backend, 404 |
//! | `DELETE /v1/backends/{name}` | remove it; answers in flight are still delivered |
//! | `POST /v1/backends/{name}/drain` | no new queries go to it |
//! | `POST /v1/backends/{name}/undrain` | back to active |
//! | `GET /v1/status` | version, uptime, generation, listeners, policy, cache |
//! | `DELETE /v1/cache` | flush the packet cache: `{"flushes", "enabled"}` |
//! | `GET /healthz` | 200 if an active backend is up or unknown (usable), else 503 (no token needed) |
//! | `GET /metrics` | Prometheus text (no token needed) |
//!
//! Errors are always `{"error": "..."}`. With `admin.token_file` every route but
//! `/healthz` and `/metrics` needs `Authorization: Bearer <token>` (compared in
//! constant time). Every change is persisted before the response is sent, on a blocking
//! thread: a slow disk never stalls this runtime, which also runs the health checks.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::api::{BackendList, BackendView, Changed, ErrorBody, MemberState, ReplaceSet};
use crate::backends::{self, Entry, Member, SetError};
use crate::config::BackendConfig;
use crate::shared::Shared;

/// What the handlers share.
#[derive(Clone)]
pub struct AdminState {
    shared: Arc<Shared>,
    prometheus: PrometheusHandle,
}

impl AdminState {
    /// Wraps the server state.
    pub fn new(shared: Arc<Shared>, prometheus: PrometheusHandle) -> Self {
        AdminState { shared, prometheus }
    }
}

/// An API error: a status and a reason, rendered as `{"error": reason}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<SetError> for ApiError {
    fn from(e: SetError) -> Self {
        let status = match e {
            SetError::Invalid(_) => StatusCode::BAD_REQUEST,
            SetError::Conflict { .. } | SetError::Exists(_) | SetError::Refused(_) => {
                StatusCode::CONFLICT
            }
            SetError::NotFound(_) => StatusCode::NOT_FOUND,
            SetError::Rejected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

fn view(e: &Entry) -> BackendView {
    BackendView {
        name: e.spec.name.clone(),
        address: e.spec.address.to_string(),
        weight: e.spec.weight,
        state: e.state,
        health: e.runtime.health(),
        outstanding: e.runtime.outstanding(),
        queries_total: e.runtime.queries_total(),
        timeouts_total: e.runtime.timeouts_total(),
    }
}

/// Parses a JSON body with a 400 and a precise reason on failure.
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid body: {e}")))
}

/// The router; tests drive it without a socket.
pub fn router(state: AdminState) -> Router {
    let protected = Router::new()
        .route("/v1/backends", get(list).put(replace).post(add))
        .route("/v1/backends/{name}", get(one).delete(remove))
        .route("/v1/backends/{name}/drain", post(drain))
        .route("/v1/backends/{name}/undrain", post(undrain))
        .route("/v1/status", get(status))
        .route("/v1/cache", delete(flush_cache))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(protected)
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route".into()) })
        .layer(middleware::from_fn(json_errors))
        .with_state(state)
}

/// Serves the router on `listener` until `cancel`.
pub fn serve(
    listener: std::net::TcpListener,
    state: AdminState,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => return tracing::error!("admin listener: {e}"),
        };
        let app = router(state);
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await
        {
            tracing::error!("admin API stopped: {e}");
        }
    })
}

/// Equal-length byte strings compared without an early exit.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(s): State<AdminState>, req: Request, next: Next) -> Response {
    let token = s.shared.admin_token.load();
    if let Some(expected) = token.as_ref() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            return ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token".into(),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Gives the errors axum produces itself (405, 413, …) the same `{"error"}` body.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        let reason = status.canonical_reason().unwrap_or("error").to_lowercase();
        let mut json = ApiError(status, reason).into_response();
        // Keep what the original said besides its body (e.g. `Allow` on a 405).
        for (name, value) in resp.headers() {
            if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                json.headers_mut().insert(name.clone(), value.clone());
            }
        }
        return json;
    }
    resp
}

async fn list(State(s): State<AdminState>) -> Json<BackendList> {
    let snap = s.shared.set.load();
    Json(BackendList {
        generation: snap.generation,
        backends: snap.entries.iter().map(view).collect(),
    })
}

async fn one(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<BackendView>, ApiError> {
    let snap = s.shared.set.load();
    snap.get(&name)
        .map(|e| Json(view(e)))
        .ok_or_else(|| SetError::NotFound(name).into())
}

async fn replace(State(s): State<AdminState>, body: Bytes) -> Result<Json<Changed>, ApiError> {
    let body: ReplaceSet = parse(&body)?;
    if body.backends.is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "the backend set must not be empty".into(),
        ));
    }
    let problems = crate::config::validate_backends(&body.backends);
    if !problems.is_empty() {
        return Err(SetError::Invalid(problems).into());
    }
    if let Some(expected) = body.expected_generation {
        let current = s.shared.set.load().generation;
        if current != expected {
            return Err(SetError::Conflict { expected, current }.into());
        }
    }
    // Check every backend that is new to the set (by name and address) before
    // anything changes; the generation check below catches a race with a writer.
    let mut passed = Vec::new();
    if body.require_healthy {
        let snap = s.shared.set.snapshot();
        let cfg = s.shared.tunables.load().health.clone();
        let new: Vec<_> = body
            .backends
            .iter()
            .filter(|b| {
                snap.get(&b.name)
                    .is_none_or(|e| e.spec.address != b.address)
            })
            .map(|b| (b.clone(), b.address))
            .collect();
        let cfg2 = cfg.clone();
        let results = crate::health::check_all(new, move |addr| {
            let cfg = cfg2.clone();
            async move { crate::health::check(addr, &cfg).await }
        })
        .await;
        let mut failed = Vec::new();
        for (b, result) in results {
            match result {
                Ok(()) => passed.push(b),
                Err(e) => failed.push(format!("{} ({}): {e}", b.name, b.address)),
            }
        }
        if !failed.is_empty() {
            failed.sort();
            return Err(ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "health check failed, nothing changed: {}",
                    failed.join("; ")
                ),
            ));
        }
    }
    let count = body.backends.len();
    let generation = s
        .shared
        .change_off_runtime(move |cur| {
            if let Some(expected) = body.expected_generation {
                if cur.generation != expected {
                    return Err(SetError::Conflict {
                        expected,
                        current: cur.generation,
                    });
                }
            }
            Ok(body
                .backends
                .into_iter()
                .map(|spec| Member {
                    spec,
                    state: MemberState::Active,
                })
                .collect())
        })
        .await?;
    // The checks that let the swap happen count like any other: a backend that
    // passed is up now, not unknown.
    if !passed.is_empty() {
        let snap = s.shared.set.load();
        let cfg = s.shared.tunables.load().health.clone();
        for b in passed {
            if let Some(e) = snap.get(&b.name).filter(|e| e.spec.address == b.address) {
                crate::health::record(&e.runtime, &cfg, &Ok(()));
            }
        }
    }
    tracing::info!(generation, backends = count, "backend set replaced");
    Ok(Json(Changed { generation }))
}

async fn add(
    State(s): State<AdminState>,
    body: Bytes,
) -> Result<(StatusCode, Json<Changed>), ApiError> {
    let b: BackendConfig = parse(&body)?;
    let spec = b.clone();
    let generation = s
        .shared
        .change_off_runtime(move |cur| {
            if cur.get(&spec.name).is_some() {
                return Err(SetError::Exists(spec.name));
            }
            let mut m = backends::members(cur);
            m.push(Member {
                spec,
                state: MemberState::Active,
            });
            Ok(m)
        })
        .await?;
    tracing::info!(generation, backend = %b.name, address = %b.address, "backend added");
    Ok((StatusCode::CREATED, Json(Changed { generation })))
}

async fn remove(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<Changed>, ApiError> {
    let removed = name.clone();
    let generation = s
        .shared
        .change_off_runtime(move |cur| {
            if cur.get(&removed).is_none() {
                return Err(SetError::NotFound(removed));
            }
            if cur.entries.len() == 1 {
                // Like PUT, never leave the set empty by accident: drain it, or PUT a
                // replacement.
                return Err(SetError::Refused(format!(
                    "{removed:?} is the last backend; removing it would leave the set empty (drain it or PUT a new set)"
                )));
            }
            Ok(backends::members(cur)
                .into_iter()
                .filter(|m| m.spec.name != removed)
                .collect())
        })
        .await?;
    tracing::info!(generation, backend = %name, "backend removed");
    Ok(Json(Changed { generation }))
}

async fn set_state(
    s: &AdminState,
    name: &str,
    state: MemberState,
) -> Result<Json<Changed>, ApiError> {
    let target = name.to_string();
    let generation = s
        .shared
        .change_off_runtime(move |cur| {
            if cur.get(&target).is_none() {
                return Err(SetError::NotFound(target));
            }
            Ok(backends::members(cur)
                .into_iter()
                .map(|mut m| {
                    if m.spec.name == target {
                        m.state = state;
                    }
                    m
                })
                .collect())
        })
        .await?;
    tracing::info!(generation, backend = %name, state = ?state, "backend state changed");
    Ok(Json(Changed { generation }))
}

async fn drain(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<Changed>, ApiError> {
    set_state(&s, &name, MemberState::Draining).await
}

async fn undrain(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<Changed>, ApiError> {
    set_state(&s, &name, MemberState::Active).await
}

async fn status(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let snap = s.shared.set.load();
    let tun = s.shared.tunables.load();
    Json(json!({
        "version": crate::VERSION,
        "pid": std::process::id(),
        "uptime_s": s.shared.started.elapsed().as_secs(),
        "generation": snap.generation,
        "backends": snap.entries.len(),
        "backends_usable": snap.entries.iter().filter(|e| e.usable()).count(),
        "policy": tun.policy,
        "listen": s.shared.dns_addrs,
        "state_path": s.shared.state_path,
        "cache": {
            "enabled": s.shared.cache.enabled(),
            "entries_per_udp_worker": s.shared.cache.udp_entries,
            "entries_per_tcp_worker": s.shared.cache.tcp_entries,
            "max_ttl_s": s.shared.cache.max_ttl.as_secs(),
            "flushes": s.shared.cache_flushes(),
        },
    }))
}

/// Flushes every worker's packet cache: a query read after the response is not
/// answered from an earlier entry (each worker drops its entries when it next looks).
async fn flush_cache(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let flushes = s.shared.flush_cache();
    tracing::info!(flushes, "packet cache flushed");
    Json(json!({ "flushes": flushes, "enabled": s.shared.cache.enabled() }))
}

async fn healthz(State(s): State<AdminState>) -> (StatusCode, Json<serde_json::Value>) {
    if s.shared.set.load().any_usable() {
        (StatusCode::OK, Json(json!({ "status": "ok" })))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "no active backend is up or unknown" })),
        )
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let mut text = s.prometheus.render();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let snap = s.shared.set.load();
    let rows: Vec<_> = snap.entries.iter().map(|e| e.runtime.sample()).collect();
    crate::metrics::render_backends(&mut text, &rows);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}
