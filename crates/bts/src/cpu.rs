//! The per-CPU side: the context-switch hooks and the threshold-interrupt (overflow) handler.
//!
//! # Overflow handling: no overflow is lost
//!
//! A context in `INTERRUPT` or `SIGNAL` mode overflows when its index reaches the interrupt
//! threshold, whoever wrote the record that got it there: the processor (a branch) or a hook
//! (a `SCHED` record). The crate checks the threshold wherever it can be crossed and handles
//! the overflow on the spot (drain into the [`RecordSink`], signal through the [`Signaller`]):
//!
//! - in [`Bts::threshold_interrupt`], for the context loaded on the CPU;
//! - in [`Bts::switch_out`], after BTS is off and the "departs" record is written: a PMI the
//!   processor raised just before the switch (interrupts off) is taken only after the next
//!   task is loaded, so the overflow is handled here instead, and the LVT re-armed;
//! - in [`Bts::switch_in`], after the "arrives" record is written, before BTS is turned on.
//!
//! The PMI that arrives after its context left ("late") finds nothing to do:
//! [`Pmi::Late`], and the LVT is armed.

use core::num::NonZeroU32;

use crate::{
    Bts,
    config::Flags,
    error::Error,
    format::Record,
    hal::{
        AddressSpace, BtsHardware, DebugCtl, DeferredWork, LockedAlloc, RecordSink, Signaller,
        TaskRef,
    },
    slot::Inner,
};

/// One CPU's BTS state: its hardware, the tracer it serves, the context loaded on it, and the
/// IA32_DS_AREA value to give back when that context leaves.
///
/// Keep one per CPU and only use it on that CPU with interrupts disabled (the switch hooks)
/// or from its threshold interrupt. The first tracer that loads a context on it (in
/// [`Bts::switch_in`]) binds it for good; any other tracer's hooks then get
/// [`Error::ForeignCpu`] and change nothing. With the PMI delivered
/// as an NMI, keep it in a [`CpuCell`](crate::CpuCell) (see [`Bts::nmi`]).
#[derive(Debug)]
pub struct BtsCpu<H> {
    hw: H,
    /// The tracer bound to this CPU ([`Bts`]'s id; 0 = none yet).
    owner: usize,
    /// The slot whose context is loaded (the CPU holds that slot).
    loaded: Option<usize>,
    /// IA32_DS_AREA before the loaded context's, restored at switch-out.
    saved_ds: Option<u64>,
    /// A switch-out handled an overflow the processor had signalled: its PMI may still come.
    late: bool,
    missed: u64,
}

/// What an overflow handling did (in the threshold interrupt or a switch hook).
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

impl Overflow {
    fn merge(a: Option<Self>, b: Option<Self>) -> Option<Self> {
        match (a, b) {
            (Some(a), Some(b)) => Some(Self {
                drained: a.drained + b.drained,
                truncated: a.truncated + b.truncated,
                full: a.full || b.full,
                signalled: b.signalled.or(a.signalled),
            }),
            (a, b) => a.or(b),
        }
    }
}

/// What the threshold-interrupt handler found. Who re-arms the LVT is part of each case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Pmi {
    /// The context loaded on this CPU had reached its threshold: handled as reported; the
    /// crate re-armed the LVT.
    Overflow(Overflow),
    /// A BTS threshold interrupt that arrived after its context was switched out; the
    /// switch-out already handled the overflow. The crate re-armed the LVT.
    Late,
    /// No BTS overflow on this CPU: the crate left the LVT alone. The interrupt belongs to
    /// another PMI source of the kernel (a performance counter), which re-arms it.
    NotBts,
    /// ([`Bts::nmi`] only) the NMI interrupted a switch hook that holds this CPU's state:
    /// nothing was touched; that hook (or, if it was a switch-in, the task's next switch-out)
    /// handles the overflow and re-arms the LVT.
    Deferred,
}

impl Pmi {
    /// The overflow report of [`Pmi::Overflow`], `None` for the other cases.
    pub const fn overflow(self) -> Option<Overflow> {
        match self {
            Pmi::Overflow(o) => Some(o),
            _ => None,
        }
    }
}

