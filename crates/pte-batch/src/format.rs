//! PTE encodings: x86-64 and an arm64-style format with the contiguous bit.

use bitflags::bitflags;

use crate::hal::PteFormat;

bitflags! {
    /// The flag bits of an x86-64 last-level entry (Intel SDM Vol. 3A, 4.5, Table 4-20), with
    /// Linux's use of the software-available bits 9-11.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct X86Flags: u64 {
        /// Present.
        const PRESENT = 1 << 0;
        /// Writable.
        const RW = 1 << 1;
        /// User accessible.
        const USER = 1 << 2;
        /// Page-level write-through.
        const PWT = 1 << 3;
        /// Page-level cache disable.
        const PCD = 1 << 4;
        /// Accessed (set by the MMU).
        const ACCESSED = 1 << 5;
        /// Dirty (set by the MMU).
        const DIRTY = 1 << 6;
        /// PAT index bit of a 4 KiB entry.
        const PAT = 1 << 7;
        /// Global. With `PRESENT` clear it means PROT_NONE (Linux's `_PAGE_PROTNONE`).
        const GLOBAL = 1 << 8;
        /// Software bit 9: no `struct page` behind the frame (`_PAGE_SPECIAL`).
        const SPECIAL = 1 << 9;
        /// Software bit 10: userfaultfd write-protect (`_PAGE_UFFD_WP`).
        const UFFD_WP = 1 << 10;
        /// Software bit 11: soft-dirty (`_PAGE_SOFT_DIRTY`).
        const SOFT_DIRTY = 1 << 11;
        /// Protection key, bits 59-62.
        const PKEY = 0xf << 59;
        /// No execute.
        const NX = 1 << 63;
    }
}

/// The x86-64 4 KiB PTE format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct X86Pte;

impl X86Pte {
    /// PFN field, bits 12-51.
    pub const PFN_MASK: u64 = 0x000f_ffff_ffff_f000;
    /// Userfaultfd-wp bit of a swap entry (`_PAGE_SWP_UFFD_WP`, the `USER` bit position).
    pub const SWP_UFFD_WP: u64 = 1 << 2;
    /// Soft-dirty bit of a swap entry (`_PAGE_SWP_SOFT_DIRTY`, the `RW` bit position).
    pub const SWP_SOFT_DIRTY: u64 = 1 << 1;
    /// Anon-exclusive bit of a swap entry (`_PAGE_SWP_EXCLUSIVE`, bit 7: the `PSE` position).
    pub const SWP_EXCLUSIVE: u64 = 1 << 7;
    /// Swap type bits, at the top of the entry (59-63).
    const SWP_TYPE_BITS: u32 = 5;
    /// The offset is stored inverted (L1TF mitigation) in bits 9-58.
    const SWP_OFFSET_SHIFT: u32 = 9 + Self::SWP_TYPE_BITS;

    const fn has(pte: u64, f: X86Flags) -> bool {
        pte & f.bits() != 0
    }
}

impl PteFormat for X86Pte {
    const USER_READONLY: u64 = X86Flags::PRESENT.bits()
        | X86Flags::USER.bits()
        | X86Flags::ACCESSED.bits()
        | X86Flags::NX.bits();

