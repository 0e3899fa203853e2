//! The request queue (queue 0) as this process drives it: a split virtqueue in a small
//! "guest memory" memfd shared with vshmd, and the request slots its chains point at.
//!
//! Guest memory (at guest-physical address [`GPA`]):
//!
//! | offset | what |
//! |---|---|
//! | 0x0000 | descriptor table ([`QUEUE_SIZE`] × 16 bytes) |
//! | 0x1000 | available ring |
//! | 0x2000 | used ring |
//! | 0x4000 | [`SLOTS`] request slots of 0x800 bytes: the 1280-byte request, then the 768-byte response |
//! | 0x1_9000 | the event queue (queue 1, when `VSHM_F_EVENTQ` is negotiated): descriptors, available ring (0x1_9400), used ring (0x1_9800) |
//! | 0x1_a000 | its [`EVENT_QUEUE_SIZE`] event buffers of 24 bytes, descriptor `i` → buffer `i`, always all posted |
//! | 0x2_0000 | LIST's records area ([`LIST_ROOM`] bytes, one LIST at a time) |
//!
//! Slot `i` owns descriptors `3i` (request, device-readable), `3i+1` (response,
//! device-writable) and `3i+2` (LIST's records, device-writable), so a chain's head names
//! its slot. A slot is taken when its chain is posted and given back only when the device
//! has returned the chain on the used ring: a caller that stopped waiting leaves it
//! abandoned until then, so a late answer never lands in another request's buffers.

use std::collections::HashMap;
use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::Ordering;

use vhost::VhostUserMemoryRegionInfo;
use vshm_format::layout::{kind, object_flags, op, Request, Response};
use vshm_format::shm::{bytes_of, bytes_of_mut, zeroed, RawRegion, SharedMemory};
use vshm_format::virtio::{
    HandleFields, VirtioVshmEvent, EVENT_BYTES, EVENT_CHANGED, EVENT_DELETED, EVENT_SIGNALLED,
    LOCK_TRY, MAX_HANDLES, OP_CLOSE, OP_OPEN, OP_SIGNAL, OP_WAIT,
};
use vshm_format::Status;

use crate::host::Mapping;
use crate::TransportError;

/// Guest-physical address of the guest memory (any address: only descriptors use it).
pub(super) const GPA: u64 = 0x10_0000;
/// Entries of the request queue.
pub(super) const QUEUE_SIZE: u16 = 128;
/// Request slots (three descriptors each).
pub(super) const SLOTS: usize = (QUEUE_SIZE / 3) as usize;
/// Slots a WAIT never takes: however many threads wait, SIGNAL, CLOSE, OPEN... find one.
pub(super) const NON_WAIT_RESERVE: usize = 8;
/// The most slots WAITs occupy at once (more WAITs wait for one of these).
pub(super) const WAIT_SLOTS: usize = SLOTS - NON_WAIT_RESERVE;

/// Whether a request of `op` may stay pending until something happens (a WAIT, or a LOCK
/// queued for a mutex): such requests share [`WAIT_SLOTS`].
pub(super) fn parks(op: u32, flags: u32) -> bool {
    op == OP_WAIT || (op == vshm_format::layout::op::LOCK && flags & LOCK_TRY == 0)
}
const DESC: u64 = 0x0000;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const SLOT_BASE: u64 = 0x4000;
const SLOT_BYTES: u64 = 0x800;
const LIST_AREA: u64 = 0x2_0000;
/// Bytes of the guest memory.
pub(super) const GUEST_BYTES: u64 = 4 << 20;
/// The most room a LIST gets for its records (the rest of the guest memory).
pub(super) const LIST_ROOM: u32 = (4 << 20) - 0x2_0000;
const _: () = assert!(LIST_AREA + LIST_ROOM as u64 == GUEST_BYTES);

const REQUEST_BYTES: u64 = core::mem::size_of::<Request>() as u64;
const RESPONSE_BYTES: u64 = core::mem::size_of::<Response>() as u64;
const _: () = assert!(REQUEST_BYTES + RESPONSE_BYTES <= SLOT_BYTES);
const _: () = assert!(SLOT_BASE + SLOTS as u64 * SLOT_BYTES <= LIST_AREA);
const _: () = assert!(DESC + 16 * QUEUE_SIZE as u64 <= AVAIL);
const _: () = assert!(AVAIL + 6 + 2 * QUEUE_SIZE as u64 <= USED);
const _: () = assert!(USED + 6 + 8 * QUEUE_SIZE as u64 <= SLOT_BASE);

/// Entries (and event buffers) of the event queue.
pub(super) const EVENT_QUEUE_SIZE: u16 = 64;
const EV_DESC: u64 = 0x1_9000;
const EV_AVAIL: u64 = 0x1_9400;
const EV_USED: u64 = 0x1_9800;
const EV_BUFS: u64 = 0x1_a000;
const EV_BYTES: u64 = EVENT_BYTES as u64;
const _: () = assert!(SLOT_BASE + SLOTS as u64 * SLOT_BYTES <= EV_DESC);
const _: () = assert!(EV_DESC + 16 * EVENT_QUEUE_SIZE as u64 <= EV_AVAIL);
const _: () = assert!(EV_AVAIL + 6 + 2 * EVENT_QUEUE_SIZE as u64 <= EV_USED);
const _: () = assert!(EV_USED + 6 + 8 * EVENT_QUEUE_SIZE as u64 <= EV_BUFS);
const _: () = assert!(EV_BUFS + EVENT_QUEUE_SIZE as u64 * EV_BYTES <= LIST_AREA);

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// A lock poisoned by a panicking thread, or guest memory that cannot be reached (never,
/// with the layout's constant offsets): an I/O error.
pub(super) const EIO: TransportError = TransportError::Os(libc::EIO);
/// The device broke the protocol (an answer that cannot be one).
pub(super) const EPROTO: TransportError = TransportError::Os(libc::EPROTO);

