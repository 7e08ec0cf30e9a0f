//! Scenario step `xen`: a Xen save/restore cycle with `oskit-xen-suspend`.
//!
//! The real probe (`x86::probe`) runs first. Plain QEMU (TCG, or KVM without Xen support) is
//! not Xen, and the probe must say "not running on Xen"; QEMU ≥ 8 emulates Xen HVM under a KVM
//! with Xen support (`-accel kvm,xen-version=0x4000a,kernel-irqchip=split`, the xtask stage
//! "boot scenario=xen under Xen HVM emulation"), where the probe must find Xen and report its
//! version. Either way the crate's software Xen host (`sim::SimXen`) then plays the hypervisor, inside
//! this kernel: the guest binds a timer VIRQ and two IPIs per online CPU, the toolstack writes
//! `suspend` to `control/shutdown`, and the crate's `ShutdownHandler` acknowledges it and runs
//! `Machine::suspend` twice — once cancelled by the toolstack (everything must be untouched),
//! once restored into a new domain where every MFN and every port changes (every binding must
//! deliver again, on its new port, to the same IRQ; every frame reference must be valid).
//!
//! Stop-machine is the kernel's real `smp::stop_machine` (every other CPU parked with
//! interrupts off), retried until the caller runs on CPU 0 as Xen requires, and the host model
//! is told through its own `StopMachine` inside it (the model checks at the hypercall that the
//! guest is on CPU 0 with interrupts off and the others quiesced). Every service the crate
//! calls is wrapped to log the suspend step into the trace buffer (`trace!("xen", ...)`).

use core::{
    arch::asm,
    cell::Cell,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
};

use oskit_xen_suspend::{
    self as xen, EventChannels, EventStorage, Handled, Machine, ShutdownHandler,
    abi::{Port, virq},
    error::errno,
    hal::{
        Console, Devices, Errno, EventDelivery, Freezer, GrantTable, Hypervisor, P2m, PageTables,
        Platform, RootState, StartInfoFrames, StopMachine, SuspendResult, Time, XenBus,
    },
    shutdown::{Request, SHUTDOWN_PATH, ShutdownActions},
    sim::{SimConfig, SimGuest, SimPageTables, SimPlan, SimStore, SimXen},
};

use crate::{
    arch::apic,
    arch::gdt::MAX_CPUS,
    arch::percpu,
    arch::smp,
    checks::{self, Outcome},
    ensure, fail, println,
    task::sched,
};

/// Event-channel ports of the simulated domain (and of the guest's table).
const PORTS: usize = 64;
/// IRQs of the guest's event-channel table.
const IRQS: usize = 16;
/// IPIs bound per CPU (reschedule, call-function).
const IPIS: u32 = 2;
/// Page-table roots: the kernel's (pinned) and user roots under construction (unpinned).
const ROOTS: usize = 4;
/// Stop-machine attempts before giving up on landing on CPU 0.
const MAX_TRIES: u32 = 200;

type Host = SimXen<MAX_CPUS, PORTS>;
type Events = EventStorage<MAX_CPUS, IRQS, PORTS>;

/// What the wrapped services saw during the suspends.
#[derive(Default)]
struct Stats {
    /// Ports masked (the mask sweep before rebinding).
    masks: Cell<u32>,
    /// P2M translations the guest asked for.
    translations: Cell<u32>,
    /// Stop-machine attempts of the last suspend until it ran on CPU 0.
    tries: Cell<u32>,
    /// Stopped functions that ran on CPU 0 with interrupts off.
    stopped_ok: Cell<u32>,
    /// Stopped functions that ran elsewhere or with interrupts on.
    stopped_bad: Cell<u32>,
    /// Ticks other CPUs took while the machine was stopped.
    stray_ticks: Cell<u64>,
}

/// Every guest service of the host model, logging each suspend step into the trace buffer.
/// `Copy`, like `SimGuest`: one copy per field of the `Machine`.
#[derive(Clone, Copy)]
struct Traced<'h> {
    guest: SimGuest<'h, MAX_CPUS, PORTS>,
    stats: &'h Stats,
}

impl Freezer for Traced<'_> {
    type Error = Errno;
    fn freeze(&mut self) -> Result<(), Errno> {
        crate::trace!("xen", "freeze tasks");
        self.guest.freeze()
    }
    fn thaw(&mut self) {
        crate::trace!("xen", "thaw tasks");
        self.guest.thaw()
    }
}

