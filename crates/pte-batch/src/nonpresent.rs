//! Non-present entries: what a swap-format entry stands for (`swp_entry_t`'s type), decoded and
//! encoded through a [`PteFormat`].
//!
//! Linux stores every non-present, non-none entry in the swap layout: a 5-bit type and an offset,
//! plus a few flag bits (exclusive, soft-dirty, uffd-wp). Types 0-23 are swap devices; the last
//! eight are special (`include/linux/swap.h`): 24 hardware-poisoned page, 25-27 migration (read,
//! read-exclusive, write), 28-30 device memory (device-private write, device-private read,
//! device-exclusive), 31 PTE marker. For the special types the offset is a PFN, or for a marker
//! its bits.

use bitflags::bitflags;

use crate::hal::PteFormat;

/// Swap types a kernel may use for swap devices (`MAX_SWAPFILES`).
pub const MAX_SWAPFILES: u32 = 24;
/// A hardware-poisoned page (`SWP_HWPOISON`).
pub const SWP_HWPOISON: u32 = 24;
/// A page under migration, mapped readable and maybe shared (`SWP_MIGRATION_READ`).
pub const SWP_MIGRATION_READ: u32 = 25;
/// A page under migration, mapped readable and anon-exclusive (`SWP_MIGRATION_READ_EXCLUSIVE`).
pub const SWP_MIGRATION_READ_EXCLUSIVE: u32 = 26;
/// A page under migration, mapped writable (`SWP_MIGRATION_WRITE`).
pub const SWP_MIGRATION_WRITE: u32 = 27;
/// A device-private page mapped writable (`SWP_DEVICE_WRITE`).
pub const SWP_DEVICE_WRITE: u32 = 28;
/// A device-private page mapped readable (`SWP_DEVICE_READ`).
pub const SWP_DEVICE_READ: u32 = 29;
/// A page a device holds exclusively (`SWP_DEVICE_EXCLUSIVE`).
pub const SWP_DEVICE_EXCLUSIVE: u32 = 30;
/// A PTE marker (`SWP_PTE_MARKER`).
pub const SWP_PTE_MARKER: u32 = 31;

bitflags! {
    /// The bits of a PTE marker (`pte_marker`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Markers: u64 {
        /// The page was write-protected by userfaultfd and then zapped (`PTE_MARKER_UFFD_WP`).
        const UFFD_WP = 1 << 0;
        /// Reading the page back failed: access raises SIGBUS (`PTE_MARKER_POISONED`).
        const POISONED = 1 << 1;
        /// A guard region page (`MADV_GUARD_INSTALL`): access raises SIGSEGV
        /// (`PTE_MARKER_GUARD`).
        const GUARD = 1 << 2;
    }
}

/// How a page under migration was mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Migration {
    /// Readable, maybe shared with other processes.
    Read,
    /// Readable and anon-exclusive.
    ReadExclusive,
    /// Writable (hence exclusive).
    Write,
}

/// What a non-present, non-none entry stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NonPresent {
    /// A page in swap slot `offset` of swap device `ty`; `exclusive` remembers
    /// `PageAnonExclusive` (the page may be mapped writable after swap-in without a copy).
    Swap {
        /// Swap device (0-23).
        ty: u32,
        /// Slot.
        offset: u64,
        /// Anon-exclusive when swapped out (`pte_swp_exclusive`).
        exclusive: bool,
    },
    /// A page under migration; `pfn` is the page.
    Migration {
        /// The page.
        pfn: u64,
        /// How it was mapped.
        kind: Migration,
    },
    /// A device-private page (`pfn` names its `struct page`), mapped readable or writable.
    DevicePrivate {
        /// The page.
        pfn: u64,
        /// Mapped writable.
        write: bool,
    },
    /// A page a device holds exclusively (`make_device_exclusive`); the CPU mapping is restored
    /// on the next access.
    DeviceExclusive {
        /// The page.
        pfn: u64,
    },
    /// A hardware-poisoned page.
    Hwpoison {
        /// The page.
        pfn: u64,
    },
    /// A PTE marker (no page behind it).
    Marker(Markers),
}

