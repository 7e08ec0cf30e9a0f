//! One CPU's ring of sub-buffers and its lockless writer.
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
//!
//! The common write (outermost, same sub-buffer, delta fits in 27 bits) is one straight line,
//! [`CpuBuffer::write`]; everything else ([`CpuBuffer::reserve_slow`], `move_tail`, a publish that
//! crosses sub-buffers) is out of line.

use core::{
    cell::UnsafeCell,
    ptr::NonNull,
    sync::atomic::{Ordering::SeqCst, compiler_fence},
};

use crate::{
    error::Error,
    format::{self, COMMIT_MASK, MAX_DELTA, SUBBUF_HEADER_SIZE, TIME_EXTEND_SIZE},
    hal::Clock,
    mem::{PageArray, SubbufMem},
    sync::{AtomicBool, AtomicU32, AtomicU64, Local, Ordering, SpinLock, interrupt_point},
};

pub(crate) const LINK_HEAD: u32 = 1;
pub(crate) const LINK_UPDATE: u32 = 2;

pub(crate) const fn link(next: u32, flag: u32) -> u32 {
    (next << 2) | flag
}
pub(crate) const fn link_next(l: u32) -> u32 {
    l >> 2
}
pub(crate) const fn link_flag(l: u32) -> u32 {
    l & 3
}
/// The link of page `i` in a fresh ring of `n` pages plus the reader page (index `n`):
/// 0 -> 1 -> ... -> n - 1 -> 0 with page 0 the head, and the reader page leading to it.
pub(crate) const fn ring_link(i: u32, n: u32) -> u32 {
    if i + 1 == n {
        link(0, LINK_HEAD)
    } else if i >= n {
        link(0, 0)
    } else {
        link(i + 1, 0)
    }
}

// The tail word: offset in bits 0..24, page in 24..40, generation in 40..64.
const PAGE_SHIFT: u32 = 24;
const GEN_SHIFT: u32 = 40;
const fn tail_word(page: u32, off: usize, generation: u64) -> u64 {
    (generation << GEN_SHIFT) | ((page as u64) << PAGE_SHIFT) | off as u64
}
pub(crate) const fn tail_page(t: u64) -> u32 {
    ((t >> PAGE_SHIFT) & 0xffff) as u32
}
pub(crate) const fn tail_off(t: u64) -> usize {
    (t & 0xff_ffff) as usize
}
const fn tail_gen(t: u64) -> u64 {
    t >> GEN_SHIFT
}
/// Largest number of sub-buffers per CPU, reader included (16-bit page index in the tail).
pub(crate) const MAX_PAGES: usize = 1 << 16;

/// `stamp_pos` value that matches no tail: the next event gets an absolute time stamp.
const STAMP_INVALID: u64 = u64::MAX;

/// One sub-buffer and its bookkeeping.
pub(crate) struct PageDesc {
    /// The sub-buffer memory (header + data).
    pub(crate) mem: SubbufMem,
    /// Next page in the ring, with the `HEAD`/`UPDATE` flags.
    pub(crate) link: AtomicU32,
    /// Events reserved on the page (what an overwrite of it loses).
    pub(crate) entries: Local<AtomicU32>,
    /// Commit value once the writer has left the page.
    pub(crate) end: AtomicU32,
    /// Data offset where the last event ended, before the end padding.
    pub(crate) real_end: AtomicU32,
    /// Published data size and `RB_MISSED_*` flags, mirrored into the page header.
    pub(crate) commit: AtomicU64,
    /// Writer: total `overrun` when it made this page the head.
    pub(crate) head_overrun: AtomicU64,
    /// Writer: number of the head push that made this page the head.
    pub(crate) push_seq: AtomicU64,
    /// Mapping: ID of this page.
    pub(crate) id: AtomicU32,
    /// Mapping: page index of ID `i` (stored in entry `i`).
    pub(crate) by_id: AtomicU32,
}

// SAFETY: `mem` is a page owned by the buffer; every access to it follows the writer/reader
// protocol of this module.
unsafe impl Send for PageDesc {}
// SAFETY: as above.
unsafe impl Sync for PageDesc {}

