//! One way to set up tracing for every binary: `RUST_LOG` style filters,
//! human output on a terminal, JSON lines with `--log-format json`.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `default` is used when `RUST_LOG` is unset.
pub fn init(default: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // A second init (e.g. in tests) is harmless; ignore it.
    let _ = if json { builder.json().try_init() } else { builder.with_target(false).try_init() };
}
