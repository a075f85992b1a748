//! cistern: an on-premises, verified, collapsing cache and nested-gateway proxy for OTA device updates.
//!
//! Modules, each owning its state; data flows one way: `server` -> `fetch` -> `store`, and `fetch` ->
//! upstream. `ops` only reads what the others expose.

pub mod config;
pub mod store;
