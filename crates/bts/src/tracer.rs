//! The tracer: a fixed table of per-task tracing contexts and the ptrace-style operations on
//! them (`config`, `status`, `size`, `read`, `drain`, `clear`, `untrace`, and the deferred
//! teardown).
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

use core::{ptr::NonNull, sync::atomic::Ordering::*};

use crate::{
    error::Error,
    format::{BtsRecord, DsArea, RECORD_SIZE, Record},
    hal::{AddressSpace, DeferredWork, LockedAlloc, PAGE_SIZE, TaskRef},
    sync::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, UnsafeCell, spin_loop},
    view::TraceView,
};

/// Configuration flags (the `PTRACE_BTS_O_*` values, plus the overflow and CPL filters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Flags(pub u32);

impl Flags {
    /// Record branches.
    pub const TRACE: Flags = Flags(0x1);
    /// Record "task arrives/departs" timestamps at context switches.
    pub const SCHED: Flags = Flags(0x2);
    /// On overflow, send [`Config::signal`] to the task and stop tracing until the trace is
    /// drained or cleared, instead of wrapping around.
    pub const SIGNAL: Flags = Flags(0x4);
    /// (Re)allocate the buffer with [`Config::size`] bytes; size 0 frees it.
    pub const ALLOC: Flags = Flags(0x8);
    /// On overflow, drain the buffer into the [`RecordSink`](crate::hal::RecordSink) given to
    /// the threshold-interrupt handler, instead of wrapping around.
    pub const INTERRUPT: Flags = Flags(0x10);
    /// Do not record branches taken at CPL 0 (DEBUGCTL.BTS_OFF_OS).
    pub const NO_KERNEL: Flags = Flags(0x20);
    /// Do not record branches taken at CPL > 0 (DEBUGCTL.BTS_OFF_USR).
    pub const NO_USER: Flags = Flags(0x40);
    const ALL: u32 = 0x7f;

    /// No flag.
    pub const fn empty() -> Self {
        Flags(0)
    }
    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
    /// Whether the buffer is circular (neither `SIGNAL` nor `INTERRUPT`).
    pub const fn circular(self) -> bool {
        self.0 & (Self::SIGNAL.0 | Self::INTERRUPT.0) == 0
    }
}

impl core::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

/// What [`Bts::config`] asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Config {
    /// Buffer size in bytes with [`Flags::ALLOC`], rounded down to whole records.
    pub size: usize,
    /// Flags.
    pub flags: Flags,
    /// The overflow signal with [`Flags::SIGNAL`] (0 is invalid).
    pub signal: u32,
}

/// What [`Bts::status`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Buffer size in bytes (whole records).
    pub size: usize,
    /// The overflow signal (0 without [`Flags::SIGNAL`]).
    pub signal: u32,
    /// Size of one record in the buffer.
    pub record_size: usize,
    /// The flags in effect.
    pub flags: Flags,
}

/// The DS area sits at the start of the locked allocation; records follow it.
pub(crate) const RECORDS_OFFSET: usize = core::mem::size_of::<DsArea>();
const _: () = assert!(RECORDS_OFFSET % (core::mem::align_of::<BtsRecord>()) == 0);

/// Locked pages needed for `records` records plus the DS area, or `None` on overflow.
pub const fn pages_for(records: usize) -> Option<usize> {
    match records.checked_mul(RECORD_SIZE) {
        Some(bytes) => match bytes.checked_add(RECORDS_OFFSET + PAGE_SIZE - 1) {
            Some(total) => Some(total / PAGE_SIZE),
            None => None,
        },
        None => None,
    }
}

/// A context's locked buffer: the DS area, then `capacity` records.
pub(crate) struct Buffer<M> {
    pub(crate) ptr: NonNull<u8>,
    pub(crate) pages: usize,
    pub(crate) capacity: usize,
    /// The address space that paid (and gets the refund).
    pub(crate) payer: M,
}

