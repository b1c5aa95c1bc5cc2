//! Reconciliation of rekey's record with what the provider lists: pure, no
//! I/O. Run before generating (by `rekey rotate plan` and by every start) so
//! a rotation never takes as "old" a version that is gone, and drift (active
//! versions rekey did not make or does not know) is named instead of hidden.
//!
//! The decision on the old version, documented in `docs/rotation.md`:
//! - the recorded current version is listed → it is the old one (even if the
//!   provider shows it inactive: that is reported, the hosts still run it);
//! - it is missing and exactly one active version is unknown to rekey → that
//!   one is taken as the old one (audited as drift at start);
//! - it is missing and no version is active → there is nothing to revoke;
//!   the rotation only creates one (reported);
//! - it is missing and two or more unknown versions are active → refused:
//!   rekey cannot tell which one the hosts run; the operator deactivates or
//!   deletes the one not in use at the provider, then plans again.

use rekey_providers::{ProviderConfig, VersionInfo, VersionStatus};
use std::collections::BTreeSet;

/// What rekey would take as the version being replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldVersion {
    /// rekey's record, found at the provider.
    Recorded(String),
    /// The record is missing at the provider; the one active version
    /// (unknown to rekey) is taken instead.
    Adopted(String),
    /// Nothing is recorded yet (a first rotation): the provider's own idea of
    /// its current version is used, as before.
    FirstRotation,
    /// The record is missing and nothing is active: nothing to revoke.
    Nothing,
    /// The record is missing and several unknown versions are active.
    Ambiguous(Vec<String>),
}

/// rekey's record set against the provider's list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciliation {
    pub recorded: Option<String>,
    /// The recorded version is not in the provider's list.
    pub recorded_missing: bool,
    /// The recorded version is listed, but inactive.
    pub recorded_inactive: bool,
    /// Every version the provider shows active, sorted.
    pub active: Vec<String>,
    /// Active versions rekey neither recorded nor knows (drift), sorted.
    /// Empty on a first rotation: nothing is recorded to differ from.
    pub unknown_active: Vec<String>,
    pub old: OldVersion,
    /// The provider's limit on versions would stop the create, e.g. an IAM
    /// user already holding two active keys.
    pub quota: Option<String>,
    /// What the create will do to stay under the limit (not a problem).
    pub quota_note: Option<String>,
}

/// Versions per secret a provider kind allows, where it has a limit.
pub fn version_limit(provider_kind: &str) -> Option<usize> {
    (provider_kind == "aws-iam").then_some(2)
}

/// Whether the provider's config lets rekey list its versions (the http and
/// command providers need a `list` request for it).
pub fn can_list(config: &ProviderConfig) -> bool {
    match config {
        ProviderConfig::Http(c) => c.list.is_some(),
        ProviderConfig::Command(c) => c.list.is_some(),
        _ => true,
    }
}

/// Reconciles `recorded` (rekey's current version) with `listed` (the
/// provider's versions). `known` holds every version rekey made or holds;
/// `limit` is [`version_limit`] of the provider.
pub fn reconcile(
    recorded: Option<&str>,
    known: &BTreeSet<String>,
    listed: &[VersionInfo],
    limit: Option<usize>,
) -> Reconciliation {
    let mut active: Vec<String> =
        listed.iter().filter(|v| v.status == VersionStatus::Active).map(|v| v.id.clone()).collect();
    active.sort();
    active.dedup();
    let found = recorded.and_then(|r| listed.iter().find(|v| v.id == r));
    let recorded_missing = recorded.is_some() && found.is_none();
    let recorded_inactive = found.is_some_and(|v| v.status == VersionStatus::Inactive);
    let unknown_active: Vec<String> = match recorded {
        None => Vec::new(),
        Some(r) => active.iter().filter(|a| a.as_str() != r && !known.contains(*a)).cloned().collect(),
    };
    let old = match (recorded, found) {
        (None, _) => OldVersion::FirstRotation,
        (Some(r), Some(_)) => OldVersion::Recorded(r.to_string()),
        (Some(_), None) => match unknown_active.as_slice() {
            [] => OldVersion::Nothing,
            [one] => OldVersion::Adopted(one.clone()),
            many => OldVersion::Ambiguous(many.to_vec()),
        },
    };
    let (quota, quota_note) = quota(listed, &active, &old, limit);
    Reconciliation {
        recorded: recorded.map(str::to_string),
        recorded_missing,
        recorded_inactive,
        active,
        unknown_active,
        old,
        quota,
        quota_note,
    }
}

