//! Connections to endpoints, pooled per endpoint and per way of talking to
//! it (address, TLS identity expected, HTTP version).
//!
//! HTTP/2: one multiplexed connection per key, shared by every request;
//! a second connect for the same key waits for the first instead of racing
//! it (no connect storm when a burst arrives). HTTP/1.1: idle connections
//! are kept (at most `max_idle` per key, for `idle_timeout`) and a request
//! takes one or opens a new one; a connection returns to the pool when its
//! response body has been read to the end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::balance::ClusterCounters;
use crate::body::Body;
use crate::outbound::{ALPN_H2, ALPN_HTTP11, MeshConnector};

/// The HTTP version spoken to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Proto {
    H1,
    H2,
}

/// How an endpoint is authenticated: the SNI sent and the SANs expected.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TlsTarget {
    pub sni: String,
    pub sans: Vec<String>,
}

/// What a pooled connection is keyed by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub addr: SocketAddr,
    pub tls: Option<TlsTarget>,
    pub proto: Proto,
}

/// What is known about an established connection.
#[derive(Clone, Debug, Default)]
pub(crate) struct ConnInfo {
    pub peer_id: Option<Arc<str>>,
    pub alpn: Option<Arc<str>>,
}

impl ConnInfo {
    /// The server's SPIFFE id and the agreed ALPN of a client TLS session.
    pub(crate) fn of(session: &rustls::ClientConnection) -> Self {
        Self {
            peer_id: session
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| nasp_identity::cert::spiffe_id_of(c).ok())
                .map(|id| Arc::from(id.to_string())),
            alpn: session
                .alpn_protocol()
                .map(|p| Arc::from(String::from_utf8_lossy(p).into_owned())),
        }
    }
}

impl TlsTarget {
    /// Istio mTLS to `addr` of `cluster` over its socket `tls`: the
    /// socket's SNI, else the cluster's, else the IP; the SANs xDS expects.
    pub(crate) fn istio(
        cluster: &nasp_xds::cluster::ClusterInfo,
        tls: &nasp_xds::cluster::UpstreamTls,
        addr: SocketAddr,
    ) -> Self {
        Self {
            sni: tls
                .sni
                .clone()
                .or_else(|| cluster.sni.clone())
                .unwrap_or_else(|| addr.ip().to_string()),
            sans: cluster.expected_sans.clone(),
        }
    }
}

/// Why no connection could be had: always before any byte of the request
/// was sent, so the request may be retried (`connect-failure`).
#[derive(Debug)]
pub(crate) struct ConnectError(pub String);

/// Why a checkout gave no connection.
#[derive(Debug)]
pub(crate) enum CheckoutError {
    /// Connecting failed (retriable as `connect-failure`).
    Connect(ConnectError),
    /// The cluster's `max_connections` are open and `max_pending_requests`
    /// wait already (or waited too long): Envoy's overflow, 503 `UO`.
    Overflow(String),
}

impl From<ConnectError> for CheckoutError {
    fn from(e: ConnectError) -> Self {
        CheckoutError::Connect(e)
    }
}

/// The cluster's connection circuit breakers, for one checkout.
#[derive(Clone, Debug)]
pub(crate) struct ConnLimits {
    pub counters: Arc<ClusterCounters>,
    pub max_connections: u32,
    pub max_pending: u32,
}