/// A fresh memfd, close-on-exec, that may be sealed.
pub(super) fn memfd(name: &CStr) -> io::Result<File> {
    // SAFETY: memfd_create with a valid NUL-terminated name and flags; the result is checked.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just created, owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The guest memory: a memfd mapped here and given to vshmd with SET_MEM_TABLE.
#[derive(Debug)]
pub(super) struct GuestMemory {
    file: File,
    map: Mapping,
}

impl GuestMemory {
    /// A zeroed guest memory of [`GUEST_BYTES`], sealed at that size.
    pub(super) fn new() -> io::Result<GuestMemory> {
        let file = memfd(c"vshm-vhost-user-queue")?;
        file.set_len(GUEST_BYTES)?;
        // Its size for good: vshmd maps it too, and a shrink (by anyone holding the fd)
        // would make vshmd's accesses fault.
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on a descriptor `file` owns; the result is checked.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let map = Mapping::new(&file, GUEST_BYTES)?;
        Ok(GuestMemory { file, map })
    }

    /// The memory, for the ring's accesses.
    pub(super) fn region(&self) -> RawRegion<'_> {
        self.map.region()
    }

    /// This process's address of guest offset `offset` (SET_VRING_ADDR takes them).
    pub(super) fn host_address(&self, offset: u64) -> u64 {
        self.map.region().base().as_ptr() as u64 + offset
    }

    /// The SET_MEM_TABLE entry (the fd stays ours; vhost sends a copy).
    pub(super) fn table_entry(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: GPA,
            memory_size: GUEST_BYTES,
            userspace_addr: self.host_address(0),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }
}

/// Where the request queue's rings are, as this process's addresses: (descriptors,
/// available, used).
pub(super) fn ring_addresses(mem: &GuestMemory) -> (u64, u64, u64) {
    (
        mem.host_address(DESC),
        mem.host_address(AVAIL),
        mem.host_address(USED),
    )
}

/// Where the event queue's rings are, as [`ring_addresses`].
pub(super) fn event_ring_addresses(mem: &GuestMemory) -> (u64, u64, u64) {
    (
        mem.host_address(EV_DESC),
        mem.host_address(EV_AVAIL),
        mem.host_address(EV_USED),
    )
}

/// The driver's side of the event queue: every buffer is posted at the start and posted
/// again as soon as its event is read.
#[derive(Debug)]
struct EventQueue {
    next_avail: u16,
    last_used: u16,
}

impl EventQueue {
    /// Writes the descriptors (one 24-byte device-writable buffer each) and makes them all
    /// available.
    fn start(mem: &RawRegion<'_>) -> Result<EventQueue, TransportError> {
        let mut q = EventQueue {
            next_avail: 0,
            last_used: 0,
        };
        for i in 0..EVENT_QUEUE_SIZE {
            let at = EV_BUFS + u64::from(i) * EV_BYTES;
            write_desc_at(mem, EV_DESC, i, at, EV_BYTES, VIRTQ_DESC_F_WRITE, 0)?;
            q.offer(mem, i)?;
        }
        q.publish(mem)?;
        Ok(q)
    }

    /// Puts buffer `id` on the available ring (seen once [`EventQueue::publish`]ed).
    fn offer(&mut self, mem: &RawRegion<'_>, id: u16) -> Result<(), TransportError> {
        let entry = EV_AVAIL + 4 + 2 * u64::from(self.next_avail % EVENT_QUEUE_SIZE);
        mem.write_bytes(entry, &id.to_le_bytes()).map_err(|_| EIO)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(())
    }

    fn publish(&self, mem: &RawRegion<'_>) -> Result<(), TransportError> {
        let word = u32::from(self.next_avail) << 16;
        mem.store_u32(EV_AVAIL, word.to_le(), Ordering::Release)
            .map_err(|_| EIO)
    }

    /// Takes the events the device wrote, posting their buffers again; returns them and
    /// whether any buffer was posted (the caller kicks). An entry naming no buffer, or one
    /// shorter than an event, carries none.
    fn reap(
        &mut self,
        mem: &RawRegion<'_>,
    ) -> Result<(Vec<VirtioVshmEvent>, bool), TransportError> {
        let word = u32::from_le(mem.load_u32(EV_USED, Ordering::Acquire).map_err(|_| EIO)?);
        let idx = u16::try_from(word >> 16).unwrap_or(0);
        let mut events = Vec::new();
        let mut posted = false;
        // At most a ring's worth: a device that moves its index further says nothing more.
        let mut budget = EVENT_QUEUE_SIZE;
        while self.last_used != idx && budget > 0 {
            budget -= 1;
            let entry = EV_USED + 4 + 8 * u64::from(self.last_used % EVENT_QUEUE_SIZE);
            let mut e = [0u8; 8];
            mem.read_bytes(entry, &mut e).map_err(|_| EIO)?;
            self.last_used = self.last_used.wrapping_add(1);
            let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            let Some(id) = u16::try_from(id).ok().filter(|&i| i < EVENT_QUEUE_SIZE) else {
                continue;
            };
            if u64::from(len) >= EV_BYTES {
                let mut b = [0u8; EVENT_BYTES];
                mem.read_bytes(EV_BUFS + u64::from(id) * EV_BYTES, &mut b)
                    .map_err(|_| EIO)?;
                events.push(VirtioVshmEvent::from_bytes(&b));
            }
            self.offer(mem, id)?;
            posted = true;
        }
        if posted {
            self.publish(mem)?;
        }
        Ok((events, posted))
    }
}

/// One request slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    /// Taken by a caller that is about to post it.
    Taken,
    /// Posted with this `req_seq`; its caller waits.
    Posted {
        seq: u64,
    },
    /// The device returned it with `len` bytes written; its caller has not looked yet.
    Answered {
        seq: u64,
        len: u32,
    },
    /// Posted with this `req_seq`, and its caller stopped waiting (or the transport posted
    /// it on its own): freed when the device returns it.
    Abandoned {
        seq: u64,
    },
}

/// What a caller's slot holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Progress {
    /// No answer yet.
    Pending,
    /// Answered: the response was read (and the slot given back).
    Answered,
}

/// What a slot's request was: its op and the object it named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Sent {
    pub(super) op: u32,
    /// It may stay pending ([`parks`]): it counts against [`WAIT_SLOTS`].
    pub(super) parks: bool,
    pub(super) slot: u32,
    pub(super) generation: u64,
    pub(super) size: u64,
}

