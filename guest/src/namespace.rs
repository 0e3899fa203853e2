//! Named sections over a mapped region: the client half of the namespace.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use core::time::Duration;

use vshm_format::layout::{
    const_u32, holder_bit, kind, object_state, Layout, ObjectEntry, Request, Superblock,
    LEASE_HOLDERS, OBJ_LEASE_OFF, OBJ_SIZE_OFF, VECTOR_CONTROL,
};
use vshm_format::lease::{self, LeaseError, Released};
use vshm_format::mailbox::{self, Refusal};
use vshm_format::object::{self, EntryError, ObjectHead, ObjectInfo, PeerInfo};
use vshm_format::shm::{read_pod, RawRegion, SharedMemory};
use vshm_format::{
    revoke, sync, validate_name, Generation, ObjectSlot, PeerId, PeerSlot, RegionOffset, Status,
};

use crate::audit::{self, Audit};
use crate::over_device::Held;
use crate::{Error, HoldChange, Transport, TransportError};

/// How long a CREATE over the device waits out quarantine (it sees no superblock to read
/// the region's time from): vshmd's default.
const DEVICE_QUARANTINE_MS: u64 = 2000;

/// How long past the region's `quarantine_ms` a CREATE refused because memory is still in
/// quarantine keeps being retried (the host releases quarantine on its 200 ms sweep).
const QUARANTINE_SLACK: Duration = Duration::from_millis(500);

/// How often create-or-open retries after losing a race (object destroyed between lookup
/// and hold). Each retry means another peer completed an operation, so this bounds only
/// pathological contention.
const RACE_RETRIES: u32 = 64;
/// Looks at an entry the host is republishing (seqlock odd) before a hold gives up on it.
const ENTRY_BUSY_RETRIES: u32 = 1 << 16;

/// Test only: the pause an open takes inside its cell lock when `VSHM_TEST_PAUSE_IN_CELL_LOCK`
/// is set (see `os::pause_forever`), so a test can kill a process there. The environment is
/// read once per process: reading it takes libc's environment lock and scans every
/// variable, which was 6 % of an open.
#[cfg(feature = "std")]
fn pause_in_cell_lock() -> Option<&'static dyn Fn()> {
    static SET: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    SET.get_or_init(|| std::env::var_os("VSHM_TEST_PAUSE_IN_CELL_LOCK").is_some())
        .then_some(&crate::os::pause_forever as &dyn Fn())
}

#[cfg(not(feature = "std"))]
fn pause_in_cell_lock() -> Option<&'static dyn Fn()> {
    None
}

/// How often a close retries (10 ms apart) when the peer's own cell lock stays taken.
const STUCK_RETRIES: u32 = 10;

/// How long `attach` keeps re-reading a superblock or peer table that does not validate
/// before it gives up: vshmd heals what a peer scribbled over its header every 200 ms, so
/// an attach during or just after such a scribble succeeds a moment later.
const ATTACH_RETRY: Duration = Duration::from_millis(1000);

/// How long a peer whose own peer entry no longer says it is attached keeps re-reading it
/// before it concludes it was detached: five of vshmd's 200 ms heal periods, so a scribbled
/// peer table does not make an honest, connected peer give up even when a loaded host
/// runs vshmd's timer late (450 ms was exceeded in a long scribbler run on an
/// oversubscribed machine). Only a peer that really was detached waits it out.
const DETACH_GRACE: Duration = Duration::from_millis(1000);

/// Whether create-or-open created the section or opened an existing one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// STATUS_SUCCESS: a new, zero-filled section.
    Created,
    /// STATUS_OBJECT_NAME_EXISTS: the name existed; this is a new handle on it.
    Opened,
}

impl Disposition {
    /// The NTSTATUS of this outcome.
    pub fn status(self) -> Status {
        match self {
            Disposition::Created => Status::Success,
            Disposition::Opened => Status::ObjectNameExists,
        }
    }
}

/// Parameters of create-or-open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// Bytes reserved (contiguous, never moves). Must be > 0.
    pub max_size: u64,
    /// Bytes exposed at creation (≤ `max_size`); grow up to `max_size` later.
    pub initial_size: u64,
    /// Live until deleted rather than until the last handle closes.
    pub persistent: bool,
}

impl CreateOptions {
    /// A non-persistent section exposing all of `max_size`.
    pub fn new(max_size: u64) -> CreateOptions {
        CreateOptions {
            max_size,
            initial_size: max_size,
            persistent: false,
        }
    }
}

/// A peer's view of the namespace in one region.
#[derive(Debug)]
pub struct Namespace<T: Transport> {
    transport: T,
    layout: Layout,
    superblock: Superblock,
    peer_id: PeerId,
    pub(crate) peer_slot: PeerSlot,
    /// The peer table's incarnation of our slot when we attached (adopted again if that one
    /// read was scribbled, see `attached`).
    incarnation: AtomicU64,
    /// Concluded for good that the backend reclaimed this peer.
    detached: AtomicBool,
    pub(crate) reply_timeout: Duration,
    /// The holds this process took, checked when vshmd announces a destroy (§11a).
    audit: audit::Shared,
    /// Peers this process saw gone in the peer table, and since when (blocks.rs).
    pub(crate) gone_since: crate::blocks::GoneSince,
    /// Over the device: the last PEERS answer (the block allocator's view of who is
    /// attached).
    pub(crate) peers_cache: crate::over_device::PeersCache,
}