impl<M> Buffer<M> {
    pub(crate) fn ds_ptr(&self) -> *mut DsArea {
        self.ptr.as_ptr().cast()
    }
    pub(crate) fn base(&self) -> u64 {
        // No overflow: the allocation holds RECORDS_OFFSET + capacity records.
        self.ptr
            .as_ptr()
            .wrapping_add(RECORDS_OFFSET)
            .expose_provenance() as u64
    }
    /// The DS area linear address for IA32_DS_AREA.
    pub(crate) fn ds_linear(&self) -> u64 {
        self.ptr.as_ptr().expose_provenance() as u64
    }
    /// Reads the DS area (untrusted contents).
    pub(crate) fn ds(&self) -> DsArea {
        // SAFETY: the allocation starts with a DS area, is aligned, and is ours while held.
        unsafe { self.ds_ptr().read_volatile() }
    }
    /// Sets `bts_index` to record `i`.
    pub(crate) fn set_index(&mut self, i: usize) {
        let at = self.base() + (i * RECORD_SIZE) as u64;
        // SAFETY: as in `ds`; the field is in bounds and aligned.
        unsafe { (&raw mut (*self.ds_ptr()).bts_index).write_volatile(at) }
    }
    /// The records, exclusively (the holder of the context owns them: no CPU has them loaded).
    pub(crate) fn records(&mut self) -> &mut [BtsRecord] {
        // SAFETY: the allocation holds `capacity` records after the DS area, aligned to 8; the
        // context holder has exclusive access (no CPU stores into it meanwhile).
        unsafe {
            core::slice::from_raw_parts_mut(
                self.ptr.as_ptr().add(RECORDS_OFFSET).cast::<BtsRecord>(),
                self.capacity,
            )
        }
    }
    pub(crate) fn view(&mut self, circular: bool) -> TraceView<'_> {
        let ds = self.ds();
        let base = self.base();
        TraceView::new(self.records(), &ds, base, circular)
    }
    /// Empties the trace: zeroes the records in use and resets the index.
    pub(crate) fn reset(&mut self, circular: bool) {
        let view = self.view(circular);
        let used = if view.wrapped() {
            self.capacity
        } else {
            view.index()
        };
        self.records()[..used].fill(BtsRecord::default());
        self.set_index(0);
    }
    /// Programs the DS area for a fresh trace.
    pub(crate) fn program(&mut self, flags: Flags) {
        let base = self.base();
        let max = base + (self.capacity * RECORD_SIZE) as u64;
        let threshold = if flags.circular() {
            // SDM: clearing BTINT is not enough, the threshold must be out of reach.
            max + RECORD_SIZE as u64
        } else {
            // Leave 1/8 (at least one record) of room for branches taken before the
            // interrupt is serviced.
            let slack = (self.capacity / 8).max(1).min(self.capacity - 1);
            base + ((self.capacity - slack) * RECORD_SIZE) as u64
        };
        let ds = DsArea {
            bts_buffer_base: base,
            bts_index: base,
            bts_absolute_maximum: max,
            bts_interrupt_threshold: threshold,
            ..DsArea::default()
        };
        // SAFETY: as in `ds`.
        unsafe { self.ds_ptr().write_volatile(ds) };
        self.records().fill(BtsRecord::default());
    }
    /// Stores a software record as the processor would (advance; wrap if circular; dropped
    /// if the buffer is full in interrupt mode). Returns whether it was stored.
    pub(crate) fn push(&mut self, record: BtsRecord, circular: bool) -> bool {
        let ds = self.ds();
        let mut i = crate::view::clamp_index(&ds, self.base(), self.capacity);
        if i == self.capacity {
            if !circular {
                return false;
            }
            i = 0;
        }
        self.records()[i] = record;
        i += 1;
        if i == self.capacity && circular {
            i = 0;
        }
        self.set_index(i);
        true
    }
}

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
    const EMPTY: Self = Self {
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
        if self.flags.contains(Flags::NO_KERNEL) {
            bits |= DebugCtl::BTS_OFF_OS;
        }
        if self.flags.contains(Flags::NO_USER) {
            bits |= DebugCtl::BTS_OFF_USR;
        }
        bits
    }

    fn traced_buffer(&mut self) -> Result<&mut Buffer<M>, Error> {
        match (&mut self.buffer, self.tracer) {
            (Some(b), true) => Ok(b),
            _ => Err(Error::NoSuchContext),
        }
    }
}

const PHASE: u32 = 0b11;
const FREE: u32 = 0;
const LIVE: u32 = 1;
const UNLINKED: u32 = 2;
const TEARING: u32 = 3;
const HELD: u32 = 0b100;
/// The rest of the word counts reuses of the slot, so a stale lookup cannot act on the
/// context that replaced the one it found.
const GEN_ONE: u32 = 0b1000;
const GEN_MASK: u32 = !(GEN_ONE - 1);

