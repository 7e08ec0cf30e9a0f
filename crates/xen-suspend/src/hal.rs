//! The hardware and kernel services the Xen guest side is written against.
//!
//! Small traits, one concern each. Fallible ones have an associated `Error` implementing
//! [`HalError`] (its Linux errno); the mechanism never looks deeper than that. Every trait has
//! a blanket impl for `&mut T`, so one object may implement several and be lent to each.

use core::convert::Infallible;
use core::fmt::Debug;

use crate::abi::Port;

/// Xen's signature in EBX, ECX, EDX of its CPUID base leaf.
pub const XEN_SIGNATURE: [u8; 12] = *b"XenVMMXenVMM";
/// First hypervisor CPUID base probed.
pub const CPUID_BASE_FIRST: u32 = 0x4000_0000;
/// Last hypervisor CPUID base probed (Xen moves to 0x40000100 when it also emulates Hyper-V).
pub const CPUID_BASE_LAST: u32 = 0x4001_0000;

/// An error of a trait implementation: all the mechanism needs is its Linux errno.
pub trait HalError: Debug {
    /// The positive Linux errno.
    fn errno(&self) -> i32;
}

/// A bare Linux errno (positive), for implementations that have nothing richer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl HalError for Errno {
    fn errno(&self) -> i32 {
        self.0
    }
}

impl HalError for Infallible {
    fn errno(&self) -> i32 {
        match *self {}
    }
}

/// Freezes and thaws tasks, so no page-table update is half-done while the domain is saved.
pub trait Freezer {
    /// Why freezing failed.
    type Error: HalError;
    /// Freezes every task; on failure nothing stays frozen.
    fn freeze(&mut self) -> Result<(), Self::Error>;
    /// Thaws every task.
    fn thaw(&mut self);
}

/// The kernel's device model: suspends and resumes every device.
pub trait Devices {
    /// Why suspending failed.
    type Error: HalError;
    /// Suspends every device; on failure every device is running again.
    fn suspend(&mut self) -> Result<(), Self::Error>;
    /// Resumes every device.
    fn resume(&mut self);
}

/// A list of devices is the kernel's device model: the slice suspends its devices from last to
/// first (a device registered after its parent suspends before it) and resumes them first to
/// last. When one fails, the ones already suspended are resumed in the reverse order of their
/// suspension and its error is returned: on failure every device is running again. Hand it
/// to a [`crate::Machine`] as `&mut devices[..]`.
impl<D: Devices> Devices for [D] {
    type Error = D::Error;
    fn suspend(&mut self) -> Result<(), Self::Error> {
        for i in (0..self.len()).rev() {
            if let Err(e) = self[i].suspend() {
                for dev in &mut self[i + 1..] {
                    dev.resume();
                }
                return Err(e);
            }
        }
        Ok(())
    }
    fn resume(&mut self) {
        for dev in self.iter_mut() {
            dev.resume();
        }
    }
}

/// The xenbus frontends and backends.
pub trait XenBus {
    /// Quiesces xenbus before the save.
    fn suspend(&mut self);
    /// Reconnects in the new domain (new store frame and event channel).
    fn resume(&mut self);
    /// The suspend was cancelled: carry on with the old connection.
    fn suspend_cancel(&mut self);
}

/// Runs a function on CPU 0 while every other CPU spins with interrupts off.
pub trait StopMachine {
    /// Why the machine could not be stopped (the function did not run).
    type Error: HalError;
    /// Runs `f` on CPU 0 with interrupts off and every other CPU quiesced, then releases them.
    ///
    /// The caller waits until `f` has run, so `f` borrows the caller's state; an
    /// implementation that runs it on another CPU hands it over for that duration only (as
    /// Linux's `stop_machine` does) and returns `f`'s result.
    fn stop_machine<R>(&mut self, f: impl FnOnce() -> R) -> Result<R, Self::Error>;
}

