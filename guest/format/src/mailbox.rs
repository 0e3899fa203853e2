//! Requests to the host through a peer's mailbox, and their responses.
//!
//! Peer side: take the peer-local mailbox lock, write the request fields, bump `req_seq`
//! (release), ring the host, wait until `resp_seq == req_seq`, copy the response out.
//! Host side: copy the request out in one volatile read, validate every field, act on its
//! private state, write the response, then `resp_seq` (release), ring the peer.

use core::sync::atomic::Ordering;

use crate::ids::{Generation, ObjectSlot, PeerSlot};
use crate::layout::{
    connect_refusal, kind, object_flags, op, refusal, Layout, Request, Response, CLOSED_HINT_MANY,
    MAX_NAME_BYTES, MB_CLOSED_HINT_OFF, MB_LOCK_OFF, MB_REQ_SEQ_OFF, MB_RESPONSE_OFF,
    MB_RESP_SEQ_OFF,
};
use crate::name::validate_name_bytes;
use crate::shm::{bytes_of, read_pod, zeroed, Fault, SharedMemory};
use crate::Status;

/// A request after validation, as the host acts on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// Create-or-open.
    Create {
        /// `None` = unnamed.
        name: Option<&'a str>,
        /// [`kind`].
        kind: u32,
        /// Reserve this much.
        max_size: u64,
        /// Expose this much.
        initial_size: u64,
        /// Live until deleted.
        persistent: bool,
        /// EVENT: stays signalled until reset.
        manual_reset: bool,
    },
    /// Delete (unlink) an object.
    Delete {
        /// Slot.
        slot: ObjectSlot,
        /// Generation.
        generation: Generation,
    },
    /// Grow a section.
    Grow {
        /// Slot.
        slot: ObjectSlot,
        /// Generation.
        generation: Generation,
        /// New size.
        size: u64,
    },
    /// Ring the waiters of an object that hold it.
    Wake {
        /// Slot.
        slot: ObjectSlot,
        /// Generation.
        generation: Generation,
    },
    /// Take a mutex through the host (granted now or queued).
    Lock {
        /// Slot.
        slot: ObjectSlot,
        /// Generation.
        generation: Generation,
        /// The caller's non-zero token (its thread id).
        token: u32,
    },
    /// Release a mutex with queued waiters (the host hands it over), or, on behalf of a
    /// dead owner of the same peer, as abandoned.
    Unlock {
        /// Slot.
        slot: ObjectSlot,
        /// Generation.
        generation: Generation,
        /// The caller's token.
        token: u32,
        /// On behalf of a dead owner: the owner token the caller saw in the owner word
        /// (`max_size`); the host acts only if the word still names it. `None` (0): the
        /// caller's own unlock.
        presumed_dead: Option<u32>,
    },
    /// Leave a mutex's queue.
    Cancel {
        /// Slot.
        slot: ObjectSlot,
        /// Generation.
        generation: Generation,
        /// The caller's token.
        token: u32,
    },
}

