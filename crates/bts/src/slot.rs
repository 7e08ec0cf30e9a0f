//! A tracing context's slot: its data and its atomic state word.
//!
//! # Lifecycle of a context slot
//!
//! Each slot has one atomic state word: a phase (`FREE`, `LIVE`, `UNLINKED`, `TEARING`), a
//! `HELD` bit, and a generation bumped at each teardown (so a lookup that raced a reuse of the
//! slot cannot unlink the new context). Whoever sets `HELD` (an operation for its duration, or a CPU for the time slice
//! the traced task runs with the DS area loaded) has the context's data to itself; a busy
//! context makes operations fail with [`Error::Busy`] instead of spinning, so nothing here
//! ever waits on a CPU that may be the current one.
//!
//! [`Bts::untrace`] only flips `LIVE` to `UNLINKED` (new lookups then fail with
//! `NoSuchContext`). A context that is `UNLINKED` and not held is dead: whoever makes it so
//! (`untrace` itself, or the last holder on release) calls [`DeferredWork::schedule`] once,
//! and [`Bts::run_deferred`] claims it (`UNLINKED` to `TEARING`, one winner) and tears it
//! down. So teardown runs exactly once, after the last reader and after the traced task left
//! the CPU.
//!
//! [`Bts::untrace`]: crate::Bts::untrace
//! [`Bts::run_deferred`]: crate::Bts::run_deferred
//! [`DeferredWork::schedule`]: crate::hal::DeferredWork::schedule

use core::sync::atomic::Ordering::*;

use crate::{
    buffer::Buffer,
    config::Flags,
    error::Error,
    sync::{AtomicU32, AtomicU64, UnsafeCell},
};

/// A context's data; touched only by whoever holds the slot.
pub(crate) struct Inner<T, M> {
    pub(crate) task: Option<T>,
    pub(crate) buffer: Option<Buffer<M>>,
    /// The hardware tracer is held (counted in `Bts::tracers`).
    pub(crate) tracer: bool,
    pub(crate) flags: Flags,
    pub(crate) signal: u32,
    /// SIGNAL mode overflowed: tracing is off until the trace is drained or cleared.
    pub(crate) paused: bool,
}

impl<T, M> Inner<T, M> {
    pub(crate) const EMPTY: Self = Self {
        task: None,
        buffer: None,
        tracer: false,
        flags: Flags(0),
        signal: 0,
        paused: false,
    };

    /// The DEBUGCTL BTS bits this context wants while its task runs.
    pub(crate) fn debugctl_bits(&self) -> u64 {
        use crate::hal::DebugCtl;
        if !self.tracer || self.paused || !self.flags.contains(Flags::TRACE) {
            return 0;
        }
        let mut bits = DebugCtl::TR | DebugCtl::BTS;
        if !self.flags.circular() {
            bits |= DebugCtl::BTINT;
        }
        if !self.flags.contains(Flags::KERNEL) || self.flags.contains(Flags::NO_KERNEL) {
            bits |= DebugCtl::BTS_OFF_OS;
        }
        if self.flags.contains(Flags::NO_USER) {
            bits |= DebugCtl::BTS_OFF_USR;
        }
        bits
    }

    pub(crate) fn traced_buffer(&mut self) -> Result<&mut Buffer<M>, Error> {
        match (&mut self.buffer, self.tracer) {
            (Some(b), true) => Ok(b),
            _ => Err(Error::NoSuchContext),
        }
    }
}

pub(crate) const PHASE: u32 = 0b11;
pub(crate) const FREE: u32 = 0;
pub(crate) const LIVE: u32 = 1;
pub(crate) const UNLINKED: u32 = 2;
pub(crate) const TEARING: u32 = 3;
pub(crate) const HELD: u32 = 0b100;
/// The rest of the word counts reuses of the slot, so a stale lookup cannot act on the
/// context that replaced the one it found.
pub(crate) const GEN_ONE: u32 = 0b1000;
pub(crate) const GEN_MASK: u32 = !(GEN_ONE - 1);

/// `pid` as stored in a slot (0 = no task).
pub(crate) const fn key(pid: u32) -> u64 {
    pid as u64 | 1 << 32
}

pub(crate) struct Slot<T, M> {
    pub(crate) state: AtomicU32,
    pub(crate) pid: AtomicU64,
    pub(crate) inner: UnsafeCell<Inner<T, M>>,
}

impl<T, M> Slot<T, M> {
    #[cfg(not(loom))]
    pub(crate) const fn new() -> Self {
        Self {
            state: AtomicU32::new(FREE),
            pid: AtomicU64::new(0),
            inner: UnsafeCell::new(Inner::EMPTY),
        }
    }
    #[cfg(loom)]
    pub(crate) fn new() -> Self {
        Self {
            state: AtomicU32::new(FREE),
            pid: AtomicU64::new(0),
            inner: UnsafeCell::new(Inner::EMPTY),
        }
    }

    /// Holds a `LIVE` slot: `Ok(true)`, `Ok(false)` if it is not live, `Err(Busy)` if held.
    pub(crate) fn try_hold(&self) -> Result<bool, Error> {
        let mut s = self.state.load(Relaxed);
        loop {
            if s & PHASE != LIVE {
                return Ok(false);
            }
            if s & HELD != 0 {
                return Err(Error::Busy);
            }
            match self
                .state
                .compare_exchange_weak(s, s | HELD, Acquire, Relaxed)
            {
                Ok(_) => return Ok(true),
                Err(now) => s = now,
            }
        }
    }

    /// Drops the hold; `true` if that made an unlinked context dead (teardown due).
    pub(crate) fn release(&self) -> bool {
        let prev = self.state.fetch_and(!HELD, Release);
        debug_assert!(prev & HELD != 0);
        prev & PHASE == UNLINKED
    }
}
