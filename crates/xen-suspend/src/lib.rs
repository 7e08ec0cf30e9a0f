#![doc = include_str!("../README.md")]
#![no_std]

pub mod hal;
pub mod sim;
#[cfg(all(feature = "x86", target_arch = "x86_64"))]
pub mod x86;
