//! Whole-sub-buffer reads (Linux's `ring_buffer_read_page`, behind `trace_pipe_raw` and
//! splice): the caller hands in a spare sub-buffer ([`DataPage`]) and gets the reader
//! sub-buffer's unread events back in it, in Linux's sub-buffer format.
//!
//! When the reader sub-buffer is whole and unread, the writer has left it and the CPU buffer
//! is not mapped, the two pages are exchanged (zero copy: the caller gets the sub-buffer, the
//! buffer keeps the spare). Otherwise the unread events are copied, whole and in order, into
//! the caller's page; while mapped it always copies, since the mapping's pages may not change.
//! Either way lost events are flagged in the page's `commit` (`RB_MISSED_EVENTS`) and their
//! number stored right after the data (`RB_MISSED_STORED`) when 8 bytes are free, and the rest
//! of the page is zeroed.

use core::ptr::NonNull;

use crate::{
    buffer::RingBuffer,
    cpu::{CpuBuffer, ReaderState},
    error::Error,
    format::{self, PAGE_SIZE, RB_MISSED_STORED, SUBBUF_HEADER_SIZE, Subbuf},
    hal::{Clock, PageAlloc, Waiter},
    sync::Ordering,
};

/// A sub-buffer-sized page owned by the caller of [`RingBuffer::read_page`] (Linux's
/// `buffer_data_read_page`). Get one from [`RingBuffer::alloc_read_page`] and give it back
/// with [`RingBuffer::free_read_page`]; dropping it leaks the page.
#[derive(Debug)]
#[must_use = "give the page back with RingBuffer::free_read_page"]
pub struct DataPage {
    mem: NonNull<u8>,
    order: u32,
}

// SAFETY: the page is owned memory, like a `Box<[u8]>`.
unsafe impl Send for DataPage {}
// SAFETY: shared access only reads.
unsafe impl Sync for DataPage {}

impl DataPage {
    /// A page of `PAGE_SIZE << order` bytes at `mem`.
    ///
    /// # Safety
    ///
    /// `mem` came from `alloc_pages(order)` of the allocator of every ring buffer the page is
    /// used with (the buffer may keep it and free it later), and nothing else uses it.
    pub const unsafe fn from_raw(mem: NonNull<u8>, order: u32) -> Self {
        Self { mem, order }
    }

    /// Gives up the page: its address and order.
    pub fn into_raw(self) -> (NonNull<u8>, u32) {
        (self.mem, self.order)
    }

    /// The page's order: it holds `PAGE_SIZE << order` bytes.
    pub fn order(&self) -> u32 {
        self.order
    }

    /// Size in bytes, header included.
    pub fn size(&self) -> usize {
        PAGE_SIZE << self.order
    }