/// The pseudo-physical to machine frame map of a PV guest (identity when auto-translated).
pub trait P2m {
    /// Machine frame of `pfn`, `None` when the PFN has no frame.
    fn pfn_to_mfn(&self, pfn: u64) -> Option<u64>;
    /// Pseudo-physical frame of `mfn`, `None` when the MFN is not this domain's.
    fn mfn_to_pfn(&self, mfn: u64) -> Option<u64>;
}

/// State of one page-table root (a PGD on Linux).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RootState {
    /// Xen validated and pinned it.
    pub pinned: bool,
    /// Pinned only for the save: unpin it on resume.
    pub save_pinned: bool,
}

/// Every page-table root of the guest (Linux's `pgd_list`). Stable while the machine is
/// stopped; indices are `0..root_count()`.
pub trait PageTables {
    /// Why a pin or unpin failed.
    type Error: HalError;
    /// Loads the kernel's own root (CR3) so no user root is live during the save.
    fn switch_to_kernel_root(&mut self);
    /// Number of roots.
    fn root_count(&self) -> usize;
    /// State of root `index`.
    fn root(&self, index: usize) -> RootState;
    /// Asks Xen to pin root `index` (`MMUEXT_PIN_L4_TABLE`) and marks it pinned.
    fn pin(&mut self, index: usize) -> Result<(), Self::Error>;
    /// Asks Xen to unpin root `index` (`MMUEXT_UNPIN_TABLE`) and marks it unpinned.
    fn unpin(&mut self, index: usize) -> Result<(), Self::Error>;
    /// Sets or clears the save-pinned mark of root `index`.
    fn set_save_pinned(&mut self, index: usize, mark: bool);
}

/// The grant table's mapping of Xen's grant frames.
pub trait GrantTable {
    /// Why mapping or unmapping failed.
    type Error: HalError;
    /// Unmaps the grant frames before the save.
    fn suspend(&mut self) -> Result<(), Self::Error>;
    /// Maps the grant frames again; fails (`ENOSYS` on Linux) when the domain now offers fewer
    /// frames than the guest uses.
    fn resume(&mut self) -> Result<(), Self::Error>;
}

/// The clock: system time jumps across a save, so the time keeping is told.
pub trait Time {
    /// Stops time keeping before the save.
    fn suspend(&mut self);
    /// Restarts time keeping from the (possibly new) shared info.
    fn resume(&mut self);
}

/// The Xen console.
pub trait Console {
    /// Why the console could not be resumed.
    type Error: HalError;
    /// Reconnects the console to its (new) ring and event channel after a restore.
    fn resume(&mut self) -> Result<(), Self::Error>;
}

/// What the suspend hypercall reports when the guest runs again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SuspendResult {
    /// Cancelled, or only checkpointed (hypercall returned 1): same domain.
    Cancelled,
    /// Resumed in a new domain (hypercall returned 0).
    Resumed,
}

/// Store and console frames of start info: MFNs while running, PFNs while saved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct StartInfoFrames {
    /// `store_mfn`.
    pub store: u64,
    /// `console.domU.mfn`.
    pub console: u64,
}

