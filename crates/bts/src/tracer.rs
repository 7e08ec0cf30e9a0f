//! The tracer: a fixed table of per-task tracing contexts and the ptrace-style operations on
//! them (`config`, `status`, `size`, `read`, `drain`, `clear`, `untrace`, and the deferred
//! teardown). The slot lifecycle they follow is described in `slot.rs`.

use core::sync::atomic::Ordering::*;

use crate::{
    buffer::{Buffer, pages_for},
    config::{Config, Flags, Status},
    error::Error,
    format::{RECORD_SIZE, Record},
    hal::{AddressSpace, DeferredWork, LockedAlloc, TaskRef},
    slot::{FREE, GEN_MASK, GEN_ONE, HELD, Inner, LIVE, PHASE, Slot, TEARING, UNLINKED, key},
    sync::{AtomicBool, AtomicU32, AtomicUsize, spin_loop},
};

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
    /// This tracer's identity for the [`BtsCpu`](crate::BtsCpu)s it binds (0 = not yet
    /// given; a process-wide counter, not the address, so moving the tracer keeps it).
    id: core::sync::atomic::AtomicUsize,
}

/// The next tracer identity (not loom's: identities are not part of any model).
static NEXT_ID: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(1);

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
            id: core::sync::atomic::AtomicUsize::new(0),
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
            id: core::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The allocator.
    pub fn allocator(&self) -> &A {
        &self.alloc
    }

    /// This tracer's identity, given on first use.
    pub(crate) fn id(&self) -> usize {
        use core::sync::atomic::Ordering::Relaxed;
        let id = self.id.load(Relaxed);
        if id != 0 {
            return id;
        }
        let fresh = NEXT_ID.fetch_add(1, Relaxed);
        match self.id.compare_exchange(0, fresh, Relaxed, Relaxed) {
            Ok(_) => fresh,
            Err(other) => other,
        }
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
        if cfg.flags.contains(Flags::SIGNAL) && cfg.signal == 0
            || cfg.flags.contains(Flags::KERNEL | Flags::NO_KERNEL)
        {
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
