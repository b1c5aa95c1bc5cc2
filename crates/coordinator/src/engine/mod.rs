//! The rotation engine: the pure state machine ([`machine`]) and rollout
//! planner ([`plan`]), the reconciliation with the provider ([`reconcile`]),
//! the secret catalog ([`catalog`]), and the driver that
//! persists each transition before performing its side effects ([`driver`]),
//! reaching agents only through [`link::AgentLink`] and providers only
//! through `rekey_providers::Provider`.

pub mod campaign;
pub mod catalog;
pub mod driver;
pub mod incident;
pub mod link;
pub mod machine;
pub mod plan;
pub mod reconcile;
pub mod state;