/// `pid` as stored in a slot (0 = no task).
const fn key(pid: u32) -> u64 {
    pid as u64 | 1 << 32
}

pub(crate) struct Slot<T, M> {
    state: AtomicU32,
    pid: AtomicU64,
    pub(crate) inner: UnsafeCell<Inner<T, M>>,
}

impl<T, M> Slot<T, M> {
    #[cfg(not(loom))]
    const fn new() -> Self {
        Self {
            state: AtomicU32::new(FREE),
            pid: AtomicU64::new(0),
            inner: UnsafeCell::new(Inner::EMPTY),
        }
    }
    #[cfg(loom)]
    fn new() -> Self {
        Self {
            state: AtomicU32::new(FREE),
            pid: AtomicU64::new(0),
            inner: UnsafeCell::new(Inner::EMPTY),
        }
    }

    /// Holds a `LIVE` slot: `Ok(true)`, `Ok(false)` if it is not live, `Err(Busy)` if held.
    fn try_hold(&self) -> Result<bool, Error> {
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
    fn release(&self) -> bool {
        let prev = self.state.fetch_and(!HELD, Release);
        debug_assert!(prev & HELD != 0);
        prev & PHASE == UNLINKED
    }
}

/// The per-task branch tracer: up to `N` tracing contexts.
///
/// - `T`: the kernel's counted task handle ([`TaskRef`]);
/// - `M`: its counted address-space handle ([`AddressSpace`]) that pays for locked buffers;
/// - `A`: the locked-page allocator ([`LockedAlloc`]);
/// - `W`: the deferred-work queue that runs [`Bts::run_deferred`] ([`DeferredWork`]).
///
/// Put it in a `static` (all operations take `&self`). Dropping it tears down the contexts no
/// CPU holds; one still loaded on a CPU (never switched out) is leaked rather than freed under
/// the CPU's feet.
pub struct Bts<T: TaskRef, M: AddressSpace, A: LockedAlloc, W: DeferredWork, const N: usize> {
    pub(crate) slots: [Slot<T, M>; N],
    /// Serializes context creation in `config` (so a task never gets two contexts).
    create_lock: AtomicBool,
    /// Live + dying contexts (a fast path for the context-switch hook).
    pub(crate) contexts: AtomicUsize,
    /// Hardware tracers: per-task count in the low 16 bits, per-CPU count above.
    tracers: AtomicU32,
    pub(crate) alloc: A,
    pub(crate) work: W,
}

// SAFETY: a slot's `Inner` (holding `T`s, `M`s and buffer pointers) is only touched by the one
// party holding the slot, which may be any thread: so `T` and `M` must be `Send`. `A` and `W`
// are shared by all threads through `&self`.
unsafe impl<T, M, A, W, const N: usize> Sync for Bts<T, M, A, W, N>
where
    T: TaskRef + Send,
    M: AddressSpace + Send,
    A: LockedAlloc + Sync,
    W: DeferredWork + Sync,
{
}
// SAFETY: as above; moving the whole tracer moves its `T`s, `M`s and buffers with it.
unsafe impl<T, M, A, W, const N: usize> Send for Bts<T, M, A, W, N>
where
    T: TaskRef + Send,
    M: AddressSpace + Send,
    A: LockedAlloc + Send,
    W: DeferredWork + Send,
{
}

const PER_CPU: u32 = 1 << 16;

/// A per-CPU branch tracing claim from [`Bts::claim_cpu_tracing`]; dropping it releases it.
#[derive(Debug)]
pub struct CpuTracingClaim<'a> {
    tracers: &'a AtomicU32,
}

impl Drop for CpuTracingClaim<'_> {
    fn drop(&mut self) {
        self.tracers.fetch_sub(PER_CPU, Release);
    }
}

