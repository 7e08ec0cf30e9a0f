//! The consuming reader: reads the reader sub-buffer, and swaps it with the head of the ring
//! (lockless against writers) when it is used up.

use core::ops::Range;

use crate::{
    cpu::{
        CpuBuffer, LINK_HEAD, LINK_UPDATE, ReaderState, link, link_cleared, link_flag, link_next,
    },
    format::{self, Record},
    sync::{Ordering, SpinGuard, spin_hint},
};

/// How long the reader waits for a writer that is moving the head (`UPDATE` on the link).
#[cfg(not(any(loom, miri)))]
const HEAD_SPINS: u32 = 1 << 16;
#[cfg(any(loom, miri))]
const HEAD_SPINS: u32 = 4;

/// One consumed (or peeked) event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event<'a> {
    /// Absolute time, as the format reconstructs it.
    pub ts: u64,
    /// The payload as stored: the written bytes, zero-padded to a multiple of 4 (at least 4).
    pub payload: &'a [u8],
    /// Events lost (overwritten) just before this one.
    pub lost: u64,
}

impl Event<'_> {
    /// The payload read as a `T` (an event written with [`RingBuffer::write_value`]): its
    /// first `size_of::<T>()` bytes, copied (no alignment needed). `None` when the payload is
    /// shorter than a `T`.
    ///
    /// [`RingBuffer::write_value`]: crate::RingBuffer::write_value
    pub fn read_as<T: zerocopy::FromBytes>(&self) -> Option<T> {
        T::read_from_prefix(self.payload).ok().map(|(v, _)| v)
    }
}

impl CpuBuffer {
    /// Finds the head: the page whose incoming link has `HEAD`, and that link's owner.
    pub(crate) fn find_head(&self, st: &ReaderState) -> Option<(u32, u32)> {
        for _ in 0..HEAD_SPINS {
            let mut p = st.head_hint;
            let mut busy = false;
            for _ in 0..=self.ring_len {
                let l = self.pages()[p as usize].link.load(Ordering::Acquire);
                match link_flag(l) {
                    LINK_HEAD => return Some((p, link_next(l))),
                    LINK_UPDATE => {
                        busy = true;
                        break;
                    }
                    _ => p = link_next(l),
                }
            }
            if !busy {
                // A full turn without a head: only a broken ring does this.
                return None;
            }
            spin_hint();
        }
        None
    }

