//! `rekey secrets`, `rekey rotate ...` (with `rotate plan`), `rekey alerts` and `rekey audit ...`:
//! the coordinator's views (`rekey_types::v1`) as tables.

use crate::table::Table;
use rekey_common::time::{format_relative, format_unix, format_unix_ms, now_unix};
use rekey_types::v1::{
    AlertView, AuditRecordView, HostState, HostView, PlanHostStatus, PlanView, RotationSummary, RotationView,
    SecretView, VersionView,
};
use std::collections::BTreeMap;

/// A text as a table cell: `-` when empty.
pub(crate) fn cell(v: &str) -> String {
    if v.is_empty() { "-".into() } else { v.to_string() }
}

/// An optional text as a table cell: `-` when absent or empty.
pub(crate) fn opt(v: Option<&str>) -> String {
    cell(v.unwrap_or_default())
}

fn ago_ms(ms: i64) -> String {
    format_relative(ms / 1000, now_unix())
}

/// Times kept in milliseconds are shown to the millisecond.
fn at_ms(ms: i64) -> String {
    format_unix_ms(ms)
}

fn short_fp(v: Option<&str>) -> String {
    match v {
        Some(f) if f.len() > 24 => format!("{}…", &f[..24]),
        Some(f) => f.to_string(),
        None => "-".into(),
    }
}

pub fn print_secrets(items: &[SecretView]) {
    if items.is_empty() {
        println!("no secrets in the catalog: add [[secret]] blocks to the coordinator's config");
        return;
    }
    let mut t = Table::new(["NAME", "PROVIDER", "CURRENT VERSION", "CONSUMERS", "LAST ROTATION"]);
    for x in items {
        let consumers = x.consumers.iter().map(|c| cell(c)).collect::<Vec<_>>().join(",");
        let last = match &x.last_rotation {
            None => "never".to_string(),
            Some(r) => format!("{} {} ({})", cell(&r.id), r.state, ago_ms(r.updated_ms)),
        };
        t.row([
            cell(&x.name),
            cell(&x.provider),
            match (&x.current_version, x.current_version_adopted) {
                (Some(v), true) => format!("{} (adopted)", cell(v)),
                (v, _) => opt(v.as_deref()),
            },
            if consumers.is_empty() { "none".into() } else { consumers },
            last,
        ]);
    }
    print!("{t}");
}

pub fn print_rotation_list(items: &[RotationSummary]) {
    if items.is_empty() {
        println!("no rotations yet: start one with `rekey rotate start SECRET`");
        return;
    }
    let mut t = Table::new(["ID", "SECRET", "STATE", "HOSTS", "STARTED", "BY"]);
    for x in items {
        let mut state = x.state.to_string();
        if x.paused {
            state.push_str(" (paused)");
        }
        t.row([
            cell(&x.id),
            cell(&x.secret),
            state,
            format!("{}/{} healthy", x.healthy, x.hosts),
            ago_ms(x.created_ms),
            cell(&x.started_by),
        ]);
    }
    print!("{t}");
}

/// One line summarizing a rotation's progress.
pub fn summary(r: &RotationView) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for h in r.hosts.values() {
        *counts.entry(h.state.as_str()).or_default() += 1;
    }
    let waves = r.waves.len();
    let wave = r.current_wave;
    let wave_text = if waves == 0 {
        String::new()
    } else if wave == 0 && r.policy.canary > 0 {
        format!(" canary (wave 0 of {})", waves - 1)
    } else {
        format!(" wave {wave} of {}", waves.saturating_sub(1))
    };
    let hosts_text = counts.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ");
    format!("[{}{}]{} {}", r.state, if r.paused { ", paused" } else { "" }, wave_text, hosts_text)
}

/// Up to this many hosts, `rotate status` lists every host.
const ALL_HOSTS_UP_TO: usize = 20;
/// Past that, at most this many hosts that are not done.
const NOT_DONE_SHOWN: usize = 50;

