//! The life of one rekeyd replica on a shared PostgreSQL store: a follower
//! until it takes the lease, then the leader ([`Coordinator::serve`], as
//! with sled) until it shuts down (handing the lease over) or loses the
//! lease (the process exits: [`crate::ha::EXIT_LEASE_LOST`]).

use crate::config::Config;
use crate::pki::Ca;
use crate::server::{Coordinator, ServerError};
use crate::service::Authorizer;
use crate::service::follower::FollowerSvc;
use crate::sessions::RevokedSerials;
use crate::store::postgres::FenceMode;
use rekey_common::tls;
use rekey_proto::v1::admin_service_server::AdminServiceServer;
use rekey_proto::v1::agent_service_server::AgentServiceServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long the follower's server certificate lasts (it is reissued at every start).
const FOLLOWER_CERT_LIFETIME: Duration = Duration::from_secs(90 * 86_400);

/// Runs this replica until `shutdown`. `on_bound` is told the listen
/// address once the leader serves.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    drain: Duration,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let created_master_key = crate::server::master_key_ready(&config)?;
    let (store, pg) = tokio::task::block_in_place(|| crate::ha::open_store(&config, FenceMode::Follower))?;
    let pg = pg.expect("a replica runs on PostgreSQL");
    let master = crate::crypto::load_master_key(&config.master_key_file)?;
    // A store nobody initialized yet has no CA: serve nothing until this
    // replica leads (and creates it, as `rekeyd init` would).
    let ca = match Ca::load_or_create(&store, &master) {
        Ok((ca, _)) => Some(ca),
        Err(crate::pki::PkiError::Store(crate::store::StoreError::NotLeader)) => None,
        Err(e) => return Err(e.into()),
    };
    drop(master);
    let stop_follower = CancellationToken::new();
    let server = match ca {
        Some(ca) => {
            let follower = FollowerSvc {
                store: store.clone(),
                ha: config.ha.clone(),
                auth: Authorizer::new(RevokedSerials::new(store.revoked_serials()?), store.clone()),
            };
            tokio::spawn(serve_follower(follower, Arc::new(ca), config.clone(), stop_follower.clone()))
        }
        None => {
            tracing::warn!("the store is not initialized yet: this replica initializes it once it leads");
            tokio::spawn(async { Ok(()) })
        }
    };
    tracing::info!(id = %config.ha.id, addr = %config.listen, "rekeyd replica up as a follower; waiting for the lease");

    let give_up = Arc::new(AtomicBool::new(false));
    let waiter = {
        let (pg, ha, give_up) = (pg.clone(), config.ha.clone(), give_up.clone());
        tokio::task::spawn_blocking(move || crate::ha::wait_for_lease(&pg, &ha, &give_up))
    };
    let epoch = tokio::select! {
        _ = shutdown.cancelled() => {
            give_up.store(true, Ordering::Relaxed);
            stop_follower.cancel();
            let _ = server.await;
            return Ok(());
        }
        epoch = waiter => epoch.ok().flatten(),
    };
    stop_follower.cancel();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(e) => return Err(ServerError::Bind { addr: config.listen, source: std::io::Error::other(e.to_string()) }),
    }
    let Some(epoch) = epoch else { return Ok(()) };
    crate::ha::lead(pg.clone(), config.ha.clone(), epoch);
    let ha = config.ha.clone();
    let coordinator = tokio::task::block_in_place(|| Coordinator::init_with(config, store, created_master_key))?;
    let outcome = coordinator.serve(shutdown, drain, on_bound).await;
    tokio::task::block_in_place(|| crate::ha::step_down(&pg, &ha));
    outcome
}

/// The follower's server: same listener, same CA, a certificate of its own.
async fn serve_follower(
    svc: FollowerSvc,
    ca: Arc<Ca>,
    config: Config,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    let (chain, key) = ca.issue_server(&config.server_names, FOLLOWER_CERT_LIFETIME)?;
    let tls_config = tls::server_config(std::slice::from_ref(ca.cert_der()), chain, key)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let incoming = tls::tls_incoming(listener, tls_config, tls::AcceptLimits::default(), stop.clone());
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(tls::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(tls::KEEPALIVE_TIMEOUT))
        .add_service(AgentServiceServer::new(svc.clone()))
        .add_service(AdminServiceServer::new(svc))
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await
        .map_err(|e| ServerError::Bind { addr: config.listen, source: std::io::Error::other(e.to_string()) })
}
