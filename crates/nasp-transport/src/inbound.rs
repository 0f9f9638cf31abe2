//! Inbound mesh connections: a listener in STRICT, PERMISSIVE or DISABLE
//! mode, as Istio's `PeerAuthentication` sets them.
//!
//! The accept loop only accepts: each connection is sniffed (PERMISSIVE)
//! and handshaken (STRICT, PERMISSIVE with TLS) in a task of its own, under
//! the first-bytes and handshake deadlines, and handed to the application
//! through a bounded queue once it is ready. A client that connects and
//! says nothing, or stalls in its TLS hello, delays nobody else and is
//! dropped at its deadline. `accept` errors (descriptor exhaustion) back off
//! instead of spinning.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use nasp_identity::tls::{TrustDomains, server_config};
use nasp_identity::{SpiffeId, WorkloadCert};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::{Error, Result, io};

/// Peer authentication of a listener (Istio's `PeerAuthentication` modes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum InboundMode {
    /// mTLS only: a client certificate of the mesh is required.
    Strict,
    /// mTLS or plaintext on the same port, told apart by the first bytes
    /// (a TLS handshake record), as Envoy's TLS inspector does (Istio's
    /// default mode).
    #[default]
    Permissive,
    /// Plaintext only: bytes are passed on as they come, TLS included.
    Disable,
}

/// How a [`MeshListener`] accepts.
#[derive(Clone, Debug)]
pub struct InboundConfig {
    /// Peer authentication.
    pub mode: InboundMode,
    /// Trust domains whose workloads may connect (the mesh's and aliases).
    pub trust: TrustDomains,
    /// Only these SPIFFE ids, when set (an authorization allow-list).
    pub allow: Option<Vec<SpiffeId>>,
    /// ALPN protocols accepted on mTLS, in preference order (default: the
    /// Istio protocols for HTTP/2, HTTP/1.1 and TCP, then plain ones).
    pub alpn: Vec<Vec<u8>>,
    /// How long a new connection may take to send its first bytes before it
    /// is dropped (PERMISSIVE only; Envoy's listener-filter timeout, 15 s).
    pub first_bytes_timeout: Duration,
    /// How long a TLS handshake may take (default 10 s).
    pub handshake_timeout: Duration,
    /// Connections ready for the application but not yet accepted by it
    /// (default 128); beyond that, new connections wait in the kernel.
    pub backlog: usize,
}

impl InboundConfig {
    /// Defaults for a mesh of `trust` in `mode`.
    pub fn new(mode: InboundMode, trust: impl Into<TrustDomains>) -> Self {
        Self {
            mode,
            trust: trust.into(),
            allow: None,
            alpn: [
                "istio-h2",
                "istio-http/1.1",
                "istio-http/1.0",
                "istio-peer-exchange",
                "istio",
                "h2",
                "http/1.1",
            ]
            .iter()
            .map(|p| p.as_bytes().to_vec())
            .collect(),
            first_bytes_timeout: Duration::from_secs(15),
            handshake_timeout: Duration::from_secs(10),
            backlog: 128,
        }
    }

    /// Sets the first-bytes deadline.
    pub fn first_bytes_timeout(mut self, d: Duration) -> Self {
        self.first_bytes_timeout = d;
        self
    }

    /// Sets the handshake deadline.
    pub fn handshake_timeout(mut self, d: Duration) -> Self {
        self.handshake_timeout = d;
        self
    }

    /// Sets the allow-list.
    pub fn allow(mut self, ids: Vec<SpiffeId>) -> Self {
        self.allow = Some(ids);
        self
    }
}

/// The bytes of an accepted connection: mTLS-terminated or plaintext.
#[derive(Debug)]
pub enum MeshStream {
    /// mTLS, terminated here.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Plaintext (PERMISSIVE without TLS, or DISABLE).
    Plain(TcpStream),
}

/// An accepted mesh connection and what is known of its peer.
#[derive(Debug)]
pub struct MeshConn {
    /// The connection.
    pub stream: MeshStream,
    /// The peer's address.
    pub peer_addr: SocketAddr,
    /// The peer's verified SPIFFE id (mTLS only).
    pub peer_id: Option<SpiffeId>,
    /// The ALPN protocol agreed on (mTLS only).
    pub alpn: Option<Vec<u8>>,
}

