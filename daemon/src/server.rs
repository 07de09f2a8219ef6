//! Wires everything together: inspects the models, starts the state owner, binds the TCP address and the
//! Unix socket (mode 0600), and serves `ult.v1.Ult`, `grpc.health.v1.Health` and server reflection until
//! told to stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::oneshot;
use tonic::transport::Server;
use ult_proto::v1::ult_server::UltServer;

use crate::auth::BearerAuth;
use crate::config::Config;
use crate::http::HttpState;
use crate::metrics::Metrics;
use crate::probe::Prober;
use crate::registry::Registry;
use crate::service::UltService;
use crate::supervisor::{self, Handle};
use ult_engine::Engine;

/// A running daemon.
pub struct Running {
    /// The bound TCP address, if any (the real port when configured with port 0).
    pub tcp: Option<SocketAddr>,
    /// The Unix socket, if any.
    pub socket: Option<PathBuf>,
    /// The bound HTTP address, if the OpenAI-compatible API is on.
    pub http: Option<SocketAddr>,
    /// The bound address of Ollama's API, if it is on.
    pub ollama: Option<SocketAddr>,
    /// The state owner.
    pub handle: Handle,
    stop: Vec<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
    http_tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
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
    /// Graceful shutdown: refuse new requests and stop accepting connections, let running requests finish
    /// for up to the configured grace period, end whatever still runs with `EndedByShutdown`, then stop
    /// the state owner (workers drop their models).
    pub async fn stop(self) {
        self.handle.begin_drain();
        for s in self.stop {
            let _ = s.send(());
        }
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_millis(self.handle.grace_ms());
        while self.handle.requests_in_flight().await > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.handle.end_streams();
        // Servers finish once their streams end; do not hang on a peer that never closes.
        let servers = async {
            for t in self.tasks {
                let _ = t.await;
            }
            for t in self.http_tasks {
                let _ = t.await;
            }
        };
        if tokio::time::timeout(std::time::Duration::from_secs(5), servers)
            .await
            .is_err()
        {
            tracing::warn!("connections still open after the grace period; closing anyway");
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
    let mut prober = Prober::new(config.daemon.probe.clone(), &engine.device());
    if let Ok(pool) = prober.pool_total() {
        config.check_memory(pool)?;
    }
    let handle = supervisor::start(&config, Arc::new(registry), engine, prober);
    serve(&config, handle).await
}

async fn serve(config: &Config, handle: Handle) -> anyhow::Result<Running> {
    let metrics = Arc::new(Metrics::new());
    metrics.follow(&handle);
    let token: Option<Arc<str>> = config.daemon.auth_token.as_deref().map(Arc::from);
    let auth = BearerAuth::new(token.clone(), metrics.clone());
    let service = UltService::new(handle.clone(), metrics.clone());
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<UltServer<UltService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ult_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    // v1alpha too: grpcurl before 1.9 and grpcio-reflection's client speak it.
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ult_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the reflection service")?;
    let max = config.daemon.max_request_bytes;
    let guard = config.daemon.guard.clone();
    let keepalive = std::time::Duration::from_millis(guard.keepalive_interval_ms);
    let router = || {
        let ult = UltServer::new(service.clone()).max_decoding_message_size(max);
        Server::builder()
            .http2_keepalive_interval(Some(keepalive))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                ult,
                auth.clone(),
            ))
            .add_service(health_service.clone())
            .add_service(tonic::service::interceptor::InterceptedService::new(
                reflection.clone(),
                auth.clone(),
            ))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                reflection_alpha.clone(),
                auth.clone(),
            ))
    };
    let mut stop = Vec::new();
    let mut tasks = Vec::new();
    let mut tcp = None;
    // Each TCP door is capped below the descriptor limit, so the Unix socket always has room.
    let doors = usize::from(config.daemon.listen.is_some())
        + usize::from(config.daemon.http.is_some())
        + usize::from(config.daemon.ollama.is_some());
    let fd_limit = crate::conn::raise_fd_limit();
    let cap = crate::conn::connection_cap(guard.max_connections, doors, fd_limit);
    if cap < guard.max_connections {
        tracing::warn!(
            configured = guard.max_connections,
            cap,
            fd_limit,
            "max_connections lowered to fit the open-file limit"
        );
    }
    if let Some(addr) = config.daemon.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let bound = listener.local_addr().context("reading the bound address")?;
        let (tx, rx) = oneshot::channel::<()>();
        // TCP_NODELAY (set on accept): gRPC writes a response as several small frames; with Nagle on, the
        // later ones wait for the client's delayed ACK, which added 40 ms to every unary call (measured: a
        // Status poll took 44 ms; see BENCHMARKS.md, cancellation).
        let incoming =
            crate::conn::incoming(listener, crate::conn::ConnLimits::new("grpc", &guard, cap));
        let server = router().serve_with_incoming_shutdown(incoming, async {
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
    let http_state = HttpState {
        core: crate::generation::Core::new(handle.clone(), metrics.clone()),
        handle: handle.clone(),
        metrics: metrics.clone(),
        token: token.clone(),
    };
    let mut http_tasks = Vec::new();
    let mut ollama = None;
    if let Some(o) = config.daemon.ollama {
        match tokio::net::TcpListener::bind(o.addr).await {
            Ok(listener) => {
                ollama = Some(listener.local_addr().context("reading the bound address")?);
                let app = crate::ollama::router(http_state.clone(), max);
                let (tx, rx) = oneshot::channel::<()>();
                let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
                let limits = crate::conn::ConnLimits::new("ollama", &guard, cap);
                tokio::spawn(async move {
                    let _ = rx.await;
                    let _ = stop_tx.send(true);
                });
                http_tasks.push(tokio::spawn(crate::conn::serve_http(
                    listener,
                    limits,
                    guard.clone(),
                    app,
                    stop_rx,
                )));
                stop.push(tx);
            }
            Err(e) if !o.required => {
                tracing::warn!("{}", crate::ollama::default_port_taken_message(o.addr, &e));
            }
            Err(e) => {
                return Err(e).with_context(|| format!("binding {} for Ollama's API", o.addr));
            }
        }
    }
    let mut http = None;
    if let Some(addr) = config.daemon.http {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        http = Some(listener.local_addr().context("reading the bound address")?);
        let app = crate::http::router(http_state.clone(), max);
        let (tx, rx) = oneshot::channel::<()>();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let limits = crate::conn::ConnLimits::new("http", &guard, cap);
        let guard = guard.clone();
        tokio::spawn(async move {
            let _ = rx.await;
            let _ = stop_tx.send(true);
        });
        http_tasks.push(tokio::spawn(crate::conn::serve_http(
            listener, limits, guard, app, stop_rx,
        )));
        stop.push(tx);
    }
    Ok(Running {
        tcp,
        socket,
        http,
        ollama,
        handle,
        stop,
        tasks,
        http_tasks,
    })
}
