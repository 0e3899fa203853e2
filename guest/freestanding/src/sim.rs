//! Tests of the whole guest against a simulated machine: PCI configuration space with the
//! vshm function's capabilities, its common configuration, a request queue answered the
//! way vshmd's device answers (docs/VHOST-USER.md §5), and a window of memory.
// A register model: narrowing the values the guest writes is what the hardware does.
#![allow(clippy::cast_possible_truncation, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::string::String;
use std::vec;
use std::vec::Vec;

use vshm_format::layout::{kind, op, Request, Response, FORMAT_VERSION};
use vshm_format::shm::{bytes_of, bytes_of_mut, zeroed};
use vshm_format::virtio::{
    DeviceConfig, CONFIG_BYTES, OPEN_READ_ONLY, OP_CLOSE, OP_OPEN, RESP_MAP_FLAGS_OFF,
    VIRTIO_F_VERSION_1, VSHM_F_EVENTQ, VSHM_F_READ_ONLY,
};
use vshm_format::Status;

use crate::commands::{run, End};
use crate::hw::{Hw, EXIT_PORT, PCI_ADDRESS_PORT, PCI_DATA_PORT, SERIAL_PORT};

const RAM: usize = 4 << 20;
const BAR0: u64 = 0xE000_0000;
const COMMON: u64 = BAR0;
const NOTIFY: u64 = BAR0 + 0x1000;
const DEVCFG: u64 = BAR0 + 0x2000;
const BAR4: u64 = 0x2_0000_0000;
const SHM_OFF: u64 = 0x1000;
const WINDOW: u64 = 1 << 20;

#[derive(Default)]
struct Section {
    size: u64,
    max: u64,
    slot: u32,
}

struct Sim {
    ram: Vec<u8>,
    window: Vec<u8>,
    cfg: [u8; 256],
    dev: u8,
    pci_addr: u32,
    serial: Vec<u8>,
    exit: Option<u8>,
    status: u8,
    dfsel: u32,
    gfsel: u32,
    driver_features: u64,
    offered: u64,
    qsel: u16,
    qsize: u16,
    qaddr: [u64; 3],
    qenable: u16,
    last_avail: u16,
    sections: BTreeMap<String, Section>,
    /// Window offset → (name, writable).
    mapped: BTreeMap<u64, (String, bool)>,
    next_window: u64,
    format_version: u32,
    answer: bool,
    requests: usize,
}

impl Sim {
    fn new(dev: u8) -> Sim {
        let mut cfg = [0u8; 256];
        let mut put = |at: usize, b: &[u8]| cfg[at..at + b.len()].copy_from_slice(b);
        put(0, &0x10FE_1AF4u32.to_le_bytes());
        put(6, &(1u16 << 4).to_le_bytes());
        put(0x10, &(BAR0 as u32).to_le_bytes());
        // BAR 4: 64-bit memory, prefetchable.
        put(0x20, &(0b1100u32 | BAR4 as u32).to_le_bytes());
        put(0x24, &((BAR4 >> 32) as u32).to_le_bytes());
        put(0x34, &[0x40]);
        // A non-virtio capability (MSI-X) first, then the virtio ones.
        put(0x40, &[0x11, 0x48, 0, 0]);
        put(0x48, &[0x09, 0x58, 16, 1, 0, 0, 0, 0]);
        put(0x50, &0u32.to_le_bytes());
        put(0x54, &0x100u32.to_le_bytes());
        put(0x58, &[0x09, 0x70, 20, 2, 0, 0, 0, 0]);
        put(0x60, &0x1000u32.to_le_bytes());
        put(0x64, &0x1000u32.to_le_bytes());
        put(0x68, &4u32.to_le_bytes());
        put(0x70, &[0x09, 0x80, 16, 4, 0, 0, 0, 0]);
        put(0x78, &0x2000u32.to_le_bytes());
        put(0x7C, &(CONFIG_BYTES as u32).to_le_bytes());
        put(0x80, &[0x09, 0, 24, 8, 4, 0, 0, 0]);
        put(0x88, &(SHM_OFF as u32).to_le_bytes());
        put(0x8C, &(WINDOW as u32).to_le_bytes());
        Sim {
            ram: vec![0; RAM],
            window: vec![0; (SHM_OFF + WINDOW) as usize],
            cfg,
            dev,
            pci_addr: 0,
            serial: Vec::new(),
            exit: None,
            status: 0,
            dfsel: 0,
            gfsel: 0,
            driver_features: 0,
            offered: VIRTIO_F_VERSION_1 | VSHM_F_READ_ONLY | VSHM_F_EVENTQ,
            qsel: 0,
            qsize: 256,
            qaddr: [0; 3],
            qenable: 0,
            last_avail: 0,
            sections: BTreeMap::new(),
            mapped: BTreeMap::new(),
            next_window: 0,
            format_version: FORMAT_VERSION,
            answer: true,
            requests: 0,
        }
    }

