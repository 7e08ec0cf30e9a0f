//! Atomics: `core`'s normally, loom's under `cfg(loom)` so the shutdown handler's claim can be
//! model-checked.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU8, Ordering};

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicU8, Ordering};
