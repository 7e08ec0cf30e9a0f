//! Mapping a CPU buffer for a user-space consumer (Linux 6.10's `ring_buffer_map()` family):
//! sub-buffer IDs, the meta page, the reader swap on demand, and the page layout.
//!
//! ```text
//!   page 0                       meta page (struct trace_buffer_meta)
//!   pages 1 .. subbuf_pages      zero pages (the meta page is padded to a sub-buffer)
//!   then, per sub-buffer ID 0..nr_subbufs, subbuf_pages pages of that sub-buffer
//! ```

use core::ptr::NonNull;

use crate::{
    buffer::RingBuffer,
    cpu::{CpuBuffer, ReaderState, link_next},
    error::Error,
    format::{self, PAGE_SIZE, RB_MISSED_STORED, ReaderMeta, TraceBufferMeta},
    hal::{Clock, PageAlloc, Waiter},
    mapped::MapRegion,
    sync::Ordering,
};

/// One page of a mapping, as [`MapLayout::pages`] lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapPage {
    /// The meta page.
    Meta,
    /// Padding after the meta page: map the zero page.
    Zero,
    /// Page `page` of the sub-buffer with ID `id`.
    Subbuf {
        /// Sub-buffer ID.
        id: u32,
        /// Page within the sub-buffer.
        page: u32,
    },
}

/// Geometry of a mapping: the meta page padded to a sub-buffer, then every sub-buffer in ID
/// order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapLayout {
    subbuf_order: u32,
    nr_subbufs: u32,
}

impl MapLayout {
    /// The layout of `nr_subbufs` sub-buffers (the reader included) of `PAGE_SIZE << order`.
    pub const fn new(subbuf_order: u32, nr_subbufs: u32) -> Self {
        Self {
            subbuf_order,
            nr_subbufs,
        }
    }

    /// Pages per sub-buffer.
    pub const fn subbuf_pages(&self) -> usize {
        1 << self.subbuf_order
    }

    /// Pages of the whole mapping.
    pub const fn total_pages(&self) -> usize {
        (self.nr_subbufs as usize + 1) << self.subbuf_order
    }

    /// Bytes of the whole mapping.
    pub const fn total_len(&self) -> usize {
        self.total_pages() * PAGE_SIZE
    }

    /// What page `index` of the mapping is.
    pub const fn page(&self, index: usize) -> Option<MapPage> {
        let sp = self.subbuf_pages();
        if index >= self.total_pages() {
            None
        } else if index == 0 {
            Some(MapPage::Meta)
        } else if index < sp {
            Some(MapPage::Zero)
        } else {
            let k = index - sp;
            Some(MapPage::Subbuf {
                id: (k / sp) as u32,
                page: (k % sp) as u32,
            })
        }
    }

    /// The pages to insert for a mapping of `len_pages` pages at page offset `pgoff` (what
    /// Linux's `__rb_map_vma` does). `InvalidArgument` when `pgoff` is not sub-buffer aligned
    /// (order > 0), when the request is empty, or when it runs past the end.
    pub fn pages(&self, pgoff: usize, len_pages: usize) -> Result<MapPages, Error> {
        let sp = self.subbuf_pages();
        if self.subbuf_order > 0 && pgoff % sp != 0 {
            return Err(Error::InvalidArgument);
        }
        let avail = self
            .total_pages()
            .checked_sub(pgoff)
            .ok_or(Error::InvalidArgument)?;
        if len_pages == 0 || len_pages > avail {
            return Err(Error::InvalidArgument);
        }
        Ok(MapPages {
            layout: *self,
            next: pgoff,
            end: pgoff + len_pages,
        })
    }
}

/// Iterator over the pages of a mapping request.
#[derive(Debug, Clone)]
pub struct MapPages {
    layout: MapLayout,
    next: usize,
    end: usize,
}