    /// The whole sub-buffer, header included: what `trace_pipe_raw` hands to user space.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: we own `size()` bytes at `mem` (contract of `from_raw`).
        unsafe { core::slice::from_raw_parts(self.mem.as_ptr(), self.size()) }
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_bytes`, exclusively (`&mut self`).
        unsafe { core::slice::from_raw_parts_mut(self.mem.as_ptr(), self.size()) }
    }

    /// The page parsed as a Linux sub-buffer.
    pub fn subbuf(&self) -> Result<Subbuf<'_>, Error> {
        Subbuf::new(self.as_bytes())
    }
}

/// What [`RingBuffer::read_page`] put in the caller's page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRead {
    /// Bytes of events in the page (its `commit` without the flags).
    pub len: usize,
    /// Data events in the page, now counted as read.
    pub events: u64,
    /// Events lost just before the page's first event (0: none). Also flagged in the page.
    pub lost: u64,
    /// Whether the sub-buffer itself was handed over (zero copy) rather than copied.
    pub swapped: bool,
}

impl CpuBuffer {
    /// Copies the unread records of the reader page (whole records, time extends with their
    /// event) into `out` (a data area of the same size); returns the bytes and data events
    /// copied and the time the copy starts from.
    fn copy_reader_page(&self, st: &mut ReaderState, out: &mut [u8]) -> (usize, u64, u64) {
        let (events, range, start_stamp) = self.take_reader_page(st);
        let pd = &self.pages()[st.reader_page as usize];
        // SAFETY: the walk above found `range` below the published commit: those bytes are
        // written and stay as they are while the page is the reader page (we hold the reader
        // lock).
        let data = unsafe { core::slice::from_raw_parts(pd.data(), range.end) };
        // Everything left fits: `out` is as large as the page's data area.
        out[..range.len()].copy_from_slice(&data[range.clone()]);
        (range.len(), events, start_stamp)
    }

    /// Exchanges the memory of the reader page with `mem`; returns the old memory.
    ///
    /// # Safety
    ///
    /// The caller holds the reader lock and the writer has left the reader page (it is not
    /// the commit page), so nobody else reads its `mem`; `mem` is a sub-buffer of the same
    /// size from the buffer's allocator, which nothing else uses.
    unsafe fn exchange_reader_mem(&self, st: &ReaderState, mem: NonNull<u8>) -> NonNull<u8> {
        let pd = &self.pages()[st.reader_page as usize];
        let old = pd.mem.get();
        // SAFETY: by the contract nobody else reads or writes this sub-buffer's address now.
        unsafe { pd.mem.set(mem) };
        // The spare is the new, empty reader page: the next read swaps it into the ring.
        pd.clear();
        old
    }
}

impl<A: PageAlloc, C: Clock, W: Waiter> RingBuffer<A, C, W> {
    /// A spare page for [`RingBuffer::read_page`], of the current sub-buffer size (Linux's
    /// `ring_buffer_alloc_read_page`).
    ///
    /// Context: Task context; allocates one sub-buffer.
    pub fn alloc_read_page(&self) -> Result<DataPage, Error> {
        let mem = self
            .alloc
            .alloc_pages(self.subbuf_order)
            .ok_or(Error::NoMemory)?;
        Ok(DataPage {
            mem,
            order: self.subbuf_order,
        })
    }

    /// Gives a page from [`RingBuffer::alloc_read_page`] (or one `read_page` handed over) back
    /// to the allocator.
    ///
    /// Context: Task context; frees the page.
    pub fn free_read_page(&self, page: DataPage) {
        // SAFETY: by `DataPage`'s contract the page came from this allocator with its order
        // and is not used any more (we own it).
        unsafe { self.alloc.free_pages(page.mem, page.order) };
    }

    /// Reads the unread events of `cpu`'s reader sub-buffer into `page`, in Linux's format
    /// (Linux's `ring_buffer_read_page`): by exchanging the pages when the reader sub-buffer
    /// is whole and unread, the writer has left it and the CPU is not mapped (zero copy:
    /// `page` becomes that sub-buffer and the buffer keeps the old `page`), by copying its
    /// unread events otherwise. Lost events before the first one are flagged in the page's
    /// `commit` and their number stored after the data when 8 bytes are free; the rest of
    /// the page is zeroed.
    ///
    /// `full`: only a sub-buffer the writer has left (Linux's `full`); the one being written
    /// gives `Ok(None)`. `Ok(None)` also when nothing is unread; nothing is consumed then.
    /// `InvalidArgument` for a bad CPU or a page of another size than the sub-buffers (for
    /// example one allocated before [`RingBuffer::set_subbuf_order`]).
    ///
    /// Takes `cpu`'s reader lock, like [`RingBuffer::reader`].
    ///
    /// Context: Task context, or interrupts off (the `read`/`splice` path); takes the reader lock (spins), never allocates.
    pub fn read_page(
        &self,
        cpu: usize,
        page: &mut DataPage,
        full: bool,
    ) -> Result<Option<PageRead>, Error> {
        let cb = self.cpu(cpu)?;
        if page.order != self.subbuf_order {
            return Err(Error::InvalidArgument);
        }
        let mut st = cb.reader.lock();
        if !cb.reader_ready(&mut st) {
            return Ok(None);
        }
        let on_commit = st.reader_page == cb.commit_page.load(Ordering::Acquire);
        if full && on_commit {
            return Ok(None);
        }
        let lost = st.lost;
        let swapped = st.read == 0 && !on_commit && st.map_count == 0;
        let (len, events) = if swapped {
            let pd = &cb.pages()[st.reader_page as usize];
            let events = pd.events();
            // The end of the last event, so the lost count can go where the end padding was.
            let len = pd.data_end();
            // SAFETY: reader lock held, the writer left the page (not the commit page), and
            // the page is the buffer's size from its allocator (order checked, `DataPage`'s
            // contract).
            page.mem = unsafe { cb.exchange_reader_mem(&st, page.mem) };
            (len, events)
        } else {
            let data_size = cb.data_size();
            let bytes = page.as_bytes_mut();
            let (len, events, stamp) = cb.copy_reader_page(
                &mut st,
                &mut bytes[SUBBUF_HEADER_SIZE..SUBBUF_HEADER_SIZE + data_size],
            );
            bytes[0..8].copy_from_slice(&stamp.to_le_bytes());
            (len, events)
        };
        cb.read.fetch_add(events, Ordering::Relaxed);
        st.lost = 0;
        drop(st);

        let bytes = page.as_bytes_mut();
        let data = &mut bytes[SUBBUF_HEADER_SIZE..];
        let commit = if lost > 0 {
            format::missed_commit(len, data.len())
        } else {
            len as u64
        };
        let mut end = len;
        if commit & RB_MISSED_STORED != 0 {
            data[len..len + 8].copy_from_slice(&lost.to_le_bytes());
            end += 8;
        }
        data[end..].fill(0);
        bytes[8..16].copy_from_slice(&commit.to_le_bytes());
        Ok(Some(PageRead {
            len,
            events,
            lost,
            swapped,
        }))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{boxed::Box, vec};

    use crate::{
        Config, LocalCpu, RingBuffer,
        format::{event_len, header},
        sim::{ManualClock, PagePool},
    };

    /// A record that does not decode ends the copy right after the last record that did, and
    /// the rest of the page counts as read (skipped), as the copy always did.
    #[test]
    fn a_corrupt_record_ends_the_copy_at_the_last_good_one() {
        let pool = Box::new(PagePool::<16>::new());
        let rb = RingBuffer::new(Config::new(1, 2), &*pool, ManualClock::new(1000)).unwrap();
        // SAFETY: this test thread is CPU 0's only writer.
        let cpu = unsafe { LocalCpu::new(0) };
        for i in 0..3u8 {
            rb.clock().advance(10);
            rb.write(cpu, &[i + 1; 8]).unwrap();
        }
        let cb = rb.cpu(0).unwrap();
        let mut st = cb.reader.lock();
        assert!(cb.reader_ready(&mut st));
        let pd = &cb.pages()[st.reader_page as usize];
        let (first, size) = (event_len(8), pd.size());
        assert_eq!(size, 3 * first);
        // The second event claims a payload far past the end of the page.
        // SAFETY: inside the data area of a page no writer uses (no write runs); we hold the
        // reader lock.
        unsafe {
            let rec = pd.data().add(first).cast::<u32>();
            rec.write_unaligned(header(0, 0).to_le());
            rec.add(1).write_unaligned(0xffff_fff0u32.to_le());
        }
        let mut out = vec![0u8; cb.data_size()];
        let (len, events, stamp) = cb.copy_reader_page(&mut st, &mut out);
        assert_eq!((len, events), (first, 1));
        assert_eq!(stamp, pd.time_stamp());
        assert_eq!(st.read, size, "the rest of the page is skipped");
        // SAFETY: the first event's bytes, committed and unchanged.
        let good = unsafe { core::slice::from_raw_parts(pd.data(), first) };
        assert_eq!(&out[..first], good);
        assert!(out[first..].iter().all(|&b| b == 0));
    }
}
