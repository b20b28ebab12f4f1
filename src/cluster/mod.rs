//! Many snapgate nodes serving one set of apps: which node an app's cold
//! starts belong to ([`placement`]).

pub mod placement;
