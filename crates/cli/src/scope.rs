//! `rekey scope SECRET`: where a secret's values occur across the fleet —
//! the consumer map as a table (host, file, line, version, declared or not),
//! or the `ScopeView` itself with `-o json`. The coordinator sends
//! the agents keyed fingerprints, never values; nothing here prints one.

use crate::rotate::{cell, opt};
use crate::table::Table;
use crate::{Client, Exit, Output, output};
use anyhow::Result;
use rekey_common::time::parse_duration;
use rekey_proto::v1::ScopeRequest;
use rekey_types::v1::{ScanStatus, ScopeFileView, ScopeHostView, ScopeView, VersionRole};
use std::time::Duration;

#[derive(clap::Args, Clone)]
pub struct ScopeArgs {
    /// The secret to look for (its name in the catalog).
    pub secret: String,
    /// Only this version: current, new (being rolled out) or old (leftovers
    /// of the last rotation; its value must still be held by the coordinator).
    #[arg(long, value_parser = ["current", "new", "old"])]
    pub version: Option<String>,
    /// Look at this rotation's versions (alone: its old one — a leftover scan).
    #[arg(long)]
    pub rotation: Option<String>,
    /// How long to wait for the agents (at most 5m).
    #[arg(long, value_parser = parse_duration, default_value = "20s")]
    pub timeout: Duration,
    /// For scripts: exit 3 if any searched value was found, 4 if nothing was
    /// found but the scan was incomplete (a host did not answer or failed, a
    /// scan stopped at a limit, a version could not be searched); 0 only for
    /// a complete scan that found nothing.
    #[arg(long)]
    pub fail_on_found: bool,
}

/// `--fail-on-found`: something was found.
pub const EXIT_FOUND: u8 = 3;
/// `--fail-on-found`: nothing found, but not everything was looked at.
pub const EXIT_INCOMPLETE: u8 = 4;

pub async fn run(client: &Client, out: Output, args: &ScopeArgs) -> Result<()> {
    let req = client.request(ScopeRequest {
        secret: args.secret.clone(),
        version: args.version.clone().unwrap_or_default(),
        rotation_id: args.rotation.clone().unwrap_or_default(),
        timeout_seconds: u32::try_from(args.timeout.as_secs().max(1)).unwrap_or(u32::MAX),
    });
    let v: ScopeView = client.view(client.inner.clone().scope(req).await)?;
    output(out, &v, print_map);
    match args.fail_on_found.then(|| verdict(&v)).flatten() {
        Some(exit) => Err(exit.into()),
        None => Ok(()),
    }
}

/// What `--fail-on-found` exits with: `None` for a complete scan that found nothing.
fn verdict(v: &ScopeView) -> Option<Exit> {
    let sum = &v.summary;
    if sum.occurrences > 0 {
        let message = format!(
            "found {} on {} (--fail-on-found)",
            plural(sum.occurrences as u64, "occurrence", "occurrences"),
            list(&sum.hosts_with_value).join(", ")
        );
        return Some(Exit { code: EXIT_FOUND, message });
    }
    let mut gaps = Vec::new();
    if !sum.not_answering.is_empty() {
        gaps.push(format!("not answering: {}", list(&sum.not_answering).join(", ")));
    }
    if !sum.errors.is_empty() {
        gaps.push(format!("scan failed on: {}", list(&sum.errors).join(", ")));
    }
    if !sum.truncated.is_empty() {
        gaps.push(format!("stopped at a limit on: {}", list(&sum.truncated).join(", ")));
    }
    for n in &v.not_searched {
        gaps.push(format!("{} ({}) not searched: {}", cell(&n.version), n.role, cell(&n.reason)));
    }
    if gaps.is_empty() {
        return None;
    }
    let message = format!("nothing found, but the scan was incomplete ({}) (--fail-on-found)", gaps.join("; "));
    Some(Exit { code: EXIT_INCOMPLETE, message })
}