/// The hypervisor: event channels, the suspend hypercall, the guest's view of start info and
/// shared info.
pub trait Hypervisor {
    /// A failed hypercall.
    type Error: HalError;
    /// `EVTCHNOP_bind_virq`: a new port for `virq` of `vcpu`.
    fn bind_virq(&mut self, virq: u32, vcpu: u32) -> Result<Port, Self::Error>;
    /// `EVTCHNOP_bind_ipi`: a new IPI port notifying `vcpu`.
    fn bind_ipi(&mut self, vcpu: u32) -> Result<Port, Self::Error>;
    /// Masks `port` (sets its bit in shared info's mask). Out-of-range ports are ignored.
    fn mask(&mut self, port: Port);
    /// `EVTCHNOP_unmask`: unmasks `port`, delivering an event that is pending on it.
    fn unmask(&mut self, port: Port) -> Result<(), Self::Error>;
    /// `EVTCHNOP_close`: closes `port` (it may be bound again later).
    fn close(&mut self, port: Port) -> Result<(), Self::Error>;
    /// Size of the hypervisor's port space for this domain (4096 for the 2-level ABI on a
    /// 64-bit guest): the resume mask sweep covers all of it, not just the guest's table.
    fn max_ports(&self) -> usize;
    /// `SCHEDOP_shutdown(SHUTDOWN_suspend)` with start info's MFN: returns when the guest runs
    /// again.
    fn suspend(&mut self) -> Result<SuspendResult, Self::Error>;
    /// `update_va_mapping`: sets the PTE of `va` (PV only).
    fn update_va_mapping(&mut self, va: u64, pte: u64, flags: u64) -> Result<(), Self::Error>;
    /// The store and console frames in start info.
    fn start_info_frames(&self) -> StartInfoFrames;
    /// Writes the store and console frames of start info.
    fn set_start_info_frames(&mut self, frames: StartInfoFrames);
    /// Virtual address shared info is mapped at.
    fn shared_info_va(&self) -> u64;
    /// Points the kernel's shared-info pointer at a dummy page, so vCPU-info reads during the
    /// save hit ordinary memory.
    fn use_dummy_shared_info(&mut self);
    /// Removes shared info's mapping before the save. PV: `update_va_mapping(va, 0)`; an HVM
    /// backend whose shared info lives in a guest frame overrides this with nothing.
    fn unmap_shared_info(&mut self) -> Result<(), Self::Error> {
        let va = self.shared_info_va();
        self.update_va_mapping(va, 0, crate::abi::uvmf::INVLPG)
    }
    /// Maps shared info again (at its new frame after a restore) and points the kernel at it.
    fn setup_shared_info(&mut self) -> Result<(), Self::Error>;
    /// Resumed in a new domain: every online vCPU counts as initialised again (Linux resets
    /// `xen_cpu_initialized_map` to the online map).
    fn reset_cpu_map(&mut self) {}
}

/// The event channels the toolstack bound for the domain: its xenstore and console rings'.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ToolstackChannels {
    /// The xenstore ring's port (`HVM_PARAM_STORE_EVTCHN`, start info's `store_evtchn`).
    pub store: Port,
    /// The console ring's port (`HVM_PARAM_CONSOLE_EVTCHN`, start info's `console_evtchn`).
    pub console: Port,
}

/// How events reach the vCPUs, set up again after a restore into a new domain (Linux's
/// `xen_hvm_post_suspend` and `xen_vcpu_restore`): a new domain delivers nothing until it is.
///
/// Called by [`crate::Machine::suspend`] on CPU 0 with interrupts off and the other CPUs
/// quiesced, after shared info is mapped again and before the event channels are rebound, in
/// this order: [`EventDelivery::set_callback`], [`EventDelivery::register_vcpu_info`] for
/// every vCPU of the event table, [`EventDelivery::reread_channels`].
pub trait EventDelivery {
    /// A failed hypercall.
    type Error: HalError;
    /// Points the domain's upcall at the kernel's callback vector again
    /// (`HVM_PARAM_CALLBACK_IRQ`; PV: `set_callbacks`).
    fn set_callback(&mut self) -> Result<(), Self::Error>;
    /// Registers `vcpu`'s `vcpu_info` again (`VCPUOP_register_vcpu_info`) and, where the
    /// kernel uses one, its per-vCPU upcall vector (`HVMOP_set_evtchn_upcall_vector`).
    fn register_vcpu_info(&mut self, vcpu: u32) -> Result<(), Self::Error>;
    /// Reads the new domain's store and console event channels (`HVM_PARAM_STORE_EVTCHN`,
    /// `HVM_PARAM_CONSOLE_EVTCHN`; PV: start info) and keeps them where xenbus and the
    /// console find them when they reconnect (e.g. a [`ToolstackChannels`] field).
    fn reread_channels(&mut self) -> Result<(), Self::Error>;
}

