//! One CPU's ring of sub-buffers and its lockless writer: the CPU buffer itself here, the
//! ring's representation in `ring`, the write path in `write`.
//!
//! The ring is a singly linked list of page indices. The link *into* the head page carries the
//! `HEAD` flag; a writer that must overwrite the head first flips it to `UPDATE` with a
//! compare-and-swap, so the reader (which swaps its spare page in with a compare-and-swap of
//! the same link) and the writer can never both own the head: this is the protocol of Linux's
//! `ring-buffer-design.rst`, with indices instead of pointers.
//!
//! Writers of one CPU nest (task < softirq < irq < NMI). The tail is one word (page, offset,
//! generation) moved by compare-and-swap, so an interrupted writer simply retries. Only the
//! outermost writer publishes `commit`, after every nested one is done (commit counting).
//! A nested writer that finds a head push of the writer it interrupted half done finishes it
//! (`finish_push`: every step is a compare-and-swap that fails once done, or a store of a
//! value every participant computes alike), then writes on. A page is emptied before the tail
//! can enter it, by whoever owns it then: the head push, or the reader handing its page back.
//!
//! The common write (outermost, same sub-buffer, delta fits in 27 bits) is one straight line,
//! [`CpuBuffer::write`]; everything else ([`CpuBuffer::reserve_slow`], `move_tail`, a publish that
//! crosses sub-buffers) is out of line.

mod ring;
mod write;

pub(crate) use ring::*;
pub(crate) use write::Slot;

use core::cell::UnsafeCell;

use crate::{
    format::SUBBUF_HEADER_SIZE,
    mem::PageArray,
    sync::{AtomicBool, AtomicU32, AtomicU64, Local, Ordering, SpinLock},
};

/// One CPU's buffer.
pub(crate) struct CpuBuffer {
    pub(crate) cpu: usize,
    /// The sub-buffers; only `swap_cpu` replaces them, with writers quiesced and the reader
    /// lock held.
    pages: UnsafeCell<PageArray<PageDesc>>,
    /// Pages in the ring (the reader page excluded).
    pub(crate) ring_len: u32,
    pub(crate) subbuf_size: usize,
    pub(crate) overwrite: AtomicBool,
    pub(crate) tail: Local<AtomicU64>,
    pub(crate) commit_page: AtomicU32,
    /// Writer sections open on this CPU (Linux's `committing`). Only this CPU's writers touch
    /// it, and each interrupting writer leaves it as it found it, so plain loads and stores
    /// are exact: see [`CpuBuffer::enter`].
    nest: AtomicU32,
    last_stamp: AtomicU64,
    stamp_pos: AtomicU64,
    pub(crate) entries: Local<AtomicU64>,
    pub(crate) overrun: Local<AtomicU64>,
    pushes: Local<AtomicU64>,
    pub(crate) dropped: Local<AtomicU64>,
    pub(crate) read: AtomicU64,
    pub(crate) pages_touched: Local<AtomicU64>,
    pub(crate) pages_read: AtomicU64,
    pub(crate) disabled: AtomicU32,
    pub(crate) wake_armed: AtomicBool,
    pub(crate) reader: SpinLock<ReaderState>,
}

// SAFETY: the only non-`Sync` part is `pages`, which is mutated only by `swap_cpu`, whose
// contract excludes every other access to the CPU buffer for its duration.
unsafe impl Sync for CpuBuffer {}

impl CpuBuffer {
    /// The sub-buffers (ring pages, then the initial reader page).
    pub(crate) fn pages(&self) -> &PageArray<PageDesc> {
        // SAFETY: see the `Sync` impl: no mutation while anyone can hold this reference.
        unsafe { &*self.pages.get() }
    }

    /// Exchanges the sub-buffers and all state with `other` (same geometry).
    ///
    /// # Safety
    ///
    /// No writer of either runs, both reader locks are held (their states are passed in),
    /// neither is mapped, and the two buffers share one page allocator.
    pub(crate) unsafe fn swap_with(
        &self,
        other: &CpuBuffer,
        st: &mut ReaderState,
        ost: &mut ReaderState,
    ) {
        // SAFETY: exclusive by the contract.
        unsafe { core::ptr::swap(self.pages.get(), other.pages.get()) };
        core::mem::swap(st, ost);
        let swap64 = |a: &AtomicU64, b: &AtomicU64| {
            let t = a.load(Ordering::Relaxed);
            a.store(b.load(Ordering::Relaxed), Ordering::Relaxed);
            b.store(t, Ordering::Relaxed);
        };
        for (a, b) in [
            (&self.tail.0, &other.tail.0),
            (&self.last_stamp, &other.last_stamp),
            (&self.stamp_pos, &other.stamp_pos),
            (&self.entries.0, &other.entries.0),
            (&self.overrun.0, &other.overrun.0),
            (&self.pushes.0, &other.pushes.0),
            (&self.dropped.0, &other.dropped.0),
            (&self.read, &other.read),
            (&self.pages_touched.0, &other.pages_touched.0),
            (&self.pages_read, &other.pages_read),
        ] {
            swap64(a, b);
        }
        for (a, b) in [
            (&self.nest, &other.nest),
            (&self.commit_page, &other.commit_page),
        ] {
            let t = a.load(Ordering::Relaxed);
            a.store(b.load(Ordering::Relaxed), Ordering::Release);
            b.store(t, Ordering::Release);
        }
    }
}