impl Devices for Traced<'_> {
    type Error = Errno;
    fn suspend(&mut self) -> Result<(), Errno> {
        crate::trace!("xen", "suspend devices");
        Devices::suspend(&mut self.guest)
    }
    fn resume(&mut self) {
        crate::trace!("xen", "resume devices");
        Devices::resume(&mut self.guest)
    }
}

impl XenBus for Traced<'_> {
    fn suspend(&mut self) {
        crate::trace!("xen", "xenbus suspend");
        XenBus::suspend(&mut self.guest)
    }
    fn resume(&mut self) {
        crate::trace!("xen", "xenbus resume (new domain)");
        XenBus::resume(&mut self.guest)
    }
    fn suspend_cancel(&mut self) {
        crate::trace!("xen", "xenbus suspend cancelled");
        self.guest.suspend_cancel()
    }
}

/// Whether interrupts are enabled on this CPU (RFLAGS.IF).
fn irqs_enabled() -> bool {
    let flags: u64;
    // SAFETY: reads RFLAGS; no other effect.
    unsafe { asm!("pushfq", "pop {}", out(reg) flags, options(nomem, preserves_flags)) };
    flags & (1 << 9) != 0
}

/// Timer ticks taken so far by every online CPU but this one.
fn other_cpus_ticks() -> u64 {
    let me = percpu::cpu_id();
    (0..MAX_CPUS)
        .filter(|&c| c != me && percpu::cpu(c).online.load(Ordering::Acquire))
        .map(|c| percpu::cpu(c).ticks.load(Ordering::Relaxed))
        .sum()
}

/// The closure [`stopped_on_cpu0`] runs: the address of a `&mut dyn FnMut()` on the stack of
/// [`on_cpu0_stopped`], which waits for it.
static STOPPED_FN: AtomicUsize = AtomicUsize::new(0);
/// Set when the stopped function ran, on CPU 0.
static RAN_ON_CPU0: AtomicBool = AtomicBool::new(false);

/// Runs under `smp::stop_machine`: the closure of [`on_cpu0_stopped`] if this is CPU 0.
fn stopped_on_cpu0() {
    if percpu::cpu_id() != 0 {
        return;
    }
    let slot = STOPPED_FN.load(Ordering::Acquire) as *mut &mut dyn FnMut();
    if slot.is_null() {
        return;
    }
    // SAFETY: `on_cpu0_stopped` stored the address of its live `&mut dyn FnMut()` and waits
    // inside `smp::stop_machine` (which runs this function on its own CPU) until we return;
    // nothing else uses the closure meanwhile.
    unsafe { (*slot)() };
    RAN_ON_CPU0.store(true, Ordering::Release);
}

/// Runs `run` once on CPU 0 with every other CPU parked by the kernel's `smp::stop_machine`
/// (interrupts off everywhere). The kernel's stop-machine runs its function on the calling
/// CPU and tasks have no CPU affinity, so a call that lands elsewhere runs nothing and is
/// retried after a tick's sleep. Returns the attempts, `None` after [`MAX_TRIES`].
fn on_cpu0_stopped(mut run: &mut dyn FnMut()) -> Option<u32> {
    STOPPED_FN.store(&raw mut run as usize, Ordering::Release);
    let mut tries = 0;
    let ran = loop {
        tries += 1;
        RAN_ON_CPU0.store(false, Ordering::Release);
        smp::stop_machine(stopped_on_cpu0);
        if RAN_ON_CPU0.load(Ordering::Acquire) {
            break true;
        }
        if tries == MAX_TRIES {
            break false;
        }
        sched::sleep_ticks(1);
    };
    STOPPED_FN.store(0, Ordering::Release);
    ran.then_some(tries)
}

