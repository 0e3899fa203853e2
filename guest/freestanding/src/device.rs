//! The vshm virtio device over modern virtio-pci (docs/VHOST-USER.md; virtio 1.x §3.1.1
//! and §4.1.5): found, initialised, and sent requests on its request queue.

use vshm_format::layout::{const_u32, Request, Response};
use vshm_format::shm::{bytes_of, bytes_of_mut, zeroed};
use vshm_format::virtio::{
    DeviceConfig, CONFIG_BYTES, PCI_DEVICE, PCI_VENDOR, REQUEST_QUEUE, VIRTIO_F_VERSION_1,
    VSHM_F_READ_ONLY, WINDOW_SHMID,
};

use crate::hw::Hw;
use crate::pci::{self, Function, VirtioCap};
use crate::virtqueue::{SplitQueue, MAX_SIZE, QUEUE_BYTES};

/// Where the request queue lives (guest RAM the contract gives the guest: 0x200000..0x400000).
pub const QUEUE_BASE: u64 = 0x20_0000;
/// The request buffer (device-readable).
pub const REQUEST_BUF: u64 = QUEUE_BASE + QUEUE_BYTES;
/// The response buffer (device-writable).
pub const RESPONSE_BUF: u64 = REQUEST_BUF + 0x1000;

/// Polls of the used index before a request is given up (each a handful of instructions,
/// about a microsecond each on these VMs: seconds, not forever).
pub const POLL_LIMIT: u32 = 3_000_000;

// virtio_pci_common_cfg offsets.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0C;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_ENABLE: u64 = 0x1C;
const QUEUE_NOTIFY_OFF: u64 = 0x1E;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

// Device status bits.
const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;
const FAILED: u8 = 128;

/// Why the device could not be set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitError {
    /// No function 1af4:10fe on bus 0.
    NotFound,
    /// The device is there but something is missing or refused (what).
    Broken(&'static str),
    /// The device speaks another vshm format version.
    FormatVersion(u32),
}

/// Why a request got no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// The device did not use the chain within [`POLL_LIMIT`] polls (the queue is then
    /// unusable: it still holds the chain).
    Timeout,
    /// The device used the chain writing fewer bytes than a response (how many).
    Short(u32),
    /// The response answers another request (its `resp_seq`).
    WrongSeq(u64),
    /// An earlier request timed out.
    Unusable,
}

/// An initialised vshm device.
#[derive(Debug)]
pub struct Device {
    /// Where it is.
    pub function: Function,
    common: u64,
    notify: u64,
    /// Guest-physical address of window offset 0.
    pub window: u64,
    /// Bytes of the window (the shared-memory capability's length).
    pub window_len: u64,
    /// Features negotiated.
    pub features: u64,
    /// Its configuration space.
    pub config: DeviceConfig,
    queue: SplitQueue,
    seq: u64,
    stuck: bool,
}

/// Sets FAILED (the driver gives up on the device) and says why.
fn failed<H: Hw>(hw: &mut H, common: u64, status: u8, why: &'static str) -> InitError {
    hw.write8(common + DEVICE_STATUS, status | FAILED);
    InitError::Broken(why)
}

fn cap_addr<H: Hw>(hw: &mut H, f: Function, cap: Option<VirtioCap>) -> Option<(u64, VirtioCap)> {
    let cap = cap?;
    let bar = f.bar(hw, cap.bar)?;
    Some((bar.checked_add(cap.offset)?, cap))
}

impl Device {
    /// Finds the device and initialises it: features, the request queue, DRIVER_OK.
    pub fn init<H: Hw>(hw: &mut H) -> Result<Device, InitError> {
        let f = pci::find(hw, PCI_VENDOR, PCI_DEVICE).ok_or(InitError::NotFound)?;
        let (mut common, mut notify, mut device, mut shm) = (None, None, None, None);
        pci::virtio_caps(hw, f, |cap| {
            let first = |slot: &mut Option<VirtioCap>| {
                slot.get_or_insert(cap);
            };
            match cap.cfg_type {
                pci::CAP_COMMON_CFG => first(&mut common),
                pci::CAP_NOTIFY_CFG => first(&mut notify),
                pci::CAP_DEVICE_CFG => first(&mut device),
                pci::CAP_SHARED_MEMORY_CFG if cap.id == WINDOW_SHMID => first(&mut shm),
                _ => {}
            }
        });
        let missing = InitError::Broken;
        let (common, _) = cap_addr(hw, f, common).ok_or(missing("no common config capability"))?;
        let (notify_base, notify_cap) =
            cap_addr(hw, f, notify).ok_or(missing("no notify capability"))?;
        let (device_cfg, device_cap) =
            cap_addr(hw, f, device).ok_or(missing("no device config capability"))?;
        let (window, shm_cap) =
            cap_addr(hw, f, shm).ok_or(missing("no shared-memory capability (id 0)"))?;
        if device_cap.length < CONFIG_BYTES as u64 {
            return Err(missing(
                "device config shorter than the 40 bytes of virtio_vshm_config",
            ));
        }
        f.enable(hw);

        // §3.1.1: reset, ACKNOWLEDGE, DRIVER.
        hw.write8(common + DEVICE_STATUS, 0);
        let mut reset = false;
        for _ in 0..1000 {
            if hw.read8(common + DEVICE_STATUS) == 0 {
                reset = true;
                break;
            }
            core::hint::spin_loop();
        }
        if !reset {
            return Err(missing("the device did not reset"));
        }
        let mut status = ACKNOWLEDGE;
        hw.write8(common + DEVICE_STATUS, status);
        status |= DRIVER;
        hw.write8(common + DEVICE_STATUS, status);

        let mut offered = 0u64;
        for half in 0..2u32 {
            hw.write32(common + DEVICE_FEATURE_SELECT, half);
            offered |= u64::from(hw.read32(common + DEVICE_FEATURE)) << (32 * half);
        }
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err(failed(
                hw,
                common,
                status,
                "the device does not offer VIRTIO_F_VERSION_1",
            ));
        }
        let features = offered & (VIRTIO_F_VERSION_1 | VSHM_F_READ_ONLY);
        for half in 0..2u32 {
            hw.write32(common + DRIVER_FEATURE_SELECT, half);
            let word = (features >> (32 * half)).to_le_bytes();
            hw.write32(
                common + DRIVER_FEATURE,
                u32::from_le_bytes([word[0], word[1], word[2], word[3]]),
            );
        }
        status |= FEATURES_OK;
        hw.write8(common + DEVICE_STATUS, status);
        if hw.read8(common + DEVICE_STATUS) & FEATURES_OK == 0 {
            return Err(failed(
                hw,
                common,
                status,
                "the device refused the features (FEATURES_OK)",
            ));
        }