    fn is_present(pte: u64) -> bool {
        pte & (X86Flags::PRESENT.bits() | X86Flags::GLOBAL.bits()) != 0
    }
    fn is_protnone(pte: u64) -> bool {
        pte & (X86Flags::PRESENT.bits() | X86Flags::GLOBAL.bits()) == X86Flags::GLOBAL.bits()
    }
    fn is_writable(pte: u64) -> bool {
        Self::has(pte, X86Flags::RW)
    }
    fn is_dirty(pte: u64) -> bool {
        Self::has(pte, X86Flags::DIRTY)
    }
    fn is_young(pte: u64) -> bool {
        Self::has(pte, X86Flags::ACCESSED)
    }
    fn is_soft_dirty(pte: u64) -> bool {
        Self::has(pte, X86Flags::SOFT_DIRTY)
    }
    fn is_uffd_wp(pte: u64) -> bool {
        Self::has(pte, X86Flags::UFFD_WP)
    }
    fn is_special(pte: u64) -> bool {
        Self::has(pte, X86Flags::SPECIAL)
    }
    fn pfn(pte: u64) -> u64 {
        (pte & Self::PFN_MASK) >> 12
    }
    fn with_pfn(pte: u64, pfn: u64) -> u64 {
        (pte & !Self::PFN_MASK) | ((pfn << 12) & Self::PFN_MASK)
    }
    fn mkold(pte: u64) -> u64 {
        pte & !X86Flags::ACCESSED.bits()
    }
    fn mkyoung(pte: u64) -> u64 {
        pte | X86Flags::ACCESSED.bits()
    }
    fn mkclean(pte: u64) -> u64 {
        pte & !X86Flags::DIRTY.bits()
    }
    fn mkdirty(pte: u64) -> u64 {
        pte | X86Flags::DIRTY.bits() | X86Flags::SOFT_DIRTY.bits()
    }
    fn wrprotect(pte: u64) -> u64 {
        pte & !X86Flags::RW.bits()
    }
    fn mkwrite(pte: u64) -> u64 {
        pte | X86Flags::RW.bits()
    }
    fn clear_soft_dirty(pte: u64) -> u64 {
        pte & !X86Flags::SOFT_DIRTY.bits()
    }
    fn mk_soft_dirty(pte: u64) -> u64 {
        pte | X86Flags::SOFT_DIRTY.bits()
    }
    fn mk_uffd_wp(pte: u64) -> u64 {
        // A uffd-wp entry is never writable.
        (pte | X86Flags::UFFD_WP.bits()) & !X86Flags::RW.bits()
    }
    fn clear_uffd_wp(pte: u64) -> u64 {
        pte & !X86Flags::UFFD_WP.bits()
    }
    fn swp_is_uffd_wp(pte: u64) -> bool {
        pte & Self::SWP_UFFD_WP != 0
    }
    fn swp_clear_uffd_wp(pte: u64) -> u64 {
        pte & !Self::SWP_UFFD_WP
    }
    fn swp_mk_uffd_wp(pte: u64) -> u64 {
        pte | Self::SWP_UFFD_WP
    }
    fn mk_swp_entry(ty: u32, offset: u64) -> u64 {
        // | TYPE (59-63) | ~OFFSET (9-58) | 0 (G) | E | .. | U (uffd-wp) | W (soft-dirty) | 0 |
        ((!offset) << Self::SWP_OFFSET_SHIFT >> Self::SWP_TYPE_BITS)
            | (u64::from(ty & 0x1f) << (64 - Self::SWP_TYPE_BITS))
    }
    fn swp_type(pte: u64) -> u32 {
        (pte >> (64 - Self::SWP_TYPE_BITS)) as u32
    }
    fn swp_offset(pte: u64) -> u64 {
        (!pte) << Self::SWP_TYPE_BITS >> Self::SWP_OFFSET_SHIFT
    }
    fn swp_is_exclusive(pte: u64) -> bool {
        pte & Self::SWP_EXCLUSIVE != 0
    }
    fn swp_mk_exclusive(pte: u64) -> u64 {
        pte | Self::SWP_EXCLUSIVE
    }
    fn swp_clear_exclusive(pte: u64) -> u64 {
        pte & !Self::SWP_EXCLUSIVE
    }
    fn swp_is_soft_dirty(pte: u64) -> bool {
        pte & Self::SWP_SOFT_DIRTY != 0
    }
    fn swp_mk_soft_dirty(pte: u64) -> u64 {
        pte | Self::SWP_SOFT_DIRTY
    }
}

