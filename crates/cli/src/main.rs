//! `rekey`, the operator CLI: talks to rekeyd's admin API with an operator
//! certificate. Human tables by default, `-o json` on every listing; an error
//! is one line on stderr and a non-zero exit. Every answer is read into a
//! `rekey_types::v1` view; tables are printed from its typed fields and
//! `-o json` prints the view itself (docs/views.md).

// First: every module below prints through its `println!`/`print!`.
#[macro_use]
mod out;

mod clidoc;
mod connection;
mod console;
mod coordinators;
mod demo;
mod incident;
mod operator;
mod rotate;
mod scope;
mod table;
mod watch;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use connection::Replicas;
use rekey_common::ha;
use rekey_common::time::{format_relative, format_unix, now_unix, parse_duration};
use rekey_common::tls;
use rekey_proto::v1::admin_service_client::AdminServiceClient;
use rekey_proto::v1::{
    BackupRequest, Control, ControlRotationRequest, CreateTokenRequest, GetReportRequest, GetRotationRequest,
    ListAgentsRequest, ListAlertsRequest, ListAuditRequest, ListRotationsRequest, ListSecretsRequest,
    ListVersionsRequest, PlanRotationRequest, RevokeAgentRequest, StartRotationRequest, VerifyAuditRequest,
};
use rekey_proto::{PROTOCOL_HEADER, PROTOCOL_VERSION};
use rekey_types::v1::{
    AgentRevokedView, AgentView, AlertView, AuditRecordView, AuditVerifyView, JoinTokenView, PlanView, RotationSummary,
    RotationView, SecretView, VersionView,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use table::Table;

#[derive(Parser)]
#[command(name = "rekey", version, about = "Operate rekey: enroll hosts, watch agents, rotate secrets")]
struct Cli {
    /// Directory holding the operator credential (ca.pem, operator.pem, operator.key, rekey.toml).
    #[arg(long, env = "REKEY_OPERATOR_DIR", global = true)]
    operator_dir: Option<PathBuf>,
    /// rekeyd address (HOST:PORT); repeat it or separate with commas for
    /// several replicas (the first that answers serves reads; a follower's
    /// refusal of a change is sent on to the leader). Defaults to the
    /// operator dir's rekey.toml.
    #[arg(long, env = "REKEY_COORDINATOR", global = true, value_delimiter = ',')]
    coordinator: Vec<String>,
    /// Say on stderr which replica answered.
    #[arg(long, short = 'v', global = true)]
    verbose: bool,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole thing on this machine: a coordinator, a demo API, N agents
    /// and services, two live rotations (one with a failing host), a report.
    Demo(demo::DemoArgs),
    /// Join tokens for enrolling hosts.
    #[command(subcommand)]
    Token(TokenCmd),
    /// List enrolled agents, by name.
    Agents {
        /// Show at most N agents (0: all). Default: 1000 in a table, all with -o json.
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Only agents matching every filter given: connected, disconnected,
        /// revoked, KEY=VALUE (a label), or part of the host name.
        #[arg(long, value_name = "TERM")]
        filter: Vec<String>,
    },
    /// Act on one agent.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// List the secret catalog: current versions, consumers, last rotation.
    Secrets,
    /// List a secret's versions as its provider reports them.
    Versions { secret: String },
    /// Start, watch and steer rotations.
    #[command(subcommand)]
    Rotate(RotateCmd),
    /// An incident report for a rotation or an incident (Markdown or JSON); never contains secret values.
    Report {
        id: String,
        #[arg(long, value_parser = ["md", "json"], default_value = "md")]
        format: String,
    },
    /// Where a secret's values occur across the fleet: host, file, line,
    /// version, declared or not (agents compare keyed fingerprints, never values).
    Scope(scope::ScopeArgs),
    /// Alerts: the old key used after rotation, revocation held by evidence, leftovers found.
    Alerts,
    /// Campaigns: rotate every secret matching a pattern as one incident.
    #[command(subcommand)]
    Incident(incident::IncidentCmd),
    /// A one-time login link for the read-only web console (`[console]` in coordinator.toml).
    Console,
    /// Operators and their roles (admin, rotator, viewer): create, list, revoke.
    #[command(subcommand)]
    Operator(operator::OperatorCmd),
    /// The hash-chained audit log.
    Audit {
        #[command(subcommand)]
        command: Option<AuditCmd>,
        /// Show only the newest N records.
        #[arg(long)]
        limit: Option<u32>,
    },
    /// The rekeyd replicas sharing the store: which one leads, its epoch and
    /// lease, the schema version, and which replica answered.
    Coordinators,
    /// A sealed backup of the running coordinator's store (0600); restore it
    /// on the coordinator host with `rekeyd restore FILE`.
    Backup {
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a shell completion script (e.g. `rekey completions bash > /etc/bash_completion.d/rekey`).
    Completions {
        #[arg(value_enum)]
        shell: rekey_common::clidoc::Shell,
    },
    /// Write the man pages (rekey.1, rekey-rotate-start.1, ...) into a directory (used by the package build).
    #[command(hide = true)]
    Man {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum RotateCmd {
    /// Start rotating a secret; prints the rotation id. Runs the preflight
    /// (`rotate plan`) first and refuses if it finds a problem, naming the
    /// first 20 (`rotate plan` lists them all).
    Start {
        secret: String,
        /// Follow the rotation until it completes, halts or aborts (exit 0 only if completed).
        #[arg(long)]
        wait: bool,
        /// How often --wait asks for the rotation's state when the coordinator
        /// cannot stream its changes (e.g. 500ms, 2s).
        #[arg(long, value_parser = parse_interval, default_value = "300ms")]
        interval: std::time::Duration,
        /// Start even though the preflight would refuse (audited with --reason).
        #[arg(long, requires = "reason")]
        skip_preflight: bool,
        /// Why the preflight is skipped; recorded in the audit log.
        #[arg(long, requires = "skip_preflight")]
        reason: Option<String>,
    },
    /// The preflight of a rotation, before any key exists: the provider
    /// checked and reconciled, every consumer's dry run (files, restart,
    /// health), the waves, and every problem. Exit 1 if there is a problem.
    Plan {
        secret: String,
        /// How long to wait for the agents' dry runs, in seconds (default 20, at most 300).
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u32>,
    },
    /// Show a rotation: state, waves, and its hosts' state, fingerprint and
    /// error. Past 20 hosts, the table lists each wave's counts and only the
    /// hosts not done (at most 50); `--hosts all` lists every host.
    Status {
        id: String,
        /// `all`: every host, however many.
        #[arg(long, value_parser = ["all"])]
        hosts: Option<String>,
    },
    /// List rotations, newest first.
    List {
        /// Only this secret's rotations.
        #[arg(long)]
        secret: Option<String>,
    },
    /// Stop starting new waves (hosts already applying finish).
    Pause { id: String },
    /// Continue a paused rotation, or retry a halted one.
    Resume { id: String },
    /// Roll every host back to the old version, then delete the new one.
    Abort { id: String },
    /// Stop waiting for a host (e.g. decommissioned); recorded in the audit log.
    Exclude {
        id: String,
        host: String,
        #[arg(long)]
        reason: String,
    },
    /// Follow a rotation live until it completes, halts or aborts: one progress
    /// line per wave on a terminal, one line per change otherwise.
    Watch {
        id: String,
        /// How often to ask for the rotation's state when the coordinator
        /// cannot stream its changes (e.g. 500ms, 2s).
        #[arg(long, value_parser = parse_interval, default_value = "300ms")]
        interval: std::time::Duration,
    },
    /// Deactivate and delete the old version now, despite its use after the
    /// switch (the operator decides; audited with who and why, in the report).
    Revoke {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Mark a rotation completed where it stands (every host confirmed); the
    /// provider is left as it is. Audited with who and why.
    Finish {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Stop a rotation in any state without touching the provider or the
    /// hosts; frees the secret for a new rotation. Audited with who and why.
    Abandon {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check every link of the chain; reports the first broken record.
    Verify,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a one-time join token bound to a host name and labels.
    Create {
        /// Host name the agent will be enrolled as.
        #[arg(long)]
        host: String,
        /// Label KEY=VALUE (repeatable); secrets select hosts by label.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// How long the token stays valid (e.g. 15m, 1h, 2d).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<std::time::Duration>,
    },
}

#[derive(Subcommand)]
enum AgentCmd {
    /// Revoke an agent: its certificate is refused from now on and its live session is closed.
    Revoke { name: String },
}

/// A poll interval: a duration between 100ms and 1h.
pub(crate) fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(s)?;
    if d < std::time::Duration::from_millis(100) || d > std::time::Duration::from_secs(3600) {
        return Err(format!("invalid interval {s:?}: expected between 100ms and 1h"));
    }
    Ok(d)
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("invalid label {s:?}: expected KEY=VALUE"))?;
    Ok((k.to_string(), v.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OperatorFile {
    coordinator: Option<OneOrMany>,
}

/// `coordinator = "h:p"` or `coordinator = ["h1:p", "h2:p"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

pub(crate) struct Client {
    pub(crate) inner: AdminServiceClient<Replicas>,
    replicas: Replicas,
}

impl Client {
    /// The replica that answered the last call.
    pub(crate) fn addr(&self) -> String {
        self.replicas.addr()
    }

    /// Every address this CLI was given, in order.
    pub(crate) fn addresses(&self) -> &[String] {
        self.replicas.addresses()
    }

    pub(crate) fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string().parse().expect("ascii"));
        r
    }

    /// The view a read-model call answers, or one clear error line.
    pub(crate) fn view<T: DeserializeOwned>(
        &self,
        r: Result<tonic::Response<rekey_proto::v1::JsonResponse>, tonic::Status>,
    ) -> Result<T> {
        let r = r.map_err(|s| self.explain(s))?;
        serde_json::from_str(&r.into_inner().json).context(
            "the coordinator sent a document this rekey cannot read (are the CLI and rekeyd the same version?)",
        )
    }

    /// One clear line for a failed call.
    pub(crate) fn explain(&self, status: tonic::Status) -> anyhow::Error {
        use tonic::Code::*;
        if status.message().starts_with(connection::NO_LEADER) || ha::refusal(&status).is_some() {
            return anyhow!("{}", status.message());
        }
        match status.code() {
            Unavailable | Unknown | Cancelled => anyhow!(
                "cannot talk to rekeyd at {}: {} (is it running, and is this operator credential issued by it?)",
                self.addr(),
                one_line(&status)
            ),
            _ => anyhow!("{}", status.message()),
        }
    }
}

fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s = format!("{s}: {t}");
        }
        cur = c.source();
    }
    s
}

fn read(dir: &Path, name: &str) -> Result<String> {
    let p = dir.join(name);
    std::fs::read_to_string(&p).with_context(|| format!("cannot read operator credential {}", p.display()))
}

async fn connect(cli: &Cli) -> Result<Client> {
    let dir = cli
        .operator_dir
        .as_deref()
        .ok_or_else(|| anyhow!("no operator credential: pass --operator-dir DIR or set REKEY_OPERATOR_DIR (rekeyd writes one to DATA_DIR/operator)"))?;
    connect_to(dir, &cli.coordinator, cli.verbose).await
}

/// Connects with the operator credential in `dir` to the first answering of
/// `coordinators` (or of the addresses in the dir's rekey.toml when empty).
pub(crate) async fn connect_to(dir: &Path, coordinators: &[String], verbose: bool) -> Result<Client> {
    let addresses = if coordinators.is_empty() {
        operator_file_addresses(&dir.join("rekey.toml"))?
    } else {
        ha::parse_addresses(coordinators).map_err(|e| anyhow!("invalid --coordinator: {e}"))?
    };
    let ca = tls::certs_from_pem(&read(dir, "ca.pem")?, "ca.pem")?;
    let chain = tls::certs_from_pem(&read(dir, "operator.pem")?, "operator.pem")?;
    let key = tls::key_from_pem(&read(dir, "operator.key")?, "operator.key")?;
    let config = tls::client_config(&ca, chain, key)?;
    let replicas = Replicas::connect(addresses, config, verbose).await?;
    // A rotation of 10,000 hosts is ~4 MB of JSON, gRPC's default limit.
    Ok(Client { inner: AdminServiceClient::new(replicas.clone()).max_decoding_message_size(MAX_ANSWER), replicas })
}

/// The addresses in an operator dir's rekey.toml (`coordinator`: one or a list).
fn operator_file_addresses(p: &Path) -> Result<Vec<String>> {
    let f: OperatorFile = rekey_common::config::load_toml(p)?;
    let list = match f.coordinator {
        None => bail!("{}: field `coordinator` is missing; pass --coordinator", p.display()),
        Some(OneOrMany::One(a)) => vec![a],
        Some(OneOrMany::Many(list)) => list,
    };
    ha::parse_addresses(&list).map_err(|e| anyhow!("{}: field `coordinator`: {e}", p.display()))
}

pub(crate) fn print_json<T: Serialize + ?Sized>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("views serialize to json"));
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        "-".into()
    } else {
        labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    }
}

