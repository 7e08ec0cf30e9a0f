//! The write path: writer sections (nesting and commit counting), reservations, the tail's
//! move to the next sub-buffer (pushing the head in overwrite mode), and publication.

use core::sync::atomic::{Ordering::SeqCst, compiler_fence};

use super::{CpuBuffer, PageDesc, STAMP_INVALID, tail_gen, tail_off, tail_page, tail_word};
use super::{
    LINK_HEAD, LINK_UPDATE, PUSH_PENDING, entries_count, entries_state, link_cleared, link_flag,
    link_flagged, link_next, push_state,
};
use crate::{
    error::Error,
    format::{self, MAX_DELTA, TIME_EXTEND_SIZE},
    hal::Clock,
    sync::{AtomicU32, Ordering, interrupt_point},
};

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
        interrupt_point();
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

    /// [`CpuBuffer::leave`] for the outermost writer, out of line.
    #[cold]
    #[inline(never)]
    fn leave_outermost_cold(&self) {
        self.leave(0);
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
                    // Publish. Outermost writers publish everything before they leave, and
                    // only we publish until we leave, so the commit page is where the tail
                    // was when we entered. If it is still `pd` (no nested writer moved the
                    // tail to another sub-buffer between our entry and our reservation),
                    // committing `pd` up to our event publishes everything before it; else
                    // the full publish walks the sub-buffers in between. A nested writer that
                    // reserved after our event (on `pd` or beyond) shows in the tail check of
                    // `leave_outermost`, which then publishes it.
                    if self.commit_page.load(Ordering::Relaxed) != tail_page(t) {
                        self.leave_outermost_cold();
                        return Ok(());
                    }
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
            // A writer we interrupted is pushing the head: finish its push for it (it cannot
            // resume before we return), then move on as it would have.
            LINK_UPDATE => self.finish_push(pd, l, self.pushes.load(Ordering::Relaxed)),
            LINK_HEAD => {
                if !self.overwrite.load(Ordering::Relaxed) {
                    return Err(Error::Full);
                }
                // Number this push before claiming it, so a nested writer that finds the
                // claim knows the number (`pushes`); a claim that fails leaves a gap, which
                // nobody minds.
                let seq = self.pushes.fetch_add(1) + 1;
                interrupt_point();
                let claimed = link_flagged(l, LINK_UPDATE);
                if pd
                    .link
                    .compare_exchange(l, claimed, Ordering::AcqRel, Ordering::Relaxed)
                    .is_err()
                {
                    return Ok(()); // the reader swapped the head away: look again
                }
                interrupt_point();
                self.finish_push(pd, claimed, seq);
            }
            // Not the head: a page the reader handed back (emptied before it re-entered the
            // ring) or one never written since the last reset. Either way already empty.
            _ => {}
        }
        interrupt_point();
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
        interrupt_point();
        pd.real_end.store(off as u32, Ordering::Relaxed);
        interrupt_point();
        pd.end.store(end as u32, Ordering::Release);
        interrupt_point();
        self.pages_touched.fetch_add(1);
        Ok(())
    }

    /// Completes head push number `seq`, claimed by flagging `UPDATE` on the link into the
    /// head (`claimed` is that flagged link): the old head's events count as `overrun`, the
    /// page is emptied for the tail, the page after it becomes the head (with the overrun
    /// total and push number the reader needs), and the claim is cleared.
    ///
    /// Run by the writer that claimed, and by any writer nested inside it that finds the
    /// claim: writers nest, so a nested one runs to completion while the claimer waits, and
    /// every step here is either a compare-and-swap that fails once a helper did it, or a
    /// store of a value every participant computes alike. The compare-and-swap of the old
    /// head's entries word is the step that happens once: whoever wins it counts the page's
    /// events (the value read before it), and a loser sees the winner's state.
    #[cold]
    #[inline(never)]
    fn finish_push(&self, pd: &PageDesc, claimed: u32, seq: u64) {
        let next = link_next(claimed);
        let np = self.page(next);
        let state = push_state(seq);
        // Read in this order: the overrun total before the entries word, the link of the old
        // head before both. If the entries word is still the old one afterwards, nobody had
        // emptied the page when the other two were read, so they are the push's inputs.
        let nlink = np.link.load(Ordering::Acquire);
        interrupt_point();
        let before = self.overrun.load(Ordering::Relaxed);
        interrupt_point();
        let w = np.entries.load(Ordering::Relaxed);
        interrupt_point();
        if entries_state(w) & !PUSH_PENDING != state {
            let total = before + entries_count(w);
            let newhead = self.page(link_next(nlink));
            // Tell the reader that takes the new head exactly how much was lost before it;
            // the Release of the flag below publishes this.
            newhead.head_overrun.store(total, Ordering::Relaxed);
            interrupt_point();
            newhead.push_seq.store(seq, Ordering::Relaxed);
            interrupt_point();
            np.set_commit(0);
            interrupt_point();
            // Empty the page, leaving the link to flag for whoever finishes.
            let pending = (u64::from(state | PUSH_PENDING) << 32) | u64::from(nlink);
            let _ = np.entries.cas(w, pending);
            interrupt_point();
        }
        let w = np.entries.load(Ordering::Relaxed);
        if entries_state(w) == state | PUSH_PENDING {
            let nlink = w as u32;
            // The overrun total is `total`, or below it by the page's events if nobody
            // added them yet.
            let total = self
                .page(link_next(nlink))
                .head_overrun
                .load(Ordering::Relaxed);
            let cur = self.overrun.load(Ordering::Relaxed);
            interrupt_point();
            if cur < total {
                let _ = self.overrun.cas(cur, total);
                interrupt_point();
            }
            // Flag the new head: fails if done (the link's generation moved on since).
            let _ = np.link.compare_exchange(
                nlink,
                link_flagged(nlink, LINK_HEAD),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
            interrupt_point();
            let _ = np.entries.cas(w, u64::from(state) << 32);
            interrupt_point();
        }
        let _ = pd.link.compare_exchange(
            claimed,
            link_cleared(claimed, next),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
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
        pd.entries.fetch_add(u64::MAX); // -1 (the count is at least 1: ours)
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
