//! The catalog: what every node holds, as each node wrote it to etcd
//! (`<prefix>nodes/<node>`, a JSON [`NodeEntry`] under the node's lease),
//! and the routing plan a node makes from it for a request ([`plan`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::placement;

/// One node's catalog entry: the value of `<prefix>nodes/<node>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    /// The node's name (`cluster.node`), also the key's last segment.
    pub node: String,
    /// Where peers reach it (`cluster.advertise`).
    pub address: SocketAddr,
    /// When this run of the node started, Unix milliseconds: with
    /// `version`, orders its entries across restarts.
    #[serde(default)]
    pub epoch: u64,
    /// Counts the entries this run wrote, from 1.
    #[serde(default)]
    pub version: u64,
    /// Its VM and runtime apps' pools, by app name.
    #[serde(default)]
    pub apps: BTreeMap<String, AppLoad>,
}

/// One app's pool on one node, as its entry was written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppLoad {
    /// Instances free to lease (neither leased nor draining).
    pub warm: u32,
    /// Instances serving at least one lease.
    pub leased: u32,
    /// Instances that would take one more request now (free ones, and
    /// leased ones under `max_concurrency`): what a peer's warm hit looks
    /// for. Absent in an entry: 0.
    #[serde(default)]
    pub open: u32,
    /// Restores in flight.
    pub restoring: u32,
    /// Requests held for an instance.
    pub queued: u32,
    /// Its `max_instances`: the most it may hold.
    pub max: u32,
}

/// A node as the catalog has it: its entry and the etcd revision that
/// wrote it (a new revision is news of the node: see the peer skip rule in
/// the module doc of `crate::cluster`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Known {
    /// The entry.
    pub entry: NodeEntry,
    /// The key's `mod_revision`.
    pub revision: i64,
}

/// Every node's entry, by node name: one consistent read of etcd and the
/// watch events after it.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    /// The nodes, by name.
    pub nodes: BTreeMap<Arc<str>, Known>,
    /// The etcd revision it is current to (0: never read).
    pub revision: i64,
}

/// Why a request goes to a peer: the `reason` label of
/// `snapgate_cluster_forwarded_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The peer has a free warm instance of the app (a cluster-wide warm
    /// hit).
    Warm,
    /// The peer is the app's home node: its cold starts happen there.
    Home,
    /// The nodes before it in the app's order refused (503) or did not
    /// answer.
    Spillover,
}

impl Reason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Warm => "warm",
            Reason::Home => "home",
            Reason::Spillover => "spillover",
        }
    }
}

/// One place a request may go, in a [`plan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hop {
    /// This node's own pool (held there while no instance is free).
    Local,
    /// A peer, forwarded to with the hop marker.
    Peer {
        /// Its name.
        node: Arc<str>,
        /// Where it is reached.
        address: SocketAddr,
        /// Why it was chosen.
        reason: Reason,
    },
}