async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Demo(args) => return demo::run(args.clone()).await,
        Command::Completions { shell } => return clidoc::completions(*shell),
        Command::Man { out } => return clidoc::man(out),
        _ => {}
    }
    let mut client = connect(&cli).await?;
    let out = cli.output;
    match &cli.command {
        Command::Token(TokenCmd::Create { host, labels, ttl }) => {
            token_create(&client, out, host, labels, *ttl).await?
        }
        Command::Agents { limit, filter } => agents(&client, out, *limit, filter).await?,
        Command::Coordinators => coordinators::run(&client, out).await?,
        Command::Agent(AgentCmd::Revoke { name }) => {
            let req = client.request(RevokeAgentRequest { name: name.clone() });
            let r = client.inner.clone().revoke_agent(req).await.map_err(|s| client.explain(s))?.into_inner();
            let v = AgentRevokedView { revoked: name.clone(), session_closed: r.was_connected };
            output(out, &v, |v| {
                println!(
                    "revoked agent {}{}",
                    v.revoked,
                    if v.session_closed { "; its live session was closed" } else { "" }
                )
            });
        }
        Command::Demo(_) | Command::Completions { .. } | Command::Man { .. } => {
            unreachable!("handled before connecting")
        }
        Command::Secrets => {
            let v: Vec<SecretView> =
                client.view(client.inner.clone().list_secrets(client.request(ListSecretsRequest {})).await)?;
            output(out, &v, |v| rotate::print_secrets(v));
        }
        Command::Versions { secret } => {
            let req = client.request(ListVersionsRequest { secret: secret.clone() });
            let v: Vec<VersionView> = client.view(client.inner.clone().list_versions(req).await)?;
            output(out, &v, |v| rotate::print_versions(v));
        }
        Command::Rotate(cmd) => return rotate_cmd(&mut client, out, cmd).await,
        Command::Report { id, format } => {
            let req = client.request(GetReportRequest { id: id.clone(), format: format.clone() });
            let r = client.inner.clone().get_report(req).await.map_err(|s| client.explain(s))?;
            print!("{}", r.into_inner().content);
        }
        Command::Scope(args) => scope::run(&client, out, args).await?,
        Command::Incident(cmd) => incident::run(&mut client, out, cmd).await?,
        Command::Operator(cmd) => operator::run(&client, out, cmd).await?,
        Command::Console => console::run(&client, out).await?,
        Command::Alerts => {
            let v: Vec<AlertView> =
                client.view(client.inner.clone().list_alerts(client.request(ListAlertsRequest {})).await)?;
            output(out, &v, |v| rotate::print_alerts(v));
        }
        Command::Audit { command: None, limit } => {
            let req = client.request(ListAuditRequest { limit: limit.unwrap_or(0) });
            let v: Vec<AuditRecordView> = client.view(client.inner.clone().list_audit(req).await)?;
            output(out, &v, |v| rotate::print_audit(v));
        }
        Command::Audit { command: Some(AuditCmd::Verify), .. } => audit_verify(&client, out).await?,
        Command::Backup { out: file } => {
            let r =
                client.inner.clone().backup(client.request(BackupRequest {})).await.map_err(|s| client.explain(s))?;
            let r = r.into_inner();
            rekey_common::fs::write_atomic(file, &r.file, 0o600)
                .with_context(|| format!("cannot write {}", file.display()))?;
            println!(
                "backup written to {} (audit record {}, sealed with a key derived from the master key; restore with `rekeyd restore FILE`)",
                file.display(),
                r.audit_seq
            );
        }
    }
    Ok(())
}

