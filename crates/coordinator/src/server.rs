//! The life of a coordinator: init (master key, store, CA, operator
//! credential), then serve both gRPC services on one mTLS listener until
//! shutdown, then drain.

use crate::checkpoint::Checkpointer;
use crate::config::Config;
use crate::crypto::{self, CryptoError};
use crate::engine::campaign::Campaigns;
use crate::engine::driver::Engine;
use crate::engine::state::EngineState;
use crate::pki::{Ca, PkiError};
use crate::scope::Scanner;
use crate::service::Authorizer;
use crate::service::admin::AdminSvc;
use crate::service::agent::AgentSvc;
use crate::sessions::{RevokedSerials, Sessions};
use crate::store::{OperatorRecord, OperatorRole, Store, StoreError, valid_operator_name};
use crate::supervisor::{Phase, Supervisor, SupervisorError};
use crate::tripwire::Tripwire;
use rekey_common::tls::{self, TlsError};
use rekey_proto::v1::admin_service_server::AdminServiceServer;
use rekey_proto::v1::agent_service_server::AgentServiceServer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Server certificates are re-issued at every start; this bounds a long run.
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(90 * 86_400);
/// Name of the operator credential created at init.
pub const INITIAL_OPERATOR: &str = "admin";
/// Who created the initial credential, in its operator record.
pub const INIT_ACTOR: &str = "rekeyd (init)";
/// Who issued a credential with `rekeyd operator recover`, in the audit chain.
pub const RECOVER_ACTOR: &str = "rekeyd (recover on host)";

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Console(#[from] crate::console::ConsoleError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Supervised(#[from] SupervisorError),
    #[error(
        "the data dir {data_dir} is initialized but its master key {file} is missing (and REKEYD_MASTER_KEY is not \
         set): put the original master key back; rekeyd will not create a new one for an initialized data dir"
    )]
    MasterKeyMissing { file: PathBuf, data_dir: PathBuf },
    #[error("refusing to run on the store in {data_dir}")]
    Checkpoint {
        data_dir: PathBuf,
        #[source]
        source: crate::checkpoint::CheckpointError,
    },
    #[error("{data_dir} is not initialized (no {data_dir}/ca.pem): run `rekeyd init` first")]
    NotInitialized { data_dir: PathBuf },
    #[error(transparent)]
    EngineState(#[from] crate::engine::state::StateError),
    #[error(transparent)]
    Alerts(#[from] crate::alerts::AlertError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("cannot set up a provider")]
    Provider(#[from] rekey_providers::ProviderError),
    #[error(
        "rekeyd is running on this data dir (its store is locked while it runs): stop rekeyd, run \
         `rekeyd operator recover` again, then start rekeyd"
    )]
    RecoverWhileRunning,
    #[error("{dir} already holds an operator credential (operator.key): choose another --out directory")]
    CredentialExists { dir: PathBuf },
    #[error("invalid operator name {0:?}: expected letters, digits, '-', '.', '_' (at most 64)")]
    BadOperatorName(String),
    #[error("{0}; choose another --name")]
    OperatorRefused(#[from] crate::store::OperatorRefused),
}

/// What init found or created.
#[derive(Debug)]
pub struct InitReport {
    pub created_master_key: bool,
    pub created_ca: bool,
    pub created_operator: bool,
    pub ca_fingerprint: String,
    pub operator_dir: PathBuf,
    pub master_key_file: PathBuf,
}

/// An initialized coordinator, ready to serve.
pub struct Coordinator {
    /// The admin service; it holds every handle the others are built from.
    admin: AdminSvc,
    pub init: InitReport,
    engine: Engine,
    webhook: Option<crate::alerts::WebhookSender>,
    alert_routes: Option<crate::alert_routes::RouterTask>,
}

fn write_file(path: PathBuf, bytes: &[u8], private: bool) -> Result<(), ServerError> {
    let r = if private {
        crypto::write_private(&path, bytes)
    } else {
        path.parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .and_then(|_| rekey_common::fs::write_atomic(&path, bytes, 0o644))
    };
    r.map_err(|source| ServerError::Write { path, source })
}

/// Creates `dir` (and missing parents) 0700, and tightens it to 0700 if it
/// exists: the data dir holds the store and, at init, the operator credential.
fn private_dir(dir: &std::path::Path) -> Result<(), ServerError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let write_err = |source| ServerError::Write { path: dir.to_path_buf(), source };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(write_err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(write_err)
}

/// The CA fingerprint agents pin, read from the public `DATA_DIR/ca.pem`:
/// creates nothing, needs neither the master key nor the store's lock.
pub fn fingerprint(config: &Config) -> Result<String, ServerError> {
    let path = config.data_dir.join("ca.pem");
    let pem = std::fs::read_to_string(&path)
        .map_err(|_| ServerError::NotInitialized { data_dir: config.data_dir.clone() })?;
    let der = tls::certs_from_pem(&pem, &path.display().to_string())?
        .into_iter()
        .next()
        .ok_or_else(|| ServerError::NotInitialized { data_dir: config.data_dir.clone() })?;
    Ok(tls::fingerprint(&der))
}

/// Whether a master key had to be created: only for a data dir that was
/// never initialized. An initialized one must find its own key.
pub(crate) fn master_key_ready(config: &Config) -> Result<bool, ServerError> {
    if !config.is_initialized() {
        return Ok(crypto::ensure_master_key(&config.master_key_file)?);
    }
    // Never replace the key of an initialized data dir: a new one cannot
    // open it, and writing it would only hide the real problem.
    if !crypto::master_key_configured(&config.master_key_file) {
        return Err(ServerError::MasterKeyMissing {
            file: config.master_key_file.clone(),
            data_dir: config.data_dir.clone(),
        });
    }
    Ok(false)
}

/// The `admin` credential of a first init, written to `op_dir`.
fn create_initial_operator(ca: &Ca, store: &Store, op_dir: &std::path::Path, ttl: Duration) -> Result<(), ServerError> {
    private_dir(op_dir)?;
    let (issued, key_pem) = ca.issue_operator(INITIAL_OPERATOR, ttl)?;
    write_file(op_dir.join("operator.key"), key_pem.as_bytes(), true)?;
    write_file(op_dir.join("operator.pem"), issued.cert_pem.as_bytes(), false)?;
    let rec = OperatorRecord {
        name: INITIAL_OPERATOR.to_string(),
        role: OperatorRole::Admin,
        serials: vec![issued.serial.clone()],
        created_unix: rekey_common::time::now_unix(),
        created_by: INIT_ACTOR.to_string(),
        revoked_unix: None,
        revoked_by: None,
    };
    store.create_operator(&rec)??;
    Ok(())
}

/// The CLI's config inside the operator dir.
fn write_operator_endpoint(config: &Config, addr: SocketAddr) -> Result<(), ServerError> {
    write_endpoint(&config.operator_dir(), addr, "at start")
}

fn write_endpoint(dir: &std::path::Path, addr: SocketAddr, when: &str) -> Result<(), ServerError> {
    let shown = if addr.ip().is_unspecified() { SocketAddr::new([127, 0, 0, 1].into(), addr.port()) } else { addr };
    let text = format!(
        "# Written by rekeyd {when}. The rekey CLI reads this with --operator-dir.\ncoordinator = \"{shown}\"\n"
    );
    write_file(dir.join("rekey.toml"), text.as_bytes(), false)
}

/// What `rekeyd operator recover` issued.
#[derive(Debug)]
pub struct Recovered {
    pub name: String,
    pub serial: String,
    pub dir: PathBuf,
}

/// `rekeyd operator recover`: on the coordinator host, with the master key and
/// rekeyd stopped (its store is locked while it runs), a new `admin`
/// credential written to `out` (key 0600, made here, never sent anywhere),
/// recorded as an operator and audited as `operator.recover`. The way back in
/// when every admin credential is lost or revoked.
pub fn recover_operator(config: &Config, out: &std::path::Path, name: &str) -> Result<Recovered, ServerError> {
    if !config.is_initialized() {
        return Err(ServerError::NotInitialized { data_dir: config.data_dir.clone() });
    }
    if !valid_operator_name(name) {
        return Err(ServerError::BadOperatorName(name.to_string()));
    }
    if !crypto::master_key_configured(&config.master_key_file) {
        return Err(ServerError::MasterKeyMissing {
            file: config.master_key_file.clone(),
            data_dir: config.data_dir.clone(),
        });
    }
    if out.join("operator.key").exists() {
        return Err(ServerError::CredentialExists { dir: out.to_path_buf() });
    }
    let master = crypto::load_master_key(&config.master_key_file)?;
    let (store, _) =
        crate::ha::open_store(config, crate::store::postgres::FenceMode::Offline).map_err(|e| match e {
            StoreError::Locked { .. } => ServerError::RecoverWhileRunning,
            other => ServerError::Store(other),
        })?;
    let (ca, _) = Ca::load_or_create(&store, &master)?;
    let checkpoint = Arc::new(Checkpointer::new(&config.data_dir, &master));
    drop(master);
    let state = EngineState::open(&store, ca.dek())?;
    // Never write into a store that went back in time.
    checkpoint
        .verify(&state.audit_records()?, store.meta_get(crate::checkpoint::META_KEY)?.is_some())
        .map_err(|source| ServerError::Checkpoint { data_dir: config.data_dir.clone(), source })?;
    let state = state.with_checkpoint(checkpoint);
    let (issued, key_pem) = ca.issue_operator(name, config.operator_cert_ttl)?;
    let now = rekey_common::time::now_unix();
    let rec = OperatorRecord {
        name: name.to_string(),
        role: OperatorRole::Admin,
        serials: vec![issued.serial.clone()],
        created_unix: now,
        created_by: RECOVER_ACTOR.to_string(),
        revoked_unix: None,
        revoked_by: None,
    };
    store.create_operator(&rec)??;
    private_dir(out)?;
    write_file(out.join("operator.key"), key_pem.as_bytes(), true)?;
    write_file(out.join("operator.pem"), issued.cert_pem.as_bytes(), false)?;
    write_file(out.join("ca.pem"), ca.cert_pem().as_bytes(), false)?;
    write_endpoint(out, config.listen, "by `rekeyd operator recover`")?;
    let entry = crate::audit::AuditEntry::new(
        RECOVER_ACTOR,
        "operator.recover",
        serde_json::json!({ "operator": name, "role": rec.role, "serial": issued.serial }),
    );
    state.audit(rekey_common::time::now_unix_ms(), vec![entry])?;
    drop(state);
    store.close()?;
    Ok(Recovered { name: name.to_string(), serial: issued.serial, dir: out.to_path_buf() })
}

impl Coordinator {
    /// Creates what is missing (master key, store, CA, DEK, operator
    /// credential) and opens what exists. Idempotent.
    pub fn init(config: Config) -> Result<Coordinator, ServerError> {
        let created_master_key = master_key_ready(&config)?;
        private_dir(&config.data_dir)?;
        let (store, _) = crate::ha::open_store(&config, crate::store::postgres::FenceMode::Offline)?;
        Self::init_with(config, store, created_master_key)
    }

    /// As [`Coordinator::init`], on a store already open (a replica that
    /// just took the lease).
    pub fn init_with(config: Config, store: Store, created_master_key: bool) -> Result<Coordinator, ServerError> {
        Self::init_with_backends(config, store, created_master_key, &crate::engine::driver::configured_backends)
    }

    /// As [`Coordinator::init_with`], with the providers and sinks `build`
    /// makes (the deterministic simulation's seam; rekeyd always builds the
    /// configured ones).
    pub fn init_with_backends(
        config: Config,
        store: Store,
        created_master_key: bool,
        build: &crate::engine::driver::BuildBackends,
    ) -> Result<Coordinator, ServerError> {
        let master = crypto::load_master_key(&config.master_key_file)?;
        private_dir(&config.data_dir)?;
        let (ca, created_ca) = Ca::load_or_create(&store, &master)?;
        let checkpoint = Arc::new(Checkpointer::new(&config.data_dir, &master));
        let backup_key = Arc::new(crate::backup::seal_key(&master));
        drop(master);

        // The initial operator credential exists only at first init; rekeyd
        // never mints another one by itself (a moved credential stays moved).
        let op_dir = config.operator_dir();
        let created_operator = created_ca;
        if created_operator {
            create_initial_operator(&ca, &store, &op_dir, config.operator_cert_ttl)?;
        }
        write_file(config.data_dir.join("ca.pem"), ca.cert_pem().as_bytes(), false)?;
        if op_dir.is_dir() {
            write_file(op_dir.join("ca.pem"), ca.cert_pem().as_bytes(), false)?;
            if !op_dir.join("rekey.toml").exists() {
                write_operator_endpoint(&config, config.listen)?;
            }
        }
        let revoked = RevokedSerials::new(store.revoked_serials()?);
        let engine_state = EngineState::open(&store, ca.dek())?;
        // A new replica of a shared store has no checkpoint of its own yet.
        let checkpointed = store.meta_get(crate::checkpoint::META_KEY)?.is_some() && !config.is_shared_store();
        checkpoint
            .verify(&engine_state.audit_records()?, checkpointed)
            .map_err(|source| ServerError::Checkpoint { data_dir: config.data_dir.clone(), source })?;
        let engine_state = engine_state.with_checkpoint(checkpoint);
        let sessions = Sessions::new(revoked.clone());
        let config = Arc::new(config);
        let (alerts, webhook) = crate::alerts::Alerts::open(&store, config.webhook.clone())?;
        let (alerts, alert_routes) = crate::alert_routes::attach(alerts, &config.alert_routes, &engine_state);
        let (engine, engine_handle) = Engine::new(
            config.clone(),
            store.clone(),
            engine_state,
            Arc::new(sessions.clone()),
            alerts.clone(),
            build,
        )?;
        let init = InitReport {
            created_master_key,
            created_ca,
            created_operator,
            ca_fingerprint: ca.fingerprint(),
            operator_dir: op_dir,
            master_key_file: config.master_key_file.clone(),
        };
        let campaigns = Campaigns::new(config.clone(), engine_handle.state().clone(), engine_handle.clone());
        let scanner = Scanner::new(config.clone(), engine_handle.state().clone(), store.clone(), sessions.clone());
        let console = crate::console::Logins::new(config.console.clone(), config.path.clone());
        let admin = AdminSvc {
            auth: Authorizer::new(revoked.clone(), store.clone()),
            config,
            store,
            ca: Arc::new(ca),
            sessions,
            engine: engine_handle,
            scanner,
            campaigns,
            alerts,
            backup_key,
            console,
            streams: CancellationToken::new(),
        };
        Ok(Coordinator { admin, init, engine, webhook, alert_routes })
    }

    pub fn config(&self) -> &Config {
        &self.admin.config
    }

    /// Binds the listener, then runs the gRPC server, the engine, campaigns,
    /// the tripwire and the alert webhook under one [`Supervisor`] until
    /// `shutdown` or the first task that fails; then drains (each phase
    /// bounded by `drain`). `on_bound` is told the bound address (useful with
    /// port 0).
    pub async fn serve(
        self,
        shutdown: CancellationToken,
        drain: Duration,
        on_bound: impl FnOnce(SocketAddr),
    ) -> Result<(), ServerError> {
        let listen = self.admin.config.listen;
        let bind_err = |source| ServerError::Bind { addr: listen, source };
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        self.serve_on(listener, addr, shutdown, drain, on_bound).await
    }

    /// As [`Coordinator::serve`], on the connections `listener` (bound at
    /// `addr`) accepts: the deterministic simulation's network. Everything
    /// else is the same code.
    pub async fn serve_on<L: tls::Listener>(
        self,
        listener: L,
        addr: SocketAddr,
        shutdown: CancellationToken,
        drain: Duration,
        on_bound: impl FnOnce(SocketAddr),
    ) -> Result<(), ServerError> {
        let s = self.admin;
        let (chain, key) = s.ca.issue_server(&s.config.server_names, SERVER_CERT_LIFETIME)?;
        let tls_config = tls::server_config(std::slice::from_ref(s.ca.cert_der()), chain, key)?;
        write_file(s.config.addr_file(), format!("{addr}\n").as_bytes(), false)?;
        // Only where the initial credential still is (an operator may have moved it).
        if s.config.operator_dir().is_dir() {
            write_operator_endpoint(&s.config, addr)?;
        }

        let mut tasks = Supervisor::default();
        // Bound before the gRPC task serves, so `rekey console` finds it listening.
        crate::console::serve(&mut tasks, &s).await?;
        // The engine resumes rotations before the first agent can say hello.
        tasks.spawn("engine", Phase::Back, |stop| self.engine.run(stop));
        let campaigns = s.campaigns.clone();
        tasks.spawn("campaigns", Phase::Back, |stop| campaigns.run(stop));
        let tripwire =
            Tripwire { state: s.engine.state().clone(), scanner: s.scanner.clone(), alerts: s.alerts.clone() };
        tasks.spawn("tripwire", Phase::Back, |stop| tripwire.run(stop));
        if let Some(webhook) = self.webhook {
            tasks.spawn("alert-webhook", Phase::Back, |stop| webhook.run(stop));
        }
        if let Some(routes) = self.alert_routes {
            tasks.spawn("alert-routes", Phase::Back, |stop| routes.run(stop));
        }
        let agent_svc = AgentSvc {
            config: s.config.clone(),
            store: s.store.clone(),
            ca: s.ca.clone(),
            sessions: s.sessions.clone(),
            auth: s.auth.clone(),
            engine: s.engine.clone(),
            scans: s.scanner.scans().clone(),
        };
        let admin_svc = s.clone();
        let sessions = s.sessions.clone();
        let streams = s.streams.clone();
        tasks.spawn("grpc", Phase::Front, move |stop| {
            let incoming = tls::tls_incoming(listener, tls_config, tls::AcceptLimits::default(), stop.clone());
            tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(tls::KEEPALIVE_INTERVAL))
                .http2_keepalive_timeout(Some(tls::KEEPALIVE_TIMEOUT))
                .add_service(AgentServiceServer::new(agent_svc))
                .add_service(AdminServiceServer::new(admin_svc))
                .serve_with_incoming_shutdown(incoming, async move {
                    stop.cancelled().await;
                    streams.cancel();
                    // End live sessions, and any whose hello is still on its
                    // way, so the graceful drain can finish.
                    sessions.close_all();
                })
        });
        if let Some(listen) = s.config.metrics_listen {
            let (store, sessions, engine, alerts) =
                (s.store.clone(), s.sessions.clone(), s.engine.clone(), s.alerts.clone());
            let sources = crate::metrics::Sources { store, sessions, engine, alerts };
            let m = crate::metrics::Exporter::bind(listen, s.config.metrics_addr_file(), sources).await?;
            tasks.spawn("metrics", Phase::Front, |stop| m.run(stop));
        }
        tracing::info!(%addr, ca = %s.ca.fingerprint(), "rekeyd listening");
        on_bound(addr);
        let outcome = tasks.wait(shutdown, drain).await;
        s.store.flush()?;
        outcome?;
        tracing::info!("rekeyd stopped");
        Ok(())
    }
}
