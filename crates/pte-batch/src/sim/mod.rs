//! Software model of the hardware and of the kernel's page metadata: page tables in
//! caller-provided memory ([`SimSpace`], and [`ContSpace`] with arm64's contiguous bit) and a
//! `struct page` array ([`SimFolios`]), and an order checker for teardown ([`Ordered`]). No allocation: the caller provides the storage, so the
//! model also runs on bare metal.

mod cont;
mod folios;
mod order;
mod space;

pub use cont::ContSpace;
pub use folios::{SimFolios, SimPage};
pub use order::{OrderLog, Ordered};
pub use space::SimSpace;

/// Counters of what a simulated page table was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableStats {
    /// Entry writes (set, clear, write-protect of one entry).
    pub writes: u64,
    /// TLB maintenance operations (a range flush, or the invalidation of a break-before-make).
    pub tlb_flushes: u64,
    /// Pages covered by those TLB operations.
    pub tlb_pages: u64,
    /// Contiguous blocks folded (entries written with the contiguous bit).
    pub folds: u64,
    /// Contiguous blocks unfolded (break-before-make).
    pub unfolds: u64,
    /// Lazy-MMU sections entered.
    pub lazy_sections: u64,
    /// Entries write-protected (not next to `writes`, so that counting both stays two plain
    /// increments rather than one vector update).
    pub wrprotects: u64,
    /// Raw entries read ([`ContSpace`] only: a folded block's gathered read counts 16).
    pub reads: u64,
}