    fn mem(&mut self, addr: u64, len: usize) -> &mut [u8] {
        if addr >= BAR4 {
            let a = (addr - BAR4) as usize;
            return &mut self.window[a..a + len];
        }
        let a = addr as usize;
        assert!(
            a + len <= RAM,
            "access to {addr:#x} outside RAM and the BARs"
        );
        &mut self.ram[a..a + len]
    }

    fn mmio_read(&mut self, addr: u64, len: usize) -> Option<u64> {
        if !(BAR0..BAR0 + 0x3000).contains(&addr) {
            return None;
        }
        Some(match addr {
            a if a == COMMON + 0x04 => (self.offered >> (32 * self.dfsel)) & 0xFFFF_FFFF,
            a if a == COMMON + 0x14 => u64::from(self.status),
            a if a == COMMON + 0x15 => 0,
            a if a == COMMON + 0x18 => u64::from(if self.qsel == 0 { self.qsize } else { 0 }),
            a if a == COMMON + 0x1E => 0,
            a if (DEVCFG..DEVCFG + CONFIG_BYTES as u64).contains(&a) => {
                let mut c = DeviceConfig {
                    window_size: WINDOW,
                    page_size: 4096,
                    region_epoch: 7,
                    quarantine_ms: 2000,
                }
                .to_bytes();
                c[16..20].copy_from_slice(&self.format_version.to_le_bytes());
                let o = (a - DEVCFG) as usize;
                let mut v = [0u8; 8];
                v[..len].copy_from_slice(&c[o..o + len]);
                u64::from_le_bytes(v)
            }
            a => panic!("read of {a:#x} ({len} bytes)"),
        })
    }

    fn mmio_write(&mut self, addr: u64, len: usize, v: u64) -> bool {
        if !(BAR0..BAR0 + 0x3000).contains(&addr) {
            return false;
        }
        let r = addr - COMMON;
        match (r, len) {
            (0x00, 4) => self.dfsel = v as u32,
            (0x08, 4) => self.gfsel = v as u32,
            (0x0C, 4) => {
                self.driver_features &= !(0xFFFF_FFFF << (32 * self.gfsel));
                self.driver_features |= v << (32 * self.gfsel);
            }
            (0x14, 1) => {
                let s = v as u8;
                if s == 0 {
                    *self = Sim {
                        ram: std::mem::take(&mut self.ram),
                        window: std::mem::take(&mut self.window),
                        serial: std::mem::take(&mut self.serial),
                        sections: std::mem::take(&mut self.sections),
                        cfg: self.cfg,
                        offered: self.offered,
                        format_version: self.format_version,
                        answer: self.answer,
                        ..Sim::new(self.dev)
                    };
                    return true;
                }
                // FEATURES_OK only sticks for features that were offered, VERSION_1 among them.
                let bad = self.driver_features & !self.offered != 0
                    || self.driver_features & VIRTIO_F_VERSION_1 == 0;
                self.status = if s & 8 != 0 && bad { s & !8 } else { s };
            }
            (0x16, 2) => self.qsel = v as u16,
            (0x18, 2) => {
                assert!(v as u16 <= self.qsize && (v as u16).is_power_of_two());
                self.qsize = v as u16;
            }
            (0x1C, 2) => self.qenable = v as u16,
            (0x20..=0x37, 4) => {
                let i = ((r - 0x20) / 8) as usize;
                let shift = if r % 8 == 4 { 32 } else { 0 };
                self.qaddr[i] = (self.qaddr[i] & !(0xFFFF_FFFF << shift)) | (v << shift);
            }
            (r, 2) if r == NOTIFY - COMMON => {
                assert_eq!(v, 0, "notify of queue {v}");
                assert!(
                    self.status & 4 != 0 && self.qenable == 1,
                    "notify before DRIVER_OK"
                );
                if self.answer {
                    self.process();
                }
            }
            _ => panic!("write of {v:#x} to {addr:#x} ({len} bytes)"),
        }
        true
    }

    fn r16(&mut self, a: u64) -> u16 {
        u16::from_le_bytes(self.mem(a, 2).try_into().unwrap())
    }

    fn r32(&mut self, a: u64) -> u32 {
        u32::from_le_bytes(self.mem(a, 4).try_into().unwrap())
    }

