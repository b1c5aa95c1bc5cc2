//! `rekey incident ...`: campaigns that rotate every secret matching a
//! pattern as one incident, with one status.

use crate::rotate::s;
use crate::table::Table;
use crate::{Client, Output, output};
use anyhow::Result;
use rekey_common::time::{format_relative, now_unix};
use rekey_proto::v1::{GetIncidentRequest, ListIncidentsRequest, OpenIncidentRequest};
use serde_json::Value;

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

fn print_incident(v: &Value) {
    println!("incident   {} ({})", s(&v["id"]), s(&v["name"]));
    println!("state      {}", s(&v["state"]));
    println!("secrets    {} ({} at a time)", s(&v["pattern"]), s(&v["concurrency"]));
    println!(
        "opened     {} by {}",
        v["opened_ms"].as_i64().map(|m| format_relative(m / 1000, now_unix())).unwrap_or_default(),
        s(&v["opened_by"])
    );
    println!();
    let mut t = Table::new(["SECRET", "ROTATION", "STATE", "HOSTS", "NOTE"]);
    if let Some(secrets) = v["secrets"].as_object() {
        for (name, p) in secrets {
            let hosts = match (&p["healthy"], &p["hosts"]) {
                (Value::Number(h), Value::Number(n)) => format!("{h}/{n} healthy"),
                _ => "-".into(),
            };
            let note = p["error"].as_str().or(p["waiting_on"].as_str()).unwrap_or("").to_string();
            t.row([name.clone(), s(&p["rotation"]), s(&p["state"]), hosts, note]);
        }
    }
    print!("{t}");
}

fn print_list(v: &Value) {
    let items = v.as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        println!("no incidents: open one with `rekey incident open NAME --secrets PATTERN`");
        return;
    }
    let mut t = Table::new(["ID", "NAME", "STATE", "SECRETS", "OPENED"]);
    for x in items {
        let summary = x["summary"]
            .as_object()
            .map(|m| m.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        t.row([
            s(&x["id"]),
            s(&x["name"]),
            s(&x["state"]),
            summary,
            x["opened_ms"].as_i64().map(|m| format_relative(m / 1000, now_unix())).unwrap_or_default(),
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
            let v = client.json(client.inner.clone().open_incident(req).await)?;
            match out {
                Output::Json => output(out, &v, |_| {}),
                Output::Table => {
                    let n = v["secrets"].as_object().map(|m| m.len()).unwrap_or(0);
                    println!("{}", s(&v["id"]));
                    eprintln!(
                        "incident opened: {n} secrets, {concurrency} at a time; follow it with `rekey incident status {}`",
                        s(&v["id"])
                    );
                }
            }
        }
        IncidentCmd::Status { id } => {
            let v = client
                .json(client.inner.clone().get_incident(client.request(GetIncidentRequest { id: id.clone() })).await)?;
            output(out, &v, print_incident);
        }
        IncidentCmd::List => {
            let v = client.json(client.inner.clone().list_incidents(client.request(ListIncidentsRequest {})).await)?;
            output(out, &v, print_list);
        }
        IncidentCmd::Close { id } => {
            let v = client.json(
                client.inner.clone().close_incident(client.request(GetIncidentRequest { id: id.clone() })).await,
            )?;
            output(out, &v, |v| println!("incident {} closed", s(&v["id"])));
        }
    }
    Ok(())
}
