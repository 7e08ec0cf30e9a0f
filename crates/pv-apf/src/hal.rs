//! The two things the guest side is written against: the KVM paravirtual interface of the
//! current CPU ([`ApfHardware`]) and the kernel's scheduler ([`Scheduler`]).

use core::convert::Infallible;

/// CPUID leaf of the hypervisor signature (the first base [`find_kvm`] tries).
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// CPUID leaf of the KVM paravirtual features, when KVM sits at the first base (otherwise it
/// is the base KVM was found at, plus 1).
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// One past the last hypervisor CPUID base [`find_kvm`] tries.
pub const HYPERVISOR_CPUID_END: u32 = 0x4001_0000;
/// The distance between two hypervisor CPUID bases.
pub const HYPERVISOR_CPUID_STEP: u32 = 0x100;
/// KVM's signature in EBX, ECX, EDX of [`KVM_CPUID_SIGNATURE`].
pub const KVM_SIGNATURE: [u8; 12] = *b"KVMKVMKVM\0\0\0";

/// The paravirtual features a KVM host offers (CPUID 0x40000001 EAX).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmFeatures(pub u32);

impl KvmFeatures {
    /// `KVM_FEATURE_ASYNC_PF`: async page faults, page ready delivered as a #PF.
    pub const ASYNC_PF: u32 = 1 << 4;
    /// `KVM_FEATURE_ASYNC_PF_VMEXIT`: async page faults may be delivered as #PF VM exits.
    pub const ASYNC_PF_VMEXIT: u32 = 1 << 10;
    /// `KVM_FEATURE_ASYNC_PF_INT`: page ready delivered as an interrupt.
    pub const ASYNC_PF_INT: u32 = 1 << 14;

    /// Whether every bit of `mask` is offered.
    pub const fn has(self, mask: u32) -> bool {
        self.0 & mask == mask
    }
}

/// Turns the signature leaf's EBX, ECX, EDX into the 12 signature bytes.
pub fn signature(ebx: u32, ecx: u32, edx: u32) -> [u8; 12] {
    let mut sig = [0; 12];
    sig[0..4].copy_from_slice(&ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&ecx.to_le_bytes());
    sig[8..12].copy_from_slice(&edx.to_le_bytes());
    sig
}

/// Finds KVM among the hypervisor CPUID leaves the way Linux does (`cpuid.rst`): tries the
/// bases 0x40000000, 0x40000100, ... up to 0x4000ff00 for the signature `KVMKVMKVM\0\0\0` (a
/// hypervisor that emulates another one's interface, say Hyper-V, puts KVM's at a later
/// base), and returns the features of `base + 1`. The base's EAX is the highest leaf of the
/// range; old hosts leave it 0, which means `base + 1`.
///
/// `cpuid(leaf)` returns EAX, EBX, ECX, EDX of that leaf. Call this only when CPUID.1:ECX bit
/// 31 says a hypervisor is present (`x86::probe` does): these leaves mean nothing
/// on bare metal. Pure: no allocation, no side effect beyond the `cpuid` calls.
pub fn find_kvm(mut cpuid: impl FnMut(u32) -> [u32; 4]) -> Option<KvmFeatures> {
    (KVM_CPUID_SIGNATURE..HYPERVISOR_CPUID_END)
        .step_by(HYPERVISOR_CPUID_STEP as usize)
        .find_map(|base| {
            let [eax, ebx, ecx, edx] = cpuid(base);
            if signature(ebx, ecx, edx) != KVM_SIGNATURE {
                return None;
            }
            let max = if eax == 0 { base + 1 } else { eax };
            (max > base).then(|| KvmFeatures(cpuid(base + 1)[0]))
        })
}

/// The KVM async-page-fault interface of the CPU the caller runs on.
///
/// MSRs are per CPU: every method acts on the current CPU.
pub trait ApfHardware {
    /// `false` for a backend that is never a KVM guest ([`Native`]): the page-fault hook then
    /// compiles to nothing.
    const MAY_BE_GUEST: bool = true;

    /// What a failed MSR access reports.
    type Error: core::fmt::Debug;

    /// KVM's features when running under KVM, `None` otherwise.
    fn probe(&self) -> Option<KvmFeatures>;

    /// Writes the page-ready vector to `MSR_KVM_ASYNC_PF_INT`.
    fn write_int_vector(&self, vector: u8) -> Result<(), Self::Error>;

    /// Writes `value` to `MSR_KVM_ASYNC_PF_EN`.
    ///
    /// # Safety
    ///
    /// With [`EN_ENABLED`](crate::abi::EN_ENABLED) set, the address bits of `value` must be the
    /// guest-physical address of 64 bytes that stay reserved for the host to write until this
    /// CPU writes 0 here again (the host writes them at any time in between).
    unsafe fn write_enable(&self, value: u64) -> Result<(), Self::Error>;

    /// Writes 1 to `MSR_KVM_ASYNC_PF_ACK`: the page-ready token has been consumed.
    fn ack(&self) -> Result<(), Self::Error>;
}

impl<T: ApfHardware + ?Sized> ApfHardware for &T {
    const MAY_BE_GUEST: bool = T::MAY_BE_GUEST;
    type Error = T::Error;

    fn probe(&self) -> Option<KvmFeatures> {
        (**self).probe()
    }

    fn write_int_vector(&self, vector: u8) -> Result<(), Self::Error> {
        (**self).write_int_vector(vector)
    }

