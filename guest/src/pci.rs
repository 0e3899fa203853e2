//! Linux guest transport: the ivshmem PCI device through sysfs, from userspace.
//!
//! BAR0 holds the registers (IVPosition at 8 = our peer id, Doorbell at 12 = ring
//! `(peer << 16) | vector`), BAR2 the shared region. We map BAR2 through `resource2`, not
//! `resource2_wc`: the namespace runs CAS and ordered loads/stores on shared words, which
//! write-combining memory does not order (and on hosts that honour the guest PAT, locked
//! operations on WC memory are not guaranteed). `resource2` is UC-: correct everywhere, slow
//! on AMD hosts with KVM (guest PAT honoured), WB in effect on Intel/KVM and under TCG. The
//! vshm kernel driver (guest/linux-driver, [`crate::driver`]) maps the BAR cacheable and
//! delivers MSI-X interrupts; without it a waiting guest polls: it spins briefly, then
//! sleeps with backoff so it does not burn a vCPU. While the driver is bound this transport
//! cannot map the BARs (the driver owns them); [`crate::driver::GuestTransport`] picks.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use vshm_format::layout::{Layout, Superblock};
use vshm_format::shm::{read_pod, RawRegion};
use vshm_format::{PeerId, RegionOffset};

use crate::host::Mapping;
use crate::{Transport, TransportError};

/// PCI vendor and device id of QEMU's ivshmem.
pub const IVSHMEM_VENDOR: &str = "0x1af4";
/// See [`IVSHMEM_VENDOR`].
pub const IVSHMEM_DEVICE: &str = "0x1110";

const REG_IVPOSITION: usize = 8;
const REG_DOORBELL: usize = 12;

/// How long a waiter spins before it starts sleeping.
const SPIN: Duration = Duration::from_micros(50);
/// First and longest sleep of the backoff.
const SLEEP_MIN: Duration = Duration::from_micros(50);
const SLEEP_MAX: Duration = Duration::from_millis(2);

/// Why the device could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// No ivshmem device in this guest.
    #[error("no ivshmem PCI device (1af4:1110) found under {0}; is the VM started with -device ivshmem-doorbell?")]
    NoDevice(PathBuf),
    /// The requested device is not an ivshmem device.
    #[error("{0} is not an ivshmem device (vendor:device {1})")]
    NotIvshmem(String, String),
    /// Several devices carry a vshm region; the caller must choose.
    #[error("several ivshmem devices hold a vshm region: {0}; choose one with --pci BDF")]
    Ambiguous(String),
    /// Devices exist but none holds a valid vshm region.
    #[error("no ivshmem device holds a valid vshm region: {0}")]
    NoRegion(String),
    /// sysfs access failed.
    #[error("{path}: {source}")]
    Io {
        /// The sysfs file.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The BAR2 region does not validate.
    #[error("{0}: not a vshm region: {1}")]
    Region(String, vshm_format::layout::LayoutError),
    /// IVPosition is not a usable peer id.
    #[error("{0}: IVPosition {1} is not a peer id (is the device attached to vshmd's socket?)")]
    BadPosition(String, u32),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PciError + '_ {
    move |source| PciError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read_trim(path: &Path) -> Result<String, PciError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(io_err(path))
}

/// An ivshmem device in this guest (not yet mapped).
#[derive(Debug, Clone)]
pub struct Device {
    /// PCI address, e.g. `0000:00:03.0`.
    pub bdf: String,
    dir: PathBuf,
}

/// Lists the ivshmem devices under `sysfs_pci` (normally `/sys/bus/pci/devices`).
pub fn find_devices(sysfs_pci: &Path) -> Result<Vec<Device>, PciError> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(sysfs_pci).map_err(io_err(sysfs_pci))?;
    for e in entries.flatten() {
        let dir = e.path();
        let vendor = read_trim(&dir.join("vendor")).unwrap_or_default();
        let device = read_trim(&dir.join("device")).unwrap_or_default();
        if vendor == IVSHMEM_VENDOR && device == IVSHMEM_DEVICE {
            found.push(Device {
                bdf: e.file_name().to_string_lossy().into_owned(),
                dir,
            });
        }
    }
    found.sort_by(|a, b| a.bdf.cmp(&b.bdf));
    Ok(found)
}

