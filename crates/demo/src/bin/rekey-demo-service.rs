//! `rekey-demo-service`: a service that consumes one demo API key (see the
//! `rekey_demo` crate docs for how it is restarted).
//!
//! ```sh
//! rekey-demo-service --credentials /etc/demo/credentials.env --api http://127.0.0.1:8700 \
//!     --listen 127.0.0.1:8080 --pidfile /run/demo.pid --detach --replace --log /var/log/demo.log
//! ```
//!
//! PostgreSQL mode (`--postgres postgres://HOST:PORT/DB`): the credentials
//! file holds `PGUSER` and `PGPASSWORD`; the service logs in once at start
//! (a start with a refused login fails) and keeps that session, and
//! `/health` runs a query on it (reconnecting once if it was closed), so a
//! healthy service is one that really is logged in with its credential.

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use clap::Parser;
use rekey_common::secret::SecretBytes;
use rekey_demo::http_client::{self, BaseUrl};
use rekey_demo::{credentials, process};
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Clone)]
#[command(name = "rekey-demo-service", version, about = "A demo service that uses a rekey-demo-api key")]
struct Cli {
    /// Env-file holding the key (read once, at start).
    #[arg(long)]
    credentials: PathBuf,
    /// Variable of the credentials file that holds the key.
    #[arg(long, default_value = "DEMO_API_KEY")]
    key_var: String,
    /// Base URL of rekey-demo-api (the default mode: the key is a demo API key).
    #[arg(long, required_unless_present_any = ["aws_sts", "postgres"], conflicts_with_all = ["aws_sts", "postgres"])]
    api: Option<String>,
    /// PostgreSQL mode: the database to log in to, without user or password
    /// (they are PGUSER and PGPASSWORD in the credentials file).
    #[arg(long, conflicts_with = "aws_sts")]
    postgres: Option<String>,
    /// PostgreSQL mode: the application_name of the session (names this
    /// service in pg_stat_activity).
    #[arg(long, default_value = "rekey-demo-service")]
    app_name: String,
    /// AWS mode: the credentials file holds AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY, and /health is a SigV4-signed STS
    /// GetCallerIdentity at this endpoint (e.g. a local moto server).
    #[arg(long)]
    aws_sts: Option<String>,
    /// Region for the STS signature in AWS mode.
    #[arg(long, default_value = "us-east-1")]
    aws_region: String,
    /// Address to listen on; port 0 picks a free port (see --addr-file).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Pid of the running service, written once it listens.
    #[arg(long)]
    pidfile: Option<PathBuf>,
    /// Write the bound address (HOST:PORT) to this file once listening.
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// First stop the service named by --pidfile (SIGTERM, wait).
    #[arg(long)]
    replace: bool,
    /// Start in the background and return once it listens (needs --pidfile).
    #[arg(long)]
    detach: bool,
    /// With --detach: append the service's output to this file.
    #[arg(long)]
    log: Option<PathBuf>,
}

/// How long a detached start may take before it is called failed.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long --replace waits for the old process to exit before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

fn main() -> std::process::ExitCode {
    rekey_common::logging::init("info", false);
    let cli = Cli::parse();
    let result = if cli.detach { detach(&cli) } else { foreground(cli) };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rekey-demo-service: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Our own program path, for re-executing (argv[0] when it is a path: it
/// survives the binary being rebuilt in place, /proc/self/exe does not).
fn program() -> PathBuf {
    match std::env::args_os().next() {
        Some(a) if a.to_string_lossy().contains('/') => PathBuf::from(a),
        _ => std::env::current_exe().unwrap_or_else(|_| PathBuf::from("rekey-demo-service")),
    }
}

/// This process's arguments without the ones that only make sense once.
fn service_args() -> Vec<OsString> {
    let mut out = Vec::new();
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--detach" | "--replace") => {}
            Some("--log") => {
                args.next();
            }
            Some(s) if s.starts_with("--log=") => {}
            _ => out.push(a),
        }
    }
    out
}

