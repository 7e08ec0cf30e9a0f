//! Real x86-64 backend: the time-stamp counter as the clock (`core::arch`, no dependency).

use crate::hal::Clock;

/// The time-stamp counter, read with `RDTSC` (Linux's `x86-tsc` trace clock).
#[derive(Debug, Default, Clone, Copy)]
pub struct Tsc;

impl Clock for Tsc {
    fn now(&self) -> u64 {
        // SAFETY: RDTSC reads a counter and touches no memory. It faults only in ring 3 with
        // CR4.TSD set, which no kernel that hands this clock to its trace buffer does.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
}
