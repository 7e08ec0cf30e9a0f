#![doc = include_str!("../README.md")]
#![cfg_attr(not(test), no_std)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod batch;
pub mod copy;
pub mod error;
pub mod format;
pub mod hal;
pub mod nonpresent;
pub mod reference;
pub mod sim;
pub mod vma;
#[cfg(all(feature = "x86", target_arch = "x86_64"))]
pub mod x86;
pub mod zap;

pub use batch::{Batch, BatchFlags, folio_pte_batch};
pub use copy::{CopyStats, Fork, Progress};
pub use error::Error;
pub use format::{Arm64Pte, X86Flags, X86Pte};
pub use hal::{
    Folio, FolioOps, MaybePinned, PAGE_SIZE, PageAlloc, PageTable, PteFormat, SwapCountFull,
};
pub use nonpresent::{Markers, Migration, NonPresent};
pub use vma::{Rss, VmFlags, Vma};
pub use zap::{Zap, ZapStats};

/// `[start, end)` is page aligned and not reversed.
fn check_range(start: u64, end: u64) -> Result<(), Error> {
    if start % PAGE_SIZE != 0 || end % PAGE_SIZE != 0 || start > end {
        return Err(Error::InvalidRange);
    }
    Ok(())
}
