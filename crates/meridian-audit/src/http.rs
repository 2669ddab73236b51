//! The read-only HTTP audit API.
//!
//! | route | query |
//! |---|---|
//! | `GET /audit/rooms` | rooms with event counts |
//! | `GET /audit/rooms/{room}/history` | one room's events |
//! | `GET /audit/participants/{identity}` | a participant identity's events |
//! | `GET /audit/range?from=T&to=T` | events recorded in `[from, to)` (RFC 3339) |
//! | `GET /audit/export?format=jsonl\|csv` | the log as JSON lines or CSV, one page |
//! | `GET /audit/verify` | the hash chain check |
//!
//! Event lists take `?after=<position>&limit=N` (default 100, at most 10 000) and
//! answer `{"events": [...], "next_after": <position or null>}`; export pages carry
//! the next cursor in the `x-next-after` header. Every route needs
//! `Authorization: Bearer <token>` accepted by the [`AdminCheck`]: no token → 401,
//! a refused token → 403.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use meridian_events::{RecordedEvent, room_stream};
use meridian_store::{AuditQuery, MAX_QUERY_LIMIT, Store, StoreError, StreamInfo, VerifyReport};
use serde::{Deserialize, Serialize};

use crate::cli::{ExportFormat, write_csv_header, write_csv_row};

/// Decides whether a bearer token grants admin (audit) access. The `meridian` binary
/// implements it with its JWT verifier (admin grant required).
pub trait AdminCheck: Send + Sync + 'static {
    /// `Ok(())` when `bearer_token` may read the audit API; `Err(reason)` otherwise.
    fn check_admin(&self, bearer_token: &str) -> Result<(), String>;
}

/// An [`AdminCheck`] accepting one fixed token (for tests and local development).
#[derive(Debug, Clone)]
pub struct StaticAdminToken(pub String);

impl AdminCheck for StaticAdminToken {
    fn check_admin(&self, bearer_token: &str) -> Result<(), String> {
        // Compare without an early exit so timing does not reveal a matching prefix.
        let a = self.0.as_bytes();
        let b = bearer_token.as_bytes();
        let mut diff = a.len() ^ b.len();
        for (x, y) in a.iter().zip(b) {
            diff |= usize::from(x ^ y);
        }
        if diff == 0 && !a.is_empty() {
            Ok(())
        } else {
            Err("token is not an admin token".into())
        }
    }
}

#[derive(Clone)]
struct AppState {
    store: Store,
    auth: Arc<dyn AdminCheck>,
}

/// The read-only audit API over `store`, each request checked by `auth`.
pub fn router(store: Store, auth: Arc<dyn AdminCheck>) -> Router {
    let state = AppState { store, auth };
    Router::new()
        .route("/audit/rooms", get(rooms))
        .route("/audit/rooms/{room}/history", get(history))
        .route("/audit/participants/{identity}", get(participant))
        .route("/audit/range", get(range))
        .route("/audit/export", get(export))
        .route("/audit/verify", get(verify))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin))
        .with_state(state)
}

async fn require_admin(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        let mut r = error(StatusCode::UNAUTHORIZED, "missing bearer token");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    };
    match state.auth.check_admin(token) {
        Ok(()) => next.run(request).await,
        Err(reason) => error(StatusCode::FORBIDDEN, &reason),
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

struct ApiError(StatusCode, String);

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::InvalidInput(_) => StatusCode::BAD_REQUEST,
            StoreError::Unavailable { .. } | StoreError::Closed => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.0, &self.1)
    }
}

/// `?after=<position>&limit=N`.
#[derive(Debug, Deserialize)]
struct Page {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

impl Page {
    fn limit(&self) -> Result<usize, ApiError> {
        match self.limit.unwrap_or(100) {
            0 => Err(ApiError(
                StatusCode::BAD_REQUEST,
                "limit must be ≥ 1".into(),
            )),
            n if n > MAX_QUERY_LIMIT => Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("limit must be ≤ {MAX_QUERY_LIMIT}"),
            )),
            n => Ok(n),
        }
    }
}

