//! The vshm device's shared-memory window (BAR 4): what the backend maps there with
//! SHMEM_MAP becomes an mmap of its fd plus a KVM memory slot at the window's guest address,
//! read-only (`KVM_MEM_READONLY`) unless the backend said writable; SHMEM_UNMAP removes both.
//!
//! One slot per mapping rather than one slot over the whole window with pages replaced under
//! it: a slot is the only way to make a range read-only to the guest (a write to a read-only
//! host mapping inside a writable slot fails the vCPU's run with EFAULT), and a window page
//! with no slot exits to the VMM, which reads it as zero and drops writes — so an unmapped
//! page can never show the old data or anyone else's.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;

/// Why a map or unmap was refused (the frontend answers the backend with a failure).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// Offsets and lengths are multiples of the page size, lengths non-zero.
    #[error("window range {offset:#x}+{len:#x} (file offset {fd_offset:#x}) is not page-aligned or empty")]
    Unaligned {
        /// Window offset.
        offset: u64,
        /// Length.
        len: u64,
        /// File offset.
        fd_offset: u64,
    },
    /// The range goes past the window.
    #[error("window range {offset:#x}+{len:#x} is outside the {size:#x}-byte window")]
    OutOfWindow {
        /// Window offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The window's size.
        size: u64,
    },
    /// The range overlaps a mapping already there.
    #[error("window range {offset:#x}+{len:#x} overlaps the mapping at {existing:#x}")]
    Overlap {
        /// Window offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The mapping in the way.
        existing: u64,
    },
    /// mmap failed.
    #[error("mmap of {len:#x} bytes at file offset {fd_offset:#x}: {errno}")]
    Mmap {
        /// Length.
        len: u64,
        /// File offset.
        fd_offset: u64,
        /// The OS error.
        errno: String,
    },
    /// The KVM slot could not be set.
    #[error("KVM memory slot {slot}: {errno}")]
    Slot {
        /// Which slot.
        slot: u32,
        /// The error.
        errno: String,
    },
    /// The range goes past the end of the file.
    #[error("file range {fd_offset:#x}+{len:#x} is past the end of the {file_len:#x}-byte file")]
    PastFile {
        /// File offset.
        fd_offset: u64,
        /// Length.
        len: u64,
        /// The file's size.
        file_len: u64,
    },
    /// Every KVM memory slot the window may use is taken.
    #[error("no free KVM memory slot for the window")]
    NoSlot,
}

struct Mapping {
    len: u64,
    file: Arc<File>,
    fd_offset: u64,
    writable: bool,
    host: usize,
    slot: u32,
    /// Whether its KVM slot exists (only while the window has a place: [`Window::place`]).
    installed: bool,
}

/// The window and its mappings.
pub struct Window {
    vm: Arc<VmFd>,
    /// Where the guest sees the window: `None` while the BAR is not somewhere it may be
    /// (decoding off, over RAM or another BAR, past what KVM maps); mappings then have no
    /// slot and the guest reaches none of them.
    base: Option<u64>,
    size: u64,
    page: u64,
    maps: BTreeMap<u64, Mapping>,
    free_slots: Vec<u32>,
    next_slot: u32,
    max_slot: u32,
}

impl fmt::Debug for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Window")
            .field("base", &self.base)
            .field("size", &self.size)
            .field("mappings", &self.maps.len())
            .finish_non_exhaustive()
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).unwrap_or(4096)
}

fn os_error(e: &std::io::Error) -> String {
    e.to_string()
}

impl Window {
    /// A window of `size` bytes at guest address `base` (`None`: not placed), its slots
    /// taken from `first_slot` up to (not including) `end_slot`.
    pub fn new(
        vm: Arc<VmFd>,
        base: Option<u64>,
        size: u64,
        first_slot: u32,
        end_slot: u32,
    ) -> Window {
        Window {
            vm,
            base,
            size,
            page: page_size(),
            maps: BTreeMap::new(),
            free_slots: Vec::new(),
            next_slot: first_slot,
            max_slot: end_slot,
        }
    }

    /// The window's guest address, if it is placed.
    pub fn base(&self) -> Option<u64> {
        self.base
    }

    /// The mapped ranges: (window offset, length, writable).
    pub fn mappings(&self) -> Vec<(u64, u64, bool)> {
        self.maps
            .iter()
            .map(|(o, m)| (*o, m.len, m.writable))
            .collect()
    }

    fn take_slot(&mut self) -> Result<u32, WindowError> {
        if let Some(s) = self.free_slots.pop() {
            return Ok(s);
        }
        if self.next_slot >= self.max_slot {
            return Err(WindowError::NoSlot);
        }
        self.next_slot += 1;
        Ok(self.next_slot - 1)
    }

