//! The web console in a real browser: headless Chromium (Debian's
//! `chromium`) driven over the DevTools protocol, against a real rekeyd and
//! scripted agents speaking the real protocol. Checks that the page changes
//! live during a rotation (a host turning healthy, a halted rotation shown
//! as halted) without a reload, that it is keyboard navigable and fits a
//! phone, that nothing is served without a session, that a login link works
//! once, and that no secret value reaches anything the console serves.
//! Screenshots land in `target/console-screenshots/`.
//!
//! Without `/usr/bin/chromium` the test says why it is skipped and passes,
//! unless `REKEY_REQUIRE_CHROMIUM=1` (CI, after installing it) makes that a
//! failure.

use rekey_tests::scripted::{Behavior, ScriptedAgent};
use rekey_tests::{Coordinator, budget, wait_for};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
const SECRET: &str = "api-key";

/// Headless Chromium and one page, over the DevTools protocol (one browser
/// websocket, the page attached as a flat session).
struct Browser {
    child: Child,
    ws: tungstenite::WebSocket<TcpStream>,
    session: String,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// `None` (with the reason printed) when there is no Chromium here.
    fn launch() -> Option<Browser> {
        if !Path::new(CHROMIUM).exists() {
            let why = format!("{CHROMIUM} is not installed (apt-get install -y --no-install-recommends chromium)");
            assert!(
                std::env::var("REKEY_REQUIRE_CHROMIUM").as_deref() != Ok("1"),
                "REKEY_REQUIRE_CHROMIUM=1 but {why}"
            );
            eprintln!("skipped: the console's browser test needs {why}");
            return None;
        }
        let profile = tempfile::Builder::new().prefix("rekey-chromium-").tempdir().unwrap();
        let child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                "--window-size=1280,800",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        let port_file = profile.path().join("DevToolsActivePort");
        let mut text = String::new();
        wait_for("chromium's DevToolsActivePort", || {
            text = std::fs::read_to_string(&port_file).unwrap_or_default();
            text.lines().count() >= 2
        });
        let mut lines = text.lines();
        let port = lines.next().unwrap().trim().to_string();
        let path = lines.next().unwrap().trim().to_string();
        let stream = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
        stream.set_read_timeout(Some(budget())).unwrap();
        let (ws, _) = tungstenite::client(format!("ws://127.0.0.1:{port}{path}"), stream).expect("devtools websocket");
        let mut b = Browser { child, ws, session: String::new(), next_id: 0, _profile: profile };
        let target = b.call_browser("Target.createTarget", json!({ "url": "about:blank" }));
        let attached =
            b.call_browser("Target.attachToTarget", json!({ "targetId": target["targetId"], "flatten": true }));
        b.session = attached["sessionId"].as_str().unwrap().to_string();
        b.call("Page.enable", json!({}));
        b.call("Runtime.enable", json!({}));
        b.viewport(1280, 800, false);
        Some(b)
    }

    fn send(&mut self, method: &str, params: Value, session: Option<String>) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(tungstenite::Message::text(msg.to_string())).unwrap();
        loop {
            let m = self.ws.read().unwrap_or_else(|e| panic!("devtools: no answer to {method}: {e}"));
            let Ok(text) = m.to_text() else { continue };
            let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "devtools {method} failed: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }

    fn call_browser(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, None)
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        let s = self.session.clone();
        self.send(method, params, Some(s))
    }

