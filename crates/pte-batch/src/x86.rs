//! Real x86-64 backend: the 4-level/5-level page-table entry format and TLB invalidation.

use crate::hal::PteFormat;

/// The x86-64 PTE format (Intel SDM Vol. 3A, 4.5).
#[derive(Debug, Clone, Copy)]
pub struct X86_64;

const PRESENT: u64 = 1;
const PFN_MASK: u64 = 0x000f_ffff_ffff_f000;

impl PteFormat for X86_64 {
    fn is_present(pte: u64) -> bool {
        pte & PRESENT != 0
    }

    fn pfn(pte: u64) -> u64 {
        (pte & PFN_MASK) >> 12
    }

    fn advance_pfn(pte: u64, nr: u64) -> u64 {
        let pfn = Self::pfn(pte).wrapping_add(nr) << 12;
        (pte & !PFN_MASK) | (pfn & PFN_MASK)
    }
}

/// Invalidates the TLB entry of the page holding `vaddr` on this CPU.
///
/// # Safety
/// Ring 0 only (`INVLPG` is privileged); the caller must be running on the CPU whose TLB it means.
pub unsafe fn flush_page(vaddr: usize) {
    // SAFETY: forwarded from the caller: ring 0. INVLPG only drops a cached translation.
    unsafe { ::x86::tlb::flush(vaddr) }
}