impl Iterator for MapPages {
    type Item = MapPage;
    fn next(&mut self) -> Option<MapPage> {
        if self.next >= self.end {
            return None;
        }
        let p = self.layout.page(self.next);
        self.next += 1;
        p
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.end - self.next;
        (n, Some(n))
    }
}

impl ExactSizeIterator for MapPages {}

/// Numbers the sub-buffers: the reader is 0, then from the head around the ring.
pub(crate) fn refresh_ids(cb: &CpuBuffer, st: &ReaderState) -> bool {
    let Some((_, head)) = cb.find_head(st) else {
        return false;
    };
    let set = |page: u32, id: u32| {
        cb.pages()[page as usize].id.store(id, Ordering::Relaxed);
        cb.pages()[id as usize].by_id.store(page, Ordering::Relaxed);
    };
    set(st.reader_page, 0);
    let mut p = head;
    for id in 1..=cb.ring_len {
        set(p, id);
        p = link_next(cb.pages()[p as usize].link.load(Ordering::Acquire));
    }
    true
}

/// Writes the meta page from the current reader state and counters.
pub(crate) fn update_meta(cb: &CpuBuffer, st: &ReaderState) {
    let Some(meta) = st.meta else { return };
    let value = TraceBufferMeta {
        meta_page_size: cb.subbuf_size as u32,
        meta_struct_len: core::mem::size_of::<TraceBufferMeta>() as u32,
        subbuf_size: cb.subbuf_size as u32,
        nr_subbufs: cb.ring_len + 1,
        reader: ReaderMeta {
            lost_events: st.meta_lost,
            id: cb.pages()[st.reader_page as usize]
                .id
                .load(Ordering::Relaxed),
            read: st.read as u32,
        },
        flags: 0,
        entries: cb.entries.load(Ordering::Acquire),
        overrun: cb.overrun.load(Ordering::Acquire),
        read: cb.read.load(Ordering::Acquire),
        reserved1: 0,
        reserved2: 0,
    };
    // SAFETY: the meta page is a whole page we own, page-aligned (enough for the struct's
    // alignment); the user-space side only reads it. Volatile: another address space reads it.
    unsafe {
        meta.as_ptr()
            .cast::<TraceBufferMeta>()
            .write_volatile(value)
    };
}

impl<A: PageAlloc, C: Clock, W: Waiter> RingBuffer<A, C, W> {
    /// Maps `cpu`'s buffer: the first call numbers the sub-buffers and allocates the meta page;
    /// later calls only count (`Busy` when the count would overflow).
    ///
    /// Context: Task context (the `mmap` handler); the first map of a CPU allocates its meta page and takes the reader lock.
    pub fn map(&self, cpu: usize) -> Result<(), Error> {
        let cb = self.cpu(cpu)?;
        let mut st = cb.reader.lock();
        if st.map_count > 0 {
            st.map_count = st.map_count.checked_add(1).ok_or(Error::Busy)?;
            return Ok(());
        }
        if !refresh_ids(cb, &st) {
            return Err(Error::Busy);
        }
        let meta = self.alloc.alloc_pages(0).ok_or(Error::NoMemory)?;
        st.meta = Some(meta);
        st.map_count = 1;
        // Lost events not delivered yet are shown to the mapped consumer with the reader page
        // (and count as delivered once `map_get_reader` accounts that page as read).
        st.meta_lost = st.lost;
        update_meta(cb, &st);
        Ok(())
    }

    /// Undoes one [`RingBuffer::map`]; the last one frees the meta page. `NotMapped` if not
    /// mapped.
    ///
    /// Context: Task context; the last unmap frees the meta page; takes the reader lock.
    pub fn unmap(&self, cpu: usize) -> Result<(), Error> {
        let cb = self.cpu(cpu)?;
        let mut st = cb.reader.lock();
        match st.map_count {
            0 => Err(Error::NotMapped),
            1 => {
                st.map_count = 0;
                if let Some(meta) = st.meta.take() {
                    // SAFETY: from `alloc_pages(0)` in `map`; the caller has torn down the
                    // user mappings of it before the last unmap.
                    unsafe { self.alloc.free_pages(meta, 0) };
                }
                Ok(())
            }
            _ => {
                st.map_count -= 1;
                Ok(())
            }
        }
    }

