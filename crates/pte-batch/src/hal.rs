//! The hardware the batching is written against: a page-table entry format.

/// How one architecture encodes a last-level page-table entry.
pub trait PteFormat {
    /// Whether the entry maps a page the MMU may use.
    fn is_present(pte: u64) -> bool;
    /// The page frame number the entry maps.
    fn pfn(pte: u64) -> u64;
    /// The same entry pointing `nr` frames further on.
    fn advance_pfn(pte: u64, nr: u64) -> u64;
}
