//! The control page of the `fork` step's tasks: how a ring-3 parent and its forked child tell
//! the kernel how far they got, and wait for its go-ahead, so the kernel can inspect both
//! address spaces between their steps ([`super::fork`], [`super::fork_scale`]).
//!
//! The page is a kernel frame mapped fixed and writable at [`CONTROL`] in the parent's space,
//! which the fork shares rather than copies. Its words: each side's state (positive: the last
//! step it passed; negative: the step whose data check failed), the kernel's phase, and the
//! step's own words from [`FIRST_FREE`] on. The `u_*` functions run in ring 3 (see
//! [`crate::task::ulib`]); [`Control`] is the kernel's side.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::{arch::apic, checks::Outcome, ensure, task::sched, task::ulib, task::usermode};

/// Where the tasks see the control page.
pub const CONTROL: u64 = usermode::DATA_START + (8 << 20);

/// The parent's state word.
pub const PARENT: u64 = 0;
/// The child's state word.
pub const CHILD: u64 = 1;
/// The kernel's phase word.
const PHASE: u64 = 2;
/// The first word a step may use for itself.
pub const FIRST_FREE: u64 = 3;
/// The phase that tells both tasks the kernel gave up: they exit.
const ABORT: u64 = 100;

/// Word `word` of the control page (ring 3).
pub fn ctl_get(word: u64) -> u64 {
    // SAFETY: ring 3 of a fork step's tasks, whose spaces map the control page (writable,
    // u64-aligned words).
    unsafe { ((CONTROL + word * 8) as *const u64).read_volatile() }
}

/// Sets word `word` of the control page (ring 3).
pub fn ctl_set(word: u64, value: u64) {
    // SAFETY: as in `ctl_get`.
    unsafe { ((CONTROL + word * 8) as *mut u64).write_volatile(value) }
}

/// Whether the kernel gave up (ring 3).
pub fn u_aborted() -> bool {
    ctl_get(PHASE) == ABORT
}

/// Waits (yielding) for the kernel's phase `phase`; false if it gave up (ring 3).
pub fn u_wait_phase(phase: u64) -> bool {
    loop {
        match ctl_get(PHASE) {
            ABORT => return false,
            p if p >= phase => return true,
            _ => ulib::yield_now(),
        }
    }
}

/// Records `who`'s state: `state` if `ok`, `-state` if not; returns `ok` (ring 3).
pub fn u_state(who: u64, ok: bool, state: i64) -> bool {
    ctl_set(who, if ok { state } else { -state } as u64);
    ok
}

/// The kernel's view of the control page: the frame at this physical address, through the
/// identity map.
pub struct Control(pub u64);

impl Control {
    /// Word `word`.
    pub fn word(&self, word: u64) -> &AtomicU64 {
        // SAFETY: a frame the step owns until every space mapping it is gone; u64-aligned.
        unsafe { AtomicU64::from_ptr((self.0 + word * 8) as *mut u64) }
    }

    fn state(&self, who: u64) -> i64 {
        self.word(who).load(Ordering::Acquire) as i64
    }

    /// Lets the tasks into `phase`.
    pub fn set_phase(&self, phase: u64) {
        self.word(PHASE).store(phase, Ordering::Release);
    }

    /// Tells the tasks to give up.
    pub fn abort(&self) {
        self.set_phase(ABORT);
    }

    /// Waits (a tick at a time) until both sides reach at least the given states, for up to
    /// `seconds`; fails at once when a side reports a failed data check.
    pub fn wait_states(&self, parent: i64, child: i64, seconds: u64, what: &str) -> Outcome {
        let deadline = apic::now_us() + seconds * 1_000_000;
        loop {
            let (p, ch) = (self.state(PARENT), self.state(CHILD));
            ensure!(
                p >= 0 && ch >= 0,
                "{what}: a task failed its data check (parent state {p}, child state {ch})"
            );
            if p >= parent && ch >= child {
                return Ok(());
            }
            ensure!(
                apic::now_us() < deadline,
                "{what}: timed out (parent state {p}, child state {ch})"
            );
            sched::sleep_ticks(1);
        }
    }
}