impl StopMachine for Traced<'_> {
    type Error = Errno;
    fn stop_machine<R>(&mut self, f: impl FnOnce() -> R) -> Result<R, Errno> {
        let (mut guest, stats) = (self.guest, self.stats);
        let mut f = Some(f);
        let mut result = None;
        let mut run = || {
            let (cpu, irqs_on) = (percpu::cpu_id(), irqs_enabled());
            if cpu == 0 && !irqs_on {
                stats.stopped_ok.set(stats.stopped_ok.get() + 1);
            } else {
                stats.stopped_bad.set(stats.stopped_bad.get() + 1);
            }
            crate::trace!(
                "xen",
                "stop_machine: on cpu {cpu}, interrupts {}, other CPUs parked",
                if irqs_on { "ON" } else { "off" }
            );
            let (before, start) = (other_cpus_ticks(), apic::now_us());
            if let Some(f) = f.take() {
                // The host model records CPU 0, interrupts off, others quiesced (it checks
                // them at the hypercall), then runs the save.
                result = Some(guest.stop_machine(f));
            }
            // Hold two tick periods: a CPU that is not really parked would take a tick.
            let hold = 2 * 1_000_000 / apic::HZ;
            let spent = apic::now_us() - start;
            apic::delay_us(hold.saturating_sub(spent));
            let stray = other_cpus_ticks() - before;
            stats.stray_ticks.set(stats.stray_ticks.get() + stray);
        };
        let Some(tries) = on_cpu0_stopped(&mut run) else {
            crate::trace!("xen", "stop_machine: never landed on cpu 0");
            return Err(Errno(errno::EBUSY));
        };
        stats.tries.set(tries);
        crate::trace!("xen", "stop_machine: released (attempt {tries})");
        result.unwrap_or(Err(Errno(errno::EBUSY)))
    }
}

impl P2m for Traced<'_> {
    fn pfn_to_mfn(&self, pfn: u64) -> Option<u64> {
        self.stats
            .translations
            .set(self.stats.translations.get() + 1);
        let mfn = self.guest.pfn_to_mfn(pfn);
        crate::trace!("xen", "p2m: pfn {pfn:#x} -> mfn {mfn:x?}");
        mfn
    }
    fn mfn_to_pfn(&self, mfn: u64) -> Option<u64> {
        self.stats
            .translations
            .set(self.stats.translations.get() + 1);
        let pfn = self.guest.mfn_to_pfn(mfn);
        crate::trace!("xen", "p2m: mfn {mfn:#x} -> pfn {pfn:x?}");
        pfn
    }
}

impl GrantTable for Traced<'_> {
    type Error = Errno;
    fn suspend(&mut self) -> Result<(), Errno> {
        crate::trace!("xen", "grant table: unmap frames");
        GrantTable::suspend(&mut self.guest)
    }
    fn resume(&mut self) -> Result<(), Errno> {
        let r = GrantTable::resume(&mut self.guest);
        crate::trace!("xen", "grant table: map frames again: {r:?}");
        r
    }
}

impl Time for Traced<'_> {
    fn suspend(&mut self) {
        crate::trace!("xen", "time keeping stopped");
        Time::suspend(&mut self.guest)
    }
    fn resume(&mut self) {
        crate::trace!("xen", "time keeping restarted");
        Time::resume(&mut self.guest)
    }
}

impl Console for Traced<'_> {
    type Error = Errno;
    fn resume(&mut self) -> Result<(), Errno> {
        let r = Console::resume(&mut self.guest);
        crate::trace!("xen", "console reconnected: {r:?}");
        r
    }
}

