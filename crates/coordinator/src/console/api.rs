//! The console's JSON and event stream: the admin API's views
//! (`service::views`), read straight from rekeyd's handles.

use super::{Console, Grant};
use crate::service::views;
use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use rekey_common::error::chain as one_line;
use rekey_types::v1::{
    AgentView, AlertView, AuditRecordView, AuditVerifyView, IncidentView, RotationSummary, RotationView, SecretView,
};
use serde::Serialize;
use std::convert::Infallible;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

/// Audit records the console shows, newest first (`rekey audit` has them all).
const AUDIT_SHOWN: usize = 500;
/// Changes within this long reach the page as one event.
const COALESCE: Duration = Duration::from_millis(150);

/// A failed read, as a status and a message (never a value: the views hold none).
pub(super) struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

impl<E: std::error::Error + 'static> From<E> for ApiError {
    fn from(e: E) -> Self {
        tracing::error!(error = %one_line(&e), "console read failed");
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("coordinator read failed: {}", one_line(&e)))
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Who the console session is (the page shows it).
#[derive(Serialize)]
pub(super) struct WhoAmI {
    operator: String,
    role: String,
    expires_ms: i64,
}

pub(super) async fn whoami(Extension(g): Extension<Grant>) -> Json<WhoAmI> {
    Json(WhoAmI { operator: g.operator, role: g.role.to_string(), expires_ms: g.expires_ms })
}

pub(super) async fn fleet(State(c): State<Console>) -> ApiResult<Vec<AgentView>> {
    let now = rekey_common::time::now_unix();
    let mut agents: Vec<AgentView> =
        c.store.list_agents()?.iter().map(|a| views::agent(a, c.sessions.is_connected(&a.name), now)).collect();
    agents.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(agents))
}

pub(super) async fn secrets(State(c): State<Console>) -> ApiResult<Vec<SecretView>> {
    Ok(Json(views::secrets(&c.config, c.engine.state(), &c.store)?))
}

pub(super) async fn rotations(State(c): State<Console>) -> ApiResult<Vec<RotationSummary>> {
    let mut all = c.engine.state().list_rotations()?;
    all.sort_by_key(|r| std::cmp::Reverse(r.created_ms));
    Ok(Json(all.iter().map(RotationSummary::from).collect()))
}

pub(super) async fn rotation(State(c): State<Console>, Path(id): Path<String>) -> Result<Json<RotationView>, ApiError> {
    match c.engine.state().get_rotation(&id)? {
        Some(r) => Ok(Json(RotationView::from(&r))),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no rotation {id:?}"))),
    }
}

pub(super) async fn alerts(State(c): State<Console>) -> ApiResult<Vec<AlertView>> {
    let mut all = c.alerts.list()?;
    all.reverse(); // newest first
    Ok(Json(all.iter().map(AlertView::from).collect()))
}

pub(super) async fn incidents(State(c): State<Console>) -> ApiResult<Vec<IncidentView>> {
    let mut all = c.campaigns.list()?;
    all.sort_by_key(|i| std::cmp::Reverse(i.opened_ms));
    let state = c.engine.state();
    let v = all.iter().map(|i| views::incident(i, |id| state.get_rotation(id))).collect::<Result<Vec<_>, _>>()?;
    Ok(Json(v))
}

/// The audit page: the chain's verification and its newest records.
#[derive(Serialize)]
pub(super) struct AuditPage {
    verification: AuditVerifyView,
    /// How many records the chain holds (the page shows the newest).
    total: usize,
    records: Vec<AuditRecordView>,
}

pub(super) async fn audit(State(c): State<Console>) -> ApiResult<AuditPage> {
    let records = c.engine.state().audit_records()?;
    let verification = AuditVerifyView::from(&crate::audit::verify(&records));
    let shown = records.iter().rev().take(AUDIT_SHOWN).map(AuditRecordView::from).collect();
    Ok(Json(AuditPage { verification, total: records.len(), records: shown }))
}

/// Server-sent events: `hello` once, then `change` (data: what changed,
/// `rotations` or `fleet`) after committed rotation changes and session
/// connects/disconnects, coalesced; `expired` when the session ends.
pub(super) async fn events(State(c): State<Console>, Extension(g): Extension<Grant>) -> Result<Response, ApiError> {
    let permit = c.streams.clone().try_acquire_owned().map_err(|_| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{} console event streams are open already", super::MAX_STREAMS),
        )
    })?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut rotations = c.engine.state().rotation_changes();
    let mut fleet = c.sessions.changes();
    let left_ms = u64::try_from(g.expires_ms - rekey_common::time::now_unix_ms()).unwrap_or(0);
    let expiry = tokio::time::sleep(Duration::from_millis(left_ms));
    let task = async move {
        let _permit = permit;
        tokio::pin!(expiry);
        let mut n = 0u64;
        if tx.send(Ok(Event::default().event("hello").data("live"))).await.is_err() {
            return;
        }
        loop {
            let what = tokio::select! {
                r = rotations.changed() => if r.is_ok() { "rotations" } else { break },
                r = fleet.changed() => if r.is_ok() { "fleet" } else { break },
                () = &mut expiry => {
                    let _ = tx.send(Ok(Event::default().event("expired").data("session expired"))).await;
                    break;
                }
                () = tx.closed() => break,
                () = c.stop.cancelled() => break,
            };
            tokio::time::sleep(COALESCE).await;
            rotations.borrow_and_update();
            fleet.borrow_and_update();
            n += 1;
            if tx.send(Ok(Event::default().event("change").id(n.to_string()).data(what))).await.is_err() {
                break;
            }
        }
    };
    tokio::spawn(task.instrument(tracing::info_span!("console-events", operator = %g.operator)));
    let stream: ReceiverStream<Result<Event, Infallible>> = ReceiverStream::new(rx);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}