/// Decodes and validates a request copied out of shared memory. Every field is checked;
/// the error is the status to answer with.
pub fn decode<'a>(req: &'a Request, layout: &Layout) -> Result<Command<'a>, Status> {
    match req.op {
        op::CREATE => {
            if req.flags & !object_flags::ALL != 0 {
                return Err(Status::InvalidParameter);
            }
            if req.flags & object_flags::MANUAL_RESET != 0 && req.kind != kind::EVENT {
                return Err(Status::InvalidParameter);
            }
            let named = req.flags & object_flags::NAMED != 0;
            let name = if named {
                let len = req.name_len as usize;
                if len == 0 || len > MAX_NAME_BYTES {
                    return Err(Status::ObjectNameInvalid);
                }
                Some(validate_name_bytes(&req.name[..len])?)
            } else {
                if req.name_len != 0 {
                    return Err(Status::InvalidParameter);
                }
                None
            };
            match req.kind {
                kind::SECTION => {}
                kind::EVENT | kind::MUTEX => {
                    // No memory: the state lives in the entry's sync words.
                    if req.max_size != 0 || req.size != 0 {
                        return Err(Status::InvalidParameter);
                    }
                    return Ok(Command::Create {
                        name,
                        kind: req.kind,
                        max_size: 0,
                        initial_size: 0,
                        persistent: req.flags & object_flags::PERSISTENT != 0,
                        manual_reset: req.flags & object_flags::MANUAL_RESET != 0,
                    });
                }
                _ => return Err(Status::InvalidParameter),
            }
            if req.max_size == 0 || req.size > req.max_size || req.max_size > layout.heap_size {
                return Err(
                    if req.max_size > layout.heap_size && req.size <= req.max_size {
                        Status::InsufficientResources
                    } else {
                        Status::InvalidParameter
                    },
                );
            }
            Ok(Command::Create {
                name,
                kind: req.kind,
                max_size: req.max_size,
                initial_size: req.size,
                persistent: req.flags & object_flags::PERSISTENT != 0,
                manual_reset: false,
            })
        }
        op::DELETE => {
            if req.slot >= layout.max_objects {
                return Err(Status::InvalidHandle);
            }
            Ok(Command::Delete {
                slot: ObjectSlot(req.slot),
                generation: Generation(req.generation),
            })
        }
        op::GROW => {
            if req.slot >= layout.max_objects {
                return Err(Status::InvalidHandle);
            }
            Ok(Command::Grow {
                slot: ObjectSlot(req.slot),
                generation: Generation(req.generation),
                size: req.size,
            })
        }
        op::WAKE => {
            let (slot, generation) = target(req, layout)?;
            Ok(Command::Wake { slot, generation })
        }
        op::LOCK | op::UNLOCK | op::CANCEL => {
            let (slot, generation) = target(req, layout)?;
            let token = u32::try_from(req.size)
                .ok()
                .filter(|&t| t != 0)
                .ok_or(Status::InvalidParameter)?;
            Ok(match req.op {
                op::LOCK => Command::Lock {
                    slot,
                    generation,
                    token,
                },
                op::UNLOCK => Command::Unlock {
                    slot,
                    generation,
                    token,
                    presumed_dead: match u32::try_from(req.max_size) {
                        Ok(0) => None,
                        Ok(t) => Some(t),
                        Err(_) => return Err(Status::InvalidParameter),
                    },
                },
                _ => Command::Cancel {
                    slot,
                    generation,
                    token,
                },
            })
        }
        _ => Err(Status::InvalidParameter),
    }
}

/// The (slot, generation) an object request names; a slot outside the table is
/// STATUS_INVALID_HANDLE.
fn target(req: &Request, layout: &Layout) -> Result<(ObjectSlot, Generation), Status> {
    if req.slot >= layout.max_objects {
        return Err(Status::InvalidHandle);
    }
    Ok((ObjectSlot(req.slot), Generation(req.generation)))
}

/// Builds a CREATE request (name already validated by the caller).
pub fn create_request(
    name: Option<&str>,
    kind: u32,
    max_size: u64,
    initial_size: u64,
    persistent: bool,
) -> Request {
    let mut r = zeroed::<Request>();
    r.op = op::CREATE;
    r.kind = kind;
    r.max_size = max_size;
    r.size = initial_size;
    r.flags = if persistent {
        object_flags::PERSISTENT
    } else {
        0
    };
    if let Some(n) = name {
        (r.name, r.name_len) = crate::name::name_field(n);
        r.flags |= object_flags::NAMED;
    }
    r
}

/// Builds a CREATE request for an event (`manual_reset`) or a mutex: no memory.
pub fn create_sync_request(
    name: Option<&str>,
    kind: u32,
    persistent: bool,
    manual_reset: bool,
) -> Request {
    let mut r = create_request(name, kind, 0, 0, persistent);
    if manual_reset {
        r.flags |= object_flags::MANUAL_RESET;
    }
    r
}

/// Builds a WAKE request.
pub fn wake_request(slot: ObjectSlot, generation: Generation) -> Request {
    let mut r = zeroed::<Request>();
    r.op = op::WAKE;
    r.slot = slot.0;
    r.generation = generation.0;
    r
}

