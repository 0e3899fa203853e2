//! The command interpreter: finds the device, runs the commands of the argument string,
//! prints one `vshm-guest: ` line per command, and says how the run ends.

use vshm_format::layout::{kind, FORMAT_VERSION};
use vshm_format::layout::{Request, Response};
use vshm_format::mailbox::{create_request, create_sync_request};
use vshm_format::shm::{bytes_of, zeroed};
use vshm_format::virtio::{
    MAP_WRITABLE, OPEN_READ_ONLY, OP_CLOSE, OP_OPEN, OP_SIGNAL, OP_WAIT, PCI_DEVICE, PCI_VENDOR,
    RESP_MAP_FLAGS_OFF,
};
use vshm_format::Status;

use crate::device::{Device, InitError, RequestError, POLL_LIMIT};
use crate::hw::Hw;
use crate::line::Line;
use crate::parse::{commands, Cmd, ParseError};

/// Exit status: every command succeeded.
pub const EXIT_OK: u8 = 0;
/// Exit status: a command failed (or the device is unusable).
pub const EXIT_FAILED: u8 = 1;
/// Exit status: no vshm device on bus 0.
pub const EXIT_NO_DEVICE: u8 = 2;
/// Exit status: the guest panicked.
pub const EXIT_PANIC: u8 = 3;

/// How a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Write this status to the exit port.
    Exit(u8),
    /// Loop forever (`spin`).
    Spin,
}

/// Handles this guest keeps at once.
pub const MAX_HANDLES: usize = 16;
/// Longest name the handle table keeps (the device's `max_name_len`).
pub const MAX_NAME: usize = 255;

/// A section this guest opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handle {
    name: [u8; MAX_NAME],
    name_len: usize,
    /// Window offset of the mapping (what CLOSE names).
    pub offset: u64,
    /// Bytes mapped.
    pub size: u64,
    /// Maximum size.
    pub max_size: u64,
    /// `map_flags` bit 0.
    pub writable: bool,
    /// Object slot.
    pub slot: u32,
    /// Object generation.
    pub generation: u64,
    order: u64,
}

/// The handles, by name; a name opened twice has two, and the latest is the one used.
#[derive(Debug)]
pub struct Handles {
    entries: [Option<Handle>; MAX_HANDLES],
    order: u64,
}

impl Default for Handles {
    fn default() -> Self {
        Handles {
            entries: [None; MAX_HANDLES],
            order: 0,
        }
    }
}

impl Handles {
    /// The index of the latest handle named `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        let mut best: Option<(usize, u64)> = None;
        for (i, e) in self.entries.iter().enumerate() {
            if let Some(h) = e {
                if &h.name[..h.name_len] == name.as_bytes() && best.is_none_or(|b| h.order > b.1) {
                    best = Some((i, h.order));
                }
            }
        }
        best.map(|b| b.0)
    }

    /// The handle at `i`.
    pub fn get(&self, i: usize) -> Option<&Handle> {
        self.entries.get(i).and_then(Option::as_ref)
    }

    /// Whether another handle fits.
    pub fn has_room(&self) -> bool {
        self.entries.iter().any(Option::is_none)
    }

    /// Keeps a handle from a response; false if the table is full or the name too long.
    pub fn insert(&mut self, name: &str, resp: &Response) -> bool {
        let Some(free) = self.entries.iter().position(Option::is_none) else {
            return false;
        };
        if name.len() > MAX_NAME {
            return false;
        }
        let mut h = Handle {
            name: [0; MAX_NAME],
            name_len: name.len(),
            offset: resp.offset,
            size: resp.size,
            max_size: resp.max_size,
            writable: map_flags(resp) & MAP_WRITABLE != 0,
            slot: resp.slot,
            generation: resp.generation,
            order: self.order,
        };
        h.name[..name.len()].copy_from_slice(name.as_bytes());
        self.order += 1;
        self.entries[free] = Some(h);
        true
    }

    /// Forgets the handle at `i`.
    pub fn remove(&mut self, i: usize) {
        if let Some(e) = self.entries.get_mut(i) {
            *e = None;
        }
    }
}

