//! Formatted text in a fixed buffer, for a kernel without a heap: check failures, table
//! figures and trace events.

use core::fmt::{self, Write};

/// Up to `N` bytes of formatted UTF-8 text; longer text is cut at a character boundary.
pub struct Text<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Text<N> {
    /// `args` formatted (cut at `N` bytes).
    pub fn new(args: fmt::Arguments<'_>) -> Self {
        let mut text = Self {
            buf: [0; N],
            len: 0,
        };
        let _ = text.write_fmt(args);
        text
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only whole `str`s are copied in, and a cut falls back to a char boundary.
        core::str::from_utf8(self.as_bytes()).unwrap_or("<text not UTF-8>")
    }

    /// The text's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> Write for Text<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut take = s.len().min(N - self.len);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}
