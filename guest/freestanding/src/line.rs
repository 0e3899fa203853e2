//! One output line, built without `core::fmt` (small, and few instructions: each one costs
//! about a microsecond on these VMs). Every line starts `vshm-guest: `.

/// The prefix of every line the guest prints.
pub const PREFIX: &str = "vshm-guest: ";

const CAP: usize = 400;

/// A line being built; text past its capacity is dropped (and the line ends with `...`).
#[derive(Debug)]
pub struct Line {
    buf: [u8; CAP],
    len: usize,
    truncated: bool,
}

impl Default for Line {
    fn default() -> Self {
        Line::new()
    }
}

impl Line {
    /// A line holding just the prefix.
    pub fn new() -> Line {
        let mut l = Line {
            buf: [0; CAP],
            len: 0,
            truncated: false,
        };
        l.s(PREFIX);
        l
    }

    /// Appends raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Line {
        // Room for the `...\n` a truncated line ends with.
        let room = CAP - 4 - self.len;
        let n = b.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
        if n < b.len() {
            self.truncated = true;
        }
        self
    }

    /// Appends text.
    pub fn s(&mut self, s: &str) -> &mut Line {
        self.bytes(s.as_bytes())
    }

    /// Appends a number in decimal.
    pub fn dec(&mut self, mut v: u64) -> &mut Line {
        let mut d = [0u8; 20];
        let mut i = d.len();
        loop {
            i -= 1;
            d[i] = b'0' + (v % 10).to_le_bytes()[0];
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.bytes(&d[i..])
    }

    /// Appends `0x` and the number in lower-case hex, at least `width` digits.
    pub fn hex_w(&mut self, v: u64, width: usize) -> &mut Line {
        let mut d = [0u8; 16];
        let mut i = d.len();
        let mut rest = v;
        while i > 0 && (rest != 0 || d.len() - i < width.max(1)) {
            i -= 1;
            d[i] = HEX[usize::from((rest & 0xF).to_le_bytes()[0])];
            rest >>= 4;
        }
        self.s("0x");
        self.bytes(&d[i..])
    }

    /// Appends `0x` and the number in lower-case hex.
    pub fn hex(&mut self, v: u64) -> &mut Line {
        self.hex_w(v, 1)
    }

    /// Appends a 32-bit value as `0x%08x` (how statuses are printed).
    pub fn hex32(&mut self, v: u32) -> &mut Line {
        self.hex_w(u64::from(v), 8)
    }

    /// Appends one byte as two hex digits, no prefix.
    pub fn byte(&mut self, b: u8) -> &mut Line {
        self.bytes(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xF)]])
    }

    /// The finished line, `\n`-terminated.
    pub fn finish(&mut self) -> &[u8] {
        if self.truncated {
            self.buf[self.len..self.len + 3].copy_from_slice(b"...");
            self.len += 3;
        }
        self.buf[self.len] = b'\n';
        &self.buf[..=self.len]
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::*;

    fn text(l: &mut Line) -> std::string::String {
        std::string::String::from_utf8(l.finish().to_vec()).expect("ascii")
    }

    #[test]
    fn numbers_print_as_the_lines_promise() {
        let mut l = Line::new();
        l.s("create demo status=")
            .hex32(0)
            .s(" window=")
            .hex(0)
            .s(" size=")
            .dec(4096)
            .s(" big=")
            .dec(u64::MAX)
            .s(" st=")
            .hex32(0xC000_0034)
            .s(" h=")
            .hex(0x1_0000_0000)
            .s(" b=")
            .byte(0x0A)
            .byte(0xFF);
        assert_eq!(
            text(&mut l),
            "vshm-guest: create demo status=0x00000000 window=0x0 size=4096 \
             big=18446744073709551615 st=0xc0000034 h=0x100000000 b=0aff\n"
        );
    }

    #[test]
    fn an_overlong_line_is_cut_and_says_so() {
        let mut l = Line::new();
        for _ in 0..100 {
            l.s("0123456789");
        }
        let t = text(&mut l);
        assert_eq!(t.len(), CAP);
        assert!(t.ends_with("...\n"), "{t}");
    }
}
