//! Wires everything together: inspects the models, starts the state owner, binds the TCP address and the
//! Unix socket (mode 0600), and serves `ult.v1.Ult`, `grpc.health.v1.Health` and server reflection until
//! told to stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use ult_proto::v1::ult_server::UltServer;

use crate::config::Config;
use crate::engine::Engine;
use crate::probe::Prober;
use crate::registry::Registry;
use crate::service::UltService;
use crate::supervisor::{self, Handle};

/// A running daemon.
pub struct Running {
    /// The bound TCP address, if any (the real port when configured with port 0).
    pub tcp: Option<SocketAddr>,
    /// The Unix socket, if any.
    pub socket: Option<PathBuf>,
    /// The state owner.
    pub handle: Handle,
    stop: Vec<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("tcp", &self.tcp)
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Stops accepting, lets the servers finish, then stops the state owner.
    pub async fn stop(self) {
        for s in self.stop {
            let _ = s.send(());
        }
        for t in self.tasks {
            let _ = t.await;
        }
        self.handle.shutdown().await;
        if let Some(path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Starts a daemon for `config` on `engine`.
pub async fn spawn(config: Config, engine: Arc<dyn Engine>) -> anyhow::Result<Running> {
    let inspect_engine = engine.clone();
    let inspect_config = config.clone();
    let registry = tokio::task::spawn_blocking(move || {
        Registry::inspect(&inspect_config, inspect_engine.as_ref())
    })
    .await
    .context("inspecting models")?;
    let prober = Prober::new(config.daemon.probe.clone(), &engine.device());
    let handle = supervisor::start(&config, Arc::new(registry), engine, prober);
    serve(&config, handle).await
}

async fn serve(config: &Config, handle: Handle) -> anyhow::Result<Running> {
    let service = UltService::new(handle.clone());
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<UltServer<UltService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ult_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let router = || {
        Server::builder()
            .add_service(UltServer::new(service.clone()).max_decoding_message_size(16 << 20))
            .add_service(health_service.clone())
            .add_service(reflection.clone())
    };
    let mut stop = Vec::new();
    let mut tasks = Vec::new();
    let mut tcp = None;
    if let Some(addr) = config.daemon.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let bound = listener.local_addr().context("reading the bound address")?;
        let (tx, rx) = oneshot::channel::<()>();
        let server =
            router().serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = rx.await;
            });
        tasks.push(tokio::spawn(server));
        stop.push(tx);
        tcp = Some(bound);
    }
    let mut socket = None;
    #[cfg(unix)]
    if let Some(path) = &config.daemon.socket {
        use std::os::unix::fs::PermissionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // A stale socket from a previous run would make bind fail.
        if path.exists() {
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        let listener = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("setting permissions on {}", path.display()))?;
        let (tx, rx) = oneshot::channel::<()>();
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let server = router().serve_with_incoming_shutdown(incoming, async {
            let _ = rx.await;
        });
        tasks.push(tokio::spawn(server));
        stop.push(tx);
        socket = Some(path.clone());
    }
    Ok(Running {
        tcp,
        socket,
        handle,
        stop,
        tasks,
    })
}
