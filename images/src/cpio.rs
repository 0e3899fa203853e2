//! A writer for the "newc" cpio format the kernel unpacks as an initramfs (no compression,
//! no external `cpio` needed).

use std::io::{self, Write};

/// File types (the `S_IF*` bits of `c_mode`).
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Builds an archive in memory.
#[derive(Debug, Default)]
pub struct Archive {
    out: Vec<u8>,
    ino: u32,
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Archive {
        Archive {
            out: Vec::new(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is too large"))
        })?;
        let namesize = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name too long"))?;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0
        );
        self.ino += 1;
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.push(0);
        pad4(&mut self.out);
        self.out.write_all(data)?;
        pad4(&mut self.out);
        Ok(())
    }

    /// A directory.
    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.entry(name, S_IFDIR | 0o755, &[], (0, 0))
    }

    /// A regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (perm & 0o7777), data, (0, 0))
    }

    /// A symbolic link.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, target.as_bytes(), (0, 0))
    }

    /// A character device node.
    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | 0o600, &[], (major, minor))
    }

    /// Appends the trailer and returns the bytes.
    pub fn finish(mut self) -> io::Result<Vec<u8>> {
        self.entry("TRAILER!!!", 0, &[], (0, 0))?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_newc_headers_with_4_byte_alignment_and_a_trailer() {
        let mut a = Archive::new();
        a.dir("bin").expect("dir");
        a.file("init", 0o755, b"#!/bin/sh\n").expect("file");
        a.char_device("dev/console", 5, 1).expect("node");
        let bytes = a.finish().expect("finish");
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("init\0"));
        assert!(text.contains("#!/bin/sh\n"));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!\0"));
        // The console node carries rdev 5:1 (fields 10 and 11 of the header).
        let at = text.find("dev/console").expect("node") - 110;
        assert_eq!(&text[at + 78..at + 94], "0000000500000001");
    }
}