/// Builds a LOCK, UNLOCK or CANCEL request (`op`) for a mutex, carrying the caller's token.
pub fn mutex_request(op: u32, slot: ObjectSlot, generation: Generation, token: u32) -> Request {
    let mut r = zeroed::<Request>();
    r.op = op;
    r.slot = slot.0;
    r.generation = generation.0;
    r.size = u64::from(token);
    r
}

/// Builds an UNLOCK of the mutex in (`slot`, `generation`) on behalf of its owner
/// `dead_owner`, a thread of this peer known dead: the host releases it as abandoned if the
/// owner word still names that token (docs/FORMAT.md §6a).
pub fn unlock_on_behalf_request(
    slot: ObjectSlot,
    generation: Generation,
    token: u32,
    dead_owner: u32,
) -> Request {
    let mut r = mutex_request(op::UNLOCK, slot, generation, token);
    r.max_size = u64::from(dead_owner);
    r
}

/// Builds a DELETE request.
pub fn delete_request(slot: ObjectSlot, generation: Generation) -> Request {
    let mut r = zeroed::<Request>();
    r.op = op::DELETE;
    r.slot = slot.0;
    r.generation = generation.0;
    r
}

/// Builds a GROW request.
pub fn grow_request(slot: ObjectSlot, generation: Generation, size: u64) -> Request {
    let mut r = zeroed::<Request>();
    r.op = op::GROW;
    r.slot = slot.0;
    r.generation = generation.0;
    r.size = size;
    r
}

fn mailbox_base(layout: &Layout, peer_slot: PeerSlot) -> Result<u64, Fault> {
    layout.mailbox(peer_slot).ok_or(Fault::OutOfBounds {
        offset: u64::from(peer_slot.0),
        len: 0,
    })
}

/// Peer: tries to take the peer-local mailbox lock (one outstanding request per peer) for
/// `owner`, a non-zero token naming the taker (a guest's processes share one peer, so they
/// use their pid; a host process's threads can use 1). Loads before it CASes, so waiters do
/// not hammer uncached memory with locked operations.
pub fn try_lock<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
    owner: u32,
) -> Result<bool, Fault> {
    let base = mailbox_base(layout, peer_slot)?;
    if mem.load_u32(base + MB_LOCK_OFF, Ordering::Relaxed)? != 0 {
        return Ok(false);
    }
    Ok(mem.cas_u32(base + MB_LOCK_OFF, 0, owner.max(1))?.is_ok())
}

/// Peer: who holds the mailbox lock (0 = nobody).
pub fn lock_owner<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
) -> Result<u32, Fault> {
    let base = mailbox_base(layout, peer_slot)?;
    mem.load_u32(base + MB_LOCK_OFF, Ordering::Acquire)
}

/// Peer: takes the lock over from `dead`, an owner known to have died holding it.
pub fn steal_lock<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
    dead: u32,
    owner: u32,
) -> Result<bool, Fault> {
    let base = mailbox_base(layout, peer_slot)?;
    Ok(mem.cas_u32(base + MB_LOCK_OFF, dead, owner.max(1))?.is_ok())
}

/// Peer: releases the mailbox lock.
pub fn unlock<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
) -> Result<(), Fault> {
    let base = mailbox_base(layout, peer_slot)?;
    mem.store_u32(base + MB_LOCK_OFF, 0, Ordering::Release)
}

/// What a peer's close hint named when the host took it (FORMAT.md §9, `closed_hint`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClosedHint {
    /// Nothing: no close since the last take (or a peer that does not hint).
    None,
    /// One object slot.
    One(ObjectSlot),
    /// Several closes, or a value that names no slot: look at every object.
    Many,
}

/// Peer, after a close that left an object unheld and before it rings the host: names the
/// slot in its mailbox's `closed_hint`. A hint the host has not taken yet turns it into
/// [`CLOSED_HINT_MANY`]. Needs no mailbox lock (a CAS, then a store).
pub fn hint_closed<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
    closed: ObjectSlot,
) -> Result<(), Fault> {
    let off = mailbox_base(layout, peer_slot)? + MB_CLOSED_HINT_OFF;
    if mem.cas_u64(off, 0, u64::from(closed.0) + 1)?.is_err() {
        mem.store_u64(off, CLOSED_HINT_MANY, Ordering::Release)?;
    }
    Ok(())
}