    /// How many times `cpu` is mapped.
    ///
    /// Context: Any context that may take the reader lock (spins on it).
    pub fn map_count(&self, cpu: usize) -> Result<u32, Error> {
        Ok(self.cpu(cpu)?.reader.lock().map_count)
    }

    /// The layout of `cpu`'s mapping: which pages an mmap request of it covers.
    ///
    /// Errors: `InvalidArgument` for a CPU the buffer does not have.
    ///
    /// Context: Task context (the `mmap` handler); no allocation.
    pub fn map_layout(&self, cpu: usize) -> Result<MapLayout, Error> {
        Ok(self.layout_of(self.cpu(cpu)?))
    }

    /// The layout of `cb`'s mapping.
    fn layout_of(&self, cb: &CpuBuffer) -> MapLayout {
        MapLayout::new(self.subbuf_order, cb.ring_len + 1)
    }

    /// The kernel address of one page of `cpu`'s mapping (to build the user mapping from);
    /// `None` for [`MapPage::Zero`] (map the zero page).
    ///
    /// Context: Task context (the `mmap` or fault handler); no allocation.
    pub fn map_page(&self, cpu: usize, page: MapPage) -> Result<Option<NonNull<u8>>, Error> {
        let cb = self.cpu(cpu)?;
        let st = cb.reader.lock();
        if st.map_count == 0 {
            return Err(Error::NotMapped);
        }
        match page {
            MapPage::Meta => Ok(st.meta),
            MapPage::Zero => Ok(None),
            MapPage::Subbuf { id, page } => {
                if id > cb.ring_len || page as usize >= 1 << self.subbuf_order {
                    return Err(Error::InvalidArgument);
                }
                let idx = cb.pages()[id as usize].by_id.load(Ordering::Relaxed);
                let mem = cb.pages()[idx as usize].mem.get();
                // SAFETY: `page` is inside the sub-buffer.
                Ok(Some(unsafe { mem.add(page as usize * PAGE_SIZE) }))
            }
        }
    }

    /// Hands the mapped consumer a reader sub-buffer (Linux's `ring_buffer_map_get_reader`,
    /// the `TRACE_MMAP_IOCTL_GET_READER` ioctl): if the reader sub-buffer has unread data, it
    /// is accounted as read (the consumer reads it from the mapping); otherwise a new one is
    /// swapped in. Lost events are flagged (and stored when room) in the new sub-buffer's
    /// `commit`, as Linux does. The meta page is refreshed.
    ///
    /// Context: Task context (the ioctl); takes the reader lock (spins), never allocates.
    pub fn map_get_reader(&self, cpu: usize) -> Result<(), Error> {
        let cb = self.cpu(cpu)?;
        let mut st = cb.reader.lock();
        if st.map_count == 0 {
            return Err(Error::NotMapped);
        }
        // Lost events accumulate in `st.lost` over every swap made here (several happen when
        // sub-buffers hold no data events, only padding or discarded events); the meta page and
        // the sub-buffer header show the total, and they count as delivered once the
        // sub-buffer's events are accounted as read.
        // Each turn consumes or swaps; at most every sub-buffer is swapped in once.
        for _ in 0..2 * (cb.ring_len + 2) {
            // The commit page first: once it has moved on, the reader page's size is final.
            let commit_page = cb.commit_page.load(Ordering::Acquire);
            let pd = &cb.pages()[st.reader_page as usize];
            if st.read < pd.size() {
                // Only padding left (the writer closed the page): look further, unlike Linux,
                // which makes the consumer call again.
                if cb.consume_reader_page(&mut st) > 0 {
                    st.lost = 0;
                    break;
                }
                continue;
            }
            if st.reader_page == commit_page {
                break;
            }
            if !cb.swap_reader(&mut st) {
                break;
            }
            // Linux 6.10 hands the losses over in the sub-buffer's commit flags and stored
            // count, and zeroes the meta page's `reader.lost_events`; we put them there only
            // when the sub-buffer cannot carry the count (no room after the events, or the
            // writer is still on it), so a reader that reads both counts them once.
            st.meta_lost = st.lost;
            if st.lost > 0 && mark_missed(cb, &st) {
                st.meta_lost = 0;
            }
        }
        update_meta(cb, &st);
        Ok(())
    }