impl Hypervisor for Traced<'_> {
    type Error = Errno;
    fn bind_virq(&mut self, virq: u32, vcpu: u32) -> Result<Port, Errno> {
        let r = self.guest.bind_virq(virq, vcpu);
        crate::trace!("xen", "bind VIRQ {virq} of vCPU {vcpu}: port {r:?}");
        r
    }
    fn bind_ipi(&mut self, vcpu: u32) -> Result<Port, Errno> {
        let r = self.guest.bind_ipi(vcpu);
        crate::trace!("xen", "bind IPI of vCPU {vcpu}: port {r:?}");
        r
    }
    fn mask(&mut self, port: Port) {
        self.stats.masks.set(self.stats.masks.get() + 1);
        self.guest.mask(port)
    }
    fn unmask(&mut self, port: Port) -> Result<(), Errno> {
        self.guest.unmask(port)
    }
    fn close(&mut self, port: Port) -> Result<(), Errno> {
        let r = self.guest.close(port);
        crate::trace!("xen", "close port {port}: {r:?}");
        r
    }
    fn max_ports(&self) -> usize {
        self.guest.max_ports()
    }
    fn suspend(&mut self) -> Result<SuspendResult, Errno> {
        crate::trace!("xen", "SCHEDOP_shutdown(SHUTDOWN_suspend)");
        let r = Hypervisor::suspend(&mut self.guest);
        crate::trace!("xen", "suspend hypercall returned: {r:?}");
        r
    }
    fn update_va_mapping(&mut self, va: u64, pte: u64, flags: u64) -> Result<(), Errno> {
        crate::trace!("xen", "update_va_mapping({va:#x}, pte {pte:#x})");
        self.guest.update_va_mapping(va, pte, flags)
    }
    fn start_info_frames(&self) -> StartInfoFrames {
        self.guest.start_info_frames()
    }
    fn set_start_info_frames(&mut self, frames: StartInfoFrames) {
        crate::trace!(
            "xen",
            "start info: store frame {:#x}, console frame {:#x}",
            frames.store,
            frames.console
        );
        self.guest.set_start_info_frames(frames)
    }
    fn shared_info_va(&self) -> u64 {
        self.guest.shared_info_va()
    }
    fn use_dummy_shared_info(&mut self) {
        crate::trace!("xen", "shared info -> dummy page");
        self.guest.use_dummy_shared_info()
    }
    fn unmap_shared_info(&mut self) -> Result<(), Errno> {
        crate::trace!("xen", "unmap shared info");
        self.guest.unmap_shared_info()
    }
    fn setup_shared_info(&mut self) -> Result<(), Errno> {
        let r = self.guest.setup_shared_info();
        crate::trace!("xen", "shared info mapped again: {r:?}");
        r
    }
    fn reset_cpu_map(&mut self) {
        crate::trace!("xen", "new domain: every vCPU initialised afresh");
        self.guest.reset_cpu_map()
    }
}

impl EventDelivery for Traced<'_> {
    type Error = Errno;
    fn set_callback(&mut self) -> Result<(), Errno> {
        let r = self.guest.set_callback();
        crate::trace!("xen", "new domain: upcall callback set again: {r:?}");
        r
    }
    fn register_vcpu_info(&mut self, vcpu: u32) -> Result<(), Errno> {
        self.guest.register_vcpu_info(vcpu)
    }
    fn reread_channels(&mut self) -> Result<(), Errno> {
        let r = self.guest.reread_channels();
        crate::trace!("xen", "new domain: store/console channels re-read: {r:?}");
        r
    }
}

/// The kernel's services as one platform: every one traced over the host model.
struct KernelXen<'a, 'h, 'r>(core::marker::PhantomData<TracedRoots<'a, 'h, 'r>>);

impl<'a, 'h, 'r> Platform for KernelXen<'a, 'h, 'r> {
    type Freezer = Traced<'h>;
    type Devices = Traced<'h>;
    type XenBus = Traced<'h>;
    type Stop = Traced<'h>;
    type P2m = Traced<'h>;
    type PageTables = TracedRoots<'a, 'h, 'r>;
    type Grants = Traced<'h>;
    type Time = Traced<'h>;
    type Console = Traced<'h>;
    type Hypervisor = Traced<'h>;
}

/// The page-table roots of the host model, logging pins and unpins.
struct TracedRoots<'a, 'h, 'r>(&'a mut SimPageTables<'h, 'r, MAX_CPUS, PORTS>);

impl PageTables for TracedRoots<'_, '_, '_> {
    type Error = Errno;
    fn switch_to_kernel_root(&mut self) {
        crate::trace!("xen", "load the kernel's page-table root");
        self.0.switch_to_kernel_root()
    }
    fn root_count(&self) -> usize {
        self.0.root_count()
    }
    fn root(&self, index: usize) -> RootState {
        self.0.root(index)
    }
    fn pin(&mut self, index: usize) -> Result<(), Errno> {
        let r = self.0.pin(index);
        crate::trace!("xen", "pin root {index} for the save: {r:?}");
        r
    }
    fn unpin(&mut self, index: usize) -> Result<(), Errno> {
        let r = self.0.unpin(index);
        crate::trace!("xen", "unpin root {index}: {r:?}");
        r
    }
    fn set_save_pinned(&mut self, index: usize, mark: bool) {
        self.0.set_save_pinned(index, mark)
    }
}

/// The kernel's reaction to the toolstack's requests: a suspend runs the crate's `do_suspend`.
struct Kernel<'a, 'h, 'r> {
    traced: Traced<'h>,
    roots: &'a mut SimPageTables<'h, 'r, MAX_CPUS, PORTS>,
    events: &'a mut Events,
    /// Requests other than suspend (none expected).
    others: u32,
}