/// Host, after a doorbell from the peer in `peer_slot`: takes its close hint (swaps it to
/// 0) and validates it: a slot outside the table is [`ClosedHint::Many`].
pub fn take_closed_hint<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
) -> Result<ClosedHint, Fault> {
    let off = mailbox_base(layout, peer_slot)? + MB_CLOSED_HINT_OFF;
    let v = mem.fetch_and_u64(off, 0)?;
    Ok(match v {
        0 => ClosedHint::None,
        v => match u32::try_from(v - 1) {
            Ok(s) if s < layout.max_objects => ClosedHint::One(ObjectSlot(s)),
            _ => ClosedHint::Many,
        },
    })
}

/// Peer (holding the lock): writes `req` and posts it; returns the sequence to wait for.
///
/// `req_seq` is 0 while the body is being written, so a host still copying an abandoned
/// earlier request sees the change and drops its copy instead of acting on a torn mix.
pub fn post<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
    req: &Request,
) -> Result<u64, Fault> {
    let base = mailbox_base(layout, peer_slot)?;
    // Continue from whichever is larger, so a scribbled or stale resp_seq can never make an
    // old response look like the answer to this request.
    let prev_req = mem.load_u64(base + MB_REQ_SEQ_OFF, Ordering::Acquire)?;
    let prev_resp = mem.load_u64(base + MB_RESP_SEQ_OFF, Ordering::Acquire)?;
    let seq = prev_req.max(prev_resp).wrapping_add(1).max(1);
    mem.store_u64(base + MB_REQ_SEQ_OFF, 0, Ordering::SeqCst)?;
    let bytes = bytes_of(req);
    // Everything after the seq and lock words (op onwards) up to the end of the name; the
    // peer's audit words after it are not part of a request (§11a).
    let end = crate::layout::const_usize(crate::layout::MB_AUDITED_SEQ_OFF);
    mem.write_bytes(base + 12, &bytes[12..end])?;
    mem.store_u64(base + MB_REQ_SEQ_OFF, seq, Ordering::Release)?;
    Ok(seq)
}

/// Peer: the response if the host has answered `seq`.
pub fn poll<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
    seq: u64,
) -> Result<Option<Response>, Fault> {
    let base = mailbox_base(layout, peer_slot)?;
    if mem.load_u64(base + MB_RESP_SEQ_OFF, Ordering::Acquire)? != seq {
        return Ok(None);
    }
    let resp: Response = read_pod(mem, base + MB_RESPONSE_OFF)?;
    Ok(Some(resp))
}

/// Host: the pending request of `peer_slot`, if its `req_seq` differs from `last_seen` (and
/// is not 0, "being written"). Returns the sequence and an unvalidated copy; a copy during
/// which `req_seq` changed is discarded (the writer rings again when it is done).
pub fn take_request<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
    last_seen: u64,
) -> Result<Option<(u64, Request)>, Fault> {
    let base = mailbox_base(layout, peer_slot)?;
    let seq = mem.load_u64(base + MB_REQ_SEQ_OFF, Ordering::Acquire)?;
    if seq == last_seen || seq == 0 {
        return Ok(None);
    }
    let req: Request = read_pod(mem, base)?;
    core::sync::atomic::fence(Ordering::Acquire);
    if mem.load_u64(base + MB_REQ_SEQ_OFF, Ordering::Relaxed)? != seq {
        return Ok(None);
    }
    Ok(Some((seq, req)))
}

/// Host: writes the response to `seq`, `resp_seq` last.
pub fn respond<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
    seq: u64,
    resp: &Response,
) -> Result<(), Fault> {
    let base = mailbox_base(layout, peer_slot)?;
    let bytes = bytes_of(resp);
    mem.write_bytes(base + MB_RESPONSE_OFF + 8, &bytes[8..])?;
    mem.store_u64(base + MB_RESP_SEQ_OFF, seq, Ordering::Release)
}

