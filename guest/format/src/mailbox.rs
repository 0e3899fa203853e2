//! Requests to the host through a peer's mailbox, and their responses.
//!
//! Peer side: take the peer-local mailbox lock, write the request fields, bump `req_seq`
//! (release), ring the host, wait until `resp_seq == req_seq`, copy the response out.
//! Host side: copy the request out in one volatile read, validate every field, act on its
//! private state, write the response, then `resp_seq` (release), ring the peer.

use core::sync::atomic::Ordering;

use crate::ids::{Generation, ObjectSlot, PeerSlot};
use crate::layout::{
    kind, object_flags, op, Layout, Request, Response, MAX_NAME_BYTES, MB_LOCK_OFF, MB_REQ_SEQ_OFF,
    MB_RESPONSE_OFF, MB_RESP_SEQ_OFF,
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
    /// Release a mutex with queued waiters (the host hands it over).
    Unlock {
        /// Slot.
        slot: ObjectSlot,
        /// Generation.
        generation: Generation,
        /// The caller's token.
        token: u32,
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
    // Everything after the seq and lock words (op onwards).
    mem.write_bytes(base + 12, &bytes[12..])?;
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
