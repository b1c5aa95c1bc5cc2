//! End-to-end tests over real processes and real mTLS on loopback.
//! One test binary for the whole workspace keeps link time down.

mod architecture;
mod breach;
mod campaigns;
mod console;
mod demo;
mod engine;
mod foundation;
mod grpc;
mod ha;
mod ha_clients;
mod metrics;
mod netns;
mod packages;
mod pipeline;
mod postgres_fixture;
mod postgres_provider;
mod preflight;
mod providers;
mod reports;
mod scale;
mod scope;
mod security;
mod security_agent;
mod security_operators;
mod security_scope;
mod shared_restart;
mod store_backends;