/// A response with only a status.
pub fn status_response(status: Status) -> Response {
    let mut r = zeroed::<Response>();
    r.status = status.code();
    r
}

/// Answers a request that failed to decode: the status, with the reason when it is a CREATE
/// larger than the whole heap (the only INSUFFICIENT_RESOURCES [`decode`] gives).
pub fn decode_failure(req: &Request, layout: &Layout, status: Status) -> Response {
    let mut r = status_response(status);
    if status == Status::InsufficientResources && req.op == op::CREATE {
        Refusal::LargerThanHeap {
            wanted: req.max_size,
            heap_size: layout.heap_size,
        }
        .write(&mut r);
    }
    r
}

/// Which limit refused a CREATE (`Response::reason` and the fields it uses, see
/// [`refusal`]). Only ever sent with STATUS_INSUFFICIENT_RESOURCES.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Every object slot is taken.
    ObjectTableFull {
        /// The table's size (`max_objects`).
        max_objects: u64,
    },
    /// No free heap extent is large enough.
    NoFreeExtent {
        /// Bytes needed (`max_size` rounded up to the alignment).
        wanted: u64,
        /// The largest free extent now.
        largest: u64,
    },
    /// `max_size` is larger than the whole heap.
    LargerThanHeap {
        /// The requested `max_size`.
        wanted: u64,
        /// The heap's size.
        heap_size: u64,
    },
    /// The range could not be punched out of the memfd.
    PrepareFailed {
        /// Bytes of the range.
        wanted: u64,
        /// The OS error number (0 if unknown).
        os_error: u32,
    },
    /// The object entry could not be published.
    PublishFailed,
    /// Enough memory would be free but part of it is in quarantine (§11a): retry later.
    InQuarantine {
        /// Bytes needed.
        wanted: u64,
        /// Bytes in quarantine now.
        quarantined: u64,
    },
    /// The name area has no free run long enough for the name (version 4).
    NameAreaFull {
        /// Bytes needed (the name's length rounded up to the granule).
        wanted: u64,
        /// The largest free run of the name area now.
        largest: u64,
    },
    /// A reason code this reader does not know.
    Other(u32),
}

impl Refusal {
    /// The reason a response carries, if any (`None` for reason 0 or a status other than
    /// STATUS_INSUFFICIENT_RESOURCES, with which the reason is meaningless).
    pub fn from_response(r: &Response) -> Option<Refusal> {
        if r.status != Status::InsufficientResources.code() {
            return None;
        }
        Some(match r.reason {
            refusal::NONE => return None,
            refusal::OBJECT_TABLE_FULL => Refusal::ObjectTableFull {
                max_objects: r.limit,
            },
            refusal::NO_FREE_EXTENT => Refusal::NoFreeExtent {
                wanted: r.wanted,
                largest: r.limit,
            },
            refusal::LARGER_THAN_HEAP => Refusal::LargerThanHeap {
                wanted: r.wanted,
                heap_size: r.limit,
            },
            refusal::PREPARE_FAILED => Refusal::PrepareFailed {
                wanted: r.wanted,
                os_error: r.os_error,
            },
            refusal::PUBLISH_FAILED => Refusal::PublishFailed,
            refusal::IN_QUARANTINE => Refusal::InQuarantine {
                wanted: r.wanted,
                quarantined: r.limit,
            },
            refusal::NAME_AREA_FULL => Refusal::NameAreaFull {
                wanted: r.wanted,
                largest: r.limit,
            },
            other => Refusal::Other(other),
        })
    }