/// An arm64-style 4 KiB-granule stage-1 PTE format, laid out as Linux uses it.
///
/// Hardware bits: valid (0), table/page (1), AttrIndx (2-4), AP\[1\] user (6), AP\[2\]
/// read-only (7), SH (8-9), AF accessed (10), nG (11), output address (12-47), DBM (51, Linux's
/// `PTE_WRITE`), contiguous (52), PXN (53), UXN (54). Software bits: dirty (55), special (56),
/// soft-dirty (57, a model: Linux arm64 has none), uffd-wp (58), PROT_NONE (59).
///
/// Writable means `PTE_WRITE` (DBM); the MMU's dirty state is "writable and not read-only"
/// (hardware dirty) or the software dirty bit, as in Linux.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arm64Pte;

impl Arm64Pte {
    /// Valid descriptor.
    pub const VALID: u64 = 1 << 0;
    /// Level-3 page descriptor (must be set with `VALID`).
    pub const PAGE: u64 = 1 << 1;
    /// AP\[1\]: EL0 accessible.
    pub const USER: u64 = 1 << 6;
    /// AP\[2\]: read-only.
    pub const RDONLY: u64 = 1 << 7;
    /// Inner shareable (SH = 0b11).
    pub const SHARED: u64 = 3 << 8;
    /// Access flag.
    pub const AF: u64 = 1 << 10;
    /// Not global.
    pub const NG: u64 = 1 << 11;
    /// Output address, bits 12-47.
    pub const PFN_MASK: u64 = 0x0000_ffff_ffff_f000;
    /// Dirty bit modifier: hardware may clear `RDONLY` on write (`PTE_WRITE`).
    pub const DBM: u64 = 1 << 51;
    /// Contiguous hint: one of 16 aligned entries mapping 64 KiB of aligned physical memory.
    pub const CONT: u64 = 1 << 52;
    /// Privileged execute never.
    pub const PXN: u64 = 1 << 53;
    /// Unprivileged execute never.
    pub const UXN: u64 = 1 << 54;
    /// Software dirty.
    pub const SW_DIRTY: u64 = 1 << 55;
    /// Software: no `struct page`.
    pub const SPECIAL: u64 = 1 << 56;
    /// Software soft-dirty (model).
    pub const SOFT_DIRTY: u64 = 1 << 57;
    /// Software userfaultfd write-protect.
    pub const UFFD_WP: u64 = 1 << 58;
    /// Software PROT_NONE (valid clear).
    pub const PROT_NONE: u64 = 1 << 59;
    /// Userfaultfd-wp bit of a swap entry.
    pub const SWP_UFFD_WP: u64 = 1 << 3;
    /// Anon-exclusive bit of a swap entry (`PTE_SWP_EXCLUSIVE`).
    pub const SWP_EXCLUSIVE: u64 = 1 << 2;
    /// Soft-dirty bit of a swap entry (a model: Linux arm64 has no soft-dirty).
    pub const SWP_SOFT_DIRTY: u64 = 1 << 4;
    /// Swap type field, bits 6-10.
    const SWP_TYPE_SHIFT: u32 = 6;
    /// Swap offset field, bits 12-58 (Linux: 12-61; the model keeps its PROT_NONE bit 59 clear).
    const SWP_OFFSET_MASK: u64 = 0x07ff_ffff_ffff_f000;
    /// Entries in one contiguous block.
    pub const CONT_PTES: usize = 16;

    const fn hw_dirty(pte: u64) -> bool {
        pte & Self::DBM != 0 && pte & Self::RDONLY == 0
    }
}

impl PteFormat for Arm64Pte {
    const USER_READONLY: u64 = Self::VALID
        | Self::PAGE
        | Self::USER
        | Self::RDONLY
        | Self::SHARED
        | Self::AF
        | Self::NG
        | Self::PXN
        | Self::UXN;

