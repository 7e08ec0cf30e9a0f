//! The per-CPU ring buffer: construction, the writer API, the reader API, counters and reset.

use core::{marker::PhantomData, ptr::NonNull};

use crate::{
    cpu::{CpuBuffer, MAX_PAGES, PageDesc, Slot},
    error::Error,
    format::{self, MAX_SUBBUF_ORDER, PAGE_SIZE},
    hal::{Clock, LocalCpu, NoWaiter, PageAlloc, Waiter},
    mem::{PageArray, SubbufMem, order_for},
    reader::Reader,
    sync::{AtomicU32, AtomicU64, Ordering},
};

/// What the writer does when the ring is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Flight recorder: the writer pushes the head and overwrites the oldest sub-buffer; its
    /// events count as `overrun` (Linux's default, `options/overwrite` = 1).
    #[default]
    Overwrite,
    /// New events are dropped and counted in `dropped` until the reader makes room.
    ProducerConsumer,
}

/// Geometry and mode of a [`RingBuffer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Number of CPUs (one buffer each).
    pub cpus: usize,
    /// Sub-buffers in each CPU's ring, the reader sub-buffer not included (at least 2).
    pub subbufs_per_cpu: usize,
    /// Sub-buffer size is `PAGE_SIZE << subbuf_order` (4 KiB to 1 MiB).
    pub subbuf_order: u32,
    /// Overwrite or producer/consumer.
    pub mode: Mode,
}

impl Config {
    /// `cpus` CPUs with `subbufs_per_cpu` 4 KiB sub-buffers each, overwrite mode.
    pub const fn new(cpus: usize, subbufs_per_cpu: usize) -> Self {
        Self {
            cpus,
            subbufs_per_cpu,
            subbuf_order: 0,
            mode: Mode::Overwrite,
        }
    }

    /// Sets the sub-buffer order.
    pub const fn subbuf_order(mut self, order: u32) -> Self {
        self.subbuf_order = order;
        self
    }

    /// Sets the mode.
    pub const fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// The 4 KiB pages [`RingBuffer::new`] takes from its [`PageAlloc`] for this
    /// configuration, all allocations rounded up to their power-of-two order as the
    /// allocator sees them: per CPU `subbufs_per_cpu + 1` sub-buffers and their bookkeeping
    /// array, plus the per-CPU array. Size a `sim::PagePool` with it (add one page per CPU
    /// you will map, and one sub-buffer per `read_page` spare). Const: usable in a `static`'s
    /// type.
    pub const fn pages_needed(&self) -> usize {
        let subbufs = self.subbufs_per_cpu + 1;
        let per_cpu = (subbufs << self.subbuf_order)
            + (1 << order_for(subbufs * core::mem::size_of::<PageDesc>()));
        (1 << order_for(self.cpus * core::mem::size_of::<CpuBuffer>())) + self.cpus * per_cpu
    }
}

/// Counters of one CPU buffer (Linux's `per_cpu/cpuN/stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Events committed.
    pub entries: u64,
    /// Events lost because the writer overwrote their sub-buffer.
    pub overrun: u64,
    /// Events the writer dropped (producer/consumer mode full, or a nested writer that found
    /// the ring wrapped onto uncommitted data).
    pub dropped: u64,
    /// Events consumed by readers.
    pub read: u64,
}

impl Stats {
    /// Events in the buffer not read yet: `entries - overrun - read`.
    pub fn unread(&self) -> u64 {
        self.entries
            .wrapping_sub(self.overrun)
            .wrapping_sub(self.read)
    }
}

/// A per-CPU lockless ring buffer of timestamped events in Linux's format.
///
/// Writers use `&self` from any context of their own CPU (see [`LocalCpu`]); readers take a
/// per-CPU reader lock that writers never touch.
pub struct RingBuffer<A: PageAlloc, C: Clock, W: Waiter = NoWaiter> {
    pub(crate) alloc: A,
    clock: C,
    waiter: W,
    pub(crate) cpus: PageArray<CpuBuffer>,
    pub(crate) subbuf_order: u32,
    record_disabled: AtomicU32,
    buffer_percent: AtomicU32,
    _pin: PhantomData<AtomicU64>,
}