    /// Evaluates `expr` in the page; its value (JSON).
    fn eval(&mut self, expr: &str) -> Value {
        let r =
            self.call("Runtime.evaluate", json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }));
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {}", r["exceptionDetails"]);
        r["result"]["value"].clone()
    }

    fn text(&mut self) -> String {
        self.eval("document.body ? document.body.innerText : ''").as_str().unwrap_or("").to_string()
    }

    fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
        wait_for(&format!("{url} to load"), || self.eval("document.readyState") == json!("complete"));
    }

    /// Waits until `expr` is true in the page; the page's text in the panic.
    fn wait_true(&mut self, what: &str, expr: &str) {
        let deadline = Instant::now() + budget();
        while Instant::now() < deadline {
            if self.eval(expr) == json!(true) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out waiting for {what} ({expr}); the page reads:\n{}", self.text());
    }

    fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile }),
        );
    }

    fn key(&mut self, key: &str, code: u32) {
        for kind in ["rawKeyDown", "keyUp"] {
            let mut p = json!({ "type": kind, "key": key, "code": key, "windowsVirtualKeyCode": code });
            if key == "Enter" && kind == "rawKeyDown" {
                p["type"] = json!("keyDown");
                p["text"] = json!("\r");
            }
            self.call("Input.dispatchKeyEvent", p);
        }
    }

    fn screenshot(&mut self, name: &str) -> PathBuf {
        use base64::Engine as _;
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap()).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let dir = rekey_tests::target_dir().join("console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
        path
    }
}

/// One plain HTTP/1.1 request to the console: (status, headers, body).
fn http(base: &str, path: &str, cookie: Option<&str>, host: Option<&str>) -> (u16, String, String) {
    let addr = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(budget())).unwrap();
    let cookie = cookie.map(|c| format!("Cookie: {c}\r\n")).unwrap_or_default();
    let host = host.unwrap_or(addr);
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\n{cookie}Connection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