/// Maps a BAR's sysfs resource file; returns the file too (a revoked range is mapped from
/// it again, §11a).
fn map_resource(path: &Path) -> Result<(Mapping, File), PciError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    // BAR0 is 256 bytes: map the page that holds it.
    let len = len.max(4096);
    let map = Mapping::new(&file, len).map_err(io_err(path))?;
    Ok((map, file))
}

/// A guest peer over an ivshmem PCI device.
#[derive(Debug)]
pub struct PciTransport {
    bdf: String,
    regs: Mapping,
    shm: Mapping,
    /// BAR2's resource file, to map a fenced range again.
    shm_file: File,
    peer_id: PeerId,
}

impl PciTransport {
    /// Opens the device at `bdf`, or, with `None`, the one ivshmem device holding a valid
    /// vshm region (an error names the candidates if there are several).
    pub fn open(bdf: Option<&str>) -> Result<PciTransport, PciError> {
        Self::open_in(Path::new("/sys/bus/pci/devices"), bdf)
    }

    /// As [`PciTransport::open`], with another sysfs root (tests).
    pub fn open_in(sysfs_pci: &Path, bdf: Option<&str>) -> Result<PciTransport, PciError> {
        if let Some(bdf) = bdf {
            let dir = sysfs_pci.join(bdf);
            let ids = format!(
                "{}:{}",
                read_trim(&dir.join("vendor"))?,
                read_trim(&dir.join("device"))?
            );
            if ids != format!("{IVSHMEM_VENDOR}:{IVSHMEM_DEVICE}") {
                return Err(PciError::NotIvshmem(bdf.to_owned(), ids));
            }
            let d = Device {
                bdf: bdf.to_owned(),
                dir,
            };
            return crate::os::retry_scribbled(|| Self::attach(&d));
        }
        let devices = find_devices(sysfs_pci)?;
        if devices.is_empty() {
            return Err(PciError::NoDevice(sysfs_pci.to_owned()));
        }
        // If no device holds a valid region, one may be a vshm region whose header a peer
        // scribbled: vshmd rewrites it within one heal period, so look again briefly.
        let (mut good, bad) = crate::os::retry_scribbled(|| {
            let mut good = Vec::new();
            let mut bad = Vec::new();
            for d in &devices {
                match Self::attach(d) {
                    Ok(t) => good.push(t),
                    Err(e) => bad.push(format!("{}: {e}", d.bdf)),
                }
            }
            if good.is_empty() {
                Err(bad)
            } else {
                Ok((good, bad))
            }
        })
        .map_err(|bad| PciError::NoRegion(bad.join("; ")))?;
        match good.len() {
            1 => Ok(good.remove(0)),
            0 => Err(PciError::NoRegion(bad.join("; "))),
            _ => Err(PciError::Ambiguous(
                good.iter()
                    .map(|t| format!("{} (region {})", t.bdf, t.region_id_hex()))
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        }
    }

    fn attach(d: &Device) -> Result<PciTransport, PciError> {
        let enable = d.dir.join("enable");
        // Enabling decodes the BARs; already enabled is fine.
        if read_trim(&enable).map(|v| v != "1").unwrap_or(true) {
            File::options()
                .write(true)
                .open(&enable)
                .and_then(|mut f| f.write_all(b"1"))
                .map_err(io_err(&enable))?;
        }
        let (regs, _) = map_resource(&d.dir.join("resource0"))?;
        let (shm, shm_file) = map_resource(&d.dir.join("resource2"))?;
        let region = shm.region();
        let sb: Superblock = read_pod(&region, 0).map_err(|_| {
            PciError::Region(
                d.bdf.clone(),
                vshm_format::layout::LayoutError::TooSmall(256, 0),
            )
        })?;
        Layout::from_superblock(&sb, vshm_format::shm::SharedMemory::size(&region))
            .map_err(|e| PciError::Region(d.bdf.clone(), e))?;
        let pos = read_register(&regs, REG_IVPOSITION);
        let peer_id = u16::try_from(pos)
            .ok()
            .filter(|&p| p != 0)
            .map(PeerId)
            .ok_or_else(|| PciError::BadPosition(d.bdf.clone(), pos))?;
        Ok(PciTransport {
            bdf: d.bdf.clone(),
            regs,
            shm,
            shm_file,
            peer_id,
        })
    }

    /// The device's PCI address.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    fn region_id_hex(&self) -> String {
        read_pod::<Superblock, _>(&self.shm.region(), 0)
            .map(|sb| sb.region_id.iter().map(|b| format!("{b:02x}")).collect())
            .unwrap_or_default()
    }

    fn doorbell(&self) -> *mut u32 {
        // REG_DOORBELL lies inside the mapped register page.
        self.regs
            .region()
            .base()
            .as_ptr()
            .wrapping_add(REG_DOORBELL)
            .cast::<u32>()
    }
}

/// Reads a 32-bit BAR0 register with one volatile load (MMIO, not memory: no atomics).
fn read_register(regs: &Mapping, offset: usize) -> u32 {
    let p = regs
        .region()
        .base()
        .as_ptr()
        .wrapping_add(offset)
        .cast::<u32>();
    // SAFETY: `offset` is one of the 4-byte-aligned registers inside the BAR0 page `regs`
    // maps (at least 4096 bytes), and the mapping outlives this call.
    unsafe { p.read_volatile() }
}

impl Transport for PciTransport {
    fn region(&self) -> RawRegion<'_> {
        self.shm.region()
    }

    fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    fn ring(&self, peer: PeerId, vector: u16) -> Result<(), TransportError> {
        let value = (u32::from(peer.raw()) << 16) | u32::from(vector);
        let reg = NonNull::new(self.doorbell()).ok_or(TransportError::Os(libc::EFAULT))?;
        // SAFETY: the doorbell register is a 4-byte-aligned MMIO register inside the BAR0
        // page we mapped; a single volatile 32-bit store is the access the device expects.
        unsafe { reg.as_ptr().write_volatile(value) };
        Ok(())
    }

    fn lock_token(&self) -> u32 {
        // All processes of this guest share the peer: the pid tells them apart.
        std::process::id()
    }

    fn token_alive(&self, token: u32) -> bool {
        crate::os::process_alive(token)
    }

    fn thread_token(&self) -> u32 {
        crate::os::current_tid()
    }

    fn revoke(&self, offset: RegionOffset, len: u64) -> bool {
        self.shm.fence(offset.raw(), len).is_ok()
    }

    fn restore(&self, offset: RegionOffset, len: u64) -> Result<(), TransportError> {
        self.shm
            .unfence(&self.shm_file, offset.raw(), len)
            .map_err(|e| TransportError::Os(e.raw_os_error().unwrap_or(libc::EIO)))
    }

    fn wait_until(
        &self,
        ready: &mut dyn FnMut() -> bool,
        timeout: Duration,
    ) -> Result<bool, TransportError> {
        Ok(poll_until(ready, timeout))
    }
}

/// Waits without interrupts: checks `ready` in a spin for [`SPIN`], then sleeps between
/// checks with exponential backoff up to [`SLEEP_MAX`]. Returns whether it became ready.
pub(crate) fn poll_until(ready: &mut dyn FnMut() -> bool, timeout: Duration) -> bool {
    let start = Instant::now();
    let mut sleep = SLEEP_MIN;
    loop {
        if ready() {
            return true;
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return false;
        }
        if elapsed < SPIN {
            std::hint::spin_loop();
            continue;
        }
        std::thread::sleep(sleep.min(timeout - elapsed));
        sleep = (sleep * 2).min(SLEEP_MAX);
    }
}