impl<A: PageAlloc, C: Clock> RingBuffer<A, C, NoWaiter> {
    /// Allocates every sub-buffer from `alloc`.
    ///
    /// Context: Task context at set-up; allocates `config.pages_needed()` pages from `alloc`; no spinning.
    pub fn new(config: Config, alloc: A, clock: C) -> Result<Self, Error> {
        Self::with_waiter(config, alloc, clock, NoWaiter)
    }
}

impl<A: PageAlloc, C: Clock, W: Waiter> RingBuffer<A, C, W> {
    /// Like [`RingBuffer::new`], with a [`Waiter`] woken at the `buffer_percent` fill level
    /// (50% by default, Linux's default).
    ///
    /// Context: Task context at set-up; allocates like [`RingBuffer::new`]; no spinning.
    pub fn with_waiter(config: Config, alloc: A, clock: C, waiter: W) -> Result<Self, Error> {
        if config.cpus == 0
            || config.subbufs_per_cpu < 2
            || config.subbufs_per_cpu >= MAX_PAGES - 1
            || config.subbuf_order > MAX_SUBBUF_ORDER
        {
            return Err(Error::InvalidArgument);
        }
        let subbuf_size = PAGE_SIZE << config.subbuf_order;
        let overwrite = config.mode == Mode::Overwrite;
        let order = config.subbuf_order;
        let cpus = PageArray::new(
            &alloc,
            config.cpus,
            |cpu| {
                let pages = alloc_subbufs(&alloc, config.subbufs_per_cpu + 1, order)?;
                Ok(CpuBuffer::new(cpu, pages, subbuf_size, overwrite))
            },
            |cb: &CpuBuffer| {
                // SAFETY: only called on failure, for a CPU buffer made above from
                // `alloc_subbufs(&alloc, .., order)` that nothing else holds; `CpuBuffer` has
                // no drop glue that frees its pages, so this bitwise copy is their only owner.
                unsafe { free_subbufs(&alloc, core::ptr::read(cb.pages()), order) };
            },
        )?;
        Ok(Self {
            alloc,
            clock,
            waiter,
            cpus,
            subbuf_order: config.subbuf_order,
            record_disabled: AtomicU32::new(0),
            buffer_percent: AtomicU32::new(50),
            _pin: PhantomData,
        })
    }

    /// Number of CPUs.
    pub fn cpus(&self) -> usize {
        self.cpus.len()
    }

    /// Size of a sub-buffer, header included.
    pub fn subbuf_size(&self) -> usize {
        PAGE_SIZE << self.subbuf_order
    }

    /// Largest payload one event takes.
    pub fn max_payload(&self) -> usize {
        format::max_payload(self.subbuf_size())
    }

    /// The clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// The page allocator.
    pub fn allocator(&self) -> &A {
        &self.alloc
    }

    pub(crate) fn cpu(&self, cpu: usize) -> Result<&CpuBuffer, Error> {
        self.cpus.get(cpu).ok_or(Error::InvalidArgument)
    }

    /// Switches between overwrite and producer/consumer mode (Linux's `options/overwrite`).
    ///
    /// Context: Any context; no allocation, no spinning.
    pub fn set_mode(&self, mode: Mode) {
        for cb in self.cpus.iter() {
            cb.overwrite
                .store(mode == Mode::Overwrite, Ordering::Relaxed);
        }
    }