/// Where a request for `app` goes, in order, when this node (`me`) has no
/// free instance of it: each next place is tried when the one before it
/// could not be reached, or refused with 503 before any of the request's
/// body was sent (`crate::cluster`, routing steps 2 to 4).
///
/// 1. Peers with a warm instance of the app that would take the request
///    ([`AppLoad::open`]), most such instances first (ties in the app's
///    placement order).
/// 2. The live nodes that have the app (this one, and every peer whose
///    entry lists it and `skip` does not rule out) in the app's rendezvous
///    order ([`placement::order`]): the first is its home; this node is
///    [`Hop::Local`]. A node whose config lacks the app (a rollout under
///    way) neither takes its requests nor its place in the order.
///
/// A node appears once, at its first place. The plan always holds
/// [`Hop::Local`], so a request is never left with nowhere to go.
pub fn plan(
    catalog: &Catalog,
    me: &str,
    app: &str,
    skip: impl Fn(&str, &Known) -> bool,
) -> Vec<Hop> {
    let live: Vec<(&Arc<str>, &Known)> = catalog
        .nodes
        .iter()
        .filter(|(name, known)| {
            &***name != me && known.entry.apps.contains_key(app) && !skip(name, known)
        })
        .collect();
    let mut names: Vec<&str> = live.iter().map(|(n, _)| &***n).collect();
    names.push(me);
    let order = placement::order(app, names);
    let rank = |node: &str| order.iter().position(|n| *n == node).unwrap_or(usize::MAX);
    let mut warm: Vec<(u32, usize, &Arc<str>, &Known)> = live
        .iter()
        .filter_map(|(name, known)| {
            let free = known.entry.apps.get(app)?.open;
            (free > 0).then(|| (free, rank(name), *name, *known))
        })
        .collect();
    warm.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut hops: Vec<Hop> = warm
        .iter()
        .map(|(_, _, name, known)| Hop::Peer {
            node: (*name).clone(),
            address: known.entry.address,
            reason: Reason::Warm,
        })
        .collect();
    for (i, node) in order.iter().enumerate() {
        if *node == me {
            hops.push(Hop::Local);
            continue;
        }
        if warm.iter().any(|(_, _, n, _)| &***n == *node) {
            continue;
        }
        let Some((name, known)) = live.iter().find(|(n, _)| &***n == *node) else {
            continue;
        };
        hops.push(Hop::Peer {
            node: (*name).clone(),
            address: known.entry.address,
            reason: if i == 0 {
                Reason::Home
            } else {
                Reason::Spillover
            },
        });
    }
    hops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, port: u16, apps: &[(&str, u32)]) -> (Arc<str>, Known) {
        let entry = NodeEntry {
            node: name.into(),
            address: SocketAddr::from(([10, 0, 0, 1], port)),
            epoch: 1,
            version: 1,
            apps: apps
                .iter()
                .map(|(a, warm)| {
                    (
                        a.to_string(),
                        AppLoad {
                            warm: *warm,
                            open: *warm,
                            max: 4,
                            ..Default::default()
                        },
                    )
                })
                .collect(),
        };
        (name.into(), Known { entry, revision: 1 })
    }

    fn catalog(nodes: Vec<(Arc<str>, Known)>) -> Catalog {
        Catalog {
            nodes: nodes.into_iter().collect(),
            revision: 1,
        }
    }

    fn names(hops: &[Hop]) -> Vec<String> {
        hops.iter()
            .map(|h| match h {
                Hop::Local => "local".into(),
                Hop::Peer { node, reason, .. } => format!("{node}:{}", reason.as_str()),
            })
            .collect()
    }

    #[test]
    fn an_app_at_zero_everywhere_goes_home_then_down_its_order() {
        let c = catalog(vec![
            node("a", 1, &[("hello", 0)]),
            node("b", 2, &[("hello", 0)]),
            node("c", 3, &[("hello", 0)]),
        ]);
        let order = placement::order("hello", ["a", "b", "c"]);
        for me in ["a", "b", "c"] {
            let hops = plan(&c, me, "hello", |_, _| false);
            let expected: Vec<String> = order
                .iter()
                .enumerate()
                .map(|(i, n)| match (*n == me, i) {
                    (true, _) => "local".into(),
                    (false, 0) => format!("{n}:home"),
                    (false, _) => format!("{n}:spillover"),
                })
                .collect();
            assert_eq!(names(&hops), expected, "from {me}");
        }
    }

    #[test]
    fn warm_peers_come_first_most_free_first_and_once() {
        let c = catalog(vec![
            node("a", 1, &[("hello", 0)]),
            node("b", 2, &[("hello", 1)]),
            node("c", 3, &[("hello", 3), ("other", 1)]),
        ]);
        let hops = plan(&c, "a", "hello", |_, _| false);
        assert_eq!(names(&hops)[..2], ["c:warm", "b:warm"]);
        assert_eq!(hops.len(), 3, "{:?}", names(&hops));
        assert!(hops.contains(&Hop::Local));
    }

    #[test]
    fn a_skipped_peer_is_neither_warm_nor_in_the_order() {
        let c = catalog(vec![
            node("a", 1, &[]),
            node("b", 2, &[("hello", 2)]),
            node("c", 3, &[("hello", 0)]),
        ]);
        let hops = plan(&c, "a", "hello", |n, _| n == "b");
        let order = placement::order("hello", ["a", "c"]);
        assert_eq!(hops.len(), 2);
        assert_eq!(hops[0] == Hop::Local, order[0] == "a", "{:?}", names(&hops));
        assert!(!names(&hops).iter().any(|h| h.starts_with("b:")));
    }

    #[test]
    fn a_node_alone_or_absent_from_the_catalog_serves_locally() {
        assert_eq!(
            plan(&Catalog::default(), "a", "hello", |_, _| false),
            [Hop::Local]
        );
        let c = catalog(vec![node("b", 2, &[("hello", 0)])]);
        let hops = plan(&c, "a", "hello", |_, _| false);
        assert_eq!(hops.len(), 2);
        assert!(hops.contains(&Hop::Local));
    }

    #[test]
    fn a_node_without_the_app_is_not_in_its_plan() {
        let c = catalog(vec![
            node("b", 2, &[("other", 1)]),
            node("c", 3, &[("hello", 0)]),
        ]);
        let hops = plan(&c, "a", "hello", |_, _| false);
        assert!(
            !names(&hops).iter().any(|h| h.starts_with("b:")),
            "{:?}",
            names(&hops)
        );
        assert_eq!(hops.len(), 2);
    }

    #[test]
    fn an_entry_round_trips_through_its_json() {
        let (_, known) = node("b", 2, &[("hello", 2)]);
        let text = serde_json::to_string(&known.entry).unwrap();
        assert_eq!(
            serde_json::from_str::<NodeEntry>(&text).unwrap(),
            known.entry
        );
    }
}
