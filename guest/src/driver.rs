//! Linux guest transport over the vshm kernel driver (`guest/linux-driver`): `/dev/vshmN`.
//!
//! The driver maps the region cacheable (write-back) instead of sysfs's UC-, rings a peer
//! through an ioctl, and delivers the device's MSI-X interrupts as poll() readiness, so a
//! waiting process sleeps in the kernel instead of polling. [`GuestTransport::open`] uses
//! the driver when a `/dev/vshm*` node exists and sysfs ([`crate::pci::PciTransport`])
//! otherwise; the `vshm` CLI attaches through it.
//!
//! The ABI mirrors `guest/linux-driver/vshm_ioctl.h` (checked against the header by
//! tests/tests/driver_abi.rs).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use vshm_format::layout::{Layout, Superblock};
use vshm_format::shm::{read_pod, RawRegion, SharedMemory};
use vshm_format::{ObjectSlot, PeerId, RegionOffset};

use crate::host::Mapping;
use crate::pci::{PciError, PciTransport};
use crate::{HoldChange, PeerPlace, Transport, TransportError};

/// `VSHM_ABI_VERSION`: the ABI version `VSHM_IOC_INFO` reports.
pub const VSHM_ABI_VERSION: u32 = 1;
/// `VSHM_INFO_TRACK`: [`VshmInfo::flags`] bit saying the driver offers `VSHM_IOC_TRACK`
/// (without it, a killed process's handles stay open until the VM detaches).
pub const VSHM_INFO_TRACK: u32 = 0x1;
/// `VSHM_KERNEL_TOKEN`: the lock token the driver's cleanup uses (above any pid).
pub const VSHM_KERNEL_TOKEN: u32 = 0x3FFF_FFFF;
/// `VSHM_MAX_VECTORS`: entries of [`VshmEvents::counts`].
pub const VSHM_MAX_VECTORS: usize = 16;

/// `struct vshm_info` (`VSHM_IOC_INFO`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VshmInfo {
    /// [`VSHM_ABI_VERSION`].
    pub abi_version: u32,
    /// IVPosition: this guest's peer id.
    pub peer_id: u32,
    /// BAR2's length.
    pub region_size: u64,
    /// MSI-X vectors with a handler.
    pub vectors: u32,
    /// `VSHM_INFO_*` bits: what the driver offers beyond ABI 1.
    pub flags: u32,
}

/// `struct vshm_ring` (`VSHM_IOC_RING`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VshmRing {
    /// Destination peer id.
    pub peer: u32,
    /// Its vector.
    pub vector: u32,
}

/// `struct vshm_events`: what read() on `/dev/vshmN` returns (cumulative counters).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VshmEvents {
    /// Interrupts on all vectors plus kicks since the device was bound.
    pub total: u64,
    /// `VSHM_IOC_KICK` calls since the device was bound.
    pub kicks: u64,
    /// Interrupts per vector since the device was bound.
    pub counts: [u64; VSHM_MAX_VECTORS],
}

/// `struct vshm_track` (`VSHM_IOC_TRACK`): where this peer's state lives in the region.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VshmTrack {
    /// This peer's slot.
    pub peer_slot: u32,
    /// Object slots: entries in the hold table.
    pub max_objects: u32,
    /// The peer table's incarnation of `peer_slot` at attach.
    pub incarnation: u64,
    /// Region offset of the peer-table entry.
    pub peer_entry: u64,
    /// Region offset of object slot 0's entry.
    pub object_table: u64,
    /// Region offset of this peer's refcount cell for object slot 0.
    pub cells: u64,
    /// Region offset of this peer's mailbox.
    pub mailbox: u64,
    /// Bytes per object entry.
    pub object_stride: u32,
    /// Offset of the generation word in an entry.
    pub generation_off: u32,
    /// Offset of the lease word in an entry.
    pub lease_off: u32,
    /// Offset of the sync (mutex owner) word in an entry.
    pub sync_off: u32,
}

/// `struct vshm_hold`: one hold-table entry per object slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VshmHold {
    /// The object's generation when the process last took a handle.
    pub generation: u64,
    /// Handles the process holds on the slot.
    pub count: u32,
    /// Non-zero: the token of the process's thread owning the mutex in the slot.
    pub owner: u32,
}

/// `vshm_holds_len(n)`: bytes to map for a hold table of `n` entries (whole pages).
pub const fn holds_len(n: u32) -> u64 {
    (n as u64 * std::mem::size_of::<VshmHold>() as u64).next_multiple_of(4096)
}

