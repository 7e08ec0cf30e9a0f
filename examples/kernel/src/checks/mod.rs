//! The in-kernel test runner: named checks, each printed as `check NAME ... ok|FAILED: why`;
//! `sched` and `user` hold the checks of the scheduler and of ring 3.

pub mod sched;
pub mod user;

use core::fmt;

use crate::text::Text;

/// Why a check failed (cut at 160 bytes).
pub type Failure = Text<160>;

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
    figures: Text<160>,
}

/// Key figures of the check running now, and the rows of those that ran.
struct Table {
    current: Option<Text<160>>,
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
    TABLE.lock().current = Some(Text::new(args));
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
            .unwrap_or_else(|| Text::new(format_args!("")));
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
