//! Changing a ring buffer's geometry: the number of sub-buffers of one CPU or of all (Linux's
//! `ring_buffer_resize`) and the sub-buffer size (`ring_buffer_subbuf_order_set`).
//!
//! Both take `&mut self`: the borrow checker proves that no writer, reader, [`Reservation`]
//! or [`Reader`](crate::Reader) of the buffer exists while the sub-buffers are relinked, so
//! neither has to coexist with the lockless protocols. (A kernel whose writers reach the
//! buffer through a shared reference changes the geometry before publishing the buffer, or
//! builds a new buffer and retires the old one after a grace period.)
//!
//! Both are all or nothing: every page is allocated before anything changes; on `NoMemory`
//! what was allocated goes back to the allocator and the buffer is exactly as it was. Both are
//! `Busy` while a CPU buffer they change is mapped (its pages are in a user address space).
//!
//! What happens to the events:
//! - Growing keeps every event. The new, empty sub-buffers go just before the head (the oldest
//!   data), so the writer fills them before it overwrites anything.
//! - Shrinking removes empty or already-read sub-buffers first. Only when the unread data
//!   needs more sub-buffers than remain does it drop the oldest ones; their events count as
//!   `overrun` (in both modes) and reach the reader as [`Event::lost`](crate::Event) with the
//!   first event after the reader sub-buffer, so `entries - overrun - read` stays the number of
//!   unread events. The reader sub-buffer and its unread events are always kept.
//! - Changing the sub-buffer order discards every event and zeroes the counters of every CPU,
//!   as Linux does. The number of sub-buffers becomes the one that keeps each CPU's byte size
//!   (rounded up, at least 2).
//!
//! [`Reservation`]: crate::Reservation

use core::mem;

use crate::{
    buffer::{RingBuffer, alloc_subbufs, free_subbufs, new_page_desc},
    cpu::{CpuBuffer, MAX_PAGES, PageDesc, link_next, ring_link, tail_off, tail_page},
    error::Error,
    format::{MAX_SUBBUF_ORDER, PAGE_SIZE},
    hal::{Clock, PageAlloc, Waiter},
    mem::PageArray,
    sync::Ordering,
};

/// `next_head` value that matches no page: the reader's next swap takes the lost count from
/// the head page.
const NO_PAGE: u32 = u32::MAX;

/// Which ring sub-buffers of one CPU a resize keeps, by position from the head (the oldest).
#[derive(Clone, Copy)]
struct Plan {
    /// Old head page.
    head: u32,
    old_len: u32,
    new_len: u32,
    /// Positions `start .. start + kept` are kept (then come `new_len - kept` new pages);
    /// positions below `start` hold the oldest unread data and are dropped.
    start: u32,
    kept: u32,
    /// Position of the tail page; `None` when the writer is on the reader page.
    tail_pos: Option<u32>,
    /// The reader page, and the page the reader's last swap made the head.
    reader_page: u32,
    next_head: u32,
}

impl Plan {
    fn new(cb: &CpuBuffer, new_len: u32) -> Result<Self, Error> {
        let st = cb.reader.lock();
        let (_, head) = cb.find_head(&st).ok_or(Error::Busy)?;
        let tail = tail_page(cb.tail.load(Ordering::Relaxed));
        let old_len = cb.ring_len;
        let mut p = head;
        let mut tail_pos = None;
        for pos in 0..old_len {
            if p == tail {
                tail_pos = Some(pos);
                break;
            }
            p = next(cb, p);
        }
        // Unread data sits in positions 0 ..= tail_pos; everything after is empty or read.
        let data = tail_pos.map_or(0, |t| t + 1);
        let start = data.saturating_sub(new_len);
        Ok(Self {
            head,
            old_len,
            new_len,
            start,
            kept: new_len.min(old_len - start),
            tail_pos,
            reader_page: st.reader_page,
            next_head: st.next_head,
        })
    }
}

fn next(cb: &CpuBuffer, page: u32) -> u32 {
    link_next(cb.pages()[page as usize].link.load(Ordering::Relaxed))
}

