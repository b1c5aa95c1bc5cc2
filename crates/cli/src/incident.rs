//! `rekey incident ...`: campaigns that rotate every secret matching a
//! pattern as one incident, with one status.

use crate::rotate::{cell, opt};
use crate::table::Table;
use crate::{Client, Output, output};
use anyhow::Result;
use rekey_common::time::{format_relative, now_unix};
use rekey_proto::v1::{GetIncidentRequest, ListIncidentsRequest, OpenIncidentRequest};
use rekey_types::v1::IncidentView;

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
    },
    /// One status for the whole campaign: each secret's rotation and progress.
    Status { id: String },
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
    for (name, p) in &v.secrets {
        let hosts = match (p.healthy, p.hosts) {
            (Some(h), Some(n)) => format!("{h}/{n} healthy"),
            _ => "-".into(),
        };
        let note = p.error.as_deref().or(p.waiting_on.as_deref()).unwrap_or("").to_string();
        t.row([name.clone(), opt(p.rotation.as_deref()), p.state.to_string(), hosts, note]);
    }
    print!("{t}");
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
        IncidentCmd::Open { name, secrets, concurrency } => {
            let req = client.request(OpenIncidentRequest {
                name: name.clone(),
                secrets: secrets.clone(),
                concurrency: *concurrency,
            });
            let v: IncidentView = client.view(client.inner.clone().open_incident(req).await)?;
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