    unsafe fn write_enable(&self, value: u64) -> Result<(), Self::Error> {
        // SAFETY: the caller upholds `write_enable`'s contract, which we forward unchanged.
        unsafe { (**self).write_enable(value) }
    }

    fn ack(&self) -> Result<(), Self::Error> {
        (**self).ack()
    }
}

/// Bare metal known at compile time: never a guest. With it, [`AsyncPf::handle_page_fault`]
/// is a constant `NotAsyncPf` and the hook vanishes from the fault path.
///
/// [`AsyncPf::handle_page_fault`]: crate::AsyncPf::handle_page_fault
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Native;

impl ApfHardware for Native {
    const MAY_BE_GUEST: bool = false;
    type Error = Infallible;

    fn probe(&self) -> Option<KvmFeatures> {
        None
    }

    fn write_int_vector(&self, _vector: u8) -> Result<(), Infallible> {
        Ok(())
    }

    unsafe fn write_enable(&self, _value: u64) -> Result<(), Infallible> {
        Ok(())
    }

    fn ack(&self) -> Result<(), Infallible> {
        Ok(())
    }
}

/// One of two backends, chosen at run time: say the real CPU under KVM and the software host
/// model under TCG, so that one `AsyncPf<Either<x86::Cpu, SimVcpu>, _>` serves both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Either<A, B> {
    /// The first backend (typically the real one).
    Left(A),
    /// The second backend (typically the simulated one).
    Right(B),
}

impl<A: ApfHardware, B: ApfHardware> ApfHardware for Either<A, B> {
    const MAY_BE_GUEST: bool = A::MAY_BE_GUEST || B::MAY_BE_GUEST;
    type Error = Either<A::Error, B::Error>;

    fn probe(&self) -> Option<KvmFeatures> {
        match self {
            Self::Left(a) => a.probe(),
            Self::Right(b) => b.probe(),
        }
    }

    fn write_int_vector(&self, vector: u8) -> Result<(), Self::Error> {
        match self {
            Self::Left(a) => a.write_int_vector(vector).map_err(Either::Left),
            Self::Right(b) => b.write_int_vector(vector).map_err(Either::Right),
        }
    }

    unsafe fn write_enable(&self, value: u64) -> Result<(), Self::Error> {
        match self {
            // SAFETY: the caller upholds `write_enable`'s contract, forwarded unchanged.
            Self::Left(a) => unsafe { a.write_enable(value) }.map_err(Either::Left),
            // SAFETY: as above.
            Self::Right(b) => unsafe { b.write_enable(value) }.map_err(Either::Right),
        }
    }

    fn ack(&self) -> Result<(), Self::Error> {
        match self {
            Self::Left(a) => a.ack().map_err(Either::Left),
            Self::Right(b) => b.ack().map_err(Either::Right),
        }
    }
}

/// The kernel's scheduler, as far as sleeping on a token needs it.
///
/// Everything here may be called from the page-fault handler and from the page-ready
/// interrupt handler, with local interrupts disabled and a sleeper-table spinlock held
/// (except [`block`](Self::block) and [`halt`](Self::halt), called with no lock held).
pub trait Scheduler {
    /// A handle of a task that [`unblock`](Self::unblock) can resume (an index, a pointer).
    type Task: Copy + Eq;

    /// The task running on this CPU.
    fn current_task(&self) -> Self::Task;

    /// The index of this CPU (the one whose KVM queue raised the fault).
    fn current_cpu(&self) -> u32;

    /// Whether the current context may [`block`](Self::block): `false` in the idle task, with
    /// preemption disabled, or before the scheduler runs. Such contexts [`halt`](Self::halt).
    fn can_sleep(&self) -> bool;

    /// Parks the current task until [`unblock`](Self::unblock) is called for it.
    ///
    /// Must behave like `std::thread::park`: an `unblock` that came before `block` makes it
    /// return at once (one saved permit), and it may return spuriously; the caller re-checks.
    fn block(&self);

    /// Makes `task` runnable again (or saves the permit if it has not blocked yet). Must not
    /// sleep: it runs in interrupt context under a spinlock.
    fn unblock(&self, task: Self::Task);

    /// Waits for the next interrupt on this CPU, entered with interrupts disabled: on x86
    /// `sti; hlt; cli` (see `x86::halt_with_interrupts`), which cannot miss an interrupt
    /// that arrives between the caller's check and the halt.
    fn halt(&self);

    /// A task halting on CPU `cpu` has been woken from another CPU: send it an interrupt
    /// (IPI) so its [`halt`](Self::halt) returns. The default does nothing, which is enough
    /// when page-ready arrives on the faulting CPU (as KVM does) or halt returns on a timer.
    fn kick(&self, cpu: u32) {
        let _ = cpu;
    }
}

impl<S: Scheduler + ?Sized> Scheduler for &S {
    type Task = S::Task;

    fn current_task(&self) -> Self::Task {
        (**self).current_task()
    }

    fn current_cpu(&self) -> u32 {
        (**self).current_cpu()
    }

    fn can_sleep(&self) -> bool {
        (**self).can_sleep()
    }

    fn block(&self) {
        (**self).block()
    }

    fn unblock(&self, task: Self::Task) {
        (**self).unblock(task)
    }

    fn halt(&self) {
        (**self).halt()
    }

    fn kick(&self, cpu: u32) {
        (**self).kick(cpu)
    }
}
