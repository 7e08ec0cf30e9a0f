//! Real x86-64 backend: CPUID through the `x86` crate.

use crate::hal::{self, ApfHardware, KvmFeatures};

/// The CPU this code runs on.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu;

impl ApfHardware for Cpu {
    fn probe(&self) -> Option<KvmFeatures> {
        // CPUID.1:ECX bit 31: a hypervisor is present; leaves 0x4000_0000+ mean nothing otherwise.
        if ::x86::cpuid::cpuid!(1).ecx & (1 << 31) == 0 {
            return None;
        }
        let sig = ::x86::cpuid::cpuid!(hal::KVM_CPUID_SIGNATURE);
        if hal::signature(sig.ebx, sig.ecx, sig.edx) != hal::KVM_SIGNATURE
            || sig.eax < hal::KVM_CPUID_FEATURES
        {
            return None;
        }
        Some(KvmFeatures(
            ::x86::cpuid::cpuid!(hal::KVM_CPUID_FEATURES).eax,
        ))
    }
}
