//! `rekey-agent`: runs on every host. Enrolls once ([`enroll`]), then keeps
//! one mTLS session to rekeyd open ([`session`]) and applies what it delivers
//! ([`pipeline`]).
//!
//! The agent acts only on what its own `agent.toml` ([`config`]) declares:
//! the coordinator can never name a path or a command. A delivered version is
//! written to the declared files (template, in-place replace, env-file),
//! the declared service is restarted (systemd unit, command, signal) and
//! health-checked (HTTP, TCP, command); every stage is reported, with a keyed
//! fingerprint of the loaded version on `HEALTHY`; any failure restores the
//! files from private backups, restarts and re-checks. A local journal (no
//! secret values) lets a restarted agent undo what a crash interrupted. It
//! links no cloud SDK and not the coordinator crate (checked by a test).
//!
//! Tasks and channels:
//! - the session loop (one task; heartbeats and renewal are timers in it);
//! - one apply worker per restart group ([`dispatch`]: the secrets that share
//!   a restart, or one secret), fed by a bounded queue (16 per secret) from
//!   the session, outliving sessions; deliveries of a group that arrive
//!   together are applied behind one restart;
//! - the [`outbox`] of stage reports between them (bounded, latest per
//!   rotation and secret), drained by the session after each `Welcome`;
//! - at most one scope [`scan`] at a time (a task around a blocking thread,
//!   bounded in files, depth, size and time), answering on the session's
//!   outbound channel and ending with the session;
//! - at most four [`preflight`] dry runs at a time (`rekey rotate plan`), each
//!   a bounded task answering on the session's outbound channel.

pub mod config;
pub mod dispatch;
pub mod enroll;
pub mod identity;
pub mod outbox;
pub mod pipeline;
pub mod preflight;
pub mod scan;
pub mod session;