    /// Fills `reason`, `os_error`, `limit` and `wanted` of `r`.
    pub fn write(&self, r: &mut Response) {
        let (reason, os_error, limit, wanted) = match *self {
            Refusal::ObjectTableFull { max_objects } => {
                (refusal::OBJECT_TABLE_FULL, 0, max_objects, 0)
            }
            Refusal::NoFreeExtent { wanted, largest } => {
                (refusal::NO_FREE_EXTENT, 0, largest, wanted)
            }
            Refusal::LargerThanHeap { wanted, heap_size } => {
                (refusal::LARGER_THAN_HEAP, 0, heap_size, wanted)
            }
            Refusal::PrepareFailed { wanted, os_error } => {
                (refusal::PREPARE_FAILED, os_error, 0, wanted)
            }
            Refusal::PublishFailed => (refusal::PUBLISH_FAILED, 0, 0, 0),
            Refusal::InQuarantine {
                wanted,
                quarantined,
            } => (refusal::IN_QUARANTINE, 0, quarantined, wanted),
            Refusal::NameAreaFull { wanted, largest } => {
                (refusal::NAME_AREA_FULL, 0, largest, wanted)
            }
            Refusal::Other(code) => (code, 0, 0, 0),
        };
        r.reason = reason;
        r.os_error = os_error;
        r.limit = limit;
        r.wanted = wanted;
    }
}

/// Bytes for people: `4096` → `4.0 KiB`, below 1 KiB exact (`512 B`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl core::fmt::Display for Bytes {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        #[allow(clippy::cast_precision_loss)] // for people
        let mut v = self.0 as f64;
        let mut u = 0;
        while v >= 1024.0 && u < UNITS.len() - 1 {
            v /= 1024.0;
            u += 1;
        }
        write!(f, "{v:.1} {}", UNITS[u])
    }
}

impl core::fmt::Display for Refusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Refusal::ObjectTableFull { max_objects } => {
                write!(f, "the object table is full ({max_objects} objects)")
            }
            Refusal::NoFreeExtent { wanted, largest } => write!(
                f,
                "no free heap extent of {} (largest {})",
                Bytes(wanted),
                Bytes(largest)
            ),
            Refusal::LargerThanHeap { wanted, heap_size } => write!(
                f,
                "{} is larger than the whole heap ({})",
                Bytes(wanted),
                Bytes(heap_size)
            ),
            Refusal::PrepareFailed { wanted, os_error } => {
                write!(
                    f,
                    "the heap range of {} could not be prepared",
                    Bytes(wanted)
                )?;
                if os_error != 0 {
                    write!(f, " (OS error {os_error})")?;
                }
                Ok(())
            }
            Refusal::PublishFailed => write!(f, "the object entry could not be published"),
            Refusal::InQuarantine {
                wanted,
                quarantined,
            } => write!(
                f,
                "{} would fit, but {} of the heap is in quarantine until peers acknowledge \
                 its destruction; retry shortly",
                Bytes(wanted),
                Bytes(quarantined)
            ),
            Refusal::NameAreaFull { wanted, largest } => write!(
                f,
                "the name area has no free run of {} for the name (largest {})",
                Bytes(wanted),
                Bytes(largest)
            ),
            Refusal::Other(code) => write!(f, "refusal reason {code}"),
        }
    }
}

/// Why vshmd refused an ivshmem client ([`connect_refusal`]): sent as `-code` in place of
/// the protocol version, then a detail number, then the connection is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectRefusal {
    /// All peer slots are in use.
    PeerSlotsFull {
        /// `max_peers`.
        max_peers: u64,
    },
    /// No peer id is safe to hand out.
    NoSafeId,
    /// No free peer slot could be given out (fenced or not cleared).
    NoReadySlot,
    /// A refusal code this reader does not know.
    Other(i64),
}

impl ConnectRefusal {
    /// The two messages that say it: `-code` (where the version goes) and the detail.
    pub fn to_wire(&self) -> (i64, i64) {
        let detail = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let (code, d) = match *self {
            ConnectRefusal::PeerSlotsFull { max_peers } => {
                (connect_refusal::PEER_SLOTS_FULL, detail(max_peers))
            }
            ConnectRefusal::NoSafeId => (connect_refusal::NO_SAFE_ID, 0),
            ConnectRefusal::NoReadySlot => (connect_refusal::NO_READY_SLOT, 0),
            ConnectRefusal::Other(code) => (code, 0),
        };
        (code.saturating_neg(), d)
    }

