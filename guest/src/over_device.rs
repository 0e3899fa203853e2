//! The namespace over the vshm device ([`crate::DeviceTransport`], docs/VHOST-USER.md §5):
//! there is no header to look at, so each operation is one request, and the reply to an
//! OPEN or CREATE is the hold and the mapping at once.

use core::time::Duration;

use vshm_format::layout::{kind, op, Request, Response};
use vshm_format::mailbox::{self, Refusal};
use vshm_format::object::{ObjectHead, ObjectInfo};
use vshm_format::shm::SharedMemory;
use vshm_format::virtio::{
    HandleFields, PeersReply, LOCK_TRY, MAP_WRITABLE, OPEN_READ_ONLY, OP_CLOSE, OP_OPEN, OP_PEERS,
    OP_RESET, OP_SIGNAL, OP_WAIT, WAIT_SINCE,
};
use vshm_format::{validate_name, Generation, ObjectSlot, RegionOffset, Status};

use crate::{DeviceTransport, Disposition, Error, Namespace, Transport};

/// How long a WAIT's reply may come after its own timeout (the device's timer and the
/// trip back) before the request counts as unanswered.
const WAIT_SLACK: Duration = Duration::from_secs(5);
/// An unbounded wait is a loop of WAITs this long (a device-side timeout must be finite to
/// be told apart from "none").
const WAIT_SLICE_MS: u64 = 3_600_000;

/// How old a PEERS answer may be when the block allocator uses it (an owner it shows
/// departed is asked about again anyway).
pub(crate) const PEERS_MAX_AGE: Duration = Duration::from_millis(100);

/// The last PEERS answer and when it came (without `std` there is no clock: none kept).
#[derive(Debug, Default)]
pub(crate) struct PeersCache {
    #[cfg(feature = "std")]
    last: std::sync::Mutex<Option<(std::time::Instant, PeersReply)>>,
}

/// A hold this peer took, as either transport describes it: what a handle is made of.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Held {
    pub(crate) slot: ObjectSlot,
    pub(crate) generation: Generation,
    pub(crate) kind: u32,
    pub(crate) flags: u32,
    /// Where its memory starts in `Transport::region()`: a region offset over a header, a
    /// window offset over the device.
    pub(crate) offset: RegionOffset,
    pub(crate) max_size: u64,
    /// The size the backend said it has (0: none said, read the entry).
    pub(crate) vouched: u64,
    /// What CLOSE names the handle by over the device (0 over a header).
    pub(crate) handle: u64,
    /// The change count when the handle was made, `None`: read it from the entry.
    pub(crate) change_count: Option<u64>,
    /// The memory may be written (a read-only open over the device maps it read-only).
    pub(crate) writable: bool,
}

impl Held {
    /// A hold taken in a header's lease word, described by the entry.
    pub(crate) fn from_entry(info: &ObjectHead) -> Held {
        Held {
            slot: info.slot,
            generation: info.generation,
            kind: info.kind,
            flags: info.flags,
            offset: info.offset,
            max_size: info.max_size,
            vouched: 0,
            handle: 0,
            change_count: None,
            writable: true,
        }
    }
}

