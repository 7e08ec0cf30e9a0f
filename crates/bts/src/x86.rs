//! Real x86-64 backend: CPUID and MSR access through the `x86` crate.

use core::ptr::NonNull;

use ::x86::msr::{IA32_APIC_BASE, IA32_DEBUGCTL, IA32_DS_AREA, IA32_X2APIC_LVT_PMI, rdmsr, wrmsr};

use crate::hal::{BtsHardware, BtsSupport, DebugCtl};

/// IA32_MISC_ENABLE.
pub const IA32_MISC_ENABLE: u32 = 0x1a0;

/// Offset of the performance-monitoring LVT register in the xAPIC MMIO page.
pub const XAPIC_LVT_PMI_OFFSET: usize = 0x340;

/// Where the performance-monitoring LVT entry (the threshold interrupt) is re-armed.
#[derive(Debug, Clone, Copy)]
pub enum LvtPmi {
    /// x2APIC mode: MSR 0x834.
    X2Apic,
    /// xAPIC mode: the kernel's mapping of the LVT PMI register (APIC base + 0x340).
    XApic(NonNull<u32>),
}

/// How the local APIC delivers the threshold interrupt (the performance-monitoring LVT
/// entry's delivery mode, SDM Vol. 3A "Local Vector Table").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PmiDelivery {
    /// Fixed delivery at this vector: an ordinary interrupt, held off while interrupts are
    /// disabled (so it can arrive after the context switch that follows the overflow).
    Fixed(u8),
    /// NMI delivery (mode 100b; the vector is ignored): taken even with interrupts off, so
    /// the handler runs in NMI context and must use [`Bts::nmi`](crate::Bts::nmi).
    Nmi,
}

impl PmiDelivery {
    /// The LVT entry that delivers this way, unmasked (bit 16 clear).
    pub const fn lvt_entry(self) -> u32 {
        match self {
            PmiDelivery::Fixed(vector) => vector as u32,
            PmiDelivery::Nmi => 0b100 << 8,
        }
    }
}

/// The CPU this code runs on, in ring 0.
#[derive(Debug)]
pub struct Cpu {
    delivery: PmiDelivery,
    lvt: LvtPmi,
}

impl Cpu {
    /// A handle on the current CPU whose threshold interrupt is delivered at `vector` through
    /// `lvt`.
    ///
    /// # Safety
    /// The caller runs in ring 0 on this CPU (the handle reads and writes model-specific
    /// registers), and an `XApic` pointer maps this CPU's LVT PMI register.
    pub const unsafe fn new(vector: u8, lvt: LvtPmi) -> Self {
        Self {
            delivery: PmiDelivery::Fixed(vector),
            lvt,
        }
    }

    /// A handle on the current CPU whose threshold interrupt is delivered as `delivery`
    /// (for example [`PmiDelivery::Nmi`]) through `lvt`.
    ///
    /// # Safety
    /// As [`new`](Cpu::new).
    pub const unsafe fn with_delivery(delivery: PmiDelivery, lvt: LvtPmi) -> Self {
        Self { delivery, lvt }
    }

    /// Whether the local APIC is in x2APIC mode (IA32_APIC_BASE bit 10).
    pub fn x2apic_enabled(&self) -> bool {
        // SAFETY: ring 0 (`new`'s contract); IA32_APIC_BASE exists on every x86-64 CPU.
        unsafe { rdmsr(IA32_APIC_BASE) & (1 << 10) != 0 }
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
        let misc = unsafe { rdmsr(IA32_MISC_ENABLE) };
        BtsSupport::from_registers(leaf1.ecx, leaf1.edx, misc)
    }

    fn debugctl(&self) -> DebugCtl {
        // SAFETY: ring 0; IA32_DEBUGCTL exists on every CPU with the Debug Store (the tracer
        // only drives CPUs whose probe succeeded).
        DebugCtl(unsafe { rdmsr(IA32_DEBUGCTL) })
    }

    unsafe fn set_debugctl(&mut self, value: DebugCtl) {
        // SAFETY: ring 0; the caller guarantees the DS area stays valid while BTS is on.
        unsafe { wrmsr(IA32_DEBUGCTL, value.0) }
    }

    fn ds_area(&self) -> u64 {
        // SAFETY: ring 0; IA32_DS_AREA exists when CPUID reports the Debug Store.
        unsafe { rdmsr(IA32_DS_AREA) }
    }

    unsafe fn set_ds_area(&mut self, linear: u64) {
        // SAFETY: ring 0; the caller guarantees the DS area stays valid while BTS is on.
        unsafe { wrmsr(IA32_DS_AREA, linear) }
    }

    fn rearm_threshold_interrupt(&mut self) {
        // Our delivery mode (and vector), unmasked (bit 16 clear). NMI-safe: one register
        // write, no lock.
        let entry = self.delivery.lvt_entry();
        match self.lvt {
            // SAFETY: ring 0; the LVT PMI MSR exists in x2APIC mode.
            LvtPmi::X2Apic => unsafe { wrmsr(IA32_X2APIC_LVT_PMI, u64::from(entry)) },
            // SAFETY: `new`'s contract: the pointer maps this CPU's LVT PMI register.
            LvtPmi::XApic(reg) => unsafe { reg.as_ptr().write_volatile(entry) },
        }
    }
}
