//! A lock-free SPSC byte ring inside a section: the guest side of `vshm_format::ring`, which
//! holds the layout and the index protocol (docs/FORMAT.md §6c).
//!
//! [`Ring::create_in`] puts a ring at an offset of a section (whose bytes there must still
//! be zero), [`Ring::attach`] finds one; [`Ring::producer`] and [`Ring::consumer`] take the
//! two sides. A ring has one producer and one consumer: within a process the library
//! enforces it (a second producer of the same ring is [`RingError::SideTaken`] while the
//! first lives); between peers it is a convention the peers keep, like the meaning of any
//! other bytes in a section — a second producer elsewhere corrupts the stream, and the worst
//! it can do to this side is make it see [`RingError::Corrupt`].
//!
//! Every operation has a non-blocking form (`write`, `read`, `send_frame`, `recv_frame`)
//! and a blocking one with a timeout. Waiting spins briefly, then sleeps on the section's
//! notifications (docs/FORMAT.md §6a): the waiter asks to be rung *before* it looks at the
//! ring again, and the other side, after it moved its index, rings if anyone asked, so no
//! wake-up is lost and a side that nobody waits for pays one load. Over the vshm device
//! (where every notification is a request) the ring does not ring: waiters poll every
//! millisecond instead.

use core::sync::atomic::AtomicBool;
use core::time::Duration;

use vshm_format::ring as fmt;
use vshm_format::shm::RawRegion;
use vshm_format::{sync, Status};

pub use vshm_format::ring::RingError;

use crate::{Error, Section, Transport};

/// Looks at the ring this many times before sleeping: a busy stream rarely sleeps (and so
/// rarely costs the other side a WAKE request).
const SPINS: u32 = 128;
/// How often a waiter looks when there are no notifications (over the vshm device).
const POLL: Duration = Duration::from_millis(1);

/// A ring inside a section: where it is and how large, validated. Take its sides with
/// [`Ring::producer`] and [`Ring::consumer`].
#[derive(Debug)]
pub struct Ring<'a, T: Transport> {
    section: &'a Section<'a, T>,
    ring: fmt::Ring,
    /// The ring's offset in the section.
    at: u64,
    /// Without `std`, the sides are claimed per `Ring` (with it, per process).
    #[cfg_attr(feature = "std", allow(dead_code))]
    taken: [AtomicBool; 2],
}