/// The status of a reply, or the error it is.
fn status_of(resp: &Response, slot: ObjectSlot) -> Result<Status, Error> {
    match Status::from_code(resp.status) {
        Some(s) if s.is_success() => Ok(s),
        Some(s) => Err(match Refusal::from_response(resp) {
            Some(reason) => Error::Refused { status: s, reason },
            None => s.into(),
        }),
        None => Err(Error::BadResponse(resp.status, slot)),
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl<T: Transport> Namespace<T> {
    /// One request to the device and its reply.
    pub(crate) fn device_call(
        &self,
        dev: &dyn DeviceTransport,
        req: &Request,
        records: &mut [u8],
        timeout: Duration,
    ) -> Result<Response, Error> {
        match dev.call(req, records, timeout) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(Error::Timeout(duration_ms(timeout))),
            Err(e) => Err(e.into()),
        }
    }

    /// Create-or-open (a CREATE request) or open (OPEN) over the device: the reply is the
    /// hold and the mapping.
    pub(crate) fn device_open(
        &self,
        dev: &dyn DeviceTransport,
        req: &Request,
        want_kind: Option<u32>,
    ) -> Result<(Held, Disposition), Error> {
        let resp = self.device_call(dev, req, &mut [], self.reply_timeout)?;
        self.device_held(dev, req.op, &resp, want_kind)
    }

    /// The handle an OPEN or CREATE (`op`) reply made. One whose fields do not add up is
    /// closed again and refused, as is one on an object of another kind than `want_kind`
    /// (`None`: any).
    pub(crate) fn device_held(
        &self,
        dev: &dyn DeviceTransport,
        op: u32,
        resp: &Response,
        want_kind: Option<u32>,
    ) -> Result<(Held, Disposition), Error> {
        let slot = ObjectSlot(resp.slot);
        let disposition = match status_of(resp, slot)? {
            Status::Success if op != OP_OPEN => Disposition::Created,
            Status::Success | Status::ObjectNameExists => Disposition::Opened,
            _ => return Err(Error::BadResponse(resp.status, slot)),
        };
        let f = HandleFields::read(resp);
        let held = Held {
            slot,
            generation: Generation(resp.generation),
            kind: f.kind,
            flags: f.object_flags,
            offset: RegionOffset(resp.offset),
            max_size: resp.max_size,
            vouched: resp.size.min(resp.max_size),
            handle: resp.offset,
            change_count: Some(f.change_count),
            writable: f.map_flags & MAP_WRITABLE != 0,
        };
        // A section's reservation must lie in the window: the library reads and writes
        // there.
        let in_window = held.kind != kind::SECTION
            || held
                .offset
                .0
                .checked_add(held.max_size)
                .is_some_and(|end| end <= dev.window().size());
        if !in_window || want_kind.is_some_and(|k| k != held.kind) {
            let _ = self.device_close(dev, held.slot, held.generation, held.handle);
            return Err(if in_window {
                Status::InvalidHandle.into()
            } else {
                Error::BadResponse(resp.status, slot)
            });
        }
        Ok((held, disposition))
    }

    /// Opens `name` over the device: an object of `want_kind` (`None`: any), mapped
    /// read-only if asked.
    pub(crate) fn device_open_name(
        &self,
        dev: &dyn DeviceTransport,
        name: &str,
        want_kind: Option<u32>,
        read_only: bool,
    ) -> Result<Held, Error> {
        validate_name(name)?;
        // OPEN takes a CREATE's name fields; its kind (0: any) lets the device refuse
        // another kind itself, with no mapping made and unmade.
        let mut req = mailbox::create_request(Some(name), want_kind.unwrap_or(0), 0, 0, false);
        req.op = OP_OPEN;
        req.flags = if read_only { OPEN_READ_ONLY } else { 0 };
        Ok(self.device_open(dev, &req, want_kind)?.0)
    }

    /// Closes handle `handle` on (slot, generation) over the device: the mapping goes
    /// before the hold.
    pub(crate) fn device_close(
        &self,
        dev: &dyn DeviceTransport,
        slot: ObjectSlot,
        generation: Generation,
        handle: u64,
    ) -> Result<(), Error> {
        let mut req = mailbox::delete_request(slot, generation);
        req.op = OP_CLOSE;
        req.size = handle;
        let resp = self.device_call(dev, &req, &mut [], self.reply_timeout)?;
        status_of(&resp, slot).map(|_| ())
    }

    /// SIGNAL (or RESET) of an object this peer holds.
    pub(crate) fn device_signal(
        &self,
        dev: &dyn DeviceTransport,
        slot: ObjectSlot,
        generation: Generation,
        reset: bool,
    ) -> Result<(), Error> {
        let mut req = mailbox::wake_request(slot, generation);
        req.op = if reset { OP_RESET } else { OP_SIGNAL };
        let resp = self.device_call(dev, &req, &mut [], self.reply_timeout)?;
        status_of(&resp, slot).map(|_| ())
    }

    /// Posts `build(ms)` (a WAIT or a LOCK whose timeout is `ms`) until it is answered with
    /// something other than STATUS_TIMEOUT (`Ok(Some(reply))`) or `timeout` has passed
    /// (`Ok(None)`; `None`: no limit). A device-side timeout must be finite to be told
    /// apart from "none", so a long or unbounded one is several requests of at most
    /// [`WAIT_SLICE_MS`], counted down by what each waited; `once` posts one only (a try).
    fn device_sliced(
        &self,
        dev: &dyn DeviceTransport,
        timeout: Option<Duration>,
        once: bool,
        build: impl Fn(u64) -> Request,
    ) -> Result<Option<Response>, Error> {
        let mut left_ms = timeout.map(duration_ms);
        loop {
            let ms = left_ms.map_or(WAIT_SLICE_MS, |l| l.clamp(1, WAIT_SLICE_MS));
            let patience = Duration::from_millis(ms) + WAIT_SLACK;
            let resp = self.device_call(dev, &build(ms), &mut [], patience)?;
            if Status::from_code(resp.status) != Some(Status::Timeout) {
                return Ok(Some(resp));
            }
            left_ms = left_ms.map(|l| l.saturating_sub(ms));
            if once || left_ms == Some(0) {
                return Ok(None);
            }
        }
    }

    /// WAIT for an event (taking an auto-reset one's signal) or a section's change after
    /// `seen` (its change count as this handle knows it). `Ok(Some(count))` when it
    /// happened, `Ok(None)` when `timeout` passed first (`None`: no limit).
    pub(crate) fn device_wait(
        &self,
        dev: &dyn DeviceTransport,
        slot: ObjectSlot,
        generation: Generation,
        seen: Option<u64>,
        timeout: Option<Duration>,
    ) -> Result<Option<u64>, Error> {
        let reply = self.device_sliced(dev, timeout, false, |ms| {
            let mut req = mailbox::wake_request(slot, generation);
            req.op = OP_WAIT;
            req.size = ms;
            if let Some(c) = seen {
                req.flags = WAIT_SINCE;
                req.max_size = c;
            }
            req
        })?;
        let Some(resp) = reply else {
            return Ok(None);
        };
        match status_of(&resp, slot)? {
            Status::Success => Ok(Some(resp.size)),
            _ => Err(Error::BadResponse(resp.status, slot)),
        }
    }

    /// LOCK of a mutex this peer holds, for thread `token`: `Ok(Some(status))` when granted
    /// (SUCCESS or ABANDONED), `Ok(None)` when `timeout` passed first (`None`: no limit;
    /// zero: a try, which never queues). The device queues the request (first come, first
    /// served) and answers it when the mutex is handed over; a timeout it answers itself
    /// leaves the queue, and a handover that raced it is given back by the device.
    pub(crate) fn device_lock(
        &self,
        dev: &dyn DeviceTransport,
        slot: ObjectSlot,
        generation: Generation,
        token: u32,
        timeout: Option<Duration>,
    ) -> Result<Option<Status>, Error> {
        let try_only = timeout.is_some_and(|t| t.is_zero());
        let reply = self.device_sliced(dev, timeout, try_only, |ms| {
            let mut req = mailbox::mutex_request(op::LOCK, slot, generation, token);
            req.max_size = ms;
            if try_only {
                req.flags = LOCK_TRY;
            }
            req
        })?;
        let Some(resp) = reply else {
            return Ok(None);
        };
        match status_of(&resp, slot)? {
            s @ (Status::Success | Status::Abandoned) => Ok(Some(s)),
            _ => Err(Error::BadResponse(resp.status, slot)),
        }
    }

    /// PEERS: this VM's slot and incarnation and who is attached, at most
    /// [`PEERS_MAX_AGE`] old (`fresh`: asked now).
    pub(crate) fn device_peers(
        &self,
        dev: &dyn DeviceTransport,
        fresh: bool,
    ) -> Result<PeersReply, Error> {
        #[cfg(feature = "std")]
        if !fresh {
            if let Ok(last) = self.peers_cache.last.lock() {
                if let Some((at, p)) = *last {
                    if at.elapsed() < PEERS_MAX_AGE {
                        return Ok(p);
                    }
                }
            }
        }
        let _ = fresh;
        let mut req = mailbox::delete_request(ObjectSlot(0), Generation(0));
        req.op = OP_PEERS;
        let resp = self.device_call(dev, &req, &mut [], self.reply_timeout)?;
        status_of(&resp, ObjectSlot(resp.slot))?;
        let p = PeersReply::read(&resp)
            .ok_or(Error::BadResponse(resp.status, ObjectSlot(resp.slot)))?;
        #[cfg(feature = "std")]
        if let Ok(mut last) = self.peers_cache.last.lock() {
            *last = Some((std::time::Instant::now(), p));
        }
        Ok(p)
    }

    /// What the device says of `name` now: an OPEN and a CLOSE (a VM sees no table to look
    /// it up in). The offset is not kept: the handle is closed.
    pub(crate) fn device_info(
        &self,
        dev: &dyn DeviceTransport,
        name: &str,
    ) -> Result<ObjectInfo, Error> {
        let held = self.device_open_name(dev, name, None, true)?;
        self.device_close(dev, held.slot, held.generation, held.handle)?;
        Ok(ObjectInfo::described(
            held.slot,
            held.generation,
            held.kind,
            held.flags,
            RegionOffset(0),
            held.vouched,
            held.max_size,
            Some(name),
        ))
    }

    /// DELETE of `name` over the device: only a held object can be deleted, so OPEN,
    /// DELETE, CLOSE.
    pub(crate) fn device_delete(&self, dev: &dyn DeviceTransport, name: &str) -> Result<(), Error> {
        let held = self.device_open_name(dev, name, None, true)?;
        let deleted = self.call(&mailbox::delete_request(held.slot, held.generation));
        let closed = self.device_close(dev, held.slot, held.generation, held.handle);
        status_of(&deleted?, held.slot)?;
        closed
    }
}
