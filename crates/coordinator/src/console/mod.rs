//! The read-only web console (`[console]`, off unless configured): the fleet,
//! secrets, rotations with a live wave/host grid, timelines, alerts,
//! incidents and the audit log, served by rekeyd on its own listener.
//!
//! Static assets (HTML, CSS, vanilla JS; no build step, no CDN) are embedded
//! in the binary. The JSON it reads is exactly the `rekey_types::v1` views the
//! admin API answers, built by `service::views`. Live updates: one
//! server-sent event stream per page, fed by `EngineState::rotation_changes`
//! and `Sessions::changes`; the page refetches what it shows on each event.
//!
//! Access (docs/console.md): loopback only unless `allow_remote`; every
//! request but `/login` and the stylesheet needs a session cookie, which only
//! a one-time link from `rekey console` opens ([`auth`]). Tasks: the
//! `console` listener under the supervisor (front phase), and one short task
//! per open event stream (at most [`MAX_STREAMS`]), ending with its client,
//! its session or shutdown.

mod api;
pub mod auth;

pub use auth::{Grant, LOGIN_TTL, LoginError, LoginLink, Logins};

use crate::alerts::Alerts;
use crate::config::Config;
use crate::engine::campaign::Campaigns;
use crate::engine::driver::EngineHandle;
use crate::service::admin::AdminSvc;
use crate::sessions::Sessions;
use crate::store::Store;
use crate::supervisor::{Phase, Supervisor};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rekey_common::time::now_unix_ms;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Live event streams open at once, at most (each is one small task).
pub const MAX_STREAMS: usize = 64;
/// The session cookie's name.
const COOKIE: &str = "rekey_console";

const INDEX_HTML: &str = include_str!("../../assets/console/index.html");
const LOGIN_HTML: &str = include_str!("../../assets/console/login.html");
const APP_JS: &str = include_str!("../../assets/console/app.js");
const CONSOLE_CSS: &str = include_str!("../../assets/console/console.css");

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot listen for the web console on {addr} ([console] listen)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the web console's listener failed")]
    Serve(#[source] std::io::Error),
}

/// What the console's handlers read (cheap clones of rekeyd's handles).
#[derive(Clone)]
struct Console {
    config: Arc<Config>,
    store: Store,
    sessions: Sessions,
    engine: EngineHandle,
    campaigns: Campaigns,
    alerts: Alerts,
    logins: Logins,
    streams: Arc<tokio::sync::Semaphore>,
    stop: CancellationToken,
    listen: SocketAddr,
}

/// Binds the console's listener when `[console]` is configured and runs it
/// as the supervisor's `console` task (front phase). The bound address, if
/// any; a bind failure stops rekeyd's start with the address named.
pub async fn serve(tasks: &mut Supervisor, admin: &AdminSvc) -> Result<Option<SocketAddr>, ConsoleError> {
    let Some(cfg) = admin.console.config().cloned() else { return Ok(None) };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ConsoleError::Bind { addr: cfg.listen, source })?;
    let addr = listener.local_addr().map_err(|source| ConsoleError::Bind { addr: cfg.listen, source })?;
    admin.console.set_addr(addr);
    let console = Console {
        config: admin.config.clone(),
        store: admin.store.clone(),
        sessions: admin.sessions.clone(),
        engine: admin.engine.clone(),
        campaigns: admin.campaigns.clone(),
        alerts: admin.alerts.clone(),
        logins: admin.console.clone(),
        streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
        stop: CancellationToken::new(),
        listen: cfg.listen,
    };
    tasks.spawn("console", Phase::Front, move |stop| async move {
        let streams_stop = console.stop.clone();
        let app = router(console);
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                stop.cancelled().await;
                // Open event streams end so the graceful shutdown can finish.
                streams_stop.cancel();
            })
            .await
            .map_err(ConsoleError::Serve)
    });
    tracing::info!(%addr, "web console listening (`rekey console` prints a login link)");
    Ok(Some(addr))
}

