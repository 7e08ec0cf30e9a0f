//! The per-CPU side: the context-switch hooks and the threshold-interrupt (overflow) handler.

use core::num::NonZeroU32;

use crate::{
    Bts,
    config::Flags,
    format::Record,
    hal::{AddressSpace, BtsHardware, DeferredWork, LockedAlloc, RecordSink, Signaller, TaskRef},
};

/// One CPU's BTS state: its hardware and the context loaded on it, if any.
///
/// Keep one per CPU and only use it on that CPU with interrupts disabled (the switch hooks)
/// or from its threshold interrupt.
#[derive(Debug)]
pub struct BtsCpu<H> {
    hw: H,
    /// The slot whose DS area is loaded (the CPU holds that slot).
    loaded: Option<usize>,
    missed: u64,
}

/// What the threshold-interrupt handler did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overflow {
    /// Records pushed into the sink.
    pub drained: usize,
    /// Records the sink refused (lost: the drain was truncated).
    pub truncated: usize,
    /// The buffer had reached its absolute maximum: branches after it may have been lost.
    pub full: bool,
    /// The overflow signal sent to the task, if any.
    pub signalled: Option<NonZeroU32>,
}

impl<H: BtsHardware> BtsCpu<H> {
    /// The BTS state of a CPU driven by `hw`.
    pub const fn new(hw: H) -> Self {
        Self {
            hw,
            loaded: None,
            missed: 0,
        }
    }

    /// The hardware.
    pub fn hw(&self) -> &H {
        &self.hw
    }

    /// The hardware, mutably (for example to run branches on a [`SoftCpu`](crate::sim::SoftCpu)).
    pub fn hw_mut(&mut self) -> &mut H {
        &mut self.hw
    }

    /// Whether a traced task's context is loaded on this CPU.
    pub fn is_loaded(&self) -> bool {
        self.loaded.is_some()
    }

    /// Switch-ins of traced tasks that ran untraced because an operation held their context.
    pub fn missed(&self) -> u64 {
        self.missed
    }

    fn disable(&mut self) {
        let off = self.hw.debugctl().with_bts(0);
        // SAFETY: disabling BTS has no memory requirement.
        unsafe { self.hw.set_debugctl(off) };
    }
}

