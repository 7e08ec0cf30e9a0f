//! Real x86-64 backend: CPUID through the `x86` crate.

use crate::hal::Cpuid;

/// The CPU this code runs on.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu;

impl Cpuid for Cpu {
    fn cpuid(&self, leaf: u32) -> [u32; 4] {
        let r = ::x86::cpuid::cpuid!(leaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    }
}
