//! The ivshmem-doorbell device, as stock QEMU models it, attached to vshmd's ivshmem socket:
//! the second way a VM of this VMM reaches the namespace (the one every QEMU guest uses), so
//! the same guest software runs here and under QEMU. PCI 1af4:1110 (class 05/00, revision
//! 1); BAR 0 (256 bytes) holds the registers — IntrMask (0x00), IntrStatus (0x04),
//! IVPosition (0x08, this VM's peer id), Doorbell (0x0C: `peer << 16 | vector` rings that
//! peer's vector); BAR 2 (64-bit, prefetchable) is the whole region, vshmd's memfd, as one
//! KVM slot. No MSI-X (so BAR 1 is absent) and no interrupt: a guest polls, as the `vshm`
//! library's sysfs transport does, and IntrStatus reads 1 (then 0) once any of its vectors
//! was rung.
//!
//! The client side of QEMU's ivshmem server protocol: the server sends the protocol version
//! (0; vshmd sends a negative code and a detail when it refuses), this VM's peer id, the
//! region's fd (with -1), then `(peer id, eventfd)` for every vector of every peer,
//! including this one's own and vshmd's; later ones as peers arrive (the start is
//! `vshm::host::handshake`, which the library's host transport reads too). Like QEMU's device, the
//! VMM only writes 1 to the eventfd a doorbell names; everything vshm adds on top (audits,
//! acknowledgements, the lease protocol) is the guest's business.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use kvm_ioctls::VmFd;
use vshm::host::{handshake, recv_msg, Handshake};

use crate::pci::{BarKind, ConfigSpace, PciError, PciFunction};
use crate::vshm_device::PHYS_LIMIT;
use crate::window::{Window, WindowError};

/// PCI identity of QEMU's ivshmem device.
pub const PCI_VENDOR: u16 = 0x1AF4;
/// PCI device id of ivshmem.
pub const PCI_DEVICE: u16 = 0x1110;
const REGISTERS: u64 = 256;
const INTR_MASK: u64 = 0x00;
const INTR_STATUS: u64 = 0x04;
const IV_POSITION: u64 = 0x08;
const DOORBELL: u64 = 0x0C;

