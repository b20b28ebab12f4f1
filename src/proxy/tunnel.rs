//! Upgraded connections (WebSocket and any other HTTP/1.1 `Upgrade`, RFC
//! 9110 section 7.8): bytes both ways between the client and the instance.
//!
//! Protocol:
//! 1. A request that asks to upgrade (`Upgrade`, and `upgrade` in
//!    `Connection`) is forwarded with both fields. The app's `101
//!    Switching Protocols` goes to the client with its `Upgrade` and
//!    `Connection`; any other answer is an ordinary response. An HTTP/2
//!    extended `CONNECT` for `websocket` (RFC 8441) goes to the app as an
//!    HTTP/1.1 WebSocket handshake (`GET`, `Upgrade: websocket`, a fresh
//!    `Sec-WebSocket-Key`); the app's 101 reaches the client as `200`
//!    without `Sec-WebSocket-Accept`, and a 2xx that is no 101 as a 502
//!    (the client would take it for an open tunnel). Other `:protocol`
//!    values get 501.
//! 2. After the 101, a task on the gateway's tracker waits for both sides
//!    to hand over their connections, then copies bytes both ways. It
//!    holds the request's lease all along: the instance counts the
//!    connection as in flight, so its pool never reaps it while open.
//!    The connection shows in `snapgate_upgraded_connections{app}`.
//! 3. The tunnel ends when either side closes (what it sent is written
//!    on, then the other side is shut down, and both connections close),
//!    when no byte has moved either way for the app's
//!    `upstream_read_timeout`, or at shutdown once the grace period is over
//!    ([`super::Apps::end_tunnels`]: it waits for open tunnels until then,
//!    and ends the rest before pools close); its lease ends
//!    with it, and so does its hold on the client connection's slot. A
//!    tunnel in an HTTP/2 stream keeps its connection open through a
//!    graceful drain until it ends or the grace period does.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tracing::debug;

/// Step 2 and 3: waits for both upgrades, then copies until one side
/// closes, `idle` passes with no byte moved, or `cancel` fires. Holds
/// `held` (the lease and the metrics guard) until then.
pub async fn run<H: Send>(
    client: OnUpgrade,
    upstream: OnUpgrade,
    idle: Duration,
    cancel: tokio_util::sync::CancellationToken,
    held: H,
) {
    let both = async { tokio::join!(client, upstream) };
    let (client, upstream) = tokio::select! {
        both = both => match both {
            (Ok(c), Ok(u)) => (c, u),
            (c, u) => {
                debug!(client = ?c.err(), upstream = ?u.err(), "upgrade not completed");
                return;
            }
        },
        () = cancel.cancelled() => return,
    };
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let client = Active::new(TokioIo::new(client), start, last.clone());
    let upstream = Active::new(TokioIo::new(upstream), start, last.clone());
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut upstream_rx, mut upstream_tx) = tokio::io::split(upstream);
    // Each direction copies until its reader's end, then shuts the other
    // side's writer down. The first to end ends the tunnel (step 3), as
    // nginx ends an upgraded connection: a client that keeps its side
    // open after the app closed (a WebSocket client waits for the
    // server's close) no longer holds the instance until `idle`. The
    // bytes one side sent before its end are all written first.
    let up = async {
        let copied = tokio::io::copy(&mut client_rx, &mut upstream_tx).await;
        let _ = upstream_tx.shutdown().await;
        ("client", copied)
    };
    let down = async {
        let copied = tokio::io::copy(&mut upstream_rx, &mut client_tx).await;
        let _ = client_tx.shutdown().await;
        ("app", copied)
    };
    tokio::select! {
        (side, copied) = up => ended(side, copied),
        (side, copied) = down => ended(side, copied),
        () = quiet_for(idle, start, &last) => debug!(?idle, "tunnel idle: closed"),
        () = cancel.cancelled() => {}
    }
    drop(held);
}

/// Logs how the tunnel ended: `side` closed, after copying, or failed.
fn ended(side: &str, copied: io::Result<u64>) {
    match copied {
        Ok(bytes) => debug!(side, bytes, "tunnel closed"),
        Err(e) => debug!(side, "tunnel ended: {e}"),
    }
}

/// Resolves once no byte has moved for `idle` (step 3).
async fn quiet_for(idle: Duration, start: Instant, last: &AtomicU64) {
    loop {
        let moved = start + Duration::from_millis(last.load(Ordering::Relaxed));
        let deadline = moved + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// An IO that notes when bytes last moved through it, in milliseconds
/// since `start` (tokio's copy has no activity hook, hence this wrapper).
struct Active<T> {
    inner: T,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<T> Active<T> {
    fn new(inner: T, start: Instant, last: Arc<AtomicU64>) -> Self {
        Active { inner, start, last }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn quiet_for_waits_from_the_last_byte() {
        let start = Instant::now();
        let last = AtomicU64::new(0);
        tokio::time::advance(Duration::from_secs(3)).await;
        last.store(3000, Ordering::Relaxed);
        let waited = Instant::now();
        quiet_for(Duration::from_secs(5), start, &last).await;
        assert_eq!(waited.elapsed(), Duration::from_secs(5));
    }
}