impl<T: Transport> Namespace<T> {
    /// Validates the region behind `transport` and attaches to it.
    pub fn attach(transport: T) -> Result<Namespace<T>, Error> {
        if let Some(dev) = transport.device() {
            let window = dev.window().size();
            return Ok(Self::over_device(transport, window));
        }
        let peer_id = transport.peer_id();
        // A superblock or peer table that does not validate may have been scribbled on by
        // a peer a moment ago: vshmd rewrites both within 200 ms, so look again for a
        // bounded time before failing with what the last look found.
        let mut last = Err(Error::Transport(TransportError::BadPeerId(peer_id)));
        let mut look = || {
            last = Self::look(&transport.region(), peer_id);
            last.is_ok()
        };
        if !look() {
            transport.wait_until(&mut look, ATTACH_RETRY)?;
        }
        let (superblock, layout, peer_slot, incarnation) = last?;
        let audit = audit::Shared::from(Audit::new(layout, peer_slot));
        #[cfg(feature = "std")]
        {
            // An idle process must still answer vshmd's revocations (§11a) at once.
            let on_ring = std::sync::Arc::clone(&audit);
            transport.set_ring_hook(Some(std::boxed::Box::new(move |ctx| on_ring.run(ctx))));
        }
        let ns = Namespace {
            transport,
            layout,
            superblock,
            peer_id,
            peer_slot,
            incarnation: AtomicU64::new(incarnation),
            detached: AtomicBool::new(false),
            reply_timeout: Duration::from_secs(10),
            audit,
            gone_since: crate::blocks::GoneSince::default(),
            peers_cache: crate::over_device::PeersCache::default(),
        };
        if let Some(place) = ns.place() {
            ns.transport.track_holds(&place);
        }
        // Destroys announced before we attached concern holds we never had.
        ns.audit();
        Ok(ns)
    }

    /// A namespace over the vshm device, whose window is `window` bytes: the header it sees
    /// is empty (no peers, no objects: other VMs' names and holds are not its business),
    /// so the methods that show the header show nothing, and every operation is a request.
    fn over_device(transport: T, window: u64) -> Namespace<T> {
        let layout = Layout {
            region_size: window,
            max_peers: 0,
            max_objects: 0,
            vectors: 0,
            alignment: 4096,
            peer_table: 0,
            object_table: 0,
            refcount_table: 0,
            refcount_row_size: 0,
            mailbox_table: 0,
            index_table: 0,
            index_slots: 0,
            name_area: 0,
            name_area_size: 0,
            heap_offset: 0,
            heap_size: 0,
        };
        Namespace {
            transport,
            layout,
            superblock: vshm_format::shm::zeroed(),
            peer_id: PeerId::HOST,
            peer_slot: PeerSlot(0),
            incarnation: AtomicU64::new(0),
            detached: AtomicBool::new(false),
            reply_timeout: Duration::from_secs(10),
            audit: audit::Shared::from(Audit::new(layout, PeerSlot(0))),
            gone_since: crate::blocks::GoneSince::default(),
            peers_cache: crate::over_device::PeersCache::default(),
        }
    }

    /// Where this peer's state lives, for [`Transport::track_holds`] (`None` only for a
    /// layout too small to hold it, which attach has rejected already).
    fn place(&self) -> Option<crate::PeerPlace> {
        let (layout, slot) = (&self.layout, self.peer_slot);
        let object_table = layout.object_entry(ObjectSlot(0))?;
        Some(crate::PeerPlace {
            peer_slot: slot,
            max_objects: layout.max_objects,
            incarnation: self.incarnation.load(Ordering::Relaxed),
            peer_entry: RegionOffset(layout.peer_entry(slot)?),
            object_table: RegionOffset(object_table),
            cells: RegionOffset(layout.refcount_cell(slot, ObjectSlot(0))?),
            mailbox: RegionOffset(layout.mailbox(slot)?),
            object_stride: const_u32(core::mem::size_of::<ObjectEntry>()),
            generation_off: const_u32(core::mem::offset_of!(ObjectEntry, generation)),
            lease_off: const_u32(core::mem::offset_of!(ObjectEntry, lease)),
            sync_off: const_u32(core::mem::offset_of!(ObjectEntry, sync)),
        })
    }

    /// The vshm device this namespace makes its requests to, if it is over one.
    pub(crate) fn device(&self) -> Option<&dyn crate::DeviceTransport> {
        self.transport.device()
    }

    /// Handles this process found revoked so far: their objects were destroyed behind its
    /// back (someone cleared its holds, docs/FORMAT.md §11a).
    pub fn revoked_handles(&self) -> u64 {
        self.audit.revoked_count()
    }

    /// Checks this process's holds now if vshmd announced a destroy since the last check
    /// (the library also does so before every operation and, with a transport that has a
    /// background thread, whenever it is rung).
    pub fn audit(&self) {
        // Over the device there is no header to audit: vshmd never destroys what a VM holds.
        if self.device().is_some() {
            return;
        }
        let _ = self.audit.run(&self.transport);
    }

    /// Whether the hold on (slot, generation) was revoked, as the audit concluded (one look
    /// at a table a peer may have scribbled is not enough, audit.rs). Without `std` there
    /// is no audit: one look it is.
    pub(crate) fn revoked(&self, slot: ObjectSlot, generation: Generation) -> bool {
        if self.device().is_some() {
            return false;
        }
        #[cfg(feature = "std")]
        {
            self.audit.is_revoked(slot, generation)
        }
        #[cfg(not(feature = "std"))]
        {
            revoke::check_hold(&self.mem(), &self.layout, self.peer_slot, slot, generation)
                == Ok(revoke::Hold::Revoked)
        }
    }

