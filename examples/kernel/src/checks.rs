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

/// Most rows of the closing table.
const MAX_ROWS: usize = 48;

/// One row of the closing table: a check, its result and its key figures.
struct Row {
    name: &'static str,
    passed: bool,
    figures: Failure,
}

/// Key figures of the check running now, and the rows of those that ran.
struct Table {
    current: Option<Failure>,
    rows: [Option<Row>; MAX_ROWS],
    len: usize,
}

static TABLE: crate::spin::SpinLock<Table> = crate::spin::SpinLock::new(Table {
    current: None,
    rows: [const { None }; MAX_ROWS],
    len: 0,
});

/// Sets the key figures of the running check, shown in the closing table
/// (`checks::figures(format_args!("{n} PTEs, {b} batches"))`); the last call wins.
pub fn figures(args: fmt::Arguments<'_>) {
    TABLE.lock().current = Some(Failure::new(args));
}

/// Whether a check named `name` already ran in this boot (passed or not).
pub fn ran(name: &str) -> bool {
    TABLE
        .lock()
        .rows
        .iter()
        .flatten()
        .any(|row| row.name == name)
}

/// Runs `checks` in order, printing one result line each (after any detail the check prints),
/// then the table of results and key figures.
pub fn run<'a>(checks: impl IntoIterator<Item = &'a Check>) -> Tally {
    let mut tally = Tally::default();
    for check in checks {
        TABLE.lock().current = None;
        let outcome = (check.run)();
        match &outcome {
            Ok(()) => {
                crate::println!("check {} ... ok", check.name);
                tally.passed += 1;
            }
            Err(why) => {
                crate::println!("check {} ... FAILED: {}", check.name, why.as_str());
                tally.failed += 1;
            }
        }
        let mut table = TABLE.lock();
        let figures = table
            .current
            .take()
            .unwrap_or_else(|| Failure::new(format_args!("")));
        let len = table.len;
        if len < MAX_ROWS {
            table.rows[len] = Some(Row {
                name: check.name,
                passed: outcome.is_ok(),
                figures,
            });
            table.len += 1;
        }
    }
    print_table();
    tally
}

/// Prints the closing table: step, result, key figures.
fn print_table() {
    let table = TABLE.lock();
    let width = table
        .rows
        .iter()
        .flatten()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    crate::println!("\n{:<width$}  result  key figures", "step");
    for row in table.rows.iter().flatten() {
        let result = if row.passed { "ok" } else { "FAILED" };
        crate::println!(
            "{:<width$}  {result:<6}  {}",
            row.name,
            row.figures.as_str()
        );
    }
    crate::println!();
}