    fn r64(&mut self, a: u64) -> u64 {
        u64::from_le_bytes(self.mem(a, 8).try_into().unwrap())
    }

    /// The device: answers every available chain.
    fn process(&mut self) {
        let [desc, avail, used] = self.qaddr;
        assert_eq!(self.r16(avail) & 1, 1, "VIRTQ_AVAIL_F_NO_INTERRUPT");
        let avail_idx = self.r16(avail + 2);
        while self.last_avail != avail_idx {
            let slot = u64::from(self.last_avail % self.qsize);
            let head = self.r16(avail + 4 + 2 * slot);
            let d0 = desc + 16 * u64::from(head);
            let (raddr, rlen, rflags, next) = (
                self.r64(d0),
                self.r32(d0 + 8),
                self.r16(d0 + 12),
                self.r16(d0 + 14),
            );
            assert_eq!((rlen, rflags & 3), (1280, 1));
            let d1 = desc + 16 * u64::from(next);
            let (waddr, wlen, wflags) = (self.r64(d1), self.r32(d1 + 8), self.r16(d1 + 12));
            assert_eq!((wlen, wflags & 3), (768, 2));
            let mut req = zeroed::<Request>();
            bytes_of_mut(&mut req).copy_from_slice(self.mem(raddr, 1280));
            let mut resp = self.answer(&req);
            resp.resp_seq = req.req_seq;
            self.mem(waddr, 768).copy_from_slice(bytes_of(&resp));
            let u = used + 4 + 8 * u64::from(self.last_avail % self.qsize);
            self.mem(u, 4)
                .copy_from_slice(&u32::from(head).to_le_bytes());
            self.mem(u + 4, 4).copy_from_slice(&768u32.to_le_bytes());
            self.last_avail = self.last_avail.wrapping_add(1);
            let idx = self.last_avail;
            self.mem(used + 2, 2).copy_from_slice(&idx.to_le_bytes());
            self.requests += 1;
        }
    }

    fn answer(&mut self, req: &Request) -> Response {
        let fail = |s: Status| {
            let mut r = zeroed::<Response>();
            r.status = s.code();
            r
        };
        let name = String::from_utf8(req.name[..req.name_len as usize].to_vec()).unwrap();
        let (status, writable) = match req.op {
            op::CREATE => {
                assert_eq!(req.kind, kind::SECTION);
                if name.is_empty() || name.contains('\\') {
                    return fail(Status::ObjectNameInvalid);
                }
                let n = self.sections.len() as u32;
                let exists = self.sections.contains_key(&name);
                self.sections.entry(name.clone()).or_insert(Section {
                    size: req.size,
                    max: req.max_size,
                    slot: n + 1,
                });
                let st = if exists {
                    Status::ObjectNameExists
                } else {
                    Status::Success
                };
                (st, req.flags & OPEN_READ_ONLY == 0)
            }
            OP_OPEN => {
                if !self.sections.contains_key(&name) {
                    return fail(Status::ObjectNameNotFound);
                }
                (Status::Success, req.flags & OPEN_READ_ONLY == 0)
            }
            OP_CLOSE => {
                return match self.mapped.remove(&req.size) {
                    Some((name, _)) => {
                        let s = &self.sections[&name];
                        let (size, slot) = (s.size, s.slot);
                        assert_eq!(req.slot, slot);
                        let at = (SHM_OFF + req.size) as usize;
                        self.window[at..at + size as usize].fill(0);
                        fail(Status::Success)
                    }
                    None => fail(Status::InvalidHandle),
                };
            }
            _ => return fail(Status::NotSupported),
        };
        let s = &self.sections[&name];
        let mut r = zeroed::<Response>();
        r.status = status.code();
        r.slot = s.slot;
        r.generation = 1;
        r.offset = self.next_window;
        r.size = s.size;
        r.max_size = s.max;
        bytes_of_mut(&mut r)[RESP_MAP_FLAGS_OFF] = u8::from(writable);
        self.mapped.insert(self.next_window, (name, writable));
        self.next_window += s.max.div_ceil(4096) * 4096;
        r
    }
}

impl Hw for Sim {
    fn outb(&mut self, port: u16, value: u8) {
        match port {
            SERIAL_PORT => self.serial.push(value),
            EXIT_PORT => self.exit = Some(value),
            _ => panic!("outb {port:#x}"),
        }
    }

    fn outl(&mut self, port: u16, value: u32) {
        match port {
            PCI_ADDRESS_PORT => self.pci_addr = value,
            PCI_DATA_PORT => {
                let dev = (self.pci_addr >> 11) & 31;
                let off = (self.pci_addr & 0xFC) as usize;
                assert_eq!(
                    (dev, off),
                    (u32::from(self.dev), 4),
                    "only the command register"
                );
                self.cfg[4..6].copy_from_slice(&(value as u16).to_le_bytes());
            }
            _ => panic!("outl {port:#x}"),
        }
    }