impl<'a, T: Transport> Ring<'a, T> {
    /// Creates a ring of `capacity` bytes of data (a power of two, 64 ..= 2^47) at section
    /// offset `offset` (a multiple of 64); it occupies `capacity + 384` bytes, which must lie
    /// inside the section's current size, and the first 8 must be zero (a fresh section is).
    /// Of two peers creating at the same place one wins; the other gets
    /// [`RingError::InUse`] and should [`Ring::attach`].
    pub fn create_in(
        section: &'a Section<'a, T>,
        offset: u64,
        capacity: u64,
    ) -> Result<Ring<'a, T>, Error> {
        section.check_live(true)?;
        let (base, limit) = Self::place(section, offset)?;
        let ring = fmt::Ring::create(&section.region(), base, capacity, limit)?;
        Ok(Self::new(section, ring, offset))
    }

    /// Attaches to the ring at section offset `offset` (created by anyone): its header is
    /// copied once and validated, and it must lie inside the section.
    pub fn attach(section: &'a Section<'a, T>, offset: u64) -> Result<Ring<'a, T>, Error> {
        section.check_live(false)?;
        let (base, limit) = Self::place(section, offset)?;
        let ring = fmt::Ring::attach(&section.region(), base, limit)?;
        Ok(Self::new(section, ring, offset))
    }

    /// The region offset of section offset `offset`, and the end of the section as the
    /// ring may use it.
    fn place(section: &Section<'_, T>, offset: u64) -> Result<(u64, u64), Error> {
        let start = section.offset().0;
        let size = section.size();
        let too_small = RingError::TooSmall {
            need: fmt::HEADER_SIZE + fmt::MIN_CAPACITY,
            room: size.saturating_sub(offset),
        };
        let base = start.checked_add(offset).ok_or(too_small)?;
        let limit = start.checked_add(size).ok_or(too_small)?;
        Ok((base, limit))
    }

    fn new(section: &'a Section<'a, T>, ring: fmt::Ring, at: u64) -> Ring<'a, T> {
        Ring {
            section,
            ring,
            at,
            taken: [AtomicBool::new(false), AtomicBool::new(false)],
        }
    }

    /// Bytes of data.
    pub fn capacity(&self) -> u64 {
        self.ring.capacity()
    }

    /// The longest frame: `capacity − 4`.
    pub fn max_frame(&self) -> u64 {
        self.ring.max_frame()
    }

    /// The ring's offset in its section.
    pub fn offset(&self) -> u64 {
        self.at
    }

    /// Bytes the ring occupies in the section (header and data).
    pub fn footprint(&self) -> u64 {
        fmt::HEADER_SIZE + self.ring.capacity()
    }

    /// The section the ring lives in.
    pub fn section(&self) -> &'a Section<'a, T> {
        self.section
    }

    /// Takes the producer's side (needs a writable handle). One per ring in this process
    /// at a time: [`RingError::SideTaken`] while another lives.
    pub fn producer(&self) -> Result<Producer<'_, 'a, T>, Error> {
        self.section.check_live(true)?;
        let claim = Claim::take(self, Side::Producer)?;
        let state = fmt::Producer::new(&self.mem(), self.ring)?;
        Ok(Producer {
            ring: self,
            state,
            _claim: claim,
        })
    }

    /// Takes the consumer's side (needs a writable handle: it stores `tail`). One per ring in
    /// this process at a time.
    pub fn consumer(&self) -> Result<Consumer<'_, 'a, T>, Error> {
        self.section.check_live(true)?;
        let claim = Claim::take(self, Side::Consumer)?;
        let state = fmt::Consumer::new(&self.mem(), self.ring)?;
        Ok(Consumer {
            ring: self,
            state,
            _claim: claim,
        })
    }

    fn mem(&self) -> RawRegion<'a> {
        self.section.region()
    }

    /// Whether waiters can be rung: not over the vshm device, where a notification is a
    /// request each time (there, waiters poll).
    fn rings(&self) -> bool {
        self.section.namespace().device().is_none()
    }

    /// After this side moved its index (SeqCst): if anyone asked to be rung, counts a change
    /// on the section and asks the host to WAKE them (docs/FORMAT.md §6a). One load when
    /// nobody waits.
    fn wake_other(&self) -> Result<(), Error> {
        if !self.rings() {
            return Ok(());
        }
        let ns = self.section.namespace();
        let (mem, layout, slot) = (ns.mem(), ns.layout(), self.section.slot());
        if sync::waiters(&mem, layout, slot)? != 0 && sync::notify(&mem, layout, slot)? {
            ns.wake_object(slot, self.section.generation())?;
        }
        Ok(())
    }

    /// Waits until `cond` holds or `timeout` passes (`None`: no limit); `Ok(false)` on
    /// timeout. Spins a little first, then sleeps on the section's notifications (asking to
    /// be rung before every look), or polls over the device.
    fn wait(
        &self,
        timeout: Option<Duration>,
        cond: &mut dyn FnMut() -> Result<bool, Error>,
    ) -> Result<bool, Error> {
        for _ in 0..SPINS {
            if cond()? {
                return Ok(true);
            }
            core::hint::spin_loop();
        }
        let ns = self.section.namespace();
        if self.rings() {
            return crate::handle::wait_on(ns, self.section.slot(), timeout, cond);
        }
        // Polling: slices of POLL, counted (no clock needed; the transport sleeps them).
        let mut waited = Duration::ZERO;
        loop {
            let mut outcome: Result<bool, Error> = Ok(false);
            let slice = timeout.map_or(POLL, |t| POLL.min(t.saturating_sub(waited)));
            let done = ns.transport().wait_until(
                &mut || {
                    outcome = cond();
                    !matches!(outcome, Ok(false))
                },
                slice,
            )?;
            if done {
                return outcome;
            }
            waited += slice;
            if timeout.is_some_and(|t| waited >= t) {
                return Ok(false);
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Producer,
    Consumer,
}

/// A side of a ring, taken by this process until dropped.
#[derive(Debug)]
struct Claim<'r, 'a, T: Transport> {
    ring: &'r Ring<'a, T>,
    side: Side,
}

/// The sides taken in this process: (region mapping's address, ring's region offset, side).
#[cfg(feature = "std")]
static CLAIMS: std::sync::Mutex<std::vec::Vec<(usize, u64, Side)>> =
    std::sync::Mutex::new(std::vec::Vec::new());

impl<'r, 'a, T: Transport> Claim<'r, 'a, T> {
    fn take(ring: &'r Ring<'a, T>, side: Side) -> Result<Claim<'r, 'a, T>, Error> {
        let taken = RingError::SideTaken {
            producer: side == Side::Producer,
        };
        #[cfg(feature = "std")]
        {
            let key = Self::key(ring, side);
            let mut claims = CLAIMS.lock().unwrap_or_else(|p| p.into_inner());
            if claims.contains(&key) {
                return Err(taken.into());
            }
            claims.push(key);
        }
        #[cfg(not(feature = "std"))]
        {
            if ring.taken[side as usize].swap(true, core::sync::atomic::Ordering::AcqRel) {
                return Err(taken.into());
            }
        }
        Ok(Claim { ring, side })
    }

    #[cfg(feature = "std")]
    fn key(ring: &Ring<'_, T>, side: Side) -> (usize, u64, Side) {
        (ring.mem().base().as_ptr().addr(), ring.ring.offset(), side)
    }
}

impl<T: Transport> Drop for Claim<'_, '_, T> {
    fn drop(&mut self) {
        #[cfg(feature = "std")]
        {
            let key = Self::key(self.ring, self.side);
            let mut claims = CLAIMS.lock().unwrap_or_else(|p| p.into_inner());
            claims.retain(|k| *k != key);
        }
        #[cfg(not(feature = "std"))]
        self.ring.taken[self.side as usize].store(false, core::sync::atomic::Ordering::Release);
    }
}

/// The producer's side of a [`Ring`]: writes bytes or frames.
#[derive(Debug)]
pub struct Producer<'r, 'a, T: Transport> {
    ring: &'r Ring<'a, T>,
    state: fmt::Producer,
    _claim: Claim<'r, 'a, T>,
}

impl<T: Transport> Producer<'_, '_, T> {
    /// Free room now (bytes).
    pub fn free(&mut self) -> Result<u64, Error> {
        self.ring.section.check_live(true)?;
        Ok(self.state.free(&self.ring.mem())?)
    }

    /// Writes as much of `data` as fits now; returns how much (0: the ring is full).
    pub fn write(&mut self, data: &[u8]) -> Result<usize, Error> {
        self.ring.section.check_live(true)?;
        let n = self.state.write(&self.ring.mem(), data)?;
        if n > 0 {
            self.ring.wake_other()?;
        }
        Ok(n)
    }

    /// Writes as much of `data` as fits, waiting up to `timeout` (`None`: no limit) for room
    /// if there is none; returns how much (at least 1 byte of a non-empty `data`), or
    /// `Error::Status(Status::Timeout)`.
    pub fn write_blocking(
        &mut self,
        data: &[u8],
        timeout: Option<Duration>,
    ) -> Result<usize, Error> {
        let n = self.write(data)?;
        if n > 0 || data.is_empty() {
            return Ok(n);
        }
        self.wait_room(1, timeout)?;
        self.write(data)
    }

    /// Writes all of `data`, waiting for room as needed, within `timeout` in all (`None`:
    /// no limit); on a timeout, part of it may have been written.
    #[cfg(feature = "std")]
    pub fn write_all(&mut self, mut data: &[u8], timeout: Option<Duration>) -> Result<(), Error> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        while !data.is_empty() {
            let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
            let n = self.write_blocking(data, left)?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Sends one frame if there is room for all of it now (`Ok(false)`: not now). A frame
    /// longer than [`Ring::max_frame`] is [`RingError::FrameTooLarge`].
    pub fn send_frame(&mut self, frame: &[u8]) -> Result<bool, Error> {
        self.ring.section.check_live(true)?;
        let sent = self.state.send_frame(&self.ring.mem(), frame)?;
        if sent {
            self.ring.wake_other()?;
        }
        Ok(sent)
    }

    /// Sends one frame, waiting up to `timeout` (`None`: no limit) for room for all of it,
    /// else `Error::Status(Status::Timeout)`.
    pub fn send_frame_blocking(
        &mut self,
        frame: &[u8],
        timeout: Option<Duration>,
    ) -> Result<(), Error> {
        if self.send_frame(frame)? {
            return Ok(());
        }
        // send_frame refused a frame that can never fit, so this one can.
        self.wait_room(fmt::FRAME_PREFIX + frame.len() as u64, timeout)?;
        match self.send_frame(frame)? {
            true => Ok(()),
            // Room seen is room kept: only this side uses it. Not reached.
            false => Err(Status::Timeout.into()),
        }
    }

    /// Waits until at least `want` bytes are free.
    fn wait_room(&mut self, want: u64, timeout: Option<Duration>) -> Result<(), Error> {
        let (ring, state) = (self.ring, &mut self.state);
        let mem = ring.mem();
        // Only loads of the ring's indices: the write after it checks the handle again.
        let ready = ring.wait(timeout, &mut || Ok(state.free(&mem)? >= want))?;
        match ready {
            true => Ok(()),
            false => Err(Status::Timeout.into()),
        }
    }
}

/// The consumer's side of a [`Ring`]: reads bytes or frames.
#[derive(Debug)]
pub struct Consumer<'r, 'a, T: Transport> {
    ring: &'r Ring<'a, T>,
    state: fmt::Consumer,
    _claim: Claim<'r, 'a, T>,
}

impl<T: Transport> Consumer<'_, '_, T> {
    /// Bytes published and not yet read.
    pub fn available(&mut self) -> Result<u64, Error> {
        self.ring.section.check_live(false)?;
        Ok(self.state.available(&self.ring.mem())?)
    }

    /// Reads up to `buf.len()` bytes that are there now; returns how many (0: empty).
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        self.ring.section.check_live(true)?;
        let n = self.state.read(&self.ring.mem(), buf)?;
        if n > 0 {
            self.ring.wake_other()?;
        }
        Ok(n)
    }

    /// Reads up to `buf.len()` bytes, waiting up to `timeout` (`None`: no limit) for some if
    /// there are none; returns how many (at least 1 for a non-empty `buf`), or
    /// `Error::Status(Status::Timeout)`.
    pub fn read_blocking(
        &mut self,
        buf: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<usize, Error> {
        let n = self.read(buf)?;
        if n > 0 || buf.is_empty() {
            return Ok(n);
        }
        self.wait_data(timeout)?;
        self.read(buf)
    }

    /// The length of the next frame, if one is there.
    pub fn peek_frame(&mut self) -> Result<Option<u64>, Error> {
        self.ring.section.check_live(false)?;
        Ok(self.state.peek_frame(&self.ring.mem())?)
    }

    /// Receives the next frame into `buf` if one is there; returns its length. A `buf`
    /// shorter than the frame is [`RingError::BufferTooSmall`] (the frame stays).
    pub fn recv_frame_into(&mut self, buf: &mut [u8]) -> Result<Option<usize>, Error> {
        self.ring.section.check_live(true)?;
        let got = self.state.recv_frame(&self.ring.mem(), buf)?;
        if got.is_some() {
            self.ring.wake_other()?;
        }
        Ok(got)
    }

    /// Receives the next frame into `frame` (replacing what it held) if one is there;
    /// returns whether one was.
    #[cfg(feature = "std")]
    pub fn recv_frame(&mut self, frame: &mut std::vec::Vec<u8>) -> Result<bool, Error> {
        let Some(len) = self.peek_frame()? else {
            return Ok(false);
        };
        // peek_frame checked len ≤ capacity − 4, which the section holds: it fits in memory.
        let len = usize::try_from(len).map_err(|_| Error::from(Status::NoMemory))?;
        frame.resize(len, 0);
        Ok(self.recv_frame_into(frame)?.is_some())
    }

    /// Receives the next frame into `frame`, waiting up to `timeout` (`None`: no limit),
    /// else `Error::Status(Status::Timeout)`.
    #[cfg(feature = "std")]
    pub fn recv_frame_blocking(
        &mut self,
        frame: &mut std::vec::Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<(), Error> {
        if self.recv_frame(frame)? {
            return Ok(());
        }
        // Frames are published whole: any byte there is a whole frame.
        self.wait_data(timeout)?;
        match self.recv_frame(frame)? {
            true => Ok(()),
            false => Err(Status::Timeout.into()),
        }
    }

    /// Waits until at least one byte is there.
    fn wait_data(&mut self, timeout: Option<Duration>) -> Result<(), Error> {
        let (ring, state) = (self.ring, &mut self.state);
        let mem = ring.mem();
        // Only loads of the ring's indices: the read after it checks the handle again.
        let ready = ring.wait(timeout, &mut || Ok(state.available(&mem)? > 0))?;
        match ready {
            true => Ok(()),
            false => Err(Status::Timeout.into()),
        }
    }
}