    /// One look at the region for `attach`: the validated superblock and layout, this
    /// peer's slot and the slot's incarnation.
    fn look(
        region: &RawRegion<'_>,
        peer_id: PeerId,
    ) -> Result<(Superblock, Layout, PeerSlot, u64), Error> {
        let superblock: Superblock = read_pod(region, 0)?;
        let layout = Layout::from_superblock(&superblock, region.size()).map_err(Error::Region)?;
        let bad_id = Error::Transport(TransportError::BadPeerId(peer_id));
        let slot = object::find_peer_slot(region, &layout, peer_id).ok_or(bad_id)?;
        let info = object::read_peer(region, &layout, slot).ok_or(bad_id)?;
        Ok((superblock, layout, slot, info.incarnation))
    }

    /// How long a request waits for the backend before failing with [`Error::Timeout`].
    pub fn set_reply_timeout(&mut self, timeout: Duration) {
        self.reply_timeout = timeout;
    }

    /// Fails with [`Error::Detached`] once the backend has reclaimed this peer: its slot
    /// (refcount row, mailbox, holder bit) may already belong to another peer, which this
    /// one must never touch. Three atomic loads; checked before every table operation.
    ///
    /// One failed check is not enough: a peer may have scribbled over the peer table,
    /// which vshmd rewrites from its records within one 200 ms heal period. So the entry is
    /// re-read for up to [`DETACH_GRACE`] (touching nothing meanwhile) before the peer
    /// concludes, once and for all, that it was detached. This is still safe: the wait only
    /// delays the answer, and the entry that ends it is vshmd's own — a reclaimed slot
    /// stays ABSENT, and is not handed to another peer at once either (vshmd takes the free
    /// slot freed longest ago), and if it was, its incarnation differs.
    ///
    /// The incarnation this peer recorded at attach came from one read of its entry, which
    /// a peer may have scribbled at that very moment. So if, after the grace, the slot is
    /// still CONNECTED to this peer's id with another incarnation, that one is adopted: no
    /// other connection can have this id while this peer lives (FORMAT.md §15: an id is
    /// handed on only after its holder left, and a holder cut off while it runs keeps its id
    /// fenced), so the table's value is the true one.
    pub(crate) fn attached(&self) -> Result<(), Error> {
        if self.detached.load(Ordering::Relaxed) {
            return Err(Error::Detached);
        }
        if let Some(dev) = self.device() {
            // vshmd reclaimed everything when it went, and its mappings went with it.
            return match dev.gone() {
                true => Err(Error::Transport(TransportError::BackendGone)),
                false => Ok(()),
            };
        }
        let mut check = || {
            let (mem, l) = (&self.mem(), &self.layout);
            let incarnation = self.incarnation.load(Ordering::Relaxed);
            object::peer_still_attached(mem, l, self.peer_slot, self.peer_id, incarnation)
        };
        if check() || self.transport.wait_until(&mut check, DETACH_GRACE) == Ok(true) {
            self.audit();
            return Ok(());
        }
        if let Some(info) = object::read_peer(&self.mem(), &self.layout, self.peer_slot) {
            if info.peer_id == self.peer_id {
                self.incarnation.store(info.incarnation, Ordering::Relaxed);
                self.audit();
                return Ok(());
            }
        }
        self.detached.store(true, Ordering::Relaxed);
        Err(Error::Detached)
    }