    fn inl(&mut self, port: u16) -> u32 {
        assert_eq!(port, PCI_DATA_PORT);
        assert!(self.pci_addr & 0x8000_0000 != 0);
        let (bus, dev, func) = (
            (self.pci_addr >> 16) & 0xFF,
            (self.pci_addr >> 11) & 31,
            (self.pci_addr >> 8) & 7,
        );
        if bus != 0 || dev != u32::from(self.dev) || func != 0 {
            return 0xFFFF_FFFF;
        }
        let off = (self.pci_addr & 0xFC) as usize;
        u32::from_le_bytes(self.cfg[off..off + 4].try_into().unwrap())
    }

    fn read8(&mut self, addr: u64) -> u8 {
        match self.mmio_read(addr, 1) {
            Some(v) => v as u8,
            None => self.mem(addr, 1)[0],
        }
    }

    fn read16(&mut self, addr: u64) -> u16 {
        match self.mmio_read(addr, 2) {
            Some(v) => v as u16,
            None => self.r16(addr),
        }
    }

    fn read32(&mut self, addr: u64) -> u32 {
        match self.mmio_read(addr, 4) {
            Some(v) => v as u32,
            None => self.r32(addr),
        }
    }

    fn read64(&mut self, addr: u64) -> u64 {
        assert!(self.mmio_read(addr, 8).is_none());
        self.r64(addr)
    }

    fn write8(&mut self, addr: u64, value: u8) {
        if !self.mmio_write(addr, 1, u64::from(value)) {
            self.mem(addr, 1)[0] = value;
        }
    }

    fn write16(&mut self, addr: u64, value: u16) {
        if !self.mmio_write(addr, 2, u64::from(value)) {
            self.mem(addr, 2).copy_from_slice(&value.to_le_bytes());
        }
    }

    fn write32(&mut self, addr: u64, value: u32) {
        if !self.mmio_write(addr, 4, u64::from(value)) {
            self.mem(addr, 4).copy_from_slice(&value.to_le_bytes());
        }
    }

    fn write64(&mut self, addr: u64, value: u64) {
        assert!(!self.mmio_write(addr, 8, value));
        self.mem(addr, 8).copy_from_slice(&value.to_le_bytes());
    }

    fn write_bytes(&mut self, addr: u64, src: &[u8]) {
        self.mem(addr, src.len()).copy_from_slice(src);
    }

    fn read_bytes(&mut self, addr: u64, dst: &mut [u8]) {
        dst.copy_from_slice(self.mem(addr, dst.len()));
    }

    fn fence(&mut self) {}
}

fn go(sim: &mut Sim, args: &str) -> (End, Vec<String>) {
    let end = run(sim, args.as_bytes());
    let out = String::from_utf8(std::mem::take(&mut sim.serial)).unwrap();
    (end, out.lines().map(String::from).collect())
}

#[test]
fn with_no_device_the_guest_says_so_and_exits_2() {
    let mut sim = Sim::new(40); // no device 40 on a bus of 32
    let (end, lines) = go(&mut sim, "create demo 4096");
    assert_eq!(end, End::Exit(2));
    assert_eq!(
        lines,
        ["vshm-guest: no vshm device found (no PCI function 0x1af4:0x10fe on bus 0)"]
    );
}