impl<T: EventDelivery + ?Sized> EventDelivery for &mut T {
    type Error = T::Error;
    fn set_callback(&mut self) -> Result<(), Self::Error> {
        (**self).set_callback()
    }
    fn register_vcpu_info(&mut self, vcpu: u32) -> Result<(), Self::Error> {
        (**self).register_vcpu_info(vcpu)
    }
    fn reread_channels(&mut self) -> Result<(), Self::Error> {
        (**self).reread_channels()
    }
}

/// The kernel's services a suspend uses, named once: one associated type per concern, so a
/// [`crate::Machine`] takes one type parameter. Implement it on a marker type:
///
/// ```text
/// enum MyXen {}
/// impl Platform for MyXen {
///     type Freezer = MyFreezer; /* ... */
///     type Hypervisor = XenHvm;
/// }
/// let machine = Machine::<MyXen> { freezer: MyFreezer, /* ... */ hypervisor: hvm };
/// ```
///
/// Any type may serve several roles (e.g. `&mut Kernel` for the freezer, devices and xenbus).
/// Only [`Platform::Stop`] runs outside the stopped section; everything else is used inside it.
pub trait Platform {
    /// Freezes and thaws tasks.
    type Freezer: Freezer;
    /// The device model.
    type Devices: Devices;
    /// Xenbus.
    type XenBus: XenBus;
    /// Stop-machine.
    type Stop: StopMachine;
    /// The P2M.
    type P2m: P2m;
    /// Page-table roots.
    type PageTables: PageTables;
    /// The grant table.
    type Grants: GrantTable;
    /// Time keeping.
    type Time: Time;
    /// The console.
    type Console: Console;
    /// The hypervisor: event channels, the suspend hypercall, event delivery.
    type Hypervisor: Hypervisor + EventDelivery;
}

/// A xenstore transaction handle.
pub type Transaction = u32;

/// The xenstore client the shutdown watch uses (paths relative to the domain's home).
pub trait XenStore {
    /// A failed access. `EAGAIN` from [`XenStore::end`] means "conflict, retry".
    type Error: HalError;
    /// Starts a transaction.
    fn start(&mut self) -> Result<Transaction, Self::Error>;
    /// Ends a transaction, committing it unless `abort`.
    fn end(&mut self, txn: Transaction, abort: bool) -> Result<(), Self::Error>;
    /// Reads `path` into `buf`, returning the value's length (which may exceed `buf`: the
    /// value is then truncated). `ENOENT` when absent.
    fn read(&mut self, txn: Transaction, path: &str, buf: &mut [u8]) -> Result<usize, Self::Error>;
    /// Writes `value` at `path`.
    fn write(&mut self, txn: Transaction, path: &str, value: &[u8]) -> Result<(), Self::Error>;
}

/// Executes CPUID.
pub trait Cpuid {
    /// `[eax, ebx, ecx, edx]` of `leaf` (subleaf 0).
    fn cpuid(&self, leaf: u32) -> [u32; 4];
}

impl<T: Cpuid + ?Sized> Cpuid for &T {
    fn cpuid(&self, leaf: u32) -> [u32; 4] {
        (**self).cpuid(leaf)
    }
}

/// Finds Xen's CPUID base leaf, scanning the hypervisor range in steps of 0x100.
///
/// Returns the base (`0x4000_0000`, `0x4000_0100`, ...) whose signature is Xen's and which
/// reports at least the leaves up to base + 2, or `None` when not running on Xen.
pub fn find_xen_base(cpu: &impl Cpuid) -> Option<u32> {
    (CPUID_BASE_FIRST..CPUID_BASE_LAST)
        .step_by(0x100)
        .find(|&base| {
            let [max, ebx, ecx, edx] = cpu.cpuid(base);
            let mut sig = [0u8; 12];
            sig[0..4].copy_from_slice(&ebx.to_le_bytes());
            sig[4..8].copy_from_slice(&ecx.to_le_bytes());
            sig[8..12].copy_from_slice(&edx.to_le_bytes());
            sig == XEN_SIGNATURE && max >= base + 2
        })
}

