//! What `rekeyd`, `rekey-agent` and the `rekey` CLI share, and nothing more:
//!
//! - [`tls`]: TLS 1.3-only rustls configurations, the pinned-CA verifier used at
//!   enrollment, the tonic connector, and peer identities read from certificates.
//! - [`secret`]: the type that holds secret bytes (redacted `Debug`, zeroized on drop).
//! - [`config`]: TOML loading whose errors name the file and the field.
//! - [`error`]: an error and its causes on one line, for logs and messages.
//! - [`fs`]: atomic file replacement (temp file 0600, fsync, rename, fsync of the directory).
//! - [`ha`]: how a follower names the leader, and the order in which clients try
//!   several coordinator addresses.
//! - [`clidoc`]: shell completions and man pages from a binary's clap definition.
//! - [`time`] and [`logging`]: small helpers every binary uses the same way.
//! - [`testing`]: the one wait budget the crates' and e2e tests derive deadlines from.
//!
//! Owns no tasks and no channels.

pub mod clidoc;
pub mod config;
pub mod error;
pub mod fs;
pub mod ha;
pub mod logging;
pub mod secret;
pub mod testing;
pub mod time;
pub mod tls;

/// This build's version, reported by agents in their hello and shown by `rekey agents`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