    /// The mapped region, borrowed from the transport.
    pub(crate) fn mem(&self) -> RawRegion<'_> {
        self.transport.region()
    }

    /// The validated layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The superblock as read at attach time.
    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    /// This peer's id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// Create-or-open (RtkCreateSharedMemory + LSA CreateSharedMemory). `name = None`
    /// creates an unnamed section that no one can open by name.
    pub fn create(
        &self,
        name: Option<&str>,
        options: &CreateOptions,
    ) -> Result<(Section<'_, T>, Disposition), Error> {
        if options.max_size == 0 || options.initial_size > options.max_size {
            return Err(Status::InvalidParameter.into());
        }
        let req = mailbox::create_request(
            name,
            kind::SECTION,
            options.max_size,
            options.initial_size,
            options.persistent,
        );
        let (held, disposition) = self.create_object(name, kind::SECTION, &req)?;
        Ok((self.section(&held), disposition))
    }

    /// Opens an existing section by name (over a header without a round trip to the
    /// backend; over the device a request, which maps it).
    pub fn open(&self, name: &str) -> Result<Section<'_, T>, Error> {
        let held = self.open_object(name, kind::SECTION)?;
        Ok(self.section(&held))
    }

    /// [`Namespace::open`] for reading only: the handle refuses writes (STATUS_ACCESS_DENIED)
    /// and, over the device, the section is mapped read-only.
    pub fn open_read_only(&self, name: &str) -> Result<Section<'_, T>, Error> {
        let mut held = match self.device() {
            Some(dev) => self.device_open_name(dev, name, Some(kind::SECTION), true)?,
            None => self.open_object(name, kind::SECTION)?,
        };
        held.writable = false;
        Ok(self.section(&held))
    }

    /// Create-or-open of an object of `kind` with the CREATE request `req`: a local lookup
    /// and hold first (no round trip), else CREATE, and the host decides. A name that
    /// belongs to another kind of object is STATUS_INVALID_HANDLE.
    pub(crate) fn create_object(
        &self,
        name: Option<&str>,
        kind: u32,
        req: &Request,
    ) -> Result<(Held, Disposition), Error> {
        if let Some(n) = name {
            validate_name(n)?;
        }
        if let Some(dev) = self.device() {
            // One request: the device takes the hold and maps, or says why not.
            let resp = self.call_waiting_out_quarantine(req)?;
            return self.device_held(dev, req.op, &resp, Some(kind));
        }
        for _ in 0..RACE_RETRIES {
            if let Some(n) = name {
                match self.open_existing(n, kind) {
                    Ok(info) => return Ok((Held::from_entry(&info), Disposition::Opened)),
                    // Not there, or died as we looked: ask the host, who decides.
                    Err(Error::Status(Status::ObjectNameNotFound) | Error::Contended) => {}
                    Err(e) => return Err(e),
                }
            }
            let resp = self.call_waiting_out_quarantine(req)?;
            let disposition = match Status::from_code(resp.status) {
                Some(Status::Success) => Disposition::Created,
                Some(Status::ObjectNameExists) => Disposition::Opened,
                Some(s) if !s.is_success() => {
                    return Err(match Refusal::from_response(&resp) {
                        Some(reason) => Error::Refused { status: s, reason },
                        None => s.into(),
                    })
                }
                _ => return Err(Error::BadResponse(resp.status, ObjectSlot(resp.slot))),
            };
            match self.hold(ObjectSlot(resp.slot), Generation(resp.generation), false) {
                Ok(info) if info.kind != kind => {
                    // Only possible for Opened: the name is another kind of object.
                    let _ = self.release(info.slot, info.generation, 0);
                    return Err(Status::InvalidHandle.into());
                }
                Ok(info) => return Ok((Held::from_entry(&info), disposition)),
                // Closed or deleted by others before we got our hold: try again.
                Err(Error::Status(Status::ObjectNameNotFound)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Contended)
    }

    /// `call` for a CREATE, retried while the host refuses it only because the memory it
    /// needs is still in quarantine (§11a): that ends within the region's `quarantine_ms`.
    fn call_waiting_out_quarantine(
        &self,
        req: &Request,
    ) -> Result<vshm_format::layout::Response, Error> {
        // A device peer sees no superblock: the device's config says (else vshmd's default).
        let quarantine_ms = match self.device() {
            Some(dev) => dev.quarantine_ms().map_or(DEVICE_QUARANTINE_MS, u64::from),
            None => u64::from(self.superblock.quarantine_ms),
        };
        let patience = Duration::from_millis(quarantine_ms) + QUARANTINE_SLACK;
        let mut waited = Duration::ZERO;
        loop {
            let resp = self.call(req)?;
            let in_quarantine = matches!(
                Refusal::from_response(&resp),
                Some(Refusal::InQuarantine { .. })
            );
            if !in_quarantine || waited >= patience {
                return Ok(resp);
            }
            let step = Duration::from_millis(20);
            self.transport.wait_until(&mut || false, step)?;
            waited += step;
        }
    }

    /// Opens an existing object of `kind` by name (over a header a hold, no round trip).
    pub(crate) fn open_object(&self, name: &str, kind: u32) -> Result<Held, Error> {
        if let Some(dev) = self.device() {
            return self.device_open_name(dev, name, Some(kind), false);
        }
        validate_name(name)?;
        for _ in 0..RACE_RETRIES {
            match self.open_existing(name, kind) {
                Err(Error::Contended) => continue,
                other => return other.map(|info| Held::from_entry(&info)),
            }
        }
        Err(Error::Contended)
    }

    fn open_existing(&self, name: &str, kind: u32) -> Result<ObjectHead, Error> {
        self.attached()?;
        let info = object::find_head_by_name(&self.mem(), &self.layout, name)?
            .ok_or(Error::Status(Status::ObjectNameNotFound))?;
        if info.kind != kind {
            return Err(Status::InvalidHandle.into());
        }
        // Attached a moment ago (above): the hold need not look again.
        match self.hold_attached(info.slot, info.generation, false) {
            Ok(held) => Ok(held),
            // Destroyed between lookup and hold: the caller decides whether to look again.
            Err(Error::Status(Status::ObjectNameNotFound)) => Err(Error::Contended),
            Err(e) => Err(e),
        }
    }

    /// Takes a hold on (slot, generation) and returns the validated entry (without its
    /// name: `object::read_held_object`).
    pub(crate) fn hold(
        &self,
        slot: ObjectSlot,
        generation: Generation,
        allow_unlinked: bool,
    ) -> Result<ObjectHead, Error> {
        self.attached()?;
        self.hold_attached(slot, generation, allow_unlinked)
    }

    /// [`Namespace::hold`] for a caller that has just seen this peer attached.
    fn hold_attached(
        &self,
        slot: ObjectSlot,
        generation: Generation,
        allow_unlinked: bool,
    ) -> Result<ObjectHead, Error> {
        let (mem, layout) = (&self.mem(), &self.layout);
        // The cell lock is tagged with this process, so another process of a guest can take
        // it over if this one dies holding it (FORMAT.md §7).
        let alive = |token| self.transport.token_alive(token);
        let owner = lease::LockOwner {
            token: self.transport.lock_token(),
            alive: &alive,
            in_lock: pause_in_cell_lock(),
        };
        match lease::acquire_as(
            mem,
            layout,
            self.peer_slot,
            slot,
            generation,
            allow_unlinked,
            &owner,
        ) {
            // Counted for this process before anything can release it again.
            Ok(()) => self
                .transport
                .hold_changed(HoldChange::Taken(slot, generation)),
            Err(LeaseError::GoneClosed) => {
                // Our brief hold was the last on whatever now lives in the slot.
                self.ring_closed(slot)?;
                return Err(Error::Status(Status::ObjectNameNotFound));
            }
            Err(e) => return Err(Error::Status(e.status())),
        }
        // Our holder bit is set: the entry cannot change identity now. Validate it (all but
        // the name: the generation proves it is the object asked for) — after
        // the host has finished republishing it if it is doing so this instant (a grow, a
        // delete, a heal keep the seqlock odd for a moment: not a reason to fail the open).
        let mut busy = 0u32;
        let info = loop {
            match object::read_held_object(&self.mem(), &self.layout, slot) {
                Ok(Some(info)) if info.generation == generation => break info,
                Err(EntryError::Busy) if busy < ENTRY_BUSY_RETRIES => {
                    busy += 1;
                    core::hint::spin_loop();
                    // The host may be off the CPU mid-publish: let it run.
                    #[cfg(feature = "std")]
                    if busy % 64 == 0 {
                        std::thread::yield_now();
                    }
                }
                _ => {
                    let _ = self.release(slot, generation, 0);
                    return Err(Error::Status(Status::InvalidHandle));
                }
            }
        };
        // Memory this process fenced off after a revocation and now holds anew: map it to
        // the region again before anyone uses it.
        for (offset, len) in self.audit.held(&info) {
            if let Err(e) = self.transport.restore(offset, len) {
                let _ = self.release(slot, generation, 0);
                return Err(e.into());
            }
        }
        // The holder bit does not stop a peer that forges our last close: if the object was
        // destroyed after the validation above and an audit ran before the record, that
        // audit could not see this hold and may have acknowledged. Any audit from here on
        // sees the record, so one look now closes the window. No fence is needed: nobody
        // has the handle yet. A scribbled entry can make this look fail too; the caller
        // then looks again, as after any lost race.
        let revoked =
            revoke::check_hold(&self.mem(), &self.layout, self.peer_slot, slot, generation);
        if revoked == Ok(revoke::Hold::Revoked) {
            let _ = self.release(slot, generation, 0);
            return Err(Error::Status(Status::ObjectNameNotFound));
        }
        Ok(info)
    }

    /// Drops one hold on (slot, generation); rings the host if that destroyed the object.
    /// Over the device, `handle` names the handle (what its OPEN/CREATE answered).
    pub(crate) fn release(
        &self,
        slot: ObjectSlot,
        generation: Generation,
        handle: u64,
    ) -> Result<(), Error> {
        if let Some(dev) = self.device() {
            return self.device_close(dev, slot, generation, handle);
        }
        // This process no longer has the handle, whatever happens below.
        self.transport.hold_changed(HoldChange::Releasing(slot));
        // A reclaimed peer's holds are gone already; its row may be someone else's now.
        self.attached()?;
        // A revoked hold is no longer counted in our cell (which may count a new object in
        // that slot now): closing it touches nothing shared.
        if !self.audit.releasing(slot, generation) {
            return Ok(());
        }
        let alive = |token| self.transport.token_alive(token);
        let owner = lease::LockOwner {
            token: self.transport.lock_token(),
            alive: &alive,
            in_lock: None,
        };
        let mut result = lease::release_as(&self.mem(), &self.layout, self.peer_slot, slot, &owner);
        // The cell lock is held by another of this peer's threads (or processes, in a
        // guest) for a few instructions; if it was preempted longer than the spin bound,
        // wait and try again rather than lose the close.
        for _ in 0..STUCK_RETRIES {
            if result != Err(LeaseError::Stuck) {
                break;
            }
            self.transport
                .wait_until(&mut || false, Duration::from_millis(10))?;
            result = lease::release_as(&self.mem(), &self.layout, self.peer_slot, slot, &owner);
        }
        match result {
            Ok(Released::Held) => Ok(()),
            Ok(Released::LastHold) => self.ring_closed(slot),
            Err(e) => Err(Error::Status(e.status())),
        }
    }

    /// Tells the host that this peer's close left `slot` unheld: the slot in the mailbox's
    /// close hint (so the host need not look at every object, §9), then a ring.
    fn ring_closed(&self, slot: ObjectSlot) -> Result<(), Error> {
        // A hint that cannot be written costs the host a sweep of the table, nothing more.
        let _ = mailbox::hint_closed(&self.mem(), &self.layout, self.peer_slot, slot);
        self.transport.ring(PeerId::HOST, VECTOR_CONTROL)?;
        Ok(())
    }

    fn section(&self, held: &Held) -> Section<'_, T> {
        // A change counted before the handle existed is not news to it.
        let seen = held
            .change_count
            .unwrap_or_else(|| sync::signal_seq(&self.mem(), &self.layout, held.slot).unwrap_or(0));
        Section {
            ns: self,
            slot: held.slot,
            generation: held.generation,
            offset: held.offset,
            max_size: held.max_size,
            seen: AtomicU64::new(seen),
            vouched: AtomicU64::new(held.vouched),
            handle: held.handle,
            writable: held.writable,
            deleted: AtomicBool::new(false),
            open: true,
        }
    }

    /// Deletes the LIVE object called `name` (any kind): the name disappears at once, the
    /// memory is freed when the last handle closes.
    pub fn delete(&self, name: &str) -> Result<(), Error> {
        if let Some(dev) = self.device() {
            return self.device_delete(dev, name);
        }
        validate_name(name)?;
        let info = object::find_by_name(&self.mem(), &self.layout, name)?
            .ok_or(Error::Status(Status::ObjectNameNotFound))?;
        self.delete_object(info.slot, info.generation)
    }

    /// Wakes the peers waiting on (slot, generation) after a change that found waiters
    /// (docs/FORMAT.md §6a): rings the waiting holders' doorbells directly where the peer
    /// table says they have one, and asks the host (WAKE) to ring the others.
    pub(crate) fn wake_object(
        &self,
        slot: ObjectSlot,
        generation: Generation,
    ) -> Result<(), Error> {
        if self.ring_waiters(slot)? == 0 {
            return Ok(());
        }
        let resp = self.call(&mailbox::wake_request(slot, generation))?;
        match Status::from_code(resp.status) {
            Some(Status::Success) => Ok(()),
            Some(s) => Err(s.into()),
            None => Err(Error::BadResponse(resp.status, slot)),
        }
    }

    /// Takes `slot`'s waiters word and rings, on the wake vector, each waiter that is a
    /// connected holder with a doorbell (the host's rule for WAKE, §6a). Bits of
    /// non-holders and of ABSENT slots are dropped, as the host drops them (a real waiter
    /// sets its bit again before it sleeps again). The bits of waiters it could not ring (a
    /// peer the host stands in for, a doorbell this transport does not know yet, an entry
    /// that does not validate) are put back; they are returned, non-zero meaning a WAKE
    /// request must follow.
    fn ring_waiters(&self, slot: ObjectSlot) -> Result<u64, Error> {
        let (mem, layout) = (&self.mem(), &self.layout);
        let bits = sync::take_waiters(mem, layout, slot)?;
        if bits == 0 {
            return Ok(0);
        }
        let holders = layout
            .object_entry(slot)
            .map_or(Ok(0), |b| mem.load_u64(b + OBJ_LEASE_OFF, Ordering::SeqCst))?
            & LEASE_HOLDERS;
        let vector = layout.wake_vector();
        let mut unrung = 0;
        for peer in (0..layout.max_peers).map(PeerSlot) {
            let bit = holder_bit(peer);
            if bits & holders & bit == 0 {
                continue;
            }
            match vshm_format::peer::read_peer_checked(mem, layout, peer) {
                Ok(Some(p)) if p.doorbell && self.transport.ring(p.peer_id, vector).is_ok() => {}
                // ABSENT: the host would drop it too.
                Ok(None) => {}
                // No doorbell, a ring refused, or an entry that does not validate (a
                // scribble the host heals): the host decides from its own records.
                _ => unrung |= bit,
            }
        }
        if unrung != 0 {
            sync::restore_waiters(mem, layout, slot, unrung)?;
        }
        Ok(unrung)
    }

    fn delete_object(&self, slot: ObjectSlot, generation: Generation) -> Result<(), Error> {
        let resp = self.call(&mailbox::delete_request(slot, generation))?;
        match Status::from_code(resp.status) {
            Some(Status::Success) => Ok(()),
            Some(s) => Err(s.into()),
            None => Err(Error::BadResponse(resp.status, slot)),
        }
    }

    /// Looks a LIVE object up by name.
    pub fn info(&self, name: &str) -> Result<ObjectInfo, Error> {
        if let Some(dev) = self.device() {
            return self.device_info(dev, name);
        }
        validate_name(name)?;
        object::find_by_name(&self.mem(), &self.layout, name)?
            .ok_or(Error::Status(Status::ObjectNameNotFound))
    }

    /// All objects in the table (LIVE and UNLINKED), skipping entries that do not validate.
    pub fn objects(&self) -> impl Iterator<Item = ObjectInfo> + '_ {
        (0..self.layout.max_objects)
            .map(ObjectSlot)
            .filter_map(move |slot| object::read_object(&self.mem(), &self.layout, slot).ok()?)
    }

    /// The peers attached to the region now (as the host publishes them), this one included.
    pub fn peers(&self) -> impl Iterator<Item = PeerInfo> + '_ {
        (0..self.layout.max_peers)
            .map(PeerSlot)
            .filter_map(move |s| object::read_peer(&self.mem(), &self.layout, s))
    }

    /// The attached peers holding object `slot` (its lease word's holder bits). A hint for
    /// monitoring: the word is shared memory and changes under the reader.
    pub fn holders(&self, slot: ObjectSlot) -> impl Iterator<Item = PeerInfo> + '_ {
        let word = self
            .layout
            .object_entry(slot)
            .and_then(|b| {
                self.mem()
                    .load_u64(b + OBJ_LEASE_OFF, Ordering::Acquire)
                    .ok()
            })
            .unwrap_or(0);
        self.peers()
            .filter(move |p| word & LEASE_HOLDERS & holder_bit(p.slot) != 0)
    }

    /// This peer's handle count on an object slot.
    pub fn handles_on(&self, slot: ObjectSlot) -> u32 {
        lease::handles(&self.mem(), &self.layout, self.peer_slot, slot).unwrap_or(0)
    }

    /// Posts a request and waits for the response.
    pub(crate) fn call(&self, req: &Request) -> Result<vshm_format::layout::Response, Error> {
        if let Some(dev) = self.device() {
            return self.device_call(dev, req, &mut [], self.reply_timeout);
        }
        self.attached()?;
        let mem = &self.mem();
        let (layout, slot) = (&self.layout, self.peer_slot);
        // One request per peer at a time; the lock is this peer's own word, tagged with the
        // taker so a process that died holding it (a guest's processes share the peer) does
        // not wedge the mailbox for the others.
        let token = self.transport.lock_token();
        let got = self.transport.wait_until(
            &mut || mailbox::try_lock(mem, layout, slot, token).unwrap_or(false),
            self.reply_timeout,
        )?;
        if !got {
            let owner = mailbox::lock_owner(mem, layout, slot)?;
            if owner == 0
                || self.transport.token_alive(owner)
                || !mailbox::steal_lock(mem, layout, slot, owner, token)?
            {
                return Err(Error::MailboxBusy(owner));
            }
        }
        let result = self.call_locked(req);
        let _ = mailbox::unlock(mem, layout, slot);
        // Other threads of this process may be waiting for the mailbox lock.
        self.transport.notify_local();
        result
    }

    fn call_locked(&self, req: &Request) -> Result<vshm_format::layout::Response, Error> {
        let (mem, layout, slot) = (&self.mem(), &self.layout, self.peer_slot);
        let seq = mailbox::post(mem, layout, slot, req)?;
        self.transport.ring(PeerId::HOST, VECTOR_CONTROL)?;
        let mut response = None;
        let answered = self.transport.wait_until(
            &mut || match mailbox::poll(mem, layout, slot, seq) {
                Ok(Some(r)) => {
                    response = Some(r);
                    true
                }
                _ => false,
            },
            self.reply_timeout,
        )?;
        match response {
            Some(r) if answered => Ok(r),
            _ => Err(Error::Timeout(duration_ms(self.reply_timeout))),
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Without this the transport's thread would keep running the audit of a namespace that
/// is gone.
#[cfg(feature = "std")]
impl<T: Transport> Drop for Namespace<T> {
    fn drop(&mut self) {
        self.transport.set_ring_hook(None);
    }
}

/// A handle on a section. Dropping it closes the handle; the section is destroyed when the
/// last handle of a non-persistent (or deleted) section closes.
#[derive(Debug)]
pub struct Section<'ns, T: Transport> {
    ns: &'ns Namespace<T>,
    slot: ObjectSlot,
    generation: Generation,
    offset: RegionOffset,
    max_size: u64,
    /// The section's change count (`signal_seq`) as this handle last saw it.
    seen: AtomicU64,
    /// The largest size the host told this handle the section has (its GROW replies); the
    /// block allocator tiles no further (an entry's size may be a scribble of the moment).
    vouched: AtomicU64,
    /// What CLOSE names this handle by over the device (0 over a header).
    handle: u64,
    /// Writes are allowed (not a read-only open).
    writable: bool,
    /// This handle deleted the section (over the device the only way it learns of it).
    deleted: AtomicBool,
    open: bool,
}

impl<'ns, T: Transport> Section<'ns, T> {
    /// Tells the readers of this section that it changed ("I wrote a frame"): counts the
    /// change and, if anyone waits for one, asks the host to ring the waiting holders.
    pub fn notify(&self) -> Result<(), Error> {
        if let Some(dev) = self.ns.device() {
            return self
                .ns
                .device_signal(dev, self.slot, self.generation, false);
        }
        self.ns.attached()?;
        if sync::notify(&self.ns.mem(), &self.ns.layout, self.slot)? {
            self.ns.wake_object(self.slot, self.generation)?;
        }
        Ok(())
    }

    /// Waits until the section changed (anyone's [`Section::notify`]) since this handle last
    /// looked (when it was opened, or its last `wait_change`), or until `timeout` passes
    /// (`None`: no limit) → `Error::Status(Status::Timeout)`. Changes made while nobody
    /// waited are coalesced: returns the number of changes counted so far.
    pub fn wait_change(&self, timeout: Option<Duration>) -> Result<u64, Error> {
        let seen = self.seen.load(Ordering::Acquire);
        let ns = self.ns;
        if let Some(dev) = ns.device() {
            // WAIT since the count this handle saw: a change in between completes it at once.
            let now = ns
                .device_wait(dev, self.slot, self.generation, Some(seen), timeout)?
                .ok_or(Error::Status(Status::Timeout))?;
            self.seen.store(now, Ordering::Release);
            return Ok(now);
        }
        let slot = self.slot;
        let mut now = seen;
        let changed = crate::handle::spin_then_wait_on(ns, slot, timeout, &mut || {
            now = sync::signal_seq(&ns.mem(), &ns.layout, slot)?;
            Ok(now != seen)
        })?;
        if !changed {
            return Err(Status::Timeout.into());
        }
        self.seen.store(now, Ordering::Release);
        Ok(now)
    }

    /// Object table slot.
    pub fn slot(&self) -> ObjectSlot {
        self.slot
    }

    /// Generation of the object (with the slot, its identity).
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// Offset of the section's memory in the transport's region (over the device: in its
    /// window).
    pub fn offset(&self) -> RegionOffset {
        self.offset
    }

    /// Reserved size.
    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    /// Current size (read from the shared entry, clamped to the max size fixed at open).
    /// Over the device: the size mapped for this handle, as the device last said (its open,
    /// this handle's grows and [`Section::refresh_size`], which catches up with others').
    pub fn size(&self) -> u64 {
        if self.ns.device().is_some() {
            return self.vouched_size().min(self.max_size);
        }
        let off = self
            .ns
            .layout
            .object_entry(self.slot)
            .map(|b| b + OBJ_SIZE_OFF);
        off.and_then(|o| self.ns.mem().load_u64(o, Ordering::Acquire).ok())
            .map_or(0, |s| s.min(self.max_size))
    }

    /// Whether the section was deleted (its name is gone; it lives until the last close).
    /// Over the device (a VM sees no entry): a delete through this handle, or one the
    /// device's event queue told of (DELETED, [`crate::DeviceTransport::news`]), which
    /// comes a moment after the delete.
    pub fn is_deleted(&self) -> bool {
        if let Some(dev) = self.ns.device() {
            return self.deleted.load(Ordering::Acquire)
                || dev
                    .news(self.slot, self.generation)
                    .is_some_and(|n| n.deleted);
        }
        object::state(&self.ns.mem(), &self.ns.layout, self.slot)
            .ok()
            .is_none_or(|s| s != object_state::LIVE)
    }

    /// Before an access to the section's memory: writes need a writable handle, this peer
    /// must still be attached and the hold not revoked.
    pub(crate) fn check_live(&self, write: bool) -> Result<(), Error> {
        if write && !self.writable {
            return Err(Status::AccessDenied.into());
        }
        // After a reclaim the memory may belong to another section: never write it then.
        self.ns.attached()?;
        if self.is_revoked() {
            return Err(Error::Revoked {
                slot: self.slot,
                generation: self.generation,
            });
        }
        Ok(())
    }

    fn check(&self, at: u64, len: usize, write: bool) -> Result<u64, Error> {
        self.check_live(write)?;
        let len = len as u64;
        match at.checked_add(len) {
            Some(end) if end <= self.size() => Ok(self.offset.0 + at),
            _ => Err(Status::InvalidParameter.into()),
        }
    }

    /// Copies `buf.len()` bytes at `at` out of the section.
    pub fn read_at(&self, at: u64, buf: &mut [u8]) -> Result<(), Error> {
        let off = self.check(at, buf.len(), false)?;
        Ok(self.ns.mem().read_bytes(off, buf)?)
    }

    /// Copies `data` into the section at `at`.
    pub fn write_at(&self, at: u64, data: &[u8]) -> Result<(), Error> {
        let off = self.check(at, data.len(), true)?;
        Ok(self.ns.mem().write_bytes(off, data)?)
    }

    /// Raw pointer to the section's first byte, for zero-copy use. The memory is shared with
    /// other VMs: access it only with volatile or atomic operations, within [`Self::size`]
    /// (the reservation extends to `max_size`; grow exposes more of it), and only while
    /// this handle is open.
    pub fn as_ptr(&self) -> *mut u8 {
        let base = self.ns.mem().base().as_ptr();
        // The offset was validated against the mapping when the handle was opened.
        base.wrapping_add(usize::try_from(self.offset.0).unwrap_or(usize::MAX))
    }

    /// Grows the exposed size to `new_size` (≤ max size). The section never moves.
    pub fn grow(&self, new_size: u64) -> Result<(), Error> {
        self.grow_vouched(new_size).map(|_| ())
    }

    /// [`Section::grow`], returning the section's size after the request as the host's
    /// record says. The host names it also when it refuses with INVALID_PARAMETER because
    /// the section is already larger (FORMAT.md §9), so `grow_vouched(0)` asks the size
    /// without changing anything; either way it is kept in [`Section::vouched_size`].
    pub(crate) fn grow_vouched(&self, new_size: u64) -> Result<u64, Error> {
        if new_size > self.max_size {
            return Err(Status::InvalidParameter.into());
        }
        let resp = self
            .ns
            .call(&mailbox::grow_request(self.slot, self.generation, new_size))?;
        let ours = resp.slot == self.slot.raw() && resp.generation == self.generation.raw();
        if ours {
            self.vouched
                .fetch_max(resp.size.min(self.max_size), Ordering::AcqRel);
        }
        match Status::from_code(resp.status) {
            Some(Status::Success) => Ok(self.vouched_size()),
            Some(s) => Err(s.into()),
            None => Err(Error::BadResponse(resp.status, self.slot)),
        }
    }

    /// Asks the backend the section's size now and returns it; over the device this also
    /// maps the pages others' grows added since this handle last looked (over a header
    /// [`Section::size`] follows others' growth by itself).
    pub fn refresh_size(&self) -> Result<u64, Error> {
        // A GROW to 0 changes nothing: the backend answers INVALID_PARAMETER with the
        // section's size (FORMAT.md §9), which `grow_vouched` keeps.
        match self.grow_vouched(0) {
            Ok(_) | Err(Error::Status(Status::InvalidParameter)) => {}
            Err(e) => return Err(e),
        }
        Ok(self.size().max(self.vouched_size().min(self.max_size)))
    }

    /// The largest size the host has told this handle the section has (0 before any
    /// GROW by this handle). Sizes only grow, so the section is at least this large.
    pub(crate) fn vouched_size(&self) -> u64 {
        self.vouched.load(Ordering::Acquire)
    }

    /// Deletes the section (LSA DeleteSharedMemory): its name disappears now, its memory is
    /// freed when the last handle closes. This handle stays usable until closed.
    pub fn delete(&self) -> Result<(), Error> {
        self.ns.delete_object(self.slot, self.generation)?;
        self.deleted.store(true, Ordering::Release);
        Ok(())
    }

    /// Another handle on the same section (works on a deleted section too). Over the
    /// device: STATUS_NOT_SUPPORTED (a VM opens by name; open the name again).
    pub fn duplicate(&self) -> Result<Section<'ns, T>, Error> {
        if self.ns.device().is_some() {
            return Err(Status::NotSupported.into());
        }
        let info = self.ns.hold(self.slot, self.generation, true)?;
        let mut held = Held::from_entry(&info);
        held.writable = self.writable;
        Ok(self.ns.section(&held))
    }

    /// Closes the handle, reporting errors (dropping closes too, silently).
    pub fn close(mut self) -> Result<(), Error> {
        self.open = false;
        self.ns.release(self.slot, self.generation, self.handle)
    }

    /// Whether the section was destroyed behind this process's back (someone cleared its
    /// hold, docs/FORMAT.md §11a): reads and writes then fail with [`Error::Revoked`] and
    /// the memory at [`Section::as_ptr`] is no longer the region's.
    pub fn is_revoked(&self) -> bool {
        self.ns.revoked(self.slot, self.generation)
    }
}

impl<T: Transport> Drop for Section<'_, T> {
    fn drop(&mut self) {
        if self.open {
            let _ = self.ns.release(self.slot, self.generation, self.handle);
        }
    }
}

/// For the block allocator (`blocks.rs`): the region, this peer's slot and incarnation, the
/// namespace, and the attach check every shared-memory write makes first.
impl<'ns, T: Transport> Section<'ns, T> {
    pub(crate) fn region(&self) -> RawRegion<'ns> {
        self.ns.mem()
    }
    pub(crate) fn peer(&self) -> (PeerSlot, u64) {
        (
            self.ns.peer_slot,
            self.ns.incarnation.load(Ordering::Relaxed),
        )
    }
    pub(crate) fn namespace(&self) -> &'ns Namespace<T> {
        self.ns
    }
    pub(crate) fn ensure_attached(&self) -> Result<(), Error> {
        self.ns.attached()
    }
    pub(crate) fn is_writable(&self) -> bool {
        self.writable
    }
}