impl PageDesc {
    #[inline(always)]
    fn header_word(&self, offset: usize) -> &core::sync::atomic::AtomicU64 {
        // SAFETY: the page is at least 4 KiB, page-aligned, lives as long as `self`, and the
        // header words are only ever accessed atomically.
        unsafe { core::sync::atomic::AtomicU64::from_ptr(self.mem.as_ptr().add(offset).cast()) }
    }

    /// Publishes the commit word (data size and flags).
    #[inline(always)]
    pub(crate) fn set_commit(&self, value: u64) {
        self.commit.store(value, Ordering::Release);
        self.header_word(8).store(value, Ordering::Release);
    }

    /// Committed data bytes.
    pub(crate) fn size(&self) -> usize {
        (self.commit.load(Ordering::Acquire) & COMMIT_MASK) as usize
    }

    /// Empties the page's bookkeeping: no events, no end, nothing committed.
    pub(crate) fn clear(&self) {
        self.entries.store(0, Ordering::Relaxed);
        self.end.store(0, Ordering::Relaxed);
        self.real_end.store(0, Ordering::Relaxed);
        self.set_commit(0);
    }

    /// Where the events of the page end, before any end padding (`real_end`, or the committed
    /// size when the writer has not set it), at most the committed size: where a lost-event
    /// count can go.
    pub(crate) fn data_end(&self) -> usize {
        let size = self.size();
        match self.real_end.load(Ordering::Relaxed) as usize {
            0 => size,
            end => end.min(size),
        }
    }

    pub(crate) fn time_stamp(&self) -> u64 {
        self.header_word(0).load(Ordering::Acquire)
    }

    fn set_time_stamp(&self, ts: u64) {
        self.header_word(0).store(ts, Ordering::Release);
    }

    /// Start of the data area.
    #[inline(always)]
    pub(crate) fn data(&self) -> *mut u8 {
        // SAFETY: the header is inside the page.
        unsafe { self.mem.as_ptr().add(SUBBUF_HEADER_SIZE) }
    }

    /// Writes a little-endian word at data offset `off`.
    ///
    /// # Safety
    ///
    /// `off + 4` is inside the data area and the caller owns those bytes (reserved or padding).
    #[inline(always)]
    unsafe fn put(&self, off: usize, word: u32) {
        // SAFETY: in bounds and 4-aligned (offsets are multiples of 4 from a page boundary);
        // the caller owns the bytes.
        unsafe { self.data().add(off).cast::<u32>().write(word.to_le()) }
    }

    /// Writes the header of a data event of `len` payload bytes at data offset `off` (and the
    /// zero padding of its last payload word); returns where the payload goes.
    ///
    /// # Safety
    ///
    /// The caller owns `format::event_len(len)` bytes at `off`, inside the data area.
    #[inline(always)]
    unsafe fn put_data_header(&self, off: usize, len: usize, delta: u32) -> *mut u8 {
        let stored = format::stored_len(len);
        // SAFETY: the event lies in the caller's bytes.
        unsafe {
            let payload = if len > format::MAX_SMALL_DATA {
                self.put(off, format::header(0, delta));
                self.put(off + 4, stored as u32 + 4);
                self.data().add(off + 8)
            } else {
                self.put(off, format::header((stored / 4) as u32, delta));
                self.data().add(off + 4)
            };
            // Zero the last word when it has padding, so the padding to 4 bytes is
            // deterministic whatever the caller fills in (the caller owns all `len` bytes, so
            // a payload without padding needs no store).
            if stored != len {
                payload.add(stored - 4).cast::<u32>().write(0);
            }
            payload
        }
    }
}

