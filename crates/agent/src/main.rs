//! `rekey-agent`: enroll once, then run.

use anyhow::Context;
use clap::{Parser, Subcommand};
use rekey_agent::config::AgentConfig;
use rekey_agent::enroll::{EnrollOptions, TOKEN_ENV, TokenSource, enroll};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "rekey-agent",
    version,
    about = "The rekey agent: receives rotated secrets and applies them on this host"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text", global = true)]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this host with a one-time join token.
    Enroll {
        /// rekeyd address, HOST:PORT; repeat it (or separate with commas) for
        /// several replicas: tried in order, and a follower's hint is followed.
        #[arg(long, required = true, value_delimiter = ',')]
        coordinator: Vec<String>,
        /// A file holding the join token printed by `rekey token create`
        /// (refused if group or others can access it). Or set REKEY_JOIN_TOKEN.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// The join token; `-` reads it from stdin. Discouraged on the command
        /// line: any local user can read a process's arguments.
        #[arg(long, value_name = "TOKEN|-")]
        token: Option<String>,
        /// The CA fingerprint printed by `rekey token create` (sha256:HEX).
        #[arg(long)]
        ca_fingerprint: String,
        /// Where the agent keeps its key, certificate and journal.
        #[arg(long)]
        state_dir: PathBuf,
        /// Replace an existing enrollment in the state dir.
        #[arg(long)]
        force: bool,
    },
    /// Keep a session open and apply what the coordinator delivers.
    Run {
        /// Agent configuration file (TOML).
        #[arg(long, short, env = "REKEY_AGENT_CONFIG", default_value = "/etc/rekey/agent.toml")]
        config: PathBuf,
    },
    /// Print a shell completion script (e.g. `rekey-agent completions bash`).
    Completions {
        #[arg(value_enum)]
        shell: rekey_common::clidoc::Shell,
    },
    /// Write the man pages into a directory (used by the package build).
    #[command(hide = true)]
    Man {
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    // First: nothing the agent creates (state dir, keys, journal, backups,
    // temp files) is ever group or world accessible, whatever its caller's umask.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = Cli::parse();
    match &cli.command {
        Command::Completions { .. } | Command::Man { .. } => return clidoc(&cli.command),
        _ => {}
    }
    rekey_common::logging::init("info", cli.log_format == "json");
    rekey_common::tls::install_crypto_provider();
    // One thread: the agent waits on one session and a few timers, and a
    // worker thread of its own cost idle RSS and wake-ups (docs/benchmarks.md).
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rekey-agent: error: cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rekey-agent: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `completions SHELL` and `man --out DIR`: what describes the binary.
fn clidoc(command: &Command) -> std::process::ExitCode {
    use rekey_common::clidoc;
    let cmd = <Cli as clap::CommandFactory>::command();
    let done = match command {
        Command::Completions { shell } => clidoc::print_completions(cmd, *shell),
        Command::Man { out } => clidoc::write_man_pages(cmd, out)
            .map(|pages| println!("wrote {} man pages into {}", pages.len(), out.display())),
        _ => Ok(()),
    };
    match done {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rekey-agent: error: {}", rekey_common::error::Chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Completions { .. } | Command::Man { .. } => unreachable!("handled before the runtime starts"),
        Command::Enroll { coordinator, token_file, token, ca_fingerprint, state_dir, force } => {
            let source = TokenSource::pick(token.as_deref(), token_file.as_deref(), std::env::var(TOKEN_ENV).ok())?;
            if let TokenSource::Arg(_) = source {
                eprintln!(
                    "rekey-agent: warning: --token puts the join token in this process's arguments, which any local \
                     user can read; prefer --token-file FILE (mode 0600), {TOKEN_ENV} or --token - (stdin)"
                );
            }
            let token = source.read(std::io::stdin().lock())?;
            let e = enroll(EnrollOptions {
                coordinators: &coordinator,
                token: &token,
                ca_fingerprint: &ca_fingerprint,
                state_dir: &state_dir,
                force,
            })
            .await?;
            println!("enrolled as {} with {} (state in {})", e.host, e.coordinator, state_dir.display());
            Ok(())
        }
        Command::Run { config } => {
            let config = AgentConfig::from_file(&config)?;
            let shutdown = CancellationToken::new();
            let mut task = tokio::spawn(rekey_agent::session::run(config, shutdown.clone()));
            tokio::select! {
                r = &mut task => return r.context("agent task panicked")?.map_err(Into::into),
                _ = shutdown_signal() => tracing::info!("shutdown requested"),
            }
            shutdown.cancel();
            task.await.context("agent task panicked")?.map_err(Into::into)
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
