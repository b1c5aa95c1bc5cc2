//! Version 1 of the admin API's views: the JSON documents `rekeyd` returns
//! (in `JsonResponse.json`) and the CLI prints with `-o json`. Their stable
//! shape is documented in `docs/views.md` and pinned by `tests/shape.rs`.
//!
//! Compatibility within [`VIEWS_VERSION`] 1: fields may be added; none is
//! renamed, removed or retyped, and no enum value is added, removed or
//! respelled (readers match them exhaustively). A breaking change means a
//! `v2` module and a protocol version bump
//! (`rekey_proto::PROTOCOL_VERSION`), so a CLI and a coordinator that disagree
//! refuse each other instead of misreading each other.
//!
//! Times are Unix milliseconds (`*_ms`) or seconds (`*_unix`); enums are
//! `snake_case` strings. No view ever holds a secret value: versions are named
//! by id, and what hosts loaded by a keyed fingerprint.

mod agent;
mod audit;
mod coordinator;
mod incident;
mod operator;
mod plan;
mod rotation;
mod scope;
mod secret;

pub use agent::{AgentFilter, AgentFilterError, AgentRevokedView, AgentState, AgentView, JoinTokenView};
pub use audit::{AlertKind, AlertView, AuditRecordView, AuditVerifyView, BrokenLink, Severity};
pub use coordinator::{CoordinatorsView, ReplicaView, StoreBackend};
pub use incident::{CampaignState, IncidentSecretState, IncidentSecretView, IncidentState, IncidentView};
pub use operator::{OperatorRole, OperatorView};
pub use plan::{
    PlanCheckView, PlanHostStatus, PlanHostView, PlanProblemView, PlanProviderView, PlanView, PlanWaveView,
};
pub use rotation::{
    Amount, DecisionKind, DecisionView, EvidenceView, ExclusionView, ExitView, GraceUse, HostState, HostView,
    PolicyView, RotationState, RotationSummary, RotationView, SelectorWaveView, TimelineEntryView, Usage,
    UseAfterSwitch,
};
pub use scope::{
    NotSearchedView, OccurrenceView, ScanStatus, ScopeFileLine, ScopeFileVersion, ScopeFileView, ScopeHostView,
    ScopeSummary, ScopeView, SearchedView, SkippedFileView, VersionRole,
};
pub use secret::{LastRotationView, SecretView, VersionStatus, VersionView};

/// The version of the views in this module. A breaking change to any of
/// them is a new module (`v2`) with its own `VIEWS_VERSION`, shipped with a
/// protocol version bump.
pub const VIEWS_VERSION: u32 = 1;

/// A string enum of a view: each value's JSON spelling is written next to it
/// (they are part of the stable shape), `as_str` and `Display` give the same
/// spelling, and `ALL` lists every value.
macro_rules! string_enum {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $v,)*
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$v,)*];

            /// The value as its JSON spells it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$v => $s,)*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }
    };
}
pub(crate) use string_enum;
