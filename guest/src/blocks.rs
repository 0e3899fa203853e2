//! Blocks inside a section (LSA AllocateSharedMemory / FreeSharedMemory): the guest side of
//! `vshm_format::blocks`, which holds the protocol and says why it is a buddy allocator.
//!
//! The allocator lives in the section itself, so every peer holding a handle can allocate
//! and free in it at once; a section becomes an allocator on its first allocation (it must
//! still be zero then). An allocation that does not fit grows the section (a GROW request
//! to the host, in place, at least doubling, never past its max size) and tries again; only
//! when the max size cannot hold it does it fail with STATUS_NO_MEMORY.

use core::time::Duration;

use core::cell::{Cell, RefCell};

use vshm_format::blocks::{BlockError, Guard, Heap, Me, PeerTable, Peers};
use vshm_format::shm::RawRegion;
use vshm_format::virtio::PeersReply;
use vshm_format::{PeerSlot, Status};

pub use vshm_format::blocks::BlockStats;

use crate::{DeviceTransport, Error, Namespace, Section, Transport};

/// How long an operation waits for the allocator lock held by a live peer.
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// Lock attempts before waiting through the transport.
const SPINS: u32 = 200;
/// How long a peer that the peer table shows gone must keep looking gone before the
/// allocator believes it (frees its owned blocks, breaks its lock): two of vshmd's 200 ms
/// heal periods and a margin, as for a peer's own entry (`Namespace::attached`).
#[cfg_attr(not(feature = "std"), allow(dead_code))]
const GONE_GRACE: Duration = Duration::from_millis(450);
/// Sightings of gone owners kept before old ones are dropped.
#[cfg_attr(not(feature = "std"), allow(dead_code))]
const GONE_REMEMBERED: usize = 256;
/// Grow-and-retry rounds before an allocation gives up (each round at least doubles the
/// section or reaches what the allocator asked for).
const GROW_ROUNDS: u32 = 64;

/// A block inside a section: its data is `size` bytes at section offset `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Block {
    /// Section offset of the data (aligned as asked).
    pub offset: u64,
    /// Usable bytes (at least the size asked for: the block is a power of two).
    pub size: u64,
    /// The allocator's heap id: a block freed in another section is refused.
    pub heap: u64,
}

/// Options of [`Section::allocate_with`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocOptions {
    /// Tag the block with this peer: it is freed once the peer is gone (vshmd reclaimed it),
    /// by the next peer that allocates or frees in the section. Untagged blocks are
    /// persistent data: they stay until someone frees them.
    pub owned: bool,
}

fn block_error(e: BlockError) -> Error {
    match e {
        BlockError::Fault(f) => Error::Fault(f),
        e => Error::Status(e.status()),
    }
}