/// At the limit, the create must make room: only an inactive version that is
/// not the one being replaced may go (what the providers do); none → a problem.
fn quota(
    listed: &[VersionInfo],
    active: &[String],
    old: &OldVersion,
    limit: Option<usize>,
) -> (Option<String>, Option<String>) {
    let Some(limit) = limit else { return (None, None) };
    if listed.len() < limit {
        return (None, None);
    }
    let all = listed.iter().map(|v| v.id.as_str()).collect::<Vec<_>>().join(", ");
    if active.len() >= limit {
        return (
            Some(format!(
                "the provider already holds {} active versions ({all}) and allows {limit}: \
                 deactivate and delete the one not in use, then plan again",
                active.len()
            )),
            None,
        );
    }
    let replaced = match old {
        OldVersion::Recorded(v) | OldVersion::Adopted(v) => Some(v.as_str()),
        _ => None,
    };
    let stale: Vec<&str> = listed
        .iter()
        .filter(|v| v.status == VersionStatus::Inactive && Some(v.id.as_str()) != replaced)
        .map(|v| v.id.as_str())
        .collect();
    match stale.first() {
        Some(s) => (
            None,
            Some(format!(
                "at the limit of {limit} versions ({all}): the stale inactive {s} will be deleted to make room"
            )),
        ),
        None => (
            Some(format!(
                "the provider holds {} versions ({all}), allows {limit}, and none is a stale inactive one rekey may delete: \
                 delete the one not in use, then plan again",
                listed.len()
            )),
            None,
        ),
    }
}

impl Reconciliation {
    /// The version a rotation started now replaces, when rekey can tell
    /// without asking the provider for its current one.
    pub fn old_version(&self) -> Option<&str> {
        match &self.old {
            OldVersion::Recorded(v) | OldVersion::Adopted(v) => Some(v),
            _ => None,
        }
    }

