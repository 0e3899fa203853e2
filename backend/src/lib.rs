//! vshmd's building blocks: the region (memfd + vm-memory), the heap's space map, the
//! namespace arbiter, the ivshmem server, the control socket and the event loop.
#![warn(missing_docs)]

pub mod arbiter;
pub mod config;
pub mod daemon;
pub mod handoff;
pub mod heap;
pub mod metrics;
pub mod policy;
pub mod region;
pub mod server;
pub mod telemetry;