/// A copy of `pd`'s bookkeeping for the new array (same memory).
fn moved(pd: &PageDesc) -> PageDesc {
    let copy = new_page_desc(pd.mem.get());
    copy.entries
        .store(pd.entries.load(Ordering::Relaxed), Ordering::Relaxed);
    copy.end
        .store(pd.end.load(Ordering::Relaxed), Ordering::Relaxed);
    copy.real_end
        .store(pd.real_end.load(Ordering::Relaxed), Ordering::Relaxed);
    copy.commit
        .store(pd.commit.load(Ordering::Relaxed), Ordering::Relaxed);
    copy.head_overrun
        .store(pd.head_overrun.load(Ordering::Relaxed), Ordering::Relaxed);
    copy.push_seq
        .store(pd.push_seq.load(Ordering::Relaxed), Ordering::Relaxed);
    copy
}

/// The new page array of a resize: kept ring pages in ring order from the new head (index 0),
/// then new pages, then the reader page. Only allocates; the buffer is untouched.
fn prepare<A: PageAlloc>(
    cb: &CpuBuffer,
    plan: &Plan,
    alloc: &A,
    order: u32,
) -> Result<PageArray<PageDesc>, Error> {
    let mut p = plan.head;
    for _ in 0..plan.start {
        p = next(cb, p);
    }
    let mut fresh_index = 0;
    PageArray::new(
        alloc,
        plan.new_len as usize + 1,
        |i| {
            let i = i as u32;
            if i < plan.kept {
                let pd = moved(&cb.pages()[p as usize]);
                p = next(cb, p);
                Ok(pd)
            } else if i < plan.new_len {
                let mem = alloc.alloc_pages(order).ok_or(Error::NoMemory)?;
                Ok(new_page_desc(mem))
            } else {
                Ok(moved(&cb.pages()[plan.reader_page as usize]))
            }
        },
        |pd| {
            // Only the new pages are ours to give back (indices kept .. new_len).
            if (plan.kept..plan.new_len).contains(&fresh_index) {
                // SAFETY: allocated above with this order; nothing else knows it.
                unsafe { alloc.free_pages(pd.mem.get(), order) };
            }
            fresh_index += 1;
        },
    )
}

/// Gives back the new pages and the array of a prepared resize that is not installed.
///
/// # Safety
///
/// `new` came from `prepare(.., plan, alloc, order)`.
unsafe fn discard<A: PageAlloc>(new: PageArray<PageDesc>, plan: &Plan, alloc: &A, order: u32) {
    for pd in &new[plan.kept as usize..plan.new_len as usize] {
        // SAFETY: new pages of `prepare`, allocated with this order.
        unsafe { alloc.free_pages(pd.mem.get(), order) };
    }
    // SAFETY: the array came from `alloc` (contract).
    unsafe { new.free(alloc) };
}

/// Installs a prepared resize: frees the pages not kept, counts the dropped events as overrun,
/// links the new ring and moves the tail and the reader state over.
///
/// # Safety
///
/// `new` came from `prepare(cb, plan, alloc, order)` and nothing changed `cb` since.
unsafe fn install<A: PageAlloc>(
    cb: &mut CpuBuffer,
    plan: &Plan,
    new: PageArray<PageDesc>,
    alloc: &A,
    order: u32,
) {
    // Walk the old ring: drop what is not kept, and find where the reader's `next_head` goes.
    let mut dropped_events = 0u64;
    let mut new_next_head = NO_PAGE;
    let mut p = plan.head;
    for pos in 0..plan.old_len {
        let pd = &cb.pages()[p as usize];
        let in_window = (plan.start..plan.start + plan.kept).contains(&pos);
        if in_window {
            if p == plan.next_head {
                new_next_head = pos - plan.start;
            }
        } else {
            if pos < plan.start {
                dropped_events += pd.events();
            }
            // SAFETY: a sub-buffer of this buffer (allocated with `order`) that leaves it
            // now; the new array does not hold it.
            unsafe { alloc.free_pages(pd.mem.get(), order) };
        }
        p = next(cb, p);
    }
    // The new ring: 0 -> 1 -> ... -> new_len - 1 -> 0, head 0; the reader page points at it.
    let n = plan.new_len;
    for (i, pd) in new.iter().enumerate() {
        pd.link.store(ring_link(i as u32, n), Ordering::Relaxed);
    }
    let tail = cb.tail.load(Ordering::Relaxed);
    debug_assert_eq!(
        cb.commit_page.load(Ordering::Relaxed),
        tail_page(tail),
        "resize of a buffer with uncommitted data"
    );
    let old = mem::replace(cb.pages_mut(), new);
    // SAFETY: the old array came from `alloc`; its pages are either freed above or moved.
    unsafe { old.free(alloc) };
    cb.ring_len = n;
    let tail_index = match plan.tail_pos {
        Some(pos) => pos - plan.start,
        None => n,
    };
    debug_assert!(plan.tail_pos.is_some() || tail_page(tail) == plan.reader_page);
    cb.place_tail(tail_index, tail_off(tail));

    let mut st = cb.reader.lock();
    st.reader_page = n;
    st.head_hint = n - 1;
    st.next_head = new_next_head;
    if plan.start > 0 {
        // As if the writer had pushed the head `start` times: the next reader swap hands the
        // dropped events to the reader as lost (from the head page, since `next_head` matches
        // no page).
        let total = cb.overrun.load(Ordering::Relaxed) + dropped_events;
        cb.overrun.store(total, Ordering::Release);
        let head = &cb.pages()[0];
        head.head_overrun.store(total, Ordering::Relaxed);
        head.push_seq.store(cb.pushes(), Ordering::Relaxed);
        st.next_head = NO_PAGE;
        cb.pages_read
            .fetch_add(u64::from(plan.start), Ordering::Relaxed);
    }
}

