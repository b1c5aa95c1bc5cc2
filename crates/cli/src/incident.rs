//! `rekey incident ...`: campaigns that rotate every secret matching a
//! pattern as one incident, with one status.

use crate::rotate::{cell, opt};
use crate::table::Table;
use crate::{Client, Output, output, print_json};
use anyhow::{Result, bail};
use rekey_common::time::{format_relative, now_unix};
use rekey_proto::v1::{GetIncidentRequest, ListIncidentsRequest, OpenIncidentRequest};
use rekey_types::v1::{IncidentState, IncidentView};
use std::collections::BTreeMap;

/// `--wait` ended because only an operator can take the incident further
/// (a secret that could not start, a halted or paused rotation): exit code 2.
#[derive(Debug)]
pub struct NeedsOperator {
    pub id: String,
    pub lines: Vec<String>,
}

impl std::fmt::Display for NeedsOperator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "incident {} needs an operator: {}", cell(&self.id), cell(&self.lines.join("; ")))
    }
}

impl std::error::Error for NeedsOperator {}

/// Exit code of `incident open --wait` / `incident watch` when an operator must act.
pub const EXIT_NEEDS_OPERATOR: u8 = 2;

#[derive(clap::Subcommand)]
pub enum IncidentCmd {
    /// Open an incident: rotate every catalog secret matching PATTERN, N at a time.
    Open {
        /// A name for the incident (e.g. "vendor breach 2026-11").
        name: String,
        /// Glob over secret names: `*`, `payments-*`, `db-?`.
        #[arg(long)]
        secrets: String,
        /// How many rotations may be rolling out at once.
        #[arg(long, default_value_t = 2)]
        concurrency: u32,
        /// Start these secrets first, in this order (repeat it or give a comma
        /// list); the rest follow by catalog `priority`, then catalog order.
        #[arg(long, value_delimiter = ',')]
        first: Vec<String>,
        /// Follow the incident until it is done (exit 0), or needs an operator
        /// (exit 2: a secret could not start, a rotation halted or paused).
        #[arg(long)]
        wait: bool,
    },
    /// One status for the whole campaign: each secret's rotation and progress.
    Status { id: String },
    /// Follow an incident as `open --wait` does (exit 0 done, 2 needs an operator).
    Watch { id: String },
    /// Incidents, newest first.
    List,
    /// Close an incident: no further rotation is started for it.
    Close { id: String },
}

fn print_incident(v: &IncidentView) {
    println!("incident   {} ({})", cell(&v.id), cell(&v.name));
    println!("state      {}", v.state);
    println!("secrets    {} ({} at a time)", cell(&v.pattern), v.concurrency);
    println!("opened     {} by {}", format_relative(v.opened_ms / 1000, now_unix()), cell(&v.opened_by));
    println!();
    let mut t = Table::new(["SECRET", "ROTATION", "STATE", "HOSTS", "NOTE"]);
    for name in in_order(v) {
        let p = &v.secrets[&name];
        let hosts = match (p.healthy, p.hosts) {
            (Some(h), Some(n)) => format!("{h}/{n} healthy"),
            _ => "-".into(),
        };
        let note = p.error.as_deref().or(p.waiting_on.as_deref()).unwrap_or("").to_string();
        t.row([cell(&name), opt(p.rotation.as_deref()), p.state.to_string(), hosts, note]);
    }
    print!("{t}");
    if !v.needs_operator.is_empty() {
        println!();
        println!("needs an operator:");
        for line in &v.needs_operator {
            println!("  {}", cell(line));
        }
    }
}

/// The incident's secrets in start order (views from older coordinators have no order).
fn in_order(v: &IncidentView) -> Vec<String> {
    let mut out: Vec<String> = v.order.iter().filter(|n| v.secrets.contains_key(*n)).cloned().collect();
    out.extend(v.secrets.keys().filter(|n| !v.order.contains(n)).cloned());
    out
}

