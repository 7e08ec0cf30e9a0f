//! The software page table and the x86-64 entry format.

use oskit_pte_batch::sim::{PTRS_PER_TABLE, SimTable};

#[test]
fn sim_table_is_bounded() {
    let mut t = SimTable::default();
    assert!(t.set(PTRS_PER_TABLE - 1, 42));
    assert_eq!(t.get(PTRS_PER_TABLE - 1), Some(42));
    assert!(!t.set(PTRS_PER_TABLE, 1));
    assert_eq!(t.get(PTRS_PER_TABLE), None);
}

#[cfg(all(feature = "x86", target_arch = "x86_64"))]
#[test]
fn x86_pfn_round_trip_keeps_flags() {
    use oskit_pte_batch::{hal::PteFormat, x86::X86_64};
    let pte = (1 << 63) | (0x12345 << 12) | 0x67; // NX, pfn, P|RW|US|A|D
    assert!(X86_64::is_present(pte));
    assert_eq!(X86_64::pfn(pte), 0x12345);
    let next = X86_64::advance_pfn(pte, 3);
    assert_eq!(X86_64::pfn(next), 0x12348);
    assert_eq!(next & !0x000f_ffff_ffff_f000, pte & !0x000f_ffff_ffff_f000);
}
