//! vshm: named shared-memory sections between virtual machines.
//!
//! A peer (a QEMU guest, or a host process) maps a vshm region through a [`Transport`] and
//! uses a [`Namespace`] to create, open, grow, delete and close named [`Section`]s, and the
//! other kinds of object that share the namespace: [`Event`]s and robust [`Mutex`]es.
//! Inside a section, blocks ([`blocks`]) and lock-free SPSC byte rings ([`Ring`]).
//! Opening an existing object and closing a handle touch only shared memory (no host round
//! trip); create, delete and grow are requests to the host backend, which arbitrates them.
//!
//! The crate is `no_std` without its default `std` feature: the namespace logic runs in a
//! kernel driver or an RTOS given a [`Transport`]. With `std` it adds [`host::HostTransport`]
//! (a host process speaking the ivshmem client protocol to vshmd); with `vhost-user` (not
//! default) also `host::vhost_user::VhostUserTransport`, a host process as its own
//! frontend and driver of the vshm virtio device (a [`DeviceTransport`]).
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]

mod audit;
pub mod blocks;
mod device;
mod error;
mod event;
mod handle;
mod mutex;
mod namespace;
mod over_device;
pub mod ring;
mod transport;

#[cfg(all(feature = "std", target_os = "linux"))]
pub mod driver;
#[cfg(feature = "std")]
pub mod host;
#[cfg(feature = "std")]
mod os;
#[cfg(all(feature = "std", target_os = "linux"))]
pub mod pci;

pub use device::{Device, DeviceTransport, ObjectNews};
pub use error::Error;
pub use event::{Event, EventOptions};
pub use mutex::{Acquired, Mutex};
pub use namespace::{CreateOptions, Disposition, Namespace, Section};
pub use ring::{Consumer, Producer, Ring, RingError};
#[cfg(feature = "std")]
pub use transport::RingHook;
pub use transport::{HoldChange, HookContext, PeerPlace, Transport, TransportError};
pub use vshm_format as format;
pub use vshm_format::object::{ObjectHead, ObjectInfo, PeerInfo};
pub use vshm_format::Status;