/// `rekey token create`: the token, and the command to run on the host.
async fn token_create(
    client: &Client,
    out: Output,
    host: &str,
    labels: &[(String, String)],
    ttl: Option<std::time::Duration>,
) -> Result<()> {
    let req = client.request(CreateTokenRequest {
        host: host.to_string(),
        labels: labels.iter().cloned().collect(),
        ttl_seconds: ttl.map(|d| d.as_secs().max(1)).unwrap_or(0),
    });
    let r = client.inner.clone().create_token(req).await.map_err(|s| client.explain(s))?.into_inner();
    // The agent looks for the leader among every replica this CLI knows.
    let addresses = client.addresses().join(",");
    let v = JoinTokenView {
        host: host.to_string(),
        token: r.token,
        ca_fingerprint: r.ca_fingerprint,
        expires: format_unix(r.expires_unix),
        coordinator: client.addr(),
    };
    output(out, &v, |v| {
        println!("join token:      {}", v.token);
        println!("ca fingerprint:  {}", v.ca_fingerprint);
        println!("host:            {host}");
        println!("expires:         {} (single use)", v.expires);
        println!();
        println!("on {host}, put the join token in a file only root can read (paste it, then Ctrl-D):");
        println!("  (umask 077; cat > /root/rekey-join.token)");
        println!("then run:");
        println!(
            "  rekey-agent enroll --coordinator {} --token-file /root/rekey-join.token --ca-fingerprint {} --state-dir /var/lib/rekey-agent",
            addresses, v.ca_fingerprint
        );
    });
    Ok(())
}