fn list(v: &[String]) -> Vec<String> {
    v.iter().map(|x| cell(x)).collect()
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Lines as `3,7,12` (the first few).
fn lines(v: &[u64]) -> String {
    const SHOWN: usize = 5;
    let mut out = v.iter().take(SHOWN).map(u64::to_string).collect::<Vec<_>>().join(",");
    if v.len() > SHOWN {
        out.push_str(&format!(",… ({} lines)", v.len()));
    }
    out
}

/// The consumer map as a table: one row per host, file, version and field.
pub fn print_map(v: &ScopeView) {
    print_header(v);
    let mut t = Table::new(["HOST", "FILE", "LINE", "VERSION", "FIELD", "WHERE"]);
    for h in &v.hosts {
        host_rows(&mut t, h);
    }
    print!("{t}");
    let notes = notes(v);
    if !notes.is_empty() {
        println!();
        for n in notes {
            println!("{n}");
        }
    }
}

/// Who answered, and what was (and was not) looked for.
fn print_header(v: &ScopeView) {
    let sum = &v.summary;
    println!(
        "{} of {}: scan {}, {} of {} asked answered in {:.1}s",
        if v.leftover_scan { "leftovers" } else { "scope" },
        cell(&v.secret),
        cell(&v.scan_id),
        sum.answered,
        plural(sum.hosts_asked as u64, "host", "hosts"),
        v.elapsed_ms as f64 / 1000.0,
    );
    let searched: Vec<String> = v
        .searched
        .iter()
        .map(|x| {
            let part = if x.partial { ", in part" } else { "" };
            format!("{} ({}) {}{part}", cell(&x.version), x.role, cell(&x.field))
        })
        .collect();
    println!("looked for: {}", searched.join("; "));
    for n in &v.not_searched {
        let field = match &n.field {
            None => String::new(),
            Some(f) => format!(" field {}", cell(f)),
        };
        println!("not searched: {} ({}){field}: {}", cell(&n.version), n.role, cell(&n.reason));
    }
    println!();
}

/// A host's rows: one per file, version and field, or one saying why there are none.
fn host_rows(t: &mut Table, h: &ScopeHostView) {
    let host = cell(&h.host);
    let dash = || "-".to_string();
    match h.status {
        ScanStatus::Answered => {}
        ScanStatus::Error => {
            t.row([host, dash(), dash(), dash(), dash(), format!("scan failed: {}", opt(h.error.as_deref()))]);
            return;
        }
        ScanStatus::NotAnswering => {
            t.row([host, dash(), dash(), dash(), dash(), format!("not answering: {}", opt(h.error.as_deref()))]);
            return;
        }
    }
    if h.files.is_empty() {
        let note = if h.declared_not_found {
            "declares the secret: NOT FOUND".to_string()
        } else {
            format!("nothing found ({})", plural(h.files_scanned, "file", "files"))
        };
        t.row([host, dash(), dash(), dash(), dash(), note]);
        return;
    }
    for f in &h.files {
        file_rows(t, &host, f);
    }
}

/// One row per version and field of the file, its lines together.
fn file_rows(t: &mut Table, host: &str, f: &ScopeFileView) {
    let mut groups: Vec<((String, VersionRole, String), Vec<u64>)> = Vec::new();
    for l in &f.lines {
        let key = (cell(&l.version), l.role, cell(&l.field));
        let n = u64::from(l.line);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(n),
            None => groups.push((key, vec![n])),
        }
    }
    for ((version, role, field), ls) in groups {
        let place = match (role, f.declared) {
            (VersionRole::Old, true) => "LEFTOVER (declared)".to_string(),
            (VersionRole::Old, false) => "LEFTOVER (UNDECLARED)".to_string(),
            (_, true) => "declared".to_string(),
            (_, false) => "UNDECLARED".to_string(),
        };
        t.row([host.to_string(), cell(&f.path), lines(&ls), format!("{version} {role}"), field, place]);
    }
}

/// What the operator should act on, in words.
fn notes(v: &ScopeView) -> Vec<String> {
    let sum = &v.summary;
    let undeclared = sum.undeclared as u64;
    let leftovers = sum.leftovers as u64;
    let mut notes = Vec::new();
    if leftovers > 0 {
        notes.push(format!("{} of an old version: remove or replace them", plural(leftovers, "leftover", "leftovers")));
    }
    // Undeclared copies of the current or new version: a rotation would miss them.
    let missed = undeclared.saturating_sub(v.undeclared.iter().filter(|o| o.role == VersionRole::Old).count() as u64);
    if missed > 0 {
        notes.push(format!(
            "{} in files no agent config declares: a rotation will not update them",
            plural(missed, "occurrence", "occurrences")
        ));
    }
    let missing = list(&sum.declared_not_found);
    if !missing.is_empty() {
        notes.push(format!("declared but not found on: {}", missing.join(", ")));
    }
    let silent = list(&sum.not_answering);
    if !silent.is_empty() {
        notes.push(format!("not answering: {}", silent.join(", ")));
    }
    for h in &v.hosts {
        if h.truncated {
            notes.push(format!("{}: scan incomplete ({})", cell(&h.host), opt(h.limit.as_deref())));
        }
        if !h.skipped.is_empty() {
            let what = h.skipped.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ");
            notes.push(format!("{}: skipped {what}", cell(&h.host)));
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> ScopeView {
        serde_json::from_str(include_str!("../../types/tests/shape/scope.json")).unwrap()
    }

    #[test]
    fn fail_on_found_tells_found_from_incomplete_from_clean() {
        let mut v = example();
        let found = verdict(&v).unwrap();
        assert_eq!(found.code, EXIT_FOUND);
        assert!(found.message.contains("3 occurrences on host-1"), "{}", found.message);

        v.summary.occurrences = 0;
        v.summary.hosts_with_value.clear();
        let gaps = verdict(&v).unwrap();
        assert_eq!(gaps.code, EXIT_INCOMPLETE);
        assert!(gaps.message.contains("not answering: host-2"), "{}", gaps.message);
        assert!(
            gaps.message.contains("v-older (old) not searched: the old value is no longer held"),
            "{}",
            gaps.message
        );

        v.summary.not_answering.clear();
        v.not_searched.clear();
        assert!(verdict(&v).is_none(), "a complete scan that found nothing exits 0");
        v.summary.truncated.push("host-1".into());
        assert_eq!(verdict(&v).unwrap().code, EXIT_INCOMPLETE);
    }

    #[test]
    fn lines_are_shortened() {
        assert_eq!(lines(&[1, 2]), "1,2");
        assert_eq!(lines(&[1, 2, 3, 4, 5, 6, 7]), "1,2,3,4,5,… (7 lines)");
    }
}
