#![doc = include_str!("../README.md")]
#![cfg_attr(not(any(loom, feature = "std")), no_std)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "std")]
extern crate std;

pub mod buffer;
mod cpu;
pub mod error;
pub mod format;
pub mod hal;
pub mod map;
pub mod mapped;
mod mem;
pub mod read_page;
pub mod reader;
pub mod reset;
pub mod resize;
pub mod sim;
mod sync;
#[cfg(feature = "std")]
pub mod tracedat;
#[cfg(all(feature = "std", target_os = "linux"))]
pub mod tracefs;
#[cfg(all(feature = "x86", target_arch = "x86_64"))]
pub mod x86;

#[cfg(loom)]
#[doc(hidden)]
pub use sync::interrupts;

pub use buffer::{Config, Mode, Reservation, RingBuffer, Stats};
pub use error::Error;
pub use hal::{Clock, LocalCpu, NoWaiter, PageAlloc, Waiter};
pub use map::{MapLayout, MapPage};
pub use mapped::{GetReader, MapRegion, MappedEvent, MappedReader, RawRegion};
pub use read_page::{DataPage, PageRead};
pub use reader::{Event, Reader};
pub use reset::RunOn;