/// One progress line per secret, e.g. `fleet-key  rolling_out  3/10 healthy`.
fn progress_lines(v: &IncidentView) -> BTreeMap<String, String> {
    v.secrets
        .iter()
        .map(|(name, p)| {
            let mut line = format!("{name}: {}", p.state);
            if let (Some(h), Some(n)) = (p.healthy, p.hosts) {
                line.push_str(&format!(", {h}/{n} healthy"));
            }
            if let Some(note) = p.error.as_deref().or(p.waiting_on.as_deref()) {
                line.push_str(&format!(" — {note}"));
            }
            (name.clone(), cell(&line))
        })
        .collect()
}

/// Polls an incident, printing each secret's progress as it changes, until
/// it is done (Ok), needs an operator ([`NeedsOperator`]) or was closed.
async fn watch(client: &mut Client, out: Output, id: &str) -> Result<()> {
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let req = client.request(GetIncidentRequest { id: id.to_string() });
        let v: IncidentView = client.view(client.inner.clone().get_incident(req).await)?;
        if out == Output::Table {
            let lines = progress_lines(&v);
            for name in in_order(&v) {
                if lines.get(&name) != last.get(&name) {
                    println!("{}", lines[&name]);
                }
            }
            last = lines;
        }
        let finished = v.state != IncidentState::Running || !v.needs_operator.is_empty();
        if finished && out == Output::Json {
            print_json(&v);
        }
        match v.state {
            IncidentState::Done => {
                if out == Output::Table {
                    println!("incident {} done; the report: `rekey report {}`", cell(id), cell(id));
                }
                return Ok(());
            }
            IncidentState::Closed => {
                bail!("incident {id} was closed by {}", v.closed_by.as_deref().unwrap_or("an operator"))
            }
            IncidentState::Running if !v.needs_operator.is_empty() => {
                return Err(NeedsOperator { id: id.to_string(), lines: v.needs_operator }.into());
            }
            IncidentState::Running => tokio::time::sleep(std::time::Duration::from_millis(300)).await,
        }
    }
}

fn print_list(items: &[IncidentView]) {
    if items.is_empty() {
        println!("no incidents: open one with `rekey incident open NAME --secrets PATTERN`");
        return;
    }
    let mut t = Table::new(["ID", "NAME", "STATE", "SECRETS", "OPENED"]);
    for x in items {
        let summary = x.summary.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ");
        t.row([
            cell(&x.id),
            cell(&x.name),
            x.state.to_string(),
            summary,
            format_relative(x.opened_ms / 1000, now_unix()),
        ]);
    }
    print!("{t}");
}

pub async fn run(client: &mut Client, out: Output, cmd: &IncidentCmd) -> Result<()> {
    match cmd {
        IncidentCmd::Open { name, secrets, concurrency, first, wait } => {
            let req = client.request(OpenIncidentRequest {
                name: name.clone(),
                secrets: secrets.clone(),
                concurrency: *concurrency,
                first: first.clone(),
            });
            let v: IncidentView = client.view(client.inner.clone().open_incident(req).await)?;
            if *wait {
                if out == Output::Table {
                    println!("incident {} opened: {}", cell(&v.id), cell(&in_order(&v).join(", ")));
                }
                return watch(client, out, &v.id).await;
            }
            output(out, &v, |v| {
                println!("{}", cell(&v.id));
                eprintln!(
                    "incident opened: {} secrets, {concurrency} at a time; follow it with `rekey incident status {}`",
                    v.secrets.len(),
                    cell(&v.id)
                );
            });
        }
        IncidentCmd::Status { id } => {
            let req = client.request(GetIncidentRequest { id: id.clone() });
            let v: IncidentView = client.view(client.inner.clone().get_incident(req).await)?;
            output(out, &v, print_incident);
        }
        IncidentCmd::Watch { id } => return watch(client, out, id).await,
        IncidentCmd::List => {
            let req = client.request(ListIncidentsRequest {});
            let v: Vec<IncidentView> = client.view(client.inner.clone().list_incidents(req).await)?;
            output(out, &v, |v| print_list(v));
        }
        IncidentCmd::Close { id } => {
            let req = client.request(GetIncidentRequest { id: id.clone() });
            let v: IncidentView = client.view(client.inner.clone().close_incident(req).await)?;
            output(out, &v, |v| println!("incident {} closed", cell(&v.id)));
        }
    }
    Ok(())
}
