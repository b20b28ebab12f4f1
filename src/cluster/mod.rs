//! Many snapgate nodes serving one set of apps: which node an app's cold
//! starts belong to ([`placement`]). Not used yet: the cluster mode that
//! routes by it is still to be built.

pub mod placement;
