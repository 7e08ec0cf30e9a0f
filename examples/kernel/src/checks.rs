//! The in-kernel test runner: named checks, each printed as `check NAME ... ok|FAILED: why`.

use core::fmt::{self, Write};

/// Why a check failed, formatted into a fixed buffer (the kernel has no heap).
pub struct Failure {
    buf: [u8; 160],
    len: usize,
}

impl Failure {
    /// A failure reading `args` (cut at 160 bytes).
    pub fn new(args: fmt::Arguments<'_>) -> Self {
        let mut f = Self {
            buf: [0; 160],
            len: 0,
        };
        let _ = f.write_fmt(args);
        f
    }

    fn as_str(&self) -> &str {
        // Only whole `str`s are copied in, and a cut falls back to a char boundary.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("<message not UTF-8>")
    }
}

impl Write for Failure {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - self.len;
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

/// A check's outcome.
pub type Outcome = Result<(), Failure>;

/// Fails the current check with a formatted message.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => { return Err($crate::checks::Failure::new(format_args!($($arg)*))) };
}

/// Fails the current check unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => { if !$cond { $crate::fail!($($arg)*); } };
}

/// A named check of the kernel.
pub struct Check {
    /// Its name, also a `scenario=` value that runs it alone.
    pub name: &'static str,
    /// The check itself.
    pub run: fn() -> Outcome,
}

/// Counts of a run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    /// Checks that passed.
    pub passed: usize,
    /// Checks that failed.
    pub failed: usize,
}

/// Runs `checks` in order, printing one result line each (after any detail the check prints).
pub fn run<'a>(checks: impl IntoIterator<Item = &'a Check>) -> Tally {
    let mut tally = Tally::default();
    for check in checks {
        match (check.run)() {
            Ok(()) => {
                crate::println!("check {} ... ok", check.name);
                tally.passed += 1;
            }
            Err(why) => {
                crate::println!("check {} ... FAILED: {}", check.name, why.as_str());
                tally.failed += 1;
            }
        }
    }
    tally
}
