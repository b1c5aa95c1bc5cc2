//! The demo key API: state, persistence and routes (see the crate docs).

use axum::extract::{FromRequestParts, Path, State};
use axum::http::{HeaderMap, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::RngCore;
use rekey_common::secret::SecretBytes;
use rekey_common::time::{now_unix, now_unix_ms};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Active,
    Inactive,
}

/// A key as stored: its secret only as a SHA-256 digest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub secret_sha256: String,
    pub status: Status,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    /// The last use to the millisecond (`last_used_at` is its whole second).
    #[serde(default)]
    pub last_used_ms: Option<i64>,
    /// The `User-Agent` of the last use (where it came from, as the API saw it).
    #[serde(default)]
    pub last_used_by: Option<String>,
}

/// A key as listed: no secret, no digest. The same facts in the shapes real
/// APIs use, so the `http` provider can be tested against each: a status
/// string and a boolean, whole seconds, fractional seconds, milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeyView {
    pub id: String,
    pub name: String,
    pub status: Status,
    pub enabled: bool,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    /// Unix seconds with a fraction (milliseconds).
    pub last_used_unix: Option<f64>,
    pub last_used_at_ms: Option<i64>,
    pub last_used_by: Option<String>,
}

impl From<&KeyRecord> for KeyView {
    fn from(k: &KeyRecord) -> Self {
        let ms = k.last_used_ms.or(k.last_used_at.map(|s| s * 1000));
        KeyView {
            id: k.id.clone(),
            name: k.name.clone(),
            status: k.status,
            enabled: k.status == Status::Active,
            created_at: k.created_at,
            last_used_at: k.last_used_at,
            last_used_unix: ms.map(|ms| ms as f64 / 1000.0),
            last_used_at_ms: ms,
            last_used_by: k.last_used_by.clone(),
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    keys: BTreeMap<String, KeyRecord>,
}

/// Why a delete was refused.
#[derive(Debug, PartialEq)]
pub enum DeleteRefused {
    NotFound,
    /// The key is active: deactivate it first.
    Active,
}

/// Why a `whoami` was refused.
#[derive(Debug, PartialEq)]
pub enum Rejection {
    Unknown,
    Inactive(String),
}

/// The keys, and the file they persist to.
pub struct Keys {
    data: Persisted,
    path: Option<PathBuf>,
}

fn digest(secret: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, secret))
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

impl Keys {
    /// Loads `path` if given and present.
    pub fn open(path: Option<PathBuf>) -> anyhow::Result<Keys> {
        let data = match &path {
            Some(p) if p.exists() => {
                let text = std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
                serde_json::from_slice(&text).map_err(|e| anyhow::anyhow!("{} is damaged: {e}", p.display()))?
            }
            _ => Persisted::default(),
        };
        Ok(Keys { data, path })
    }

    fn save(&self) {
        let Some(p) = &self.path else { return };
        let json = serde_json::to_vec_pretty(&self.data).expect("serializable");
        // Digests only, no secret: readable like the rest of the demo's files.
        if let Err(e) = rekey_common::fs::write_atomic(p, &json, 0o644) {
            tracing::error!(path = %p.display(), error = %rekey_common::error::Chain(&e), "cannot save the key state");
        }
    }

    /// Creates an active key; returns its record and the secret (shown once).
    pub fn create(&mut self, name: &str, now: i64) -> (KeyRecord, SecretBytes) {
        let id = format!("key_{}", random_hex(8));
        let secret = SecretBytes::new(format!("dk_{}", random_hex(24)).into_bytes());
        let rec = KeyRecord {
            id: id.clone(),
            name: name.to_string(),
            secret_sha256: digest(secret.expose()),
            status: Status::Active,
            created_at: now,
            last_used_at: None,
            last_used_ms: None,
            last_used_by: None,
        };
        self.data.keys.insert(id, rec.clone());
        self.save();
        (rec, secret)
    }

    pub fn list(&self) -> Vec<KeyView> {
        let mut v: Vec<KeyView> = self.data.keys.values().map(KeyView::from).collect();
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        v
    }