fn router(c: Console) -> Router {
    let private = Router::new()
        .route("/", get(|| async { html(StatusCode::OK, INDEX_HTML) }))
        .route("/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS) }))
        .route("/api/whoami", get(api::whoami))
        .route("/api/fleet", get(api::fleet))
        .route("/api/secrets", get(api::secrets))
        .route("/api/rotations", get(api::rotations))
        .route("/api/rotations/{id}", get(api::rotation))
        .route("/api/alerts", get(api::alerts))
        .route("/api/incidents", get(api::incidents))
        .route("/api/audit", get(api::audit))
        .route("/api/events", get(api::events))
        .route_layer(from_fn_with_state(c.clone(), require_session));
    Router::new()
        .route("/login", get(login))
        .route("/console.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CONSOLE_CSS) }))
        .merge(private)
        .fallback(|| async { (StatusCode::NOT_FOUND, "no such page") })
        .layer(from_fn_with_state(c.clone(), guard))
        .with_state(c)
}

fn html(status: StatusCode, body: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

/// Every response: the Host must be this console's (no DNS rebinding onto a
/// loopback port), and the headers that keep the page in its own origin and
/// out of caches.
async fn guard(State(c): State<Console>, req: Request, next: Next) -> Response {
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let mut resp = if host_allowed(host, c.listen) {
        next.run(req).await
    } else {
        tracing::warn!(host, "console request for another host name refused");
        (StatusCode::MISDIRECTED_REQUEST, "this console answers only to its loopback address").into_response()
    };
    let h = resp.headers_mut();
    let set = |h: &mut HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'",
    );
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::REFERRER_POLICY, "no-referrer");
    set(h, header::CACHE_CONTROL, "no-store");
    set(h, header::HeaderName::from_static("cross-origin-opener-policy"), "same-origin");
    set(h, header::HeaderName::from_static("cross-origin-resource-policy"), "same-origin");
    resp
}

/// A loopback console answers to loopback names only (`127.0.0.1:PORT`,
/// `localhost:PORT`, `[::1]:PORT`, any port: an SSH tunnel may use another).
/// One served elsewhere on purpose (`allow_remote`) answers to any name.
fn host_allowed(host: &str, listen: SocketAddr) -> bool {
    if !listen.ip().is_loopback() {
        return true;
    }
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// Every private route: a live session whose operator is not revoked (read
/// from the store on every request, as the admin API does).
async fn require_session(State(c): State<Console>, mut req: Request, next: Next) -> Response {
    let grant = cookie_value(req.headers()).and_then(|v| c.logins.session(v, now_unix_ms()));
    let Some(grant) = grant else { return no_session(&req) };
    match c.store.get_operator(&grant.operator) {
        Ok(Some(rec)) if rec.revoked_unix.is_none() => {}
        Ok(_) => {
            tracing::warn!(operator = %grant.operator, "console session of a revoked operator ended");
            c.logins.end_sessions_of(&grant.operator);
            return no_session(&req);
        }
        Err(e) => return api::ApiError::from(e).into_response(),
    }
    req.extensions_mut().insert(grant);
    next.run(req).await
}

fn no_session(req: &Request) -> Response {
    if req.uri().path() == "/" {
        html(StatusCode::UNAUTHORIZED, LOGIN_HTML)
    } else {
        (StatusCode::UNAUTHORIZED, "no console session: run `rekey console` for a login link").into_response()
    }
}

/// `/login?token=…`: a one-time link becomes a session cookie (HttpOnly,
/// SameSite=Strict, as long as `session_ttl`), then `/`. Audited.
async fn login(State(c): State<Console>, req: Request) -> Response {
    let token = req.uri().query().unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("token=")).unwrap_or("");
    let redeemed = match c.logins.redeem(token, now_unix_ms()) {
        Ok(r) => r,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let Some((cookie, grant)) = redeemed else {
        tracing::warn!("console login with a link that is unknown, used or expired");
        return html(StatusCode::UNAUTHORIZED, LOGIN_HTML);
    };
    let max_age = (grant.expires_ms - now_unix_ms()).max(0) / 1000;
    crate::service::audit_to(
        c.engine.state(),
        &format!("operator/{}", grant.operator),
        "console.login",
        serde_json::json!({ "operator": grant.operator, "role": grant.role, "expires_ms": grant.expires_ms }),
    );
    tracing::info!(operator = %grant.operator, role = %grant.role, "console login");
    let set_cookie = format!("{COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}");
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    if let Ok(v) = HeaderValue::from_str(&set_cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_host_names_reach_a_loopback_console() {
        let lo: SocketAddr = "127.0.0.1:7402".parse().unwrap();
        for ok in ["127.0.0.1:7402", "localhost:9000", "LOCALHOST", "[::1]:7402", "127.0.0.2:1"] {
            assert!(host_allowed(ok, lo), "{ok}");
        }
        for bad in ["evil.example:7402", "", "10.0.0.1:7402", "127.0.0.1.evil.example:7402"] {
            assert!(!host_allowed(bad, lo), "{bad}");
        }
        assert!(host_allowed("console.example:7402", "0.0.0.0:7402".parse().unwrap()));
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; rekey_console=abc; b=2"));
        assert_eq!(cookie_value(&h), Some("abc"));
        h.insert(header::COOKIE, HeaderValue::from_static("rekey_consolex=abc"));
        assert_eq!(cookie_value(&h), None);
    }
}