    /// Decodes a negative first message (`version`) and the detail after it (0 if the
    /// server closed before sending one). `None` if `version` is not negative.
    pub fn from_wire(version: i64, detail: i64) -> Option<ConnectRefusal> {
        if version >= 0 {
            return None;
        }
        let n = u64::try_from(detail).unwrap_or(0);
        Some(match version.saturating_neg() {
            connect_refusal::PEER_SLOTS_FULL => ConnectRefusal::PeerSlotsFull { max_peers: n },
            connect_refusal::NO_SAFE_ID => ConnectRefusal::NoSafeId,
            connect_refusal::NO_READY_SLOT => ConnectRefusal::NoReadySlot,
            code => ConnectRefusal::Other(code),
        })
    }
}

impl ConnectRefusal {
    /// The words without the numbers (for a log line that cannot format).
    pub fn what(&self) -> &'static str {
        match self {
            ConnectRefusal::PeerSlotsFull { .. } => "all peer slots are in use",
            ConnectRefusal::NoSafeId => {
                "no peer id is safe to hand out (every id is connected or fenced)"
            }
            ConnectRefusal::NoReadySlot => {
                "no free peer slot is ready (the free ones are fenced while their previous \
                 processes run, or could not be cleared)"
            }
            ConnectRefusal::Other(_) => "refused",
        }
    }
}