    pub fn set_status(&mut self, id: &str, status: Status) -> Option<KeyView> {
        let rec = self.data.keys.get_mut(id)?;
        rec.status = status;
        let view = KeyView::from(&*rec);
        self.save();
        Some(view)
    }

    /// Deletes an inactive key. An active key is refused, as real key APIs
    /// do: it must be deactivated first.
    pub fn delete(&mut self, id: &str) -> Result<(), DeleteRefused> {
        match self.data.keys.get(id).map(|k| k.status) {
            None => Err(DeleteRefused::NotFound),
            Some(Status::Active) => Err(DeleteRefused::Active),
            Some(Status::Inactive) => {
                self.data.keys.remove(id);
                self.save();
                Ok(())
            }
        }
    }

    /// The key a secret belongs to, if active; records its use (at
    /// `now_ms`, by `agent`, the caller's `User-Agent`).
    pub fn authenticate(&mut self, secret: &[u8], now_ms: i64, agent: Option<&str>) -> Result<KeyView, Rejection> {
        let d = digest(secret);
        let rec = self.data.keys.values_mut().find(|k| k.secret_sha256 == d).ok_or(Rejection::Unknown)?;
        if rec.status != Status::Active {
            return Err(Rejection::Inactive(rec.id.clone()));
        }
        rec.last_used_at = Some(now_ms.div_euclid(1000));
        rec.last_used_ms = Some(now_ms);
        rec.last_used_by = agent.map(|a| a.chars().take(100).collect());
        let view = KeyView::from(&*rec);
        self.save();
        Ok(view)
    }
}

#[derive(Clone)]
pub struct AppState {
    keys: Arc<Mutex<Keys>>,
    admin_sha256: Arc<String>,
}

impl AppState {
    pub fn new(keys: Keys, admin_token: &SecretBytes) -> AppState {
        AppState { keys: Arc::new(Mutex::new(keys)), admin_sha256: Arc::new(digest(admin_token.expose())) }
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    headers.get(header::AUTHORIZATION)?.as_bytes().strip_prefix(b"Bearer ").map(<[u8]>::trim_ascii)
}

/// An admin call: the bearer token is the admin token.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Admin, Response> {
        // Digests compared, so the comparison leaks nothing about the token.
        match bearer(&parts.headers) {
            Some(t) if digest(t) == *state.admin_sha256 => Ok(Admin),
            _ => {
                tracing::warn!(path = %parts.uri.path(), "admin call refused: missing or wrong admin token");
                Err(error(StatusCode::UNAUTHORIZED, "admin token required"))
            }
        }
    }
}

#[derive(Deserialize)]
struct CreateKey {
    name: String,
}

#[derive(Serialize)]
struct Created {
    id: String,
    name: String,
    secret: String,
    created_at: i64,
}

async fn create_key(_: Admin, State(s): State<AppState>, Json(body): Json<CreateKey>) -> Response {
    let name = body.name.trim();
    if name.is_empty() || name.len() > 100 {
        return error(StatusCode::BAD_REQUEST, "name must be 1 to 100 characters");
    }
    let (rec, secret) = s.keys.lock().expect("keys lock").create(name, now_unix());
    tracing::info!(id = %rec.id, name = %rec.name, "key created");
    let body = Created {
        id: rec.id,
        name: rec.name,
        secret: String::from_utf8(secret.expose().to_vec()).expect("hex"),
        created_at: rec.created_at,
    };
    (StatusCode::CREATED, Json(body)).into_response()
}

async fn list_keys(_: Admin, State(s): State<AppState>) -> Json<Vec<KeyView>> {
    Json(s.keys.lock().expect("keys lock").list())
}

async fn set_status(s: &AppState, id: &str, status: Status) -> Response {
    match s.keys.lock().expect("keys lock").set_status(id, status) {
        Some(view) => {
            tracing::info!(%id, status = ?status, "key status changed");
            Json(view).into_response()
        }
        None => error(StatusCode::NOT_FOUND, &format!("no key {id}")),
    }
}

async fn deactivate(_: Admin, State(s): State<AppState>, Path(id): Path<String>) -> Response {
    set_status(&s, &id, Status::Inactive).await
}

