#![doc = include_str!("../README.md")]
#![cfg_attr(not(loom), no_std)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod abi;
pub mod error;
mod guest;
pub mod hal;
pub mod percpu;
pub mod sim;
mod sync;
pub mod table;
#[cfg(all(feature = "x86", target_arch = "x86_64"))]
pub mod x86;

pub use error::Error;
pub use guest::{AsyncEvent, AsyncPf, Config, PfOutcome};
pub use hal::{ApfHardware, KvmFeatures, Native, Scheduler};
pub use percpu::{ApfCpu, PfEvent, Protocol};
pub use table::{Enqueue, SleepTable, WaitNode, Waiter, Wake, WakeAll};
