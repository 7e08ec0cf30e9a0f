//! The hardware the guest side of async page faults is written against.

/// CPUID leaf of the hypervisor signature.
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// CPUID leaf of the KVM paravirtual features.
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// KVM's signature in EBX, ECX, EDX of [`KVM_CPUID_SIGNATURE`].
pub const KVM_SIGNATURE: [u8; 12] = *b"KVMKVMKVM\0\0\0";

/// The paravirtual features a KVM host offers (CPUID 0x40000001 EAX).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmFeatures(pub u32);

impl KvmFeatures {
    /// `KVM_FEATURE_ASYNC_PF`.
    pub const ASYNC_PF: u32 = 1 << 4;
    /// `KVM_FEATURE_ASYNC_PF_VMEXIT`.
    pub const ASYNC_PF_VMEXIT: u32 = 1 << 10;
    /// `KVM_FEATURE_ASYNC_PF_INT`.
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

/// A CPU that may be a KVM guest.
pub trait ApfHardware {
    /// KVM's features when running under KVM, `None` otherwise.
    fn probe(&self) -> Option<KvmFeatures>;
}

impl<T: ApfHardware + ?Sized> ApfHardware for &T {
    fn probe(&self) -> Option<KvmFeatures> {
        (**self).probe()
    }
}
