//! The hardware the Xen guest side is written against.

/// Xen's signature in EBX, ECX, EDX of its CPUID base leaf.
pub const XEN_SIGNATURE: [u8; 12] = *b"XenVMMXenVMM";
/// First hypervisor CPUID base probed.
pub const CPUID_BASE_FIRST: u32 = 0x4000_0000;
/// Last hypervisor CPUID base probed (Xen moves to 0x40000100 when it also emulates Hyper-V).
pub const CPUID_BASE_LAST: u32 = 0x4001_0000;

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