    /// Reserves room for a `len`-byte event on the caller's CPU. Fill the payload, then
    /// [`Reservation::commit`]; dropping the reservation discards the event.
    ///
    /// Errors: [`Error::EventTooLarge`] above [`RingBuffer::max_payload`], [`Error::Disabled`],
    /// [`Error::Full`] (producer/consumer mode, or the ring wrapped onto data an interrupted
    /// writer has not committed: counted as dropped), `InvalidArgument` for a CPU the buffer
    /// does not have.
    ///
    /// Context: the CPU `cpu` names, any context (task, softirq, irq, NMI), nested to any
    /// depth. Lockless, never waits, never allocates.
    #[inline(always)]
    pub fn reserve(&self, cpu: LocalCpu, len: usize) -> Result<Reservation<'_>, Error> {
        let cb = self.cpu(cpu.id())?;
        let depth = cb.enter();
        match cb.reserve(&self.clock, len, depth, &self.record_disabled) {
            Ok(slot) => Ok(Reservation {
                cb,
                slot,
                len,
                depth,
                waiter: self
                    .waiter
                    .wants_wakeups()
                    .then_some(&self.waiter as &dyn Waiter),
                percent: self.buffer_percent.load(Ordering::Relaxed),
                _cpu: PhantomData,
            }),
            Err(e) => {
                cb.leave(depth);
                Err(e)
            }
        }
    }

    /// Writes one event (reserve, copy, commit), without a [`Reservation`] in between.
    /// Errors and context as [`RingBuffer::reserve`].
    #[inline]
    pub fn write(&self, cpu: LocalCpu, data: &[u8]) -> Result<(), Error> {
        let cb = self.cpu(cpu.id())?;
        let depth = cb.enter();
        cb.write(&self.clock, data, depth, &self.record_disabled)?;
        if self.waiter.wants_wakeups() {
            wake_check(
                cb,
                &self.waiter,
                self.buffer_percent.load(Ordering::Relaxed),
            );
        }
        Ok(())
    }

    /// Writes `value`'s bytes as one event ([`RingBuffer::write`] of
    /// `value.as_bytes()`): a typed event, read back with [`Event::read_as`]. Errors and
    /// context as [`RingBuffer::write`].
    ///
    /// [`Event::read_as`]: crate::Event::read_as
    #[inline]
    pub fn write_value<T: zerocopy::IntoBytes + zerocopy::Immutable + ?Sized>(
        &self,
        cpu: LocalCpu,
        value: &T,
    ) -> Result<(), Error> {
        self.write(cpu, value.as_bytes())
    }

    /// Stops recording on every CPU (nests: each call needs an [`RingBuffer::record_enable`]).
    ///
    /// Context: Any context, NMI included; no allocation, no spinning.
    pub fn record_disable(&self) {
        self.record_disabled.fetch_add(1, Ordering::SeqCst);
    }

    /// Undoes one [`RingBuffer::record_disable`].
    ///
    /// Context: Any context, NMI included; no allocation, no spinning.
    pub fn record_enable(&self) {
        let _ = self
            .record_disabled
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1));
    }

    /// Stops recording on one CPU.
    ///
    /// Context: Any context, NMI included; no allocation, no spinning.
    pub fn record_disable_cpu(&self, cpu: usize) -> Result<(), Error> {
        self.cpu(cpu)?.disabled.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Undoes one [`RingBuffer::record_disable_cpu`].
    ///
    /// Context: Any context, NMI included; no allocation, no spinning.
    pub fn record_enable_cpu(&self, cpu: usize) -> Result<(), Error> {
        let _ = self
            .cpu(cpu)?
            .disabled
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1));
        Ok(())
    }

    /// Whether recording is on for `cpu`.
    ///
    /// Context: Any context, NMI included.
    pub fn is_recording(&self, cpu: usize) -> Result<bool, Error> {
        Ok(self.record_disabled.load(Ordering::Relaxed) == 0
            && self.cpu(cpu)?.disabled.load(Ordering::Relaxed) == 0)
    }

    /// The consuming reader of `cpu` (takes that CPU's reader lock).
    ///
    /// Context: any CPU, any context that cannot interrupt a holder of the same reader lock
    /// on its own CPU (it spins until the lock is free: from an interrupt or NMI handler, or
    /// a panic path, use [`RingBuffer::try_reader`]). Does not allocate. `InvalidArgument`
    /// for a CPU the buffer does not have.
    pub fn reader(&self, cpu: usize) -> Result<Reader<'_>, Error> {
        let cb = self.cpu(cpu)?;
        Ok(Reader {
            cpu: cb,
            st: cb.reader.lock(),
        })
    }

    /// The consuming reader of `cpu` if its reader lock is free now, else `Busy`: never
    /// waits, so a dump from a panic handler, an interrupt or an NMI cannot deadlock on a
    /// reader it interrupted. `InvalidArgument` for a CPU the buffer does not have.
    ///
    /// Context: any, NMI included. Does not allocate.
    pub fn try_reader(&self, cpu: usize) -> Result<Reader<'_>, Error> {
        let cb = self.cpu(cpu)?;
        Ok(Reader {
            cpu: cb,
            st: cb.reader.try_lock().ok_or(Error::Busy)?,
        })
    }

    /// The counters of `cpu`.
    ///
    /// Context: Any context, NMI included (loads only; exact once the CPU's writers are quiet).
    pub fn stats(&self, cpu: usize) -> Result<Stats, Error> {
        let cb = self.cpu(cpu)?;
        Ok(Stats {
            entries: cb.entries.load(Ordering::Acquire),
            overrun: cb.overrun.load(Ordering::Acquire),
            dropped: cb.dropped.load(Ordering::Relaxed),
            read: cb.read.load(Ordering::Acquire),
        })
    }

    /// Sets the fill level (percent of a CPU's ring) at which the waiter is woken; 0 wakes on
    /// every commit. Values above 100 are `InvalidArgument`.
    ///
    /// Context: Any context; no allocation.
    pub fn set_buffer_percent(&self, percent: u32) -> Result<(), Error> {
        if percent > 100 {
            return Err(Error::InvalidArgument);
        }
        self.buffer_percent.store(percent, Ordering::Relaxed);
        Ok(())
    }

    /// Re-arms the wake-up of `cpu` (a reader about to sleep calls this; each wake-up disarms).
    ///
    /// Context: Any context; no allocation, no spinning.
    pub fn arm_waiter(&self, cpu: usize) -> Result<(), Error> {
        self.cpu(cpu)?.wake_armed.store(true, Ordering::SeqCst);
        Ok(())
    }
}