pub fn print_rotation(r: &RotationView, all_hosts: bool) {
    println!("rotation   {}", cell(&r.id));
    println!("secret     {}", cell(&r.secret));
    let note = if r.paused {
        " (paused)"
    } else if r.abandoned() {
        " (abandoned by an operator: nothing was rolled back)"
    } else {
        ""
    };
    println!("state      {}{note}", r.state);
    println!("progress   {}", summary(r));
    println!("versions   {} → {}", opt(r.old_version.as_deref()), opt(r.new_version.as_deref()));
    println!("started    {} by {}", at_ms(r.created_ms), cell(&r.started_by));
    if let Some(w) = &r.waiting_on {
        println!("waiting on {w}");
    }
    println!();
    if all_hosts || r.hosts.len() <= ALL_HOSTS_UP_TO {
        print_hosts(r.hosts.iter(), None);
    } else {
        print_waves(r);
        let not_done: Vec<_> =
            r.hosts.iter().filter(|(_, h)| !matches!(h.state, HostState::Healthy | HostState::Excluded)).collect();
        if not_done.is_empty() {
            println!("every host is done (healthy or excluded); --hosts all lists them");
        } else {
            println!("hosts not done ({}); --hosts all lists every host", not_done.len());
            print_hosts(not_done.iter().copied(), Some(NOT_DONE_SHOWN));
        }
    }
    print_rotation_tail(r);
}

/// One line per wave: its size and how many of its hosts are in each state.
fn print_waves(r: &RotationView) {
    let mut t = Table::new(["WAVE", "HOSTS", "STATES"]);
    for (i, wave) in r.waves.iter().enumerate() {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for h in wave.iter().filter_map(|n| r.hosts.get(n)) {
            *counts.entry(h.state.as_str()).or_default() += 1;
        }
        let states = counts.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ");
        let name = if i == 0 && r.policy.canary > 0 { "0 (canary)".to_string() } else { i.to_string() };
        let name = if i == r.current_wave && !r.state.is_terminal() { format!("{name} ←") } else { name };
        t.row([name, wave.len().to_string(), states]);
    }
    print!("{t}");
    println!();
}

/// The host table; with `limit`, at most that many rows and a count of the rest.
fn print_hosts<'a>(hosts: impl Iterator<Item = (&'a String, &'a HostView)>, limit: Option<usize>) {
    let mut t = Table::new(["HOST", "WAVE", "STATE", "SINCE", "FINGERPRINT", "ERROR"]);
    let mut more = 0;
    for (i, (name, h)) in hosts.enumerate() {
        if limit.is_some_and(|l| i >= l) {
            more += 1;
            continue;
        }
        let err = match &h.exclusion {
            Some(ex) => format!("excluded by {}: {}", cell(&ex.by), cell(&ex.reason)),
            None => opt(h.error.as_deref()),
        };
        t.row([
            name.clone(),
            h.wave.to_string(),
            h.state.to_string(),
            ago_ms(h.updated_ms),
            short_fp(h.fingerprint.as_deref()),
            err,
        ]);
    }
    print!("{t}");
    if more > 0 {
        println!("… and {more} more (--hosts all, or -o json)");
    }
}

/// Evidence, decisions, timeline and exits.
fn print_rotation_tail(r: &RotationView) {
    if !r.evidence.is_empty() {
        println!();
        println!("revocation evidence (provider usage of the old version)");
        for e in r.evidence.iter().rev().take(10).rev() {
            println!("  {}  {:<13} {}", at_ms(e.at_ms), e.phase, cell(&e.verdict));
        }
    }
    if !r.decisions.is_empty() {
        println!();
        println!("operator decisions");
        for d in &r.decisions {
            println!("  {}  {:<8} by {}: {}", at_ms(d.at_ms), d.kind, cell(&d.by), cell(&d.reason));
        }
    }
    println!();
    println!("timeline");
    for e in &r.timeline {
        println!("  {}  {:<13} {}", at_ms(e.at_ms), e.state, cell(&e.note));
    }
    if !r.exits.is_empty() {
        println!();
        println!("what you can do now");
        for e in &r.exits {
            println!("  {:<52} {}", e.command, e.what);
        }
    }
}

