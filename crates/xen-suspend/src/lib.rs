#![doc = include_str!("../README.md")]
#![cfg_attr(not(loom), no_std)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod abi;
pub mod error;
pub mod events;
pub mod hal;
pub mod shutdown;
pub mod sim;
mod suspend;
mod sync;
#[cfg(all(feature = "x86", target_arch = "x86_64"))]
pub mod x86;
pub mod xenstore;

pub use error::{Error, Outcome, Step};
pub use events::{EventChannels, EventStorage};
pub use shutdown::{Handled, Request, ShutdownActions, ShutdownHandler};
pub use suspend::Machine;
