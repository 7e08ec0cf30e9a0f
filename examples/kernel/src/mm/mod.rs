//! Memory: the physical frame allocator and its per-frame metadata (folios), address spaces
//! and their page tables, the page-fault handler, and the oskit-pte-batch adapter over the
//! real page tables.

pub mod fault;
pub mod framemeta;
pub mod frames;
pub mod ptbatch;
pub mod vm;