/// A table shows this many agents unless told otherwise (`--limit`).
const AGENTS_TABLE_LIMIT: u32 = 1000;

/// `rekey agents`: the registry, by name, filtered and limited by rekeyd.
async fn agents(client: &Client, out: Output, limit: Option<u32>, filter: &[String]) -> Result<()> {
    for term in filter {
        rekey_types::v1::AgentFilter::parse(term).map_err(|e| anyhow::anyhow!("--filter: {e}"))?;
    }
    let limit = limit.unwrap_or(if out == Output::Json { 0 } else { AGENTS_TABLE_LIMIT });
    let req = ListAgentsRequest { limit, filters: filter.to_vec() };
    let r = client.inner.clone().list_agents(client.request(req)).await.map_err(|s| client.explain(s))?.into_inner();
    let agents = r.agents;
    // An older rekeyd neither filters nor counts.
    let total = (r.total as usize).max(agents.len());
    let shown = if total > agents.len() {
        Some(format!("showing {} of {total} agents, use --limit 0 for all", agents.len()))
    } else {
        None
    };
    if out == Output::Json {
        let v: Vec<AgentView> = agents
            .iter()
            .map(|a| AgentView {
                name: a.name.clone(),
                labels: a.labels.clone().into_iter().collect(),
                connected: a.connected,
                revoked: a.revoked,
                last_seen: format_unix(a.last_seen_unix),
                agent_version: a.agent_version.clone(),
                cert_serial: a.cert_serial.clone(),
                cert_expires: format_unix(a.cert_not_after_unix),
                enrolled: format_unix(a.enrolled_unix),
                secrets: a.secrets.clone(),
            })
            .collect();
        print_json(&v);
        if let Some(shown) = shown {
            eprintln!("{shown}");
        }
        return Ok(());
    }
    if agents.is_empty() && !filter.is_empty() {
        println!("no agent matches --filter {}", filter.join(" --filter "));
        return Ok(());
    }
    if agents.is_empty() {
        println!("no agents enrolled yet: create a join token with `rekey token create --host NAME`");
        return Ok(());
    }
    let now = now_unix();
    let mut t = Table::new(["NAME", "STATUS", "LABELS", "VERSION", "CERT EXPIRES", "SECRETS"]);
    for a in &agents {
        let status = if a.revoked {
            "revoked".to_string()
        } else if a.connected {
            "connected".to_string()
        } else {
            format!("seen {}", format_relative(a.last_seen_unix, now))
        };
        let labels: BTreeMap<String, String> = a.labels.clone().into_iter().collect();
        t.row([
            a.name.clone(),
            status,
            labels_text(&labels),
            if a.agent_version.is_empty() { "-".into() } else { a.agent_version.clone() },
            format_relative(a.cert_not_after_unix, now),
            if a.secrets.is_empty() { "-".into() } else { a.secrets.join(",") },
        ]);
    }
    print!("{t}");
    if let Some(shown) = shown {
        println!("{shown}");
    }
    Ok(())
}

