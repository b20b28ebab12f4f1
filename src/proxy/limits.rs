//! Caps on client connections: in all, and per client address.
//!
//! Protocol:
//! 1. The accept loop asks [`ConnectionSlots::take`] for a slot for each
//!    accepted connection: it counts the connection in the total and in its
//!    client's entry (a `DashMap` keyed by client, so connections from
//!    different clients do not contend on one lock). A client is an IPv4
//!    address or an IPv6 /64 (one host's usual share). A peer in
//!    `trusted_proxies` carries many clients and counts in the total only.
//! 2. Over either cap, no slot is taken and the connection gets a 503 with
//!    `Retry-After` and `Connection: close` ([`refuse`]), while fewer than
//!    [`MAX_REFUSING`] refusals are under way; beyond that, or on a TLS
//!    listener (where plain bytes would only break the handshake), it is
//!    closed at once (a flood must not hold a file descriptor per refusal).
//!    The counts and the refusal budget are one for all listeners.
//! 3. The [`Slot`] lives as long as the connection's task; dropping it
//!    uncounts the connection and removes the address's entry at zero.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Which cap a connection was over: the key under `limits`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Over {
    /// `max_connections`.
    Total,
    /// `max_connections_per_client`.
    PerClient,
}

impl Over {
    /// The `limits` key, also the `reason` label.
    pub fn key(self) -> &'static str {
        match self {
            Over::Total => "max_connections",
            Over::PerClient => "max_connections_per_client",
        }
    }
}

/// The connection counts, shared by every listener.
#[derive(Clone)]
pub struct ConnectionSlots {
    inner: Arc<Counts>,
    /// Refusals being written (protocol step 2).
    pub refusing: Arc<tokio::sync::Semaphore>,
}

struct Counts {
    total: AtomicUsize,
    per_client: DashMap<IpAddr, usize>,
    max_total: usize,
    max_per_client: usize,
}

/// A counted connection (protocol step 3).
pub struct Slot {
    counts: Arc<Counts>,
    /// Its client's key, if counted per client.
    client: Option<IpAddr>,
}

/// Refusals written at once, at most (protocol step 2).
pub const MAX_REFUSING: usize = 64;

/// The per-client key of `ip`: itself, or its /64 for IPv6.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

impl ConnectionSlots {
    /// Caps of `max_total` connections and `max_per_client` per address.
    pub fn new(max_total: usize, max_per_client: usize) -> Self {
        ConnectionSlots {
            refusing: Arc::new(tokio::sync::Semaphore::new(MAX_REFUSING)),
            inner: Arc::new(Counts {
                total: AtomicUsize::new(0),
                per_client: DashMap::new(),
                max_total,
                max_per_client,
            }),
        }
    }

    /// A slot for a connection from `ip` (counted per client unless
    /// `trusted`), or the cap it is over.
    pub fn take(&self, ip: IpAddr, trusted: bool) -> Result<Slot, Over> {
        let c = &self.inner;
        let total = c.total.fetch_add(1, Ordering::AcqRel);
        if total >= c.max_total {
            c.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Over::Total);
        }
        let mut slot = Slot {
            counts: c.clone(),
            client: None,
        };
        if trusted {
            return Ok(slot);
        }
        let key = client_key(ip);
        let mut entry = c.per_client.entry(key).or_insert(0);
        if *entry >= c.max_per_client {
            drop(entry);
            // Dropping the slot uncounts the total.
            drop(slot);
            return Err(Over::PerClient);
        }
        *entry += 1;
        slot.client = Some(key);
        Ok(slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counts.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(client) = self.client {
            self.counts.per_client.remove_if_mut(&client, |_, n| {
                *n -= 1;
                *n == 0
            });
        }
    }
}

/// How long a refused connection's request is read and discarded after
/// the answer, so closing does not reset the answer away.
const REFUSE_LINGER: Duration = Duration::from_secs(1);

/// Answers a connection over a cap with a 503 and closes it. Written by
/// hand, not through hyper: the connection gets no request parsing at all.
pub async fn refuse(mut stream: TcpStream, over: Over) {
    let body = format!("snapgate: too many connections ({})\n", over.key());
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSE_LINGER, async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_and_uncount() {
        let slots = ConnectionSlots::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = slots.take(a, false).unwrap();
        let _a2 = slots.take(a, false).unwrap();
        assert_eq!(slots.take(a, false).err(), Some(Over::PerClient));
        let _b1 = slots.take(b, false).unwrap();
        assert_eq!(slots.take(b, false).err(), Some(Over::Total));
        drop(a1);
        let _b2 = slots.take(b, false).expect("a freed slot is taken again");
        assert_eq!(slots.inner.total.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn an_address_with_no_connections_has_no_entry() {
        let slots = ConnectionSlots::new(10, 10);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        drop(slots.take(a, false).unwrap());
        assert!(slots.inner.per_client.is_empty());
        assert_eq!(slots.inner.total.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn an_ipv6_64_is_one_client_and_a_trusted_peer_counts_in_the_total_only() {
        let slots = ConnectionSlots::new(10, 1);
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _s = slots.take(one, false).unwrap();
        assert_eq!(slots.take(same_64, false).err(), Some(Over::PerClient));
        let _t = slots.take(other_64, false).unwrap();
        let lb: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<Slot> = (0..5).map(|_| slots.take(lb, true).unwrap()).collect();
        assert_eq!(held.len(), 5);
        assert_eq!(slots.inner.per_client.len(), 2);
    }
}