/// Copies a payload into its reserved bytes.
///
/// # Safety
///
/// `dst` is valid for `data.len()` bytes of writes and does not overlap `data`.
#[inline(always)]
unsafe fn copy_payload(data: &[u8], dst: *mut u8) {
    let (src, n) = (data.as_ptr(), data.len());
    /// Copies `n` bytes, `W <= n <= 2 * W`, as two possibly overlapping `W`-byte words.
    ///
    /// # Safety
    ///
    /// As `copy_payload`, and `W <= n <= 2 * W`.
    #[inline(always)]
    unsafe fn two_words<const W: usize>(src: *const u8, dst: *mut u8, n: usize) {
        // SAFETY: both words lie within the `n` bytes of `src` and of `dst`.
        unsafe {
            let head = src.cast::<[u8; W]>().read_unaligned();
            let tail = src.add(n - W).cast::<[u8; W]>().read_unaligned();
            dst.cast::<[u8; W]>().write_unaligned(head);
            dst.add(n - W).cast::<[u8; W]>().write_unaligned(tail);
        }
    }
    // Small payloads in line (trace events are mostly small, and a `no_std` kernel's
    // `memcpy` is often a byte loop); the rest with `memcpy`.
    // SAFETY: by the contract, with the size of each branch as `two_words` requires.
    unsafe {
        match n {
            0 => {}
            1..4 => {
                for i in 0..n {
                    *dst.add(i) = *src.add(i);
                }
            }
            4..8 => two_words::<4>(src, dst, n),
            8..16 => two_words::<8>(src, dst, n),
            16..=32 => two_words::<16>(src, dst, n),
            33..=64 => {
                two_words::<16>(src, dst, 32);
                two_words::<16>(src.add(n - 32), dst.add(n - 32), 32);
            }
            _ => core::ptr::copy_nonoverlapping(src, dst, n),
        }
    }
}

/// Reader-side state, under the reader lock.
pub(crate) struct ReaderState {
    pub(crate) reader_page: u32,
    /// Bytes of the reader page consumed.
    pub(crate) read: usize,
    /// Time of the last consumed record.
    pub(crate) read_stamp: u64,
    pub(crate) last_overrun: u64,
    /// The page our last swap made the head, and the push number it was head as of.
    pub(crate) next_head: u32,
    pub(crate) last_push_seq: u64,
    /// Lost events not yet handed to the consumer.
    pub(crate) lost: u64,
    /// Lost events handed to the mapped consumer with the current reader sub-buffer (the
    /// meta page's `reader.lost_events`).
    pub(crate) meta_lost: u64,
    /// A ring page at or before the head, where the head search starts.
    pub(crate) head_hint: u32,
    /// Mapping: how many times mapped, and the meta page.
    pub(crate) map_count: u32,
    pub(crate) meta: Option<NonNull<u8>>,
}

// SAFETY: the meta page pointer is owned memory handed between CPUs under the lock.
unsafe impl Send for ReaderState {}

impl ReaderState {
    /// Starts afresh on the reader page: nothing read or lost, the time from the next page.
    /// `next_head` is the ring's head and `push_seq` the head pushes so far (so the next swap
    /// of that head finds nothing lost); the head search starts at `head_hint`.
    pub(crate) fn restart(&mut self, next_head: u32, push_seq: u64, head_hint: u32) {
        self.read = 0;
        self.read_stamp = 0;
        self.last_overrun = 0;
        self.next_head = next_head;
        self.last_push_seq = push_seq;
        self.lost = 0;
        self.meta_lost = 0;
        self.head_hint = head_hint;
    }
}

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

/// Where a reservation landed.
pub(crate) struct Slot {
    pub(crate) page: u32,
    /// Data offset of the event header.
    pub(crate) event_off: usize,
    /// Total event length (without any time event in front).
    pub(crate) event_len: usize,
    pub(crate) payload: *mut u8,
}

enum Time {
    PageStart,
    Delta(u32),
    Extend(u64),
    Absolute,
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

    /// Enters a writer section; returns the depth it found (0: outermost writer).
    ///
    /// A plain load and store, not a read-modify-write: only this CPU's writers change `nest`,
    /// and a writer that interrupts us between the two runs to completion and leaves `nest`
    /// as it found it (see [`CpuBuffer::leave`]), so our store is exact. The interrupting
    /// writer saw the depth without us and behaved as if it ran just before we entered.
    #[inline(always)]
    pub(crate) fn enter(&self) -> u32 {
        let depth = self.nest.load(Ordering::Relaxed);
        interrupt_point();
        self.nest.store(depth + 1, Ordering::Relaxed);
        // Interrupts see this CPU's memory operations in program order; keep the compiler
        // from moving the reservation above the store.
        compiler_fence(SeqCst);
        depth
    }