impl<A: PageAlloc, C: Clock, W: Waiter> RingBuffer<A, C, W> {
    /// Number of sub-buffers in `cpu`'s ring (the reader sub-buffer not included).
    ///
    /// Context: Any context.
    pub fn nr_subbufs(&self, cpu: usize) -> Result<usize, Error> {
        Ok(self.cpu(cpu)?.ring_len as usize)
    }

    /// Gives every CPU `subbufs` sub-buffers (Linux's `ring_buffer_resize` for all CPUs); see
    /// the [module docs](crate::resize) for what happens to the events.
    ///
    /// Errors: `InvalidArgument` for fewer than 2 or more than 65 534 sub-buffers, `Busy` if
    /// any CPU is mapped (or a reservation was leaked), `NoMemory` (nothing changed).
    ///
    /// Context: Task context, the buffer to yourself (`&mut`); allocates the new sub-buffers and arrays first (all or nothing).
    pub fn resize(&mut self, subbufs: usize) -> Result<(), Error> {
        self.resize_cpus(0..self.cpus(), subbufs)
    }

    /// Gives `cpu` alone `subbufs` sub-buffers (Linux's `ring_buffer_resize` for one CPU).
    /// Errors as for [`RingBuffer::resize`], `Busy` only if `cpu` is mapped.
    ///
    /// Context: Task context, the buffer to yourself (`&mut`); allocates like [`RingBuffer::resize`].
    pub fn resize_cpu(&mut self, cpu: usize, subbufs: usize) -> Result<(), Error> {
        self.cpu(cpu)?;
        self.resize_cpus(cpu..cpu + 1, subbufs)
    }

    fn resize_cpus(&mut self, cpus: core::ops::Range<usize>, subbufs: usize) -> Result<(), Error> {
        if !(2..MAX_PAGES - 1).contains(&subbufs) {
            return Err(Error::InvalidArgument);
        }
        self.check_quiet(cpus.clone())?;
        let new_len = subbufs as u32;
        let order = self.subbuf_order;
        let alloc = &self.alloc;
        let cbs = &self.cpus;
        let wanted = |cpu: usize| cpus.contains(&cpu) && cbs[cpu].ring_len != new_len;
        // One slot per CPU for its prepared array: allocation first, for every CPU.
        let prepared = PageArray::new(
            alloc,
            cbs.len(),
            |cpu| {
                if !wanted(cpu) {
                    return Ok(None);
                }
                let plan = Plan::new(&cbs[cpu], new_len)?;
                Ok(Some((plan, prepare(&cbs[cpu], &plan, alloc, order)?)))
            },
            |slot| {
                if let Some((plan, new)) = slot {
                    // SAFETY: prepared above; the bitwise copy is the only one used (the
                    // scratch array is freed without using its values again).
                    unsafe { discard(core::ptr::read(new), plan, alloc, order) };
                }
            },
        )?;
        let cpus_len = self.cpus.len();
        for cpu in 0..cpus_len {
            // SAFETY: each slot is read once, here; the scratch array is freed below without
            // touching its values (`PageArray` has no drop glue).
            let slot = unsafe { core::ptr::read(&prepared[cpu]) };
            if let Some((plan, new)) = slot {
                // SAFETY: prepared for this CPU above; `&mut self` kept anything from changing.
                unsafe { install(&mut self.cpus[cpu], &plan, new, &self.alloc, order) };
            }
        }
        // SAFETY: the scratch array came from `self.alloc`; its values were moved out above
        // and dropping the copies left in it does nothing (`Option<(Plan, PageArray)>` has no
        // drop glue).
        unsafe { prepared.free(&self.alloc) };
        Ok(())
    }

