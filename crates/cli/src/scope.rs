//! `rekey scope SECRET`: where a secret's values occur across the fleet —
//! the consumer map as a table (host, file, line, version, declared or not),
//! or the coordinator's JSON document with `-o json`. The coordinator sends
//! the agents keyed fingerprints, never values; nothing here prints one.

use crate::rotate::s;
use crate::table::Table;
use crate::{Client, Output, output};
use anyhow::Result;
use rekey_common::time::parse_duration;
use rekey_proto::v1::ScopeRequest;
use serde_json::Value;
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
}

pub async fn run(client: &Client, out: Output, args: &ScopeArgs) -> Result<()> {
    let req = client.request(ScopeRequest {
        secret: args.secret.clone(),
        version: args.version.clone().unwrap_or_default(),
        rotation_id: args.rotation.clone().unwrap_or_default(),
        timeout_seconds: u32::try_from(args.timeout.as_secs().max(1)).unwrap_or(u32::MAX),
    });
    let v = client.json(client.inner.clone().scope(req).await)?;
    output(out, &v, print_map);
    Ok(())
}

fn list(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().map(s).collect()).unwrap_or_default()
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
pub fn print_map(v: &Value) {
    let sum = &v["summary"];
    let leftover_scan = v["leftover_scan"] == true;
    println!(
        "{} of {}: scan {}, {} of {} asked answered in {:.1}s",
        if leftover_scan { "leftovers" } else { "scope" },
        s(&v["secret"]),
        s(&v["scan_id"]),
        sum["answered"].as_u64().unwrap_or(0),
        plural(sum["hosts_asked"].as_u64().unwrap_or(0), "host", "hosts"),
        v["elapsed_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
    );
    let searched: Vec<String> = v["searched"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            let part = if x["partial"] == true { ", in part" } else { "" };
            format!("{} ({}) {}{part}", s(&x["version"]), s(&x["role"]), s(&x["field"]))
        })
        .collect();
    println!("looked for: {}", searched.join("; "));
    for n in v["not_searched"].as_array().into_iter().flatten() {
        let field = match &n["field"] {
            Value::Null => String::new(),
            f => format!(" field {}", s(f)),
        };
        println!("not searched: {} ({}){field}: {}", s(&n["version"]), s(&n["role"]), s(&n["reason"]));
    }
    println!();

    let mut t = Table::new(["HOST", "FILE", "LINE", "VERSION", "FIELD", "WHERE"]);
    for h in v["hosts"].as_array().into_iter().flatten() {
        let host = s(&h["host"]);
        let files = h["files"].as_array().cloned().unwrap_or_default();
        match h["status"].as_str() {
            Some("answered") => {}
            Some("error") => {
                t.row([
                    host,
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    format!("scan failed: {}", s(&h["error"])),
                ]);
                continue;
            }
            _ => {
                t.row([
                    host,
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    format!("not answering: {}", s(&h["error"])),
                ]);
                continue;
            }
        }
        if files.is_empty() {
            let note = if h["declared_not_found"] == true {
                "declares the secret: NOT FOUND".to_string()
            } else {
                format!("nothing found ({})", plural(h["files_scanned"].as_u64().unwrap_or(0), "file", "files"))
            };
            t.row([host, "-".into(), "-".into(), "-".into(), "-".into(), note]);
            continue;
        }
        for f in &files {
            // One row per version and field of the file, its lines together.
            let mut groups: Vec<((String, String, String), Vec<u64>)> = Vec::new();
            for l in f["lines"].as_array().into_iter().flatten() {
                let key = (s(&l["version"]), s(&l["role"]), s(&l["field"]));
                let n = l["line"].as_u64().unwrap_or(0);
                match groups.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, v)) => v.push(n),
                    None => groups.push((key, vec![n])),
                }
            }
            for ((version, role, field), ls) in groups {
                let declared = f["declared"] == true;
                let place = match (role.as_str(), declared) {
                    ("old", true) => "LEFTOVER (declared)".to_string(),
                    ("old", false) => "LEFTOVER (UNDECLARED)".to_string(),
                    (_, true) => "declared".to_string(),
                    (_, false) => "UNDECLARED".to_string(),
                };
                t.row([host.clone(), s(&f["path"]), lines(&ls), format!("{version} {role}"), field, place]);
            }
        }
    }
    print!("{t}");

    let undeclared = sum["undeclared"].as_u64().unwrap_or(0);
    let leftovers = sum["leftovers"].as_u64().unwrap_or(0);
    let mut notes = Vec::new();
    if leftovers > 0 {
        notes.push(format!("{} of an old version: remove or replace them", plural(leftovers, "leftover", "leftovers")));
    }
    // Undeclared copies of the current or new version: a rotation would miss them.
    let missed = undeclared
        .saturating_sub(v["undeclared"].as_array().into_iter().flatten().filter(|o| o["role"] == "old").count() as u64);
    if missed > 0 {
        notes.push(format!(
            "{} in files no agent config declares: a rotation will not update them",
            plural(missed, "occurrence", "occurrences")
        ));
    }
    let missing = list(&sum["declared_not_found"]);
    if !missing.is_empty() {
        notes.push(format!("declared but not found on: {}", missing.join(", ")));
    }
    let silent = list(&sum["not_answering"]);
    if !silent.is_empty() {
        notes.push(format!("not answering: {}", silent.join(", ")));
    }
    for h in v["hosts"].as_array().into_iter().flatten() {
        if h["truncated"] == true {
            notes.push(format!("{}: scan incomplete ({})", s(&h["host"]), s(&h["limit"])));
        }
        if let Some(skipped) = h["skipped"].as_object().filter(|m| !m.is_empty()) {
            let what = skipped.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ");
            notes.push(format!("{}: skipped {what}", s(&h["host"])));
        }
    }
    if !notes.is_empty() {
        println!();
        for n in notes {
            println!("{n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_shortened() {
        assert_eq!(lines(&[1, 2]), "1,2");
        assert_eq!(lines(&[1, 2, 3, 4, 5, 6, 7]), "1,2,3,4,5,… (7 lines)");
    }
}
