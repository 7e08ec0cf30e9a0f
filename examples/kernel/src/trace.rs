//! The kernel's trace buffer: one `oskit-ring-buffer` ring per CPU, in overwrite mode (a flight
//! recorder), timestamped with the TSC. Every scenario step logs what it does into it as text
//! events, `"<step>: <message>"`, with [`trace!`](crate::trace!).
//!
//! Writers are lockless and may run in any context (task, interrupt, fault): [`record`] turns
//! interrupts off for the write, so the event lands in the ring of the CPU it was made on.
//!
//! [`record`] also keeps a tally per step name (events written, events refused), which the
//! `trace` check compares with what a ring-3 reader finds in the buffer
//! (see [`crate::steps::trace`]).

use core::{
    cell::UnsafeCell,
    fmt,
    mem::MaybeUninit,
    ptr::NonNull,
    sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering},
};

use oskit_ring_buffer::{Config, Error, LocalCpu, Mode, RingBuffer, hal::PageAlloc, x86::Tsc};

use crate::{arch::percpu, mm::frames, spin, text::Text};

/// Sub-buffers of 4 KiB in each CPU's ring (the reader's spare comes on top).
pub const SUBBUFS_PER_CPU: usize = 32;
/// Longest event text; longer messages are cut.
const MAX_EVENT: usize = 200;

/// Pages for the ring buffer, straight from the frame allocator (identity-mapped).
#[derive(Debug, Clone, Copy)]
pub struct FramePages;

// SAFETY: `frames::alloc(order)` hands out 2^order exclusive, naturally aligned, identity-mapped
// frames; they are zeroed here before use and only returned by `free_pages`.
unsafe impl PageAlloc for FramePages {
    fn alloc_pages(&self, order: u32) -> Option<NonNull<u8>> {
        let paddr = frames::alloc(order)?;
        let ptr = paddr as *mut u8;
        // SAFETY: the block is ours and identity-mapped: 4096 << order writable bytes.
        unsafe { ptr.write_bytes(0, (frames::FRAME_SIZE as usize) << order) };
        NonNull::new(ptr)
    }

    unsafe fn free_pages(&self, pages: NonNull<u8>, order: u32) {
        frames::free(pages.as_ptr() as u64, order);
    }
}

/// The kernel's trace buffer type.
pub type TraceBuffer = RingBuffer<FramePages, Tsc>;

struct Slot(UnsafeCell<MaybeUninit<TraceBuffer>>);

// SAFETY: the slot is written once, before STATE becomes READY (Release), and only read after
// STATE is seen READY (Acquire); the ring buffer itself is `Sync`.
unsafe impl Sync for Slot {}

static SLOT: Slot = Slot(UnsafeCell::new(MaybeUninit::uninit()));
static STATE: AtomicU8 = AtomicU8::new(UNINIT);
const UNINIT: u8 = 0;
const INITIALISING: u8 = 1;
const READY: u8 = 2;

/// Events that could not be recorded (buffer not set up yet, or the ring refused them).
static MISSED: AtomicU64 = AtomicU64::new(0);

/// Creates the trace buffer for the CPUs online now. Call once, after the other CPUs started.
pub fn init() -> Result<(), Error> {
    if STATE
        .compare_exchange(UNINIT, INITIALISING, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return Err(Error::Busy);
    }
    let config = Config::new(percpu::online_count(), SUBBUFS_PER_CPU).mode(Mode::Overwrite);
    match RingBuffer::new(config, FramePages, Tsc) {
        Ok(rb) => {
            // SAFETY: INITIALISING makes this the only writer, and no reader looks before READY.
            unsafe { (*SLOT.0.get()).write(rb) };
            STATE.store(READY, Ordering::Release);
            Ok(())
        }
        Err(e) => {
            STATE.store(UNINIT, Ordering::Release);
            Err(e)
        }
    }
}

/// The trace buffer, once [`init`] succeeded.
pub fn buffer() -> Option<&'static TraceBuffer> {
    if STATE.load(Ordering::Acquire) != READY {
        return None;
    }
    // SAFETY: READY means the slot was initialised and is never written again.
    Some(unsafe { (*SLOT.0.get()).assume_init_ref() })
}

/// How many events were lost before reaching the buffer.
pub fn missed() -> u64 {
    MISSED.load(Ordering::Relaxed)
}

