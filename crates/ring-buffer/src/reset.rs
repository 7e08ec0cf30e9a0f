//! Emptying a CPU buffer (Linux's `ring_buffer_reset_cpu`), on that CPU or from any other.
//!
//! Writers keep their bookkeeping CPU-local, without barriers (like Linux's `local_t`), and a
//! writer that finds recording disabled still enters and leaves its section (and, as the
//! outermost one, publishes the tail page's commit). So another CPU can neither see for sure
//! that a CPU's writers are out nor keep them out with a flag: Linux waits for an RCU grace
//! period. Here the reset runs *on* the CPU, between or above its writers: from the CPU itself
//! ([`RingBuffer::reset`]), or from any CPU through a cross-CPU call the kernel provides
//! ([`RunOn`], an IPI: [`RingBuffer::reset_cpu`]).
//!
//! On the CPU, recording is disabled first, then the reset gives up (`Busy`) if it interrupted
//! a writer. Only nested writers (an NMI) can run during it, find recording disabled, and
//! publish the tail page's commit; the reset moves the tail to the start of its page *first*,
//! so from then on such a publish writes 0, which is what the reset writes too. The sub-buffers
//! stay where they are (the head moves to the tail's sub-buffer), so the sub-buffer IDs of a
//! mapping stay valid; the meta page is refreshed.

use crate::{
    buffer::RingBuffer,
    cpu::{CpuBuffer, LINK_HEAD, PageDesc, ReaderState, link, link_flag, link_next},
    error::Error,
    hal::{Clock, LocalCpu, PageAlloc, Waiter},
    map::update_meta,
    sync::{Ordering, spin_hint},
};

/// Runs a function on another CPU and waits for it (Linux's `smp_call_function_single`):
/// what [`RingBuffer::reset_cpu`] needs to reset a CPU's buffer from elsewhere.
///
/// # Safety
///
/// `run_on(cpu, f)` calls `f` once, on CPU `cpu`, in a context that nests with that CPU's
/// writers the way an interrupt handler with interrupts disabled does (it either interrupted
/// one, which resumes only after `f` returns, or runs between them; no writer of `cpu` runs
/// anywhere else meanwhile), and returns after `f` has returned. An IPI whose handler runs
/// `f` does this.
pub unsafe trait RunOn {
    /// Runs `f` on `cpu` and waits for it.
    fn run_on(&self, cpu: usize, f: &mut dyn FnMut());
}

// SAFETY: forwards to `T`.
unsafe impl<T: RunOn + ?Sized> RunOn for &T {
    fn run_on(&self, cpu: usize, f: &mut dyn FnMut()) {
        (**self).run_on(cpu, f)
    }
}

/// How many times [`RingBuffer::reset_cpu`] tries before it reports `Busy`.
#[cfg(not(loom))]
const RESET_TRIES: u32 = 1 << 12;
#[cfg(loom)]
const RESET_TRIES: u32 = 3;

impl CpuBuffer {
    /// Empties the buffer and zeroes its counters, leaving every sub-buffer where it is.
    ///
    /// Runs on the writers' own CPU with no writer section open and recording disabled, under
    /// the reader lock: only nested writers that find recording disabled may interleave, and
    /// all they do is publish the tail page's commit (see the module docs).
    pub(crate) fn reset_in_place(&self, st: &mut ReaderState) {
        let tail = self.rewind_tail();
        let pages = self.pages();
        let rp = st.reader_page;
        // The head moves to the tail's sub-buffer. When the writer is on the reader page the
        // ring holds nothing unread: the head stays (the reader page leads to it).
        let mut head = None;
        if tail != rp {
            let mut p = tail;
            for _ in 0..self.ring_len {
                let l = pages[p as usize].link.load(Ordering::Relaxed);
                if link_flag(l) == LINK_HEAD {
                    pages[p as usize]
                        .link
                        .store(link(link_next(l), 0), Ordering::Relaxed);
                }
                if link_next(l) == tail {
                    pages[p as usize]
                        .link
                        .store(link(tail, LINK_HEAD), Ordering::Relaxed);
                    head = Some((p, tail));
                }
                p = link_next(l);
            }
        }
        let (prev, head) = head.unwrap_or_else(|| self.find_head(st).unwrap_or((rp, tail)));
        pages.iter().for_each(PageDesc::clear);
        self.zero_counters();
        // No push since: the next swap of `head` finds nothing lost.
        st.restart(head, self.pushes(), prev);
        if st.map_count > 0 {
            update_meta(self, st);
        }
    }

    /// The reset of [`RingBuffer::reset`], on this CPU: `Busy` if it interrupted a writer, or
    /// (with `try_lock`) a holder of the reader lock.
    fn reset_here(&self, try_lock: bool) -> Result<(), Error> {
        self.disabled.fetch_add(1, Ordering::SeqCst);
        let guard = if try_lock {
            self.reader.try_lock()
        } else {
            Some(self.reader.lock())
        };
        // `filter` drops a guard it rejects, so the lock is released before recording is
        // enabled again, whichever way this goes.
        let res = match guard.filter(|_| !self.writers_active()) {
            None => Err(Error::Busy),
            Some(mut st) => {
                self.reset_in_place(&mut st);
                Ok(())
            }
        };
        self.disabled.fetch_sub(1, Ordering::SeqCst);
        res
    }
}

impl<A: PageAlloc, C: Clock, W: Waiter> RingBuffer<A, C, W> {
    /// Empties `cpu`'s buffer and zeroes its counters (Linux's `ring_buffer_reset_cpu`), from
    /// that CPU: `Busy` if this interrupted a writer of the CPU (an open reservation). Takes
    /// the CPU's reader lock; from another CPU use [`RingBuffer::reset_cpu`].
    ///
    /// Context: on the CPU `cpu` names, not inside one of its writer sections (that is
    /// `Busy`); takes the reader lock (spins: not from an interrupt that may have interrupted
    /// a reader of this CPU); no allocation.
    pub fn reset(&self, cpu: LocalCpu) -> Result<(), Error> {
        self.cpu(cpu.id())?.reset_here(false)
    }

    /// [`RingBuffer::reset`] from any CPU, through a cross-CPU call (an IPI) that runs it on
    /// `cpu`. A call that lands inside a writer of `cpu`, or while the reader lock is held,
    /// gives up and is tried again (up to 4096 times, then `Busy`).
    ///
    /// Context: Task context on any CPU: waits for the cross-CPU call `via` to run the reset on `cpu` (retried while it lands inside a writer); no allocation.
    pub fn reset_cpu(&self, cpu: usize, via: &impl RunOn) -> Result<(), Error> {
        let cb = self.cpu(cpu)?;
        for _ in 0..RESET_TRIES {
            let mut res = Err(Error::Busy);
            via.run_on(cpu, &mut || res = cb.reset_here(true));
            if res != Err(Error::Busy) {
                return res;
            }
            spin_hint();
        }
        Err(Error::Busy)
    }

    /// [`RingBuffer::reset`] from any CPU, without a cross-CPU call.
    ///
    /// # Safety
    ///
    /// No writer of `cpu` runs during the call, not even one that finds recording disabled:
    /// e.g. recording on it was disabled ([`RingBuffer::record_disable_cpu`]) and every CPU
    /// has since passed a point where it was outside any writer (Linux waits for an RCU grace
    /// period), or the CPU is offline.
    ///
    /// Context: Task context, writers of `cpu` quiesced (see Safety); takes the reader lock; no allocation.
    pub unsafe fn reset_quiesced(&self, cpu: usize) -> Result<(), Error> {
        self.cpu(cpu)?.reset_here(false)
    }
}