/// One open connection counted against its cluster until it ends.
struct ConnSlot(Arc<ClusterCounters>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnLimits {
    fn take_connection(&self) -> Option<ConnSlot> {
        let prev = self.counters.connections.fetch_add(1, Ordering::AcqRel);
        if prev >= self.max_connections as usize {
            self.counters.connections.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnSlot(self.counters.clone()))
    }
}

pub(crate) enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

/// A connection taken from the pool for one request.
pub(crate) struct Checkout {
    pub sender: Sender,
    pub info: ConnInfo,
    pub pool: Arc<EndpointPool>,
    /// An idle HTTP/1.1 connection taken from the pool (one the server may
    /// have closed at the same moment).
    pub reused: bool,
}

struct Idle {
    sender: http1::SendRequest<Body>,
    info: ConnInfo,
    since: Instant,
}

pub(crate) struct EndpointPool {
    key: PoolKey,
    h1_idle: Mutex<Vec<Idle>>,
    h2: Mutex<Option<(http2::SendRequest<Body>, ConnInfo)>>,
    h2_connecting: tokio::sync::Mutex<()>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl EndpointPool {
    /// Gives an HTTP/1.1 connection back once its exchange is over.
    pub(crate) fn put_back(&self, sender: http1::SendRequest<Body>, info: ConnInfo) {
        if sender.is_closed() {
            return;
        }
        let mut idle = lock(&self.h1_idle);
        if idle.len() < self.max_idle {
            idle.push(Idle {
                sender,
                info,
                since: Instant::now(),
            });
        }
    }

    /// Forgets a shared HTTP/2 connection that failed, so the next request
    /// opens a new one.
    pub(crate) fn h2_failed(&self) {
        let mut slot = lock(&self.h2);
        if slot.as_ref().is_some_and(|(s, _)| s.is_closed()) {
            *slot = None;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Every endpoint's pool.
pub(crate) struct Pools {
    map: Mutex<HashMap<PoolKey, Arc<EndpointPool>>>,
    connector: MeshConnector,
    pub max_idle: usize,
    pub idle_timeout: Duration,
}

impl Pools {
    pub(crate) fn new(connector: MeshConnector) -> Self {
        Self {
            map: Mutex::default(),
            connector,
            max_idle: 64,
            idle_timeout: Duration::from_secs(90),
        }
    }

    fn pool(&self, key: &PoolKey) -> Arc<EndpointPool> {
        let mut map = lock(&self.map);
        if let Some(p) = map.get(key) {
            return p.clone();
        }
        let p = Arc::new(EndpointPool {
            key: key.clone(),
            h1_idle: Mutex::default(),
            h2: Mutex::default(),
            h2_connecting: tokio::sync::Mutex::new(()),
            max_idle: self.max_idle,
            idle_timeout: self.idle_timeout,
        });
        map.insert(key.clone(), p.clone());
        p
    }

    /// Open connections (HTTP/2) and idle ones (HTTP/1.1), for tests and
    /// stats.
    pub(crate) fn connections(&self) -> usize {
        let map = lock(&self.map);
        map.values()
            .map(|p| {
                lock(&p.h1_idle).len()
                    + usize::from(lock(&p.h2).as_ref().is_some_and(|(s, _)| !s.is_closed()))
            })
            .sum()
    }

    /// A connection for `key`, opened within `timeout` if none is pooled.
    pub(crate) async fn checkout(
        &self,
        key: &PoolKey,
        timeout: Duration,
        limits: &ConnLimits,
    ) -> Result<Checkout, CheckoutError> {
        let pool = self.pool(key);
        match key.proto {
            Proto::H2 => {
                if let Some((s, info)) = live_h2(&pool) {
                    return Ok(Checkout {
                        sender: Sender::H2(s),
                        info,
                        pool,
                        reused: false,
                    });
                }
                let connecting = pool.clone();
                let _connecting = connecting.h2_connecting.lock().await;
                if let Some((s, info)) = live_h2(&pool) {
                    return Ok(Checkout {
                        sender: Sender::H2(s),
                        info,
                        pool,
                        reused: false,
                    });
                }
                let Some(slot) = limits.take_connection() else {
                    return Err(CheckoutError::Overflow(format!(
                        "{} connections open (max_connections)",
                        limits.max_connections
                    )));
                };
                let (sender, info) = self.connect(key, timeout, slot).await?;
                let Sender::H2(s) = sender else {
                    return Err(ConnectError("HTTP/2 connection expected".into()).into());
                };
                *lock(&pool.h2) = Some((s.clone(), info.clone()));
                Ok(Checkout {
                    sender: Sender::H2(s),
                    info,
                    pool,
                    reused: false,
                })
            }
            Proto::H1 => {
                // An idle connection, else a new one within the cluster's
                // `max_connections`, else wait as one of at most
                // `max_pending` requests for either (Envoy's pending queue;
                // more, or longer than `timeout`, is an overflow).
                let mut pending: Option<PendingSlot> = None;
                let deadline = tokio::time::Instant::now() + timeout;
                loop {
                    loop {
                        let idle = lock(&pool.h1_idle).pop();
                        let Some(idle) = idle else { break };
                        // A connection whose response just ended may not
                        // be marked ready yet: it is taken anyway and the
                        // caller waits for `ready()` (dropping it would cost
                        // a new handshake per request).
                        if idle.sender.is_closed() || idle.since.elapsed() > pool.idle_timeout {
                            continue;
                        }
                        return Ok(Checkout {
                            sender: Sender::H1(idle.sender),
                            info: idle.info,
                            pool,
                            reused: true,
                        });
                    }
                    if let Some(slot) = limits.take_connection() {
                        drop(pending);
                        let (sender, info) = self.connect(key, timeout, slot).await?;
                        return Ok(Checkout {
                            sender,
                            info,
                            pool,
                            reused: false,
                        });
                    }
                    if pending.is_none() {
                        let prev = limits.counters.pending.fetch_add(1, Ordering::AcqRel);
                        if prev >= limits.max_pending as usize {
                            limits.counters.pending.fetch_sub(1, Ordering::AcqRel);
                            return Err(CheckoutError::Overflow(format!(
                                "{} connections open and {} requests pending \
                                 (max_connections, max_pending_requests)",
                                limits.max_connections, limits.max_pending
                            )));
                        }
                        pending = Some(PendingSlot(limits.counters.clone()));
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(CheckoutError::Overflow(format!(
                            "no connection within {timeout:?} (max_connections {})",
                            limits.max_connections
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }

    async fn connect(
        &self,
        key: &PoolKey,
        timeout: Duration,
        slot: ConnSlot,
    ) -> Result<(Sender, ConnInfo), ConnectError> {
        let addr = key.addr;
        match &key.tls {
            None => {
                let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
                    .await
                    .map_err(|_| ConnectError(format!("connecting to {addr}: timed out")))?
                    .map_err(|e| ConnectError(format!("connecting to {addr}: {e}")))?;
                let _ = tcp.set_nodelay(true);
                handshake(tcp, key.proto, ConnInfo::default(), addr, slot).await
            }
            Some(t) => {
                let alpn = match key.proto {
                    Proto::H2 => ALPN_H2,
                    Proto::H1 => ALPN_HTTP11,
                };
                let tls = self
                    .connector
                    .clone()
                    .connect_timeout(timeout)
                    .connect(addr, &t.sni, &t.sans, alpn)
                    .await
                    .map_err(|e| ConnectError(e.to_string()))?;
                let info = ConnInfo::of(tls.get_ref().1);
                handshake(tls, key.proto, info, addr, slot).await
            }
        }
    }
}

fn live_h2(pool: &EndpointPool) -> Option<(http2::SendRequest<Body>, ConnInfo)> {
    let slot = lock(&pool.h2);
    match slot.as_ref() {
        Some((s, info)) if !s.is_closed() => Some((s.clone(), info.clone())),
        _ => None,
    }
}

/// A request waiting for a connection, counted against
/// `max_pending_requests` until it has one.
struct PendingSlot(Arc<ClusterCounters>);

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn handshake<T>(
    io: T,
    proto: Proto,
    info: ConnInfo,
    addr: SocketAddr,
    slot: ConnSlot,
) -> Result<(Sender, ConnInfo), ConnectError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let io = TokioIo::new(io);
    match proto {
        Proto::H2 => {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .handshake(io)
                .await
                .map_err(|e| ConnectError(format!("HTTP/2 handshake with {addr}: {e}")))?;
            tokio::spawn(async move {
                let _slot = slot;
                if let Err(e) = conn.await {
                    tracing::debug!(%addr, "HTTP/2 connection ended: {e}");
                }
            });
            Ok((Sender::H2(sender), info))
        }
        Proto::H1 => {
            let (sender, conn) = http1::handshake(io)
                .await
                .map_err(|e| ConnectError(format!("HTTP/1.1 handshake with {addr}: {e}")))?;
            tokio::spawn(async move {
                let _slot = slot;
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(%addr, "HTTP/1.1 connection ended: {e}");
                }
            });
            Ok((Sender::H1(sender), info))
        }
    }
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pools")
            .field("endpoints", &lock(&self.map).len())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for EndpointPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointPool")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}
