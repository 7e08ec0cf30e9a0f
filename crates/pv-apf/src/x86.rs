//! Real x86-64 backend: CPUID and the KVM MSRs through the `x86` crate.

use crate::{
    abi::{MSR_KVM_ASYNC_PF_ACK, MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT},
    hal::{self, ApfHardware, KvmFeatures},
};

/// Finds KVM and its features with CPUID (unprivileged, so safe anywhere): the hypervisor bit,
/// then [`hal::find_kvm`]'s scan of the hypervisor leaves.
pub fn probe() -> Option<KvmFeatures> {
    // CPUID.1:ECX bit 31: a hypervisor is present; leaves 0x4000_0000+ mean nothing otherwise.
    if ::x86::cpuid::cpuid!(1).ecx & (1 << 31) == 0 {
        return None;
    }
    hal::find_kvm(|leaf| {
        let r = ::x86::cpuid::cpuid!(leaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    })
}

/// The CPU this code runs on, in ring 0 of a kernel.
///
/// MSR writes go to the current CPU: call the methods on the CPU whose state you mean.
#[derive(Debug, Clone, Copy)]
pub struct Cpu {
    _ring0: (),
}

impl Cpu {
    /// The current CPU's KVM interface.
    ///
    /// # Safety
    ///
    /// The caller runs at CPL 0 (WRMSR faults otherwise), and only calls the MSR methods after
    /// [`probe`] reported the matching feature (KVM's MSRs do not exist elsewhere).
    pub const unsafe fn new() -> Self {
        Self { _ring0: () }
    }
}

impl ApfHardware for Cpu {
    type Error = core::convert::Infallible;

    fn probe(&self) -> Option<KvmFeatures> {
        probe()
    }

    fn write_int_vector(&self, vector: u8) -> Result<(), Self::Error> {
        // SAFETY: `Cpu::new`'s contract: ring 0 under KVM with async PF. The vector MSR only
        // selects which interrupt the host raises later.
        unsafe { ::x86::msr::wrmsr(MSR_KVM_ASYNC_PF_INT, u64::from(vector)) };
        Ok(())
    }

    unsafe fn write_enable(&self, value: u64) -> Result<(), Self::Error> {
        // SAFETY: ring 0 under KVM (`Cpu::new`); the area named by `value` stays reserved for
        // the host until disabled (this method's contract).
        unsafe { ::x86::msr::wrmsr(MSR_KVM_ASYNC_PF_EN, value) };
        Ok(())
    }

    fn ack(&self) -> Result<(), Self::Error> {
        // SAFETY: ring 0 under KVM (`Cpu::new`); ACK only lets the host send the next token.
        unsafe { ::x86::msr::wrmsr(MSR_KVM_ASYNC_PF_ACK, 1) };
        Ok(())
    }
}

/// Enables interrupts and halts until one arrives, then disables them again: a
/// [`Scheduler::halt`](crate::hal::Scheduler::halt) for contexts that cannot sleep.
///
/// `sti` takes effect after the next instruction, so an interrupt pending at the `sti` is taken
/// in the `hlt` and ends it: a wake cannot slip in between the caller's check and the halt.
///
/// # Safety
///
/// Ring 0, called with interrupts disabled, from a context where taking interrupts is allowed
/// (their handlers must not need a lock the caller holds).
pub unsafe fn halt_with_interrupts() {
    // SAFETY: the caller is in ring 0 and may take interrupts here (see above); the sequence
    // leaves the interrupt flag as it found it (clear). Not `nomem`: the interrupt handlers
    // that run inside it write memory the caller then reads.
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nostack)) };
}
