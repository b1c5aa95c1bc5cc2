//! Routes against local HTTP receivers (axum on loopback) that record what
//! Slack and PagerDuty would have received.

use super::*;
use crate::store::Store;
use std::collections::HashMap;
use std::sync::Mutex;

type Seen = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

/// A receiver on a free loopback port: every POST body, with its path.
async fn receiver() -> (String, Seen) {
    rekey_common::tls::install_crypto_provider();
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/{*path}",
        axum::routing::post(move |uri: axum::http::Uri, body: String| {
            let s = s.clone();
            async move {
                let v = serde_json::from_str(&body).expect("a JSON body");
                s.lock().unwrap().push((uri.path().to_string(), v));
                axum::http::StatusCode::ACCEPTED
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    (format!("http://{addr}"), seen)
}

fn secret_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn config(dir: &Path, routes: &str) -> Result<Vec<Route>, String> {
    let text = format!("listen = \"127.0.0.1:7400\"\ndata_dir = \"d\"\nmaster_key_file = \"m\"\n{routes}");
    crate::config::Config::from_str(&dir.join("coordinator.toml"), &text)
        .map(|c| c.alert_routes)
        .map_err(|e| rekey_common::error::chain(&e))
}

#[test]
fn routes_are_read_from_config_and_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    secret_file(dir.path(), "slack.url", "https://hooks.slack.invalid/services/T/B/X\n", 0o600);
    secret_file(dir.path(), "pd.key", "R0UTINGKEY\n", 0o600);
    secret_file(dir.path(), "open.key", "R0UTINGKEY\n", 0o644);
    let ok = "[[alerts.route]]\nkind = \"slack\"\nurl_file = \"slack.url\"\n\
              [[alerts.route]]\nkind = \"pagerduty\"\nmin_severity = \"critical\"\nrouting_key_file = \"pd.key\"\n";
    let routes = config(dir.path(), ok).unwrap();
    assert_eq!(routes.len(), 2);
    assert_eq!((routes[0].kind(), routes[0].min_severity), ("slack", Severity::Warning));
    assert_eq!((routes[1].kind(), routes[1].min_severity), ("pagerduty", Severity::Critical));
    assert!(matches!(&routes[1].target, Target::PagerDuty { events_url, .. } if events_url == PAGERDUTY_URL));
    // The signed webhook's keys still work beside the routes.
    secret_file(dir.path(), "hook.key", "0123456789abcdef0123\n", 0o600);
    let hook = "[alerts]\nwebhook_url = \"https://hooks.invalid/rekey\"\nwebhook_secret_file = \"hook.key\"\n";
    let text = format!("{hook}{}", ok.replace("[[alerts.route]]", "[[alerts.route]]\n").trim_start());
    let c = crate::config::Config::from_str(
        &dir.path().join("coordinator.toml"),
        &format!("listen = \"127.0.0.1:7400\"\ndata_dir = \"d\"\nmaster_key_file = \"m\"\n{text}"),
    )
    .unwrap();
    assert_eq!((c.alert_routes.len(), c.webhook.map(|w| w.url)), (2, Some("https://hooks.invalid/rekey".into())));

    let bad = [
        (ok.replace("pd.key", "open.key"), "alerts.route[1].routing_key_file", "chmod 600"),
        (ok.replace("\"critical\"", "\"page\""), "alerts.route[1].min_severity", "\"warning\" or \"critical\""),
        (ok.replace("kind = \"slack\"", "kind = \"teams\""), "alerts.route[0].kind", "\"slack\" or \"pagerduty\""),
        (ok.replace("routing_key_file = \"pd.key\"", ""), "alerts.route[1].routing_key_file", "missing"),
        (ok.replace("url_file = \"slack.url\"", "url = \"https://x\""), "unknown field `url`", ""),
    ];
    for (text, field, why) in bad {
        let e = config(dir.path(), &text).unwrap_err();
        assert!(e.contains("coordinator.toml") && e.contains(field) && e.contains(why), "{e}");
        assert!(!e.contains("R0UTINGKEY") && !e.contains("services/T/B/X"), "a secret in an error: {e}");
    }
}

fn alert(seq: u64, kind: AlertKind, severity: Severity, rotation: &str) -> Alert {
    Alert {
        seq,
        at_ms: 1_760_000_000_000,
        kind,
        severity,
        secret: "api-key".into(),
        rotation: Some(rotation.into()),
        message: format!("alert {seq}: {}", kind.as_str()),
        details: serde_json::json!({ "version": "v1" }),
        delivery: "not_configured".into(),
    }
}

async fn wait_for(seen: &Seen, n: usize) -> Vec<(String, serde_json::Value)> {
    for _ in 0..500 {
        if seen.lock().unwrap().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen.lock().unwrap().clone()
}

#[tokio::test]
async fn slack_and_pagerduty_get_their_payloads_by_severity_and_pagerduty_is_resolved() {
    let (base, seen) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let slack = secret_file(dir.path(), "slack.url", &format!("{base}/slack/T000/SECRETPATH\n"), 0o600);
    let key = secret_file(dir.path(), "pd.key", "R0UTINGKEY\n", 0o600);
    let routes = vec![
        Route { target: Target::Slack { url: Source::File(slack) }, min_severity: Severity::Warning },
        Route {
            target: Target::PagerDuty { routing_key: Source::File(key), events_url: format!("{base}/pd") },
            min_severity: Severity::Critical,
        },
    ];
    let states: Arc<Mutex<HashMap<String, RotationState>>> = Arc::default();
    let s = states.clone();
    let lookup: Lookup = Arc::new(move |id| s.lock().unwrap().get(id).copied());
    let (changes_tx, changes) = watch::channel(0u64);
    let (handle, task) = router(routes, changes, lookup).expect("routes");
    let stop = CancellationToken::new();
    tokio::spawn(task.run(stop.clone()));

    // A real alert log hands its alerts to the routes.
    let store_dir = tempfile::tempdir().unwrap();
    let store = Store::open(&store_dir.path().join("store")).unwrap();
    let (alerts, _) = crate::alerts::Alerts::open(&store, None).unwrap();
    let alerts = alerts.with_routes(Some(handle));
    let details = serde_json::json!({ "version": "v1" });
    let critical = alerts
        .raise(AlertKind::OldVersionUsed, Severity::Critical, "api-key", Some("r1"), "old key used".into(), details)
        .unwrap();
    let details = serde_json::json!({ "host": "web-1" });
    alerts
        .raise(AlertKind::LeftoverFound, Severity::Warning, "api-key", Some("r2"), "leftover".into(), details)
        .unwrap();

    let got = wait_for(&seen, 3).await;
    let slack: Vec<_> = got.iter().filter(|(p, _)| p == "/slack/T000/SECRETPATH").map(|(_, v)| v).collect();
    let pd: Vec<_> = got.iter().filter(|(p, _)| p == "/pd").map(|(_, v)| v).collect();
    assert_eq!((slack.len(), pd.len()), (2, 1), "warning to slack only, critical to both: {got:?}");
    for m in &slack {
        assert!(m["text"].as_str().unwrap().contains("rekey"), "{m}");
        assert_eq!(m["blocks"][0]["type"], "section");
        assert!(m["blocks"][1]["elements"][0]["text"].as_str().unwrap().contains("secret `api-key`"), "{m}");
    }
    let e = pd[0];
    assert_eq!((e["routing_key"].as_str(), e["event_action"].as_str()), (Some("R0UTINGKEY"), Some("trigger")));
    assert_eq!(e["dedup_key"], dedup_key(&critical));
    assert_eq!(e["dedup_key"], "rekey:api-key:r1:old_version_used");
    assert_eq!(
        (e["payload"]["severity"].as_str(), e["payload"]["source"].as_str()),
        (Some("critical"), Some("rekeyd"))
    );
    assert!(e["payload"]["summary"].as_str().unwrap().contains("old key used"), "{e}");

    // r1 went ahead (monitoring): its hold is over and PagerDuty is told so;
    // r2's leftover stays open until its monitoring ends.
    states.lock().unwrap().extend([("r1".into(), RotationState::Monitoring), ("r2".into(), RotationState::Monitoring)]);
    changes_tx.send_modify(|n| *n += 1);
    let got = wait_for(&seen, 5).await;
    let resolves: Vec<_> = got.iter().filter(|(_, v)| v["event_action"] == "resolve").map(|(_, v)| v).collect();
    assert_eq!(resolves.len(), 1, "{got:?}");
    assert_eq!(resolves[0]["dedup_key"], "rekey:api-key:r1:old_version_used");
    assert_eq!(resolves[0]["routing_key"], "R0UTINGKEY");
    assert!(got.iter().any(|(p, v)| p.starts_with("/slack") && v["text"].as_str().unwrap().contains("resolved")));
    assert!(!got.iter().any(|(_, v)| v.to_string().contains("leftover_found") && v.to_string().contains("resolved")));
    stop.cancel();
    drop(alerts);
    store.close().unwrap();
}

#[tokio::test]
async fn a_failed_delivery_names_neither_the_slack_url_nor_the_routing_key() {
    rekey_common::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let slack = secret_file(dir.path(), "s", &format!("http://127.0.0.1:{port}/services/T/B/SECRETPATH"), 0o600);
    let key = secret_file(dir.path(), "k", "R0UTINGKEY", 0o600);
    let client = reqwest::Client::new();
    let a = alert(1, AlertKind::OldVersionUsed, Severity::Critical, "r1");
    let slack = Route { target: Target::Slack { url: Source::File(slack) }, min_severity: Severity::Warning };
    let e = deliver(&client, &slack, &a, Action::Trigger, 1).await.unwrap_err();
    assert!(!e.contains("SECRETPATH") && e.contains("after 1 attempts"), "{e}");
    let url = format!("http://127.0.0.1:{port}/v2/enqueue");
    let pd = Route {
        target: Target::PagerDuty { routing_key: Source::File(key), events_url: url },
        min_severity: Severity::Warning,
    };
    let e = deliver(&client, &pd, &a, Action::Trigger, 1).await.unwrap_err();
    assert!(!e.contains("R0UTINGKEY"), "{e}");
}

#[test]
fn holds_resolve_when_revocation_goes_ahead_and_monitoring_alerts_when_it_ends() {
    use RotationState::*;
    assert!(!is_resolved(AlertKind::OldVersionUsed, Halted));
    assert!(is_resolved(AlertKind::OldVersionUsed, Monitoring));
    assert!(is_resolved(AlertKind::OldVersionUsedDuringGrace, Aborted));
    assert!(!is_resolved(AlertKind::LeftoverFound, Monitoring));
    assert!(is_resolved(AlertKind::OldVersionUsedAfterRevocation, Completed));
}