impl<A: PageAlloc, C: Clock, W: Waiter> RingBuffer<A, C, W> {
    /// Exchanges `cpu`'s buffer (sub-buffers, events, counters) with `other`'s (Linux's
    /// `ring_buffer_swap_cpu`, used for snapshots). `InvalidArgument` unless both have the same
    /// geometry; `Busy` if either is mapped or has a writer inside a reservation.
    ///
    /// # Safety
    ///
    /// No writer of `cpu` runs on either buffer during the call (as for
    /// [`RingBuffer::reset_quiesced`]), and both buffers allocate from the same memory (the
    /// same [`PageAlloc`]), since they keep each other's sub-buffers afterwards.
    ///
    /// Context: Task context with both CPUs' writers quiesced (see Safety); takes both reader locks; no allocation.
    pub unsafe fn swap_cpu<C2: Clock, W2: Waiter>(
        &self,
        other: &RingBuffer<A, C2, W2>,
        cpu: usize,
    ) -> Result<(), Error> {
        let a = self.cpu(cpu)?;
        let b = other.cpu(cpu)?;
        if core::ptr::eq(a, b) {
            return Ok(());
        }
        if a.subbuf_size != b.subbuf_size || a.ring_len != b.ring_len {
            return Err(Error::InvalidArgument);
        }
        // Lock in address order so two opposite swaps cannot deadlock.
        let (first, second) = if (a as *const CpuBuffer) < (b as *const CpuBuffer) {
            (a, b)
        } else {
            (b, a)
        };
        let mut s1 = first.reader.lock();
        let mut s2 = second.reader.lock();
        if s1.map_count > 0 || s2.map_count > 0 {
            return Err(Error::Busy);
        }
        if first.writers_active() || second.writers_active() {
            return Err(Error::Busy);
        }
        // SAFETY: writers quiesced and same allocator by our contract; both reader locks held;
        // neither mapped.
        unsafe { first.swap_with(second, &mut s1, &mut s2) };
        Ok(())
    }
}

/// `n` sub-buffers of `PAGE_SIZE << order` bytes from `alloc`, in a page array from `alloc`.
/// On `NoMemory` whatever was allocated is given back.
pub(crate) fn alloc_subbufs<A: PageAlloc>(
    alloc: &A,
    n: usize,
    order: u32,
) -> Result<PageArray<PageDesc>, Error> {
    PageArray::new(
        alloc,
        n,
        |_| {
            let mem = alloc.alloc_pages(order).ok_or(Error::NoMemory)?;
            Ok(new_page_desc(mem))
        },
        |pd| {
            // SAFETY: allocated just above with `order`; nothing else knows it.
            unsafe { alloc.free_pages(pd.mem.get(), order) }
        },
    )
}