impl<T: Freezer + ?Sized> Freezer for &mut T {
    type Error = T::Error;
    fn freeze(&mut self) -> Result<(), Self::Error> {
        (**self).freeze()
    }
    fn thaw(&mut self) {
        (**self).thaw()
    }
}

impl<T: Devices + ?Sized> Devices for &mut T {
    type Error = T::Error;
    fn suspend(&mut self) -> Result<(), Self::Error> {
        (**self).suspend()
    }
    fn resume(&mut self) {
        (**self).resume()
    }
}

impl<T: XenBus + ?Sized> XenBus for &mut T {
    fn suspend(&mut self) {
        (**self).suspend()
    }
    fn resume(&mut self) {
        (**self).resume()
    }
    fn suspend_cancel(&mut self) {
        (**self).suspend_cancel()
    }
}

impl<T: StopMachine + ?Sized> StopMachine for &mut T {
    type Error = T::Error;
    fn stop_machine<R>(&mut self, f: impl FnOnce() -> R) -> Result<R, Self::Error> {
        (**self).stop_machine(f)
    }
}

impl<T: P2m + ?Sized> P2m for &T {
    fn pfn_to_mfn(&self, pfn: u64) -> Option<u64> {
        (**self).pfn_to_mfn(pfn)
    }
    fn mfn_to_pfn(&self, mfn: u64) -> Option<u64> {
        (**self).mfn_to_pfn(mfn)
    }
}

impl<T: P2m + ?Sized> P2m for &mut T {
    fn pfn_to_mfn(&self, pfn: u64) -> Option<u64> {
        (**self).pfn_to_mfn(pfn)
    }
    fn mfn_to_pfn(&self, mfn: u64) -> Option<u64> {
        (**self).mfn_to_pfn(mfn)
    }
}

impl<T: PageTables + ?Sized> PageTables for &mut T {
    type Error = T::Error;
    fn switch_to_kernel_root(&mut self) {
        (**self).switch_to_kernel_root()
    }
    fn root_count(&self) -> usize {
        (**self).root_count()
    }
    fn root(&self, index: usize) -> RootState {
        (**self).root(index)
    }
    fn pin(&mut self, index: usize) -> Result<(), Self::Error> {
        (**self).pin(index)
    }
    fn unpin(&mut self, index: usize) -> Result<(), Self::Error> {
        (**self).unpin(index)
    }
    fn set_save_pinned(&mut self, index: usize, mark: bool) {
        (**self).set_save_pinned(index, mark)
    }
}

impl<T: GrantTable + ?Sized> GrantTable for &mut T {
    type Error = T::Error;
    fn suspend(&mut self) -> Result<(), Self::Error> {
        (**self).suspend()
    }
    fn resume(&mut self) -> Result<(), Self::Error> {
        (**self).resume()
    }
}

impl<T: Time + ?Sized> Time for &mut T {
    fn suspend(&mut self) {
        (**self).suspend()
    }
    fn resume(&mut self) {
        (**self).resume()
    }
}

impl<T: Console + ?Sized> Console for &mut T {
    type Error = T::Error;
    fn resume(&mut self) -> Result<(), Self::Error> {
        (**self).resume()
    }
}