        // The request queue.
        hw.write16(common + QUEUE_SELECT, REQUEST_QUEUE);
        let max = hw.read16(common + QUEUE_SIZE);
        if max == 0 {
            return Err(failed(
                hw,
                common,
                status,
                "the request queue is not available (size 0)",
            ));
        }
        // A power of two no larger than what the device allows.
        let mut size = MAX_SIZE;
        while size > max {
            size /= 2;
        }
        let queue = SplitQueue::new(hw, QUEUE_BASE, size);
        hw.write16(common + QUEUE_SIZE, size);
        for (reg, addr) in [
            (QUEUE_DESC, queue.desc_addr()),
            (QUEUE_DRIVER, queue.avail_addr()),
            (QUEUE_DEVICE, queue.used_addr()),
        ] {
            let b = addr.to_le_bytes();
            hw.write32(common + reg, u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            hw.write32(
                common + reg + 4,
                u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            );
        }
        let notify_off = hw.read16(common + QUEUE_NOTIFY_OFF);
        let notify = u64::from(notify_off)
            .checked_mul(u64::from(notify_cap.notify_off_multiplier))
            .and_then(|o| notify_base.checked_add(o))
            .ok_or(InitError::Broken("the notify address overflows"))?;
        hw.write16(common + QUEUE_ENABLE, 1);

        status |= DRIVER_OK;
        hw.write8(common + DEVICE_STATUS, status);

        // The configuration, read until the generation is stable.
        let mut raw = [0u8; CONFIG_BYTES];
        let mut stable = false;
        for _ in 0..16 {
            let before = hw.read8(common + CONFIG_GENERATION);
            for (i, chunk) in raw.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&hw.read32(device_cfg + 4 * i as u64).to_le_bytes());
            }
            if hw.read8(common + CONFIG_GENERATION) == before {
                stable = true;
                break;
            }
        }
        if !stable {
            return Err(missing("the device configuration keeps changing"));
        }
        let config = DeviceConfig::from_bytes(&raw).ok_or(InitError::FormatVersion(
            u32::from_le_bytes([raw[16], raw[17], raw[18], raw[19]]),
        ))?;
        Ok(Device {
            function: f,
            common,
            notify,
            window,
            window_len: shm_cap.length,
            features,
            config,
            queue,
            seq: 0,
            stuck: false,
        })
    }

    /// Sends `req` on the request queue and waits (polling) for its response.
    pub fn request<H: Hw>(&mut self, hw: &mut H, req: &Request) -> Result<Response, RequestError> {
        if self.stuck {
            return Err(RequestError::Unusable);
        }
        self.seq += 1;
        let mut req = *req;
        req.req_seq = self.seq;
        hw.write_bytes(REQUEST_BUF, bytes_of(&req));
        let mut resp = zeroed::<Response>();
        hw.write_bytes(RESPONSE_BUF, bytes_of(&resp));
        let req_len = const_u32(core::mem::size_of::<Request>());
        let resp_len = const_u32(core::mem::size_of::<Response>());
        self.queue
            .post(hw, (REQUEST_BUF, req_len), (RESPONSE_BUF, resp_len));
        hw.write16(self.notify, REQUEST_QUEUE);
        let mut used = None;
        for _ in 0..POLL_LIMIT {
            used = self.queue.poll(hw);
            if used.is_some() {
                break;
            }
            core::hint::spin_loop();
        }
        let Some(used) = used else {
            self.stuck = true;
            return Err(RequestError::Timeout);
        };
        if used.len < resp_len {
            return Err(RequestError::Short(used.len));
        }
        hw.read_bytes(RESPONSE_BUF, bytes_of_mut(&mut resp));
        if resp.resp_seq != self.seq {
            return Err(RequestError::WrongSeq(resp.resp_seq));
        }
        Ok(resp)
    }

    /// The common configuration's address (for tests).
    pub fn common_cfg(&self) -> u64 {
        self.common
    }
}