impl core::fmt::Display for ConnectRefusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            ConnectRefusal::PeerSlotsFull { max_peers: 1 } => {
                write!(f, "the only peer slot is in use (max_peers 1)")
            }
            ConnectRefusal::PeerSlotsFull { max_peers } => {
                write!(f, "all {max_peers} peer slots are in use")
            }
            ConnectRefusal::Other(code) => write!(f, "refusal code {code}"),
            _ => f.write_str(self.what()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::bytes_of;

    fn refused(r: Refusal) -> Response {
        let mut resp = status_response(Status::InsufficientResources);
        r.write(&mut resp);
        resp
    }

    #[test]
    fn a_refusal_sits_in_bytes_48_to_72_of_the_response_and_round_trips() {
        let r = Refusal::NoFreeExtent {
            wanted: 16 << 20,
            largest: 4 << 20,
        };
        let resp = refused(r);
        let b = bytes_of(&resp);
        assert_eq!(b[48..52], 2u32.to_le_bytes());
        assert_eq!(b[52..56], [0; 4]);
        assert_eq!(b[56..64], (4u64 << 20).to_le_bytes());
        assert_eq!(b[64..72], (16u64 << 20).to_le_bytes());
        assert!(b[72..].iter().all(|&x| x == 0));
        assert_eq!(Refusal::from_response(&resp), Some(r));
        for r in [
            Refusal::ObjectTableFull { max_objects: 1024 },
            Refusal::LargerThanHeap {
                wanted: 1 << 40,
                heap_size: 1 << 30,
            },
            Refusal::PrepareFailed {
                wanted: 4096,
                os_error: 12,
            },
            Refusal::PublishFailed,
            Refusal::NameAreaFull {
                wanted: 16,
                largest: 8,
            },
            Refusal::Other(99),
        ] {
            assert_eq!(Refusal::from_response(&refused(r)), Some(r));
        }
    }

    #[test]
    fn no_reason_or_another_status_means_no_refusal() {
        assert_eq!(
            Refusal::from_response(&status_response(Status::InsufficientResources)),
            None
        );
        let mut resp = refused(Refusal::ObjectTableFull { max_objects: 8 });
        resp.status = Status::InvalidParameter.code();
        assert_eq!(Refusal::from_response(&resp), None);
    }

    #[test]
    fn refusals_name_the_limit() {
        assert_eq!(
            Refusal::ObjectTableFull { max_objects: 1024 }.to_string(),
            "the object table is full (1024 objects)"
        );
        assert_eq!(
            Refusal::NoFreeExtent {
                wanted: 16 << 20,
                largest: 4 << 20
            }
            .to_string(),
            "no free heap extent of 16.0 MiB (largest 4.0 MiB)"
        );
        assert_eq!(
            Refusal::LargerThanHeap {
                wanted: 2 << 30,
                heap_size: 1 << 30
            }
            .to_string(),
            "2.0 GiB is larger than the whole heap (1.0 GiB)"
        );
        assert_eq!(
            Refusal::PrepareFailed {
                wanted: 512,
                os_error: 5
            }
            .to_string(),
            "the heap range of 512 B could not be prepared (OS error 5)"
        );
    }

    #[test]
    fn a_close_hint_names_one_slot_turns_into_many_when_not_taken_and_is_gone_once_taken() {
        const SIZE: usize = 1 << 20;
        let mut buf = vec![0u64; SIZE / 8];
        let base = core::ptr::NonNull::new(buf.as_mut_ptr().cast::<u8>()).expect("non-null");
        // SAFETY: buf outlives mem (both locals of this test); 8-aligned, SIZE bytes.
        let mem = unsafe { crate::shm::RawRegion::new(base, SIZE as u64) };
        let layout = Layout::compute(SIZE as u64, 4, 8, 1, 4096).expect("layout");
        let me = PeerSlot(1);
        assert_eq!(take_closed_hint(&mem, &layout, me), Ok(ClosedHint::None));
        hint_closed(&mem, &layout, me, ObjectSlot(7)).expect("hint");
        assert_eq!(
            take_closed_hint(&mem, &layout, me),
            Ok(ClosedHint::One(ObjectSlot(7)))
        );
        assert_eq!(take_closed_hint(&mem, &layout, me), Ok(ClosedHint::None));
        hint_closed(&mem, &layout, me, ObjectSlot(7)).expect("hint");
        hint_closed(&mem, &layout, me, ObjectSlot(6)).expect("second hint");
        assert_eq!(take_closed_hint(&mem, &layout, me), Ok(ClosedHint::Many));
        // A peer's scribble naming no slot of the table.
        let off = mailbox_base(&layout, me).expect("mailbox") + MB_CLOSED_HINT_OFF;
        mem.store_u64(off, u64::from(layout.max_objects) + 1, Ordering::SeqCst)
            .expect("scribble");
        assert_eq!(take_closed_hint(&mem, &layout, me), Ok(ClosedHint::Many));
        // The hint word is not part of a request: posting one leaves it alone.
        hint_closed(&mem, &layout, me, ObjectSlot(3)).expect("hint");
        post(
            &mem,
            &layout,
            me,
            &wake_request(ObjectSlot(1), Generation(1)),
        )
        .expect("post");
        assert_eq!(
            take_closed_hint(&mem, &layout, me),
            Ok(ClosedHint::One(ObjectSlot(3)))
        );
        drop(buf);
    }

    #[test]
    fn a_create_larger_than_the_heap_says_so_on_decode_failure() {
        let layout = Layout::compute(4 << 20, 4, 16, 1, 4096).expect("layout");
        let req = create_request(Some("big"), kind::SECTION, u64::MAX, 1, false);
        assert_eq!(decode(&req, &layout), Err(Status::InsufficientResources));
        let resp = decode_failure(&req, &layout, Status::InsufficientResources);
        assert_eq!(
            Refusal::from_response(&resp),
            Some(Refusal::LargerThanHeap {
                wanted: u64::MAX,
                heap_size: layout.heap_size
            })
        );
        let resp = decode_failure(&req, &layout, Status::InvalidParameter);
        assert_eq!(resp.reason, refusal::NONE);
    }

    #[test]
    fn connect_refusals_are_a_negative_version_and_a_detail() {
        for r in [
            ConnectRefusal::PeerSlotsFull { max_peers: 16 },
            ConnectRefusal::NoSafeId,
            ConnectRefusal::NoReadySlot,
            ConnectRefusal::Other(42),
        ] {
            let (v, d) = r.to_wire();
            assert!(v < 0);
            assert_eq!(ConnectRefusal::from_wire(v, d), Some(r));
        }
        assert_eq!(
            ConnectRefusal::PeerSlotsFull { max_peers: 16 }.to_wire(),
            (-1, 16)
        );
        assert_eq!(ConnectRefusal::from_wire(0, 5), None);
        assert_eq!(
            ConnectRefusal::PeerSlotsFull { max_peers: 16 }.to_string(),
            "all 16 peer slots are in use"
        );
    }
}