impl<T: Hypervisor + ?Sized> Hypervisor for &mut T {
    type Error = T::Error;
    fn bind_virq(&mut self, virq: u32, vcpu: u32) -> Result<Port, Self::Error> {
        (**self).bind_virq(virq, vcpu)
    }
    fn bind_ipi(&mut self, vcpu: u32) -> Result<Port, Self::Error> {
        (**self).bind_ipi(vcpu)
    }
    fn mask(&mut self, port: Port) {
        (**self).mask(port)
    }
    fn unmask(&mut self, port: Port) -> Result<(), Self::Error> {
        (**self).unmask(port)
    }
    fn close(&mut self, port: Port) -> Result<(), Self::Error> {
        (**self).close(port)
    }
    fn max_ports(&self) -> usize {
        (**self).max_ports()
    }
    fn suspend(&mut self) -> Result<SuspendResult, Self::Error> {
        (**self).suspend()
    }
    fn update_va_mapping(&mut self, va: u64, pte: u64, flags: u64) -> Result<(), Self::Error> {
        (**self).update_va_mapping(va, pte, flags)
    }
    fn start_info_frames(&self) -> StartInfoFrames {
        (**self).start_info_frames()
    }
    fn set_start_info_frames(&mut self, frames: StartInfoFrames) {
        (**self).set_start_info_frames(frames)
    }
    fn shared_info_va(&self) -> u64 {
        (**self).shared_info_va()
    }
    fn use_dummy_shared_info(&mut self) {
        (**self).use_dummy_shared_info()
    }
    fn unmap_shared_info(&mut self) -> Result<(), Self::Error> {
        (**self).unmap_shared_info()
    }
    fn setup_shared_info(&mut self) -> Result<(), Self::Error> {
        (**self).setup_shared_info()
    }
    fn reset_cpu_map(&mut self) {
        (**self).reset_cpu_map()
    }
}

impl<T: XenStore + ?Sized> XenStore for &mut T {
    type Error = T::Error;
    fn start(&mut self) -> Result<Transaction, Self::Error> {
        (**self).start()
    }
    fn end(&mut self, txn: Transaction, abort: bool) -> Result<(), Self::Error> {
        (**self).end(txn, abort)
    }
    fn read(&mut self, txn: Transaction, path: &str, buf: &mut [u8]) -> Result<usize, Self::Error> {
        (**self).read(txn, path, buf)
    }
    fn write(&mut self, txn: Transaction, path: &str, value: &[u8]) -> Result<(), Self::Error> {
        (**self).write(txn, path, value)
    }
}

/// What Xen's CPUID leaves say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct XenCpuid {
    /// Base leaf (`0x4000_0000` or `0x4000_0100`, ...).
    pub base: u32,
    /// Xen major version (leaf base+1, EAX bits 31:16).
    pub major: u16,
    /// Xen minor version (leaf base+1, EAX bits 15:0).
    pub minor: u16,
    /// Number of hypercall pages (leaf base+2, EAX).
    pub hypercall_pages: u32,
    /// MSR that installs the hypercall page (leaf base+2, EBX).
    pub hypercall_msr: u32,
}

/// Detects Xen: its base leaf, version and hypercall-page MSR. [`crate::Error::NotXen`] when
/// not running on Xen (bare metal, KVM, Hyper-V, ...).
pub fn detect(cpu: &impl Cpuid) -> Result<XenCpuid, crate::Error> {
    let base = find_xen_base(cpu).ok_or(crate::Error::NotXen)?;
    let [version, ..] = cpu.cpuid(base + 1);
    let [pages, msr, ..] = cpu.cpuid(base + 2);
    Ok(XenCpuid {
        base,
        major: (version >> 16) as u16,
        minor: version as u16,
        hypercall_pages: pages,
        hypercall_msr: msr,
    })
}

/// The instruction that enters the hypervisor from an HVM guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HypercallInsn {
    /// Intel VMX: `vmcall`.
    Vmcall,
    /// AMD SVM (and Hygon): `vmmcall`.
    Vmmcall,
}

/// Picks `vmcall` or `vmmcall` from the CPU vendor (leaf 0); `None` for unknown vendors, which
/// should use the hypercall page instead.
pub fn hypercall_insn(cpu: &impl Cpuid) -> Option<HypercallInsn> {
    let [_, ebx, ecx, edx] = cpu.cpuid(0);
    let mut vendor = [0u8; 12];
    vendor[0..4].copy_from_slice(&ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&edx.to_le_bytes());
    vendor[8..12].copy_from_slice(&ecx.to_le_bytes());
    match &vendor {
        b"GenuineIntel" => Some(HypercallInsn::Vmcall),
        b"AuthenticAMD" | b"HygonGenuine" => Some(HypercallInsn::Vmmcall),
        _ => None,
    }
}
