//! Connection governance for the TCP front doors: a cap on connections per door and per client address
//! (more are closed as they arrive, so a flood cannot exhaust descriptors), a deadline for a new connection's
//! first bytes and an idle deadline after that, and the HTTP server loop that adds HTTP/1 header-read
//! timeouts and HTTP/2 pings. The Unix socket has no cap: with the TCP doors capped below the descriptor
//! limit, `ultctl` on the socket keeps working while TCP is flooded.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use crate::config::Guard;

/// Open connections of one front door, by client address.
#[derive(Debug)]
pub struct ConnLimits {
    door: &'static str,
    max: usize,
    per_client: usize,
    first_bytes: Duration,
    idle: Duration,
    open: Mutex<HashMap<IpAddr, usize>>,
    total: AtomicU64,
    refused: AtomicU64,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self
            .limits
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnLimits {
    /// The limits of front door `door` ("grpc" or "http") from `guard`, with at most `max` connections.
    pub fn new(door: &'static str, guard: &Guard, max: usize) -> Arc<Self> {
        Arc::new(Self {
            door,
            max,
            per_client: guard.max_connections_per_client.min(max),
            first_bytes: Duration::from_millis(guard.header_timeout_ms),
            idle: Duration::from_millis(guard.idle_timeout_ms),
            open: Mutex::new(HashMap::new()),
            total: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// Admits a connection from `ip`, or None when the door or the client is at its cap.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Permit> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let total = self.total.load(Ordering::Acquire) as usize;
        let n = open.get(&ip).copied().unwrap_or(0);
        if total >= self.max || n >= self.per_client {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        open.insert(ip, n + 1);
        self.total.fetch_add(1, Ordering::AcqRel);
        Some(Permit {
            limits: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.total.load(Ordering::Acquire)
    }

    /// Connections closed on arrival so far because a cap was reached.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// A TCP connection holding its permit, closed when its peer sends nothing before a deadline: first
/// `header_timeout` for its first bytes, then `idle_timeout` after each read or write.
#[derive(Debug)]
pub struct Guarded {
    inner: TcpStream,
    _permit: Permit,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl Guarded {
    fn new(inner: TcpStream, permit: Permit) -> Self {
        let first = permit.limits.first_bytes;
        let idle = permit.limits.idle;
        Self {
            inner,
            _permit: permit,
            idle,
            deadline: Box::pin(tokio::time::sleep(first)),
        }
    }

    fn touch(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.idle);
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }

    /// A write's outcome: bytes written are activity; a write still blocked past the deadline fails.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.touch();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(timed_out())),
            other => other,
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection idle past its deadline")
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(timed_out())),
            other => other,
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(cx, written)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl Guarded {
    /// The peer's address.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.inner.peer_addr().ok()
    }
}

/// Accepts connections on `listener` under `limits` (TCP_NODELAY set: gRPC and SSE write small frames
/// that must not wait for delayed ACKs), yielding the admitted ones. Connections over a cap are closed at
/// once; when the process is out of descriptors, accepting pauses briefly instead of spinning.
pub fn incoming(
    listener: TcpListener,
    limits: Arc<ConnLimits>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Guarded>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut logged_full = false;
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let Some(permit) = limits.admit(peer.ip()) else {
                        if !logged_full {
                            tracing::warn!(door = limits.door, peer = %peer, max = limits.max, per_client = limits.per_client, "connection cap reached; closing new connections");
                            logged_full = true;
                        }
                        drop(stream);
                        continue;
                    };
                    logged_full = false;
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "TCP_NODELAY not set");
                    }
                    if tx.send(Ok(Guarded::new(stream, permit))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // EMFILE/ENFILE and aborted handshakes: the listener itself is fine.
                    tracing::warn!(door = limits.door, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Serves `app` (the OpenAI-compatible API) on `listener` under `limits` until `stop` fires, then lets
/// open connections finish their requests.
pub async fn serve_http(
    listener: TcpListener,
    limits: Arc<ConnLimits>,
    guard: Guard,
    app: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> io::Result<()> {
    use futures::StreamExt;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::Service;

    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(guard.header_timeout_ms));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(guard.keepalive_interval_ms))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let mut accepted = incoming(listener, limits);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            s = accepted.next() => match s {
                Some(Ok(s)) => s,
                Some(Err(_)) => continue,
                None => break,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = stop.changed() => break,
        };
        let peer = stream
            .peer()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let app = app.clone();
        let service = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                let mut app = app.clone();
                async move {
                    Ok::<_, Infallible>(app.call(request).await.unwrap_or_else(|e| match e {}))
                }
            },
        );
        let builder = builder.clone();
        let mut stop = stop.clone();
        connections.spawn(async move {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "HTTP connection ended");
                    }
                }
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(accepted);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Raises this process's soft limit on open descriptors to its hard limit (on macOS at most `OPEN_MAX`,
/// 10240, which `setrlimit` refuses to exceed) and returns the soft limit now in force.
pub fn raise_fd_limit() -> Option<u64> {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return None;
        }
        let mut want = l.rlim_max;
        if cfg!(target_os = "macos") {
            want = want.min(10240);
        }
        if want > l.rlim_cur {
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: l.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                l.rlim_cur = want;
            }
        }
        Some(l.rlim_cur)
    }
}

/// The connections each of `doors` TCP front doors may hold under a descriptor limit of `fd_limit`,
/// keeping a reserve for model files, the Unix socket and its clients: the configured cap, or less when
/// the limit is tight.
pub fn connection_cap(configured: usize, doors: usize, fd_limit: Option<u64>) -> usize {
    const RESERVE: u64 = 256;
    match fd_limit {
        Some(limit) if doors > 0 => {
            let room = limit.saturating_sub(RESERVE) / doors as u64;
            configured.min(room.max(16) as usize)
        }
        _ => configured,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        Guard {
            request_memory: 1 << 20,
            request_threads: 2,
            write_timeout_ms: 1000,
            max_connections: 3,
            max_connections_per_client: 2,
            header_timeout_ms: 1000,
            idle_timeout_ms: 1000,
            keepalive_interval_ms: 1000,
        }
    }

    #[test]
    fn caps_per_door_and_per_client() {
        let l = ConnLimits::new("http", &guard(), 3);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let a1 = l.admit(a).unwrap();
        let _a2 = l.admit(a).unwrap();
        assert!(l.admit(a).is_none(), "per-client cap");
        let _b1 = l.admit(b).unwrap();
        assert!(l.admit(b).is_none(), "door cap");
        assert_eq!((l.open(), l.refused()), (3, 2));
        drop(a1);
        assert!(l.admit(b).is_some());
    }

    #[test]
    fn the_cap_leaves_a_descriptor_reserve() {
        assert_eq!(connection_cap(1024, 2, Some(20_000)), 1024);
        assert_eq!(connection_cap(1024, 2, Some(1280)), 512);
        assert_eq!(connection_cap(1024, 2, Some(256)), 16);
        assert_eq!(connection_cap(1024, 2, None), 1024);
        assert!(raise_fd_limit().is_some_and(|n| n > 0));
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_after_its_deadline() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut g = guard();
        g.header_timeout_ms = 200;
        let l = ConnLimits::new("grpc", &g, 3);
        let mut accepted = incoming(listener, l.clone());
        let _client = TcpStream::connect(addr).await.unwrap();
        let mut server = futures::StreamExt::next(&mut accepted)
            .await
            .unwrap()
            .unwrap();
        let mut buf = [0u8; 8];
        let e = server.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        drop(server);
        assert_eq!(l.open(), 0);
    }
}