/// Why the device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IvshmemError {
    /// The handshake with the ivshmem server failed (or vshmd refused the VM).
    #[error(transparent)]
    Handshake(#[from] vshm::host::HostError),
    /// A thread or socket call failed.
    #[error("ivshmem client: {0}")]
    Io(#[from] std::io::Error),
    /// The region cannot be a BAR here.
    #[error("the region is {size:#x} bytes: BAR 2 needs a power of two of at least 4 KiB, at most {max:#x} in this VMM's layout")]
    RegionSize {
        /// Its size.
        size: u64,
        /// The most the layout has room for.
        max: u64,
    },
    /// PCI layout.
    #[error("PCI: {0}")]
    Pci(#[from] PciError),
    /// Mapping the region.
    #[error("mapping the region: {0}")]
    Map(#[from] WindowError),
}

/// Peers' eventfds by peer id, then vector.
type Bells = Arc<Mutex<BTreeMap<u16, Vec<File>>>>;

/// Where firmware puts the device's BARs.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    /// BAR 0 (256 bytes).
    pub bar0: u64,
    /// BAR 2 (the region; aligned to its size).
    pub bar2: u64,
    /// The largest region the layout has room for at `bar2`.
    pub max_region: u64,
    /// The KVM memory slot of the region.
    pub slot: u32,
    /// Guest RAM ends here.
    pub ram_end: u64,
}

/// The ivshmem-doorbell function.
pub struct IvshmemPci {
    config: ConfigSpace,
    id: u16,
    intr_mask: u32,
    bells: Bells,
    region: Window,
    ram_end: u64,
    sock: UnixStream,
    reader: Option<JoinHandle<()>>,
    /// What went wrong after start (shown by the VMM).
    pub last_error: Option<String>,
}

impl std::fmt::Debug for IvshmemPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IvshmemPci")
            .field("id", &self.id)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl IvshmemPci {
    /// Connects to the ivshmem server (vshmd's `--socket`) at `path` and builds the device.
    pub fn connect(
        path: &Path,
        vm: Arc<VmFd>,
        placement: Placement,
    ) -> Result<IvshmemPci, IvshmemError> {
        let Handshake {
            sock,
            peer_id,
            memfd,
        } = handshake(path)?;
        let id = peer_id.0;
        let size = memfd.metadata()?.len();
        if size < 4096 || !size.is_power_of_two() || size > placement.max_region {
            return Err(IvshmemError::RegionSize {
                size,
                max: placement.max_region,
            });
        }
        let bells: Bells = Arc::default();
        let reader = {
            let sock = sock.try_clone()?;
            let bells = Arc::clone(&bells);
            std::thread::Builder::new()
                .name("vshm-ivshmem".into())
                .spawn(move || read_peers(&sock, &bells, id))?
        };

        let mut config = ConfigSpace::new(PCI_VENDOR, PCI_DEVICE, [0x05, 0x00, 0x00], 1);
        config.set_subsystem(PCI_VENDOR, 0x1100);
        config.set_bar(0, BarKind::Memory32, REGISTERS, placement.bar0)?;
        config.set_bar(
            2,
            BarKind::Memory64 { prefetchable: true },
            size,
            placement.bar2,
        )?;
        config.enable_memory();
        let mut region = Window::new(
            vm,
            Some(placement.bar2),
            size,
            placement.slot,
            placement.slot + 1,
        );
        region.map(0, size, Arc::new(memfd), 0, true)?;
        Ok(IvshmemPci {
            config,
            id,
            intr_mask: 0,
            bells,
            region,
            ram_end: placement.ram_end,
            sock,
            reader: Some(reader),
            last_error: None,
        })
    }

    /// This VM's peer id (IVPosition).
    pub fn peer_id(&self) -> u16 {
        self.id
    }

    /// Where the region is placed (`None`: nowhere the guest reaches).
    pub fn region_base(&self) -> Option<u64> {
        self.region.base()
    }

    /// IntrStatus, read and cleared: 1 if any of this VM's vectors was rung since the last
    /// read (QEMU sets it for an interrupt in INTx mode; with no interrupts here a guest
    /// polls it instead).
    fn take_status(&mut self) -> u32 {
        let bells = self.bells.lock().unwrap_or_else(PoisonError::into_inner);
        let mut rung = 0;
        for mut bell in bells.get(&self.id).into_iter().flatten() {
            let mut count = [0u8; 8];
            if bell.read(&mut count).is_ok_and(|n| n == 8) {
                rung = 1;
            }
        }
        rung
    }

    fn ring(&mut self, value: u32) {
        let peer = u16::try_from(value >> 16).unwrap_or(u16::MAX);
        let vector = usize::try_from(value & 0xFFFF).unwrap_or(usize::MAX);
        let bells = self.bells.lock().unwrap_or_else(PoisonError::into_inner);
        // A peer or vector nobody announced: dropped, as QEMU does.
        if let Some(mut bell) = bells.get(&peer).and_then(|v| v.get(vector)) {
            let _ = bell.write_all(&1u64.to_ne_bytes());
        }
    }
}

fn set_nonblocking(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor `f` owns; no memory is passed.
    unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

/// After the handshake: peers arriving (`id`, eventfd: one message per vector) and leaving
/// (`id` alone), until the server closes the connection.
fn read_peers(sock: &UnixStream, bells: &Bells, own: u16) {
    while let Ok(Some((id, fd))) = recv_msg(sock) {
        let Ok(id) = u16::try_from(id) else {
            continue;
        };
        let mut b = bells.lock().unwrap_or_else(PoisonError::into_inner);
        match fd {
            Some(f) => {
                if id == own {
                    // Our own vectors are read by IntrStatus without blocking.
                    set_nonblocking(&f);
                }
                b.entry(id).or_default().push(f);
            }
            None => {
                b.remove(&id);
            }
        }
    }
}

impl PciFunction for IvshmemPci {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn config_written(&mut self) {
        let place = self.config.bar_place(2, self.ram_end, PHYS_LIMIT);
        if let Err(e) = self.region.place(place) {
            eprintln!("vshm-vmm: ivshmem: placing the region: {e}");
            self.last_error = Some(e.to_string());
        }
    }

    fn mmio_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        let reg = match offset & !3 {
            INTR_MASK => self.intr_mask,
            INTR_STATUS => self.take_status(),
            IV_POSITION => u32::from(self.id),
            _ => 0,
        };
        let bytes = reg.to_le_bytes();
        let start = usize::try_from(offset & 3).unwrap_or(0);
        for (d, b) in data.iter_mut().zip(bytes.iter().skip(start)) {
            *d = *b;
        }
    }

    fn mmio_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 || data.len() != 4 {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match offset {
            INTR_MASK => self.intr_mask = v,
            DOORBELL => self.ring(v),
            _ => {}
        }
    }
}

impl Drop for IvshmemPci {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}