impl MeshConn {
    /// Whether the connection is mTLS.
    pub fn is_mtls(&self) -> bool {
        matches!(self.stream, MeshStream::Tls(_))
    }
}

/// A listener for mesh traffic. Dropping it stops accepting.
#[derive(Debug)]
pub struct MeshListener {
    local_addr: SocketAddr,
    ready: mpsc::Receiver<MeshConn>,
    task: tokio::task::JoinHandle<()>,
    /// Closed (its sender dropped) once the accept loop's socket is.
    socket_alive: watch::Receiver<()>,
}

/// The accept loop's socket, with a sender that is dropped right after it:
/// fields drop in declaration order, so a receiver that sees the sender
/// gone knows the port is closed.
struct Socket {
    listener: TcpListener,
    _alive: watch::Sender<()>,
}

impl Drop for MeshListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// First and longest pause after a failed `accept`.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The next connection of `listener`. Accept errors (EMFILE when
/// descriptors run out, ENOBUFS) persist while their cause does, so they are
/// retried with a pause from 5 ms doubling to 1 s instead of spinning a core;
/// each call starts again at the shortest pause.
pub async fn accept_with_backoff(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        match listener.accept().await {
            Ok(c) => return c,
            Err(e) => {
                tracing::warn!("accept failed, retrying in {backoff:?}: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// Whether the first bytes of a connection start a TLS handshake: a
/// handshake record (0x16) of a TLS/SSL 3.x version. With two bytes, a
/// plaintext protocol that happens to start with 0x16 is not mistaken for
/// TLS; with one, 0x16 is taken for TLS.
pub fn looks_like_tls(first: &[u8]) -> bool {
    matches!(first, [0x16] | [0x16, 0x03, ..])
}

impl MeshListener {
    /// Serves on `listener` with certificates from `certs` (read at each
    /// handshake: a rotation is followed without a restart).
    pub fn new(
        listener: TcpListener,
        certs: watch::Receiver<Option<Arc<WorkloadCert>>>,
        config: InboundConfig,
    ) -> Result<Self> {
        let local_addr = listener.local_addr().map_err(io("local address"))?;
        let alpn: Vec<&[u8]> = config.alpn.iter().map(Vec::as_slice).collect();
        let tls = Arc::new(server_config(
            certs,
            config.trust.clone(),
            config.allow.clone(),
            &alpn,
        )?);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let (tx, ready) = mpsc::channel(config.backlog.max(1));
        let (alive, socket_alive) = watch::channel(());
        let socket = Socket {
            listener,
            _alive: alive,
        };
        let task = tokio::spawn(accept_loop(socket, acceptor, config, tx));
        Ok(Self {
            local_addr,
            ready,
            task,
            socket_alive,
        })
    }

    /// Binds `addr` and serves on it.
    pub async fn bind(
        addr: SocketAddr,
        certs: watch::Receiver<Option<Arc<WorkloadCert>>>,
        config: InboundConfig,
    ) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(io(format!("binding {addr}")))?;
        Self::new(listener, certs, config)
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The next ready connection (handshaken and verified); `None` once the
    /// listener has stopped.
    pub async fn accept(&mut self) -> Option<MeshConn> {
        self.ready.recv().await
    }

    /// Stops taking connections: the port closes at once (new callers are
    /// refused, so they go elsewhere), while connections already accepted
    /// or in their handshake are still handed out by [`Self::accept`],
    /// which returns `None` once they are all out. A server draining for
    /// shutdown serves those instead of dropping them on callers that have
    /// already sent a request.
    pub fn stop_accepting(&mut self) {
        self.task.abort();
    }

    /// Resolves once the listening socket is closed: after
    /// [`Self::stop_accepting`] or a drop of the listener, the runtime
    /// drops the accept loop (and with it the socket) a moment later, not
    /// within the call. Awaiting this makes the port free for a new bind.
    pub fn socket_closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut alive = self.socket_alive.clone();
        async move { while alive.changed().await.is_ok() {} }
    }
}

async fn accept_loop(
    socket: Socket,
    acceptor: tokio_rustls::TlsAcceptor,
    config: InboundConfig,
    ready: mpsc::Sender<MeshConn>,
) {
    let config = Arc::new(config);
    let listener = &socket.listener;
    loop {
        let (tcp, peer_addr) = accept_with_backoff(listener).await;
        if ready.is_closed() {
            return;
        }
        let _ = tcp.set_nodelay(true);
        let (acceptor, config, ready) = (acceptor.clone(), config.clone(), ready.clone());
        tokio::spawn(async move {
            match admit(tcp, peer_addr, &acceptor, &config).await {
                Ok(conn) => {
                    let _ = ready.send(conn).await;
                }
                Err(e) => tracing::debug!(%peer_addr, "inbound connection refused: {e}"),
            }
        });
    }
}

/// Decides what a new connection is and prepares it for the application.
async fn admit(
    tcp: TcpStream,
    peer_addr: SocketAddr,
    acceptor: &tokio_rustls::TlsAcceptor,
    config: &InboundConfig,
) -> Result<MeshConn> {
    let tls = match config.mode {
        InboundMode::Strict => true,
        InboundMode::Disable => false,
        InboundMode::Permissive => {
            let mut first = [0u8; 2];
            let n = tokio::time::timeout(config.first_bytes_timeout, peek_some(&tcp, &mut first))
                .await
                .map_err(|_| Error::Tls("no bytes before the first-bytes deadline".into()))?
                .map_err(io("peeking the first bytes"))?;
            if n == 0 {
                return Err(Error::Tls("closed before sending anything".into()));
            }
            looks_like_tls(&first[..n])
        }
    };
    if !tls {
        return Ok(MeshConn {
            stream: MeshStream::Plain(tcp),
            peer_addr,
            peer_id: None,
            alpn: None,
        });
    }
    let stream = tokio::time::timeout(config.handshake_timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| Error::Tls("handshake deadline passed".into()))?
        .map_err(|e| Error::Tls(format!("handshake: {e}")))?;
    let (_, session) = stream.get_ref();
    let peer_id = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| nasp_identity::cert::spiffe_id_of(c).ok());
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    Ok(MeshConn {
        stream: MeshStream::Tls(Box::new(stream)),
        peer_addr,
        peer_id,
        alpn,
    })
}

/// Peeks at what has arrived (at least one byte, or 0 at end of stream).
/// A TLS client sends its whole hello record at once; a single byte is
/// judged alone (0x16 is taken for TLS, whose handshake will then decide).
async fn peek_some(tcp: &TcpStream, buf: &mut [u8; 2]) -> std::io::Result<usize> {
    tcp.peek(buf).await
}

impl AsyncRead for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MeshStream::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
            MeshStream::Plain(t) => Pin::new(t).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MeshStream::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
            MeshStream::Plain(t) => Pin::new(t).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MeshStream::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
            MeshStream::Plain(t) => Pin::new(t).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MeshStream::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
            MeshStream::Plain(t) => Pin::new(t).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_is_told_from_plaintext_by_its_record_header() {
        // A ClientHello record header (TLS 1.0 record version, as rustls,
        // OpenSSL and curl send it).
        assert!(looks_like_tls(&[0x16, 0x03, 0x01]));
        assert!(looks_like_tls(&[0x16]));
        for plain in [
            &b"GET / HTTP/1.1"[..],
            b"PRI * HTTP/2.0",
            b"\x16\x00",
            b"\x00",
            b"",
        ] {
            assert!(!looks_like_tls(plain), "{plain:?}");
        }
    }

    /// Every input the sniffer can see (it peeks at most two bytes), so no
    /// fuzzing is needed: TLS exactly when a handshake record of a 3.x
    /// version starts, or a lone 0x16 has arrived.
    #[test]
    fn every_possible_peek_is_classified_as_specified() {
        assert!(!looks_like_tls(&[]));
        for a in 0..=255u8 {
            assert_eq!(looks_like_tls(&[a]), a == 0x16, "{a:#x}");
            for b in 0..=255u8 {
                assert_eq!(
                    looks_like_tls(&[a, b]),
                    a == 0x16 && b == 0x03,
                    "{a:#x} {b:#x}"
                );
            }
        }
    }
}
