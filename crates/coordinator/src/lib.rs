//! `rekeyd`, the rekey coordinator.
//!
//! Owns the CA ([`pki`]), the encrypted store ([`store`], [`crypto`]), the
//! registry of live agent sessions ([`sessions`]) and the two gRPC services
//! ([`service`]). [`server::Coordinator`] is the whole life of the process:
//! init, serve one mTLS listener, drain on shutdown.
//!
//! Tasks: the TLS accept loop (one task, plus one short task per handshake);
//! one inbound task per agent session, which ends with the session.

pub mod alert_routes;
pub mod alerts;
pub mod audit;
pub mod backup;
pub mod checkpoint;
pub mod config;
pub mod console;
pub mod crypto;
pub mod engine;
pub mod ha;
pub mod leading;
pub mod metrics;
pub mod pki;
pub mod preflight;
pub mod replica;
pub mod report;
pub mod scope;
pub mod server;
pub mod service;
pub mod sessions;
pub mod store;
pub mod supervisor;
pub mod tripwire;
