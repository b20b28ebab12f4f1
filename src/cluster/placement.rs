//! Which node is an app's home, and which nodes come next: rendezvous
//! hashing, also called highest random weight (Thaler and Ravishankar, "A
//! Name-Based Mapping Scheme for Rendezvous", 1996). Each node gets a
//! score for the app from one hash of the pair; the app's nodes, in order,
//! are the nodes by descending score, the first being its home.
//!
//! Every node computes the same order from the same set of live node
//! names, with nothing to agree on beforehand; a node that joins or leaves
//! moves only the apps whose first choice it becomes or was (about one in
//! as many as there are nodes), and the rest keep their home, where their
//! snapshots and code caches are warm. The hash is XXH3-64 (xxHash's
//! specification), fixed for every build: nodes of different versions
//! must agree.

/// The score of `node` for `app`: XXH3-64 of the app's length (8 bytes,
/// little-endian), the app and the node, so that no two (app, node) pairs
/// hash the same input.
pub fn score(app: &str, node: &str) -> u64 {
    let mut input = Vec::with_capacity(8 + app.len() + node.len());
    input.extend_from_slice(&(app.len() as u64).to_le_bytes());
    input.extend_from_slice(app.as_bytes());
    input.extend_from_slice(node.as_bytes());
    xxhash_rust::xxh3::xxh3_64(&input)
}

/// `nodes` in `app`'s order: its home first, then where it spills over
/// to, by descending [`score`] (equal scores, by name). Duplicate names
/// count once.
pub fn order<'a>(app: &str, nodes: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut scored: Vec<(u64, &str)> = nodes.into_iter().map(|n| (score(app, n), n)).collect();
    scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().map(|(_, n)| n).collect()
}

/// `app`'s home among `nodes`; `None` if there is none.
pub fn home<'a>(app: &str, nodes: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    nodes
        .into_iter()
        .map(|n| (score(app, n), n))
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(a.1)))
        .map(|(_, n)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apps(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("app-{i}")).collect()
    }

    #[test]
    fn every_node_computes_the_same_order_whatever_order_it_lists_nodes_in() {
        let a = order("shop", ["node-a", "node-b", "node-c", "node-d"]);
        let b = order("shop", ["node-d", "node-b", "node-a", "node-c", "node-a"]);
        assert_eq!(a, b);
        assert_eq!(a.len(), 4, "each node once: {a:?}");
        assert_eq!(
            home("shop", ["node-c", "node-a", "node-d", "node-b"]),
            Some(a[0])
        );
        assert_eq!(order("shop", []), Vec::<&str>::new());
        assert_eq!(home("shop", []), None);
    }

    #[test]
    fn a_node_that_leaves_moves_only_the_apps_it_was_home_to() {
        let all = ["n1", "n2", "n3", "n4", "n5"];
        let left = ["n1", "n2", "n4", "n5"];
        let mut moved = 0;
        for app in apps(2000) {
            let before = home(&app, all).unwrap();
            let after = home(&app, left).unwrap();
            if before == "n3" {
                moved += 1;
                // It spills to the next node in its old order.
                assert_eq!(after, order(&app, all)[1], "{app}");
            } else {
                assert_eq!(before, after, "{app} moved though its home stayed");
            }
        }
        assert!((300..=500).contains(&moved), "{moved} of 2000 were n3's");
    }

    #[test]
    fn a_node_that_joins_takes_apps_only_for_itself() {
        let before = ["n1", "n2", "n3"];
        let after = ["n1", "n2", "n3", "n4"];
        let mut taken = 0;
        for app in apps(2000) {
            let (b, a) = (home(&app, before).unwrap(), home(&app, after).unwrap());
            if a != b {
                assert_eq!(a, "n4", "{app} moved from {b} to {a}");
                taken += 1;
            }
        }
        assert!((400..=600).contains(&taken), "n4 took {taken} of 2000");
    }

    #[test]
    fn homes_spread_evenly_over_the_nodes() {
        let nodes = ["alpha", "beta", "gamma"];
        let mut counts = [0usize; 3];
        for app in apps(3000) {
            let h = home(&app, nodes).unwrap();
            counts[nodes.iter().position(|n| *n == h).unwrap()] += 1;
        }
        for c in counts {
            assert!((850..=1150).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn app_and_node_names_never_run_together() {
        // Without the length, ("ab", "c") and ("a", "bc") would hash
        // the same bytes.
        assert_ne!(score("ab", "c"), score("a", "bc"));
    }

    /// The scores are part of the protocol between nodes: a change here
    /// would make nodes of two builds disagree on every app's home.
    #[test]
    fn scores_are_xxh3_of_the_length_the_app_and_the_node() {
        let mut input = 5u64.to_le_bytes().to_vec();
        input.extend_from_slice(b"hellonode-a");
        assert_eq!(score("hello", "node-a"), xxhash_rust::xxh3::xxh3_64(&input));
        assert_eq!(score("hello", "node-a"), 0x6096_1d91_b020_6df6);
        // XXH3-64 of the empty input, from xxHash's specification.
        assert_eq!(xxhash_rust::xxh3::xxh3_64(b""), 0x2D06_8005_38D3_94C2);
    }
}
