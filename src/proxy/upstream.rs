//! HTTP clients to upstreams, with kept-alive connections.
//!
//! Every VM of a snapshot has the same address, so a client is made per VM
//! instance, its connector bound to that VM's tap (`SO_BINDTODEVICE`): its
//! connection pool then only ever holds connections to that one VM. Static
//! upstreams share one plain client.

use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// A client that forwards a server request (body streamed as it arrives).
pub type UpstreamClient = Client<HttpConnector, Incoming>;

/// How long an idle kept-alive upstream connection is kept.
const IDLE_CONNECTION: Duration = Duration::from_secs(30);
/// Connect timeout: upstreams are local (a tap or a nearby host).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client whose connections go out through `interface`, or through the
/// routing table when `None`.
pub fn client(interface: Option<&str>) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    if let Some(interface) = interface {
        connector.set_interface(interface);
    }
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(IDLE_CONNECTION)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// The clients of one pool's instances, one per instance (its connector
/// bound to the instance's tap), made on an instance's first lease. The
/// proxy owns them; a lease only names its instance.
#[derive(Default)]
pub struct InstanceClients {
    clients: dashmap::DashMap<String, UpstreamClient>,
}

impl InstanceClients {
    /// The client of the instance `lease` names. Making a new one also
    /// drops the clients of instances `pool` no longer has.
    pub fn for_lease(
        &self,
        pool: &crate::pool::Pool,
        lease: &crate::pool::Lease,
    ) -> UpstreamClient {
        if let Some(client) = self.clients.get(lease.instance()) {
            return client.clone();
        }
        let made = client(Some(&lease.address().tap));
        self.clients
            .insert(lease.instance().to_owned(), made.clone());
        let live = pool.instance_names();
        self.clients.retain(|name, _| live.contains(name));
        made
    }
}
