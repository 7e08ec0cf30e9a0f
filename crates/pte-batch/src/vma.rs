//! What the copy and zap need to know about the mapping: VMA flags and RSS counters.

use bitflags::bitflags;

bitflags! {
    /// The VMA flags copy and zap look at.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct VmFlags: u32 {
        /// Currently writable (`VM_WRITE`).
        const WRITE = 1 << 0;
        /// May become writable (`VM_MAYWRITE`).
        const MAYWRITE = 1 << 1;
        /// Shared mapping (`VM_SHARED`): writes reach the file, no copy-on-write.
        const SHARED = 1 << 2;
        /// Soft-dirty tracking is active (`vma_soft_dirty_enabled`): soft-dirty differences
        /// end a batch.
        const SOFT_DIRTY_TRACKED = 1 << 3;
        /// Userfaultfd write-protect mode (`userfaultfd_wp`): uffd-wp bits are kept.
        const UFFD_WP = 1 << 4;
        /// File-backed or shmem (`!vma_is_anonymous`): a zap that keeps markers leaves a
        /// uffd-wp marker where a uffd-wp entry was.
        const FILE = 1 << 5;
    }
}

/// A mapping's flags and the protection its fresh pages get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Vma {
    /// The flags.
    pub flags: VmFlags,
    /// `vm_page_prot`: the entry (PFN 0) for a fresh read-only page of this mapping, e.g.
    /// [`PteFormat::USER_READONLY`](crate::PteFormat::USER_READONLY).
    pub page_prot: u64,
}

impl Vma {
    /// A mapping with `flags` whose fresh pages are mapped with `page_prot`.
    pub const fn new(flags: VmFlags, page_prot: u64) -> Self {
        Self { flags, page_prot }
    }
    /// Private and possibly writable: pages are shared copy-on-write at fork
    /// (`is_cow_mapping`).
    pub const fn is_cow(&self) -> bool {
        self.flags.contains(VmFlags::MAYWRITE) && !self.flags.contains(VmFlags::SHARED)
    }
    /// Shared mapping.
    pub const fn is_shared(&self) -> bool {
        self.flags.contains(VmFlags::SHARED)
    }
    /// Userfaultfd write-protect mode.
    pub const fn uffd_wp(&self) -> bool {
        self.flags.contains(VmFlags::UFFD_WP)
    }
    /// Soft-dirty tracking active.
    pub const fn soft_dirty_tracked(&self) -> bool {
        self.flags.contains(VmFlags::SOFT_DIRTY_TRACKED)
    }
    /// File-backed or shmem.
    pub const fn is_file(&self) -> bool {
        self.flags.contains(VmFlags::FILE)
    }
    /// Writable now.
    pub const fn is_writable(&self) -> bool {
        self.flags.contains(VmFlags::WRITE)
    }
}

/// Resident-set counter changes (`MM_ANONPAGES`, `MM_FILEPAGES`, `MM_SWAPENTS`), to add to the
/// address space's counters (`add_mm_rss_vec`). Copy produces positive deltas for the child, zap
/// negative ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Rss {
    /// Anonymous pages.
    pub anon: i64,
    /// File-backed pages.
    pub file: i64,
    /// Swap entries.
    pub swap: i64,
}

impl core::ops::AddAssign for Rss {
    fn add_assign(&mut self, other: Self) {
        self.anon += other.anon;
        self.file += other.file;
        self.swap += other.swap;
    }
}
