//! `rekey-agent`: runs on every host. Enrolls once ([`enroll`]), then keeps
//! one mTLS session to rekeyd open ([`session`]).
//!
//! The agent acts only on what its own `agent.toml` ([`config`]) declares:
//! the coordinator can never name a path or a command. It links no cloud SDK
//! and not the coordinator crate (checked by a test).
//!
//! Tasks: the session loop (one task; heartbeats and renewal are timers in it).

pub mod config;
pub mod enroll;
pub mod identity;
pub mod session;