const HOLD_GENERATION_OFF: u64 = std::mem::offset_of!(VshmHold, generation) as u64;
const HOLD_COUNT_OFF: u64 = std::mem::offset_of!(VshmHold, count) as u64;
const HOLD_OWNER_OFF: u64 = std::mem::offset_of!(VshmHold, owner) as u64;

const IOC_MAGIC: u64 = 0xB6;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// The Linux `_IOC(dir, type, nr, size)` encoding (x86).
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (IOC_MAGIC << 8) | nr
}

/// `VSHM_IOC_INFO`: `_IOR(0xB6, 0, struct vshm_info)`.
pub const VSHM_IOC_INFO: u64 = ioc(IOC_READ, 0, std::mem::size_of::<VshmInfo>());
/// `VSHM_IOC_RING`: `_IOW(0xB6, 1, struct vshm_ring)`.
pub const VSHM_IOC_RING: u64 = ioc(IOC_WRITE, 1, std::mem::size_of::<VshmRing>());
/// `VSHM_IOC_KICK`: `_IO(0xB6, 2)`.
pub const VSHM_IOC_KICK: u64 = ioc(0, 2, 0);
/// `VSHM_IOC_TRACK`: `_IOW(0xB6, 3, struct vshm_track)`.
pub const VSHM_IOC_TRACK: u64 = ioc(IOC_WRITE, 3, std::mem::size_of::<VshmTrack>());

/// How often a waiter re-checks its condition even without an interrupt: a safety net
/// only (every change a waiter waits for is rung, or kicked by [`Transport::notify_local`]).
const RECHECK: Duration = Duration::from_millis(100);

/// Open files kept for waiting threads (each waiter needs its own: the driver's "seen"
/// mark is per open file).
const POOLED_WAITERS: usize = 8;

