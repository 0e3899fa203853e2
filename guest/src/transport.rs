//! The transport seam: how a peer maps the region, rings the host and waits.
//!
//! Implementations: [`crate::host::HostTransport`] (a host process connected to vshmd's
//! ivshmem socket) and `crate::pci::PciTransport` (a Linux guest process over the ivshmem
//! PCI BARs, polling), and any [`crate::DeviceTransport`] wrapped in [`crate::Device`] (the
//! vshm virtio device: requests instead of a shared header). And
//! `crate::driver::DriverTransport`: a Linux guest process over the vshm kernel driver
//! (cacheable mapping, MSI-X interrupts as poll() readiness).

use core::time::Duration;

use vshm_format::shm::RawRegion;
use vshm_format::{Generation, ObjectSlot, PeerId, PeerSlot, RegionOffset};

/// What the library's audit of its holds (docs/FORMAT.md §11a) needs from the transport,
/// whichever thread runs it: the region, fencing a range off this process, and the
/// attributable acknowledgement.
pub trait HookContext {
    /// The mapped region.
    fn region(&self) -> RawRegion<'_>;
    /// As [`Transport::revoke`].
    fn revoke(&self, offset: RegionOffset, len: u64) -> bool;
    /// As [`Transport::acknowledge`].
    fn acknowledge(&self, seq: u64) -> bool;
}

/// Any transport is a [`HookContext`] for the threads that hold it.
impl<T: Transport + ?Sized> HookContext for T {
    fn region(&self) -> RawRegion<'_> {
        Transport::region(self)
    }
    fn revoke(&self, offset: RegionOffset, len: u64) -> bool {
        Transport::revoke(self, offset, len)
    }
    fn acknowledge(&self, seq: u64) -> bool {
        Transport::acknowledge(self, seq)
    }
}

/// Work a transport's own background thread runs after rings arrive (see
/// [`Transport::set_ring_hook`]); it returns when it wants to run again without a ring
/// (a suspect hold to look at again), if at all.
#[cfg(feature = "std")]
pub type RingHook = std::boxed::Box<dyn Fn(&dyn HookContext) -> Option<Duration> + Send + Sync>;

/// Why a transport operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportError {
    /// The backend went away (socket closed); the region stays mapped but nobody arbitrates.
    BackendGone,
    /// An OS error (errno).
    Os(i32),
    /// The peer id handed out is not usable with this region.
    BadPeerId(PeerId),
    /// This kind of transport has no such operation (a device peer has no doorbells).
    NotSupported,
}

impl core::fmt::Display for TransportError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            TransportError::BackendGone => write!(f, "the vshm backend is gone"),
            TransportError::Os(e) => write!(f, "transport OS error {e}"),
            TransportError::BadPeerId(id) => write!(f, "peer id {id} is not valid for this region"),
            TransportError::NotSupported => write!(f, "this transport has no such operation"),
        }
    }
}

/// Map + ring + wait.
pub trait Transport {
    /// The mapped region (the whole ivshmem shared memory), valid while `self` is borrowed.
    fn region(&self) -> RawRegion<'_>;
    /// This peer's ivshmem peer id (IVPosition).
    fn peer_id(&self) -> PeerId;
    /// Rings `peer`'s doorbell on `vector`.
    fn ring(&self, peer: PeerId, vector: u16) -> Result<(), TransportError>;
    /// Waits until `ready()` returns true or `timeout` passes; returns whether it became
    /// ready. `ready` is called again after every ring on any of this peer's vectors (it
    /// may do work, e.g. ask to be rung again), and may be called at any other time.
    /// Implementations choose how: block on an interrupt/eventfd, or spin briefly then back
    /// off (a guest without interrupts). Several threads may wait at once: a ring must not
    /// be consumed by one of them without the others re-checking.
    fn wait_until(
        &self,
        ready: &mut dyn FnMut() -> bool,
        timeout: Duration,
    ) -> Result<bool, TransportError>;

    /// A non-zero token naming this user of the peer for the request-mailbox lock. All
    /// processes of a guest share one peer, so a guest transport returns its pid; a host
    /// process is a peer of its own and can keep the default.
    fn lock_token(&self) -> u32 {
        1
    }

    /// Whether the holder of `token` can still release the mailbox lock (false only when it
    /// is known to have died holding it).
    fn token_alive(&self, _token: u32) -> bool {
        true
    }

    /// A non-zero token naming the calling thread: a mutex's owner word carries it
    /// (docs/FORMAT.md §6a), so a mutex is held by a thread, and a thread of the same peer
    /// can tell, through [`Transport::token_alive`], that the owner died. An OS transport
    /// returns the thread id; the default (a single-threaded RTOS) is [`Transport::lock_token`].
    fn thread_token(&self) -> u32 {
        self.lock_token()
    }

    /// Wakes this peer's own waiting threads so they re-check their conditions (after a
    /// change they wait for that no ring announces, e.g. the mailbox lock released). A
    /// polling transport re-checks anyway and can keep the default, which does nothing.
    fn notify_local(&self) {}

    /// Fences `[offset, offset+len)` off from this process: from now on its accesses there
    /// reach private memory, not the region (docs/FORMAT.md §11a: a section this process
    /// held was destroyed behind its back and the range may soon be someone else's).
    /// Returns whether it could; the default cannot.
    fn revoke(&self, _offset: RegionOffset, _len: u64) -> bool {
        false
    }

    /// Maps a range fenced off by [`Transport::revoke`] to the region again (the host has
    /// handed it to this process anew).
    fn restore(&self, _offset: RegionOffset, _len: u64) -> Result<(), TransportError> {
        Ok(())
    }

