//! The vshm shared-region format.
//!
//! Everything two parties must agree on to share a vshm region lives here, with no
//! dependency on sockets, PCI or an operating system (`no_std`): the byte-exact layout
//! ([`layout`]), NTSTATUS codes ([`Status`]), name rules ([`name`]), checked volatile access
//! ([`shm`]), object-table snapshots ([`object`]), the name index ([`index`]), the peer table ([`peer`]), the lock-free open/close protocol
//! ([`lease`]), the request mailboxes ([`mailbox`]), revocation and quarantine ([`revoke`]), the block allocator inside a section
//! ([`blocks`]), the SPSC byte ring inside a section ([`ring`]) and the numbers of the vshm virtio device ([`virtio`]). docs/FORMAT.md is the prose spec.
#![cfg_attr(not(any(feature = "std", test)), no_std)]
#![warn(missing_docs)]

pub mod blocks;
pub mod ids;
pub mod index;
pub mod layout;
pub mod lease;
pub mod mailbox;
pub mod name;
pub mod object;
pub mod peer;
pub mod revoke;
pub mod ring;
pub mod shm;
mod status;
pub mod sync;
#[cfg(test)]
mod sync_attacks;
pub mod units;
#[cfg(feature = "std")]
pub mod version;
pub mod virtio;

pub use ids::{Generation, ObjectSlot, PeerId, PeerSlot, RegionOffset};
pub use name::{name_hash, validate_name, NameError};
pub use status::Status;