/// A response's `map_flags` (docs/VHOST-USER.md §5: the le32 at byte 72).
pub fn map_flags(resp: &Response) -> u32 {
    let b = bytes_of(resp);
    let at = RESP_MAP_FLAGS_OFF;
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Runs the guest: the device, then each command of `args` (the bytes at 0x7000 up to
/// the NUL).
pub fn run<H: Hw>(hw: &mut H, args: &[u8]) -> End {
    let mut dev = match Device::init(hw) {
        Ok(d) => d,
        Err(e) => return End::Exit(init_failed(hw, e)),
    };
    let f = dev.function;
    let mut l = Line::new();
    l.s("device 00:")
        .byte(f.device)
        .s(".")
        .dec(u64::from(f.function))
        .s(" window_size=")
        .dec(dev.config.window_size)
        .s(" page_size=")
        .dec(dev.config.page_size)
        .s(" epoch=")
        .dec(dev.config.region_epoch)
        .s(" features=")
        .hex(dev.features)
        .s(" bar_window=")
        .hex(dev.window)
        .s(" window_len=")
        .dec(dev.window_len);
    hw.serial(l.finish());

    let Ok(args) = core::str::from_utf8(args) else {
        hw.serial(Line::new().s("the command string is not UTF-8").finish());
        return End::Exit(EXIT_FAILED);
    };
    let mut handles = Handles::default();
    let mut failed = false;
    for (text, cmd) in commands(args) {
        let ok = match cmd {
            Ok(Cmd::Done) => break,
            Ok(Cmd::Spin) => {
                hw.serial(Line::new().s("spin").finish());
                return End::Spin;
            }
            Ok(cmd) => execute(hw, &mut dev, &mut handles, cmd),
            Err(ParseError::Unknown(verb)) => {
                hw.serial(Line::new().s("unknown command '").s(verb).s("'").finish());
                false
            }
            Err(ParseError::Usage(usage)) => {
                let mut l = Line::new();
                l.s("bad command '").s(text).s("': usage: ").s(usage);
                hw.serial(l.finish());
                false
            }
        };
        failed |= !ok;
    }
    let status = if failed { EXIT_FAILED } else { EXIT_OK };
    hw.serial(
        Line::new()
            .s("done status=")
            .dec(u64::from(status))
            .finish(),
    );
    End::Exit(status)
}

fn init_failed<H: Hw>(hw: &mut H, e: InitError) -> u8 {
    let mut l = Line::new();
    let status = match e {
        InitError::NotFound => {
            l.s("no vshm device found (no PCI function ")
                .hex_w(u64::from(PCI_VENDOR), 4)
                .s(":")
                .hex_w(u64::from(PCI_DEVICE), 4)
                .s(" on bus 0)");
            EXIT_NO_DEVICE
        }
        InitError::Broken(why) => {
            l.s("the vshm device is unusable: ").s(why);
            EXIT_FAILED
        }
        InitError::FormatVersion(v) => {
            l.s("the vshm device speaks format_version ")
                .dec(u64::from(v))
                .s(", this guest ")
                .dec(u64::from(FORMAT_VERSION))
                .s(": refusing it");
            EXIT_FAILED
        }
    };
    hw.serial(l.finish());
    status
}

/// Runs one command; whether it succeeded.
fn execute<H: Hw>(hw: &mut H, dev: &mut Device, handles: &mut Handles, cmd: Cmd<'_>) -> bool {
    let mut l = Line::new();
    let ok = match cmd {
        Cmd::Create { name, size, max } => {
            l.s("create ").s(name);
            let req = create_request(Some(name), kind::SECTION, max, size, false);
            open(hw, dev, handles, &mut l, name, &req, true)
        }
        Cmd::Open { name, read_only } => {
            l.s("open ").s(name);
            let mut req = create_request(Some(name), kind::SECTION, 0, 0, false);
            req.op = OP_OPEN;
            if read_only {
                req.flags |= OPEN_READ_ONLY;
            }
            open(hw, dev, handles, &mut l, name, &req, false)
        }
        Cmd::Close { name } => {
            l.s("close ").s(name);
            match handles.find(name).and_then(|i| Some((i, *handles.get(i)?))) {
                None => {
                    l.s(" failed: not open");
                    false
                }
                Some((i, h)) => {
                    let mut req = zeroed::<Request>();
                    req.op = OP_CLOSE;
                    req.slot = h.slot;
                    req.generation = h.generation;
                    req.size = h.offset;
                    match dev.request(hw, &req) {
                        Err(e) => request_failed(&mut l, e),
                        Ok(resp) => {
                            l.s(" status=").hex32(resp.status);
                            let ok = resp.status == Status::Success.code();
                            if ok {
                                handles.remove(i);
                            } else {
                                failed_status(&mut l, resp.status);
                            }
                            ok
                        }
                    }
                }
            }
        }
        Cmd::Fill { name, byte } | Cmd::Check { name, byte } => {
            let filling = matches!(cmd, Cmd::Fill { .. });
            l.s(if filling { "fill " } else { "check " })
                .s(name)
                .s(" byte=")
                .hex_w(u64::from(byte), 2);
            match handles.find(name).and_then(|i| handles.get(i)) {
                None => {
                    l.s(" failed: not open");
                    false
                }
                Some(h) => match section(dev, h) {
                    None => {
                        l.s(" failed: the mapping lies outside the window");
                        false
                    }
                    Some(_) if filling && !h.writable => {
                        l.s(" failed: mapped read-only");
                        false
                    }
                    Some(addr) if filling => {
                        fill(hw, addr, h.size, byte);
                        l.s(" bytes=").dec(h.size).s(" ok");
                        true
                    }
                    Some(addr) => match check(hw, addr, h.size, byte) {
                        None => {
                            l.s(" bytes=").dec(h.size).s(" ok");
                            true
                        }
                        Some((at, value)) => {
                            l.s(" mismatch at=")
                                .hex(at)
                                .s(" value=")
                                .hex_w(u64::from(value), 2);
                            false
                        }
                    },
                },
            }
        }
        Cmd::Peek { offset, len } => {
            l.s("peek offset=").hex(offset).s(" len=").dec(len);
            match offset.checked_add(len) {
                Some(end) if end <= dev.window_len => {
                    l.s(" hex=");
                    for i in 0..len {
                        let b = hw.read8(dev.window + offset + i);
                        l.byte(b);
                    }
                    true
                }
                _ => {
                    l.s(" failed: outside the window");
                    false
                }
            }
        }
        Cmd::Event { name } => {
            l.s("event ").s(name);
            let req = create_sync_request(Some(name), kind::EVENT, false, false);
            open(hw, dev, handles, &mut l, name, &req, true)
        }
        Cmd::Signal { name } => {
            l.s("signal ").s(name);
            on_handle(hw, dev, handles, &mut l, name, OP_SIGNAL, 0)
        }
        Cmd::Wait { name, ms } => {
            l.s("wait ").s(name).s(" ms=").dec(ms);
            on_handle(hw, dev, handles, &mut l, name, OP_WAIT, ms)
        }
        Cmd::Spin | Cmd::Done => true,
    };
    hw.serial(l.finish());
    ok
}

/// A request naming a handle this guest holds (SIGNAL, WAIT): its status on the line.
fn on_handle<H: Hw>(
    hw: &mut H,
    dev: &mut Device,
    handles: &Handles,
    l: &mut Line,
    name: &str,
    op: u32,
    size: u64,
) -> bool {
    let Some(h) = handles.find(name).and_then(|i| handles.get(i)) else {
        l.s(" failed: not open");
        return false;
    };
    let mut req = zeroed::<Request>();
    req.op = op;
    req.slot = h.slot;
    req.generation = h.generation;
    req.size = size;
    match dev.request(hw, &req) {
        Err(e) => request_failed(l, e),
        Ok(resp) => {
            l.s(" status=").hex32(resp.status);
            let ok = resp.status == Status::Success.code();
            if !ok {
                failed_status(l, resp.status);
            }
            ok
        }
    }
}

/// OPEN or CREATE: the request, the line, the handle.
fn open<H: Hw>(
    hw: &mut H,
    dev: &mut Device,
    handles: &mut Handles,
    l: &mut Line,
    name: &str,
    req: &Request,
    create: bool,
) -> bool {
    if name.len() > MAX_NAME {
        l.s(" failed: names longer than 255 bytes are not kept by this guest");
        return false;
    }
    if !handles.has_room() {
        l.s(" failed: this guest's handle table is full (16)");
        return false;
    }
    let resp = match dev.request(hw, req) {
        Ok(r) => r,
        Err(e) => return request_failed(l, e),
    };
    l.s(" status=").hex32(resp.status);
    let ok = resp.status == Status::Success.code()
        || (create && resp.status == Status::ObjectNameExists.code());
    if !ok {
        failed_status(l, resp.status);
        return false;
    }
    handles.insert(name, &resp);
    l.s(" window=")
        .hex(resp.offset)
        .s(" size=")
        .dec(resp.size)
        .s(" writable=")
        .dec(u64::from(map_flags(&resp) & MAP_WRITABLE))
        .s(" max=")
        .dec(resp.max_size)
        .s(" slot=")
        .dec(u64::from(resp.slot))
        .s(" generation=")
        .dec(resp.generation);
    true
}

fn failed_status(l: &mut Line, code: u32) {
    l.s(" failed ")
        .s(Status::from_code(code).map_or("(an unknown status)", Status::name));
}

fn request_failed(l: &mut Line, e: RequestError) -> bool {
    match e {
        RequestError::Timeout => l
            .s(" failed: timeout: no response after ")
            .dec(u64::from(POLL_LIMIT))
            .s(" polls"),
        RequestError::Short(n) => l
            .s(" failed: the device wrote a ")
            .dec(u64::from(n))
            .s("-byte response"),
        RequestError::WrongSeq(s) => l
            .s(" failed: the response answers request ")
            .dec(s)
            .s(", not this one"),
        RequestError::Unusable => l.s(" failed: the request queue is stuck (an earlier timeout)"),
    };
    false
}

/// The guest-physical address of a handle's bytes, if they lie inside the window.
fn section(dev: &Device, h: &Handle) -> Option<u64> {
    let end = h.offset.checked_add(h.size)?;
    (end <= dev.window_len).then(|| dev.window + h.offset)
}

const fn splat(b: u8) -> u64 {
    u64::from_ne_bytes([b; 8])
}

/// Writes `byte` to `len` bytes at `addr` (8 at a time where aligned).
pub fn fill<H: Hw>(hw: &mut H, addr: u64, len: u64, byte: u8) {
    let end = addr + len;
    let mut a = addr;
    while a < end && a % 8 != 0 {
        hw.write8(a, byte);
        a += 1;
    }
    while a + 8 <= end {
        hw.write64(a, splat(byte));
        a += 8;
    }
    while a < end {
        hw.write8(a, byte);
        a += 1;
    }
}

/// The first byte of the `len` at `addr` that is not `byte`: its offset and value.
pub fn check<H: Hw>(hw: &mut H, addr: u64, len: u64, byte: u8) -> Option<(u64, u8)> {
    let end = addr + len;
    let mut a = addr;
    while a < end {
        if a % 8 == 0 && a + 8 <= end {
            let w = hw.read64(a);
            if w == splat(byte) {
                a += 8;
                continue;
            }
            let bytes = w.to_le_bytes();
            let mut i = 0;
            while bytes[i] == byte {
                i += 1;
            }
            return Some((a - addr + i as u64, bytes[i]));
        }
        let b = hw.read8(a);
        if b != byte {
            return Some((a - addr, b));
        }
        a += 1;
    }
    None
}