/// The first lines of the event stream, up to its `hello`.
fn sse_hello(base: &str, cookie: &str) -> String {
    let addr = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(budget())).unwrap();
    write!(s, "GET /api/events HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("data: live") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "event stream closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn catalog() -> String {
    format!(
        r#"
[console]
listen = "127.0.0.1:0"

[[secret]]
name = "{SECRET}"
description = "the payments API key"
provider = {{ kind = "random", length = 40, prefix = "ak_" }}
selector = {{ env = "prod" }}
[secret.rollout]
canary = 1
waves = ["50%", "100%"]
host_deadline = "120s"
[secret.revocation]
monitor = "0s"
grace = "1s"
"#
    )
}

/// A fresh one-time login link from `rekey console`.
fn login_link(c: &Coordinator) -> String {
    let out = c.cli_ok(&["console"]);
    let url = out.lines().find(|l| l.starts_with("http://")).unwrap_or_else(|| panic!("no link in:\n{out}"));
    assert!(out.contains("works once"), "{out}");
    url.trim().to_string()
}

fn base_of(url: &str) -> String {
    url.split("/login").next().unwrap().to_string()
}

#[test]
fn the_console_shows_a_live_rotation_in_a_real_browser_and_serves_nothing_without_a_session() {
    rustls::crypto::ring::default_provider().install_default().ok();
    let Some(mut b) = Browser::launch() else { return };
    let tmp = tempfile::Builder::new().prefix("rekey-console-").tempdir().unwrap();
    let c = Coordinator::start(&tmp.path().join("c"), &catalog());
    let mut agents: Vec<ScriptedAgent> = (1..=6)
        .map(|i| ScriptedAgent::enroll(&c, tmp.path(), &format!("host-{i}"), &[SECRET], &["env=prod"]))
        .collect();
    wait_for("agents connected", || agents.iter().all(|a| c.is_connected(&a.name)));

    let link = login_link(&c);
    let base = base_of(&link);
    refusals_without_a_session(&base);

    // Log in: the link becomes a cookie, then the page; the link is spent.
    b.navigate(&link);
    b.wait_true("the console to load", "location.pathname === '/' && !!document.querySelector('nav')");
    b.wait_true("the live stream", "document.getElementById('live').dataset.live === 'on'");
    let (status, _, _) = http(&base, &link[base.len()..], None, None);
    assert_eq!(status, 401, "a login link must work once only");
    assert!(c.audit().iter().any(|r| r.action == "console.login" && r.actor == "operator/admin"), "login not audited");
    let who = b.eval("document.getElementById('who').textContent");
    assert!(who.as_str().unwrap().contains("admin (admin)"), "{who}");

    // The fleet, live: six agents connected; one goes away and the page says so.
    b.eval("location.hash = '#/fleet'");
    b.wait_true("six connected agents", "document.querySelectorAll('[data-connected=\"true\"]').length === 6");
    b.eval("window.__probe = 42");
    agents[5].stop();
    b.wait_true(
        "host-6 shown disconnected",
        "document.querySelector('[data-agent=\"host-6\"] [data-connected=\"false\"]') !== null",
    );
    agents[5].start();
    b.wait_true("host-6 back", "document.querySelectorAll('[data-connected=\"true\"]').length === 6");

    let id = live_rotation(&mut b, &c, &mut agents);
    halted_rotation(&mut b, &c, &agents);
    assert_eq!(b.eval("window.__probe"), json!(42), "the page reloaded instead of updating live");
    keyboard_and_phone(&mut b, &id);
    nothing_secret_is_served(&mut b, &c, &agents, &base, &id);
}

/// No cookie: the page says to run `rekey console`, the API answers 401, a
/// foreign Host is refused, and every answer carries the security headers.
fn refusals_without_a_session(base: &str) {
    let (status, head, body) = http(base, "/", None, None);
    assert_eq!(status, 401, "{head}");
    assert!(body.contains("rekey console") && body.contains("login-needed"), "{body}");
    for h in ["content-security-policy: default-src 'self'", "x-frame-options: deny", "cache-control: no-store"] {
        assert!(head.to_lowercase().contains(h), "missing {h} in:\n{head}");
    }
    for path in ["/api/fleet", "/api/rotations", "/api/audit", "/api/events", "/app.js"] {
        let (status, _, body) = http(base, path, None, None);
        assert_eq!(status, 401, "{path} without a session: {body}");
    }
    let (status, _, _) = http(base, "/login?token=00", None, None);
    assert_eq!(status, 401, "an unknown token is refused");
    let (status, _, _) = http(base, "/", None, Some("attacker.example"));
    assert_eq!(status, 421, "a DNS-rebound host name is refused");
}

/// A rotation whose third host hangs: the page shows it delivered, then
/// turning healthy when it comes back, and the rotation moving on.
fn live_rotation(b: &mut Browser, c: &Coordinator, agents: &mut [ScriptedAgent]) -> String {
    b.eval("location.hash = '#/rotations'");
    b.wait_true("the empty rotations list", "document.body.innerText.includes('No rotation yet')");
    agents[2].set_behavior(SECRET, Behavior::Hang);
    let id = c.cli_ok(&["rotate", "start", SECRET]).trim().to_string();
    b.wait_true("the new rotation listed", &format!("document.querySelector('[data-rotation=\"{id}\"]') !== null"));
    b.eval(&format!("location.hash = '#/rotations/{id}'"));
    let state = |h: &str| format!("document.querySelector('[data-host=\"{h}\"]')?.dataset.state");
    b.wait_true("host-3 stuck at delivered", &format!("{} === 'delivered'", state("host-3")));
    b.wait_true("host-1 (the canary) healthy", &format!("{} === 'healthy'", state("host-1")));
    b.screenshot("rotation-in-progress.png");
    assert_eq!(b.eval("document.querySelector('#rotation-state [data-state]').dataset.state"), json!("rolling_out"));

    // host-3 reconnects and gets its delivery again: healthy, on the same page.
    agents[2].set_behavior(SECRET, Behavior::Succeed);
    agents[2].stop();
    agents[2].start();
    b.wait_true("host-3 turning healthy", &format!("{} === 'healthy'", state("host-3")));
    b.wait_true(
        "every host healthy",
        "[...document.querySelectorAll('[data-host]')].every(e => e.dataset.state === 'healthy')",
    );
    b.wait_true(
        "the rotation past its rollout",
        "['verified','deactivating','grace','deleting','monitoring','completed'].includes(document.querySelector('#rotation-state [data-state]').dataset.state)",
    );
    b.wait_true("the timeline", "document.body.innerText.includes('Timeline')");
    id
}

/// A rotation that halts on a failing host is shown halted, with the reason.
fn halted_rotation(b: &mut Browser, c: &Coordinator, agents: &[ScriptedAgent]) {
    let first = c.rotations(None)[0].id.clone();
    wait_for("the first rotation to finish", || c.rotation(&first).state.is_terminal());
    b.eval("location.hash = '#/rotations'");
    agents[3].set_behavior(SECRET, Behavior::Fail("health check http://127.0.0.1:8080/health returned 503".into()));
    let id = c.cli_ok(&["rotate", "start", SECRET]).trim().to_string();
    b.wait_true(
        "the rotation listed as halted",
        &format!("document.querySelector('[data-rotation=\"{id}\"] [data-state]')?.dataset.state === 'halted'"),
    );
    b.eval(&format!("location.hash = '#/rotations/{id}'"));
    b.wait_true(
        "the halted state",
        "document.querySelector('#rotation-state [data-state]')?.dataset.state === 'halted'",
    );
    let reason = b.eval("document.getElementById('halt-reason').textContent");
    assert!(reason.as_str().unwrap().contains("host-4"), "{reason}");
    b.wait_true(
        "host-4 failed with its reason",
        "['failed','rolled_back'].includes(document.querySelector('[data-host=\"host-4\"]').dataset.state) && document.querySelector('[data-host=\"host-4\"]').innerText.includes('503')",
    );
    let fits = b.eval("document.documentElement.scrollWidth <= window.innerWidth");
    assert_eq!(fits, json!(true), "the page overflows 1280 px");
    assert!(b.text().contains("Old version"), "the rotation's facts are shown as text");
    let shot = b.screenshot("console.png");
    assert!(std::fs::metadata(shot).unwrap().len() > 10_000, "an empty screenshot");
    c.cli_ok(&["rotate", "abort", &id]);
}

/// Tab reaches the navigation, Enter follows a link; at a phone's width
/// nothing overflows sideways.
fn keyboard_and_phone(b: &mut Browser, id: &str) {
    b.eval("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0)");
    b.eval("document.body.focus()");
    let mut reached = false;
    for _ in 0..4 {
        b.key("Tab", 9);
        if b.eval("document.activeElement.getAttribute('href')") == json!("#/fleet") {
            reached = true;
            break;
        }
    }
    assert!(reached, "Tab never reached the Fleet link: {}", b.eval("document.activeElement.outerHTML"));
    let outline = b.eval("getComputedStyle(document.activeElement).outlineStyle");
    assert_ne!(outline, json!("none"), "the focused link shows no focus ring");
    b.key("Enter", 13);
    b.wait_true(
        "Enter to open the fleet",
        "location.hash === '#/fleet' && document.querySelector('h1').innerText === 'Fleet'",
    );

    b.viewport(390, 844, true);
    b.eval(&format!("location.hash = '#/rotations/{id}'"));
    b.wait_true("the rotation at a phone's width", "document.getElementById('grid') !== null");
    let fits = b.eval("document.documentElement.scrollWidth <= window.innerWidth + 1");
    assert_eq!(fits, json!(true), "the page overflows a 390 px screen");
    b.screenshot("console-phone.png");
    b.viewport(1280, 800, false);
}

/// Every page, JSON document and event the console serves, checked for every
/// value the agents were given; plus the stylesheet and script fetched with
/// the session and the rotation's fingerprint key absent.
fn nothing_secret_is_served(b: &mut Browser, c: &Coordinator, agents: &[ScriptedAgent], base: &str, id: &str) {
    let link = login_link(c);
    let (status, head, _) = http(base, &link[base.len()..], None, None);
    assert_eq!(status, 303, "{head}");
    let lower = head.to_lowercase();
    assert!(lower.contains("httponly") && lower.contains("samesite=strict") && lower.contains("location: /"), "{head}");
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: ").or_else(|| l.strip_prefix("Set-Cookie: ")))
        .and_then(|v| v.split(';').next())
        .unwrap()
        .to_string();
    let mut served = String::new();
    for path in [
        "/",
        "/app.js",
        "/console.css",
        "/api/whoami",
        "/api/fleet",
        "/api/secrets",
        "/api/rotations",
        &format!("/api/rotations/{id}"),
        "/api/alerts",
        "/api/incidents",
        "/api/audit",
    ] {
        let (status, _, body) = http(base, path, Some(&cookie), None);
        assert_eq!(status, 200, "{path}: {body}");
        served.push_str(&body);
    }
    served.push_str(&sse_hello(base, &cookie));
    for route in ["#/fleet", "#/secrets", "#/rotations", "#/alerts", "#/incidents", "#/audit"] {
        b.eval(&format!("location.hash = '{route}'"));
        b.wait_true(route, &format!("document.getElementById('main').dataset.view === '{route}'"));
        served.push_str(b.eval("document.documentElement.outerHTML").as_str().unwrap_or(""));
    }
    b.wait_true("the audit chain verified", "document.getElementById('audit-status')?.dataset.ok === 'true'");
    let mut values = 0;
    for a in agents {
        for v in a.values_seen() {
            let v = String::from_utf8_lossy(&v).into_owned();
            assert!(v.len() >= 20, "a value too short to search for");
            assert!(!served.contains(&v), "a secret value reached the console");
            values += 1;
        }
    }
    assert!(values >= 6, "the agents saw too few values for this check to mean anything");
    assert!(!served.to_lowercase().contains("fingerprint_key"), "the console serves a fingerprint key");
    assert!(served.contains("hmac-sha256:"), "the views' keyed fingerprints are expected, keys are not");
}

/// A viewer may open the console (as a viewer; revoked, its session ends);
/// without `[console]` the CLI says how to turn it on, and nothing listens.
#[test]
fn a_viewer_gets_a_viewer_session_and_an_off_console_says_how_to_turn_it_on() {
    rustls::crypto::ring::default_provider().install_default().ok();
    let tmp = tempfile::Builder::new().prefix("rekey-console-").tempdir().unwrap();
    let c = Coordinator::start(&tmp.path().join("c"), "[console]\nlisten = \"127.0.0.1:0\"\n");
    let dir = tmp.path().join("viewer");
    c.cli_ok(&["operator", "create", "vera", "--role", "viewer", "--out", dir.to_str().unwrap()]);
    let out = c.cli_as(&dir, &["console", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let link = v["url"].as_str().unwrap();
    assert_eq!(v["session_seconds"], json!(8 * 3600));
    let base = base_of(link);
    let (status, head, _) = http(&base, &link[base.len()..], None, None);
    assert_eq!(status, 303, "{head}");
    let cookie = head
        .lines()
        .find_map(|l| {
            l.to_lowercase().starts_with("set-cookie: ").then(|| l[12..].split(';').next().unwrap().to_string())
        })
        .unwrap();
    let (status, _, body) = http(&base, "/api/whoami", Some(&cookie), None);
    assert_eq!(status, 200, "{body}");
    let who: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((who["operator"].as_str(), who["role"].as_str()), (Some("vera"), Some("viewer")));
    assert!(c.audit().iter().any(|r| r.action == "console.login" && r.actor == "operator/vera"));

    c.cli_ok(&["operator", "revoke", "vera"]);
    let (status, _, _) = http(&base, "/api/whoami", Some(&cookie), None);
    assert_eq!(status, 401, "a revoked operator's console session must end");

    let off = Coordinator::start(&tmp.path().join("off"), "");
    let out = off.cli(&["console"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("web console is off") && err.contains("[console] listen"), "{err}");
}