    /// Leaves a writer section entered at `depth`; the outermost one publishes everything
    /// written so far, nested ones leave that to it.
    #[inline(always)]
    pub(crate) fn leave(&self, depth: u32) {
        if depth != 0 {
            compiler_fence(SeqCst);
            // Exact as in `enter`: interrupts of ours restore `depth + 1` before we resume.
            self.nest.store(depth, Ordering::Release);
            return;
        }
        let t = self.publish();
        self.leave_outermost(t);
    }

    /// Leaves the outermost writer section after publishing up to tail `t`.
    #[inline(always)]
    fn leave_outermost(&self, t: u64) {
        // Release: the publication before happens before a later writer can see itself as
        // outermost and publish too (a nested publisher must not interleave with ours).
        self.nest.store(0, Ordering::Release);
        compiler_fence(SeqCst);
        interrupt_point();
        // A writer that interrupted us after our publish saw `nest` = 1 and left its event to
        // us: the tail moved. (One that came after the store above published itself; telling
        // the two apart is not worth it, publishing again is harmless.)
        if self.tail.load(Ordering::Relaxed) != t {
            self.republish();
        }
    }

    /// Re-enters as the outermost writer and publishes until no interrupt slipped in between
    /// publish and leave.
    #[cold]
    #[inline(never)]
    fn republish(&self) {
        loop {
            self.nest.store(1, Ordering::Relaxed);
            compiler_fence(SeqCst);
            let t = self.publish();
            self.nest.store(0, Ordering::Release);
            compiler_fence(SeqCst);
            interrupt_point();
            if self.tail.load(Ordering::Relaxed) == t {
                return;
            }
        }
    }

    /// The common write, straight-line: the outermost writer (`depth` 0, recording enabled)
    /// appends a data event to the sub-buffer it already writes, with a delta that fits the
    /// header. Everything else goes to [`CpuBuffer::write_slow`]. The caller entered.
    #[inline(always)]
    pub(crate) fn write(
        &self,
        clock: &impl Clock,
        data: &[u8],
        depth: u32,
        global_disabled: &AtomicU32,
    ) -> Result<(), Error> {
        let len = data.len();
        // No `max_payload` check: a slice is at most `isize::MAX` bytes, so the event length
        // cannot overflow, and `reserve_fast` finds a too-large event does not fit (then
        // `reserve_slow` says `EventTooLarge`).
        if depth == 0
            && global_disabled.load(Ordering::Relaxed) == 0
            && self.disabled.load(Ordering::Relaxed) == 0
        {
            let t = self.tail.load(Ordering::Relaxed);
            let ts = clock.now();
            match self.reserve_fast(t, ts, len) {
                Some((pd, payload, new)) => {
                    // SAFETY: `payload` has `len` reserved bytes, ours until the leave.
                    unsafe { copy_payload(data, payload) };
                    self.entries.fetch_add(1);
                    // Publish. Outermost writers publish everything before they leave, so
                    // the commit page was `pd` when we entered, and only we publish until we
                    // leave: committing `pd` up to our event publishes everything before it.
                    // A nested writer that reserved after our event (on `pd` or beyond) shows
                    // in the tail check of `leave_outermost`, which then publishes it.
                    debug_assert_eq!(self.commit_page.load(Ordering::Relaxed), tail_page(t));
                    interrupt_point();
                    pd.set_commit(tail_off(new) as u64);
                    self.leave_outermost(new);
                    Ok(())
                }
                None => self.write_slow(clock, data, depth, Some((t, ts)), global_disabled),
            }
        } else {
            self.write_slow(clock, data, depth, None, global_disabled)
        }
    }

    /// Everything [`CpuBuffer::write`] does not do in line; leaves the writer section.
    #[cold]
    #[inline(never)]
    fn write_slow(
        &self,
        clock: &impl Clock,
        data: &[u8],
        depth: u32,
        seen: Option<(u64, u64)>,
        global_disabled: &AtomicU32,
    ) -> Result<(), Error> {
        let res = if global_disabled.load(Ordering::Relaxed) != 0 {
            Err(Error::Disabled)
        } else {
            self.reserve_slow(clock, data.len(), depth != 0, seen)
        };
        let res = res.map(|slot| {
            // SAFETY: `slot.payload` has `len` reserved bytes, ours until the leave.
            unsafe { copy_payload(data, slot.payload) };
            self.entries.fetch_add(1);
        });
        self.leave(depth);
        res
    }