    /// Tells vshmd, through a channel only this peer can use (never shared memory, which
    /// any peer could forge), that every hold this peer has was checked for `revoke_seq`
    /// values up to `seq` (docs/FORMAT.md §11a). Only a transport that is the peer's one
    /// user may (a host process: yes; one of a guest's processes, which share one peer:
    /// no). Returns whether it did; the default cannot.
    fn acknowledge(&self, _seq: u64) -> bool {
        false
    }

    /// Asks the transport to run `hook` from its own background thread after rings arrive,
    /// and again when the hook asks to (so a process that is idle still answers vshmd's
    /// revocations at once). `None` removes it. The default has no thread and ignores it;
    /// the library then checks when it is called.
    #[cfg(feature = "std")]
    fn set_ring_hook(&self, _hook: Option<RingHook>) {}

    /// The vshm device behind this transport, if it is one ([`crate::Device`]): the
    /// namespace then reads no shared header and makes every operation a request to it.
    fn device(&self) -> Option<&dyn crate::DeviceTransport> {
        None
    }

    /// Called once, when a namespace attaches over the header: where this peer's state lives.
    /// A transport whose kernel closes what a dead process held (the Linux guest driver's
    /// hold table, docs/FORMAT.md §11b) sets that up here. The default does nothing.
    fn track_holds(&self, _place: &PeerPlace) {}

    /// What this process now holds changed ([`HoldChange`]): a transport that set up
    /// [`Transport::track_holds`] records it where its kernel can read it after the process
    /// dies. No system call: called on every open and close. The default does nothing.
    fn hold_changed(&self, _change: HoldChange) {}
}

/// Where a peer's shared state lives in the region (region offsets, from the layout and the
/// peer table the namespace validated at attach): what [`Transport::track_holds`] gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerPlace {
    /// This peer's slot.
    pub peer_slot: PeerSlot,
    /// Object slots in the table.
    pub max_objects: u32,
    /// The peer table's incarnation of `peer_slot` at attach.
    pub incarnation: u64,
    /// The peer-table entry of `peer_slot`.
    pub peer_entry: RegionOffset,
    /// Object slot 0's entry.
    pub object_table: RegionOffset,
    /// This peer's refcount cell for object slot 0 (one u32 per slot follows).
    pub cells: RegionOffset,
    /// This peer's mailbox.
    pub mailbox: RegionOffset,
    /// Bytes per object entry.
    pub object_stride: u32,
    /// Offsets inside an object entry of its generation, lease and sync words.
    pub generation_off: u32,
    /// See `generation_off`.
    pub lease_off: u32,
    /// See `generation_off`.
    pub sync_off: u32,
}

/// A change in what this process holds, for [`Transport::hold_changed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldChange {
    /// One more handle on (slot, generation): after the open succeeded.
    Taken(ObjectSlot, Generation),
    /// One handle fewer on slot: before the close starts (a process that dies in between
    /// leaks the handle to its VM's detach rather than closing it twice).
    Releasing(ObjectSlot),
    /// The thread `token` of this process now owns the mutex in (slot, generation).
    Owned(ObjectSlot, Generation, u32),
    /// The thread `token` of this process no longer owns the mutex in slot: after the
    /// unlock (a process that dies before it is still named in the mutex, and the cleanup
    /// then looks at the owner word). Clears the record only if it still names `token`:
    /// another thread of the process may own the mutex by now.
    Disowned(ObjectSlot, u32),
}

/// Implements [`Transport`] for `$ty` by forwarding every method to `$inner`, an
/// expression of `$self` that gives the transport to use (`&dyn Transport`): for a type
/// that picks one of several transports at run time (the guest's driver or sysfs, the C
/// API's choices), so the list of methods to forward is written once.
#[cfg(feature = "std")]
#[macro_export]
macro_rules! forward_transport {
    ($ty:ty, $self:ident => $inner:expr) => {
        impl $crate::Transport for $ty {
            fn region(&$self) -> $crate::format::shm::RawRegion<'_> {
                $inner.region()
            }
            fn peer_id(&$self) -> $crate::format::PeerId {
                $inner.peer_id()
            }
            fn ring(
                &$self,
                peer: $crate::format::PeerId,
                vector: u16,
            ) -> Result<(), $crate::TransportError> {
                $inner.ring(peer, vector)
            }
            fn wait_until(
                &$self,
                ready: &mut dyn FnMut() -> bool,
                timeout: core::time::Duration,
            ) -> Result<bool, $crate::TransportError> {
                $inner.wait_until(ready, timeout)
            }
            fn lock_token(&$self) -> u32 {
                $inner.lock_token()
            }
            fn token_alive(&$self, token: u32) -> bool {
                $inner.token_alive(token)
            }
            fn thread_token(&$self) -> u32 {
                $inner.thread_token()
            }
            fn notify_local(&$self) {
                $inner.notify_local()
            }
            fn revoke(&$self, offset: $crate::format::RegionOffset, len: u64) -> bool {
                $inner.revoke(offset, len)
            }
            fn restore(
                &$self,
                offset: $crate::format::RegionOffset,
                len: u64,
            ) -> Result<(), $crate::TransportError> {
                $inner.restore(offset, len)
            }
            fn acknowledge(&$self, seq: u64) -> bool {
                $inner.acknowledge(seq)
            }
            fn set_ring_hook(&$self, hook: Option<$crate::RingHook>) {
                $inner.set_ring_hook(hook)
            }
            fn device(&$self) -> Option<&dyn $crate::DeviceTransport> {
                $inner.device()
            }
            fn track_holds(&$self, place: &$crate::PeerPlace) {
                $inner.track_holds(place)
            }
            fn hold_changed(&$self, change: $crate::HoldChange) {
                $inner.hold_changed(change)
            }
        }
    };
}
