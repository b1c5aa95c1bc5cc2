//! `rekeyd`: config → init → serve (every task under one supervisor) until
//! SIGINT/SIGTERM or the first task failure → drain → exit non-zero on failure.

use anyhow::Context;
use clap::{Parser, Subcommand};
use rekey_coordinator::config::Config;
use rekey_coordinator::server::Coordinator;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "rekeyd", version, about = "The rekey coordinator")]
struct Cli {
    /// Coordinator configuration file (TOML).
    #[arg(long, short, env = "REKEYD_CONFIG", default_value = "/etc/rekey/coordinator.toml", global = true)]
    config: PathBuf,
    /// Log format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text", global = true)]
    log_format: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Create the master key (if missing), the CA and the operator credential, then exit.
    Init,
    /// Serve (the default). Initializes first if needed.
    Run,
    /// Print the CA fingerprint agents pin at enrollment (read-only).
    Fingerprint,
    /// Write a sealed backup of a stopped coordinator's store (while rekeyd
    /// runs, use `rekey backup --out FILE`).
    Backup {
        /// The backup file to write (0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a backup into this config's data dir (rekeyd stopped; the data
    /// dir must have no store unless --force moves it aside).
    Restore {
        file: PathBuf,
        #[arg(long)]
        force: bool,
    },
    /// Operator credentials made on the coordinator host.
    /// Copy a sled store (a stopped coordinator's data dir) into the empty
    /// PostgreSQL database of `[store]`, then verify its audit chain there.
    Migrate {
        /// The sled data dir (or its `store` directory).
        #[arg(long)]
        from_sled: PathBuf,
    },
    #[command(subcommand)]
    Operator(OperatorCmd),
    /// Print a shell completion script (e.g. `rekeyd completions bash`).
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

#[derive(Subcommand)]
enum OperatorCmd {
    /// Issue a new admin credential on the coordinator host, with the master
    /// key and rekeyd stopped (its store is locked while it runs): the way
    /// back in when every admin credential is lost or revoked. Audited as
    /// `operator.recover`.
    Recover {
        /// Directory to write the credential into (operator.key 0600,
        /// operator.pem, ca.pem, rekey.toml); must not hold one already.
        #[arg(long)]
        out: PathBuf,
        /// The new operator's name (default: recovery-UNIX_SECONDS).
        #[arg(long)]
        name: Option<String>,
    },
}

/// Bound on the graceful drain after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> std::process::ExitCode {
    // Everything rekeyd creates (store, checkpoint, credentials, temp files)
    // is private to its user, whatever umask it was started with.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = Cli::parse();
    rekey_common::logging::init("info", cli.log_format == "json");
    rekey_common::tls::install_crypto_provider();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rekeyd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Need no config: they describe the binary, not a coordinator.
    match &cli.command {
        Some(Command::Completions { shell }) => {
            let cmd = <Cli as clap::CommandFactory>::command();
            return Ok(rekey_common::clidoc::print_completions(cmd, *shell)?);
        }
        Some(Command::Man { out }) => {
            let pages = rekey_common::clidoc::write_man_pages(<Cli as clap::CommandFactory>::command(), out)?;
            println!("wrote {} man pages into {}", pages.len(), out.display());
            return Ok(());
        }
        _ => {}
    }
    let config = Config::from_file(&cli.config)?;
    match cli.command.unwrap_or(Command::Run) {
        Command::Completions { .. } | Command::Man { .. } => unreachable!("handled before the config is read"),
        // Read-only: creates nothing, works while rekeyd runs.
        Command::Fingerprint => {
            println!("{}", rekey_coordinator::server::fingerprint(&config)?);
            Ok(())
        }
        Command::Backup { out } => {
            let b = rekey_coordinator::backup::backup_offline(&config, &out)?;
            println!("backup written to {} (audit record {}, sealed with the master key)", out.display(), b.audit_seq);
            Ok(())
        }
        Command::Restore { file, force } => {
            let b = rekey_coordinator::backup::restore_offline(&config, &file, force)?;
            println!(
                "restored {} into {} (audit record {}, taken {}); anything done after that point is not in this store: \
                 re-check revocations and enrollments made since",
                file.display(),
                config.data_dir.display(),
                b.audit_seq,
                rekey_common::time::format_unix(b.created_ms / 1000)
            );
            Ok(())
        }
        Command::Operator(OperatorCmd::Recover { out, name }) => {
            let name = name.unwrap_or_else(|| format!("recovery-{}", rekey_common::time::now_unix()));
            let r = rekey_coordinator::server::recover_operator(&config, &out, &name)?;
            println!(
                "created admin operator {} (certificate {}) in {}; audited as operator.recover. Start rekeyd, then: \
                 rekey --operator-dir {} operator list",
                r.name,
                r.serial,
                r.dir.display(),
                r.dir.display()
            );
            Ok(())
        }
        Command::Migrate { from_sled } => {
            let m = rekey_coordinator::backup::migrate_from_sled(&config, &from_sled)?;
            println!(
                "copied {} entries from {} into PostgreSQL; audit chain verified there: {} records, head {}",
                m.entries,
                from_sled.display(),
                m.audit_seq,
                m.audit_hash
            );
            Ok(())
        }
        Command::Init => {
            let coordinator = Coordinator::init(config).context("initialization failed")?;
            print_init(&coordinator.init);
            Ok(())
        }
        Command::Run if config.is_shared_store() => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(serve_replica(config))
        }
        Command::Run => {
            let coordinator = Coordinator::init(config).context("initialization failed")?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(serve(coordinator))
        }
    }
}

fn print_init(init: &rekey_coordinator::server::InitReport) {
    if init.created_master_key {
        println!(
            "created master key    {}   (keep it safe and apart from the data dir)",
            init.master_key_file.display()
        );
    }
    println!("{} CA        {}", if init.created_ca { "created" } else { "existing" }, init.ca_fingerprint);
    if init.created_operator {
        println!(
            "created operator  {}   (use: rekey --operator-dir {}; move it to the operator's machine)",
            init.operator_dir.display(),
            init.operator_dir.display()
        );
    }
}

/// Serves until SIGINT/SIGTERM or the first failing task; the supervisor
/// inside drains every task within `DRAIN_TIMEOUT` per phase.
async fn serve(coordinator: Coordinator) -> anyhow::Result<()> {
    let shutdown = on_signals()?;
    coordinator.serve(shutdown, DRAIN_TIMEOUT, |_| {}).await.map_err(Into::into)
}

/// One replica of several on PostgreSQL: a follower until it takes the lease.
async fn serve_replica(config: Config) -> anyhow::Result<()> {
    let shutdown = on_signals()?;
    rekey_coordinator::replica::run(config, shutdown, DRAIN_TIMEOUT, |_| {}).await.map_err(Into::into)
}

/// Cancelled at SIGTERM or SIGINT (registered before anything is served: a
/// signal that arrives while rekeyd starts drains it instead of killing it).
fn on_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    // Registered before anything is served: a SIGTERM that arrives while
    // rekeyd starts drains it instead of killing it.
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutdown requested, draining");
        signal.cancel();
    });
    Ok(shutdown)
}