/// A page of events and the cursor for the next one.
#[derive(Debug, Serialize)]
struct EventPage {
    events: Vec<RecordedEvent>,
    next_after: Option<u64>,
}

async fn page(store: &Store, mut q: AuditQuery, p: &Page) -> Result<Json<EventPage>, ApiError> {
    q.after_position = p.after;
    q.limit = p.limit()?;
    let events = store.query(&q).await?;
    let next_after = match events.last() {
        Some(last) if events.len() == q.limit => Some(last.position),
        _ => None,
    };
    Ok(Json(EventPage { events, next_after }))
}

async fn rooms(State(s): State<AppState>) -> Result<Json<Vec<StreamInfo>>, ApiError> {
    Ok(Json(s.store.streams("room:").await?))
}

async fn history(
    State(s): State<AppState>,
    Path(room): Path<String>,
    Query(p): Query<Page>,
) -> Result<Json<EventPage>, ApiError> {
    let q = AuditQuery {
        stream: Some(room_stream(&room)),
        ..AuditQuery::default()
    };
    page(&s.store, q, &p).await
}

async fn participant(
    State(s): State<AppState>,
    Path(identity): Path<String>,
    Query(p): Query<Page>,
) -> Result<Json<EventPage>, ApiError> {
    let q = AuditQuery {
        identity: Some(identity),
        ..AuditQuery::default()
    };
    page(&s.store, q, &p).await
}

#[derive(Debug, Deserialize)]
struct RangeParams {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

async fn range(
    State(s): State<AppState>,
    Query(r): Query<RangeParams>,
) -> Result<Json<EventPage>, ApiError> {
    if r.from > r.to {
        return Err(ApiError(StatusCode::BAD_REQUEST, "from is after to".into()));
    }
    let q = AuditQuery {
        from: Some(r.from),
        to: Some(r.to),
        ..AuditQuery::default()
    };
    page(
        &s.store,
        q,
        &Page {
            after: r.after,
            limit: r.limit,
        },
    )
    .await
}

#[derive(Debug, Deserialize)]
struct ExportParams {
    format: Option<ExportFormat>,
    room: Option<String>,
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

async fn export(
    State(s): State<AppState>,
    Query(x): Query<ExportParams>,
) -> Result<Response, ApiError> {
    let p = Page {
        after: x.after,
        limit: x.limit,
    };
    let q = AuditQuery {
        stream: x.room.as_deref().map(room_stream),
        after_position: p.after,
        limit: p.limit()?,
        ..AuditQuery::default()
    };
    let events = s.store.query(&q).await?;
    let mut body = Vec::new();
    let format = x.format.unwrap_or(ExportFormat::Jsonl);
    let written: std::io::Result<()> = (|| {
        match format {
            ExportFormat::Jsonl => {
                for e in &events {
                    serde_json::to_writer(&mut body, e).map_err(std::io::Error::other)?;
                    body.push(b'\n');
                }
            }
            ExportFormat::Csv => {
                write_csv_header(&mut body)?;
                for e in &events {
                    write_csv_row(&mut body, e)?;
                }
            }
        }
        Ok(())
    })();
    written.map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(match format {
            ExportFormat::Jsonl => "application/x-ndjson",
            ExportFormat::Csv => "text/csv; charset=utf-8",
        }),
    );
    if let Some(last) = events.last().filter(|_| events.len() == q.limit) {
        headers.insert("x-next-after", HeaderValue::from(last.position));
    }
    Ok((headers, body).into_response())
}

async fn verify(State(s): State<AppState>) -> Result<Json<VerifyJson>, ApiError> {
    let report = s.store.verify_chain().await?;
    Ok(Json(VerifyJson {
        ok: report.is_ok(),
        report,
    }))
}

#[derive(Debug, Serialize)]
struct VerifyJson {
    ok: bool,
    #[serde(flatten)]
    report: VerifyReport,
}