/// Gives every sub-buffer of `pages`, then the array, back to `alloc`.
///
/// # Safety
///
/// The array and its sub-buffers came from `alloc`, the sub-buffers from
/// `alloc_pages(order)` (as [`alloc_subbufs`] makes them), and nothing uses any of them any
/// more (no writer, reader or mapping).
pub(crate) unsafe fn free_subbufs<A: PageAlloc>(alloc: &A, pages: PageArray<PageDesc>, order: u32) {
    for pd in pages.iter() {
        // SAFETY: from `alloc_pages(order)` and unused (contract).
        unsafe { alloc.free_pages(pd.mem.get(), order) };
    }
    // SAFETY: the array came from `alloc` (contract).
    unsafe { pages.free(alloc) };
}

pub(crate) fn new_page_desc(mem: NonNull<u8>) -> PageDesc {
    PageDesc {
        mem: SubbufMem::new(mem),
        link: AtomicU32::new(0),
        entries: crate::sync::Local::<AtomicU64>::new(crate::cpu::ENTRIES_CLEAN),
        end: AtomicU32::new(0),
        real_end: AtomicU32::new(0),
        commit: AtomicU64::new(0),
        head_overrun: AtomicU64::new(0),
        push_seq: AtomicU64::new(0),
        id: AtomicU32::new(0),
        by_id: AtomicU32::new(0),
    }
}

impl<A: PageAlloc, C: Clock, W: Waiter> Drop for RingBuffer<A, C, W> {
    fn drop(&mut self) {
        for cb in self.cpus.iter() {
            let mut st = cb.reader.lock();
            if let Some(meta) = st.meta.take() {
                // SAFETY: the meta page came from `alloc_pages(0)`; the buffer is going away,
                // so no mapping is used any more.
                unsafe { self.alloc.free_pages(meta, 0) };
            }
            // SAFETY: the array and every sub-buffer came from `self.alloc`, the sub-buffers
            // from `alloc_pages(subbuf_order)`; the buffer is going away, so nothing uses them.
            // `PageArray` has no drop glue, so this bitwise copy is the only owner, freed once.
            unsafe { free_subbufs(&self.alloc, core::ptr::read(cb.pages()), self.subbuf_order) };
        }
        // SAFETY: the array came from `self.alloc`. `PageArray` has no drop glue, so this
        // bitwise copy is the only owner, freed once; `self.cpus` is not used again.
        unsafe { core::ptr::read(&self.cpus).free(&self.alloc) };
    }
}

/// A reserved event: fill [`Reservation::payload_mut`], then [`Reservation::commit`]. Dropping
/// it without committing discards the event (it becomes padding that keeps its length).
pub struct Reservation<'a> {
    cb: &'a CpuBuffer,
    slot: Slot,
    len: usize,
    /// Writer sections this one is nested in.
    depth: u32,
    waiter: Option<&'a dyn Waiter>,
    percent: u32,
    _cpu: PhantomData<*const ()>,
}

impl Reservation<'_> {
    /// The payload bytes (as many as reserved).
    pub fn payload_mut(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes at `payload` are reserved for this event, inside its sub-buffer,
        // and nothing else touches them until the commit.
        unsafe { core::slice::from_raw_parts_mut(self.slot.payload, self.len) }
    }

    /// Publishes the event (when the outermost writer of the CPU finishes).
    #[inline]
    pub fn commit(self) {
        let cb = self.cb;
        let (depth, waiter, percent) = (self.depth, self.waiter, self.percent);
        core::mem::forget(self);
        cb.count_commit();
        cb.leave(depth);
        if let Some(waiter) = waiter {
            wake_check(cb, waiter, percent);
        }
    }
}

/// Wakes the waiter of `cb` if it is armed and the fill level reached `percent`.
#[inline]
fn wake_check(cb: &CpuBuffer, waiter: &(impl Waiter + ?Sized), percent: u32) {
    if cb.wake_armed.load(Ordering::Relaxed)
        && (percent == 0 || cb.fill_percent() >= u64::from(percent))
        && cb.wake_armed.swap(false, Ordering::AcqRel)
    {
        waiter.wake(cb.cpu);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.cb.discard(&self.slot);
        self.cb.leave(self.depth);
    }
}