impl Sent {
    fn of(req: &Request) -> Sent {
        Sent {
            op: req.op,
            parks: parks(req.op, req.flags),
            slot: req.slot,
            generation: req.generation,
            size: req.size,
        }
    }
}

/// What the transport knows of an object it holds handles on, learnt from the replies to
/// the OPENs and CREATEs that made them. Forgotten when the last of them is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Known {
    /// `vshm_format::layout::kind`.
    pub(super) kind: u32,
    /// `vshm_format::layout::object_flags`.
    pub(super) flags: u32,
    /// Handles this process has on it (OPEN/CREATE replies minus CLOSEs).
    handles: u32,
    /// A DELETED event came for it.
    pub(super) deleted: bool,
    /// Its change count as the latest OPEN/CREATE reply or event told it.
    pub(super) change_count: u64,
}

/// How a request whose caller gave up is undone once its answer says it did something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Undo {
    /// CLOSE the handle the reply made (its window offset names it).
    Close,
    /// UNLOCK the mutex with the token the LOCK carried.
    Unlock,
    /// UNLOCK it with another token of this VM: a release on behalf of that thread, which
    /// keeps it abandoned for the next owner (the grant said ABANDONED, and nobody heard).
    UnlockAbandoned,
    /// SIGNAL the event again: the WAIT took an auto-reset event's signal nobody got.
    GiveBackSignal,
}

/// The undo table: (request op, answer status) → what undoes it. Anything else needs no
/// undo (a refusal or a timeout took nothing; CLOSE, SIGNAL, UNLOCK give rather than take).
const UNDO: [(u32, Status, Undo); 7] = [
    (OP_OPEN, Status::Success, Undo::Close),
    (OP_OPEN, Status::ObjectNameExists, Undo::Close),
    (op::CREATE, Status::Success, Undo::Close),
    (op::CREATE, Status::ObjectNameExists, Undo::Close),
    (op::LOCK, Status::Success, Undo::Unlock),
    (op::LOCK, Status::Abandoned, Undo::UnlockAbandoned),
    (OP_WAIT, Status::Success, Undo::GiveBackSignal),
];

/// A thread token other than `token` (non-zero, below 2³²).
fn other_token(token: u64) -> u64 {
    if token == u64::from(u32::MAX) || token == 0 {
        1
    } else {
        token + 1
    }
}

/// A request of `op` naming (`slot`, `generation`) with `size`.
fn request_on(op: u32, slot: u32, generation: u64, size: u64) -> Request {
    let mut r: Request = zeroed();
    r.op = op;
    r.slot = slot;
    r.generation = generation;
    r.size = size;
    r
}

/// The request that undoes `sent`, answered `resp`, whose caller is not there to take what
/// it got; `known` is what is known of the object `sent` named. `None`: nothing to undo.
pub(super) fn undo(sent: &Sent, resp: &Response, known: Option<&Known>) -> Option<Request> {
    let status = Status::from_code(resp.status)?;
    let &(_, _, how) = UNDO
        .iter()
        .find(|(op, st, _)| *op == sent.op && *st == status)?;
    match how {
        Undo::Close => Some(request_on(
            OP_CLOSE,
            resp.slot,
            resp.generation,
            resp.offset,
        )),
        Undo::Unlock => Some(request_on(
            op::UNLOCK,
            sent.slot,
            sent.generation,
            sent.size,
        )),
        Undo::UnlockAbandoned => Some(request_on(
            op::UNLOCK,
            sent.slot,
            sent.generation,
            other_token(sent.size),
        )),
        Undo::GiveBackSignal => {
            let auto_event = known.is_some_and(|k| {
                k.kind == kind::EVENT && k.flags & object_flags::MANUAL_RESET == 0
            });
            auto_event.then(|| request_on(OP_SIGNAL, sent.slot, sent.generation, 0))
        }
    }
}

/// What [`Queue::reap`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Reaped {
    /// A slot was answered or freed: wake the callers.
    pub(super) changed: bool,
    /// Requests were posted (undos): kick the queue.
    pub(super) posted: bool,
    /// Event buffers were posted again: kick the event queue.
    pub(super) events_posted: bool,
}

/// The driver's side of the request queue: which slots are in use and how far the rings
/// have gone. Lives under the transport's mutex.
#[derive(Debug)]
pub(super) struct Queue {
    slots: [Slot; SLOTS],
    /// The request each slot that is not free carries (its op from the moment it is taken).
    sent: [Sent; SLOTS],
    /// The slot whose chain has the LIST area, if any.
    list_holder: Option<usize>,
    next_avail: u16,
    last_used: u16,
    next_seq: u64,
    /// The backend hung up: every pending and later call fails.
    pub(super) gone: bool,
    /// What is known of the objects held, by (slot, generation); at most [`MAX_HANDLES`]
    /// (a VM cannot hold more).
    known: HashMap<(u32, u64), Known>,
    /// The event queue, once started.
    events: Option<EventQueue>,
}

impl Queue {
    pub(super) fn new() -> Queue {
        Queue {
            slots: [Slot::Free; SLOTS],
            sent: [Sent::default(); SLOTS],
            list_holder: None,
            next_avail: 0,
            last_used: 0,
            next_seq: 1,
            gone: false,
            known: HashMap::new(),
            events: None,
        }
    }

    /// Slots WAITs occupy (taken, posted, answered or abandoned).
    fn waits(&self) -> usize {
        self.slots
            .iter()
            .zip(&self.sent)
            .filter(|(s, r)| **s != Slot::Free && r.parks)
            .count()
    }

    /// A free slot for a request of `op` (with the LIST area too if `list`), taken; `None`
    /// when every slot (or the LIST area) is in use, or `op` is a WAIT and WAITs have
    /// [`WAIT_SLOTS`] already.
    pub(super) fn take_slot(&mut self, list: bool, op: u32, flags: u32) -> Option<usize> {
        if list && self.list_holder.is_some() {
            return None;
        }
        let parks = parks(op, flags);
        if parks && self.waits() >= WAIT_SLOTS {
            return None;
        }
        let i = self.slots.iter().position(|s| *s == Slot::Free)?;
        self.slots[i] = Slot::Taken;
        self.sent[i] = Sent {
            op,
            parks,
            ..Sent::default()
        };
        if list {
            self.list_holder = Some(i);
        }
        Some(i)
    }

