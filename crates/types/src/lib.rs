//! The read models of rekey's admin API: what `rekeyd` answers to a status,
//! list or report call, as types rather than untyped JSON. The coordinator
//! converts its engine's types into these views in one place
//! (`rekey-coordinator`'s `service::views`) and sends them as JSON; the CLI and
//! the end-to-end tests deserialize them into the same types, so a renamed
//! field fails to compile instead of failing at run time.
//!
//! Views are versioned by module: [`v1`] is the current (and only) version.
//! A breaking change — a field renamed, removed or retyped, an enum value
//! added, removed or renamed — means a `v2` module and a bump of the protocol
//! version (`rekey_proto::PROTOCOL_VERSION`); adding a field is not breaking.
//!
//! Plain data with serde: no I/O, no tasks, no dependency on the coordinator
//! or on tonic.

pub mod v1;
