//! `rekey-demo-api`: a stand-in SaaS key API (see the `rekey_demo` crate docs).
//!
//! ```sh
//! REKEY_DEMO_ADMIN_TOKEN=admin rekey-demo-api --listen 127.0.0.1:0 --addr-file api.addr --state keys.json
//! ```

use anyhow::{Context, bail};
use clap::Parser;
use rekey_common::secret::SecretBytes;
use rekey_demo::api::{AppState, Keys, router};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "rekey-demo-api", version, about = "A stand-in SaaS key API for rekey demos and tests")]
struct Cli {
    /// Address to listen on; port 0 picks a free port (see --addr-file).
    #[arg(long, default_value = "127.0.0.1:8700")]
    listen: String,
    /// Write the bound address (HOST:PORT) to this file once listening.
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Persist keys (digests only) to this JSON file.
    #[arg(long)]
    state: Option<PathBuf>,
    /// File holding the admin token (or set REKEY_DEMO_ADMIN_TOKEN).
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
}

fn admin_token(cli: &Cli) -> anyhow::Result<SecretBytes> {
    let raw = match &cli.admin_token_file {
        Some(p) => std::fs::read(p).with_context(|| format!("cannot read admin token file {}", p.display()))?,
        None => match std::env::var_os("REKEY_DEMO_ADMIN_TOKEN") {
            Some(v) => v.into_encoded_bytes(),
            None => bail!("no admin token: pass --admin-token-file FILE or set REKEY_DEMO_ADMIN_TOKEN"),
        },
    };
    let token = SecretBytes::new(raw.trim_ascii().to_vec());
    if token.is_empty() {
        bail!("the admin token is empty");
    }
    Ok(token)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    rekey_common::logging::init("info", false);
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rekey-demo-api: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let token = admin_token(&cli)?;
    let keys = Keys::open(cli.state.clone())?;
    let listener =
        tokio::net::TcpListener::bind(&cli.listen).await.with_context(|| format!("cannot listen on {}", cli.listen))?;
    let addr = listener.local_addr()?;
    if let Some(f) = &cli.addr_file {
        rekey_common::fs::write_atomic(f, addr.to_string().as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", f.display()))?;
    }
    tracing::info!(%addr, state = ?cli.state, "demo api listening");
    println!("{addr}");
    let app = router(AppState::new(keys, &token));
    axum::serve(listener, app).with_graceful_shutdown(stop_signal()).await.context("serve")?;
    tracing::info!("demo api stopped");
    Ok(())
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
