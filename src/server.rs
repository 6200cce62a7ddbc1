//! Wiring a node: data dir, key, sled, core, HTTP listener; and a clean shutdown.
//!
//! [`start`] returns a [`Node`] handle so tests and examples can run several nodes in one
//! process; [`run`] is what `outpost run` calls: start, wait for Ctrl-C / SIGTERM, stop.

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use crate::{
    api::{self, AppState},
    clock::SystemClock,
    config::Config,
    core::{self, Core},
    identity::{Identity, IdentityError},
    media::{FsMediaStore, Media, MediaLimits},
    store::{KvStore, SledStore, StoreError},
};

/// Why a node could not start. Each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory cannot be created or used.
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The store could not be opened (including: already in use).
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The key could not be loaded or created.
    #[error("{0}")]
    Identity(#[from] IdentityError),
    /// The core refused the stored data (e.g. a newer schema).
    #[error("{0}")]
    Core(#[from] core::Error),
    /// The client address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
    /// The mesh could not start.
    #[error("{0}")]
    Mesh(#[from] crate::net::mesh::MeshError),
    /// A mesh address in the configuration is not a multiaddr.
    #[error("invalid multiaddr {0:?}: {1}")]
    Multiaddr(String, String),
}

/// File in the data directory holding the operator token (mode 0600), used by
/// `outpost status` and `outpost peers`.
pub const OPERATOR_TOKEN_FILE: &str = "operator.token";

/// A running node.
pub struct Node {
    /// The address the client API listens on.
    pub client_addr: SocketAddr,
    /// The protocol core.
    pub core: Arc<Core>,
    /// The federation router, for transports that deliver requests to this node.
    pub federation: axum::Router,
    /// The libp2p mesh, when enabled.
    pub mesh: Option<crate::net::mesh::Mesh>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), std::io::Error>>>,
    stop_tx: tokio::sync::watch::Sender<bool>,
}

impl Node {
    /// `http://<client_addr>`.
    pub fn client_url(&self) -> String {
        format!("http://{}", self.client_addr)
    }

    /// Stop serving, wait for in-flight requests, flush the store.
    pub async fn stop(mut self) -> Result<(), StartError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = self.stop_tx.send(true);
        if let Some(m) = self.mesh.take() {
            m.stop();
        }
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(r) => r.map_err(StartError::Serve)?,
                Err(e) => tracing::warn!(error = %e, "HTTP task ended abnormally"),
            }
        }
        self.core.flush()?;
        Ok(())
    }
}

/// Open the node's storage and key in `config.data_dir` and start serving the client API.
pub async fn start(config: Config) -> Result<Node, StartError> {
    let dir = config.data_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|source| StartError::DataDir { path: dir.display().to_string(), source })?;
    // Open sled first: its lock makes a second process on the same directory fail here,
    // before it touches anything else.
    let store: Arc<dyn KvStore> = Arc::new(
        SledStore::open(&dir.join("db"), config.limits.sled_cache_bytes)?
            .with_pending_max(config.limits.store_write_buffer_bytes),
    );
    let identity = Identity::load_or_create(&dir)?;
    let limits = core::Limits {
        timeline_limit_max: config.limits.timeline_limit_max,
        timeline_limit_default: config.limits.timeline_limit_default,
        sync_timeout_ms_max: config.limits.sync_timeout_ms_max,
        registration_enabled: config.registration_enabled,
        typing_timeout_ms_max: config.limits.typing_timeout_ms_max,
        unread_scan_events_max: config.limits.unread_scan_events_max,
        pdu_cache_entries: config.limits.pdu_cache_entries,
        search_scan_events_max: config.limits.search_scan_events_max,
        relations_scan_max: config.limits.relations_scan_max,
        pushers_per_user_max: config.limits.pushers_per_user_max,
        user_directory_limit_max: config.limits.user_directory_limit_max,
        to_device_inbox_max: config.limits.to_device_inbox_max,
        to_device_per_sync_max: config.limits.to_device_per_sync_max,
        one_time_keys_per_device_max: config.limits.one_time_keys_per_device_max,
        txn_ids_per_device_max: config.limits.txn_ids_per_device_max,
        edu_ephemeral_per_destination_max: config.limits.edu_ephemeral_per_destination_max,
        edu_durable_per_destination_max: config.limits.edu_durable_per_destination_max,
        federation_query_timeout_ms: config.limits.federation_query_timeout_ms,
    };
    let core = Core::open(store, identity, Arc::new(SystemClock), limits)?;
    core.set_operator_token(operator_token(&dir)?);
    let mesh_config = if config.mesh.enabled {
        let parse = |v: &[String]| -> Result<Vec<libp2p::Multiaddr>, StartError> {
            v.iter()
                .map(|a| {
                    a.parse().map_err(|e: libp2p::multiaddr::Error| StartError::Multiaddr(a.clone(), e.to_string()))
                })
                .collect()
        };
        Some(crate::net::mesh::MeshConfig {
            listen: parse(&config.mesh.listen)?,
            peers: parse(&config.mesh.peers)?,
            mdns: config.mesh.mdns,
            mdns_interfaces: config.mesh.mdns_interfaces.clone(),
        })
    } else {
        None
    };
    let listener = TcpListener::bind(config.client_addr)
        .await
        .map_err(|source| StartError::Bind { addr: config.client_addr, source })?;
    let client_addr = listener.local_addr().map_err(StartError::Serve)?;
    let max_concurrent = config.limits.max_concurrent_requests;
    let media_store = FsMediaStore::open(dir.join("media"))
        .map_err(|source| StartError::DataDir { path: dir.join("media").display().to_string(), source })?;
    let media = Media::new(
        Arc::new(media_store),
        MediaLimits {
            max_upload_bytes: config.limits.max_upload_bytes,
            thumbnail_source_pixels_max: config.limits.thumbnail_source_pixels_max,
            pending_uploads_per_user_max: config.limits.pending_uploads_per_user_max,
        },
    );
    let state = AppState {
        core: core.clone(),
        config: Arc::new(config),
        media: Arc::new(media),
        mesh_peers: Default::default(),
    };
    let federation = api::federation::router(state.clone());
    let mesh = match mesh_config {
        Some(mc) => {
            let m = crate::net::mesh::Mesh::start(core.clone(), federation.clone(), mc).await?;
            core.set_transport(m.transport());
            let _ = state.mesh_peers.set(m.peer_table());
            Some(m)
        }
        None => None,
    };
    let app = api::router(state).layer(tower::limit::GlobalConcurrencyLimitLayer::new(max_concurrent));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(core.clone().run_sender(stop_rx));
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
    });
    tracing::info!(
        server_name = %core.server_name(),
        peer_id = %core.peer_id(),
        client_url = %format!("http://{client_addr}"),
        "outpost node ready"
    );
    Ok(Node { client_addr, core, federation, mesh, shutdown: Some(tx), task: Some(task), stop_tx })
}

/// The operator token in `dir`, created (random, mode 0600) when missing.
fn operator_token(dir: &std::path::Path) -> Result<String, StartError> {
    use std::io::Write;
    let path = dir.join(OPERATOR_TOKEN_FILE);
    let io = |source| StartError::DataDir { path: path.display().to_string(), source };
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let token: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&path).map_err(io)?;
    f.write_all(token.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(token)
}

/// Run a node until Ctrl-C or SIGTERM.
pub async fn run(config: Config) -> Result<(), StartError> {
    let node = start(config).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    node.stop().await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
