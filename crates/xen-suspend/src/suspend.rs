//! `do_suspend`: freeze, suspend devices and xenbus, stop the machine, save on CPU 0, and bring
//! everything back, whatever failed.

use crate::error::{Error, Outcome, Step};
use crate::events::EventChannels;
use crate::hal::{
    Console, Devices, EventDelivery, Freezer, GrantTable, HalError, Hypervisor, P2m, PageTables,
    Platform, StartInfoFrames, StopMachine, SuspendResult, Time, XenBus,
};

/// Everything a suspend touches, one trait each, typed by one [`Platform`]. Build it with a
/// struct literal (`Machine::<MyPlatform> { .. }`); fields may be `&mut` borrows of
/// longer-lived objects (every trait has a blanket `&mut T` impl).
pub struct Machine<P: Platform> {
    /// Freezes and thaws tasks.
    pub freezer: P::Freezer,
    /// The device model.
    pub devices: P::Devices,
    /// Xenbus.
    pub xenbus: P::XenBus,
    /// Stop-machine.
    pub stop: P::Stop,
    /// The P2M.
    pub p2m: P::P2m,
    /// Page-table roots.
    pub page_tables: P::PageTables,
    /// The grant table.
    pub grants: P::Grants,
    /// Time keeping.
    pub time: P::Time,
    /// The console.
    pub console: P::Console,
    /// The hypervisor.
    pub hypervisor: P::Hypervisor,
}

impl<P: Platform> core::fmt::Debug for Machine<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Machine").finish_non_exhaustive()
    }
}

/// The first failure of a suspend; later ones are consequences and are not reported.
#[derive(Debug, Default)]
struct FirstFailure(Option<(Step, i32)>);

impl FirstFailure {
    fn note(&mut self, step: Step, err: &impl HalError) {
        self.note_errno(step, err.errno());
    }

    fn note_errno(&mut self, step: Step, errno: i32) {
        self.0.get_or_insert((step, errno));
    }
}

impl<Pf: Platform> Machine<Pf> {
    /// Saves the domain (Linux's `do_suspend`): returns once the guest runs again, in the same
    /// domain or a new one.
    ///
    /// Order: freeze tasks; suspend devices; suspend xenbus; on CPU 0 with the machine stopped:
    /// load the kernel's root, pin every unpinned root (marking it save-pinned), suspend grants
    /// and time, turn start info's store and console MFNs into PFNs, point shared info at a
    /// dummy page and unmap it, issue the hypercall, then undo all of it (in a new domain also
    /// set event delivery up again ([`EventDelivery`]: callback, every vCPU's `vcpu_info`,
    /// the store and console channels), rebind every VIRQ and IPI in `events` and resume the
    /// console); then xenbus resume (or suspend-cancel), devices resume, thaw.
    ///
    /// Calling context: process context of the task handling the `control/shutdown` watch
    /// (it sleeps in freeze and stop-machine); not reentrant; allocates nothing.
    ///
    /// Every failure is rolled back as far as it can be: when this returns, tasks are thawed,
    /// devices and xenbus run, and every step after a failed one that can still run has run.
    /// An error names the first step that failed and where the guest ended ([`Outcome`]);
    /// after the hypercall only the failed piece is left behind (a binding without a port, a
    /// root still save-pinned, unmapped grant frames), and the next restore retries it.
    pub fn suspend(&mut self, events: &mut EventChannels<'_>) -> Result<Outcome, Error> {
        let Machine {
            freezer,
            devices,
            xenbus,
            stop,
            p2m,
            page_tables,
            grants,
            time,
            console,
            hypervisor,
        } = self;

        if let Err(e) = freezer.freeze() {
            return Err(Error::Suspend {
                step: Step::Freeze,
                errno: e.errno(),
                outcome: Outcome::NotSuspended,
            });
        }
        if let Err(e) = devices.suspend() {
            freezer.thaw();
            return Err(Error::Suspend {
                step: Step::DeviceSuspend,
                errno: e.errno(),
                outcome: Outcome::NotSuspended,
            });
        }
        xenbus.suspend();

        let mut fail = FirstFailure::default();
        let outcome = match stop.stop_machine(|| {
            save_on_cpu0(
                &*p2m,
                &mut *page_tables,
                &mut *grants,
                &mut *time,
                &mut *console,
                &mut *hypervisor,
                events,
            )
        }) {
            Ok((outcome, inner)) => {
                fail = inner;
                outcome
            }
            Err(e) => {
                fail.note(Step::StopMachine, &e);
                Outcome::NotSuspended
            }
        };

        if outcome == Outcome::Resumed {
            xenbus.resume();
        } else {
            xenbus.suspend_cancel();
        }
        devices.resume();
        freezer.thaw();

        match fail.0 {
            None => Ok(outcome),
            Some((step, errno)) => Err(Error::Suspend {
                step,
                errno,
                outcome,
            }),
        }
    }
}

/// The part that runs on CPU 0 with interrupts off (Linux's `xen_suspend`).
fn save_on_cpu0<
    M: P2m,
    P: PageTables,
    G: GrantTable,
    T: Time,
    C: Console,
    H: Hypervisor + EventDelivery,
