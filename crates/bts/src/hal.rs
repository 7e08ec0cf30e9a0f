//! The hardware BTS tracing is written against.

/// What the CPU says about Branch Trace Store support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BtsSupport {
    /// CPUID.01H:EDX.DS\[bit 21\]: the Debug Store exists.
    pub debug_store: bool,
    /// CPUID.01H:ECX.DTES64\[bit 2\]: the 64-bit DS save area layout.
    pub dtes64: bool,
    /// IA32_MISC_ENABLE\[bit 11\] (BTS_UNAVAILABLE) read as clear.
    pub bts_enabled: bool,
}

impl BtsSupport {
    /// Decodes CPUID leaf 1 (`ecx`, `edx`) and IA32_MISC_ENABLE.
    pub const fn from_registers(leaf1_ecx: u32, leaf1_edx: u32, misc_enable: u64) -> Self {
        Self {
            debug_store: leaf1_edx & (1 << 21) != 0,
            dtes64: leaf1_ecx & (1 << 2) != 0,
            bts_enabled: misc_enable & (1 << 11) == 0,
        }
    }

    /// Whether BTS with the 64-bit DS layout can be used.
    pub const fn usable(&self) -> bool {
        self.debug_store && self.dtes64 && self.bts_enabled
    }
}

/// A CPU that may record branches into a Debug Store.
pub trait BtsHardware {
    /// Reports what this CPU supports.
    fn probe(&self) -> BtsSupport;
}

impl<T: BtsHardware + ?Sized> BtsHardware for &T {
    fn probe(&self) -> BtsSupport {
        (**self).probe()
    }
}