#[test]
fn the_guest_creates_fills_checks_opens_and_closes_sections_through_the_device() {
    let mut sim = Sim::new(3);
    let (end, lines) = go(
        &mut sim,
        "create demo 4096; fill demo 0x41; check demo 65; peek 0x0 4; open demo ro; \
         fill demo 1; check demo 0x41; create demo 8192 ;create big 100 0x3000; fill big 7; \
         check big 7; peek 0x2000 3; close demo; close demo; close demo",
    );
    let expected = [
        "device 00:03.0 window_size=1048576 page_size=4096 epoch=7 features=0x100000002 \
         bar_window=0x200001000 window_len=1048576",
        "create demo status=0x00000000 window=0x0 size=4096 writable=1 max=4096 slot=1 generation=1",
        "fill demo byte=0x41 bytes=4096 ok",
        "check demo byte=0x41 bytes=4096 ok",
        "peek offset=0x0 len=4 hex=41414141",
        "open demo status=0x00000000 window=0x1000 size=4096 writable=0 max=4096 slot=1 generation=1",
        "fill demo byte=0x01 failed: mapped read-only",
        // The simulation maps a fresh zeroed range per open (it shares no pages).
        "check demo byte=0x41 mismatch at=0x0 value=0x00",
        "create demo status=0x40000000 window=0x2000 size=4096 writable=1 max=4096 slot=1 generation=1",
        "create big status=0x00000000 window=0x3000 size=100 writable=1 max=12288 slot=2 generation=1",
        "fill big byte=0x07 bytes=100 ok",
        "check big byte=0x07 bytes=100 ok",
        "peek offset=0x2000 len=3 hex=000000",
        "close demo status=0x00000000",
        "close demo status=0x00000000",
        "close demo status=0x00000000",
        "done status=1",
    ];
    let expected: Vec<String> = expected
        .iter()
        .map(|l| std::format!("vshm-guest: {l}"))
        .collect();
    assert_eq!(lines, expected);
    assert_eq!(end, End::Exit(1));
    assert_eq!(sim.requests, 7);
    assert_eq!(sim.driver_features, VIRTIO_F_VERSION_1 | VSHM_F_READ_ONLY);
    assert_eq!(sim.status, 1 | 2 | 4 | 8);
    assert_eq!(sim.qsize, 16);
    // Bus mastering and memory space on.
    assert_eq!(sim.cfg[4] & 0b110, 0b110);
}

#[test]
fn failures_are_reported_and_counted_and_success_exits_0() {
    let mut sim = Sim::new(0);
    let (end, lines) = go(
        &mut sim,
        "open nothere; close nothere; frob 1; create; fill x 300",
    );
    assert_eq!(end, End::Exit(1));
    assert_eq!(
        &lines[1..],
        [
            "vshm-guest: open nothere status=0xc0000034 failed STATUS_OBJECT_NAME_NOT_FOUND",
            "vshm-guest: close nothere failed: not open",
            "vshm-guest: unknown command 'frob'",
            "vshm-guest: bad command 'create': usage: create NAME SIZE [MAX]",
            "vshm-guest: bad command 'fill x 300': usage: fill NAME BYTE",
            "vshm-guest: done status=1",
        ]
    );
    let mut sim = Sim::new(0);
    let (end, lines) = go(&mut sim, "create a 16; check a 0; done; frob");
    assert_eq!(end, End::Exit(0));
    assert_eq!(
        lines.last().map(String::as_str),
        Some("vshm-guest: done status=0")
    );
    let mut sim = Sim::new(0);
    assert_eq!(go(&mut sim, "create a 16; spin; create b 16").0, End::Spin);
}

#[test]
fn a_device_that_never_answers_times_out_and_the_queue_is_then_unusable() {
    let mut sim = Sim::new(5);
    sim.answer = false;
    let (end, lines) = go(&mut sim, "create a 16; create b 16");
    assert_eq!(end, End::Exit(1));
    assert_eq!(
        &lines[1..],
        [
            "vshm-guest: create a failed: timeout: no response after 3000000 polls",
            "vshm-guest: create b failed: the request queue is stuck (an earlier timeout)",
            "vshm-guest: done status=1",
        ]
    );
}

#[test]
fn another_format_version_or_missing_features_are_refused() {
    let mut sim = Sim::new(1);
    sim.format_version = FORMAT_VERSION + 1;
    let (end, lines) = go(&mut sim, "");
    assert_eq!(end, End::Exit(1));
    assert_eq!(
        lines,
        [std::format!(
            "vshm-guest: the vshm device speaks format_version {}, this guest {}: refusing it",
            FORMAT_VERSION + 1,
            FORMAT_VERSION
        )]
    );
    let mut sim = Sim::new(1);
    sim.offered = VSHM_F_READ_ONLY;
    let (end, lines) = go(&mut sim, "");
    assert_eq!(end, End::Exit(1));
    assert_eq!(
        lines,
        ["vshm-guest: the vshm device is unusable: the device does not offer VIRTIO_F_VERSION_1"]
    );
    assert_eq!(sim.status & 128, 128, "FAILED set");
}

#[test]
fn the_ring_indexes_wrap_past_65535() {
    let mut sim = Sim::new(2);
    let mut args = String::new();
    for _ in 0..70 {
        args.push_str("create a 16; close a;");
    }
    let mut dev = crate::device::Device::init(&mut sim).expect("device");
    for i in 0..70_000u32 {
        let mut req = zeroed::<Request>();
        req.op = op::WAKE;
        let r = dev.request(&mut sim, &req).expect("response");
        assert_eq!(r.status, Status::NotSupported.code(), "request {i}");
    }
    assert_eq!(go(&mut sim, &args).0, End::Exit(0));
}
