//! A response body that holds the lease of the instance producing it.
//!
//! The lease ends when the body has been streamed to its end or dropped (the
//! client went away), never earlier: a streaming response keeps its instance
//! leased, so the reaper cannot cut it, and the idle clock starts at the
//! real completion.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::pool::Lease;

/// An upstream body and, for VM apps, the lease behind it.
pub struct LeasedBody {
    inner: Incoming,
    lease: Option<Lease>,
}

impl LeasedBody {
    /// Wraps `inner`, releasing `lease` at its end.
    pub fn new(inner: Incoming, lease: Option<Lease>) -> LeasedBody {
        LeasedBody { inner, lease }
    }
}

impl Body for LeasedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.lease = None,
            Poll::Ready(Some(Err(_))) => {
                // The instance broke off mid-body.
                if let Some(mut lease) = self.lease.take() {
                    lease.mark_broken();
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
