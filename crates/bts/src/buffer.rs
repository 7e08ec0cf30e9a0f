//! A context's locked buffer: the DS save area followed by the records, programmed and read
//! back as the processor uses it.

use core::ptr::NonNull;

use crate::{
    config::Flags,
    format::{BtsRecord, DsArea, RECORD_SIZE},
    hal::PAGE_SIZE,
    view::TraceView,
};

/// The DS area sits at the start of the locked allocation; records follow it.
pub(crate) const RECORDS_OFFSET: usize = core::mem::size_of::<DsArea>();
const _: () = assert!(RECORDS_OFFSET % (core::mem::align_of::<BtsRecord>()) == 0);

/// Locked pages needed for `records` records plus the DS area, or `None` on overflow.
pub const fn pages_for(records: usize) -> Option<usize> {
    match records.checked_mul(RECORD_SIZE) {
        Some(bytes) => match bytes.checked_add(RECORDS_OFFSET + PAGE_SIZE - 1) {
            Some(total) => Some(total / PAGE_SIZE),
            None => None,
        },
        None => None,
    }
}

/// A context's locked buffer: the DS area, then `capacity` records.
pub(crate) struct Buffer<M> {
    pub(crate) ptr: NonNull<u8>,
    pub(crate) pages: usize,
    pub(crate) capacity: usize,
    /// The address space that paid (and gets the refund).
    pub(crate) payer: M,
}

impl<M> Buffer<M> {
    pub(crate) fn ds_ptr(&self) -> *mut DsArea {
        self.ptr.as_ptr().cast()
    }
    pub(crate) fn base(&self) -> u64 {
        // No overflow: the allocation holds RECORDS_OFFSET + capacity records.
        self.ptr
            .as_ptr()
            .wrapping_add(RECORDS_OFFSET)
            .expose_provenance() as u64
    }
    /// The DS area linear address for IA32_DS_AREA.
    pub(crate) fn ds_linear(&self) -> u64 {
        self.ptr.as_ptr().expose_provenance() as u64
    }
    /// Reads the DS area (untrusted contents).
    pub(crate) fn ds(&self) -> DsArea {
        // SAFETY: the allocation starts with a DS area, is aligned, and is ours while held.
        unsafe { self.ds_ptr().read_volatile() }
    }
    /// Sets `bts_index` to record `i`.
    pub(crate) fn set_index(&mut self, i: usize) {
        let at = self.base() + (i * RECORD_SIZE) as u64;
        // SAFETY: as in `ds`; the field is in bounds and aligned.
        unsafe { (&raw mut (*self.ds_ptr()).bts_index).write_volatile(at) }
    }
    /// The records, exclusively (the holder of the context owns them: no CPU has them loaded).
    pub(crate) fn records(&mut self) -> &mut [BtsRecord] {
        // SAFETY: the allocation holds `capacity` records after the DS area, aligned to 8; the
        // context holder has exclusive access (no CPU stores into it meanwhile).
        unsafe {
            core::slice::from_raw_parts_mut(
                self.ptr.as_ptr().add(RECORDS_OFFSET).cast::<BtsRecord>(),
                self.capacity,
            )
        }
    }
    pub(crate) fn view(&mut self, circular: bool) -> TraceView<'_> {
        let ds = self.ds();
        let base = self.base();
        TraceView::new(self.records(), &ds, base, circular)
    }
    /// Empties the trace: zeroes the records in use and resets the index.
    pub(crate) fn reset(&mut self, circular: bool) {
        let view = self.view(circular);
        let used = if view.wrapped() {
            self.capacity
        } else {
            view.index()
        };
        self.records()[..used].fill(BtsRecord::default());
        self.set_index(0);
    }
    /// Programs the DS area for a fresh trace.
    pub(crate) fn program(&mut self, flags: Flags) {
        let base = self.base();
        let max = base + (self.capacity * RECORD_SIZE) as u64;
        let threshold = if flags.circular() {
            // SDM: clearing BTINT is not enough, the threshold must be out of reach.
            max + RECORD_SIZE as u64
        } else {
            // Leave 1/8 (at least one record) of room for branches taken before the
            // interrupt is serviced.
            let slack = (self.capacity / 8).max(1).min(self.capacity - 1);
            base + ((self.capacity - slack) * RECORD_SIZE) as u64
        };
        let ds = DsArea {
            bts_buffer_base: base,
            bts_index: base,
            bts_absolute_maximum: max,
            bts_interrupt_threshold: threshold,
            ..DsArea::default()
        };
        // SAFETY: as in `ds`.
        unsafe { self.ds_ptr().write_volatile(ds) };
        self.records().fill(BtsRecord::default());
    }
    /// Whether the index has reached the interrupt threshold (read through the untrusted DS
    /// area; a threshold below the base counts as not reached).
    pub(crate) fn reached_threshold(&self) -> bool {
        let ds = self.ds();
        let base = self.base();
        ds.bts_interrupt_threshold
            .checked_sub(base)
            .is_some_and(|t| {
                let t = (t / RECORD_SIZE as u64) as usize;
                crate::view::clamp_index(&ds, base, self.capacity) >= t
            })
    }
    /// Stores a software record as the processor would (advance; wrap if circular; dropped
    /// if the buffer is full in interrupt mode). Returns whether it was stored.
    pub(crate) fn push(&mut self, record: BtsRecord, circular: bool) -> bool {
        let ds = self.ds();
        let mut i = crate::view::clamp_index(&ds, self.base(), self.capacity);
        if i == self.capacity {
            if !circular {
                return false;
            }
            i = 0;
        }
        self.records()[i] = record;
        i += 1;
        if i == self.capacity && circular {
            i = 0;
        }
        self.set_index(i);
        true
    }
}
