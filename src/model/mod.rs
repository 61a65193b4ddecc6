//! Small values every stage shares: globs, label selectors, repository URLs and their
//! redaction. A leaf: it imports nothing of the crate, so any stage may use it without an
//! edge back (docs/ARCHITECTURE.md).

pub mod glob;
pub mod selector;
pub mod url;