    /// `Busy` if a CPU in `cpus` is mapped or has an open writer section.
    fn check_quiet(&self, cpus: core::ops::Range<usize>) -> Result<(), Error> {
        for cb in &self.cpus[cpus] {
            if cb.reader.lock().map_count > 0 || cb.writers_active() {
                return Err(Error::Busy);
            }
        }
        Ok(())
    }

    /// Sets the sub-buffer size to `PAGE_SIZE << order` (Linux's
    /// `ring_buffer_subbuf_order_set`): every sub-buffer is reallocated, every CPU keeps its
    /// size in bytes (rounded up to whole sub-buffers, at least 2), and every event is
    /// discarded and every counter zeroed, as on Linux. The same order is a no-op that keeps
    /// the data.
    ///
    /// Errors: `InvalidArgument` for an order above 8 (1 MiB) or when a CPU would need more
    /// than 65 534 sub-buffers, `Busy` if any CPU is mapped, `NoMemory` (nothing changed).
    /// Spare pages from [`RingBuffer::alloc_read_page`] keep their old size: free them.
    ///
    /// Context: Task context, the buffer to yourself (`&mut`); allocates every new sub-buffer first (all or nothing).
    pub fn set_subbuf_order(&mut self, order: u32) -> Result<(), Error> {
        if order > MAX_SUBBUF_ORDER {
            return Err(Error::InvalidArgument);
        }
        if order == self.subbuf_order {
            return Ok(());
        }
        self.check_quiet(0..self.cpus())?;
        let (old_size, new_size) = (self.subbuf_size(), PAGE_SIZE << order);
        let count = |cb: &CpuBuffer| (cb.ring_len as usize * old_size).div_ceil(new_size).max(2);
        if self.cpus.iter().any(|cb| count(cb) >= MAX_PAGES - 1) {
            return Err(Error::InvalidArgument);
        }
        let alloc = &self.alloc;
        let prepared = PageArray::new(
            alloc,
            self.cpus.len(),
            |cpu| alloc_subbufs(alloc, count(&self.cpus[cpu]) + 1, order),
            |new| {
                // SAFETY: made above by `alloc_subbufs(alloc, .., order)`, not installed; the
                // bitwise copy is the only one used.
                unsafe { free_subbufs(alloc, core::ptr::read(new), order) };
            },
        )?;
        let old_order = self.subbuf_order;
        for cpu in 0..self.cpus.len() {
            // SAFETY: each slot is read once; the scratch array is freed without its values.
            let new = unsafe { core::ptr::read(&prepared[cpu]) };
            let cb = &mut self.cpus[cpu];
            let ring_len = (new.len() - 1) as u32;
            let old = mem::replace(cb.pages_mut(), new);
            // SAFETY: the old array and its sub-buffers came from `self.alloc`, the sub-buffers
            // from `alloc_pages(old_order)`; the buffer is exclusively ours (`&mut self`) and
            // not mapped.
            unsafe { free_subbufs(&self.alloc, old, old_order) };
            cb.ring_len = ring_len;
            cb.subbuf_size = new_size;
            let cb = &self.cpus[cpu];
            cb.init_ring(&mut cb.reader.lock());
        }
        // SAFETY: from `self.alloc`; its values were moved out above.
        unsafe { prepared.free(&self.alloc) };
        self.subbuf_order = order;
        Ok(())
    }
}