    /// What stops a rotation: an ambiguous old version, a quota. Each a line.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let OldVersion::Ambiguous(vs) = &self.old {
            out.push(format!(
                "the recorded current version {} is not at the provider, and {} unknown versions are active ({}): \
                 rekey cannot tell which one the hosts run; deactivate or delete the one not in use at the provider, \
                 then plan again",
                self.recorded.as_deref().unwrap_or("-"),
                vs.len(),
                vs.join(", ")
            ));
        }
        out.extend(self.quota.clone());
        out
    }

    /// What an operator should know but that stops nothing. Each a line.
    pub fn findings(&self) -> Vec<String> {
        let rec = self.recorded.as_deref().unwrap_or("-");
        let mut out = Vec::new();
        match &self.old {
            OldVersion::Adopted(v) => out.push(format!(
                "the recorded current version {rec} is not at the provider (rotated outside rekey?): \
                 the active version {v} is taken as the old one"
            )),
            OldVersion::Nothing => out.push(format!(
                "the recorded current version {rec} is not at the provider and no version is active: \
                 the rotation will create one and revoke nothing"
            )),
            _ => {}
        }
        if self.recorded_inactive {
            out.push(format!("the recorded current version {rec} is inactive at the provider"));
        }
        let drift: Vec<&String> = self.unknown_active.iter().filter(|v| self.old_version() != Some(v)).collect();
        if !drift.is_empty() {
            out.push(format!(
                "drift: active at the provider but not made or known by rekey: {}",
                drift.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        out.extend(self.quota_note.clone());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(id: &str, active: bool) -> VersionInfo {
        let status = if active { VersionStatus::Active } else { VersionStatus::Inactive };
        VersionInfo { id: id.into(), status, created_unix: None }
    }

    fn known(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_recorded_version_found_is_the_old_one_and_other_active_ones_are_drift() {
        let r = reconcile(Some("A"), &known(&["A"]), &[v("A", true), v("X", true), v("B", false)], None);
        assert_eq!(r.old, OldVersion::Recorded("A".into()));
        assert_eq!(r.active, vec!["A", "X"]);
        assert_eq!(r.unknown_active, vec!["X"]);
        assert!(r.problems().is_empty());
        assert!(r.findings().iter().any(|f| f.starts_with("drift") && f.contains('X')), "{:?}", r.findings());
    }

    #[test]
    fn a_version_rekey_knows_is_not_drift() {
        let r = reconcile(Some("A"), &known(&["A", "N"]), &[v("A", true), v("N", true)], None);
        assert!(r.unknown_active.is_empty());
        assert!(r.findings().is_empty());
    }

    #[test]
    fn rotated_outside_rekey_the_one_active_version_is_adopted() {
        let r = reconcile(Some("A"), &known(&["A"]), &[v("B", true)], None);
        assert!(r.recorded_missing);
        assert_eq!(r.old, OldVersion::Adopted("B".into()));
        assert_eq!(r.old_version(), Some("B"));
        assert!(r.problems().is_empty());
        let f = r.findings();
        assert!(f.iter().any(|l| l.contains("A is not at the provider") && l.contains("B is taken")), "{f:?}");
        // The adopted version is named once, not again as drift.
        assert!(!f.iter().any(|l| l.starts_with("drift")), "{f:?}");
    }

    #[test]
    fn two_active_unknowns_are_ambiguous_and_refused() {
        let r = reconcile(Some("A"), &known(&["A"]), &[v("B", true), v("C", true)], None);
        assert_eq!(r.old, OldVersion::Ambiguous(vec!["B".into(), "C".into()]));
        assert_eq!(r.old_version(), None);
        let p = r.problems();
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("B, C") && p[0].contains("deactivate or delete"), "{p:?}");
    }

    #[test]
    fn missing_with_nothing_active_revokes_nothing() {
        let r = reconcile(Some("A"), &known(&["A"]), &[v("Z", false)], None);
        assert_eq!(r.old, OldVersion::Nothing);
        assert!(r.problems().is_empty());
        assert!(r.findings()[0].contains("revoke nothing"));
    }

    #[test]
    fn first_rotation_reports_no_drift() {
        let r = reconcile(None, &known(&[]), &[v("A", true), v("B", true)], None);
        assert_eq!(r.old, OldVersion::FirstRotation);
        assert!(r.unknown_active.is_empty() && r.findings().is_empty() && r.problems().is_empty());
    }

    #[test]
    fn recorded_but_inactive_is_reported() {
        let r = reconcile(Some("A"), &known(&["A"]), &[v("A", false)], None);
        assert_eq!(r.old, OldVersion::Recorded("A".into()));
        assert!(r.recorded_inactive && !r.recorded_missing);
        assert!(r.findings().iter().any(|f| f.contains("inactive")));
    }

    #[test]
    fn an_iam_user_with_two_active_keys_is_a_quota_problem() {
        let limit = version_limit("aws-iam");
        assert_eq!(limit, Some(2));
        let r = reconcile(Some("A"), &known(&["A"]), &[v("A", true), v("X", true)], limit);
        assert!(r.problems().iter().any(|p| p.contains("2 active versions (A, X)") && p.contains("allows 2")));
        // One stale inactive key: room is made, a note not a problem.
        let r = reconcile(Some("A"), &known(&["A"]), &[v("A", true), v("S", false)], limit);
        assert!(r.problems().is_empty());
        assert!(r.findings().iter().any(|f| f.contains("stale inactive S will be deleted")));
        // The only inactive key is the one being replaced: nothing may go.
        let r = reconcile(Some("A"), &known(&["A"]), &[v("A", false), v("B", true)], limit);
        assert!(r.problems().iter().any(|p| p.contains("none is a stale inactive")), "{:?}", r.problems());
        // Under the limit, or no limit: nothing to say.
        assert!(reconcile(Some("A"), &known(&["A"]), &[v("A", true)], limit).quota.is_none());
        assert!(reconcile(Some("A"), &known(&["A"]), &[v("A", true), v("X", true)], None).quota.is_none());
    }

    proptest! {
        /// Whatever the provider lists: the old version, when there is one,
        /// is listed (and active unless it is the record); drift never names
        /// the record or a known version; an ambiguous case is always a problem.
        #[test]
        fn decisions_hold_for_any_listing(
            rec in proptest::option::of(0u8..6),
            known_ids in proptest::collection::btree_set(0u8..6, 0..4),
            listing in proptest::collection::vec((0u8..6, any::<bool>()), 0..6),
        ) {
            let id = |n: u8| format!("v{n}");
            let listed: Vec<VersionInfo> = listing.iter().map(|(n, a)| v(&id(*n), *a)).collect();
            let known: BTreeSet<String> = known_ids.iter().map(|n| id(*n)).collect();
            let recorded = rec.map(id);
            let r = reconcile(recorded.as_deref(), &known, &listed, Some(2));
            if let Some(old) = r.old_version() {
                prop_assert!(listed.iter().any(|l| l.id == old));
                if recorded.as_deref() != Some(old) {
                    prop_assert!(r.active.iter().any(|a| a == old) && !known.contains(old));
                }
            }
            for d in &r.unknown_active {
                prop_assert!(Some(d.as_str()) != recorded.as_deref() && !known.contains(d));
                prop_assert!(r.active.contains(d));
            }
            if matches!(r.old, OldVersion::Ambiguous(_)) {
                prop_assert!(!r.problems().is_empty());
            }
            prop_assert_eq!(r.recorded_missing, recorded.is_some() && !listed.iter().any(|l| Some(&l.id) == recorded.as_ref()));
        }
    }
}
