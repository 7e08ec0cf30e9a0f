#![doc = include_str!("../README.md")]
#![cfg_attr(not(loom), no_std)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod cpu;
pub mod error;
pub mod format;
pub mod hal;
pub mod sim;
mod sync;
mod tracer;
pub mod view;
#[cfg(all(feature = "x86", target_arch = "x86_64"))]
pub mod x86;

pub use cpu::{BtsCpu, Overflow};
pub use error::Error;
pub use format::Record;
pub use tracer::{Bts, Config, CpuTracingClaim, Flags, Status, pages_for};