    fn is_present(pte: u64) -> bool {
        pte & (Self::VALID | Self::PROT_NONE) != 0
    }
    fn is_protnone(pte: u64) -> bool {
        pte & (Self::VALID | Self::PROT_NONE) == Self::PROT_NONE
    }
    fn is_writable(pte: u64) -> bool {
        pte & Self::DBM != 0
    }
    fn is_dirty(pte: u64) -> bool {
        pte & Self::SW_DIRTY != 0 || Self::hw_dirty(pte)
    }
    fn is_young(pte: u64) -> bool {
        pte & Self::AF != 0
    }
    fn is_soft_dirty(pte: u64) -> bool {
        pte & Self::SOFT_DIRTY != 0
    }
    fn is_uffd_wp(pte: u64) -> bool {
        pte & Self::UFFD_WP != 0
    }
    fn is_special(pte: u64) -> bool {
        pte & Self::SPECIAL != 0
    }
    fn pfn(pte: u64) -> u64 {
        (pte & Self::PFN_MASK) >> 12
    }
    fn with_pfn(pte: u64, pfn: u64) -> u64 {
        (pte & !Self::PFN_MASK) | ((pfn << 12) & Self::PFN_MASK)
    }
    fn mkold(pte: u64) -> u64 {
        pte & !Self::AF
    }
    fn mkyoung(pte: u64) -> u64 {
        pte | Self::AF
    }
    fn mkclean(pte: u64) -> u64 {
        (pte & !Self::SW_DIRTY) | Self::RDONLY
    }
    fn mkdirty(pte: u64) -> u64 {
        let pte = pte | Self::SW_DIRTY | Self::SOFT_DIRTY;
        if pte & Self::DBM != 0 {
            pte & !Self::RDONLY
        } else {
            pte
        }
    }
    fn wrprotect(pte: u64) -> u64 {
        // Keep a hardware-dirty state as software dirty before dropping write permission.
        let pte = if Self::hw_dirty(pte) {
            pte | Self::SW_DIRTY
        } else {
            pte
        };
        (pte & !Self::DBM) | Self::RDONLY
    }
    fn mkwrite(pte: u64) -> u64 {
        let pte = pte | Self::DBM;
        if pte & Self::SW_DIRTY != 0 {
            pte & !Self::RDONLY
        } else {
            pte
        }
    }
    fn clear_soft_dirty(pte: u64) -> u64 {
        pte & !Self::SOFT_DIRTY
    }
    fn mk_soft_dirty(pte: u64) -> u64 {
        pte | Self::SOFT_DIRTY
    }
    fn mk_uffd_wp(pte: u64) -> u64 {
        Self::wrprotect(pte | Self::UFFD_WP)
    }
    fn clear_uffd_wp(pte: u64) -> u64 {
        pte & !Self::UFFD_WP
    }
    fn swp_is_uffd_wp(pte: u64) -> bool {
        pte & Self::SWP_UFFD_WP != 0
    }
    fn swp_clear_uffd_wp(pte: u64) -> u64 {
        pte & !Self::SWP_UFFD_WP
    }
    fn swp_mk_uffd_wp(pte: u64) -> u64 {
        pte | Self::SWP_UFFD_WP
    }
    fn mk_swp_entry(ty: u32, offset: u64) -> u64 {
        (u64::from(ty & 0x1f) << Self::SWP_TYPE_SHIFT) | ((offset << 12) & Self::SWP_OFFSET_MASK)
    }
    fn swp_type(pte: u64) -> u32 {
        ((pte >> Self::SWP_TYPE_SHIFT) & 0x1f) as u32
    }
    fn swp_offset(pte: u64) -> u64 {
        (pte & Self::SWP_OFFSET_MASK) >> 12
    }
    fn swp_is_exclusive(pte: u64) -> bool {
        pte & Self::SWP_EXCLUSIVE != 0
    }
    fn swp_mk_exclusive(pte: u64) -> u64 {
        pte | Self::SWP_EXCLUSIVE
    }
    fn swp_clear_exclusive(pte: u64) -> u64 {
        pte & !Self::SWP_EXCLUSIVE
    }
    fn swp_is_soft_dirty(pte: u64) -> bool {
        pte & Self::SWP_SOFT_DIRTY != 0
    }
    fn swp_mk_soft_dirty(pte: u64) -> u64 {
        pte | Self::SWP_SOFT_DIRTY
    }
}