pub fn print_audit(records: &[AuditRecordView]) {
    let mut t = Table::new(["SEQ", "TIME", "ACTOR", "ACTION", "DETAILS"]);
    for r in records {
        // Details are free-form per action: shown as compact JSON, nulls left out.
        let mut details = r.details.clone();
        if let Some(o) = details.as_object_mut() {
            o.retain(|_, v| !v.is_null());
        }
        t.row([r.seq.to_string(), at_ms(r.at_ms), cell(&r.actor), cell(&r.action), details.to_string()]);
    }
    print!("{t}");
}

pub fn print_versions(versions: &[VersionView]) {
    let mut t = Table::new(["VERSION", "STATUS", "CREATED", "CURRENT"]);
    for x in versions {
        t.row([
            cell(&x.id),
            x.status.to_string(),
            x.created_unix.map(format_unix).unwrap_or_else(|| "-".into()),
            if x.current { "yes".into() } else { String::new() },
        ]);
    }
    print!("{t}");
}

pub fn print_alerts(alerts: &[AlertView]) {
    if alerts.is_empty() {
        println!("no alerts");
        return;
    }
    let mut t = Table::new(["#", "TIME", "SEVERITY", "SECRET", "ROTATION", "WEBHOOK", "MESSAGE"]);
    for a in alerts {
        t.row([
            a.seq.to_string(),
            at_ms(a.at_ms),
            a.severity.to_string(),
            cell(&a.secret),
            opt(a.rotation.as_deref()),
            cell(&a.delivery),
            cell(&a.message),
        ]);
    }
    print!("{t}");
}

/// `rekey rotate plan`: the provider, then each wave's hosts with their
/// checks, then every problem (or that there is none).
pub fn print_plan(p: &PlanView) {
    println!("plan for {} (provider {}), no key generated", p.secret, p.provider.kind);
    let old = opt(p.old_version.as_deref());
    let recorded = opt(p.recorded_version.as_deref());
    match &p.provider.error {
        None => {
            let active = p.provider.versions.iter().filter(|v| v.status.as_str() == "active").count();
            println!(
                "provider: {} version(s) listed, {active} active; recorded current {recorded}; old version {old}",
                p.provider.versions.len()
            );
        }
        Some(e) => println!("provider: not listed ({e}); recorded current {recorded}; old version {old}"),
    }
    for f in &p.provider.findings {
        println!("  ! {f}");
    }
    let fields = if p.fields.is_empty() { "unknown".to_string() } else { p.fields.join(", ") };
    println!("placeholder fields: {fields}");
    for w in &p.waves {
        let name = if w.canary { "canary".to_string() } else { format!("wave {}", w.index) };
        println!("\n{name} ({} host(s))", w.hosts.len());
        for h in &w.hosts {
            let status = match h.status {
                PlanHostStatus::Ready => "ready".to_string(),
                s => s.as_str().to_uppercase().replace('_', " "),
            };
            println!("  {}  {status}", h.name);
            for c in &h.checks {
                println!("    {} {:<40} {}", if c.ok { "ok  " } else { "FAIL" }, c.subject, c.detail);
            }
        }
    }
    if p.problems.is_empty() {
        println!("\nno problems: `rekey rotate start {}` would generate a key and roll it out as above", p.secret);
        return;
    }
    println!("\nproblems ({}):", p.problems.len());
    for x in &p.problems {
        match &x.host {
            Some(h) => println!("  - {h}: {}: {}", x.subject, x.detail),
            None => println!("  - {}: {}", x.subject, x.detail),
        }
    }
}
