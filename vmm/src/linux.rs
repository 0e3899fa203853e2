//! Linux's 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit boot protocol"):
//! the bzImage's protected-mode kernel loaded by linux-loader at its `code32_start`
//! (1 MiB), the zero page (`struct boot_params`: the image's setup header with
//! `type_of_loader` = 0xff, an e820 map of the RAM, the command line, the initrd) and the
//! initrd at the top of RAM below the kernel's `initrd_addr_max`. The vCPU then starts in
//! 64-bit mode at the 64-bit entry (load address + 0x200) with RSI = the zero page, on the
//! VMM's identity map of the first GiB (which covers everything here: RAM is at most 1 GiB)
//! and its flat GDT (selectors 0x10/0x18, the protocol's `__BOOT_CS`/`__BOOT_DS`),
//! interrupts off.
//!
//! Everything here works on guest memory alone, without KVM, so it is tested anywhere.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{self, load_cmdline, BzImage, Cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::VmmError;

/// The command line used when none is given: the console on COM1 (with early output from
/// the start), and a panic ends the run (a reset through the keyboard controller, which the
/// VMM treats as the end) instead of hanging.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 reboot=k";

/// Where the zero page (`struct boot_params`) goes.
pub const ZERO_PAGE: u64 = 0x7000;
/// Where the command line goes.
pub const CMDLINE: u64 = 0x2_0000;
/// Where RAM above the legacy hole starts, and where the kernel is loaded.
pub const HIGH_MEMORY: u64 = 0x10_0000;
/// The end of the low RAM the e820 map reports (the EBDA and the BIOS area above it are
/// left out, as on a PC).
pub const LOW_RAM_END: u64 = 0x9_FC00;
/// The offset of the 64-bit entry point from the protected-mode kernel's start.
pub const ENTRY_64_OFFSET: u64 = 0x200;

const E820_RAM: u32 = 1;
/// `xloadflags` bit 0: the kernel has the 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// The `HdrS` magic at offset 0x202.
const HDRS: u32 = 0x5372_6448;
const PAGE: u64 = 0x1000;

/// What to boot.
#[derive(Debug, Clone)]
pub struct LinuxConfig {
    /// The kernel (bzImage).
    pub kernel: PathBuf,
    /// The initrd (initramfs), if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes, from address 0.
    pub mem_size: u64,
}

impl LinuxConfig {
    /// `kernel` with no initrd, [`DEFAULT_CMDLINE`] and `mem_size` bytes of RAM.
    pub fn new(kernel: impl Into<PathBuf>, mem_size: u64) -> LinuxConfig {
        LinuxConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_owned(),
            mem_size,
        }
    }
}

/// Where things were put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// The 64-bit entry point (RIP at start).
    pub entry: u64,
    /// The zero page (RSI at start).
    pub zero_page: u64,
    /// The first byte past the protected-mode kernel as loaded.
    pub kernel_end: u64,
    /// The first byte past the region the decompressor may use (its output buffer at the
    /// kernel's preferred address, `init_size` bytes).
    pub reserved_end: u64,
    /// The initrd's address and size, if one was loaded.
    pub initrd: Option<(u64, u64)>,
}

fn read_error<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> VmmError + 'a {
    move |source| VmmError::ReadFile {
        what,
        path: path.to_owned(),
        source,
    }
}

fn not_bzimage(path: &Path, reason: impl Into<String>) -> VmmError {
    VmmError::NotBzImage {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn align_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to).saturating_mul(to)
}

