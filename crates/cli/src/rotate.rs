//! `rekey secrets`, `rekey rotate ...` and `rekey audit ...`: rendering of the
//! coordinator's JSON read models as tables, or passing them through (`-o json`).

use crate::table::Table;
use rekey_common::time::{format_relative, format_unix, now_unix};
use serde_json::Value;

/// A JSON value as a table cell: `-` for null or empty.
pub(crate) fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(x) if x.is_empty() => "-".into(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    }
}

fn ago_ms(v: &Value) -> String {
    v.as_i64().map(|ms| format_relative(ms / 1000, now_unix())).unwrap_or_else(|| "-".into())
}

fn short_fp(v: &Value) -> String {
    match v.as_str() {
        Some(f) if f.len() > 24 => format!("{}…", &f[..24]),
        Some(f) => f.to_string(),
        None => "-".into(),
    }
}

pub fn print_secrets(v: &Value) {
    let items = v.as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        println!("no secrets in the catalog: add [[secret]] blocks to the coordinator's config");
        return;
    }
    let mut t = Table::new(["NAME", "PROVIDER", "CURRENT VERSION", "CONSUMERS", "LAST ROTATION"]);
    for x in items {
        let consumers =
            x["consumers"].as_array().map(|a| a.iter().map(s).collect::<Vec<_>>().join(",")).unwrap_or_default();
        let last = match &x["last_rotation"] {
            Value::Null => "never".to_string(),
            r => format!("{} {} ({})", s(&r["id"]), s(&r["state"]), ago_ms(&r["updated_ms"])),
        };
        t.row([
            s(&x["name"]),
            s(&x["provider"]),
            s(&x["current_version"]),
            if consumers.is_empty() { "none".into() } else { consumers },
            last,
        ]);
    }
    print!("{t}");
}

pub fn print_rotation_list(v: &Value) {
    let items = v.as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        println!("no rotations yet: start one with `rekey rotate start SECRET`");
        return;
    }
    let mut t = Table::new(["ID", "SECRET", "STATE", "HOSTS", "STARTED", "BY"]);
    for x in items {
        let mut state = s(&x["state"]);
        if x["paused"] == true {
            state.push_str(" (paused)");
        }
        t.row([
            s(&x["id"]),
            s(&x["secret"]),
            state,
            format!("{}/{} healthy", x["healthy"], x["hosts"]),
            ago_ms(&x["created_ms"]),
            s(&x["started_by"]),
        ]);
    }
    print!("{t}");
}

/// One line summarizing a rotation's progress.
pub fn summary(r: &Value) -> String {
    let hosts = r["hosts"].as_object().cloned().unwrap_or_default();
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for h in hosts.values() {
        *counts.entry(s(&h["state"])).or_default() += 1;
    }
    let waves = r["waves"].as_array().map(Vec::len).unwrap_or(0);
    let wave = r["current_wave"].as_u64().unwrap_or(0) as usize;
    let wave_text = if waves == 0 {
        String::new()
    } else if wave == 0 && r["policy"]["canary"].as_u64().unwrap_or(0) > 0 {
        format!(" canary (wave 0 of {})", waves - 1)
    } else {
        format!(" wave {wave} of {}", waves.saturating_sub(1))
    };
    let hosts_text = counts.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ");
    format!("[{}{}]{} {}", s(&r["state"]), if r["paused"] == true { ", paused" } else { "" }, wave_text, hosts_text)
}

pub fn print_rotation(r: &Value) {
    println!("rotation   {}", s(&r["id"]));
    println!("secret     {}", s(&r["secret"]));
    let mut state = s(&r["state"]);
    if r["paused"] == true {
        state.push_str(" (paused)");
    }
    println!("state      {state}");
    println!("progress   {}", summary(r));
    println!("versions   {} → {}", s(&r["old_version"]), s(&r["new_version"]));
    println!(
        "started    {} by {}",
        r["created_ms"].as_i64().map(|m| format_unix(m / 1000)).unwrap_or_default(),
        s(&r["started_by"])
    );
    if let Some(w) = r["waiting_on"].as_str() {
        println!("waiting on {w}");
    }
    println!();
    let mut t = Table::new(["HOST", "WAVE", "STATE", "SINCE", "FINGERPRINT", "ERROR"]);
    if let Some(hosts) = r["hosts"].as_object() {
        for (name, h) in hosts {
            let mut err = s(&h["error"]);
            if let Some(ex) = h["exclusion"].as_object() {
                err = format!("excluded by {}: {}", s(&ex["by"]), s(&ex["reason"]));
            }
            t.row([
                name.clone(),
                s(&h["wave"]),
                s(&h["state"]),
                ago_ms(&h["updated_ms"]),
                short_fp(&h["fingerprint"]),
                err,
            ]);
        }
    }
    print!("{t}");
    let evidence = r["evidence"].as_array().cloned().unwrap_or_default();
    if !evidence.is_empty() {
        println!();
        println!("revocation evidence (provider usage of the old version)");
        for e in evidence.iter().rev().take(10).rev() {
            let at = e["at_ms"].as_i64().map(|m| format_unix(m / 1000)).unwrap_or_default();
            println!("  {at}  {:<13} {}", s(&e["phase"]), s(&e["verdict"]));
        }
    }
    println!();
    println!("timeline");
    for e in r["timeline"].as_array().cloned().unwrap_or_default() {
        let at = e["at_ms"].as_i64().map(|m| format_unix(m / 1000)).unwrap_or_default();
        println!("  {at}  {:<13} {}", s(&e["state"]), s(&e["note"]));
    }
}

pub fn print_audit(v: &Value) {
    let mut t = Table::new(["SEQ", "TIME", "ACTOR", "ACTION", "DETAILS"]);
    for r in v.as_array().cloned().unwrap_or_default() {
        let mut details = r["details"].clone();
        if let Some(o) = details.as_object_mut() {
            o.retain(|_, v| !v.is_null());
        }
        t.row([
            s(&r["seq"]),
            r["at_ms"].as_i64().map(|m| format_unix(m / 1000)).unwrap_or_default(),
            s(&r["actor"]),
            s(&r["action"]),
            details.to_string(),
        ]);
    }
    print!("{t}");
}

pub fn print_versions(v: &Value) {
    let mut t = Table::new(["VERSION", "STATUS", "CREATED", "CURRENT"]);
    for x in v.as_array().cloned().unwrap_or_default() {
        t.row([
            s(&x["id"]),
            s(&x["status"]),
            x["created_unix"].as_i64().map(format_unix).unwrap_or_else(|| "-".into()),
            if x["current"] == true { "yes".into() } else { String::new() },
        ]);
    }
    print!("{t}");
}

pub fn print_alerts(v: &Value) {
    let items = v.as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        println!("no alerts");
        return;
    }
    let mut t = Table::new(["#", "TIME", "SEVERITY", "SECRET", "ROTATION", "WEBHOOK", "MESSAGE"]);
    for a in items {
        t.row([
            s(&a["seq"]),
            a["at_ms"].as_i64().map(|m| format_unix(m / 1000)).unwrap_or_default(),
            s(&a["severity"]),
            s(&a["secret"]),
            s(&a["rotation"]),
            s(&a["delivery"]),
            s(&a["message"]),
        ]);
    }
    print!("{t}");
}