impl<T, M, A, W, const N: usize> Bts<T, M, A, W, N>
where
    T: TaskRef,
    M: AddressSpace,
    A: LockedAlloc,
    W: DeferredWork,
{
    /// An empty tracer allocating from `alloc` and deferring teardown to `work`.
    #[cfg(not(loom))]
    pub const fn new(alloc: A, work: W) -> Self {
        Self {
            slots: [const { Slot::new() }; N],
            create_lock: AtomicBool::new(false),
            contexts: AtomicUsize::new(0),
            tracers: AtomicU32::new(0),
            alloc,
            work,
        }
    }

    /// An empty tracer allocating from `alloc` and deferring teardown to `work`.
    #[cfg(loom)]
    pub fn new(alloc: A, work: W) -> Self {
        Self {
            slots: core::array::from_fn(|_| Slot::new()),
            create_lock: AtomicBool::new(false),
            contexts: AtomicUsize::new(0),
            tracers: AtomicU32::new(0),
            alloc,
            work,
        }
    }

    /// The allocator.
    pub fn allocator(&self) -> &A {
        &self.alloc
    }

    /// Finds and holds the live context of `pid`. `Ok(None)` if there is none.
    pub(crate) fn hold(&self, pid: u32) -> Result<Option<usize>, Error> {
        let k = key(pid);
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.pid.load(Acquire) != k {
                continue;
            }
            match slot.try_hold() {
                Ok(true) => {
                    // The slot may have been torn down and reused between the two loads.
                    if slot.pid.load(Relaxed) == k {
                        return Ok(Some(i));
                    }
                    self.release(i);
                }
                Ok(false) => {}
                // Busy, unless the slot went to another task meanwhile: then keep looking.
                Err(e) if slot.pid.load(Relaxed) == k => return Err(e),
                Err(_) => {}
            }
        }
        Ok(None)
    }

    /// Releases a slot held by `hold`, scheduling the teardown if it died meanwhile.
    pub(crate) fn release(&self, i: usize) {
        if self.slots[i].release() {
            self.work.schedule();
        }
    }

    /// Runs `f` on the held context of `task`.
    fn with_context<R>(
        &self,
        pid: u32,
        f: impl FnOnce(&mut Inner<T, M>) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let i = self.hold(pid)?.ok_or(Error::NoSuchContext)?;
        // SAFETY: we hold slot `i`.
        let r = unsafe { self.slots[i].inner.with_mut(f) };
        self.release(i);
        r
    }

    /// Configures branch tracing of `task` (`PTRACE_BTS_CONFIG`), creating its context on
    /// first use. `tracer_space` is the address space of the tracer, which pays for a buffer
    /// allocated with [`Flags::ALLOC`].
    ///
    /// Reconfiguring releases the old hardware tracer first and starts an empty trace.
    pub fn config(&self, task: &T, tracer_space: &M, cfg: Config) -> Result<(), Error> {
        if cfg.flags.0 & !Flags::ALL != 0 {
            return Err(Error::InvalidArgument);
        }
        let i = self.hold_or_create(task)?;
        // SAFETY: we hold slot `i`.
        let r = unsafe {
            self.slots[i]
                .inner
                .with_mut(|c| self.configure(c, tracer_space, cfg))
        };
        self.release(i);
        r
    }

    fn hold_or_create(&self, task: &T) -> Result<usize, Error> {
        while self
            .create_lock
            .compare_exchange_weak(false, true, Acquire, Relaxed)
            .is_err()
        {
            spin_loop();
        }
        let r = self.hold(task.pid()).and_then(|held| match held {
            Some(i) => Ok(i),
            None => self.create(task),
        });
        self.create_lock.store(false, Release);
        r
    }

    fn create(&self, task: &T) -> Result<usize, Error> {
        for (i, slot) in self.slots.iter().enumerate() {
            let s = slot.state.load(Relaxed);
            if s & (PHASE | HELD) == FREE
                && slot
                    .state
                    .compare_exchange(s, s | LIVE | HELD, Acquire, Relaxed)
                    .is_ok()
            {
                // SAFETY: we hold the slot, just created.
                unsafe { slot.inner.with_mut(|c| c.task = Some(task.clone())) };
                slot.pid.store(key(task.pid()), Release);
                self.contexts.fetch_add(1, Relaxed);
                return Ok(i);
            }
        }
        Err(Error::NoMemory)
    }

    fn configure(&self, c: &mut Inner<T, M>, space: &M, cfg: Config) -> Result<(), Error> {
        if cfg.flags.contains(Flags::SIGNAL) && cfg.signal == 0 {
            return Err(Error::InvalidArgument);
        }
        self.release_tracer(c);
        c.flags = Flags::empty();
        c.signal = 0;
        c.paused = false;

        let capacity = cfg.size / RECORD_SIZE;
        let current = c.buffer.as_ref().map_or(0, |b| b.capacity);
        if cfg.flags.contains(Flags::ALLOC) && capacity != current {
            self.free_buffer(c);
            if capacity == 0 {
                return Ok(());
            }
            c.buffer = Some(self.alloc_buffer(space, capacity)?);
        }
        let Some(buffer) = c.buffer.as_mut() else {
            return Err(Error::InvalidArgument);
        };
        // Request the hardware tracer: per-task tracing conflicts with per-CPU tracing.
        if self
            .tracers
            .fetch_update(AcqRel, Relaxed, |t| (t < PER_CPU).then_some(t + 1))
            .is_err()
        {
            self.free_buffer(c);
            return Err(Error::PermissionDenied);
        }
        buffer.program(cfg.flags);
        c.tracer = true;
        c.flags = Flags(cfg.flags.0 & !Flags::ALLOC.0);
        if cfg.flags.contains(Flags::SIGNAL) {
            c.signal = cfg.signal;
        }
        Ok(())
    }

    fn alloc_buffer(&self, space: &M, capacity: usize) -> Result<Buffer<M>, Error> {
        let pages = pages_for(capacity).ok_or(Error::NoMemory)?;
        if !space.charge_locked(pages) {
            return Err(Error::NoMemory);
        }
        let Some(ptr) = self.alloc.alloc_pages(pages) else {
            space.refund_locked(pages);
            return Err(Error::NoMemory);
        };
        Ok(Buffer {
            ptr,
            pages,
            capacity,
            payer: space.clone(),
        })
    }

    fn release_tracer(&self, c: &mut Inner<T, M>) {
        if core::mem::take(&mut c.tracer) {
            self.tracers.fetch_sub(1, Release);
        }
    }

    fn free_buffer(&self, c: &mut Inner<T, M>) {
        if let Some(b) = c.buffer.take() {
            // SAFETY: `b.ptr` came from `alloc_pages(b.pages)`; the context is held (no CPU
            // has it loaded) or being torn down, so nothing uses it any more.
            unsafe { self.alloc.free_pages(b.ptr, b.pages) };
            b.payer.refund_locked(b.pages);
            // `b.payer` drops here: the reference on the paying space is put.
        }
    }

    /// The configuration of `task`'s trace (`PTRACE_BTS_STATUS`).
    pub fn status(&self, task: &T) -> Result<Status, Error> {
        self.with_context(task.pid(), |c| {
            let capacity = c.traced_buffer()?.capacity;
            Ok(Status {
                size: capacity * RECORD_SIZE,
                signal: c.signal,
                record_size: RECORD_SIZE,
                flags: c.flags,
            })
        })
    }

    /// The number of records in `task`'s trace (`PTRACE_BTS_SIZE`).
    pub fn size(&self, task: &T) -> Result<usize, Error> {
        self.with_context(task.pid(), |c| {
            let circular = c.flags.circular();
            Ok(c.traced_buffer()?.view(circular).len())
        })
    }

    /// The `index`th newest record (0 = newest) of `task`'s trace (`PTRACE_BTS_GET`).
    pub fn read(&self, task: &T, index: usize) -> Result<Record, Error> {
        self.with_context(task.pid(), |c| {
            let circular = c.flags.circular();
            c.traced_buffer()?
                .view(circular)
                .newest(index)
                .ok_or(Error::InvalidArgument)
        })
    }

    /// Copies `task`'s trace into `out`, oldest first, then empties it (`PTRACE_BTS_DRAIN`).
    /// Returns the number of records; `InvalidArgument` (nothing copied) if `out` is too small.
    pub fn drain(&self, task: &T, out: &mut [Record]) -> Result<usize, Error> {
        self.with_context(task.pid(), |c| {
            let circular = c.flags.circular();
            let buffer = c.traced_buffer()?;
            let view = buffer.view(circular);
            let n = view.len();
            let out = out.get_mut(..n).ok_or(Error::InvalidArgument)?;
            let (a, b) = view.as_slices();
            for (o, r) in out.iter_mut().zip(a.iter().chain(b)) {
                *o = Record::decode(r);
            }
            buffer.reset(circular);
            c.paused = false;
            Ok(n)
        })
    }

    /// Empties `task`'s trace (`PTRACE_BTS_CLEAR`).
    pub fn clear(&self, task: &T) -> Result<(), Error> {
        self.with_context(task.pid(), |c| {
            let circular = c.flags.circular();
            c.traced_buffer()?.reset(circular);
            c.paused = false;
            Ok(())
        })
    }

    /// Detaches `task`'s context (`__ptrace_unlink`). Callable with interrupts disabled: it
    /// only unlinks the context (later operations get `NoSuchContext`) and, unless an
    /// operation or a CPU still holds it (then the last one does), schedules the teardown on
    /// the [`DeferredWork`] queue. `NoSuchContext` if the task had none.
    pub fn untrace(&self, task: &T) -> Result<(), Error> {
        let k = key(task.pid());
        for slot in &self.slots {
            if slot.pid.load(Acquire) != k {
                continue;
            }
            let mut s = slot.state.load(Acquire);
            while s & PHASE == LIVE {
                // Still the context we found by name? (The generation in `s` pins it.)
                if slot.pid.load(Acquire) != k {
                    break;
                }
                match slot
                    .state
                    .compare_exchange_weak(s, (s & !PHASE) | UNLINKED, AcqRel, Acquire)
                {
                    Ok(_) => {
                        // Unlinked: nobody can hold it again. Its name stays until the
                        // teardown (lookups skip slots that are not live).
                        if s & HELD == 0 {
                            self.work.schedule();
                        }
                        return Ok(());
                    }
                    Err(now) => s = now,
                }
            }
        }
        Err(Error::NoSuchContext)
    }

    /// The deferred teardown (the work function): tears down every dead context. Runs with
    /// interrupts enabled, from the [`DeferredWork`] queue (running it more often is harmless).
    /// Each context is torn down exactly once: the hardware tracer is released, the task
    /// reference dropped, the buffer freed and its locked pages refunded to the address space
    /// that paid. Returns how many were torn down.
    pub fn run_deferred(&self) -> usize {
        let mut done = 0;
        for slot in &self.slots {
            let s = slot.state.load(Relaxed);
            if s & (PHASE | HELD) != UNLINKED
                || slot
                    .state
                    .compare_exchange(s, (s & GEN_MASK) | TEARING, Acquire, Relaxed)
                    .is_err()
            {
                continue;
            }
            // SAFETY: TEARING is ours alone: not held, and unlinked so nobody can hold it.
            let task = unsafe {
                slot.inner.with_mut(|c| {
                    self.release_tracer(c);
                    self.free_buffer(c);
                    c.flags = Flags::empty();
                    c.signal = 0;
                    c.paused = false;
                    c.task.take()
                })
            };
            slot.pid.store(0, Relaxed);
            slot.state
                .store((s & GEN_MASK).wrapping_add(GEN_ONE) | FREE, Release);
            self.contexts.fetch_sub(1, Relaxed);
            drop(task);
            done += 1;
        }
        done
    }

    /// Whether `task` has a live (not untraced) context.
    pub fn is_traced(&self, task: &T) -> bool {
        let k = key(task.pid());
        self.slots
            .iter()
            .any(|s| s.pid.load(Acquire) == k && s.state.load(Acquire) & PHASE == LIVE)
    }

    /// Contexts not yet torn down (live, or untraced and waiting for [`run_deferred`]).
    ///
    /// [`run_deferred`]: Bts::run_deferred
    pub fn contexts(&self) -> usize {
        self.contexts.load(Relaxed)
    }

    /// Claims per-CPU branch tracing (for the kernel's own CPU-wide tracer). Fails with
    /// `PermissionDenied` while any per-task hardware tracer exists; while the claim lives,
    /// [`config`](Bts::config) fails the same way (tasks migrate, so per-task tracing would
    /// conflict on some CPU).
    pub fn claim_cpu_tracing(&self) -> Result<CpuTracingClaim<'_>, Error> {
        self.tracers
            .fetch_update(AcqRel, Relaxed, |t| {
                (t & (PER_CPU - 1) == 0).then_some(t + PER_CPU)
            })
            .map_err(|_| Error::PermissionDenied)?;
        Ok(CpuTracingClaim {
            tracers: &self.tracers,
        })
    }
}

impl<T, M, A, W, const N: usize> Drop for Bts<T, M, A, W, N>
where
    T: TaskRef,
    M: AddressSpace,
    A: LockedAlloc,
    W: DeferredWork,
{
    fn drop(&mut self) {
        for slot in &self.slots {
            let s = slot.state.load(Acquire);
            if s & PHASE == FREE || s & HELD != 0 {
                continue;
            }
            // SAFETY: `&mut self`: no operation runs, and no CPU holds the slot (not HELD).
            unsafe {
                slot.inner.with_mut(|c| {
                    self.release_tracer(c);
                    self.free_buffer(c);
                    c.task = None;
                })
            };
        }
    }
}