/// Loads `cfg`'s kernel, command line and initrd into `mem` and writes the zero page.
pub fn load(mem: &GuestMemoryMmap, cfg: &LinuxConfig) -> Result<Loaded, VmmError> {
    let mem_size = mem.last_addr().0.saturating_add(1);
    let path = cfg.kernel.as_path();
    let mut kernel = File::open(path).map_err(read_error("kernel", path))?;
    let len = kernel.metadata().map_err(read_error("kernel", path))?.len();
    // The setup header starts at 0x1F1; a file shorter than the header cannot be one.
    if len < 0x1F1 + std::mem::size_of::<setup_header>() as u64 {
        return Err(not_bzimage(
            path,
            format!("{len} bytes, too short for a setup header"),
        ));
    }
    if len > mem_size.saturating_sub(HIGH_MEMORY) {
        return Err(VmmError::MemoryTooSmall {
            need: HIGH_MEMORY.saturating_add(len),
            have: mem_size,
        });
    }
    let res = BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIGH_MEMORY))).map_err(
        |e| match e {
            loader::Error::Bzimage(loader::bzimage::Error::InvalidBzImage) => not_bzimage(
                path,
                "no `HdrS` setup header with a protected-mode kernel (boot protocol ≥ 2.00, LOADED_HIGH)",
            ),
            loader::Error::InvalidKernelStartAddress => {
                not_bzimage(path, "its code32_start is below 1 MiB")
            }
            other => not_bzimage(path, other.to_string()),
        },
    )?;
    let mut hdr = res
        .setup_header
        .ok_or_else(|| not_bzimage(path, "linux-loader returned no setup header"))?;
    let (magic, version, xloadflags) = (hdr.header, hdr.version, hdr.xloadflags);
    if magic != HDRS {
        return Err(not_bzimage(path, "no `HdrS` magic"));
    }
    if version < 0x020C || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(not_bzimage(
            path,
            format!(
                "no 64-bit entry point (boot protocol {}.{:02}, xloadflags {xloadflags:#x}; \
                 needs ≥ 2.12 with XLF_KERNEL_64)",
                version >> 8,
                version & 0xFF
            ),
        ));
    }
    let load = res.kernel_load.0;
    // The decompressor runs at the larger of its load address and its preferred address,
    // in a buffer of init_size bytes (arch/x86/boot/compressed/head_64.S).
    let (pref, init_size) = (hdr.pref_address, hdr.init_size);
    let reserved_end = load.max(pref).saturating_add(u64::from(init_size));
    if reserved_end > mem_size {
        return Err(VmmError::MemoryTooSmall {
            need: reserved_end,
            have: mem_size,
        });
    }

    let max = u64::from(hdr.cmdline_size);
    let len = cfg.cmdline.len() as u64;
    if len > max {
        return Err(VmmError::CmdlineTooLong { len, max });
    }
    let capacity = usize::try_from(max.saturating_add(1)).unwrap_or(usize::MAX);
    let cmdline = Cmdline::try_from(&cfg.cmdline, capacity).map_err(|e| VmmError::BadCmdline {
        cmdline: cfg.cmdline.clone(),
        reason: e.to_string(),
    })?;
    load_cmdline(mem, GuestAddress(CMDLINE), &cmdline).map_err(crate::mem_err)?;

    let mut initrd = None;
    if let Some(ipath) = cfg.initrd.as_deref() {
        let mut file = File::open(ipath).map_err(read_error("initrd", ipath))?;
        let size = file.metadata().map_err(read_error("initrd", ipath))?.len();
        let top = mem_size.min(u64::from(hdr.initrd_addr_max).saturating_add(1));
        let room = top.saturating_sub(align_up(reserved_end, PAGE));
        if size > room {
            return Err(VmmError::InitrdTooLarge {
                path: ipath.to_owned(),
                size,
                max: room,
            });
        }
        let addr = (top - size) & !(PAGE - 1);
        let count = usize::try_from(size).map_err(crate::mem_err)?;
        mem.read_exact_volatile_from(GuestAddress(addr), &mut file, count)
            .map_err(|e| {
                VmmError::Memory(format!("reading the initrd {}: {e}", ipath.display()))
            })?;
        initrd = Some((addr, size));
    }

    hdr.type_of_loader = 0xFF;
    hdr.cmd_line_ptr = u32::try_from(CMDLINE).map_err(crate::mem_err)?;
    if let Some((addr, size)) = initrd {
        // Both below 1 GiB (RAM is at most that), so they fit the 32-bit fields.
        hdr.ramdisk_image = u32::try_from(addr).map_err(crate::mem_err)?;
        hdr.ramdisk_size = u32::try_from(size).map_err(crate::mem_err)?;
    }
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    let ram = [
        (0, LOW_RAM_END),
        (HIGH_MEMORY, mem_size.saturating_sub(HIGH_MEMORY)),
    ];
    for (slot, (addr, size)) in params.e820_table.iter_mut().zip(ram) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = 2;
    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(crate::mem_err)?;
    Ok(Loaded {
        entry: load + ENTRY_64_OFFSET,
        zero_page: ZERO_PAGE,
        kernel_end: res.kernel_end,
        reserved_end,
        initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal image with a bzImage setup header (boot protocol 2.15, 64-bit entry,
    /// preferred address 16 MiB, `init_size` 1 MiB, command lines up to 64 bytes) and a
    /// page of "kernel".
    fn fake_bzimage() -> Vec<u8> {
        let mut b = vec![0u8; 0x400 + 0x1000];
        let put = |b: &mut Vec<u8>, at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(&mut b, 0x1F1, &[1]); // setup_sects: the kernel starts at 0x400
        put(&mut b, 0x1FE, &0xAA55u16.to_le_bytes());
        put(&mut b, 0x202, b"HdrS");
        put(&mut b, 0x206, &0x020Fu16.to_le_bytes());
        put(&mut b, 0x211, &[1]); // loadflags: LOADED_HIGH
        put(&mut b, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
        put(&mut b, 0x22C, &0x7FFF_FFFFu32.to_le_bytes()); // initrd_addr_max
        put(&mut b, 0x236, &1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
        put(&mut b, 0x238, &64u32.to_le_bytes()); // cmdline_size
        put(&mut b, 0x258, &0x100_0000u64.to_le_bytes()); // pref_address
        put(&mut b, 0x260, &0x10_0000u32.to_le_bytes()); // init_size
        put(&mut b, 0x400, &[0xF4]);
        b
    }

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("vshm-vmm-linux-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("scratch dir");
            Scratch(dir)
        }

        fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, bytes).expect("write");
            p
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn ram(mib: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mib << 20)]).expect("ram")
    }

    #[test]
    fn a_bzimage_is_loaded_at_1_mib_with_a_zero_page_describing_ram_cmdline_and_initrd() {
        let s = Scratch::new("ok");
        let mut cfg = LinuxConfig::new(s.file("bzImage", &fake_bzimage()), 32 << 20);
        cfg.initrd = Some(s.file("initrd", &[7u8; 5000]));
        cfg.cmdline = "console=ttyS0".into();
        let mem = ram(32);
        let l = load(&mem, &cfg).expect("load");
        assert_eq!(l.entry, 0x10_0200);
        assert_eq!(l.zero_page, ZERO_PAGE);
        assert_eq!(l.reserved_end, 0x110_0000);
        let (addr, size) = l.initrd.expect("initrd");
        assert_eq!(size, 5000);
        assert_eq!(addr % PAGE, 0);
        assert!(
            addr >= l.reserved_end && addr + size <= 32 << 20,
            "{addr:#x}"
        );
        let mut got = [0u8; 5000];
        mem.read_slice(&mut got, GuestAddress(addr)).expect("read");
        assert!(got.iter().all(|b| *b == 7));
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x10_0000)).expect("read"),
            0xF4
        );

        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE)).expect("zero page");
        let h = p.hdr;
        let (tol, cmd, ri, rs) = (
            h.type_of_loader,
            h.cmd_line_ptr,
            h.ramdisk_image,
            h.ramdisk_size,
        );
        assert_eq!(tol, 0xFF);
        assert_eq!(u64::from(cmd), CMDLINE);
        assert_eq!((u64::from(ri), u64::from(rs)), (addr, size));
        assert_eq!(p.e820_entries, 2);
        let e = p.e820_table;
        let (a0, s0, a1, s1) = (e[0].addr, e[0].size, e[1].addr, e[1].size);
        assert_eq!((a0, s0), (0, LOW_RAM_END));
        assert_eq!((a1, s1), (HIGH_MEMORY, (32 << 20) - HIGH_MEMORY));
        let mut line = [0u8; 14];
        mem.read_slice(&mut line, GuestAddress(CMDLINE))
            .expect("read");
        assert_eq!(&line, b"console=ttyS0\0");
    }

    #[test]
    fn a_file_that_is_not_a_bzimage_is_refused_naming_it() {
        let s = Scratch::new("notbz");
        let mut junk = fake_bzimage();
        junk[0x202..0x206].copy_from_slice(b"ELF!");
        let cfg = LinuxConfig::new(s.file("junk", &junk), 32 << 20);
        let e = load(&ram(32), &cfg).expect_err("not a bzImage");
        assert!(matches!(e, VmmError::NotBzImage { .. }), "{e:?}");
        assert!(e.to_string().contains("junk is not a bzImage"), "{e}");
        let tiny = LinuxConfig::new(s.file("tiny", b"hello"), 32 << 20);
        let e = load(&ram(32), &tiny).expect_err("too short");
        assert!(e.to_string().contains("5 bytes"), "{e}");
        let mut bz32 = fake_bzimage();
        bz32[0x236] = 0;
        let cfg = LinuxConfig::new(s.file("bz32", &bz32), 32 << 20);
        let e = load(&ram(32), &cfg).expect_err("no 64-bit entry");
        assert!(e.to_string().contains("no 64-bit entry point"), "{e}");
    }

    #[test]
    fn a_missing_kernel_or_initrd_is_refused_naming_the_file() {
        let s = Scratch::new("missing");
        let cfg = LinuxConfig::new(s.0.join("nope"), 32 << 20);
        let e = load(&ram(32), &cfg).expect_err("missing kernel");
        assert!(
            matches!(&e, VmmError::ReadFile { what: "kernel", path, .. } if path.ends_with("nope")),
            "{e:?}"
        );
        let mut cfg = LinuxConfig::new(s.file("bzImage", &fake_bzimage()), 32 << 20);
        cfg.initrd = Some(s.0.join("no-initrd"));
        let e = load(&ram(32), &cfg).expect_err("missing initrd");
        assert!(e.to_string().starts_with("cannot read the initrd"), "{e}");
        assert!(e.to_string().contains("no-initrd"), "{e}");
    }

    #[test]
    fn an_initrd_too_large_for_ram_is_refused_with_its_size_and_the_room() {
        let s = Scratch::new("big");
        let mut cfg = LinuxConfig::new(s.file("bzImage", &fake_bzimage()), 32 << 20);
        let big = s.0.join("initrd");
        let f = File::create(&big).expect("create");
        f.set_len(20 << 20).expect("sparse 20 MiB");
        cfg.initrd = Some(big);
        let e = load(&ram(32), &cfg).expect_err("too large");
        match e {
            VmmError::InitrdTooLarge { size, max, .. } => {
                assert_eq!(size, 20 << 20);
                // RAM 32 MiB minus the decompressor's region up to 17 MiB.
                assert_eq!(max, 15 << 20);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_command_line_longer_than_the_kernel_accepts_is_refused_with_both_lengths() {
        let s = Scratch::new("cmdline");
        let mut cfg = LinuxConfig::new(s.file("bzImage", &fake_bzimage()), 32 << 20);
        cfg.cmdline = "x".repeat(65);
        let e = load(&ram(32), &cfg).expect_err("too long");
        assert!(
            matches!(e, VmmError::CmdlineTooLong { len: 65, max: 64 }),
            "{e:?}"
        );
        cfg.cmdline = "x".repeat(64);
        load(&ram(32), &cfg).expect("64 bytes fit");
    }

    #[test]
    fn ram_too_small_for_the_decompressor_is_refused_with_what_it_needs() {
        let s = Scratch::new("small");
        let cfg = LinuxConfig::new(s.file("bzImage", &fake_bzimage()), 16 << 20);
        let e = load(&ram(16), &cfg).expect_err("too small");
        assert!(
            matches!(
                e,
                VmmError::MemoryTooSmall {
                    need: 0x110_0000,
                    have: 0x100_0000
                }
            ),
            "{e:?}"
        );
    }
}