    /// Reserves room for a `len`-byte payload. The caller entered (at `depth`) and will
    /// [`CpuBuffer::leave`] whatever happens.
    #[inline(always)]
    pub(crate) fn reserve(
        &self,
        clock: &impl Clock,
        len: usize,
        depth: u32,
        global_disabled: &AtomicU32,
    ) -> Result<Slot, Error> {
        if depth == 0
            && global_disabled.load(Ordering::Relaxed) == 0
            && self.disabled.load(Ordering::Relaxed) == 0
            && len <= format::max_payload(self.subbuf_size)
        {
            let t = self.tail.load(Ordering::Relaxed);
            let ts = clock.now();
            match self.reserve_fast(t, ts, len) {
                Some((_, payload, new)) => Ok(Slot {
                    page: tail_page(t),
                    event_off: tail_off(t),
                    event_len: (new - t) as usize,
                    payload,
                }),
                None => self.reserve_slow(clock, len, false, Some((t, ts))),
            }
        } else if global_disabled.load(Ordering::Relaxed) != 0 {
            Err(Error::Disabled)
        } else {
            self.reserve_slow(clock, len, depth != 0, None)
        }
    }

    /// The fast reservation: `t` is the tail we loaded, `ts` the clock read after it, `len` at
    /// most `isize::MAX`. Only for the outermost writer. `None` (nothing changed) when the
    /// event needs a time event in front, starts a sub-buffer, does not fit, or an interrupt
    /// moved the tail.
    /// On success: the sub-buffer, where the payload goes, and the tail after the event.
    #[inline(always)]
    fn reserve_fast(&self, t: u64, ts: u64, len: usize) -> Option<(&PageDesc, *mut u8, u64)> {
        let off = tail_off(t);
        let delta = ts.wrapping_sub(self.last_stamp.load(Ordering::Relaxed));
        let event_len = format::event_len(len);
        // `stamp_pos == t`: the event before ours was written by the writer that stored
        // `last_stamp`, so the delta is from its time (an interrupted or discarded one left
        // `stamp_pos` elsewhere). `off != 0`: the first event of a sub-buffer sets its
        // `time_stamp` instead (slow path).
        if off == 0
            || self.stamp_pos.load(Ordering::Relaxed) != t
            || delta > MAX_DELTA
            || off + event_len > self.data_size()
        {
            return None;
        }
        let new = t + event_len as u64;
        interrupt_point();
        if !self.tail.cas(t, new) {
            return None;
        }
        interrupt_point();
        let pd = self.page(tail_page(t));
        pd.entries.fetch_add(1);
        // SAFETY: the bytes [off, off + event_len) of the page are ours (the CAS above).
        let payload = unsafe { pd.put_data_header(off, len, delta as u32) };
        self.last_stamp.store(ts, Ordering::Relaxed);
        self.stamp_pos.store(new, Ordering::Release);
        interrupt_point();
        Some((pd, payload, new))
    }