impl<'h, 'r> ShutdownActions for Kernel<'_, 'h, 'r> {
    fn shutdown(&mut self, request: Request) {
        crate::trace!("xen", "unexpected shutdown request {request:?}");
        self.others += 1;
    }
    fn suspend(&mut self) -> Result<xen::Outcome, xen::Error> {
        let t = self.traced;
        crate::trace!("xen", "suspend requested by the toolstack");
        let mut machine = Machine::<KernelXen<'_, 'h, 'r>> {
            freezer: t,
            devices: t,
            xenbus: t,
            stop: t,
            p2m: t,
            page_tables: TracedRoots(&mut *self.roots),
            grants: t,
            time: t,
            console: t,
            hypervisor: t,
        };
        let r = machine.suspend(&mut self.events.channels());
        crate::trace!("xen", "do_suspend: {r:?}");
        r
    }
    fn sysrq(&mut self, key: u8) {
        crate::trace!("xen", "unexpected sysrq {key}");
        self.others += 1;
    }
    fn ignored(&mut self, _value: &[u8]) {
        crate::trace!("xen", "unexpected ignored request");
        self.others += 1;
    }
}

/// Where each binding of the guest's table is: IRQ → port (0 = none).
type PortMap = [Port; IRQS];

fn port_map(ch: &EventChannels<'_>) -> PortMap {
    let mut map = [0; IRQS];
    for (irq, info) in ch.bindings() {
        map[irq as usize] = info.port;
    }
    map
}

/// Raises every binding's event at the host and dispatches it like the guest's upcall would
/// (port → IRQ through the table): each must arrive once, on its current port, at its own
/// IRQ. Returns how many were delivered.
fn deliver_all(host: &Host, ch: &EventChannels<'_>) -> Result<usize, checks::Failure> {
    let mut delivered = 0;
    for (irq, info) in ch.bindings() {
        let arrived = match info.kind {
            xen::events::IrqKind::Virq => host.raise_virq(info.cpu, info.index),
            xen::events::IrqKind::Ipi => host
                .send_ipi(info.port)
                .filter(|&vcpu| vcpu == info.cpu)
                .map(|_| info.port),
            xen::events::IrqKind::Free => continue,
        };
        let Some(port) = arrived else {
            return Err(checks::Failure::new(format_args!(
                "irq {irq} ({:?} {} of cpu {}) was not delivered",
                info.kind, info.index, info.cpu
            )));
        };
        if port != info.port || ch.irq_for_port(port) != Some(irq) {
            return Err(checks::Failure::new(format_args!(
                "irq {irq}'s event arrived on port {port} (irq {:?}), its port is {}",
                ch.irq_for_port(port),
                info.port
            )));
        }
        delivered += 1;
    }
    Ok(delivered)
}

/// The frames the guest refers to: start info's store and console frames, and shared info.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Frames {
    store: u64,
    console: u64,
    shared_info: u64,
}

fn frames(host: &Host) -> Frames {
    let si = host.start_info();
    Frames {
        store: si.store_mfn,
        console: si.console_mfn,
        shared_info: si.shared_info >> 12,
    }
}

/// Runs one toolstack suspend request through the shutdown handler.
fn request_suspend(
    handler: &ShutdownHandler,
    store: &mut SimStore<8>,
    kernel: &mut Kernel<'_, '_, '_>,
) -> Result<xen::Outcome, checks::Failure> {
    if store.set(SHUTDOWN_PATH, b"suspend").is_err() {
        return Err(checks::Failure::new(format_args!(
            "the toolstack cannot write {SHUTDOWN_PATH}"
        )));
    }
    let handled = handler.handle_shutdown(store, kernel);
    if store.get(SHUTDOWN_PATH) != Some(&b""[..]) {
        return Err(checks::Failure::new(format_args!(
            "the request was not acknowledged ({handled:?})"
        )));
    }
    match handled {
        Ok(Handled::Suspended(outcome)) => Ok(outcome),
        other => Err(checks::Failure::new(format_args!(
            "the suspend request ended as {other:?}"
        ))),
    }
}