    /// Swaps the reader page with the head. Returns false when the head could not be taken
    /// (a writer kept it busy).
    pub(crate) fn swap_reader(&self, st: &mut ReaderState) -> bool {
        let rp = st.reader_page;
        // The reader page goes back into the ring, where the tail may enter it without a head
        // push (which is what empties a page it overwrites): empty it now, while it is ours.
        // Whoever calls this has read it up to its commit and the writer has left it.
        self.pages()[rp as usize].clear();
        for _ in 0..HEAD_SPINS {
            let Some((prev, head)) = self.find_head(st) else {
                return false;
            };
            let hn = link_next(self.pages()[head as usize].link.load(Ordering::Acquire));
            self.pages()[rp as usize]
                .link
                .store(link(hn, LINK_HEAD), Ordering::Relaxed);
            let l = self.pages()[prev as usize].link.load(Ordering::Acquire);
            if link_flag(l) != LINK_HEAD || link_next(l) != head {
                continue;
            }
            if self.pages()[prev as usize]
                .link
                .compare_exchange(l, link_cleared(l, rp), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                // Exact lost count: the CAS read the link state that made `head` the head.
                // Either a writer push did (it stored the overrun total and its push number
                // in the page before the flag), or our previous swap did (no push since).
                let pd = &self.pages()[head as usize];
                let seq = pd.push_seq.load(Ordering::Acquire);
                let overrun = if head == st.next_head && seq <= st.last_push_seq {
                    st.last_overrun
                } else {
                    st.last_push_seq = seq;
                    pd.head_overrun.load(Ordering::Acquire)
                };
                st.next_head = hn;
                st.reader_page = head;
                st.read = 0;
                st.head_hint = rp;
                st.lost += overrun - st.last_overrun;
                st.last_overrun = overrun;
                self.pages_read.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
        false
    }

    /// Makes the reader page hold unread committed data, swapping as needed.
    pub(crate) fn reader_ready(&self, st: &mut ReaderState) -> bool {
        for _ in 0..=self.ring_len + 1 {
            let rp = st.reader_page;
            let cp = self.commit_page.load(Ordering::Acquire);
            let size = self.pages()[rp as usize].size();
            if st.read < size {
                return true;
            }
            if rp == cp {
                return false;
            }
            if !self.swap_reader(st) {
                return false;
            }
        }
        false
    }

    /// The next data event of the reader page (skipping time and padding records), consumed
    /// unless `peek`.
    pub(crate) fn next_event<'a>(&'a self, st: &mut ReaderState, peek: bool) -> Option<Event<'a>> {
        loop {
            if !self.reader_ready(st) {
                return None;
            }
            let pd = &self.pages()[st.reader_page as usize];
            let size = pd.size();
            if st.read == 0 {
                st.read_stamp = pd.time_stamp();
            }
            // SAFETY: the bytes below the published commit are written and no writer touches
            // them again while the page is the reader page (we hold the reader lock).
            let data = unsafe { core::slice::from_raw_parts(pd.data(), size) };
            let read = |off: usize| {
                u32::from_le_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]])
            };
            let Ok((rec, next)) = format::decode_record(read, st.read, size) else {
                // Cannot happen with our own writer; skip the page rather than loop.
                st.read = size;
                continue;
            };
            match rec {
                Record::Data { delta, offset, len } => {
                    let ts = st.read_stamp.wrapping_add(u64::from(delta));
                    let lost = st.lost;
                    if !peek {
                        st.read = next;
                        st.read_stamp = ts;
                        st.lost = 0;
                        self.read.fetch_add(1, Ordering::Relaxed);
                    }
                    return Some(Event {
                        ts,
                        payload: &data[offset..offset + len],
                        lost,
                    });
                }
                Record::TimeExtend(d) => st.read_stamp = st.read_stamp.wrapping_add(d),
                Record::TimeStamp(abs) => st.read_stamp = format::fix_abs_ts(abs, st.read_stamp),
                Record::PaddingToEnd | Record::Discarded => {}
            }
            st.read = next;
        }
    }

    /// Walks the unread records of the reader page up to its committed size, consuming them:
    /// returns the data events passed, the data-area bytes of the whole records passed, and
    /// the time the walk started from. A record that does not decode (cannot happen with our
    /// own writer) ends the walk and skips the rest of the page; the range ends at the last
    /// record that decoded. Does not count the events in `read`.
    pub(crate) fn take_reader_page(&self, st: &mut ReaderState) -> (u64, Range<usize>, u64) {
        let pd = &self.pages()[st.reader_page as usize];
        let size = pd.size();
        // SAFETY: as in `next_event`.
        let data = unsafe { core::slice::from_raw_parts(pd.data(), size) };
        let read = |off: usize| {
            u32::from_le_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]])
        };
        if st.read == 0 {
            st.read_stamp = pd.time_stamp();
        }
        let (start, start_stamp) = (st.read, st.read_stamp);
        let mut events = 0;
        while st.read < size {
            let Ok((rec, next)) = format::decode_record(read, st.read, size) else {
                // Skip the rest rather than loop; the range ends where the last record did.
                let end = st.read;
                st.read = size;
                return (events, start..end, start_stamp);
            };
            match rec {
                Record::Data { delta, .. } => {
                    st.read_stamp = st.read_stamp.wrapping_add(u64::from(delta));
                    events += 1;
                }
                Record::TimeExtend(d) => st.read_stamp = st.read_stamp.wrapping_add(d),
                Record::TimeStamp(abs) => st.read_stamp = format::fix_abs_ts(abs, st.read_stamp),
                Record::PaddingToEnd | Record::Discarded => {}
            }
            st.read = next;
        }
        (events, start..st.read, start_stamp)
    }

    /// Consumes every committed event left on the reader page; returns how many.
    pub(crate) fn consume_reader_page(&self, st: &mut ReaderState) -> u64 {
        let (events, _, _) = self.take_reader_page(st);
        self.read.fetch_add(events, Ordering::Relaxed);
        events
    }
}

/// A consuming reader of one CPU buffer. Holds that CPU's reader lock (writers never take it).
///
/// Not an `Iterator`: each event borrows the sub-buffer it lives in, which the next call may
/// hand back to the writer. Use `while let Some(ev) = reader.next_event() { ... }`.
pub struct Reader<'a> {
    pub(crate) cpu: &'a CpuBuffer,
    pub(crate) st: SpinGuard<'a, ReaderState>,
}

impl Reader<'_> {
    /// The CPU this reader reads.
    pub fn cpu(&self) -> usize {
        self.cpu.cpu
    }

    /// Consumes the oldest event, `None` when nothing committed is left.
    #[allow(clippy::should_implement_trait)]
    pub fn next_event(&mut self) -> Option<Event<'_>> {
        self.cpu.next_event(&mut self.st, false)
    }

    /// The oldest event, left in the buffer.
    pub fn peek(&mut self) -> Option<Event<'_>> {
        self.cpu.next_event(&mut self.st, true)
    }
}
