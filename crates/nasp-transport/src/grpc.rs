//! gRPC on mesh listeners: tonic services served by [`serve_http`], and the
//! echo service that `nasp serve` answers with, as Istio's test echo app.
//!
//! A tonic service is an ordinary HTTP/2 service, so it runs on the same
//! path as any other: [`serve_grpc`] adapts tonic's [`Routes`] (one or
//! more generated servers) to hyper and hands it to [`serve_http`], which
//! gives every request the verified [`MeshPeer`]. A tonic handler reads it
//! from `tonic::Request::extensions()` (see [`peer_id`]).
//!
//! Invariants: nothing here decides who may call — the listener's mode
//! (STRICT, PERMISSIVE, DISABLE) and its trust domain did that before a
//! request exists; a handler only reads the peer. The echo service never
//! trusts what the caller says about itself: `peer` is the identity the TLS
//! handshake verified, never a header.

use std::collections::HashMap;
use std::pin::Pin;

use hyper_util::service::TowerToHyperService;
use nasp_proto::echo::echo_server::{Echo, EchoServer};
use nasp_proto::echo::{EchoRequest, EchoResponse};
use tokio_stream::Stream;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use crate::http::{MeshPeer, serve_http};
use crate::inbound::MeshListener;

/// Serves the gRPC services in `routes` on every connection `listener`
/// accepts, until the listener stops: HTTP/2 over mTLS or plaintext as the
/// listener's mode allows, each request carrying the verified [`MeshPeer`].
///
/// ```no_run
/// # async fn run(listener: nasp_transport::MeshListener) {
/// use nasp_transport::grpc::{EchoService, serve_grpc};
/// let echo = EchoService::new("spiffe://cluster.local/ns/demo/sa/echo", "127.0.0.1:8080");
/// serve_grpc(listener, tonic::service::Routes::new(echo.into_server())).await;
/// # }
/// ```
pub async fn serve_grpc(listener: MeshListener, routes: Routes) {
    serve_http(listener, TowerToHyperService::new(routes)).await;
}

/// The caller's verified SPIFFE id, when the call came over mesh mTLS.
pub fn peer_id<T>(request: &Request<T>) -> Option<String> {
    request
        .extensions()
        .get::<MeshPeer>()
        .and_then(|p| p.id.as_ref())
        .map(ToString::to_string)
}

/// The most answers one `EchoStream` call may ask for; more is refused
/// with `INVALID_ARGUMENT` rather than streamed for hours.
pub const MAX_STREAM_COUNT: u32 = 10_000;

/// The echo service (`nasp.echo.v1.Echo`): each answer carries the
/// request's message, this server's identity and address, the caller's
/// verified SPIFFE id (empty on plaintext) and the request metadata.
#[derive(Clone, Debug)]
pub struct EchoService {
    /// This server's SPIFFE id or service name, returned as `served_by`.
    pub served_by: String,
    /// The address this server listens on, returned as `endpoint`.
    pub endpoint: String,
}

impl EchoService {
    /// An echo service that answers as `served_by`, listening on `endpoint`.
    pub fn new(served_by: impl Into<String>, endpoint: impl Into<String>) -> Self {
        Self {
            served_by: served_by.into(),
            endpoint: endpoint.into(),
        }
    }

    /// The tonic server for this service, to add to [`Routes`].
    pub fn into_server(self) -> EchoServer<Self> {
        EchoServer::new(self)
    }

    /// The answer to `request`, with index 0.
    fn answer(&self, request: &Request<EchoRequest>) -> EchoResponse {
        EchoResponse {
            message: request.get_ref().message.clone(),
            served_by: self.served_by.clone(),
            endpoint: self.endpoint.clone(),
            peer: peer_id(request).unwrap_or_default(),
            metadata: metadata_of(request.metadata()),
            index: 0,
        }
    }
}

/// The request metadata as text: binary (`-bin`) values as they came on
/// the wire (base64), repeated keys joined with `,` as HTTP joins them.
fn metadata_of(metadata: &tonic::metadata::MetadataMap) -> HashMap<String, String> {
    let headers = metadata.clone().into_headers();
    let mut out: HashMap<String, String> = HashMap::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        out.entry(name.as_str().to_string())
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    out
}

/// The response stream of `EchoStream`.
pub type EchoStream = Pin<Box<dyn Stream<Item = Result<EchoResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        Ok(Response::new(self.answer(&request)))
    }

    type EchoStreamStream = EchoStream;

    async fn echo_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Self::EchoStreamStream>, Status> {
        let count = request.get_ref().count.max(1);
        if count > MAX_STREAM_COUNT {
            return Err(Status::invalid_argument(format!(
                "count {count} is over the limit of {MAX_STREAM_COUNT}"
            )));
        }
        let first = self.answer(&request);
        let answers = (0..count).map(move |index| {
            Ok(EchoResponse {
                index,
                ..first.clone()
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(answers))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_joins_repeated_keys_and_keeps_binary_values_encoded() {
        let mut m = tonic::metadata::MetadataMap::new();
        m.append("x-a", "1".parse().expect("ascii"));
        m.append("x-a", "2".parse().expect("ascii"));
        m.append_bin(
            "x-b-bin",
            tonic::metadata::MetadataValue::from_bytes(b"\x00\x01"),
        );
        let out = metadata_of(&m);
        assert_eq!(out["x-a"], "1,2");
        assert_eq!(out["x-b-bin"], "AAE");
    }

    #[tokio::test]
    async fn a_plaintext_call_has_no_peer_and_a_stream_counts_from_zero() {
        use tokio_stream::StreamExt;
        let echo = EchoService::new("echo.demo", "127.0.0.1:1");
        let request = |count| {
            Request::new(EchoRequest {
                message: "hi".into(),
                count,
            })
        };
        let one = echo.echo(request(7)).await.expect("echo").into_inner();
        assert_eq!(
            (one.message.as_str(), one.peer.as_str(), one.index),
            ("hi", "", 0)
        );
        let stream = echo
            .echo_stream(request(3))
            .await
            .expect("stream")
            .into_inner();
        let got: Vec<u32> = stream.map(|r| r.expect("answer").index).collect().await;
        assert_eq!(got, vec![0, 1, 2]);
        let stream = echo
            .echo_stream(request(0))
            .await
            .expect("stream")
            .into_inner();
        assert_eq!(stream.collect::<Vec<_>>().await.len(), 1);
        let err = echo
            .echo_stream(request(MAX_STREAM_COUNT + 1))
            .await
            .err()
            .expect("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