/// The `xen` check.
pub fn xen_suspend() -> Outcome {
    match xen::x86::probe() {
        Err(xen::Error::NotXen) => {
            println!("  real probe: not running on Xen");
            crate::trace!(
                "xen",
                "real probe: not running on Xen; using the software Xen host"
            );
        }
        // QEMU's Xen HVM emulation (KVM with Xen support). The save/restore cycle below
        // still runs against the software host: QEMU does not save a Xen guest.
        Ok(found) => {
            println!(
                "  real probe: Xen {}.{} at CPUID {:#x}, hypercall MSR {:#x}",
                found.major, found.minor, found.base, found.hypercall_msr
            );
            crate::trace!("xen", "real probe: Xen found; using the software Xen host");
        }
        Err(e) => fail!("the Xen probe failed: {e:?}"),
    }

    let vcpus = percpu::online_count();
    let host = Host::new(SimConfig::default());
    let stats = Stats::default();
    let mut traced = Traced {
        guest: host.guest(),
        stats: &stats,
    };
    let mut events = Events::new();
    {
        let mut ch = events.channels();
        for cpu in 0..vcpus as u32 {
            if let Err(e) = ch.bind_virq(&mut traced, virq::TIMER, cpu) {
                fail!("binding the timer VIRQ of cpu {cpu}: {e:?}");
            }
            for ipi in 0..IPIS {
                if let Err(e) = ch.bind_ipi(&mut traced, ipi, cpu) {
                    fail!("binding IPI {ipi} of cpu {cpu}: {e:?}");
                }
            }
        }
        if let Err(e) = ch.bind_virq(&mut traced, virq::CONSOLE, 0) {
            fail!("binding the console VIRQ: {e:?}");
        }
    }
    let bindings = events.channels().bindings().count();
    let ports0 = port_map(&events.channels());
    match deliver_all(&host, &events.channels()) {
        Ok(n) if n == bindings => {}
        Ok(n) => fail!("{n} of {bindings} events delivered before the save"),
        Err(why) => return Err(why),
    }
    let frames0 = frames(&host);
    let pfns = (
        traced.mfn_to_pfn(frames0.store),
        traced.mfn_to_pfn(frames0.console),
    );
    let (Some(store_pfn), Some(console_pfn)) = pfns else {
        fail!("start info's frames {frames0:?} are not the domain's")
    };

    // The kernel's root is pinned; user roots under construction are not.
    let mut roots = [RootState::default(); ROOTS];
    roots[0].pinned = true;
    let roots0 = roots;
    let mut page_tables = SimPageTables::new(host.guest(), &mut roots);
    let mut store = SimStore::<8>::new();
    let handler = ShutdownHandler::new();
    if let Err(e) = handler.advertise(&mut store) {
        fail!("advertising the control features: {e:?}");
    }
    let mut kernel = Kernel {
        traced,
        roots: &mut page_tables,
        events: &mut events,
        others: 0,
    };

    // 1. The toolstack cancels: same domain, same frames, same ports.
    host.set_plan(SimPlan::Cancel);
    crate::trace!("xen", "toolstack: suspend (will be cancelled)");
    let cancelled = request_suspend(&handler, &mut store, &mut kernel)?;
    ensure!(
        cancelled == xen::Outcome::Cancelled,
        "the cancelled suspend ended as {cancelled:?}"
    );
    let cancel_tries = stats.tries.get();
    ensure!(
        host.generation() == 0,
        "a cancelled suspend moved to domain generation {}",
        host.generation()
    );
    ensure!(
        frames(&host) == frames0,
        "a cancelled suspend changed the frames: {:?} -> {:?}",
        frames0,
        frames(&host)
    );
    ensure!(
        port_map(&kernel.events.channels()) == ports0,
        "a cancelled suspend moved event channels"
    );
    match deliver_all(&host, &kernel.events.channels()) {
        Ok(n) if n == bindings => {}
        Ok(n) => fail!("{n} of {bindings} events delivered after the cancelled suspend"),
        Err(why) => return Err(why),
    }
    let v = host.audit(&kernel.events.channels(), kernel.roots.roots());
    ensure!(v.is_empty(), "audit after the cancel: {v:?}");
    ensure!(
        kernel.roots.roots() == roots0,
        "a cancelled suspend left the roots as {:?}",
        kernel.roots.roots()
    );

    // 2. Saved and restored into a new domain: every frame and port changes.
    host.set_plan(SimPlan::Resume);
    let translations_before = stats.translations.get();
    let masks_before = stats.masks.get();
    crate::trace!(
        "xen",
        "toolstack: suspend (save, restore into a new domain)"
    );
    let resumed = request_suspend(&handler, &mut store, &mut kernel)?;
    ensure!(
        resumed == xen::Outcome::Resumed,
        "the save/restore ended as {resumed:?}"
    );
    let restore_tries = stats.tries.get();
    let translated = stats.translations.get() - translations_before;
    ensure!(
        host.generation() == 1,
        "restored into generation {}, not 1",
        host.generation()
    );
    let ch = kernel.events.channels();
    let ports1 = port_map(&ch);
    let mut rebound = 0;
    for (irq, (&old, &new)) in ports0.iter().zip(&ports1).enumerate() {
        if old == 0 {
            ensure!(new == 0, "irq {irq} appeared with port {new}");
            continue;
        }
        ensure!(
            new != 0 && !ports0.contains(&new),
            "irq {irq} was on port {old}, now on {new}: not a new port"
        );
        ensure!(
            ch.irq_for_port(old).is_none(),
            "old port {old} still raises irq {:?}",
            ch.irq_for_port(old)
        );
        rebound += 1;
    }
    ensure!(
        rebound == bindings,
        "{rebound} of {bindings} bindings rebound"
    );
    match deliver_all(&host, &ch) {
        Ok(n) if n == bindings => {}
        Ok(n) => fail!("{n} of {bindings} events delivered in the new domain"),
        Err(why) => return Err(why),
    }
    let frames1 = frames(&host);
    ensure!(
        frames1.store != frames0.store
            && frames1.console != frames0.console
            && frames1.shared_info != frames0.shared_info,
        "frames did not all move: {frames0:?} -> {frames1:?}"
    );
    let moved = [
        (frames1.store, frames0.store, store_pfn),
        (frames1.console, frames0.console, console_pfn),
    ];
    for (new, old, pfn) in moved {
        ensure!(
            traced.mfn_to_pfn(new) == Some(pfn) && traced.pfn_to_mfn(pfn) == Some(new),
            "frame {new:#x} does not translate back to pfn {pfn:#x}"
        );
        ensure!(
            traced.mfn_to_pfn(old).is_none(),
            "the old domain's frame {old:#x} still translates"
        );
    }
    let v = host.audit(&ch, kernel.roots.roots());
    ensure!(v.is_empty(), "audit after the restore: {v:?}");
    let v = host.hypercall_violations();
    ensure!(v.is_empty(), "the host refused the guest's state: {v:?}");
    ensure!(
        host.hypercalls() == 2,
        "{} suspend hypercalls, not 2",
        host.hypercalls()
    );
    ensure!(
        host.cpu_map_resets() == 1,
        "the CPU map was reset {} times",
        host.cpu_map_resets()
    );
    ensure!(
        kernel.roots.roots() == roots0 && host.pinned_roots() == 1,
        "roots after the restore: {:?}, {} pinned at the host",
        kernel.roots.roots(),
        host.pinned_roots()
    );
    ensure!(
        stats.stopped_ok.get() == 2 && stats.stopped_bad.get() == 0,
        "the saves ran {} times on cpu 0 with interrupts off, {} times otherwise",
        stats.stopped_ok.get(),
        stats.stopped_bad.get()
    );
    ensure!(
        stats.stray_ticks.get() == 0,
        "other CPUs took {} ticks while the machine was stopped",
        stats.stray_ticks.get()
    );
    ensure!(kernel.others == 0, "{} unexpected requests", kernel.others);
    let masked = stats.masks.get() - masks_before;
    println!(
        "  {vcpus} vCPUs, {bindings} bindings: cancel left them on their ports; restore rebound \
         all ({masked} ports masked first) and each delivered on its new port"
    );
    println!(
        "  frames: store {:#x} -> {:#x}, console {:#x} -> {:#x}, shared info {:#x} -> {:#x}",
        frames0.store,
        frames1.store,
        frames0.console,
        frames1.console,
        frames0.shared_info,
        frames1.shared_info
    );
    println!(
        "  stop_machine on cpu 0 after {cancel_tries} and {restore_tries} attempt(s), \
         other CPUs took no tick"
    );
    crate::trace!(
        "xen",
        "done: {rebound} ports rebound, {} events delivered",
        host.delivered()
    );
    checks::figures(format_args!(
        "{vcpus} vCPUs, {rebound} ports rebound, 3 frames moved ({translated} p2m lookups), \
         cancel untouched, restore {resumed:?}"
    ));
    Ok(())
}