    /// Gives back a slot that was never posted.
    pub(super) fn untake(&mut self, slot: usize) {
        self.free(slot);
    }

    fn free(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            *s = Slot::Free;
        }
        if self.list_holder == Some(slot) {
            self.list_holder = None;
        }
    }

    /// The caller of `slot` stops waiting: the slot is freed when the device returns it,
    /// and what its answer granted is undone then. Returns whether a request was posted
    /// (an undo of an answer that came in the meantime): the caller kicks.
    pub(super) fn abandon(&mut self, mem: &RawRegion<'_>, slot: usize) -> bool {
        match self.slots.get(slot) {
            Some(&Slot::Posted { seq }) => self.slots[slot] = Slot::Abandoned { seq },
            Some(&Slot::Answered { seq, len }) => return self.give_up(mem, slot, seq, len),
            Some(Slot::Taken) => self.free(slot),
            _ => {}
        }
        false
    }

    /// `slot`'s answer (`len` bytes written, for `req_seq` `seq`), if it is a whole one
    /// for that request.
    fn answer(&self, mem: &RawRegion<'_>, slot: usize, seq: u64, len: u32) -> Option<Response> {
        if u64::from(len) < RESPONSE_BYTES {
            return None;
        }
        let mut resp: Response = zeroed();
        mem.read_bytes(slot_offset(slot) + REQUEST_BYTES, bytes_of_mut(&mut resp))
            .ok()?;
        (resp.resp_seq == seq).then_some(resp)
    }

    /// Learns from `resp`, the answer to `sent`, which handles this process has.
    fn learn(&mut self, sent: &Sent, resp: &Response) {
        let status = Status::from_code(resp.status);
        match sent.op {
            OP_OPEN | op::CREATE
                if matches!(status, Some(Status::Success | Status::ObjectNameExists)) =>
            {
                let key = (resp.slot, resp.generation);
                if !self.known.contains_key(&key) && self.known.len() >= MAX_HANDLES {
                    // More objects than a VM can hold: the device is not telling the truth.
                    return;
                }
                let f = HandleFields::read(resp);
                let k = self.known.entry(key).or_insert(Known {
                    kind: f.kind,
                    flags: f.object_flags,
                    handles: 0,
                    deleted: false,
                    change_count: 0,
                });
                k.handles = k.handles.saturating_add(1);
                k.change_count = k.change_count.max(f.change_count);
            }
            // The handle is gone whatever else the answer says, unless there was none.
            OP_CLOSE if status != Some(Status::InvalidHandle) => {
                let key = (sent.slot, sent.generation);
                if let Some(k) = self.known.get_mut(&key) {
                    k.handles = k.handles.saturating_sub(1);
                    if k.handles == 0 {
                        self.known.remove(&key);
                    }
                }
            }
            _ => {}
        }
    }

    /// What is known of the object (`slot`, `generation`), if this process holds it.
    pub(super) fn known(&self, slot: u32, generation: u64) -> Option<Known> {
        self.known.get(&(slot, generation)).copied()
    }

    /// Posts every event buffer (the event queue is set up in `mem`'s rings from now on).
    pub(super) fn start_events(&mut self, mem: &RawRegion<'_>) -> Result<(), TransportError> {
        self.events = Some(EventQueue::start(mem)?);
        Ok(())
    }

    /// Whether the event queue runs.
    pub(super) fn has_events(&self) -> bool {
        self.events.is_some()
    }

    /// Applies `e` to what is known of its object; `false` if no handle on it is known.
    fn hear(&mut self, e: &VirtioVshmEvent) -> bool {
        let Some(k) = self.known.get_mut(&(e.slot, e.generation)) else {
            return false;
        };
        match e.kind {
            EVENT_DELETED => k.deleted = true,
            EVENT_CHANGED | EVENT_SIGNALLED => k.change_count = k.change_count.max(e.value),
            _ => {}
        }
        true
    }

    /// Frees `slot`, answered (`seq`, `len`) with nobody to take the answer, and posts in
    /// it what undoes what the answer granted. Returns whether it posted.
    fn give_up(&mut self, mem: &RawRegion<'_>, slot: usize, seq: u64, len: u32) -> bool {
        let sent = self.sent[slot];
        let resp = self.answer(mem, slot, seq, len);
        self.free(slot);
        let Some(resp) = resp else {
            return false;
        };
        let known = self.known(sent.slot, sent.generation);
        let Some(req) = undo(&sent, &resp, known.as_ref()) else {
            return false;
        };
        if self.gone {
            // vshmd took everything back already.
            return false;
        }
        self.slots[slot] = Slot::Taken;
        match self.post(mem, slot, &req, 0) {
            Ok(seq) => {
                // Nobody waits for the undo's answer either.
                self.slots[slot] = Slot::Abandoned { seq };
                true
            }
            Err(_) => {
                self.free(slot);
                false
            }
        }
    }

    /// Writes `req` (with a fresh `req_seq`) into `slot` and makes its chain available:
    /// request, response and, with `room` > 0, `room` bytes of the LIST area (the caller
    /// took the slot with it). The caller kicks afterwards. Returns the `req_seq`.
    pub(super) fn post(
        &mut self,
        mem: &RawRegion<'_>,
        slot: usize,
        req: &Request,
        room: u32,
    ) -> Result<u64, TransportError> {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        let mut req = *req;
        req.req_seq = seq;
        let at = slot_offset(slot);
        let head = head_of(slot);
        mem.write_bytes(at, bytes_of(&req)).map_err(|_| EIO)?;
        // A response the device never writes reads as zero (and fails the checks).
        mem.zero(at + REQUEST_BYTES, RESPONSE_BYTES)
            .map_err(|_| EIO)?;
        let list = room > 0 && self.list_holder == Some(slot);
        let resp_flags = VIRTQ_DESC_F_WRITE | if list { VIRTQ_DESC_F_NEXT } else { 0 };
        write_desc(mem, head, at, REQUEST_BYTES, VIRTQ_DESC_F_NEXT, head + 1)?;
        write_desc(
            mem,
            head + 1,
            at + REQUEST_BYTES,
            RESPONSE_BYTES,
            resp_flags,
            head + 2,
        )?;
        if list {
            write_desc(
                mem,
                head + 2,
                LIST_AREA,
                u64::from(room),
                VIRTQ_DESC_F_WRITE,
                0,
            )?;
        }
        let entry = AVAIL + 4 + 2 * u64::from(self.next_avail % QUEUE_SIZE);
        mem.write_bytes(entry, &head.to_le_bytes())
            .map_err(|_| EIO)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        // flags (0: interrupts wanted) and idx in one word, after everything above.
        let word = u32::from(self.next_avail) << 16;
        mem.store_u32(AVAIL, word.to_le(), Ordering::Release)
            .map_err(|_| EIO)?;
        self.slots[slot] = Slot::Posted { seq };
        self.sent[slot] = Sent::of(&req);
        Ok(seq)
    }

    /// Reads the used ring's new entries and marks the slots they return answered (or
    /// frees abandoned ones, posting in them what undoes what their answers granted).
    /// Learns from OPEN, CREATE and CLOSE answers which handles this process has. Entries
    /// that name no posted chain are ignored: the device is another process, and one that
    /// misbehaves gets nothing from it.
    ///
    /// Then takes the event queue's events (news about the objects held; an event about
    /// one no handle is known on is dropped, after a second look at the request queue for
    /// the OPEN that made it, which the device answered before it told of the object).
    pub(super) fn reap(&mut self, mem: &RawRegion<'_>) -> Result<Reaped, TransportError> {
        let mut reaped = Reaped::default();
        self.reap_requests(mem, &mut reaped)?;
        let Some(events) = self.events.as_mut() else {
            return Ok(reaped);
        };
        let (heard, posted) = events.reap(mem)?;
        reaped.events_posted = posted;
        let unknown: Vec<VirtioVshmEvent> = heard.into_iter().filter(|e| !self.hear(e)).collect();
        if !unknown.is_empty() {
            self.reap_requests(mem, &mut reaped)?;
            for e in &unknown {
                self.hear(e);
            }
        }
        Ok(reaped)
    }

    fn reap_requests(
        &mut self,
        mem: &RawRegion<'_>,
        reaped: &mut Reaped,
    ) -> Result<(), TransportError> {
        let word = u32::from_le(mem.load_u32(USED, Ordering::Acquire).map_err(|_| EIO)?);
        let idx = u16::try_from(word >> 16).unwrap_or(0);
        while self.last_used != idx {
            let entry = USED + 4 + 8 * u64::from(self.last_used % QUEUE_SIZE);
            let mut e = [0u8; 8];
            mem.read_bytes(entry, &mut e).map_err(|_| EIO)?;
            self.last_used = self.last_used.wrapping_add(1);
            let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            let Some(slot) = slot_of(id) else {
                continue;
            };
            match self.slots[slot] {
                Slot::Posted { seq } => {
                    self.slots[slot] = Slot::Answered { seq, len };
                    if let Some(resp) = self.answer(mem, slot, seq, len) {
                        let sent = self.sent[slot];
                        self.learn(&sent, &resp);
                    }
                }
                Slot::Abandoned { seq } => {
                    if let Some(resp) = self.answer(mem, slot, seq, len) {
                        let sent = self.sent[slot];
                        self.learn(&sent, &resp);
                    }
                    reaped.posted |= self.give_up(mem, slot, seq, len);
                }
                Slot::Free | Slot::Taken | Slot::Answered { .. } => continue,
            }
            reaped.changed = true;
        }
        Ok(())
    }

    /// Whether `slot` was answered; if so reads its response (checked: the whole response
    /// written, for this request) and LIST's records into `records`, and gives the slot
    /// back.
    pub(super) fn collect(
        &mut self,
        mem: &RawRegion<'_>,
        slot: usize,
        records: &mut [u8],
    ) -> Result<Option<Response>, TransportError> {
        let Some(&Slot::Answered { seq, len }) = self.slots.get(slot) else {
            return Ok(None);
        };
        let list = self.list_holder == Some(slot);
        self.free(slot);
        let len = u64::from(len);
        if len < RESPONSE_BYTES {
            return Err(EPROTO);
        }
        let mut resp: Response = zeroed();
        mem.read_bytes(slot_offset(slot) + REQUEST_BYTES, bytes_of_mut(&mut resp))
            .map_err(|_| EIO)?;
        if resp.resp_seq != seq {
            return Err(EPROTO);
        }
        if list {
            // What the device says it wrote, within what it could have written.
            let wrote = usize::try_from(len - RESPONSE_BYTES).unwrap_or(usize::MAX);
            let said = usize::try_from(resp.size).unwrap_or(usize::MAX);
            let room = usize::try_from(LIST_ROOM).unwrap_or(usize::MAX);
            let n = wrote.min(said).min(records.len()).min(room);
            mem.read_bytes(LIST_AREA, &mut records[..n])
                .map_err(|_| EIO)?;
        }
        Ok(Some(resp))
    }

    /// Where `slot`'s caller stands.
    pub(super) fn progress(&self, slot: usize) -> Progress {
        match self.slots.get(slot) {
            Some(Slot::Answered { .. }) => Progress::Answered,
            _ => Progress::Pending,
        }
    }
}