impl CpuBuffer {
    /// A CPU buffer over `pages` (ring pages then the reader page), all zeroed.
    pub(crate) fn new(
        cpu: usize,
        pages: PageArray<PageDesc>,
        subbuf_size: usize,
        overwrite: bool,
    ) -> Self {
        let ring_len = (pages.len() - 1) as u32;
        let cb = Self {
            cpu,
            pages: UnsafeCell::new(pages),
            ring_len,
            subbuf_size,
            overwrite: AtomicBool::new(overwrite),
            tail: Local::<AtomicU64>::new(0),
            commit_page: AtomicU32::new(0),
            nest: AtomicU32::new(0),
            last_stamp: AtomicU64::new(0),
            stamp_pos: AtomicU64::new(STAMP_INVALID),
            entries: Local::<AtomicU64>::new(0),
            overrun: Local::<AtomicU64>::new(0),
            pushes: Local::<AtomicU64>::new(0),
            dropped: Local::<AtomicU64>::new(0),
            read: AtomicU64::new(0),
            pages_touched: Local::<AtomicU64>::new(0),
            pages_read: AtomicU64::new(0),
            disabled: AtomicU32::new(0),
            wake_armed: AtomicBool::new(true),
            reader: SpinLock::new(ReaderState {
                reader_page: ring_len,
                read: 0,
                read_stamp: 0,
                last_overrun: 0,
                next_head: 0,
                last_push_seq: 0,
                lost: 0,
                meta_lost: 0,
                head_hint: ring_len - 1,
                map_count: 0,
                meta: None,
            }),
        };
        cb.init_ring(&mut cb.reader.lock());
        cb
    }

    /// Links every page into the ring with page 0 as head and tail, the last page as reader.
    /// Writers must be quiescent.
    pub(crate) fn init_ring(&self, st: &mut ReaderState) {
        let n = self.ring_len;
        for (i, p) in self.pages().iter().enumerate() {
            p.link.store(ring_link(i as u32, n), Ordering::Relaxed);
            p.clear();
            p.set_time_stamp(0);
            p.head_overrun.store(0, Ordering::Relaxed);
            p.push_seq.store(0, Ordering::Relaxed);
        }
        self.tail.store(tail_word(0, 0, 0), Ordering::Release);
        self.commit_page.store(0, Ordering::Release);
        self.stamp_pos.store(STAMP_INVALID, Ordering::Relaxed);
        self.pushes.store(0, Ordering::Relaxed);
        self.zero_counters();
        st.reader_page = n;
        st.restart(0, 0, n - 1);
    }

    /// Zeroes the event and page counters (not the head pushes, which the pages' `push_seq`
    /// are compared with). Writers must be quiescent or unable to count.
    pub(crate) fn zero_counters(&self) {
        for c in [
            &self.entries,
            &self.overrun,
            &self.dropped,
            &self.pages_touched,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        self.read.store(0, Ordering::Relaxed);
        self.pages_read.store(0, Ordering::Relaxed);
    }

    pub(crate) fn data_size(&self) -> usize {
        self.subbuf_size - SUBBUF_HEADER_SIZE
    }

    #[inline(always)]
    fn page(&self, i: u32) -> &PageDesc {
        &self.pages()[i as usize]
    }

    /// Whether a writer section is open; exact only on the writers' own CPU.
    pub(crate) fn writers_active(&self) -> bool {
        self.nest.load(Ordering::Relaxed) != 0
    }

    /// Fill level in percent of the ring, for `buffer_percent` wake-ups.
    pub(crate) fn fill_percent(&self) -> u64 {
        let touched = self.pages_touched.load(Ordering::Relaxed);
        let read = self.pages_read.load(Ordering::Relaxed);
        touched.saturating_sub(read).min(u64::from(self.ring_len)) * 100 / u64::from(self.ring_len)
    }
}

// Geometry changes (`resize.rs`) rebuild a CPU buffer that nobody else can reach (`&mut`): the
// few writer internals they need, kept apart from the write path (`write.rs`).
impl CpuBuffer {
    /// The sub-buffers, exclusively.
    pub(crate) fn pages_mut(&mut self) -> &mut PageArray<PageDesc> {
        self.pages.get_mut()
    }

    /// Head pushes so far: no page's `push_seq` is larger.
    pub(crate) fn pushes(&self) -> u64 {
        self.pushes.load(Ordering::Relaxed)
    }

    /// Puts the tail, and the commit page with it, at data offset `off` of `page`, in a new
    /// generation (so the next event carries an absolute time stamp).
    pub(crate) fn place_tail(&mut self, page: u32, off: usize) {
        self.restart_tail(page, off);
        self.commit_page.store(page, Ordering::Release);
    }

    /// Moves the tail back to the start of its page, in a new generation; returns the page.
    /// For a reset on the writers' own CPU (`reset.rs`): from then on, what a nested writer
    /// that finds recording disabled still does (publish the tail page's commit) writes 0.
    pub(crate) fn rewind_tail(&self) -> u32 {
        let page = tail_page(self.tail.load(Ordering::Relaxed));
        self.restart_tail(page, 0);
        page
    }

    /// Puts the tail at data offset `off` of `page`, in the next generation.
    fn restart_tail(&self, page: u32, off: usize) {
        let generation = tail_gen(self.tail.load(Ordering::Relaxed)).wrapping_add(1);
        self.tail
            .store(tail_word(page, off, generation), Ordering::Release);
    }
}