/// Longest step name the tally keeps (longer ones are cut, as a reader cuts them).
pub const STEP_NAME: usize = 24;
/// Most step names the tally keeps; events of further steps count under none.
pub const MAX_STEPS: usize = 32;

const SLOT_FREE: u8 = 0;
const SLOT_CLAIMED: u8 = 1;
const SLOT_READY: u8 = 2;

/// One step name of the tally and its counts.
struct StepSlot {
    state: AtomicU8,
    len: AtomicUsize,
    name: UnsafeCell<[u8; STEP_NAME]>,
    written: AtomicU64,
    refused: AtomicU64,
}

// SAFETY: `name` is written once by the CPU that moved `state` from FREE to CLAIMED, before it
// stores READY (Release); it is only read after READY is seen (Acquire).
unsafe impl Sync for StepSlot {}

static STEPS: [StepSlot; MAX_STEPS] = [const {
    StepSlot {
        state: AtomicU8::new(SLOT_FREE),
        len: AtomicUsize::new(0),
        name: UnsafeCell::new([0; STEP_NAME]),
        written: AtomicU64::new(0),
        refused: AtomicU64::new(0),
    }
}; MAX_STEPS];

impl StepSlot {
    /// The name, once READY.
    fn name(&'static self) -> Option<&'static [u8]> {
        if self.state.load(Ordering::Acquire) != SLOT_READY {
            return None;
        }
        // SAFETY: READY: the name is written and never changes again.
        let name = unsafe { &*self.name.get() };
        Some(&name[..self.len.load(Ordering::Relaxed)])
    }
}

/// Counts one event of `step`, written or refused. Call with interrupts off: a slot being
/// claimed is waited for, and its claimer must not be an interrupted code path of this CPU.
fn tally(step: &str, written: bool) {
    let name = &step.as_bytes()[..step.len().min(STEP_NAME)];
    for slot in &STEPS {
        loop {
            if let Some(n) = slot.name() {
                if n != name {
                    break;
                }
                let counter = if written {
                    &slot.written
                } else {
                    &slot.refused
                };
                counter.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if slot
                .state
                .compare_exchange(
                    SLOT_FREE,
                    SLOT_CLAIMED,
                    Ordering::Acquire,
                    Ordering::Acquire,
                )
                .is_ok()
            {
                // SAFETY: CLAIMED makes this the only writer of the name; no reader looks
                // before READY.
                unsafe { (&mut *slot.name.get())[..name.len()].copy_from_slice(name) };
                slot.len.store(name.len(), Ordering::Relaxed);
                slot.state.store(SLOT_READY, Ordering::Release);
                continue;
            }
            // Another CPU is writing this slot's name: it finishes in a few instructions.
            core::hint::spin_loop();
        }
    }
}

/// Calls `f(step, written, refused)` for every step name that logged since boot: events its
/// [`record`] calls wrote into the buffer, and events refused (no buffer yet, recording
/// disabled, or the ring refused them).
pub fn steps(mut f: impl FnMut(&'static [u8], u64, u64)) {
    for slot in &STEPS {
        if let Some(name) = slot.name() {
            f(
                name,
                slot.written.load(Ordering::Relaxed),
                slot.refused.load(Ordering::Relaxed),
            );
        }
    }
}

/// Records `"<step>: <message>"` in this CPU's ring.
pub fn record(step: &str, message: fmt::Arguments<'_>) {
    let Some(rb) = buffer() else {
        MISSED.fetch_add(1, Ordering::Relaxed);
        let enabled = spin::irq_save();
        tally(step, false);
        spin::irq_restore(enabled);
        return;
    };
    let line = Text::<MAX_EVENT>::new(format_args!("{step}: {message}"));
    let enabled = spin::irq_save();
    // SAFETY: interrupts are off, so this code stays on this CPU until the write is done, and
    // any writer interrupting it (an NMI) finishes before it resumes.
    let cpu = unsafe { LocalCpu::new(percpu::cpu_id()) };
    let result = rb.write(cpu, line.as_bytes());
    tally(step, result.is_ok());
    spin::irq_restore(enabled);
    if result.is_err() {
        MISSED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Logs a text event of a scenario step into the trace buffer: `trace!("fork", "{n} PTEs")`.
#[macro_export]
macro_rules! trace {
    ($step:expr, $($arg:tt)*) => { $crate::trace::record($step, format_args!($($arg)*)) };
}