impl<T, M, A, W, const N: usize> Bts<T, M, A, W, N>
where
    T: TaskRef,
    M: AddressSpace,
    A: LockedAlloc,
    W: DeferredWork,
{
    /// Context-switch hook, switch-out half: call on `cpu` with interrupts disabled before
    /// switching away from the current task. Disables BTS in DEBUGCTL (the index stays in the
    /// task's DS area), writes a "departs" record if the context has `SCHED`, and lets go of
    /// the context (scheduling its teardown if it was untraced while running).
    pub fn switch_out<H: BtsHardware>(&self, cpu: &mut BtsCpu<H>, timestamp: u64) {
        let Some(i) = cpu.loaded.take() else {
            return;
        };
        cpu.disable();
        // SAFETY: the CPU held slot `i` since `switch_in`.
        unsafe {
            self.slots[i].inner.with_mut(|c| {
                if let (true, Some(pid), Some(b)) = (
                    c.flags.contains(Flags::SCHED),
                    c.task.as_ref().map(T::pid),
                    c.buffer.as_mut(),
                ) {
                    b.push(
                        Record::TaskDeparts { timestamp, pid }.encode(),
                        c.flags.circular(),
                    );
                }
            })
        };
        self.release(i);
    }

    /// Context-switch hook, switch-in half: call on `cpu` with interrupts disabled when `next`
    /// is about to run (after [`switch_out`](Bts::switch_out)). If `next` is traced, writes an
    /// "arrives" record with `SCHED`, loads its DS area into IA32_DS_AREA and its BTS bits into
    /// IA32_DEBUGCTL, and keeps its context (operations on it get `Busy`) until switch-out.
    pub fn switch_in<H: BtsHardware>(&self, cpu: &mut BtsCpu<H>, next: &T, timestamp: u64) {
        if cpu.loaded.is_some() {
            self.switch_out(cpu, timestamp);
        }
        if self.contexts.load(crate::sync::Ordering::Relaxed) == 0 {
            return;
        }
        let i = match self.hold(next.pid()) {
            Ok(Some(i)) => i,
            Ok(None) => return,
            Err(_) => {
                cpu.missed += 1;
                return;
            }
        };
        // SAFETY: we hold slot `i`.
        let load = unsafe {
            self.slots[i].inner.with_mut(|c| {
                let bits = c.debugctl_bits();
                let sched = c.flags.contains(Flags::SCHED);
                let circular = c.flags.circular();
                let b = c.buffer.as_mut().filter(|_| c.tracer)?;
                if sched {
                    b.push(
                        Record::TaskArrives {
                            timestamp,
                            pid: next.pid(),
                        }
                        .encode(),
                        circular,
                    );
                }
                (sched || bits != 0).then(|| (b.ds_linear(), bits))
            })
        };
        let Some((ds, bits)) = load else {
            self.release(i);
            return;
        };
        cpu.loaded = Some(i);
        if bits != 0 {
            let value = cpu.hw.debugctl().with_bts(bits);
            // SAFETY: the DS area and its buffer are locked pages owned by context `i`, which
            // this CPU holds until `switch_out` disables BTS: they cannot be freed or moved
            // before.
            unsafe {
                cpu.hw.set_ds_area(ds);
                cpu.hw.set_debugctl(value);
            }
        }
    }

    /// The threshold (PMI) interrupt handler: call on the CPU that took the interrupt.
    ///
    /// Returns `None` if no context loaded on this CPU reached its threshold (the interrupt
    /// belongs to someone else; the LVT is left alone). Otherwise, with [`Flags::INTERRUPT`]
    /// drains the trace oldest first into `sink` and empties it (reporting what the sink
    /// refused), with [`Flags::SIGNAL`] signals the task through `signaller` (without
    /// `INTERRUPT`, tracing then stays off until the tracer drains or clears), and re-arms the
    /// interrupt.
    pub fn threshold_interrupt<H: BtsHardware>(
        &self,
        cpu: &mut BtsCpu<H>,
        sink: &mut impl RecordSink,
        signaller: &mut impl Signaller<T>,
    ) -> Option<Overflow> {
        let i = cpu.loaded?;
        let before = cpu.hw.debugctl();
        // Stop storing while we read the buffer (our own branches would land in it).
        cpu.disable();
        // SAFETY: the CPU holds slot `i` (loaded), and this handler runs on that CPU.
        let (report, bits) = unsafe {
            self.slots[i].inner.with_mut(|c| {
                let circular = c.flags.circular();
                let b = c.buffer.as_mut().filter(|_| c.tracer && !circular)?;
                let ds = b.ds();
                let base = b.base();
                let reached = ds
                    .bts_interrupt_threshold
                    .checked_sub(base)
                    .is_some_and(|t| {
                        let t = (t / crate::format::RECORD_SIZE as u64) as usize;
                        crate::view::clamp_index(&ds, base, b.capacity) >= t
                    });
                if !reached {
                    return None;
                }
                let mut report = Overflow::default();
                let capacity = b.capacity;
                let view = b.view(false);
                report.full = view.index() == capacity;
                if c.flags.contains(Flags::INTERRUPT) {
                    let pid = c.task.as_ref().map_or(0, T::pid);
                    for r in view.iter() {
                        if sink.push(pid, r) {
                            report.drained += 1;
                        } else {
                            report.truncated += 1;
                        }
                    }
                    b.set_index(0);
                }
                if let (Some(sig), Some(task)) = (NonZeroU32::new(c.signal), c.task.as_ref()) {
                    signaller.signal(task, sig);
                    report.signalled = Some(sig);
                    if !c.flags.contains(Flags::INTERRUPT) {
                        c.paused = true;
                    }
                }
                Some((report, c.debugctl_bits()))
            })
        }
        .map_or(
            (None, before.0 & crate::hal::DebugCtl::BTS_MASK),
            |(r, b)| (Some(r), b),
        );
        let value = before.with_bts(bits);
        // SAFETY: as in `switch_in`: the CPU still holds the context whose DS area is loaded.
        unsafe { cpu.hw.set_debugctl(value) };
        if report.is_some() {
            cpu.hw.rearm_threshold_interrupt();
        }
        report
    }
}