fn detach(cli: &Cli) -> anyhow::Result<()> {
    let Some(pidfile) = &cli.pidfile else { bail!("--detach needs --pidfile (it tells when the service is up)") };
    if cli.replace
        && let Some(pid) = process::stop(pidfile, STOP_GRACE)
    {
        eprintln!("rekey-demo-service: stopped pid {pid}");
    }
    let out: std::process::Stdio = match &cli.log {
        Some(p) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("cannot open log {}", p.display()))?
            .into(),
        None => std::process::Stdio::null(),
    };
    let err: std::process::Stdio = match &cli.log {
        Some(p) => std::fs::OpenOptions::new().append(true).open(p)?.into(),
        None => std::process::Stdio::null(),
    };
    let mut child = std::process::Command::new(program())
        .args(service_args())
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own group: whoever ran this command may kill its group.
        .process_group(0)
        .spawn()
        .context("cannot start the service")?;
    let pid = child.id() as i32;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            let hint = cli.log.as_ref().map(|p| format!(" (log: {})", p.display())).unwrap_or_default();
            let how = match (status.code(), std::os::unix::process::ExitStatusExt::signal(&status)) {
                (Some(c), _) => format!("status {c}"),
                (None, Some(s)) => format!("signal {s}"),
                _ => status.to_string(),
            };
            bail!("the service exited with {how} during start{hint}");
        }
        if process::read_pid(pidfile) == Some(pid) {
            eprintln!("rekey-demo-service: started pid {pid}");
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the service did not start within {}s", START_TIMEOUT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

enum Service {
    Api { key: SecretBytes, api: BaseUrl },
    Aws { endpoint: String, region: String, access_key_id: String, secret: SecretBytes },
    Postgres(Box<rekey_demo::pg::Session>),
}

fn foreground(cli: Cli) -> anyhow::Result<()> {
    if cli.replace
        && let Some(pidfile) = &cli.pidfile
    {
        process::stop(pidfile, STOP_GRACE);
    }
    // Read once, at start: a new key needs a restart.
    let svc = match (&cli.aws_sts, &cli.api) {
        _ if cli.postgres.is_some() => {
            let text = std::fs::read(&cli.credentials)
                .with_context(|| format!("cannot read credentials {}", cli.credentials.display()))?;
            let url = cli.postgres.clone().unwrap_or_default();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let session = rt.block_on(rekey_demo::pg::Session::open(&url, &text, &cli.app_name))?;
            return rt.block_on(serve(cli, Arc::new(Service::Postgres(Box::new(session)))));
        }
        (Some(endpoint), _) => {
            let text = std::fs::read(&cli.credentials)
                .with_context(|| format!("cannot read credentials {}", cli.credentials.display()))?;
            let get = |k: &str| {
                credentials::parse_env_value(&text, k)
                    .ok_or_else(|| anyhow::anyhow!("{}: {k} is missing", cli.credentials.display()))
            };
            let id = get("AWS_ACCESS_KEY_ID")?;
            let access_key_id = String::from_utf8(id.expose().to_vec()).context("AWS_ACCESS_KEY_ID is not text")?;
            Service::Aws {
                endpoint: endpoint.clone(),
                region: cli.aws_region.clone(),
                access_key_id,
                secret: get("AWS_SECRET_ACCESS_KEY")?,
            }
        }
        (None, Some(api)) => Service::Api {
            key: credentials::read_key(&cli.credentials, &cli.key_var)?,
            api: BaseUrl::parse(api).map_err(anyhow::Error::msg).context("--api")?,
        },
        (None, None) => bail!("one of --api, --aws-sts or --postgres is required"),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(serve(cli, Arc::new(svc)))
}

async fn bind(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    // The process this one replaced may still be releasing the port.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot listen on {addr}")),
        }
    }
}

async fn serve(cli: Cli, svc: Arc<Service>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let listener = bind(&cli.listen).await?;
    let addr = listener.local_addr()?;
    if let Some(f) = &cli.addr_file {
        rekey_common::fs::write_atomic(f, addr.to_string().as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", f.display()))?;
    }
    if let Some(p) = &cli.pidfile {
        rekey_common::fs::write_atomic(p, format!("{}\n", std::process::id()).as_bytes(), 0o644)
            .with_context(|| format!("cannot write pidfile {}", p.display()))?;
    }
    tracing::info!(%addr, credentials = %cli.credentials.display(), "demo service listening");

    let app = Router::new()
        .route("/health", get(health))
        .route("/", get(|| async { "rekey demo service\n" }))
        .with_state(svc);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server =
        tokio::spawn(std::future::IntoFuture::into_future(axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = stop_rx.await;
        })));
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
        _ = hup.recv() => {
            tracing::info!("SIGHUP: re-executing to reload the credentials");
            let err = std::process::Command::new(program()).args(std::env::args_os().skip(1)).exec();
            bail!("cannot re-execute: {err}");
        }
    }
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    if let Some(p) = &cli.pidfile {
        process::remove_own_pidfile(p);
    }
    tracing::info!("demo service stopped");
    Ok(())
}

async fn health(State(svc): State<Arc<Service>>) -> (StatusCode, String) {
    let (key, api) = match &*svc {
        Service::Api { key, api } => (key, api),
        Service::Postgres(session) => {
            return match session.check().await {
                Ok(user) => (StatusCode::OK, format!("ok: postgres accepts role {user}\n")),
                Err(e) => {
                    tracing::warn!(error = %e, "health: postgres refuses this service's login");
                    (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: postgres: {e}\n"))
                }
            };
        }
        Service::Aws { endpoint, region, access_key_id, secret } => {
            return match rekey_demo::aws::get_caller_identity(endpoint, region, access_key_id, secret).await {
                Ok((200, _)) => (StatusCode::OK, format!("ok: aws accepts access key {access_key_id}\n")),
                Ok((code, aws)) => {
                    tracing::warn!(code, aws = %aws, "health: aws rejects this service's access key");
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("unhealthy: aws rejects access key {access_key_id} (HTTP {code} {aws})\n"),
                    )
                }
                Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: sts unreachable: {e}\n")),
            };
        }
    };
    match http_client::get(api, "/v1/whoami", Some(key.expose()), Duration::from_secs(2)).await {
        Ok((200, body)) => {
            let id = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_string))
                .unwrap_or_default();
            (StatusCode::OK, format!("ok: the api accepts key {id}\n"))
        }
        Ok((401, _)) => {
            tracing::warn!("health: the api rejects this service's key");
            (StatusCode::SERVICE_UNAVAILABLE, "unhealthy: the api rejects this service's key (401)\n".into())
        }
        Ok((code, _)) => (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: the api answered {code}\n")),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: api unreachable: {e}\n")),
    }
}
