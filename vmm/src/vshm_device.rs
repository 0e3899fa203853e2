//! The vshm device as the guest sees it: a modern virtio-pci function (1af4:10fe) whose
//! virtio half is vshmd's vhost-user device (docs/VHOST-USER.md). Laid out like QEMU's
//! generic `vhost-user-device-pci`, so a driver written against one runs on the other:
//!
//! * BAR 0 (32-bit, 16 KiB): common configuration at 0x0000, ISR at 0x1000, the device's
//!   configuration (fetched from the backend with GET_CONFIG) at 0x2000, notifications at
//!   0x3000 (4 bytes per queue), each described by a virtio PCI capability.
//! * BAR 4 (64-bit, prefetchable): the shared-memory window (SHARED_MEMORY_CFG capability,
//!   id 0), sized by the backend's GET_SHMEM_CONFIG; its contents are [`Window`]'s.
//!
//! The frontend side: at start the VMM connects, reads the features, the config space and
//! the window size, and gives vshmd the guest's RAM (SET_MEM_TABLE). A guest notification
//! is a KVM ioeventfd straight into the queue's kick eventfd, so the vCPU does not exit for
//! it. At DRIVER_OK the queues the driver enabled are handed to vshmd. SHMEM_MAP/UNMAP from
//! vshmd arrive on the backend request channel, served by an event-manager loop on its own
//! thread while the vCPU runs.
#![allow(clippy::cast_possible_truncation)] // virtio registers are 8/16/32-bit views of wider values: narrowing is the point.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserMMap, VhostUserMMapFlags,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandlerMut,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vshm_format::virtio::{self, CONFIG_BYTES, WINDOW_SHMID};

use crate::pci::{BarKind, ConfigSpace, PciError, PciFunction};
use crate::window::Window;

/// Offsets inside BAR 0.
const COMMON: u64 = 0x0000;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const BAR0_SIZE: u64 = 0x4000;
const COMMON_LEN: u32 = 0x38;
/// Queues of the device (requestq, eventq).
pub const QUEUES: usize = 2;
/// The largest queue a driver may set up (vshmd's device takes 256).
pub const QUEUE_MAX: u16 = 256;

const STATUS_FEATURES_OK: u8 = 8;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_NEEDS_RESET: u8 = 0x40;
const NO_VECTOR: u16 = 0xFFFF;