impl<T: Transport> Section<'_, T> {
    /// Allocates a persistent block of at least `size` bytes aligned to `align` (a power of
    /// two; from the section's start). Grows the section as needed.
    pub fn allocate(&self, size: u64, align: u64) -> Result<Block, Error> {
        self.allocate_with(size, align, AllocOptions::default())
    }

    /// [`Section::allocate`] with options.
    pub fn allocate_with(
        &self,
        size: u64,
        align: u64,
        options: AllocOptions,
    ) -> Result<Block, Error> {
        let owner = if options.owned {
            Some(self.heap_peer()?)
        } else {
            None
        };
        for _ in 0..GROW_ROUNDS {
            match self.with_heap(|g| g.allocate(size, align, owner))? {
                Ok(((offset, size), heap)) => return Ok(Block { offset, size, heap }),
                Err(BlockError::NeedGrow { min_size }) => {
                    // The arena grows only to a size the host vouched for: ask it first
                    // (the section may be larger already: another peer grew it).
                    let mut known = self.vouched_size();
                    if known < min_size {
                        match self.grow_vouched(0) {
                            Ok(_) | Err(Error::Status(Status::InvalidParameter)) => {}
                            Err(e) => return Err(e),
                        }
                        known = self.vouched_size();
                    }
                    if known >= min_size {
                        continue;
                    }
                    let target = min_size.max(known.saturating_mul(2)).min(self.max_size());
                    match self.grow_vouched(target) {
                        Ok(_) => {}
                        // Another peer grew it past our target meanwhile.
                        Err(Error::Status(Status::InvalidParameter))
                            if self.vouched_size() >= target => {}
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(block_error(e)),
            }
        }
        Err(Status::NoMemory.into())
    }

    /// Frees a block allocated in this section (LSA FreeSharedMemory). A block of another
    /// section, a forged offset, a wrong size or a double free is refused with
    /// STATUS_INVALID_HANDLE or STATUS_INVALID_PARAMETER and changes nothing.
    pub fn free(&self, block: Block) -> Result<(), Error> {
        let r = self.with_heap(|g| {
            if g.heap_id() != block.heap {
                return Err(BlockError::WrongHeap);
            }
            g.free(block.offset, Some(block.size))
        })?;
        r.map(|_| ()).map_err(block_error)
    }

    /// Frees the block whose data is at section offset `offset` (for callers that kept only
    /// the offset); returns its usable size.
    pub fn free_at(&self, offset: u64) -> Result<u64, Error> {
        let r = self.with_heap(|g| g.free(offset, None))?;
        r.map(|(size, _)| size).map_err(block_error)
    }

    /// The allocator's counters; `None` if no block was ever allocated in the section.
    pub fn block_stats(&self) -> Result<Option<BlockStats>, Error> {
        self.ensure_attached()?;
        vshm_format::blocks::stats(&self.region(), self.offset(), self.size()).map_err(block_error)
    }

    /// This peer as the allocator names an owner: its peer slot and incarnation (over the
    /// device, as vshmd's PEERS says: a VM sees no peer table).
    fn heap_peer(&self) -> Result<(PeerSlot, u64), Error> {
        let ns = self.namespace();
        match ns.device() {
            Some(dev) => {
                let p = ns.device_peers(dev, false)?;
                Ok((p.me, p.incarnation))
            }
            None => Ok(self.peer()),
        }
    }

    /// Takes the allocator lock (waiting for a live holder, breaking a dead one's), runs
    /// `op`, and returns its result with the heap id. The outer error is the transport's.
    fn with_heap<R>(
        &self,
        mut op: impl FnMut(&mut Guard<'_, '_, RawRegion<'_>>) -> Result<R, BlockError>,
    ) -> Result<Result<(R, u64), BlockError>, Error> {
        // The allocator writes its heap into the section.
        if !self.is_writable() {
            return Err(vshm_format::Status::AccessDenied.into());
        }
        self.ensure_attached()?;
        let mem = self.region();
        let ns = self.namespace();
        let transport = ns.transport();
        let token_alive = |token: u32| transport.token_alive(token);
        // Who is attached: the header's peer table, believed only once settled; over the
        // device, vshmd's answer (a VM sees no table).
        let table = SettledPeers {
            table: PeerTable {
                mem: &mem,
                layout: ns.layout(),
                token_alive: &token_alive,
            },
            gone: &ns.gone_since,
            provisional: Cell::new(false),
        };
        let on_device = match ns.device() {
            Some(dev) => Some((dev, ns.device_peers(dev, false)?)),
            None => None,
        };
        let (slot, incarnation) = self.heap_peer()?;
        let me = Me {
            slot,
            incarnation,
            token: transport.lock_token(),
        };
        let mut out = None;
        let mut owner_seen = 0u64;
        let mut attempt = || {
            let heap = match Heap::new(
                &mem,
                self.offset(),
                self.size(),
                self.max_size(),
                self.generation().raw(),
            ) {
                Ok(h) => h.extend_at_most_to(self.vouched_size()),
                Err(e) => {
                    out = Some(Err(e));
                    return true;
                }
            };
            // Over the device a new view for each attempt (the next may come seconds later,
            // while the lock is busy): an owner that attached since the last answer is
            // asked about again, never taken for departed on an old one.
            let device;
            let peers: &dyn Peers = match on_device {
                Some((dev, first)) => {
                    device = DevicePeers {
                        ns,
                        dev,
                        snapshot: RefCell::new(ns.device_peers(dev, false).unwrap_or(first)),
                        asked_again: Cell::new(false),
                    };
                    &device
                }
                None => &table,
            };
            let done = match heap.lock(me, peers) {
                Err(BlockError::Busy { owner }) => {
                    owner_seen = owner;
                    false
                }
                Err(BlockError::Stale) => {
                    // Another peer grew the section: over the device this handle maps only
                    // what it was told of, so catch up (a GROW to 0) before looking again.
                    if ns.device().is_some() {
                        let _ = self.refresh_size();
                    }
                    false
                }
                Err(e) => {
                    out = Some(Err(e));
                    true
                }
                Ok(mut g) => {
                    let id = g.heap_id();
                    out = Some(op(&mut g).map(|r| (r, id)));
                    true
                }
            };
            done
        };
        let mut done = (0..SPINS).any(|_| {
            let d = attempt();
            core::hint::spin_loop();
            d
        });
        if !done {
            done = transport.wait_until(&mut attempt, LOCK_TIMEOUT)?;
        }
        match out {
            Some(r) if done => Ok(r),
            _ => Err(Error::LockTimeout {
                ms: u64::try_from(LOCK_TIMEOUT.as_millis()).unwrap_or(u64::MAX),
                owner: owner_seen,
            }),
        }
    }
}

/// The peer table as the allocator must read it before it acts on a departure: one look
/// may see an entry a peer scribbled over a moment ago (vshmd rewrites it within 200 ms),
/// and believing it would free a live peer's blocks or break its lock. So a peer that looks
/// gone is taken for attached until it has looked gone for [`GONE_GRACE`] (remembered by
/// the namespace across operations); meanwhile the operation goes on without waiting and
/// a later one looks again.
struct SettledPeers<'a> {
    table: PeerTable<'a, RawRegion<'a>>,
    gone: &'a GoneSince,
    /// An answer was "attached for now".
    provisional: Cell<bool>,
}

impl Peers for SettledPeers<'_> {
    fn incarnation(&self, slot: PeerSlot) -> Option<u64> {
        self.table.incarnation(slot)
    }
    fn token_alive(&self, token: u32) -> bool {
        self.table.token_alive(token)
    }
    fn fingerprint(&self) -> u64 {
        // Only decides whether to look at owners again: a scribbled value costs a walk.
        self.table.fingerprint()
    }
    fn attached(&self, slot: PeerSlot, incarnation: u64, mask: u64) -> bool {
        if self.table.attached(slot, incarnation, mask) {
            self.gone.clear(slot, incarnation & mask);
            return true;
        }
        if self.gone.believed(slot, incarnation & mask) {
            return false;
        }
        self.provisional.set(true);
        true
    }
    fn settled(&self) -> bool {
        !self.provisional.get()
    }
}