async fn activate(_: Admin, State(s): State<AppState>, Path(id): Path<String>) -> Response {
    set_status(&s, &id, Status::Active).await
}

async fn delete_key(_: Admin, State(s): State<AppState>, Path(id): Path<String>) -> Response {
    let result = s.keys.lock().expect("keys lock").delete(&id);
    match result {
        Ok(()) => {
            tracing::info!(%id, "key deleted");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(DeleteRefused::Active) => {
            tracing::warn!(%id, "delete refused: key is active");
            error(StatusCode::CONFLICT, "key is active; deactivate first")
        }
        Err(DeleteRefused::NotFound) => error(StatusCode::NOT_FOUND, &format!("no key {id}")),
    }
}

async fn whoami(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let Some(token) = bearer(&headers) else {
        tracing::info!("whoami refused: no bearer token");
        return error(StatusCode::UNAUTHORIZED, "bearer token required");
    };
    let agent = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok());
    let result = s.keys.lock().expect("keys lock").authenticate(token, now_unix_ms(), agent);
    match result {
        Ok(view) => {
            tracing::info!(id = %view.id, "whoami accepted");
            Json(serde_json::json!({ "id": view.id, "name": view.name })).into_response()
        }
        Err(Rejection::Inactive(id)) => {
            tracing::warn!(%id, "whoami refused: key is inactive");
            error(StatusCode::UNAUTHORIZED, "key is inactive")
        }
        Err(Rejection::Unknown) => {
            tracing::warn!("whoami refused: unknown key");
            error(StatusCode::UNAUTHORIZED, "unknown key")
        }
    }
}

/// Logs every call: method, path, status, duration. Never a header.
async fn log_calls(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let start = std::time::Instant::now();
    let resp = next.run(req).await;
    tracing::info!(%method, %path, status = resp.status().as_u16(), ms = start.elapsed().as_millis() as u64, "call");
    resp
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/keys", post(create_key).get(list_keys))
        .route("/v1/keys/{id}", axum::routing::delete(delete_key))
        .route("/v1/keys/{id}/deactivate", post(deactivate))
        .route("/v1/keys/{id}/activate", post(activate))
        .route("/v1/whoami", get(whoami))
        .layer(axum::middleware::from_fn(log_calls))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_lifecycle_and_persistence_without_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mut keys = Keys::open(Some(path.clone())).unwrap();
        let (rec, secret) = keys.create("web", 100);
        assert!(rec.id.starts_with("key_"));
        assert!(crate::credentials::is_demo_key(secret.expose()));
        let used = keys.authenticate(secret.expose(), 200_250, Some("host-1 curl")).unwrap();
        assert_eq!(
            (used.last_used_at, used.last_used_at_ms, used.last_used_unix),
            (Some(200), Some(200_250), Some(200.25))
        );
        assert_eq!((used.enabled, used.last_used_by.as_deref()), (true, Some("host-1 curl")));
        assert_eq!(keys.authenticate(b"dk_nope", 200_000, None), Err(Rejection::Unknown));

        let stored = std::fs::read_to_string(&path).unwrap();
        assert!(!stored.contains(std::str::from_utf8(secret.expose()).unwrap()), "{stored}");

        assert_eq!(keys.delete(&rec.id), Err(DeleteRefused::Active), "an active key is not deleted");
        keys.set_status(&rec.id, Status::Inactive).unwrap();
        assert_eq!(keys.authenticate(secret.expose(), 300_000, None), Err(Rejection::Inactive(rec.id.clone())));
        // Reloaded from disk.
        let mut again = Keys::open(Some(path)).unwrap();
        assert_eq!((again.list()[0].status, again.list()[0].enabled), (Status::Inactive, false));
        assert_eq!(again.list()[0].last_used_by.as_deref(), Some("host-1 curl"));
        again.set_status(&rec.id, Status::Active).unwrap();
        assert!(again.authenticate(secret.expose(), 400_000, None).is_ok());
        again.set_status(&rec.id, Status::Inactive).unwrap();
        assert_eq!(again.delete(&rec.id), Ok(()));
        assert_eq!(again.delete(&rec.id), Err(DeleteRefused::NotFound));
        assert!(again.list().is_empty());
    }
}
