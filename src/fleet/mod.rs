//! The fleet: Argo CD Applications and AppProjects as the fleet repository holds them
//! ([`argo`]), read into apps and projects. Which apps this node runs is decided by their
//! node selectors (`model::selector`) against the node's labels (`model::node`).

pub(crate) mod appset;
pub(crate) mod argo;
pub mod upstream;
