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

use core::{cell::UnsafeCell, ptr::NonNull};

use crate::{
    error::Error,
    format::{self, COMMIT_MASK, MAX_DELTA, SUBBUF_HEADER_SIZE, TIME_EXTEND_SIZE},
    hal::Clock,
    mem::{PageArray, SubbufMem},
    sync::{AtomicBool, AtomicU32, AtomicU64, Local, Ordering, SpinLock},
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

/// `nest`: committing depth in the low half, number of reservations ever in the high half.
const NEST_ONE: u64 = (1 << 32) | 1;
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
    fn header_word(&self, offset: usize) -> &core::sync::atomic::AtomicU64 {
        // SAFETY: the page is at least 4 KiB, page-aligned, lives as long as `self`, and the
        // header words are only ever accessed atomically.
        unsafe { core::sync::atomic::AtomicU64::from_ptr(self.mem.as_ptr().add(offset).cast()) }
    }

    /// Publishes the commit word (data size and flags).
    pub(crate) fn set_commit(&self, value: u64) {
        self.commit.store(value, Ordering::Release);
        self.header_word(8).store(value, Ordering::Release);
    }

    /// Committed data bytes.
    pub(crate) fn size(&self) -> usize {
        (self.commit.load(Ordering::Acquire) & COMMIT_MASK) as usize
    }

    pub(crate) fn time_stamp(&self) -> u64 {
        self.header_word(0).load(Ordering::Acquire)
    }

    fn set_time_stamp(&self, ts: u64) {
        self.header_word(0).store(ts, Ordering::Release);
    }

    /// Start of the data area.
    pub(crate) fn data(&self) -> *mut u8 {
        // SAFETY: the header is inside the page.
        unsafe { self.mem.as_ptr().add(SUBBUF_HEADER_SIZE) }
    }

    /// Writes a little-endian word at data offset `off`.
    ///
    /// # Safety
    ///
    /// `off + 4` is inside the data area and the caller owns those bytes (reserved or padding).
    unsafe fn put(&self, off: usize, word: u32) {
        // SAFETY: in bounds and 4-aligned (offsets are multiples of 4 from a page boundary);
        // the caller owns the bytes.
        unsafe { self.data().add(off).cast::<u32>().write(word.to_le()) }
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
    nest: Local<AtomicU64>,
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
            (&self.nest.0, &other.nest.0),
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
        let t = self.commit_page.load(Ordering::Relaxed);
        self.commit_page
            .store(other.commit_page.load(Ordering::Relaxed), Ordering::Release);
        other.commit_page.store(t, Ordering::Release);
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
            nest: Local::<AtomicU64>::new(0),
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
            let i = i as u32;
            let next = if i + 1 >= n { 0 } else { i + 1 };
            let flag = if i == n - 1 { LINK_HEAD } else { 0 };
            p.link.store(link(next, flag), Ordering::Relaxed);
            p.entries.store(0, Ordering::Relaxed);
            p.end.store(0, Ordering::Relaxed);
            p.real_end.store(0, Ordering::Relaxed);
            p.set_commit(0);
            p.set_time_stamp(0);
            p.head_overrun.store(0, Ordering::Relaxed);
            p.push_seq.store(0, Ordering::Relaxed);
        }
        self.tail.store(tail_word(0, 0, 0), Ordering::Release);
        self.commit_page.store(0, Ordering::Release);
        self.stamp_pos.store(STAMP_INVALID, Ordering::Relaxed);
        for c in [
            &self.entries,
            &self.overrun,
            &self.pushes,
            &self.dropped,
            &self.pages_touched,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        self.read.store(0, Ordering::Relaxed);
        self.pages_read.store(0, Ordering::Relaxed);
        st.reader_page = n;
        st.read = 0;
        st.read_stamp = 0;
        st.last_overrun = 0;
        st.next_head = 0;
        st.last_push_seq = 0;
        st.lost = 0;
        st.meta_lost = 0;
        st.head_hint = n - 1;
    }

    pub(crate) fn data_size(&self) -> usize {
        self.subbuf_size - SUBBUF_HEADER_SIZE
    }

    fn page(&self, i: u32) -> &PageDesc {
        &self.pages()[i as usize]
    }

    /// Enters a writer section; returns whether it interrupted another writer.
    pub(crate) fn begin(&self) -> bool {
        let prev = self.nest.fetch_add(NEST_ONE);
        prev as u32 != 0
    }

    /// Reserves room for a `len`-byte payload. The caller did [`CpuBuffer::begin`] and will call
    /// [`CpuBuffer::end`] whatever happens.
    #[inline]
    pub(crate) fn reserve(
        &self,
        clock: &impl Clock,
        len: usize,
        nested: bool,
    ) -> Result<Slot, Error> {
        if self.disabled.load(Ordering::Relaxed) != 0 {
            return Err(Error::Disabled);
        }
        if len > format::max_payload(self.subbuf_size) {
            return Err(Error::EventTooLarge);
        }
        // The event's shape, once: `stored_len` payload bytes behind a one-word header, or
        // behind a header and a length word for payloads above `MAX_SMALL_DATA` (the same
        // values as `format::event_len` and `format::data_header`, without recomputing them).
        let stored = format::stored_len(len);
        let large = len > format::MAX_SMALL_DATA;
        let payload_off = if large { 8 } else { 4 };
        let event_len = stored + payload_off;
        debug_assert_eq!(event_len, format::event_len(len));
        let data_size = self.data_size();
        loop {
            let t = self.tail.load(Ordering::Acquire);
            let ts = clock.now();
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
            if !self.tail.cas(t, new) {
                continue;
            }
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
            let payload = unsafe {
                if large {
                    pd.put(event_off, format::header(0, delta));
                    pd.put(event_off + 4, stored as u32 + 4);
                } else {
                    pd.put(event_off, format::header((stored / 4) as u32, delta));
                }
                let payload = pd.data().add(event_off + payload_off);
                // Zero the last word when it has padding, so the padding to 4 bytes is
                // deterministic whatever the caller fills in (the caller owns all `len`
                // bytes, so a payload without padding needs no store).
                if stored != len {
                    payload.add(stored - 4).cast::<u32>().write(0);
                }
                payload
            };
            self.last_stamp.store(ts, Ordering::Relaxed);
            self.stamp_pos.store(new, Ordering::Release);
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
        if !self.tail.cas(t, new) {
            return Ok(());
        }
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
        pd.entries.fetch_add(u32::MAX); // -1
        // Readers ignore a discarded event's delta: make the next event carry an absolute time.
        self.stamp_pos.store(STAMP_INVALID, Ordering::Release);
    }

    /// Counts a committed event.
    pub(crate) fn count_commit(&self) {
        self.entries.fetch_add(1);
    }

    /// Leaves a writer section; the outermost one publishes everything written so far.
    #[inline(always)]
    pub(crate) fn end(&self) {
        loop {
            let v = self.nest.load(Ordering::Relaxed);
            if v as u32 == 1 {
                self.publish();
            }
            let after = self.nest.fetch_add(u64::MAX).wrapping_sub(1);
            if (after >> 32) != (v >> 32) && after as u32 == 0 {
                // A writer came in between our publish and the decrement and did not publish.
                self.nest.fetch_add(1);
                continue;
            }
            return;
        }
    }

    /// Sets the commit of every page from the commit page up to the tail.
    #[inline(always)]
    fn publish(&self) {
        loop {
            let t = self.tail.load(Ordering::Acquire);
            let tp = tail_page(t);
            let mut cp = self.commit_page.load(Ordering::Relaxed);
            let mut steps = 0;
            while cp != tp && steps <= self.ring_len {
                let pd = self.page(cp);
                pd.set_commit(u64::from(pd.end.load(Ordering::Acquire)));
                cp = link_next(pd.link.load(Ordering::Acquire));
                self.commit_page.store(cp, Ordering::Release);
                steps += 1;
            }
            debug_assert_eq!(cp, tp, "commit page lost its way to the tail");
            self.page(tp).set_commit(tail_off(t) as u64);
            if self.tail.load(Ordering::Acquire) == t {
                return;
            }
        }
    }

    /// Whether a writer section is open; exact only on the writers' own CPU.
    pub(crate) fn writers_active(&self) -> bool {
        self.nest.load(Ordering::Relaxed) as u32 != 0
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
        let generation = tail_gen(self.tail.load(Ordering::Relaxed)).wrapping_add(1);
        self.tail
            .store(tail_word(page, off, generation), Ordering::Release);
        self.commit_page.store(page, Ordering::Release);
    }

    /// Moves the tail back to the start of its page, in a new generation; returns the page.
    /// For a reset on the writers' own CPU (`reset.rs`): from then on, what a nested writer
    /// that finds recording disabled still does (publish the tail page's commit) writes 0.
    pub(crate) fn rewind_tail(&self) -> u32 {
        let t = self.tail.load(Ordering::Relaxed);
        let page = tail_page(t);
        let generation = tail_gen(t).wrapping_add(1);
        self.tail
            .store(tail_word(page, 0, generation), Ordering::Release);
        page
    }
}
