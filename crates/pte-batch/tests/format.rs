//! The x86-64 entry format against the SDM's bit positions and Linux's software bits.

use oskit_pte_batch::{BatchFlags, PteFormat, X86Flags, X86Pte, batch::batch_key};

#[test]
fn x86_bit_positions() {
    let bit = |f: X86Flags| f.bits().trailing_zeros();
    assert_eq!(
        [
            X86Flags::PRESENT,
            X86Flags::RW,
            X86Flags::USER,
            X86Flags::PWT,
            X86Flags::PCD,
            X86Flags::ACCESSED
        ]
        .map(bit),
        [0, 1, 2, 3, 4, 5]
    );
    assert_eq!(
        [X86Flags::DIRTY, X86Flags::PAT, X86Flags::GLOBAL].map(bit),
        [6, 7, 8]
    );
    assert_eq!(
        [X86Flags::SPECIAL, X86Flags::UFFD_WP, X86Flags::SOFT_DIRTY].map(bit),
        [9, 10, 11]
    );
    assert_eq!(X86Flags::PKEY.bits(), 0x7800_0000_0000_0000);
    assert_eq!(bit(X86Flags::NX), 63);
    assert_eq!(X86Pte::PFN_MASK.trailing_zeros(), 12);
    assert_eq!(64 - X86Pte::PFN_MASK.leading_zeros(), 52);
}

#[test]
fn x86_pfn_round_trip_keeps_flags() {
    let pte = (1 << 63) | (0x12345 << 12) | 0x67; // NX, pfn, P|RW|US|A|D
    assert!(X86Pte::is_present(pte));
    assert_eq!(X86Pte::pfn(pte), 0x12345);
    let next = X86Pte::advance_pfn(pte, 3);
    assert_eq!(X86Pte::pfn(next), 0x12348);
    assert_eq!(X86Pte::protection(next), X86Pte::protection(pte));
    assert!(X86Pte::same_protection(next, pte));
    // The PFN never spills into the protection key or NX.
    assert_eq!(X86Pte::with_pfn(0, u64::MAX) & !X86Pte::PFN_MASK, 0);
}

#[test]
fn x86_protnone_is_global_without_present() {
    let g = X86Flags::GLOBAL.bits();
    assert!(X86Pte::is_present(g) && X86Pte::is_protnone(g));
    let p = X86Flags::PRESENT.bits() | g;
    assert!(X86Pte::is_present(p) && !X86Pte::is_protnone(p));
    assert!(!X86Pte::is_present(0x40 | 0x5000));
}

#[test]
fn batch_key_ignores_exactly_what_it_should() {
    let base = (X86Flags::PRESENT | X86Flags::USER).bits() | (7 << 12);
    let a = X86Flags::ACCESSED.bits();
    let w = X86Flags::RW.bits();
    let d = X86Flags::DIRTY.bits();
    let sd = X86Flags::SOFT_DIRTY.bits();
    let u = X86Flags::UFFD_WP.bits();
    let none = BatchFlags::empty();
    let all = BatchFlags::IGNORE_DIRTY | BatchFlags::IGNORE_SOFT_DIRTY;
    let k = |p, f| batch_key::<X86Pte>(p, f);
    assert_eq!(
        k(base | a | w, none),
        k(base, none),
        "accessed and writable are always ignored"
    );
    assert_ne!(k(base | d, none), k(base, none));
    assert_eq!(k(base | d, all), k(base, all));
    assert_ne!(k(base | sd, none), k(base, none));
    assert_eq!(k(base | sd, all), k(base, all));
    assert_ne!(k(base | u, all), k(base, all), "uffd-wp is never ignored");
}