    /// A [`MapRegion`] over `cpu`'s mapping as user space would see it, read through the
    /// kernel addresses (for tests, examples and in-kernel consumers).
    ///
    /// Context: Task context; no allocation.
    pub fn mapped_view(&self, cpu: usize) -> Result<MappedView<'_, A, C, W>, Error> {
        if self.map_count(cpu)? == 0 {
            return Err(Error::NotMapped);
        }
        Ok(MappedView { rb: self, cpu })
    }
}

/// Flags lost events in the new reader sub-buffer once the writer has left it, storing their
/// number after the events when 8 bytes are free and zeroing the rest of the data area, as
/// Linux 6.10 does. Returns whether the count is stored.
fn mark_missed(cb: &CpuBuffer, st: &ReaderState) -> bool {
    let pd = &cb.pages()[st.reader_page as usize];
    if st.reader_page == cb.commit_page.load(Ordering::Acquire) {
        return false;
    }
    // The real end of data, so the count can go in the end padding.
    let size = pd.data_end();
    let data_size = cb.data_size();
    let commit = format::missed_commit(size, data_size);
    let stored = commit & RB_MISSED_STORED != 0;
    let count_end = if stored { size + 8 } else { size };
    // SAFETY: `size <= count_end <= data_size`: inside the data area, past the events, on a
    // page the writer has left; we hold the reader lock.
    unsafe {
        if stored {
            pd.data()
                .add(size)
                .cast::<u64>()
                .write_unaligned(st.meta_lost.to_le());
        }
        core::ptr::write_bytes(pd.data().add(count_end), 0, data_size - count_end);
    }
    pd.set_commit(commit);
    stored
}

/// A mapping read through kernel addresses, page by page.
pub struct MappedView<'a, A: PageAlloc, C: Clock, W: Waiter> {
    rb: &'a RingBuffer<A, C, W>,
    cpu: usize,
}

impl<A: PageAlloc, C: Clock, W: Waiter> MappedView<'_, A, C, W> {
    fn layout(&self) -> MapLayout {
        // The CPU was valid when the view was made, and `&RingBuffer` keeps it so.
        self.rb.layout_of(&self.rb.cpus[self.cpu])
    }
}

impl<A: PageAlloc, C: Clock, W: Waiter> MapRegion for MappedView<'_, A, C, W> {
    fn len(&self) -> usize {
        self.layout().total_len()
    }

    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), Error> {
        let end = offset
            .checked_add(buf.len())
            .ok_or(Error::InvalidArgument)?;
        if end > self.len() {
            return Err(Error::InvalidArgument);
        }
        let layout = self.layout();
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done;
            let in_page = at % PAGE_SIZE;
            let n = (PAGE_SIZE - in_page).min(buf.len() - done);
            let page = layout.page(at / PAGE_SIZE).ok_or(Error::InvalidArgument)?;
            let dst = &mut buf[done..done + n];
            match self.rb.map_page(self.cpu, page)? {
                None => dst.fill(0),
                Some(p) => {
                    // SAFETY: `in_page + n <= PAGE_SIZE`: inside a page of the mapping that
                    // stays allocated while mapped. The writer may be appending meanwhile:
                    // commit words are read whole.
                    unsafe { crate::mapped::read_shared(p.as_ptr().add(in_page), dst) };
                }
            }
            done += n;
        }
        Ok(())
    }
}