impl NonPresent {
    /// Decodes a non-present, non-none entry (`pte_to_swp_entry` and the `is_*_entry` tests).
    /// Total: any value decodes to something; callers check [`PteFormat::is_present`] and
    /// [`PteFormat::is_none`] first.
    pub fn decode<F: PteFormat>(pte: u64) -> Self {
        let ty = F::swp_type(pte);
        let offset = F::swp_offset(pte);
        match ty {
            SWP_HWPOISON => Self::Hwpoison { pfn: offset },
            SWP_MIGRATION_READ => Self::Migration {
                pfn: offset,
                kind: Migration::Read,
            },
            SWP_MIGRATION_READ_EXCLUSIVE => Self::Migration {
                pfn: offset,
                kind: Migration::ReadExclusive,
            },
            SWP_MIGRATION_WRITE => Self::Migration {
                pfn: offset,
                kind: Migration::Write,
            },
            SWP_DEVICE_WRITE => Self::DevicePrivate {
                pfn: offset,
                write: true,
            },
            SWP_DEVICE_READ => Self::DevicePrivate {
                pfn: offset,
                write: false,
            },
            SWP_DEVICE_EXCLUSIVE => Self::DeviceExclusive { pfn: offset },
            SWP_PTE_MARKER => Self::Marker(Markers::from_bits_retain(offset)),
            ty => Self::Swap {
                ty,
                offset,
                exclusive: F::swp_is_exclusive(pte),
            },
        }
    }

    /// Encodes the entry (`swp_entry_to_pte`, plus `pte_swp_mkexclusive` for an exclusive swap
    /// entry), with no soft-dirty or uffd-wp bit. An offset wider than the format's field is
    /// truncated.
    pub fn encode<F: PteFormat>(self) -> u64 {
        let (ty, offset) = match self {
            Self::Swap {
                ty,
                offset,
                exclusive,
            } => {
                let pte = F::mk_swp_entry(ty % MAX_SWAPFILES, offset);
                return if exclusive {
                    F::swp_mk_exclusive(pte)
                } else {
                    pte
                };
            }
            Self::Migration { pfn, kind } => (
                match kind {
                    Migration::Read => SWP_MIGRATION_READ,
                    Migration::ReadExclusive => SWP_MIGRATION_READ_EXCLUSIVE,
                    Migration::Write => SWP_MIGRATION_WRITE,
                },
                pfn,
            ),
            Self::DevicePrivate { pfn, write: true } => (SWP_DEVICE_WRITE, pfn),
            Self::DevicePrivate { pfn, write: false } => (SWP_DEVICE_READ, pfn),
            Self::DeviceExclusive { pfn } => (SWP_DEVICE_EXCLUSIVE, pfn),
            Self::Hwpoison { pfn } => (SWP_HWPOISON, pfn),
            Self::Marker(m) => (SWP_PTE_MARKER, m.bits()),
        };
        F::mk_swp_entry(ty, offset)
    }

    /// The page behind a migration, device or hwpoison entry.
    pub fn pfn(self) -> Option<u64> {
        match self {
            Self::Migration { pfn, .. }
            | Self::DevicePrivate { pfn, .. }
            | Self::DeviceExclusive { pfn }
            | Self::Hwpoison { pfn } => Some(pfn),
            Self::Swap { .. } | Self::Marker(_) => None,
        }
    }
}

/// `new` (an encoded entry) with the soft-dirty and uffd-wp bits of the non-present `old`, as
/// Linux carries them over when it rewrites an entry (`pte_swp_mksoft_dirty`,
/// `pte_swp_mkuffd_wp`).
pub fn keep_swp_bits<F: PteFormat>(old: u64, new: u64) -> u64 {
    let mut new = new;
    if F::swp_is_soft_dirty(old) {
        new = F::swp_mk_soft_dirty(new);
    }
    if F::swp_is_uffd_wp(old) {
        new = F::swp_mk_uffd_wp(new);
    }
    new
}