    /// Reserves room for a `len`-byte payload, every case. `seen` is the tail and clock the
    /// fast path already read (so the clock is read once per attempt, as before).
    #[cold]
    #[inline(never)]
    pub(crate) fn reserve_slow(
        &self,
        clock: &impl Clock,
        len: usize,
        nested: bool,
        mut seen: Option<(u64, u64)>,
    ) -> Result<Slot, Error> {
        if self.disabled.load(Ordering::Relaxed) != 0 {
            return Err(Error::Disabled);
        }
        if len > format::max_payload(self.subbuf_size) {
            return Err(Error::EventTooLarge);
        }
        let event_len = format::event_len(len);
        let data_size = self.data_size();
        loop {
            let (t, ts) = match seen.take() {
                Some(seen) => seen,
                None => {
                    let t = self.tail.load(Ordering::Acquire);
                    (t, clock.now())
                }
            };
            let (page, off) = (tail_page(t), tail_off(t));
            let time = if off == 0 {
                Time::PageStart
            } else if !nested && self.stamp_pos.load(Ordering::Acquire) == t {
                match ts.checked_sub(self.last_stamp.load(Ordering::Relaxed)) {
                    Some(d) if d <= MAX_DELTA => Time::Delta(d as u32),
                    Some(d) if d < 1 << 59 => Time::Extend(d),
                    _ => Time::Absolute,
                }
            } else {
                Time::Absolute
            };
            let time_len = match time {
                Time::Extend(_) | Time::Absolute => TIME_EXTEND_SIZE,
                _ => 0,
            };
            let need = event_len + time_len;
            if off + need > data_size {
                if let Err(e) = self.move_tail(t) {
                    self.dropped.fetch_add(1);
                    return Err(e);
                }
                continue;
            }
            let new = t + need as u64;
            interrupt_point();
            if !self.tail.cas(t, new) {
                continue;
            }
            interrupt_point();
            // The bytes [off, off + need) of `page` are ours.
            let pd = self.page(page);
            pd.entries.fetch_add(1);
            let (event_off, delta) = match time {
                Time::PageStart => {
                    pd.set_time_stamp(ts);
                    (off, 0)
                }
                Time::Delta(d) => (off, d),
                Time::Extend(d) => {
                    let (h, a) = format::time_event(format::TYPE_TIME_EXTEND, d);
                    // SAFETY: reserved above.
                    unsafe {
                        pd.put(off, h);
                        pd.put(off + 4, a);
                    }
                    (off + TIME_EXTEND_SIZE, 0)
                }
                Time::Absolute => {
                    let (h, a) = format::time_event(format::TYPE_TIME_STAMP, ts & ((1 << 59) - 1));
                    // SAFETY: reserved above.
                    unsafe {
                        pd.put(off, h);
                        pd.put(off + 4, a);
                    }
                    (off + TIME_EXTEND_SIZE, 0)
                }
            };
            // SAFETY: the event lies in the reserved bytes.
            let payload = unsafe { pd.put_data_header(event_off, len, delta) };
            self.last_stamp.store(ts, Ordering::Relaxed);
            self.stamp_pos.store(new, Ordering::Release);
            interrupt_point();
            return Ok(Slot {
                page,
                event_off,
                event_len,
                payload,
            });
        }
    }

    /// Moves the tail off the full page of tail word `t`, pushing the head in overwrite mode.
    /// `Ok` means "look at the tail again".
    #[cold]
    #[inline(never)]
    fn move_tail(&self, t: u64) -> Result<(), Error> {
        let page = tail_page(t);
        let off = tail_off(t);
        let pd = self.page(page);
        let l = pd.link.load(Ordering::Acquire);
        let next = link_next(l);
        if next == self.commit_page.load(Ordering::Acquire) {
            // The ring wrapped onto data an interrupted writer has not committed yet.
            return Err(Error::Full);
        }
        match link_flag(l) {
            LINK_UPDATE => return Err(Error::Busy),
            LINK_HEAD => {
                if !self.overwrite.load(Ordering::Relaxed) {
                    return Err(Error::Full);
                }
                if pd
                    .link
                    .compare_exchange(
                        l,
                        link(next, LINK_UPDATE),
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    )
                    .is_err()
                {
                    return Ok(()); // the reader swapped the head away: look again
                }
                interrupt_point();
                // We own the old head: its events are lost.
                let np = self.page(next);
                let lost = u64::from(np.entries.load(Ordering::Relaxed));
                let total = self.overrun.fetch_add(lost) + lost;
                let nl = link_next(np.link.load(Ordering::Acquire));
                // Tell the reader that takes `nl` exactly how much was lost before it; the
                // Release below publishes this with the flag.
                let seq = self.pushes.fetch_add(1) + 1;
                let newhead = self.page(nl);
                newhead.head_overrun.store(total, Ordering::Relaxed);
                newhead.push_seq.store(seq, Ordering::Relaxed);
                np.link.store(link(nl, LINK_HEAD), Ordering::Release);
                interrupt_point();
                pd.link.store(link(next, 0), Ordering::Release);
            }
            _ => {}
        }
        let np = self.page(next);
        np.entries.store(0, Ordering::Relaxed);
        np.end.store(0, Ordering::Relaxed);
        np.real_end.store(0, Ordering::Relaxed);
        np.set_commit(0);
        let new = tail_word(next, 0, tail_gen(t).wrapping_add(1));
        interrupt_point();
        if !self.tail.cas(t, new) {
            return Ok(());
        }
        interrupt_point();
        // The rest of `page` from `off` is ours: pad it the way Linux does.
        let data_size = self.data_size();
        let rest = data_size - off;
        let end = if rest == 0 {
            off
        } else if rest < 8 {
            // SAFETY: 4 bytes left, ours.
            unsafe { pd.put(off, format::header(format::TYPE_PADDING, 0)) };
            off
        } else {
            // SAFETY: `rest >= 8` bytes left, ours.
            unsafe {
                pd.put(off, format::header(format::TYPE_PADDING, 1));
                pd.put(off + 4, (rest - 4) as u32);
            }
            data_size
        };
        pd.real_end.store(off as u32, Ordering::Relaxed);
        pd.end.store(end as u32, Ordering::Release);
        self.pages_touched.fetch_add(1);
        Ok(())
    }

