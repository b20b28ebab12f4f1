//! A response body that holds the lease of the instance producing it.
//!
//! The lease ends when the body has been streamed to its end or dropped (the
//! client went away), never earlier: a streaming response keeps its instance
//! leased, so the reaper cannot cut it, and the idle clock starts at the
//! real completion.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::BoxError;
use crate::pool::Lease;

/// An upstream body and, for VM apps, the lease behind it.
pub struct LeasedBody {
    inner: Incoming,
    lease: Option<Lease>,
    /// Fires if the instance's VMM dies mid-body.
    gone: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl LeasedBody {
    /// Wraps `inner`, releasing `lease` at its end.
    pub fn new(inner: Incoming, lease: Option<Lease>) -> LeasedBody {
        let gone = lease
            .as_ref()
            .map(|l| Box::pin(l.gone().clone().cancelled_owned()));
        LeasedBody { inner, lease, gone }
    }

    fn broken(&mut self) {
        if let Some(mut lease) = self.lease.take() {
            lease.mark_broken();
        }
        self.gone = None;
    }
}

impl Body for LeasedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(gone) = self.gone.as_mut() {
            if gone.as_mut().poll(cx).is_ready() {
                self.broken();
                let vm_gone = std::io::Error::other("the instance's VMM exited mid-response");
                return Poll::Ready(Some(Err(vm_gone.into())));
            }
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self.lease = None;
                self.gone = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                // The instance broke off mid-body.
                self.broken();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
