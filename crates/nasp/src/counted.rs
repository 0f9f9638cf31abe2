//! A request body that counts the data bytes it passes, shared by the
//! access log and tracing (both report the request's size once the
//! response is done).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use http_body::Frame;
use nasp_transport::{Body, BoxError};

/// `req` with its body counted: the counter grows as the inner service
/// reads the body.
pub(crate) fn count_request(req: Request<Body>) -> (Request<Body>, Arc<AtomicU64>) {
    let bytes = Arc::new(AtomicU64::new(0));
    let counter = bytes.clone();
    let req = req.map(|inner| Body::new(Counted { inner, bytes }));
    (req, counter)
}

struct Counted {
    inner: Body,
    bytes: Arc<AtomicU64>,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r
            && let Some(d) = f.data_ref()
        {
            self.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
