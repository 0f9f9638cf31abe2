//! The one body type the transport hands out: what an application sends
//! and receives through the mesh, streamed frame by frame.
//!
//! [`Body`] boxes any `http_body::Body` with `Bytes` data, so the client,
//! the filter chain and served services agree on one type without
//! buffering anything. `Body::empty()`, `Body::from(bytes)` and
//! [`Body::new`] cover what applications build; hyper's `Incoming`, tonic's
//! body and axum's body all convert with [`Body::new`].

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use http_body_util::combinators::UnsyncBoxBody;

/// The error type of bodies and services in the transport.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streaming HTTP body.
pub struct Body(UnsyncBoxBody<Bytes, BoxError>);

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("size_hint", &http_body::Body::size_hint(&self.0))
            .finish()
    }
}

impl Default for Body {
    fn default() -> Self {
        Self::empty()
    }
}

impl Body {
    /// Boxes any body with `Bytes` data.
    pub fn new<B>(body: B) -> Self
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self(body.map_err(Into::into).boxed_unsync())
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::new(http_body_util::Empty::<Bytes>::new())
    }

    /// Reads the whole body (for small bodies: tests, tools, retries).
    pub async fn collect_bytes(self) -> Result<Bytes, BoxError> {
        Ok(self.0.collect().await?.to_bytes())
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Self {
        Self::new(http_body_util::Full::new(b))
    }
}

impl From<String> for Body {
    fn from(s: String) -> Self {
        Bytes::from(s).into()
    }
}

impl From<&'static str> for Body {
    fn from(s: &'static str) -> Self {
        Bytes::from_static(s.as_bytes()).into()
    }
}

impl From<Vec<u8>> for Body {
    fn from(v: Vec<u8>) -> Self {
        Bytes::from(v).into()
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}
