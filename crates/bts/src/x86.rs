//! Real x86-64 backend: CPUID and MSR access through the `x86` crate.

use crate::hal::{BtsHardware, BtsSupport};

/// IA32_MISC_ENABLE.
pub const IA32_MISC_ENABLE: u32 = 0x1a0;

/// The CPU this code runs on, in ring 0.
#[derive(Debug)]
pub struct Cpu {
    _ring0: (),
}

impl Cpu {
    /// A handle on the current CPU.
    ///
    /// # Safety
    /// The caller runs in ring 0: the handle reads and writes model-specific registers.
    pub const unsafe fn new() -> Self {
        Self { _ring0: () }
    }
}

impl BtsHardware for Cpu {
    fn probe(&self) -> BtsSupport {
        let leaf1 = ::x86::cpuid::cpuid!(1);
        if leaf1.edx & (1 << 21) == 0 {
            // No Debug Store: IA32_MISC_ENABLE bit 11 is then meaningless.
            return BtsSupport::from_registers(leaf1.ecx, leaf1.edx, 1 << 11);
        }
        // SAFETY: `Cpu::new`'s contract puts us in ring 0, and IA32_MISC_ENABLE exists on every
        // CPU that reports the Debug Store.
        let misc = unsafe { ::x86::msr::rdmsr(IA32_MISC_ENABLE) };
        BtsSupport::from_registers(leaf1.ecx, leaf1.edx, misc)
    }
}