    fn set_slot(
        &self,
        slot: u32,
        gpa: u64,
        len: u64,
        host: usize,
        writable: bool,
    ) -> Result<(), WindowError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: if writable { 0 } else { KVM_MEM_READONLY },
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is a live mapping of `len` bytes owned by this window until the
        // slot is deleted (memory_size 0) in `drop_mapping`, which happens before munmap.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| WindowError::Slot {
            slot,
            errno: e.to_string(),
        })
    }

    /// SHMEM_MAP: `len` bytes of `file` at `fd_offset` at window offset `offset`.
    pub fn map(
        &mut self,
        offset: u64,
        len: u64,
        file: Arc<File>,
        fd_offset: u64,
        writable: bool,
    ) -> Result<(), WindowError> {
        let aligned = |v: u64| v % self.page == 0;
        if len == 0 || !aligned(offset) || !aligned(len) || !aligned(fd_offset) {
            return Err(WindowError::Unaligned {
                offset,
                len,
                fd_offset,
            });
        }
        let end = self.end_of(offset, len)?;
        if let Some((o, _)) = self
            .maps
            .range(..end)
            .next_back()
            .filter(|(o, m)| **o + m.len > offset)
        {
            return Err(WindowError::Overlap {
                offset,
                len,
                existing: *o,
            });
        }
        let m = self.install(offset, len, file, fd_offset, writable)?;
        self.maps.insert(offset, m);
        Ok(())
    }

    fn end_of(&self, offset: u64, len: u64) -> Result<u64, WindowError> {
        offset
            .checked_add(len)
            .filter(|e| *e <= self.size)
            .ok_or(WindowError::OutOfWindow {
                offset,
                len,
                size: self.size,
            })
    }

    fn install(
        &mut self,
        offset: u64,
        len: u64,
        file: Arc<File>,
        fd_offset: u64,
        writable: bool,
    ) -> Result<Mapping, WindowError> {
        let mmap_err = |e: std::io::Error| WindowError::Mmap {
            len,
            fd_offset,
            errno: os_error(&e),
        };
        // Past the end of the file a guest access would fault inside KVM (EFAULT ends the
        // run on hardware KVM): refuse what the file does not hold.
        let file_len = file.metadata().map_err(mmap_err)?.len();
        if fd_offset.checked_add(len).is_none_or(|e| e > file_len) {
            return Err(WindowError::PastFile {
                fd_offset,
                len,
                file_len,
            });
        }
        let overflow = || mmap_err(std::io::Error::from_raw_os_error(libc::EOVERFLOW));
        let size = usize::try_from(len).map_err(|_| overflow())?;
        let off = libc::off_t::try_from(fd_offset).map_err(|_| overflow())?;
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a fresh shared mapping of the backend's fd, placed where the kernel likes;
        // nothing else is at that address, and it is unmapped only in `drop_mapping`.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(mmap_err(std::io::Error::last_os_error()));
        }
        let host = host as usize;
        let slot = match self.take_slot() {
            Ok(s) => s,
            Err(e) => {
                unmap_host(host, len);
                return Err(e);
            }
        };
        let mut m = Mapping {
            len,
            file,
            fd_offset,
            writable,
            host,
            slot,
            installed: false,
        };
        if let Some(base) = self.base {
            if let Err(e) = self.set_slot(slot, base + offset, len, host, writable) {
                unmap_host(host, len);
                self.free_slots.push(slot);
                return Err(e);
            }
            m.installed = true;
        }
        Ok(m)
    }

    /// Deletes the slot of the mapping at `offset` (if installed), then its pages. If KVM
    /// refuses to delete the slot the guest still reaches the pages: the mapping stays and
    /// the failure is returned (so vshmd keeps the range reserved, docs/VHOST-USER.md §5.2).
    fn drop_mapping(&mut self, offset: u64) -> Result<(), WindowError> {
        let Some(m) = self.maps.get(&offset) else {
            return Ok(());
        };
        if m.installed {
            self.set_slot(m.slot, 0, 0, 0, true)?;
        }
        if let Some(m) = self.maps.remove(&offset) {
            unmap_host(m.host, m.len);
            self.free_slots.push(m.slot);
        }
        Ok(())
    }

    /// SHMEM_UNMAP: every mapping that intersects `offset..offset+len` leaves the window; the
    /// parts of them outside the range are mapped again.
    pub fn unmap(&mut self, offset: u64, len: u64) -> Result<(), WindowError> {
        if len == 0 || offset % self.page != 0 || len % self.page != 0 {
            return Err(WindowError::Unaligned {
                offset,
                len,
                fd_offset: 0,
            });
        }
        let end = self.end_of(offset, len)?;
        let hit: Vec<u64> = self
            .maps
            .range(..end)
            .filter(|(o, m)| **o + m.len > offset)
            .map(|(o, _)| *o)
            .collect();
        for o in hit {
            let Some(m) = self.maps.get(&o) else {
                continue;
            };
            let (file, fd_offset, mlen, writable) =
                (Arc::clone(&m.file), m.fd_offset, m.len, m.writable);
            self.drop_mapping(o)?;
            if o < offset {
                self.map(o, offset - o, Arc::clone(&file), fd_offset, writable)?;
            }
            if o + mlen > end {
                self.map(end, o + mlen - end, file, fd_offset + (end - o), writable)?;
            }
        }
        Ok(())
    }

    /// Places the window at `base` (`None`: nowhere): every mapping's slot is removed and,
    /// if there is a new place, installed there. A slot that cannot be installed leaves the
    /// window unplaced (no mapping reachable) and is reported.
    pub fn place(&mut self, base: Option<u64>) -> Result<(), WindowError> {
        if base == self.base {
            return Ok(());
        }
        let offsets: Vec<u64> = self.maps.keys().copied().collect();
        for o in &offsets {
            let Some(m) = self.maps.get(o) else { continue };
            if m.installed {
                self.set_slot(m.slot, 0, 0, 0, true)?;
                if let Some(m) = self.maps.get_mut(o) {
                    m.installed = false;
                }
            }
        }
        self.base = None;
        let Some(new) = base else {
            return Ok(());
        };
        if new.checked_add(self.size).is_none() {
            return Err(WindowError::OutOfWindow {
                offset: new,
                len: self.size,
                size: u64::MAX,
            });
        }
        self.base = Some(new);
        for o in &offsets {
            let Some(m) = self.maps.get(o) else { continue };
            if let Err(e) = self.set_slot(m.slot, new + o, m.len, m.host, m.writable) {
                let _ = self.place(None);
                return Err(e);
            }
            if let Some(m) = self.maps.get_mut(o) {
                m.installed = true;
            }
        }
        Ok(())
    }

    /// Removes every mapping (the backend is gone: nothing it mapped may stay reachable).
    pub fn clear(&mut self) -> Result<(), WindowError> {
        let offsets: Vec<u64> = self.maps.keys().copied().collect();
        let mut result = Ok(());
        for o in offsets {
            if let Err(e) = self.drop_mapping(o) {
                result = Err(e);
            }
        }
        result
    }
}