/// The peers as vshmd tells a VM on the vshm device (PEERS, docs/VHOST-USER.md §5.1):
/// vshmd's own records, believed at once. The snapshot may be up to
/// [`crate::over_device::PEERS_MAX_AGE`] old, so an owner that looks departed in it is
/// asked about again (once per attempt at the lock: a view is made for each) before the
/// allocator frees its blocks or breaks its lock: a peer that attached since must not be
/// taken for a departed one.
struct DevicePeers<'a, T: Transport> {
    ns: &'a Namespace<T>,
    dev: &'a dyn DeviceTransport,
    snapshot: RefCell<PeersReply>,
    asked_again: Cell<bool>,
}

impl<T: Transport> Peers for DevicePeers<'_, T> {
    fn incarnation(&self, slot: PeerSlot) -> Option<u64> {
        self.snapshot.borrow().incarnation_of(slot)
    }
    fn token_alive(&self, token: u32) -> bool {
        self.ns.transport().token_alive(token)
    }
    fn fingerprint(&self) -> u64 {
        let s = self.snapshot.borrow();
        vshm_format::blocks::peers_fingerprint(
            s.slots[..s.count]
                .iter()
                .map(|&inc| (inc != 0).then_some(inc)),
        )
    }
    fn attached(&self, slot: PeerSlot, incarnation: u64, mask: u64) -> bool {
        let looks = |s: &PeersReply| {
            s.incarnation_of(slot)
                .is_some_and(|now| now & mask == incarnation & mask)
        };
        if looks(&self.snapshot.borrow()) {
            return true;
        }
        if self.asked_again.replace(true) {
            return false;
        }
        match self.ns.device_peers(self.dev, true) {
            Ok(fresh) => {
                let attached = looks(&fresh);
                *self.snapshot.borrow_mut() = fresh;
                attached
            }
            // Cannot tell: nothing is freed on a guess.
            Err(_) => true,
        }
    }
}

/// The owners — (peer slot, masked incarnation) — this process saw gone: since when, and when
/// last; kept by the namespace so that the grace spans operations. Keyed by both: a slot
/// reused by several peers that died may own blocks under several incarnations at once.
/// Only an unbroken run of sightings counts: one older than half the grace with no look
/// since may have been healed in between, so it starts over.
#[derive(Debug, Default)]
pub(crate) struct GoneSince {
    #[cfg(feature = "std")]
    seen: std::sync::Mutex<
        std::collections::BTreeMap<(u32, u64), (std::time::Instant, std::time::Instant)>,
    >,
}

impl GoneSince {
    /// Whether the departure of (`slot`, `incarnation`) is to be believed: it has been seen
    /// gone, look after look, for [`GONE_GRACE`] or more (and now again). Records the
    /// sighting. Without `std` there is no clock: believed at once.
    fn believed(&self, slot: PeerSlot, incarnation: u64) -> bool {
        #[cfg(feature = "std")]
        {
            let Ok(mut seen) = self.seen.lock() else {
                return false;
            };
            let now = std::time::Instant::now();
            if seen.len() >= GONE_REMEMBERED {
                // Sightings that old were acted on long ago (their blocks freed).
                seen.retain(|_, (_, last)| now.duration_since(*last) < GONE_GRACE * 8);
            }
            let entry = seen.entry((slot.raw(), incarnation)).or_insert((now, now));
            if now.duration_since(entry.1) > GONE_GRACE / 2 {
                *entry = (now, now);
            }
            entry.1 = now;
            now.duration_since(entry.0) >= GONE_GRACE
        }
        #[cfg(not(feature = "std"))]
        {
            let _ = (slot, incarnation);
            true
        }
    }

    /// (`slot`, `incarnation`) was seen attached: forget a sighting of it gone.
    fn clear(&self, slot: PeerSlot, incarnation: u64) {
        #[cfg(feature = "std")]
        if let Ok(mut seen) = self.seen.lock() {
            seen.remove(&(slot.raw(), incarnation));
        }
        #[cfg(not(feature = "std"))]
        let _ = (slot, incarnation);
    }
}
