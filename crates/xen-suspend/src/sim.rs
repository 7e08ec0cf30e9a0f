//! Software model of the hardware: CPUID of a Xen (or other) host.

use crate::hal::Cpuid;

/// A CPUID table: leaves not listed read as zero, as on real CPUs past their maximum leaf.
#[derive(Debug, Clone, Default)]
pub struct SimCpuid<'a> {
    leaves: &'a [(u32, [u32; 4])],
}

impl<'a> SimCpuid<'a> {
    /// CPUID answering from `leaves`.
    pub const fn new(leaves: &'a [(u32, [u32; 4])]) -> Self {
        Self { leaves }
    }
}

impl Cpuid for SimCpuid<'_> {
    fn cpuid(&self, leaf: u32) -> [u32; 4] {
        self.leaves
            .iter()
            .find(|(l, _)| *l == leaf)
            .map_or([0; 4], |(_, regs)| *regs)
    }
}
