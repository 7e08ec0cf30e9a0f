//! [`AsyncPf`]: the guest side put together: enabling per CPU, the page-fault hook, the
//! page-ready handler, and waiting/waking through the kernel's scheduler.

use core::{marker::PhantomData, pin::pin};

use crate::{
    abi::{
        AREA_ALIGN, EN_DELIVERY_AS_INT, EN_DELIVERY_AS_PF_VMEXIT, EN_ENABLED, EN_SEND_ALWAYS,
        TOKEN_WAKE_ALL,
    },
    error::Error,
    hal::{ApfHardware, KvmFeatures, Scheduler},
    percpu::{ApfCpu, PfEvent, Protocol},
    table::{
        DEFAULT_BUCKETS, DEFAULT_DUMMIES, Enqueue, SleepTable, WaitNode, Waiter, Wake, WakeAll,
    },
};

/// How to enable async page faults on a CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// The page-ready vector for the interrupt protocol (32..=255); `None` allows only the
    /// legacy #PF protocol, which only hosts without `ASYNC_PF_INT` (KVM before 5.8) speak.
    pub vector: Option<u8>,
    /// Use the legacy #PF protocol when the host lacks `ASYNC_PF_INT` (obsolete: only KVM
    /// before 5.8 needs it).
    pub allow_page_fault_protocol: bool,
    /// `SEND_ALWAYS`: also get "not present" while in kernel mode (a preemptible kernel whose
    /// kernel-mode faults can sleep). Without it KVM only sends them for user mode. Obsolete
    /// for Linux guests (which stopped asking for it in 5.8) but still honoured by KVM.
    pub send_always: bool,
    /// Set `DELIVERY_AS_PF_VMEXIT` when the host offers `ASYNC_PF_VMEXIT` (the default).
    ///
    /// With it, a "not present" that arrives while this CPU runs a nested guest (this kernel
    /// is itself a hypervisor) may reach the kernel as a #PF **VM exit** of that nested guest
    /// instead of a #PF in the kernel. The duty it creates: the kernel's nested-#PF exit
    /// handler must call [`AsyncPf::handle_page_fault`] with the exit's fault address before
    /// reflecting the fault into the nested guest, exactly as its own #PF handler does. A
    /// kernel that runs no nested guests can leave it on; one that runs them and does not
    /// check its #PF exits sets it to `false` (KVM then does not send async PFs while a
    /// nested guest runs).
    pub pf_vmexit: bool,
}

impl Config {
    /// Interrupt protocol on `vector`, falling back to the #PF protocol on old hosts;
    /// `DELIVERY_AS_PF_VMEXIT` when offered.
    pub const fn new(vector: u8) -> Self {
        Self {
            vector: Some(vector),
            allow_page_fault_protocol: true,
            send_always: false,
            pf_vmexit: true,
        }
    }
}

/// What the page-fault hook found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "an ordinary fault must go on to the kernel's fault handler"]
pub enum PfOutcome {
    /// An ordinary fault: handle it as usual.
    NotAsyncPf,
    /// An async-PF event, fully handled: return from the exception.
    Handled,
}

impl PfOutcome {
    /// Whether the fault was an async-PF event (and the handler should return).
    pub const fn is_handled(self) -> bool {
        matches!(self, Self::Handled)
    }
}

/// The async-PF event a fault or interrupt carried, and what became of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsyncEvent {
    /// "Not present": the task slept (or halt-polled) until its page was ready.
    Slept,
    /// "Not present" whose wake had already come: returned at once.
    WakeCameFirst,
    /// "Not present" while a CPU has a dropped page-ready wake on record (full dummy pool, see
    /// [`Wake::Dropped`]): returned at once without sleeping, since the dropped wake may have
    /// been this one's. The access re-executes and at worst faults again.
    ReturnedEarly,
    /// "Page ready" for one token.
    Woke(Wake),
    /// "Page ready" for every token of this CPU.
    WokeAll(WakeAll),
    /// Unknown non-zero `flags` (interrupt protocol), ignored; the access re-executes.
    Unexpected(u32),
}

/// The guest side of KVM async page faults for a kernel with scheduler `S` on hardware `H`,
/// with `D` dummy entries and `B` buckets. Holds the sleeper table; per-CPU state lives in
/// one [`ApfCpu`] per CPU that the kernel keeps.
///
/// Call the handlers with local interrupts disabled (as interrupt gates leave them).
pub struct AsyncPf<
    H,
    S: Scheduler,
    const D: usize = DEFAULT_DUMMIES,
    const B: usize = DEFAULT_BUCKETS,
> {
    sched: S,
    table: SleepTable<S::Task, D, B>,
    _hw: PhantomData<fn() -> H>,
}

impl<H: ApfHardware, S: Scheduler, const D: usize, const B: usize> AsyncPf<H, S, D, B> {
    /// The guest side with an empty sleeper table (usable in a `static`).
    #[cfg(not(loom))]
    pub const fn new(sched: S) -> Self {
        Self {
            sched,
            table: SleepTable::new(),
            _hw: PhantomData,
        }
    }