/// `rekey audit verify`: exits non-zero when a link does not hold.
async fn audit_verify(client: &Client, out: Output) -> Result<()> {
    let v: AuditVerifyView =
        client.view(client.inner.clone().verify_audit(client.request(VerifyAuditRequest {})).await)?;
    if out == Output::Json {
        print_json(&v);
    } else if v.ok {
        println!("audit chain intact: {} records, head {}", v.records, v.head);
    }
    if !v.ok {
        let (seq, problem) = v.first_broken.map(|b| (b.seq.to_string(), b.problem)).unwrap_or_default();
        bail!("audit chain broken at record {seq}: {problem}");
    }
    Ok(())
}

/// Prints a view as JSON (`-o json`) or with its table printer.
pub(crate) fn output<T: Serialize + ?Sized>(format: Output, v: &T, table: impl Fn(&T)) {
    match format {
        Output::Json => print_json(v),
        Output::Table => table(v),
    }
}

async fn rotate_cmd(client: &mut Client, out: Output, cmd: &RotateCmd) -> Result<()> {
    let control = |id: &str, action: Control| ControlRotationRequest {
        id: id.to_string(),
        action: action as i32,
        host: String::new(),
        reason: String::new(),
    };
    match cmd {
        RotateCmd::Start { secret, wait, interval, skip_preflight, reason } => {
            let req = client.request(StartRotationRequest {
                secret: secret.clone(),
                skip_preflight: *skip_preflight,
                reason: reason.clone().unwrap_or_default(),
            });
            let v: RotationView = client.view(client.inner.clone().start_rotation(req).await)?;
            if *wait {
                if out == Output::Table {
                    println!("rotation {} started", v.id);
                }
                return watch::follow(client, out, &v.id, *interval).await;
            }
            output(out, &v, |v| println!("{}", v.id));
        }
        RotateCmd::Status { id, hosts } => {
            let v: RotationView = client
                .view(client.inner.clone().get_rotation(client.request(GetRotationRequest { id: id.clone() })).await)?;
            let all = hosts.is_some();
            output(out, &v, |v| rotate::print_rotation(v, all));
        }
        RotateCmd::List { secret } => {
            let req = ListRotationsRequest { secret: secret.clone().unwrap_or_default() };
            let v: Vec<RotationSummary> =
                client.view(client.inner.clone().list_rotations(client.request(req)).await)?;
            output(out, &v, |v| rotate::print_rotation_list(v));
        }
        RotateCmd::Pause { id } | RotateCmd::Resume { id } | RotateCmd::Abort { id } => {
            let (action, verb) = match cmd {
                RotateCmd::Pause { .. } => (Control::Pause, "paused"),
                RotateCmd::Resume { .. } => (Control::Resume, "resumed"),
                _ => (Control::Abort, "aborting"),
            };
            let req = client.request(control(id, action));
            let v: RotationView = client.view(client.inner.clone().control_rotation(req).await)?;
            output(out, &v, |v| println!("{id} {verb}: {}", rotate::summary(v)));
        }
        RotateCmd::Exclude { id, host, reason } => {
            let mut req = control(id, Control::Exclude);
            req.host = host.clone();
            req.reason = reason.clone();
            let v: RotationView = client.view(client.inner.clone().control_rotation(client.request(req)).await)?;
            output(out, &v, |v| println!("{host} excluded from {id}: {}", rotate::summary(v)));
        }
        RotateCmd::Watch { id, interval } => return watch::follow(client, out, id, *interval).await,
        RotateCmd::Revoke { id, reason } | RotateCmd::Finish { id, reason } | RotateCmd::Abandon { id, reason } => {
            let (action, verb) = match cmd {
                RotateCmd::Revoke { .. } => (Control::Revoke, "revoking the old version"),
                RotateCmd::Finish { .. } => (Control::Finish, "finished"),
                _ => (Control::Abandon, "abandoned"),
            };
            let mut req = control(id, action);
            req.reason = reason.clone();
            let v: RotationView = client.view(client.inner.clone().control_rotation(client.request(req)).await)?;
            output(out, &v, |v| println!("{id} {verb}: {}", rotate::summary(v)));
        }
        RotateCmd::Plan { secret, wait } => {
            let req = client.request(PlanRotationRequest { secret: secret.clone(), wait_seconds: wait.unwrap_or(0) });
            let v: PlanView = client.view(client.inner.clone().plan_rotation(req).await)?;
            output(out, &v, rotate::print_plan);
            if !v.ok {
                bail!("the plan of {secret} has {} problem(s): a rotation would be refused", v.problems.len());
            }
        }
    }
    Ok(())
}

/// An outcome a script reads from the exit code (not a failure of rekey):
/// its message goes to stderr and the process exits with `code`.
#[derive(Debug)]
pub(crate) struct Exit {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// The largest answer the CLI reads (a rotation of 100,000 hosts fits).
const MAX_ANSWER: usize = 256 << 20;

fn main() -> std::process::ExitCode {
    out::install_panic_hook();
    let cli = Cli::parse();
    tls::install_crypto_provider();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rekey: error: cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<incident::NeedsOperator>() => {
            eprintln!("rekey: {}", one_line(e.as_ref()));
            std::process::ExitCode::from(incident::EXIT_NEEDS_OPERATOR)
        }
        Err(e) if e.downcast_ref::<Exit>().is_some() => {
            let exit = e.downcast_ref::<Exit>().expect("checked");
            eprintln!("rekey: {}", exit.message);
            std::process::ExitCode::from(exit.code)
        }
        Err(e) => {
            eprintln!("rekey: error: {}", one_line(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