/// Why the device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The vhost-user connection failed.
    #[error("vhost-user device at {path}: {what}: {cause}")]
    VhostUser {
        /// The socket.
        path: String,
        /// What was being done.
        what: &'static str,
        /// Cause.
        cause: String,
    },
    /// The backend lacks something the device needs.
    #[error("vhost-user device at {path}: the backend does not offer {what}")]
    Missing {
        /// The socket.
        path: String,
        /// What.
        what: String,
    },
    /// The config space is not this format's.
    #[error(
        "vhost-user device at {path}: its config space is not format version {}",
        vshm_format::layout::FORMAT_VERSION
    )]
    Format {
        /// The socket.
        path: String,
    },
    /// The window size the backend reported is unusable.
    #[error("vhost-user device at {path}: window size {size:#x} is not a non-zero multiple of {page:#x} up to {max:#x}")]
    WindowSize {
        /// The socket.
        path: String,
        /// What it reported.
        size: u64,
        /// The page size.
        page: u64,
        /// The most the layout allows.
        max: u64,
    },
    /// PCI layout.
    #[error("PCI: {0}")]
    Pci(#[from] PciError),
    /// An eventfd or ioeventfd.
    #[error("{what}: {source}")]
    Os {
        /// What.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// Guest memory cannot be shared with the backend.
    #[error("guest memory cannot be given to the backend: {0}")]
    Memory(String),
}

#[derive(Debug, Clone, Copy)]
struct QueueState {
    size: u16,
    enable: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl Default for QueueState {
    fn default() -> Self {
        QueueState {
            size: QUEUE_MAX,
            enable: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// What the guest wrote into the common configuration.
#[derive(Debug, Default)]
struct Common {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: [QueueState; QUEUES],
}

/// Serves SHMEM_MAP / SHMEM_UNMAP into the window.
struct MapHandler {
    window: Arc<Mutex<Window>>,
}

fn refused(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl VhostUserFrontendReqHandlerMut for MapHandler {
    fn shmem_map(&mut self, req: &VhostUserMMap, fd: &dyn AsRawFd) -> HandlerResult<u64> {
        if req.shmid != WINDOW_SHMID {
            return Err(refused(format!("no shared-memory region {}", req.shmid)));
        }
        let file = Arc::new(File::from(dup_fd(fd)?));
        let writable = req.flags & VhostUserMMapFlags::WRITABLE.bits() != 0;
        let (off, len, fd_off) = (req.shm_offset, req.len, req.fd_offset);
        self.window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(off, len, file, fd_off, writable)
            .map_err(refused)?;
        Ok(0)
    }

    fn shmem_unmap(&mut self, req: &VhostUserMMap) -> HandlerResult<u64> {
        if req.shmid != WINDOW_SHMID {
            return Err(refused(format!("no shared-memory region {}", req.shmid)));
        }
        let (off, len) = (req.shm_offset, req.len);
        self.window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .unmap(off, len)
            .map_err(refused)?;
        Ok(0)
    }
}

/// The backend request channel as an event-manager subscriber.
struct BackendChannel {
    handler: FrontendReqHandler<Mutex<MapHandler>>,
    /// A copy of the main vhost-user socket, watched for hang-up only: the backend channel
    /// itself never shows one (this process keeps the end it gave the backend open).
    main: OwnedFd,
    closed: Arc<AtomicBool>,
    window: Arc<Mutex<Window>>,
}

impl BackendChannel {
    /// The backend is gone: nothing it mapped may stay reachable (vshmd reclaims the holds
    /// and, after its quarantine, reuses the memory), docs/VHOST-USER.md §5.2.
    fn close(&self) {
        let cleared = self
            .window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        if let Err(e) = cleared {
            eprintln!("vshm-vmm: vshm device: the backend left but a mapping stays: {e}");
        }
        self.closed.store(true, Ordering::Release);
    }
}

impl MutEventSubscriber for BackendChannel {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.main.as_raw_fd() {
            let _ = ops.remove(Events::empty(&self.main));
            let _ = ops.remove(Events::empty(&self.handler));
            return self.close();
        }
        let bad = EventSet::HANG_UP | EventSet::ERROR;
        if events.event_set().intersects(bad)
            || self.handler.handle_request().is_err_and(|e| {
                matches!(
                    e,
                    vhost::vhost_user::Error::Disconnected
                        | vhost::vhost_user::Error::PartialMessage
                )
            })
        {
            let _ = ops.remove(Events::empty(&self.handler));
            self.close();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let hang_up = EventSet::HANG_UP | EventSet::READ_HANG_UP;
        if ops.add(Events::new(&self.handler, EventSet::IN)).is_err()
            || ops.add(Events::new(&self.main, hang_up)).is_err()
        {
            self.close();
        }
    }
}

/// The vshm virtio-pci function.
pub struct VshmPci {
    path: String,
    config: ConfigSpace,
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    frontend: Frontend,
    /// Virtio features the device offers the driver (the backend's, transport bits removed).
    offered: u64,
    protocol_features_bit: u64,
    device_config: [u8; CONFIG_BYTES],
    window: Arc<Mutex<Window>>,
    common: Common,
    active: bool,
    /// Queues handed to the backend (a reset takes back exactly these).
    started: [bool; QUEUES],
    /// RESET_DEVICE was negotiated: a device reset is passed on to the backend.
    resets: bool,
    ram_end: u64,
    kicks: [EventFd; QUEUES],
    calls: [EventFd; QUEUES],
    notify_base: u64,
    stop: Arc<AtomicBool>,
    channel_closed: Arc<AtomicBool>,
    channel: Option<JoinHandle<()>>,
    /// What went wrong after start (shown by the VMM; the device then needs a reset).
    pub last_error: Option<String>,
}

impl std::fmt::Debug for VshmPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VshmPci")
            .field("path", &self.path)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

/// Where firmware puts the device's BARs.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    /// BAR 0's guest address (16 KiB aligned).
    pub bar0: u64,
    /// BAR 4's guest address (aligned to the window's size rounded up to a power of two).
    pub bar4: u64,
    /// The first KVM memory slot the window may use, and one past the last.
    pub slots: (u32, u32),
    /// Guest RAM ends here: the window is never placed over it.
    pub ram_end: u64,
    /// The largest window the layout has room for (a backend asking more is refused).
    pub max_window: u64,
}

/// The window is only placed below this guest-physical address (39 bits: what every x86-64
/// host's KVM maps).
pub const PHYS_LIMIT: u64 = 1 << 39;

impl VshmPci {
    /// Connects to vshmd's vhost-user socket at `path` and builds the function. Its window
    /// size comes from the backend; `placement` says where its BARs go.
    pub fn connect(
        path: &Path,
        vm: Arc<VmFd>,
        mem: GuestMemoryMmap,
        placement: Placement,
    ) -> Result<VshmPci, DeviceError> {
        let p = path.display().to_string();
        let vu = |what: &'static str| vhost_failed(&p, what);
        let mut frontend = Frontend::connect(path, QUEUES as u64).map_err(vu("connect"))?;
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let features = frontend.get_features().map_err(vu("GET_FEATURES"))?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if features & protocol_bit == 0 || features & virtio::VIRTIO_F_VERSION_1 == 0 {
            return Err(DeviceError::Missing {
                path: p,
                what: format!("VIRTIO_F_VERSION_1 and protocol features (features {features:#x})"),
            });
        }
        let proto = frontend
            .get_protocol_features()
            .map_err(vu("GET_PROTOCOL_FEATURES"))?;
        let need = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::SHMEM
            | VhostUserProtocolFeatures::REPLY_ACK;
        if !proto.contains(need) {
            return Err(DeviceError::Missing {
                path: p,
                what: format!("{:?}", need - proto),
            });
        }
        // RESET_DEVICE when offered: a guest's device reset then lets the backend release
        // every handle the reset driver can no longer name.
        let optional = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::RESET_DEVICE;
        let resets = proto.contains(VhostUserProtocolFeatures::RESET_DEVICE);
        frontend
            .set_protocol_features(need | (proto & optional))
            .map_err(vu("SET_PROTOCOL_FEATURES"))?;
        frontend.set_owner().map_err(vu("SET_OWNER"))?;

        let shmem = frontend
            .get_shmem_config()
            .map_err(vu("GET_SHMEM_CONFIG"))?;
        let window_size = match shmem.nregions {
            0 => 0,
            _ => shmem.memory_sizes[usize::from(WINDOW_SHMID)],
        };
        let page = 4096;
        if window_size == 0 || window_size % page != 0 || window_size > placement.max_window {
            return Err(DeviceError::WindowSize {
                path: p,
                size: window_size,
                page,
                max: placement.max_window,
            });
        }
        let (_, payload) = frontend
            .get_config(
                0,
                CONFIG_BYTES as u32,
                VhostUserConfigFlags::empty(),
                &[0; CONFIG_BYTES],
            )
            .map_err(vu("GET_CONFIG"))?;
        let mut device_config = [0u8; CONFIG_BYTES];
        if payload.len() != CONFIG_BYTES {
            return Err(DeviceError::Format { path: p });
        }
        device_config.copy_from_slice(&payload);
        if virtio::DeviceConfig::from_bytes(&device_config).is_none() {
            return Err(DeviceError::Format { path: p });
        }

        let regions = mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|e| DeviceError::Memory(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        frontend
            .set_mem_table(&regions)
            .map_err(vu("SET_MEM_TABLE"))?;

        let window = Arc::new(Mutex::new(Window::new(
            Arc::clone(&vm),
            Some(placement.bar4),
            window_size,
            placement.slots.0,
            placement.slots.1,
        )));
        let mut handler = FrontendReqHandler::new(Arc::new(Mutex::new(MapHandler {
            window: Arc::clone(&window),
        })))
        .map_err(vhost_failed(&p, "the backend request channel"))?;
        handler.set_reply_ack_flag(true);
        frontend
            .set_backend_request_fd(&handler.get_tx_raw_fd())
            .map_err(vu("SET_BACKEND_REQ_FD"))?;

        let os = |what: &'static str| move |source| DeviceError::Os { what, source };
        let kicks = [
            EventFd::new(0).map_err(os("kick eventfd"))?,
            EventFd::new(0).map_err(os("kick eventfd"))?,
        ];
        let calls = [
            EventFd::new(0).map_err(os("call eventfd"))?,
            EventFd::new(0).map_err(os("call eventfd"))?,
        ];

        let mut config = ConfigSpace::new(
            virtio::PCI_VENDOR,
            virtio::PCI_DEVICE,
            [0xFF, 0x00, 0x00],
            1,
        );
        config.set_subsystem(virtio::PCI_VENDOR, 0x40);
        config.set_bar(0, BarKind::Memory32, BAR0_SIZE, placement.bar0)?;
        config.set_bar(
            4,
            BarKind::Memory64 { prefetchable: true },
            window_size.next_power_of_two().max(4096),
            placement.bar4,
        )?;
        let cap = |cfg_type: u8, bar: u8, offset: u32, len: u32, extra: &[u8]| {
            let mut b = vec![0u8; 14];
            b[0] = 16 + extra.len() as u8; // cap_len
            b[1] = cfg_type;
            b[2] = bar;
            b[6..10].copy_from_slice(&offset.to_le_bytes());
            b[10..14].copy_from_slice(&len.to_le_bytes());
            b.extend_from_slice(extra);
            b
        };
        let notify_len = NOTIFY_MULTIPLIER * QUEUES as u32;
        config.add_capability(0x09, &cap(1, 0, COMMON as u32, COMMON_LEN, &[]))?;
        config.add_capability(
            0x09,
            &cap(
                2,
                0,
                NOTIFY as u32,
                notify_len,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
        )?;
        config.add_capability(0x09, &cap(3, 0, ISR as u32, 1, &[]))?;
        config.add_capability(
            0x09,
            &cap(4, 0, DEVICE_CFG as u32, CONFIG_BYTES as u32, &[]),
        )?;
        // SHARED_MEMORY_CFG (virtio_pci_cap64): id in the byte after `bar`, then the high
        // halves of offset and length.
        let mut shm = cap(8, 4, 0, window_size as u32, &[0; 8]);
        shm[3] = WINDOW_SHMID;
        shm[18..22].copy_from_slice(&((window_size >> 32) as u32).to_le_bytes());
        config.add_capability(0x09, &shm)?;
        config.enable_memory();

        let stop = Arc::new(AtomicBool::new(false));
        let channel_closed = Arc::new(AtomicBool::new(false));
        let channel = spawn_channel(
            BackendChannel {
                handler,
                main: dup_fd(&frontend).map_err(|source| DeviceError::Os {
                    what: "a copy of the vhost-user socket",
                    source,
                })?,
                closed: Arc::clone(&channel_closed),
                window: Arc::clone(&window),
            },
            Arc::clone(&stop),
        )?;
        let mut dev = VshmPci {
            path: p,
            config,
            vm,
            mem,
            frontend,
            offered: features & !protocol_bit,
            protocol_features_bit: protocol_bit,
            device_config,
            window,
            common: Common::default(),
            active: false,
            started: [false; QUEUES],
            resets,
            ram_end: placement.ram_end,
            kicks,
            calls,
            notify_base: placement.bar0 + NOTIFY,
            stop,
            channel_closed,
            channel: Some(channel),
            last_error: None,
        };
        dev.register_notifiers(true)?;
        Ok(dev)
    }

    /// The window (shared with the backend request thread).
    pub fn window(&self) -> Arc<Mutex<Window>> {
        Arc::clone(&self.window)
    }

    /// Whether vshmd closed the connection.
    pub fn disconnected(&self) -> bool {
        self.channel_closed.load(Ordering::Acquire)
    }

    fn register_notifiers(&mut self, register: bool) -> Result<(), DeviceError> {
        for (q, kick) in self.kicks.iter().enumerate() {
            let addr =
                IoEventAddress::Mmio(self.notify_base + q as u64 * u64::from(NOTIFY_MULTIPLIER));
            let r = if register {
                self.vm.register_ioevent(kick, &addr, NoDatamatch)
            } else {
                self.vm.unregister_ioevent(kick, &addr, NoDatamatch)
            };
            r.map_err(|e| DeviceError::Os {
                what: "ioeventfd for a queue notification",
                source: std::io::Error::from_raw_os_error(e.errno()),
            })?;
        }
        Ok(())
    }

    /// Where the window may be, given BAR 4, decoding, RAM and BAR 0.
    fn window_place(&self) -> Option<u64> {
        self.config.bar_place(4, self.ram_end, PHYS_LIMIT)
    }

    fn fail(&mut self, what: String) {
        eprintln!("vshm-vmm: vshm device: {what}");
        self.last_error = Some(what);
        self.common.status |= STATUS_NEEDS_RESET;
    }

    fn hva(&self, gpa: u64, len: u64) -> Option<u64> {
        let len = usize::try_from(len).ok()?;
        if !GuestMemoryBackend::check_range(&self.mem, GuestAddress(gpa), len) {
            return None;
        }
        self.mem
            .get_host_address(GuestAddress(gpa))
            .ok()
            .map(|p| p as u64)
    }

    /// DRIVER_OK: hands every queue the driver enabled to the backend.
    fn activate(&mut self) {
        for q in 0..QUEUES {
            let s = self.common.queues[q];
            if !s.enable {
                continue;
            }
            let n = u64::from(s.size);
            let (Some(desc), Some(avail), Some(used)) = (
                self.hva(s.desc, 16 * n),
                self.hva(s.driver, 6 + 2 * n),
                self.hva(s.device, 6 + 8 * n),
            ) else {
                return self.fail(format!("queue {q}: its rings are not in guest RAM"));
            };
            let cfg = VringConfigData {
                queue_max_size: QUEUE_MAX,
                queue_size: s.size,
                flags: 0,
                desc_table_addr: desc,
                used_ring_addr: used,
                avail_ring_addr: avail,
                log_addr: None,
            };
            let f = &mut self.frontend;
            let r = f
                .set_vring_num(q, s.size)
                .and_then(|()| f.set_vring_addr(q, &cfg))
                .and_then(|()| f.set_vring_base(q, 0))
                .and_then(|()| f.set_vring_call(q, &self.calls[q]))
                .and_then(|()| f.set_vring_kick(q, &self.kicks[q]))
                .and_then(|()| f.set_vring_enable(q, true));
            // Started as soon as the backend may have taken it (a reset takes it back).
            self.started[q] = true;
            if let Err(e) = r {
                return self.fail(format!("queue {q}: the backend refused it: {e}"));
            }
        }
        self.active = true;
    }

    fn reset(&mut self) {
        let was_set_up = self.common.status != 0;
        for q in 0..QUEUES {
            if std::mem::take(&mut self.started[q]) {
                let _ = self.frontend.set_vring_enable(q, false);
                let _ = self.frontend.get_vring_base(q);
            }
        }
        // The driver starts over and knows none of its handles: the backend closes them
        // (its SHMEM_UNMAPs arrive on the channel thread, so waiting here cannot deadlock).
        if self.resets && was_set_up {
            if let Err(e) = self.frontend.reset_device() {
                self.last_error = Some(format!("RESET_DEVICE: {e}"));
            }
        }
        self.active = false;
        self.common = Common::default();
    }

    fn set_status(&mut self, v: u8) {
        if v == 0 {
            return self.reset();
        }
        let old = self.common.status;
        // Status bits are only ever added until a reset (virtio 1.x §2.1.2): a write that
        // clears one is ignored (else DRIVER_OK could be set twice on running queues).
        if v & old & !STATUS_NEEDS_RESET != old & !STATUS_NEEDS_RESET {
            return;
        }
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let acked = self.common.driver_features;
            let ok = acked & !self.offered == 0 && acked & virtio::VIRTIO_F_VERSION_1 != 0;
            if !ok
                || self
                    .frontend
                    .set_features(acked | self.protocol_features_bit)
                    .is_err()
            {
                // Not accepted: FEATURES_OK does not stick (virtio 1.x §3.1.1).
                v &= !STATUS_FEATURES_OK;
            }
        }
        self.common.status = v | (old & STATUS_NEEDS_RESET);
        let driver_ok = v & STATUS_DRIVER_OK != 0 && v & STATUS_FEATURES_OK != 0;
        if driver_ok && !self.active && self.common.status & STATUS_NEEDS_RESET == 0 {
            self.activate();
        }
    }

    /// The common configuration field containing `off`: (its first byte, its width, value).
    fn common_field(&self, off: u64) -> Option<(u64, u64, u64)> {
        let c = &self.common;
        let q = c.queues.get(usize::from(c.queue_select));
        let feature_word = |v: u64, sel: u32| match sel {
            0 => v & 0xFFFF_FFFF,
            1 => v >> 32,
            _ => 0,
        };
        let (start, width, v) = match off {
            0x00..=0x03 => (0x00, 4, u64::from(c.device_feature_select)),
            0x04..=0x07 => (0x04, 4, feature_word(self.offered, c.device_feature_select)),
            0x08..=0x0B => (0x08, 4, u64::from(c.driver_feature_select)),
            0x0C..=0x0F => (
                0x0C,
                4,
                feature_word(c.driver_features, c.driver_feature_select),
            ),
            0x10..=0x11 => (0x10, 2, u64::from(NO_VECTOR)),
            0x12..=0x13 => (0x12, 2, QUEUES as u64),
            0x14 => (0x14, 1, u64::from(c.status)),
            0x15 => (0x15, 1, 0),
            0x16..=0x17 => (0x16, 2, u64::from(c.queue_select)),
            0x18..=0x19 => (0x18, 2, q.map_or(0, |q| u64::from(q.size))),
            0x1A..=0x1B => (0x1A, 2, u64::from(NO_VECTOR)),
            0x1C..=0x1D => (0x1C, 2, q.map_or(0, |q| u64::from(q.enable))),
            0x1E..=0x1F => (0x1E, 2, u64::from(c.queue_select)),
            0x20..=0x27 => (0x20, 8, q.map_or(0, |q| q.desc)),
            0x28..=0x2F => (0x28, 8, q.map_or(0, |q| q.driver)),
            0x30..=0x37 => (0x30, 8, q.map_or(0, |q| q.device)),
            _ => return None,
        };
        Some((start, width, v))
    }

    fn common_write(&mut self, off: u64, data: &[u8]) {
        let Some((start, width, old)) = self.common_field(off) else {
            return;
        };
        let mut bytes = old.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            let at = off - start + i as u64;
            if at >= width {
                break;
            }
            bytes[at as usize] = *b;
        }
        let v = u64::from_le_bytes(bytes);
        let live = self.common.status & STATUS_DRIVER_OK != 0;
        let c = &mut self.common;
        let sel = usize::from(c.queue_select);
        match start {
            0x00 => c.device_feature_select = v as u32,
            0x08 => c.driver_feature_select = v as u32,
            0x0C => match c.driver_feature_select {
                0 => c.driver_features = (c.driver_features & !0xFFFF_FFFF) | (v & 0xFFFF_FFFF),
                1 => c.driver_features = (c.driver_features & 0xFFFF_FFFF) | (v << 32),
                _ => {}
            },
            0x14 => self.set_status(v as u8),
            0x16 => c.queue_select = v as u16,
            // Queue fields are fixed once the driver is live (virtio 1.x §4.1.4.3).
            _ if live => {}
            0x18 => {
                if let Some(q) = c.queues.get_mut(sel) {
                    let n = v as u16;
                    // A power of two up to the maximum; anything else is ignored.
                    if n.is_power_of_two() && n <= QUEUE_MAX {
                        q.size = n;
                    }
                }
            }
            0x1C => {
                if let Some(q) = c.queues.get_mut(sel) {
                    q.enable = v == 1;
                }
            }
            0x20 | 0x28 | 0x30 => {
                if let Some(q) = c.queues.get_mut(sel) {
                    match start {
                        0x20 => q.desc = v,
                        0x28 => q.driver = v,
                        _ => q.device = v,
                    }
                }
            }
            _ => {}
        }
    }
}

fn dup_fd(f: &dyn AsRawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: dup of a descriptor `f` keeps open for this call; the copy is ours.
    let fd = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn vhost_failed<E: std::fmt::Display>(
    path: &str,
    what: &'static str,
) -> impl FnOnce(E) -> DeviceError {
    let path = path.to_owned();
    move |e| DeviceError::VhostUser {
        path,
        what,
        cause: e.to_string(),
    }
}

fn spawn_channel(
    channel: BackendChannel,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, DeviceError> {
    let closed = Arc::clone(&channel.closed);
    let mut manager =
        EventManager::<Box<dyn MutEventSubscriber + Send>>::new().map_err(|e| DeviceError::Os {
            what: "the event loop",
            source: std::io::Error::other(format!("{e:?}")),
        })?;
    manager.add_subscriber(Box::new(channel));
    std::thread::Builder::new()
        .name("vshm-backend-req".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) && !closed.load(Ordering::Acquire) {
                if manager.run_with_timeout(100).is_err() {
                    break;
                }
            }
        })
        .map_err(|source| DeviceError::Os {
            what: "the backend request thread",
            source,
        })
}

impl PciFunction for VshmPci {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn config_written(&mut self) {
        // Notifications follow BAR 0.
        let notify = self.config.bar_address(0).map(|(b, _)| b + NOTIFY);
        if let Some(base) = notify.filter(|b| *b != self.notify_base) {
            let _ = self.register_notifiers(false);
            self.notify_base = base;
            if let Err(e) = self.register_notifiers(true) {
                self.fail(e.to_string());
            }
        }
        // The window is reachable only where the guest may have it: decoding on, not over
        // RAM or BAR 0, below what KVM maps. Elsewhere (a BAR being sized is all ones) its
        // mappings have no slots until it is placed again.
        let place = self.window_place();
        let r = self
            .window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .place(place);
        if let Err(e) = r {
            self.fail(format!("placing the window: {e}"));
        }
    }

    fn mmio_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            // The window where nothing is mapped (a mapped page never exits): zeros.
            return;
        }
        match offset {
            o if o < u64::from(COMMON_LEN) => {
                for (i, d) in data.iter_mut().enumerate() {
                    let at = o + i as u64;
                    if let Some((start, _, v)) = self.common_field(at) {
                        *d = v.to_le_bytes()[(at - start) as usize];
                    }
                }
            }
            o if (DEVICE_CFG..DEVICE_CFG + CONFIG_BYTES as u64).contains(&o) => {
                let at = (o - DEVICE_CFG) as usize;
                for (i, d) in data.iter_mut().enumerate() {
                    *d = self.device_config.get(at + i).copied().unwrap_or(0);
                }
            }
            // ISR and notifications read as zero: the device raises no interrupts (drivers
            // poll the used ring).
            _ => {}
        }
    }

    fn mmio_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            // Writes to an unmapped (or read-only) part of the window are dropped.
            return;
        }
        if offset < u64::from(COMMON_LEN) {
            self.common_write(offset, data);
        } else if let Some(q) = offset
            .checked_sub(NOTIFY)
            .map(|o| o / u64::from(NOTIFY_MULTIPLIER))
            .and_then(|q| self.kicks.get(q as usize))
        {
            // Only reached if KVM did not take the write through the ioeventfd.
            let _ = q.write(1);
        }
    }
}

impl Drop for VshmPci {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.channel.take() {
            let _ = t.join();
        }
    }
}