    /// Turns a reserved event into a discarded one (padding that keeps its length).
    pub(crate) fn discard(&self, slot: &Slot) {
        let pd = self.page(slot.page);
        // SAFETY: the event is still reserved by the caller.
        unsafe {
            pd.put(slot.event_off, format::header(format::TYPE_PADDING, 1));
            pd.put(slot.event_off + 4, (slot.event_len - 4) as u32);
        }
        interrupt_point();
        pd.entries.fetch_add(u32::MAX); // -1
        // Readers ignore a discarded event's delta: make the next event carry an absolute time.
        self.stamp_pos.store(STAMP_INVALID, Ordering::Release);
    }

    /// Counts a committed event.
    #[inline(always)]
    pub(crate) fn count_commit(&self) {
        self.entries.fetch_add(1);
    }

    /// Sets the commit of every page from the commit page up to the tail; returns the tail
    /// it published. Only the outermost writer calls it, so publications never interleave.
    #[inline(always)]
    fn publish(&self) -> u64 {
        let t = self.tail.load(Ordering::Relaxed);
        let tp = tail_page(t);
        if self.commit_page.load(Ordering::Relaxed) != tp {
            self.publish_full_pages(tp);
        }
        interrupt_point();
        self.page(tp).set_commit(tail_off(t) as u64);
        t
    }

    /// Publishes the pages the tail left, from the commit page up to `tp`.
    #[cold]
    #[inline(never)]
    fn publish_full_pages(&self, tp: u32) {
        let mut cp = self.commit_page.load(Ordering::Relaxed);
        let mut steps = 0;
        while cp != tp && steps <= self.ring_len {
            let pd = self.page(cp);
            pd.set_commit(u64::from(pd.end.load(Ordering::Acquire)));
            cp = link_next(pd.link.load(Ordering::Acquire));
            self.commit_page.store(cp, Ordering::Release);
            steps += 1;
            interrupt_point();
        }
        debug_assert_eq!(cp, tp, "commit page lost its way to the tail");
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
// few writer internals they need, kept apart from the write path above.
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

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    #[test]
    fn copy_payload_copies_every_length_exactly() {
        let src: Vec<u8> = (0..200u32).map(|i| (i * 7 + 1) as u8).collect();
        for n in 0..=src.len() {
            let mut dst = [0xeeu8; 232];
            // SAFETY: `dst` has room for `n` bytes at offset 16 and does not overlap `src`.
            unsafe { super::copy_payload(&src[..n], dst.as_mut_ptr().add(16)) };
            assert_eq!(&dst[16..16 + n], &src[..n], "length {n}");
            assert!(
                dst[..16].iter().all(|&b| b == 0xee),
                "length {n}: wrote before"
            );
            assert!(
                dst[16 + n..].iter().all(|&b| b == 0xee),
                "length {n}: wrote after"
            );
        }
    }
}