/// Why the driver's device could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// No `/dev/vshm*` node.
    #[error("no vshm driver device under {0} (is vshm.ko loaded?)")]
    NoDevice(PathBuf),
    /// The requested PCI device has no driver node.
    #[error("no /dev/vshmN is bound to the PCI device {0}")]
    NoSuchPci(String),
    /// Several devices hold a vshm region; the caller must choose.
    #[error("several vshm driver devices hold a vshm region: {0}; choose one with --pci BDF")]
    Ambiguous(String),
    /// Devices exist but none holds a valid vshm region.
    #[error("no vshm driver device holds a valid vshm region: {0}")]
    NoRegion(String),
    /// The device node failed.
    #[error("{path}: {source}")]
    Io {
        /// The device node.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The driver speaks another ABI.
    #[error("{0}: driver ABI version {1}, this library speaks {VSHM_ABI_VERSION}")]
    Abi(PathBuf, u32),
    /// The region does not validate.
    #[error("{0}: not a vshm region: {1}")]
    Region(PathBuf, vshm_format::layout::LayoutError),
    /// IVPosition is not a usable peer id.
    #[error("{0}: IVPosition {1} is not a peer id (is the device attached to vshmd's socket?)")]
    BadPosition(PathBuf, u32),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DriverError + '_ {
    move |source| DriverError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A `/dev/vshmN` node and the PCI device it is bound to (from sysfs, if known).
#[derive(Debug, Clone)]
pub struct DriverDevice {
    /// The device node.
    pub path: PathBuf,
    /// The PCI address, e.g. `0000:00:03.0`.
    pub bdf: Option<String>,
}

/// The `/dev/vshm*` nodes under `dev` (normally `/dev`), sorted.
pub fn find_devices(dev: &Path) -> Vec<DriverDevice> {
    let mut found: Vec<DriverDevice> = std::fs::read_dir(dev)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_str()?.to_owned();
                    let n = name.strip_prefix("vshm")?;
                    (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then(|| {
                        let link = Path::new("/sys/class/vshm").join(&name).join("device");
                        DriverDevice {
                            path: e.path(),
                            bdf: std::fs::read_link(link).ok().and_then(|p| {
                                p.file_name().and_then(|f| f.to_str()).map(str::to_owned)
                            }),
                        }
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// Whether the vshm driver has a device node in this guest.
pub fn driver_present() -> bool {
    !find_devices(Path::new("/dev")).is_empty()
}

fn ioctl<T>(file: &File, request: u64, arg: *mut T) -> io::Result<()> {
    // SAFETY: `request` is one of the driver's ioctls, whose argument is `T` (or none);
    // `arg` points to a valid, writable `T` for the duration of the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as libc::Ioctl, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `VSHM_IOC_INFO` on an open device node.
pub fn info(file: &File) -> io::Result<VshmInfo> {
    let mut info = VshmInfo::default();
    ioctl(file, VSHM_IOC_INFO, &mut info)?;
    Ok(info)
}

/// A guest peer over the vshm kernel driver.
#[derive(Debug)]
pub struct DriverTransport {
    path: PathBuf,
    bdf: Option<String>,
    file: File,
    shm: Mapping,
    peer_id: PeerId,
    vectors: u32,
    /// `VshmInfo::flags`.
    features: u32,
    region_size: u64,
    waiters: Mutex<Vec<File>>,
    /// This process's hold table (`VSHM_INFO_TRACK`), once the namespace attached
    /// ([`Transport::track_holds`]).
    holds: OnceLock<Mapping>,
}

impl DriverTransport {
    /// Opens the driver device bound to the PCI device `bdf`, or, with `None`, the one
    /// holding a valid vshm region (an error names the candidates if there are several).
    pub fn open(bdf: Option<&str>) -> Result<DriverTransport, DriverError> {
        Self::open_in(Path::new("/dev"), bdf)
    }

    /// As [`DriverTransport::open`], with another directory of device nodes.
    pub fn open_in(dev: &Path, bdf: Option<&str>) -> Result<DriverTransport, DriverError> {
        let devices = find_devices(dev);
        if devices.is_empty() {
            return Err(DriverError::NoDevice(dev.to_owned()));
        }
        if let Some(bdf) = bdf {
            let d = devices
                .iter()
                .find(|d| d.bdf.as_deref() == Some(bdf))
                .ok_or_else(|| DriverError::NoSuchPci(bdf.to_owned()))?;
            return crate::os::retry_scribbled(|| Self::attach(d));
        }
        let (mut good, bad) = crate::os::retry_scribbled(|| {
            let mut good = Vec::new();
            let mut bad = Vec::new();
            for d in &devices {
                match Self::attach(d) {
                    Ok(t) => good.push(t),
                    Err(e) => bad.push(e.to_string()),
                }
            }
            if good.is_empty() {
                Err(bad)
            } else {
                Ok((good, bad))
            }
        })
        .map_err(|bad| DriverError::NoRegion(bad.join("; ")))?;
        match good.len() {
            1 => Ok(good.remove(0)),
            0 => Err(DriverError::NoRegion(bad.join("; "))),
            _ => Err(DriverError::Ambiguous(
                good.iter()
                    .map(|t| {
                        format!(
                            "{} ({})",
                            t.path.display(),
                            t.bdf.as_deref().unwrap_or("PCI address unknown")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        }
    }

    /// Opens one device node and checks its region.
    pub fn attach(d: &DriverDevice) -> Result<DriverTransport, DriverError> {
        let path = &d.path;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        let info = info(&file).map_err(io_err(path))?;
        if info.abi_version != VSHM_ABI_VERSION {
            return Err(DriverError::Abi(path.clone(), info.abi_version));
        }
        let shm = Mapping::new(&file, info.region_size).map_err(io_err(path))?;
        let region = shm.region();
        let sb: Superblock = read_pod(&region, 0).map_err(|_| {
            DriverError::Region(
                path.clone(),
                vshm_format::layout::LayoutError::TooSmall(256, 0),
            )
        })?;
        Layout::from_superblock(&sb, vshm_format::shm::SharedMemory::size(&region))
            .map_err(|e| DriverError::Region(path.clone(), e))?;
        let peer_id = u16::try_from(info.peer_id)
            .ok()
            .filter(|&p| p != 0)
            .map(PeerId)
            .ok_or_else(|| DriverError::BadPosition(path.clone(), info.peer_id))?;
        Ok(DriverTransport {
            path: path.clone(),
            bdf: d.bdf.clone(),
            file,
            shm,
            peer_id,
            vectors: info.vectors,
            features: info.flags,
            region_size: info.region_size,
            waiters: Mutex::new(Vec::new()),
            holds: OnceLock::new(),
        })
    }

    /// Whether the driver keeps this process's hold table, so that what it holds is
    /// closed if it dies (docs/FORMAT.md §11b): `VSHM_INFO_TRACK` and an attached namespace.
    pub fn tracks_holds(&self) -> bool {
        self.holds.get().is_some()
    }

    /// Asks the driver for a hold table and maps it (`VSHM_IOC_TRACK`, then mmap at offset
    /// region_size).
    fn start_tracking(&self, place: &PeerPlace) -> io::Result<()> {
        if self.features & VSHM_INFO_TRACK == 0 {
            return Err(io::Error::from_raw_os_error(libc::ENOTTY));
        }
        let mut track = VshmTrack {
            peer_slot: place.peer_slot.raw(),
            max_objects: place.max_objects,
            incarnation: place.incarnation,
            peer_entry: place.peer_entry.raw(),
            object_table: place.object_table.raw(),
            cells: place.cells.raw(),
            mailbox: place.mailbox.raw(),
            object_stride: place.object_stride,
            generation_off: place.generation_off,
            lease_off: place.lease_off,
            sync_off: place.sync_off,
        };
        ioctl(&self.file, VSHM_IOC_TRACK, &mut track)?;
        let table = Mapping::new_at(&self.file, self.region_size, holds_len(place.max_objects))?;
        let _ = self.holds.set(table);
        Ok(())
    }

    /// Applies `change` to this process's hold table, if it has one.
    fn record(&self, change: HoldChange) -> Result<(), vshm_format::shm::Fault> {
        let Some(table) = self.holds.get() else {
            return Ok(());
        };
        let mem = table.region();
        let entry =
            |slot: ObjectSlot| u64::from(slot.raw()) * std::mem::size_of::<VshmHold>() as u64;
        match change {
            HoldChange::Taken(slot, generation) => {
                let at = entry(slot);
                // Another object than the one counted (that hold was revoked, §11a, and the
                // slot reused): the old count counts nothing of ours any more. Two threads
                // racing here may count one handle too few: a leak to the VM's detach,
                // never a close too many.
                let counted = mem.load_u64(at + HOLD_GENERATION_OFF, Ordering::Relaxed)?;
                if counted != generation.raw() {
                    mem.store_u64(
                        at + HOLD_GENERATION_OFF,
                        generation.raw(),
                        Ordering::Relaxed,
                    )?;
                    return mem.store_u32(at + HOLD_COUNT_OFF, 1, Ordering::Release);
                }
                add_count(&mem, at + HOLD_COUNT_OFF, true)
            }
            HoldChange::Releasing(slot) => add_count(&mem, entry(slot) + HOLD_COUNT_OFF, false),
            HoldChange::Owned(slot, generation, token) => {
                let at = entry(slot);
                mem.store_u64(
                    at + HOLD_GENERATION_OFF,
                    generation.raw(),
                    Ordering::Relaxed,
                )?;
                mem.store_u32(at + HOLD_OWNER_OFF, token, Ordering::Release)
            }
            HoldChange::Disowned(slot, token) => mem
                .cas_u32(entry(slot) + HOLD_OWNER_OFF, token, 0)
                .map(|_| ()),
        }
    }

    /// The device node.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The PCI address of the device, if sysfs tells it.
    pub fn bdf(&self) -> Option<&str> {
        self.bdf.as_deref()
    }

    /// MSI-X vectors the driver handles (0: no interrupts; waits poll).
    pub fn vectors(&self) -> u32 {
        self.vectors
    }

    /// An open file of the device of this waiter's own (pooled).
    fn waiter(&self) -> io::Result<File> {
        if let Some(f) = self.waiters.lock().ok().and_then(|mut w| w.pop()) {
            return Ok(f);
        }
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&self.path)
    }

    fn put_waiter(&self, f: File) {
        if let Ok(mut w) = self.waiters.lock() {
            if w.len() < POOLED_WAITERS {
                w.push(f);
            }
        }
    }
}

/// Adds one to (or takes one from, never below 0) the count at `off`: this process's
/// threads share the table.
fn add_count(mem: &RawRegion<'_>, off: u64, up: bool) -> Result<(), vshm_format::shm::Fault> {
    let mut v = mem.load_u32(off, Ordering::Relaxed)?;
    loop {
        let next = if up {
            v.saturating_add(1)
        } else if v == 0 {
            return Ok(());
        } else {
            v - 1
        };
        match mem.cas_u32(off, v, next)? {
            Ok(_) => return Ok(()),
            Err(now) => v = now,
        }
    }
}

/// Marks everything the device has delivered so far as seen by `f` (non-blocking read).
fn drain(mut f: &File) -> Result<(), TransportError> {
    let mut buf = [0u8; std::mem::size_of::<VshmEvents>()];
    match f.read(&mut buf) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(TransportError::Os(e.raw_os_error().unwrap_or(libc::EIO))),
    }
}

impl Transport for DriverTransport {
    fn region(&self) -> RawRegion<'_> {
        self.shm.region()
    }

    fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    fn ring(&self, peer: PeerId, vector: u16) -> Result<(), TransportError> {
        let mut ring = VshmRing {
            peer: u32::from(peer.raw()),
            vector: u32::from(vector),
        };
        ioctl(&self.file, VSHM_IOC_RING, &mut ring)
            .map_err(|e| TransportError::Os(e.raw_os_error().unwrap_or(libc::EIO)))
    }

    fn lock_token(&self) -> u32 {
        // All processes of this guest share the peer: the pid tells them apart.
        std::process::id()
    }

    fn token_alive(&self, token: u32) -> bool {
        crate::os::process_alive(token)
    }

    fn track_holds(&self, place: &PeerPlace) {
        // Without it (an older driver, or a refusal) this process's handles are closed
        // when it closes them or when the VM detaches, as over sysfs.
        let _ = self.start_tracking(place);
    }

    fn hold_changed(&self, change: HoldChange) {
        let _ = self.record(change);
    }

    fn thread_token(&self) -> u32 {
        crate::os::current_tid()
    }

    fn notify_local(&self) {
        // Wakes every waiter of this device in the guest: they all share this peer.
        let _ = ioctl(&self.file, VSHM_IOC_KICK, std::ptr::null_mut::<u8>());
    }

    fn revoke(&self, offset: RegionOffset, len: u64) -> bool {
        self.shm.fence(offset.raw(), len).is_ok()
    }

    fn restore(&self, offset: RegionOffset, len: u64) -> Result<(), TransportError> {
        self.shm
            .unfence(&self.file, offset.raw(), len)
            .map_err(|e| TransportError::Os(e.raw_os_error().unwrap_or(libc::EIO)))
    }

    fn wait_until(
        &self,
        ready: &mut dyn FnMut() -> bool,
        timeout: Duration,
    ) -> Result<bool, TransportError> {
        if self.vectors == 0 {
            // ivshmem-plain: no interrupts to wait for.
            return Ok(crate::pci::poll_until(ready, timeout));
        }
        let start = Instant::now();
        let waiter = self
            .waiter()
            .map_err(|e| TransportError::Os(e.raw_os_error().unwrap_or(libc::EIO)))?;
        let result = (|| {
            // From here on any interrupt or kick makes `waiter` readable, so a ring after
            // the check below cannot be missed.
            drain(&waiter)?;
            loop {
                if ready() {
                    return Ok(true);
                }
                let left = timeout.saturating_sub(start.elapsed());
                if left.is_zero() {
                    return Ok(false);
                }
                let mut pfd = libc::pollfd {
                    fd: waiter.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // Round up: a 0 ms poll for a sub-millisecond rest would spin.
                let ms = left.min(RECHECK).as_micros().div_ceil(1000);
                let ms = libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX);
                // SAFETY: one valid pollfd.
                let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
                if rc < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(TransportError::Os(e.raw_os_error().unwrap_or(libc::EIO)));
                    }
                    continue;
                }
                if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                    // The device was unbound.
                    return Err(TransportError::Os(libc::ENODEV));
                }
                if pfd.revents & libc::POLLIN != 0 {
                    drain(&waiter)?;
                }
            }
        })();
        if result.is_ok() {
            self.put_waiter(waiter);
        }
        result
    }
}

/// Why no guest transport could be opened.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Through the driver (`/dev/vshm*` exists).
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// Through sysfs (no driver).
    #[error(transparent)]
    Pci(#[from] PciError),
}

/// A Linux guest peer: the vshm driver when it is loaded, sysfs otherwise.
#[derive(Debug)]
pub enum GuestTransport {
    /// `/dev/vshmN`: cacheable mapping, interrupts.
    Driver(DriverTransport),
    /// sysfs `resource0`/`resource2`: uncached mapping, polling.
    Pci(PciTransport),
}

impl GuestTransport {
    /// The driver's device when a `/dev/vshm*` node exists (the driver then owns the BARs,
    /// so sysfs could not map them), else the sysfs transport. `bdf` chooses a PCI device
    /// in guests with several.
    pub fn open(bdf: Option<&str>) -> Result<GuestTransport, GuestError> {
        if driver_present() {
            Ok(GuestTransport::Driver(DriverTransport::open(bdf)?))
        } else {
            Ok(GuestTransport::Pci(PciTransport::open(bdf)?))
        }
    }

    /// `"driver"` or `"sysfs"`.
    pub fn kind(&self) -> &'static str {
        match self {
            GuestTransport::Driver(_) => "driver",
            GuestTransport::Pci(_) => "sysfs",
        }
    }
}

impl GuestTransport {
    /// The transport chosen.
    fn chosen(&self) -> &dyn Transport {
        match self {
            GuestTransport::Driver(t) => t,
            GuestTransport::Pci(t) => t,
        }
    }
}

crate::forward_transport!(GuestTransport, self => self.chosen());