>(
    p2m: &M,
    page_tables: &mut P,
    grants: &mut G,
    time: &mut T,
    console: &mut C,
    hv: &mut H,
    events: &mut EventChannels<'_>,
) -> (Outcome, FirstFailure) {
    let mut fail = FirstFailure::default();

    // A lazily kept user root may be on its way out: run on the kernel's own.
    page_tables.switch_to_kernel_root();

    if let Err(e) = pin_all(page_tables) {
        fail.note(Step::Pin, &e);
        unpin_all(page_tables, &mut fail);
        return (Outcome::NotSuspended, fail);
    }
    if let Err(e) = grants.suspend() {
        fail.note(Step::GrantSuspend, &e);
        unpin_all(page_tables, &mut fail);
        return (Outcome::NotSuspended, fail);
    }
    time.suspend();

    let canonical = match pre_suspend(p2m, hv) {
        Ok(()) => true,
        Err(errno) => {
            fail.note_errno(Step::PreSuspend, errno);
            false
        }
    };
    let outcome = if canonical {
        match hv.suspend() {
            Ok(SuspendResult::Resumed) => Outcome::Resumed,
            Ok(SuspendResult::Cancelled) => Outcome::Cancelled,
            Err(e) => {
                fail.note(Step::Hypercall, &e);
                Outcome::NotSuspended
            }
        }
    } else {
        Outcome::NotSuspended
    };

    // Post-suspend. In the same domain start info gets its MFNs back; a new domain's toolstack
    // already wrote the new ones, and every vCPU is initialised afresh.
    if outcome == Outcome::Resumed {
        hv.reset_cpu_map();
    } else if canonical {
        frames_to_mfns(p2m, hv, &mut fail);
    }
    if let Err(e) = hv.setup_shared_info() {
        fail.note(Step::PostSuspend, &e);
    }
    if outcome == Outcome::Resumed {
        restore_delivery(hv, events.cpus(), &mut fail);
    }
    time.resume();
    if let Err(e) = grants.resume() {
        fail.note(Step::GrantResume, &e);
    }
    unpin_all(page_tables, &mut fail);

    if outcome == Outcome::Resumed {
        if let Err(e) = events.resume(hv) {
            fail.note_errno(Step::Rebind, e.errno());
        }
        if let Err(e) = console.resume() {
            fail.note(Step::ConsoleResume, &e);
        }
    }
    (outcome, fail)
}

/// A new domain delivers nothing until the callback and every vCPU's `vcpu_info` are set up
/// again; the store and console channels may have moved. Every step runs even when an earlier
/// one failed.
fn restore_delivery<H: EventDelivery>(hv: &mut H, cpus: usize, fail: &mut FirstFailure) {
    if let Err(e) = hv.set_callback() {
        fail.note(Step::Delivery, &e);
    }
    for vcpu in 0..cpus {
        if let Err(e) = hv.register_vcpu_info(vcpu as u32) {
            fail.note(Step::Delivery, &e);
        }
    }
    if let Err(e) = hv.reread_channels() {
        fail.note(Step::Delivery, &e);
    }
}

/// Pins every unpinned root and marks it save-pinned; stops at the first failure.
fn pin_all<P: PageTables>(pt: &mut P) -> Result<(), P::Error> {
    for i in 0..pt.root_count() {
        if !pt.root(i).pinned {
            pt.pin(i)?;
            pt.set_save_pinned(i, true);
        }
    }
    Ok(())
}

/// Unpins exactly the save-pinned roots. A root that fails to unpin keeps its mark, so the
/// next resume tries again.
fn unpin_all<P: PageTables>(pt: &mut P, fail: &mut FirstFailure) {
    for i in 0..pt.root_count() {
        if pt.root(i).save_pinned {
            match pt.unpin(i) {
                Ok(()) => pt.set_save_pinned(i, false),
                Err(e) => fail.note(Step::Unpin, &e),
            }
        }
    }
}

/// Store and console MFNs → PFNs, shared info → dummy page, its mapping removed. On failure
/// start info and shared info are as they were.
fn pre_suspend<M: P2m, H: Hypervisor>(p2m: &M, hv: &mut H) -> Result<(), i32> {
    let mfns = hv.start_info_frames();
    // Start info is written by the toolstack: an MFN that is not ours is an error, not a panic.
    let (Some(store), Some(console)) = (p2m.mfn_to_pfn(mfns.store), p2m.mfn_to_pfn(mfns.console))
    else {
        return Err(crate::error::errno::EINVAL);
    };
    hv.set_start_info_frames(StartInfoFrames { store, console });
    hv.use_dummy_shared_info();
    if let Err(e) = hv.unmap_shared_info() {
        hv.set_start_info_frames(mfns);
        // setup_shared_info runs in post-suspend; it also repoints the kernel at the page.
        return Err(e.errno());
    }
    Ok(())
}

/// Store and console PFNs → MFNs again in the same domain.
fn frames_to_mfns<M: P2m, H: Hypervisor>(p2m: &M, hv: &mut H, fail: &mut FirstFailure) {
    let pfns = hv.start_info_frames();
    match (p2m.pfn_to_mfn(pfns.store), p2m.pfn_to_mfn(pfns.console)) {
        (Some(store), Some(console)) => {
            hv.set_start_info_frames(StartInfoFrames { store, console })
        }
        _ => fail.note_errno(Step::PostSuspend, crate::error::errno::EINVAL),
    }
}
