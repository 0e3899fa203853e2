//! vshmd's building blocks: the region (memfd + vm-memory), the heap's space map, the
//! namespace arbiter, the ivshmem server, the control socket and the event loop; telling
//! systemd it is ready (`notify`) and logging to its journal (`logging`).
#![warn(missing_docs)]

pub mod arbiter;
pub mod config;
pub mod daemon;
pub mod fdstore;
pub mod handoff;
pub mod heap;
pub mod logging;
pub mod metrics;
pub mod name_area;
pub mod notify;
pub mod policy;
pub mod region;
pub mod server;
pub mod telemetry;
pub mod vhost_user;
