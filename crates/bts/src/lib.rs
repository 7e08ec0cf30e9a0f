#![doc = include_str!("../README.md")]
#![cfg_attr(not(loom), no_std)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod buffer;
mod config;
mod cpu;
mod cpu_cell;
pub mod error;
pub mod format;
pub mod hal;
pub mod sim;
mod slot;
mod sync;
mod tracer;
pub mod view;
#[cfg(all(feature = "x86", target_arch = "x86_64"))]
pub mod x86;

pub use buffer::pages_for;
pub use config::{Config, Flags, Status};
pub use cpu::{BtsCpu, Overflow, Pmi};
pub use cpu_cell::{CpuCell, CpuGuard};
pub use error::Error;
pub use format::Record;
pub use tracer::{Bts, CpuTracingClaim};