fn slot_offset(slot: usize) -> u64 {
    SLOT_BASE + slot as u64 * SLOT_BYTES
}

/// The head descriptor of `slot`'s chain.
fn head_of(slot: usize) -> u16 {
    // SLOTS * 3 ≤ QUEUE_SIZE, so this fits; a slot index past SLOTS is never made.
    u16::try_from(slot * 3).unwrap_or(0)
}

/// The slot whose chain starts at `head`, if `head` is one.
fn slot_of(head: u32) -> Option<usize> {
    let head = usize::try_from(head).ok()?;
    (head % 3 == 0 && head / 3 < SLOTS).then_some(head / 3)
}

fn write_desc(
    mem: &RawRegion<'_>,
    index: u16,
    offset: u64,
    len: u64,
    flags: u16,
    next: u16,
) -> Result<(), TransportError> {
    write_desc_at(mem, DESC, index, offset, len, flags, next)
}

/// Writes descriptor `index` of the table at `table`.
fn write_desc_at(
    mem: &RawRegion<'_>,
    table: u64,
    index: u16,
    offset: u64,
    len: u64,
    flags: u16,
    next: u16,
) -> Result<(), TransportError> {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&(GPA + offset).to_le_bytes());
    d[8..12].copy_from_slice(&u32::try_from(len).map_err(|_| EIO)?.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_bytes(table + 16 * u64::from(index), &d)
        .map_err(|_| EIO)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the device: returns `head` with `len` bytes written, the response's
    /// `resp_seq` = `seq`.
    fn answer(mem: &RawRegion<'_>, head: u16, len: u32, seq: u64) {
        let slot = usize::from(head / 3);
        let at = slot_offset(slot) + REQUEST_BYTES;
        mem.write_bytes(at, &seq.to_le_bytes()).expect("resp_seq");
        let word = u32::from_le(mem.load_u32(USED, Ordering::Acquire).expect("used"));
        let idx = u16::try_from(word >> 16).expect("idx");
        let e = USED + 4 + 8 * u64::from(idx % QUEUE_SIZE);
        let mut b = [0u8; 8];
        b[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
        b[4..8].copy_from_slice(&len.to_le_bytes());
        mem.write_bytes(e, &b).expect("entry");
        mem.store_u32(
            USED,
            (u32::from(idx.wrapping_add(1)) << 16).to_le(),
            Ordering::Release,
        )
        .expect("idx");
    }

    #[test]
    fn an_answer_reaches_its_own_slot_and_a_late_one_frees_an_abandoned_slot() {
        let g = GuestMemory::new().expect("guest memory");
        let mem = g.region();
        let mut q = Queue::new();
        let a = q.take_slot(false, 0, 0).expect("slot");
        let b = q.take_slot(false, 0, 0).expect("slot");
        let req: Request = zeroed();
        let sa = q.post(&mem, a, &req, 0).expect("post");
        let sb = q.post(&mem, b, &req, 0).expect("post");
        assert_ne!(sa, sb);
        // b answered first (out of order).
        answer(&mem, head_of(b), 768, sb);
        assert!(q.reap(&mem).expect("reap").changed);
        assert_eq!(q.progress(a), Progress::Pending);
        assert_eq!(q.progress(b), Progress::Answered);
        let r = q.collect(&mem, b, &mut []).expect("ok").expect("answered");
        assert_eq!(r.resp_seq, sb);
        // a abandoned: its slot stays taken until the device returns it.
        assert!(!q.abandon(&mem, a), "nothing to undo yet");
        let c = q.take_slot(false, 0, 0).expect("slot");
        assert_ne!(c, a, "an abandoned slot is not reused");
        answer(&mem, head_of(a), 768, sa);
        assert_eq!(
            q.reap(&mem).expect("reap"),
            Reaped {
                changed: true,
                posted: false,
                events_posted: false,
            },
            "a zeroed request (op 0) granted nothing to undo"
        );
        assert_eq!(
            q.take_slot(false, 0, 0),
            Some(a),
            "freed by its late answer"
        );
    }

    #[test]
    fn the_guest_memory_cannot_be_shrunk_grown_or_unsealed() {
        let g = GuestMemory::new().expect("guest memory");
        let shrink = g.file.set_len(GUEST_BYTES / 2);
        assert_eq!(
            shrink.map_err(|e| e.raw_os_error()),
            Err(Some(libc::EPERM)),
            "a shrink would make vshmd's accesses fault"
        );
        assert_eq!(
            g.file
                .set_len(GUEST_BYTES * 2)
                .map_err(|e| e.raw_os_error()),
            Err(Some(libc::EPERM))
        );
        // SAFETY: F_ADD_SEALS on a descriptor this test owns; the result is checked.
        let rc = unsafe { libc::fcntl(g.file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
        assert_eq!(rc, -1, "the seals are sealed");
        assert_eq!(g.region().size(), GUEST_BYTES);
    }

    #[test]
    fn what_the_device_cannot_have_meant_is_ignored_or_refused() {
        let g = GuestMemory::new().expect("guest memory");
        let mem = g.region();
        let mut q = Queue::new();
        let a = q.take_slot(false, 0, 0).expect("slot");
        let req: Request = zeroed();
        let s = q.post(&mem, a, &req, 0).expect("post");
        // Heads that are no chain's, or no posted chain's.
        answer(&mem, 1, 768, s);
        answer(&mem, QUEUE_SIZE + 3, 768, s);
        answer(&mem, head_of(5), 768, s);
        assert!(!q.reap(&mem).expect("reap").changed);
        assert_eq!(q.progress(a), Progress::Pending);
        // A short answer, then one for another request.
        answer(&mem, head_of(a), 100, s);
        q.reap(&mem).expect("reap");
        assert_eq!(q.collect(&mem, a, &mut []), Err(EPROTO));
        let a = q.take_slot(false, 0, 0).expect("slot");
        let s = q.post(&mem, a, &req, 0).expect("post");
        answer(&mem, head_of(a), 768, s + 7);
        q.reap(&mem).expect("reap");
        assert_eq!(q.collect(&mem, a, &mut []), Err(EPROTO));
    }

    #[test]
    fn one_list_at_a_time_and_every_slot_can_be_taken_once() {
        let mut q = Queue::new();
        let l = q.take_slot(true, 0, 0).expect("list slot");
        assert_eq!(q.take_slot(true, 0, 0), None, "the LIST area is taken");
        q.untake(l);
        assert!(q.take_slot(true, 0, 0).is_some());
        let mut n = 1;
        while q.take_slot(false, 0, 0).is_some() {
            n += 1;
        }
        assert_eq!(n, SLOTS);
    }

    /// A response of `status` for (`slot`, `generation`), window offset `offset`, on an
    /// object of `kind` with `flags`.
    fn reply(
        status: Status,
        slot: u32,
        generation: u64,
        offset: u64,
        kind: u32,
        flags: u32,
    ) -> Response {
        let mut r: Response = zeroed();
        r.status = status.code();
        r.slot = slot;
        r.generation = generation;
        r.offset = offset;
        HandleFields {
            map_flags: 0,
            kind,
            object_flags: flags,
            change_count: 0,
        }
        .write(&mut r);
        r
    }

    fn sent(op: u32, slot: u32, generation: u64, size: u64) -> Sent {
        Sent {
            op,
            parks: parks(op, 0),
            slot,
            generation,
            size,
        }
    }

    #[test]
    fn the_undo_table_closes_granted_opens_unlocks_granted_locks_and_gives_back_taken_signals() {
        let auto = Known {
            kind: kind::EVENT,
            flags: 0,
            handles: 1,
            deleted: false,
            change_count: 0,
        };
        let manual = Known {
            flags: object_flags::MANUAL_RESET,
            ..auto
        };
        let section = Known {
            kind: kind::SECTION,
            ..auto
        };
        let undo_of = |s: Sent, r: Response, k: Option<&Known>| {
            undo(&s, &r, k).map(|q| (q.op, q.slot, q.generation, q.size))
        };
        // OPEN and CREATE that made a handle: CLOSE it (the window offset names it).
        for op in [OP_OPEN, op::CREATE] {
            for st in [Status::Success, Status::ObjectNameExists] {
                let r = reply(st, 5, 9, 0x3000, kind::SECTION, 0);
                assert_eq!(
                    undo_of(sent(op, 0, 0, 0), r, None),
                    Some((OP_CLOSE, 5, 9, 0x3000)),
                    "op {op} {st:?}"
                );
            }
            let refused = reply(Status::ObjectNameNotFound, 5, 9, 0x3000, 0, 0);
            assert_eq!(undo_of(sent(op, 0, 0, 0), refused, None), None);
        }
        // LOCK granted: UNLOCK with the LOCK's token; granted abandoned: with another token
        // of this VM, which releases it still abandoned for the next owner.
        let r = reply(Status::Success, 4, 2, 0, 0, 0);
        assert_eq!(
            undo_of(sent(op::LOCK, 4, 2, 77), r, None),
            Some((op::UNLOCK, 4, 2, 77))
        );
        let r = reply(Status::Abandoned, 4, 2, 0, 0, 0);
        assert_eq!(
            undo_of(sent(op::LOCK, 4, 2, 77), r, None),
            Some((op::UNLOCK, 4, 2, 78))
        );
        let last = u64::from(u32::MAX);
        assert_eq!(
            undo_of(sent(op::LOCK, 4, 2, last), r, None),
            Some((op::UNLOCK, 4, 2, 1))
        );
        let timed_out = reply(Status::Timeout, 4, 2, 0, 0, 0);
        assert_eq!(undo_of(sent(op::LOCK, 4, 2, 77), timed_out, None), None);
        // A WAIT that took an auto-reset event's signal: SIGNAL it back. Not a manual-reset
        // event's (nothing was taken), not a section's change, not a timeout.
        let done = reply(Status::Success, 3, 1, 0, 0, 0);
        let w = sent(OP_WAIT, 3, 1, 1000);
        assert_eq!(undo_of(w, done, Some(&auto)), Some((OP_SIGNAL, 3, 1, 0)));
        assert_eq!(undo_of(w, done, Some(&manual)), None);
        assert_eq!(undo_of(w, done, Some(&section)), None);
        assert_eq!(undo_of(w, done, None), None, "an object not known");
        assert_eq!(undo_of(w, timed_out, Some(&auto)), None);
        // What gives rather than takes needs no undo.
        for op in [OP_CLOSE, OP_SIGNAL, op::UNLOCK, op::DELETE, op::GROW] {
            assert_eq!(
                undo_of(sent(op, 3, 1, 0), done, Some(&auto)),
                None,
                "op {op}"
            );
        }
    }

    /// Plays the device: returns `head` with a whole response `resp` for `seq`.
    fn answer_with(mem: &RawRegion<'_>, head: u16, seq: u64, mut resp: Response) {
        resp.resp_seq = seq;
        let at = slot_offset(usize::from(head / 3)) + REQUEST_BYTES;
        mem.write_bytes(at, bytes_of(&resp)).expect("response");
        answer(mem, head, 768, seq);
    }

    /// The request in `slot` now.
    fn request_in(mem: &RawRegion<'_>, slot: usize) -> Request {
        let mut r: Request = zeroed();
        mem.read_bytes(slot_offset(slot), bytes_of_mut(&mut r))
            .expect("request");
        r
    }

    #[test]
    fn a_late_answer_that_granted_a_handle_is_undone_in_the_slot_it_frees() {
        let g = GuestMemory::new().expect("guest memory");
        let mem = g.region();
        let mut q = Queue::new();
        let a = q.take_slot(false, OP_OPEN, 0).expect("slot");
        let mut open: Request = zeroed();
        open.op = OP_OPEN;
        let s = q.post(&mem, a, &open, 0).expect("post");
        assert!(!q.abandon(&mem, a));
        answer_with(
            &mem,
            head_of(a),
            s,
            reply(Status::Success, 6, 8, 0x5000, kind::SECTION, 0),
        );
        let reaped = q.reap(&mem).expect("reap");
        assert!(reaped.posted, "an undo to kick");
        assert_eq!(
            q.known(6, 8).map(|k| k.handles),
            Some(1),
            "the handle it made"
        );
        let close = request_in(&mem, a);
        assert_eq!(
            (close.op, close.slot, close.generation, close.size),
            (OP_CLOSE, 6, 8, 0x5000)
        );
        assert_ne!(close.req_seq, s);
        assert_ne!(
            q.take_slot(false, 0, 0),
            Some(a),
            "the CLOSE is in flight in it"
        );
        // The CLOSE's answer frees the slot and forgets the handle; nothing more posted.
        answer_with(
            &mem,
            head_of(a),
            close.req_seq,
            reply(Status::Success, 6, 8, 0, 0, 0),
        );
        let reaped = q.reap(&mem).expect("reap");
        assert!(reaped.changed && !reaped.posted);
        assert_eq!(q.known(6, 8), None);
        // An answer that came before the caller gave up is undone at once.
        let b = q.take_slot(false, OP_OPEN, 0).expect("slot");
        let s = q.post(&mem, b, &open, 0).expect("post");
        answer_with(
            &mem,
            head_of(b),
            s,
            reply(Status::ObjectNameExists, 2, 3, 0x9000, kind::SECTION, 0),
        );
        q.reap(&mem).expect("reap");
        assert!(q.abandon(&mem, b), "posted the CLOSE");
        assert_eq!(request_in(&mem, b).op, OP_CLOSE);
    }

    /// Plays the device on the event queue: fills the buffer the next available entry
    /// names with `e` and returns it.
    fn tell(mem: &RawRegion<'_>, used_idx: &mut u16, e: VirtioVshmEvent) {
        let avail = *used_idx % EVENT_QUEUE_SIZE;
        let mut id = [0u8; 2];
        mem.read_bytes(EV_AVAIL + 4 + 2 * u64::from(avail), &mut id)
            .expect("avail");
        let id = u16::from_le_bytes(id);
        mem.write_bytes(EV_BUFS + u64::from(id) * EV_BYTES, &e.to_bytes())
            .expect("event");
        let entry = EV_USED + 4 + 8 * u64::from(*used_idx % EVENT_QUEUE_SIZE);
        let mut b = [0u8; 8];
        b[0..4].copy_from_slice(&u32::from(id).to_le_bytes());
        b[4..8].copy_from_slice(&24u32.to_le_bytes());
        mem.write_bytes(entry, &b).expect("entry");
        *used_idx = used_idx.wrapping_add(1);
        mem.store_u32(
            EV_USED,
            (u32::from(*used_idx) << 16).to_le(),
            Ordering::Release,
        )
        .expect("idx");
    }

    fn avail_idx(mem: &RawRegion<'_>) -> u16 {
        let word = u32::from_le(mem.load_u32(EV_AVAIL, Ordering::Acquire).expect("avail"));
        u16::try_from(word >> 16).expect("idx")
    }

    #[test]
    fn events_are_news_of_held_objects_only_their_buffers_go_back_and_a_close_forgets_them() {
        let g = GuestMemory::new().expect("guest memory");
        let mem = g.region();
        let mut q = Queue::new();
        q.start_events(&mem).expect("start");
        assert_eq!(avail_idx(&mem), EVENT_QUEUE_SIZE, "every buffer posted");
        // A handle on (2, 5), an event whose count was 3 at the open.
        let a = q.take_slot(false, OP_OPEN, 0).expect("slot");
        let mut open: Request = zeroed();
        open.op = OP_OPEN;
        let s = q.post(&mem, a, &open, 0).expect("post");
        let mut r = reply(Status::Success, 2, 5, 1 << 63, kind::EVENT, 0);
        HandleFields {
            map_flags: 0,
            kind: kind::EVENT,
            object_flags: 0,
            change_count: 3,
        }
        .write(&mut r);
        answer_with(&mem, head_of(a), s, r);
        q.reap(&mem).expect("reap");
        q.collect(&mem, a, &mut []).expect("ok").expect("answered");
        let k = q.known(2, 5).expect("known");
        assert_eq!((k.deleted, k.change_count), (false, 3));
        // More than a ring's worth of events, about it and about what is not held.
        let mut used = 0u16;
        let ev = |kind, slot, generation, value| VirtioVshmEvent {
            kind,
            slot,
            generation,
            value,
        };
        for i in 0..EVENT_QUEUE_SIZE {
            tell(&mem, &mut used, ev(EVENT_SIGNALLED, 2, 5, 4 + u64::from(i)));
        }
        let reaped = q.reap(&mem).expect("reap");
        assert!(reaped.events_posted, "buffers back: kick");
        assert_eq!(avail_idx(&mem), 2 * EVENT_QUEUE_SIZE);
        assert_eq!(
            q.known(2, 5).expect("known").change_count,
            3 + u64::from(EVENT_QUEUE_SIZE)
        );
        tell(&mem, &mut used, ev(EVENT_SIGNALLED, 2, 5, 1)); // older news: a lower bound stays
        tell(&mem, &mut used, ev(EVENT_DELETED, 2, 5, 0));
        tell(&mem, &mut used, ev(EVENT_DELETED, 9, 9, 0));
        tell(&mem, &mut used, ev(EVENT_CHANGED, 2, 6, 50));
        q.reap(&mem).expect("reap");
        let k = q.known(2, 5).expect("known");
        assert_eq!(
            (k.deleted, k.change_count),
            (true, 3 + u64::from(EVENT_QUEUE_SIZE))
        );
        assert_eq!(q.known(9, 9), None, "no news kept of what is not held");
        assert_eq!(q.known(2, 6), None);
        // The last handle closed: forgotten.
        let c = q.take_slot(false, OP_CLOSE, 0).expect("slot");
        let close = request_on(OP_CLOSE, 2, 5, 1 << 63);
        let s = q.post(&mem, c, &close, 0).expect("post");
        answer_with(&mem, head_of(c), s, reply(Status::Success, 0, 0, 0, 0, 0));
        q.reap(&mem).expect("reap");
        assert_eq!(q.known(2, 5), None);
    }

    #[test]
    fn waits_take_at_most_their_share_of_the_slots_and_leave_the_rest_to_other_requests() {
        let mut q = Queue::new();
        let mut waits = Vec::new();
        // LOCKs may stay pending too: they share the WAITs' part.
        let lock = vshm_format::layout::op::LOCK;
        while let Some(s) = q.take_slot(false, if waits.len() % 2 == 0 { OP_WAIT } else { lock }, 0)
        {
            waits.push(s);
        }
        assert_eq!(waits.len(), WAIT_SLOTS);
        assert_eq!(q.take_slot(false, lock, 0), None, "no LOCK past the share");
        // A try never stays pending: it is not held to the share.
        let try_lock = q
            .take_slot(false, lock, LOCK_TRY)
            .expect("a LOCK_TRY's slot");
        q.untake(try_lock);
        for _ in 0..NON_WAIT_RESERVE {
            assert!(q.take_slot(false, OP_SIGNAL, 0).is_some(), "the reserve");
        }
        assert_eq!(q.take_slot(false, OP_SIGNAL, 0), None, "every slot in use");
        // A WAIT's slot back: another WAIT may have it.
        q.untake(waits[0]);
        assert_eq!(q.take_slot(false, OP_WAIT, 0), Some(waits[0]));
    }
}