fn unmap_host(host: usize, len: u64) {
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    // SAFETY: `host` is a mapping of `len` bytes this window made (its length came from a
    // usize) and no slot refers to it any more.
    unsafe { libc::munmap(host as *mut libc::c_void, len) };
}

impl Drop for Window {
    fn drop(&mut self) {
        // A mapping whose slot KVM kept stays mapped (a slot must never point at unmapped
        // memory); the VM goes away with this window anyway.
        let _ = self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn window() -> Option<(Window, Arc<File>)> {
        let kvm = kvm_ioctls::Kvm::new().ok()?;
        let vm = Arc::new(kvm.create_vm().ok()?);
        // SAFETY: a valid name; the fd is checked and then owned by the File.
        let fd = unsafe { libc::memfd_create(c"window-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(1 << 20).expect("size");
        Some((
            Window::new(vm, Some(1 << 32), 1 << 20, 1, 16),
            Arc::new(file),
        ))
    }

    #[test]
    fn mappings_must_be_page_aligned_inside_the_window_and_must_not_overlap() {
        let Some((mut w, f)) = window() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        let p = w.page;
        assert!(matches!(
            w.map(1, p, Arc::clone(&f), 0, true),
            Err(WindowError::Unaligned { .. })
        ));
        assert!(matches!(
            w.map((1 << 20) - p, 2 * p, Arc::clone(&f), 0, true),
            Err(WindowError::OutOfWindow { .. })
        ));
        assert!(matches!(
            w.map(u64::MAX - p + 1, p, Arc::clone(&f), 0, true),
            Err(WindowError::OutOfWindow { .. })
        ));
        w.map(4 * p, 4 * p, Arc::clone(&f), 0, true).expect("map");
        assert_eq!(
            w.map(7 * p, 2 * p, Arc::clone(&f), 0, true),
            Err(WindowError::Overlap {
                offset: 7 * p,
                len: 2 * p,
                existing: 4 * p
            })
        );
        w.map(8 * p, p, Arc::clone(&f), 0, false).expect("adjacent");
        assert_eq!(w.mappings(), vec![(4 * p, 4 * p, true), (8 * p, p, false)]);
    }

    #[test]
    fn unmapping_the_middle_of_a_mapping_keeps_both_ends_and_frees_slots() {
        let Some((mut w, f)) = window() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        let p = w.page;
        w.map(0, 8 * p, Arc::clone(&f), 16 * p, true).expect("map");
        w.unmap(2 * p, 2 * p).expect("unmap");
        assert_eq!(w.mappings(), vec![(0, 2 * p, true), (4 * p, 4 * p, true)]);
        assert!(matches!(
            w.unmap(p + 1, p),
            Err(WindowError::Unaligned { .. })
        ));
        w.unmap(0, 8 * p).expect("unmap all");
        assert!(w.mappings().is_empty());
        // Slots come back: more maps than the window has slots, one at a time.
        for _ in 0..40 {
            w.map(0, p, Arc::clone(&f), 0, true).expect("map again");
            w.unmap(0, p).expect("unmap again");
        }
    }

    #[test]
    fn a_window_with_no_slot_left_refuses_the_map_and_keeps_the_others() {
        let Some((mut w, f)) = window() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        let p = w.page;
        for i in 0..15 {
            w.map(i * p, p, Arc::clone(&f), 0, true).expect("map");
        }
        assert_eq!(
            w.map(15 * p, p, Arc::clone(&f), 0, true),
            Err(WindowError::NoSlot)
        );
        assert_eq!(w.mappings().len(), 15);
    }
}