    /// The guest side with an empty sleeper table.
    #[cfg(loom)]
    pub fn new(sched: S) -> Self {
        Self {
            sched,
            table: SleepTable::new(),
            _hw: PhantomData,
        }
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &S {
        &self.sched
    }

    /// The sleeper table.
    pub fn table(&self) -> &SleepTable<S::Task, D, B> {
        &self.table
    }

    /// Probes KVM and enables async page faults on the current CPU, whose state is `cpu`.
    /// Returns the protocol chosen: interrupt if the host offers it and `config` has a vector,
    /// else the legacy #PF protocol if allowed and offered.
    ///
    /// # Safety
    ///
    /// `area_phys` is the guest-physical address of `cpu.area_addr()`; `cpu` is the current
    /// CPU's state and stays in place (a `static`) until [`disable_cpu`](Self::disable_cpu)
    /// (the host writes to it behind the program's back until then). Interrupts are disabled.
    pub unsafe fn enable_cpu(
        &self,
        hw: &H,
        cpu: &ApfCpu,
        area_phys: u64,
        config: Config,
    ) -> Result<Protocol, Error<H::Error>> {
        let features = hw.probe().ok_or(Error::NotKvm)?;
        if cpu.protocol().is_some() {
            return Err(Error::AlreadyEnabled);
        }
        if !area_phys.is_multiple_of(AREA_ALIGN as u64) {
            return Err(Error::Misaligned);
        }
        let protocol = match config.vector {
            Some(vector) if features.has(KvmFeatures::ASYNC_PF_INT) => {
                if vector < 32 {
                    return Err(Error::BadVector);
                }
                Protocol::Interrupt { vector }
            }
            // A host that offers ASYNC_PF_INT (KVM >= 5.8) accepts ENABLED without
            // DELIVERY_AS_INT and then sends nothing at all: never report that as enabled.
            None if features.has(KvmFeatures::ASYNC_PF_INT) => return Err(Error::Unsupported),
            _ if config.allow_page_fault_protocol && features.has(KvmFeatures::ASYNC_PF) => {
                Protocol::PageFault
            }
            _ => return Err(Error::Unsupported),
        };
        let mut en = area_phys | EN_ENABLED;
        if config.send_always {
            en |= EN_SEND_ALWAYS;
        }
        if config.pf_vmexit && features.has(KvmFeatures::ASYNC_PF_VMEXIT) {
            en |= EN_DELIVERY_AS_PF_VMEXIT;
        }
        if let Protocol::Interrupt { vector } = protocol {
            // KVM takes the vector before the enable.
            hw.write_int_vector(vector).map_err(Error::Hardware)?;
            en |= EN_DELIVERY_AS_INT;
        }
        // Ready to handle events before the host may send the first one.
        cpu.clear_area();
        cpu.set_protocol(Some(protocol));
        // SAFETY: `area_phys` is 64-byte aligned and names `cpu`'s area, which stays put until
        // disabled (this function's contract).
        if let Err(e) = unsafe { hw.write_enable(en) } {
            cpu.set_protocol(None);
            return Err(Error::Hardware(e));
        }
        Ok(protocol)
    }

    /// Disables async page faults on the current CPU (state `cpu`): the host stops writing to
    /// its area. Takes no lock, so it is fit for kexec, crash and reboot paths; waiters are not
    /// woken (see [`cpu_offline`](Self::cpu_offline)).
    ///
    /// On a CPU that never enabled async page faults (or already disabled them) it does
    /// nothing, and in particular writes no MSR: `MSR_KVM_ASYNC_PF_EN` does not exist on bare
    /// metal or under another hypervisor (#GP).
    ///
    /// Context: any, interrupts on or off; no lock, no allocation, never spins.
    pub fn disable_cpu(&self, hw: &H, cpu: &ApfCpu) -> Result<(), Error<H::Error>> {
        if cpu.protocol().is_none() {
            return Ok(());
        }
        // SAFETY: writing 0 clears ENABLED: it gives the host no memory.
        unsafe { hw.write_enable(0) }.map_err(Error::Hardware)?;
        cpu.set_protocol(None);
        cpu.clear_area();
        Ok(())
    }

    /// The current CPU (state `cpu`, number `cpu_id`) is going offline: disables async page
    /// faults there (no MSR write if they were never enabled, as for
    /// [`disable_cpu`](Self::disable_cpu)) and wakes every task that was waiting on it, since
    /// its wakes will not come.
    ///
    /// Context: the CPU going down, interrupts off; takes each bucket lock in turn (spins).
    pub fn cpu_offline(
        &self,
        hw: &H,
        cpu: &ApfCpu,
        cpu_id: u32,
    ) -> Result<WakeAll, Error<H::Error>> {
        let disabled = self.disable_cpu(hw, cpu);
        let woken = self.wake_all_of(cpu_id);
        disabled.map(|()| woken)
    }

    /// The hook at the top of the page-fault handler, called with CR2 as read on entry.
    ///
    /// Reads and clears the host's `flags`/`reason` before doing anything that could fault,
    /// then sleeps (not present) or wakes (legacy page ready). With a `H` that is never a guest
    /// ([`Native`](crate::hal::Native)) this is a constant `NotAsyncPf`; otherwise an ordinary
    /// fault costs one load and one branch, everything else being out of line.
    #[inline(always)]
    pub fn handle_page_fault(&self, cpu: &ApfCpu, cr2: u64) -> PfOutcome {
        if !H::MAY_BE_GUEST || !cpu.event_pending() {
            return PfOutcome::NotAsyncPf;
        }
        self.handle_async_fault(cpu, cr2)
    }

    #[cold]
    #[inline(never)]
    fn handle_async_fault(&self, cpu: &ApfCpu, cr2: u64) -> PfOutcome {
        match self.handle_page_fault_event(cpu, cr2) {
            Some(_) => PfOutcome::Handled,
            None => PfOutcome::NotAsyncPf,
        }
    }

    /// [`handle_page_fault`](Self::handle_page_fault), telling what the event was (for a
    /// kernel that logs them, and for tests): `None` for an ordinary fault.
    pub fn handle_page_fault_event(&self, cpu: &ApfCpu, cr2: u64) -> Option<AsyncEvent> {
        if !H::MAY_BE_GUEST {
            return None;
        }
        cpu.take_pf_event(cr2).map(|event| self.dispatch(event))
    }

    /// Carries out an event [`ApfCpu::take_pf_event`] found.
    pub fn dispatch(&self, event: PfEvent) -> AsyncEvent {
        match event {
            PfEvent::NotPresent(token) => match self.wait(token) {
                Enqueue::Ready => AsyncEvent::WakeCameFirst,
                Enqueue::WakeLost => AsyncEvent::ReturnedEarly,
                Enqueue::Queued => AsyncEvent::Slept,
            },
            PfEvent::Ready(token) => AsyncEvent::Woke(self.wake(token)),
            PfEvent::ReadyAll => AsyncEvent::WokeAll(self.wake_all()),
            PfEvent::Unexpected(flags) => AsyncEvent::Unexpected(flags),
        }
    }

    /// The page-ready interrupt handler (interrupt protocol): takes the token, wakes its
    /// waiter (or every waiter of this CPU for `0xffffffff`), and acknowledges so the host
    /// may send the next one. `Ok(None)`: spurious (no token, or not enabled here). The
    /// kernel sends the local APIC its EOI as for any interrupt.
    pub fn handle_ready_interrupt(
        &self,
        hw: &H,
        cpu: &ApfCpu,
    ) -> Result<Option<AsyncEvent>, Error<H::Error>> {
        if !H::MAY_BE_GUEST {
            return Ok(None);
        }
        let Some(Protocol::Interrupt { .. }) = cpu.protocol() else {
            return Ok(None);
        };
        let event = cpu.take_ready_token().map(|token| {
            if token == TOKEN_WAKE_ALL {
                AsyncEvent::WokeAll(self.wake_all())
            } else {
                AsyncEvent::Woke(self.wake(token))
            }
        });
        hw.ack().map_err(Error::Hardware)?;
        Ok(event)
    }

    /// Waits until `token`'s page is ready: consumes its early wake if there is one, else
    /// blocks the current task (or halt-polls, if it cannot sleep) until woken.
    pub fn wait(&self, token: u32) -> Enqueue {
        let cpu = self.sched.current_cpu();
        let can_sleep = self.sched.can_sleep();
        let waiter = if can_sleep {
            Waiter::Task(self.sched.current_task())
        } else {
            Waiter::Halted { cpu }
        };
        let node = pin!(WaitNode::new(&self.table, token, cpu, waiter));
        let node = node.into_ref();
        let enqueued = node.enqueue();
        if enqueued == Enqueue::Queued {
            while !node.is_woken() {
                if can_sleep {
                    self.sched.block();
                } else {
                    self.sched.halt();
                }
            }
        }
        enqueued
    }

    /// Page ready for `token`: wakes its waiter, or leaves a dummy for the wait to come.
    pub fn wake(&self, token: u32) -> Wake {
        self.table
            .wake(token, self.sched.current_cpu(), |w| resume(&self.sched, w))
    }

    /// Wakes every waiter that faulted on the current CPU (and drops its dummies).
    pub fn wake_all(&self) -> WakeAll {
        self.wake_all_of(self.sched.current_cpu())
    }

    /// Wakes every waiter that faulted on CPU `cpu_id` (and drops its dummies).
    pub fn wake_all_of(&self, cpu_id: u32) -> WakeAll {
        self.table.wake_all(cpu_id, |w| resume(&self.sched, w))
    }
}

fn resume<S: Scheduler>(sched: &S, waiter: Waiter<S::Task>) {
    match waiter {
        Waiter::Task(task) => sched.unblock(task),
        Waiter::Halted { cpu } => sched.kick(cpu),
    }
}

impl<H, S: Scheduler, const D: usize, const B: usize> core::fmt::Debug for AsyncPf<H, S, D, B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AsyncPf")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}
