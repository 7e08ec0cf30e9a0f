//! The address space the benches and the instruction-count probes (`examples/icount.rs`) fork:
//! a parent mapping `n` pages, writable, dirty and young, in anon folios of one order.

#![allow(dead_code, unreachable_pub)]

#[cfg(all(feature = "x86", target_arch = "x86_64"))]
pub mod real;

use oskit_pte_batch::sim::{SimFolios, SimPage};
use oskit_pte_batch::{PteFormat, VmFlags, Vma, X86Flags};

/// First virtual address mapped.
pub const BASE: u64 = 0x7f00_0000_0000;
/// First frame mapped.
pub const PFN: u64 = 0x10_0000;

/// A writable private (COW) mapping with `page_prot`.
pub fn vma(page_prot: u64) -> Vma {
    Vma::new(VmFlags::MAYWRITE | VmFlags::WRITE, page_prot)
}

/// A parent mapping `n` pages with `flags`, in anon folios of `order` (the last folio whole
/// even when `n` ends inside it).
pub fn world<F: PteFormat>(n: usize, order: u8, flags: u64) -> (Vec<u64>, Vec<SimPage>) {
    let folio = 1usize << order;
    let frames = n.div_ceil(folio) * folio;
    let mut pages = vec![SimPage::default(); frames];
    let mut f = SimFolios::new(PFN, &mut pages);
    for k in (0..frames as u64).step_by(folio) {
        f.add_folio(PFN + k, order, true).unwrap();
    }
    let mut parent = vec![0u64; n];
    for (k, e) in parent.iter_mut().enumerate() {
        *e = F::with_pfn(flags, PFN + k as u64);
        f.account_mapping(PFN + k as u64);
    }
    (parent, pages)
}

/// Present, writable, user, accessed, dirty, no-execute.
pub fn x86_flags() -> u64 {
    (X86Flags::PRESENT
        | X86Flags::RW
        | X86Flags::USER
        | X86Flags::ACCESSED
        | X86Flags::DIRTY
        | X86Flags::NX)
        .bits()
}