impl<H: BtsHardware> BtsCpu<H> {
    /// The BTS state of a CPU driven by `hw`, bound to no tracer yet.
    pub const fn new(hw: H) -> Self {
        Self {
            hw,
            owner: 0,
            loaded: None,
            saved_ds: None,
            late: false,
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

    /// Turns BTS off, `was` being IA32_DEBUGCTL as just read (one MSR read, not two).
    fn disable(&mut self, was: DebugCtl) {
        // SAFETY: disabling BTS has no memory requirement.
        unsafe { self.hw.set_debugctl(was.with_bts(0)) };
    }

    /// `Late` (re-arming the LVT) if a switch-out handled a signalled overflow since the last
    /// PMI, else `NotBts`.
    fn late_or_not_bts(&mut self) -> Pmi {
        if core::mem::take(&mut self.late) {
            self.hw.rearm_threshold_interrupt();
            Pmi::Late
        } else {
            Pmi::NotBts
        }
    }
}

/// Handles an overflow of context `c` if its index reached the threshold: with `INTERRUPT`
/// drains the trace into `sink` and empties it, with `SIGNAL` signals the task (and, without
/// `INTERRUPT`, pauses tracing until the tracer drains or clears). `None` if there is none:
/// circular, no buffer, below the threshold, or already handled (paused).
#[inline(always)]
fn handle_overflow<T: TaskRef, M>(
    c: &mut Inner<T, M>,
    sink: &mut impl RecordSink,
    signaller: &mut impl Signaller<T>,
) -> Option<Overflow> {
    // The context switch of a circular trace stops here.
    if !c.tracer || c.paused || c.flags.circular() {
        return None;
    }
    handle_threshold(c, sink, signaller)
}

/// `handle_overflow` past its quick checks.
fn handle_threshold<T: TaskRef, M>(
    c: &mut Inner<T, M>,
    sink: &mut impl RecordSink,
    signaller: &mut impl Signaller<T>,
) -> Option<Overflow> {
    let b = c.buffer.as_mut()?;
    if !b.reached_threshold() {
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
    Some(report)
}

/// Writes a SCHED record into `c`'s buffer if it asks for them. Returns `false` only when the
/// record was refused because the buffer is full (then the caller handles the overflow, which
/// in interrupt mode drains it, and writes the record again).
#[inline(always)]
fn sched_record<T, M>(c: &mut Inner<T, M>, record: Record) -> bool {
    if !c.tracer || !c.flags.contains(Flags::SCHED) {
        return true;
    }
    let circular = c.flags.circular();
    c.buffer
        .as_mut()
        .is_none_or(|b| b.push(record.encode(), circular))
}

/// Writes a SCHED record, then handles an overflow it (or the branches before it) reached. A
/// record that met a full buffer is written again after the overflow is handled: an interrupt
/// mode drain has made room for it (in signal mode the buffer stays full until the tracer
/// drains, and the record is lost, as the report's `full` says).
#[inline(always)]
fn sched_record_and_overflow<T: TaskRef, M>(
    c: &mut Inner<T, M>,
    record: Record,
    sink: &mut impl RecordSink,
    signaller: &mut impl Signaller<T>,
) -> Option<Overflow> {
    let stored = sched_record(c, record);
    let report = handle_overflow(c, sink, signaller);
    if !stored {
        sched_record(c, record);
    }
    report
}

impl<T, M, A, W, const N: usize> Bts<T, M, A, W, N>
where
    T: TaskRef,
    M: AddressSpace,
    A: LockedAlloc,
    W: DeferredWork,
{
    /// `ForeignCpu` if `cpu` serves another tracer.
    fn check_owner<H>(&self, cpu: &BtsCpu<H>) -> Result<(), Error> {
        if cpu.owner == 0 || cpu.owner == self.id() {
            Ok(())
        } else {
            Err(Error::ForeignCpu)
        }
    }

    /// Context-switch hook, switch-out half: call on `cpu` with interrupts disabled before
    /// switching away from the current task.
    ///
    /// Disables BTS in IA32_DEBUGCTL (the index stays in the task's DS area), gives
    /// IA32_DS_AREA back the value it had before [`switch_in`](Bts::switch_in), writes a
    /// "departs" record if the context has `SCHED`, handles an overflow if the index reached
    /// the threshold (through `sink` and `signaller`, as the threshold interrupt would, and
    /// re-arming the LVT if the processor had raised the PMI), and lets go of the context
    /// (scheduling its teardown if it was untraced while running). Returns the overflow
    /// handled, if any.
    ///
    /// Calling context: interrupts off, on the CPU `cpu` belongs to; no allocation, no
    /// spinning; may call [`DeferredWork::schedule`], `sink` and `signaller`.
    ///
    /// # Errors
    /// [`Error::ForeignCpu`] if `cpu` is bound to another tracer (nothing is changed).
    pub fn switch_out<H: BtsHardware>(
        &self,
        cpu: &mut BtsCpu<H>,
        timestamp: u64,
        sink: &mut impl RecordSink,
        signaller: &mut impl Signaller<T>,
    ) -> Result<Option<Overflow>, Error> {
        self.check_owner(cpu)?;
        let Some(i) = cpu.loaded.take() else {
            return Ok(None);
        };
        let was = cpu.hw.debugctl();
        cpu.disable(was);
        if let Some(previous) = cpu.saved_ds.take() {
            // SAFETY: BTS is off on this CPU; the value is the one the kernel had before our
            // `switch_in`, which the kernel's own DS area user keeps valid.
            unsafe { cpu.hw.set_ds_area(previous) };
        }
        let armed = was.has(DebugCtl::TR | DebugCtl::BTS | DebugCtl::BTINT);
        // SAFETY: the CPU held slot `i` since `switch_in`.
        let (report, signalled) = unsafe {
            self.slots[i].inner.with_mut(|c| {
                // The processor reached the threshold while the task ran: it raised the PMI
                // (perhaps not taken yet: interrupts are off) and the LVT is masked.
                let signalled =
                    armed && !c.paused && c.buffer.as_ref().is_some_and(|b| b.reached_threshold());
                let report = match c.task.as_ref().map(T::pid) {
                    Some(pid) => sched_record_and_overflow(
                        c,
                        Record::TaskDeparts { timestamp, pid },
                        sink,
                        signaller,
                    ),
                    None => handle_overflow(c, sink, signaller),
                };
                (report, signalled)
            })
        };
        if signalled {
            cpu.hw.rearm_threshold_interrupt();
            cpu.late = true;
        }
        self.release(i);
        Ok(report)
    }

    /// Context-switch hook, switch-in half: call on `cpu` with interrupts disabled when `next`
    /// is about to run (after [`switch_out`](Bts::switch_out); a context still loaded is
    /// switched out first).
    ///
    /// If `next` is traced: writes an "arrives" record with `SCHED`, handles an overflow if
    /// that record reached the threshold, saves IA32_DS_AREA and loads the context's DS area
    /// there, sets its BTS bits in IA32_DEBUGCTL, and keeps the context (operations on it get
    /// `Busy`) until switch-out. Returns the overflow handled, if any. Loading a context binds
    /// `cpu` to this tracer.
    ///
    /// Calling context: as [`switch_out`](Bts::switch_out).
    ///
    /// # Errors
    /// [`Error::ForeignCpu`] if `cpu` is bound to another tracer (nothing is changed).
    pub fn switch_in<H: BtsHardware>(
        &self,
        cpu: &mut BtsCpu<H>,
        next: &T,
        timestamp: u64,
        sink: &mut impl RecordSink,
        signaller: &mut impl Signaller<T>,
    ) -> Result<Option<Overflow>, Error> {
        self.check_owner(cpu)?;
        let out = if cpu.loaded.is_some() {
            self.switch_out(cpu, timestamp, sink, signaller)?
        } else {
            None
        };
        if self.contexts.load(crate::sync::Ordering::Relaxed) == 0 {
            return Ok(out);
        }
        let i = match self.hold(next.pid()) {
            Ok(Some(i)) => i,
            Ok(None) => return Ok(out),
            Err(_) => {
                cpu.missed += 1;
                return Ok(out);
            }
        };
        // SAFETY: we hold slot `i`.
        let (report, load) = unsafe {
            self.slots[i].inner.with_mut(|c| {
                let pid = next.pid();
                let record = Record::TaskArrives { timestamp, pid };
                let report = sched_record_and_overflow(c, record, sink, signaller);
                let bits = c.debugctl_bits();
                let sched = c.flags.contains(Flags::SCHED);
                let load = c
                    .buffer
                    .as_ref()
                    .filter(|_| c.tracer && (sched || bits != 0))
                    .map(|b| (b.ds_linear(), bits));
                (report, load)
            })
        };
        let report = Overflow::merge(out, report);
        let Some((ds, bits)) = load else {
            self.release(i);
            return Ok(report);
        };
        cpu.loaded = Some(i);
        cpu.owner = self.id();
        if bits != 0 {
            cpu.saved_ds = Some(cpu.hw.ds_area());
            let value = cpu.hw.debugctl().with_bts(bits);
            // SAFETY: the DS area and its buffer are locked pages owned by context `i`, which
            // this CPU holds until `switch_out` disables BTS: they cannot be freed or moved
            // before.
            unsafe {
                cpu.hw.set_ds_area(ds);
                cpu.hw.set_debugctl(value);
            }
        }
        Ok(report)
    }

    /// The threshold (PMI) interrupt handler: call on the CPU that took the interrupt, with
    /// its `cpu`.
    ///
    /// If the context loaded on `cpu` reached its threshold, handles the overflow: with
    /// [`Flags::INTERRUPT`] drains the trace oldest first into `sink` and empties it
    /// (reporting what the sink refused), with [`Flags::SIGNAL`] signals the task through
    /// `signaller` (without `INTERRUPT`, tracing then stays off until the tracer drains or
    /// clears), and re-arms the LVT: [`Pmi::Overflow`]. Otherwise [`Pmi::Late`] or
    /// [`Pmi::NotBts`] (see [`Pmi`] for who re-arms).
    ///
    /// Calling context: interrupt (or NMI, see [`Bts::nmi`]) on that CPU. Takes no lock,
    /// does not allocate, never spins, never calls [`DeferredWork::schedule`]; calls `sink`,
    /// `signaller` and the [`BtsHardware`] methods, which must be safe in that context.
    ///
    /// # Errors
    /// [`Error::ForeignCpu`] if `cpu` is bound to another tracer (nothing is changed).
    pub fn threshold_interrupt<H: BtsHardware>(
        &self,
        cpu: &mut BtsCpu<H>,
        sink: &mut impl RecordSink,
        signaller: &mut impl Signaller<T>,
    ) -> Result<Pmi, Error> {
        self.check_owner(cpu)?;
        let Some(i) = cpu.loaded else {
            return Ok(cpu.late_or_not_bts());
        };
        let before = cpu.hw.debugctl();
        // Stop storing while we read the buffer (our own branches would land in it).
        cpu.disable(before);
        // SAFETY: the CPU holds slot `i` (loaded), and this handler runs on that CPU.
        let handled = unsafe {
            self.slots[i]
                .inner
                .with_mut(|c| handle_overflow(c, sink, signaller).map(|r| (r, c.debugctl_bits())))
        };
        let (pmi, bits) = match handled {
            Some((report, bits)) => (Pmi::Overflow(report), bits),
            None => (Pmi::NotBts, before.0 & DebugCtl::BTS_MASK),
        };
        let value = before.with_bts(bits);
        // SAFETY: as in `switch_in`: the CPU still holds the context whose DS area is loaded.
        unsafe { cpu.hw.set_debugctl(value) };
        if pmi == Pmi::NotBts {
            return Ok(cpu.late_or_not_bts());
        }
        cpu.late = false;
        cpu.hw.rearm_threshold_interrupt();
        Ok(pmi)
    }

    /// The threshold interrupt delivered as an NMI: runs
    /// [`threshold_interrupt`](Bts::threshold_interrupt) on the CPU state in `cell` unless
    /// the NMI interrupted a holder of the cell (a switch hook on this CPU), then returns
    /// [`Pmi::Deferred`] without touching anything.
    ///
    /// Calling context: NMI on the CPU `cell` belongs to. Besides what
    /// `threshold_interrupt` does, it only tries the cell's flag once (never waits): no lock
    /// the interrupted code may hold is taken. `sink` and `signaller` run in NMI context:
    /// they must not take locks either (use a lock-free per-CPU buffer; queue the signal,
    /// for example with an irq-work, rather than send it from here).
    ///
    /// # Errors
    /// [`Error::ForeignCpu`] if the CPU is bound to another tracer (nothing is changed).
    pub fn nmi<H: BtsHardware>(
        &self,
        cell: &crate::CpuCell<H>,
        sink: &mut impl RecordSink,
        signaller: &mut impl Signaller<T>,
    ) -> Result<Pmi, Error> {
        match cell.try_lock() {
            Some(mut cpu) => self.threshold_interrupt(&mut cpu, sink, signaller),
            None => Ok(Pmi::Deferred),
        }
    }
}
