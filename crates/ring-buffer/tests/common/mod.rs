//! Shared test helpers: a heap page allocator and a seeded PRNG.
#![allow(dead_code, unreachable_pub)]

use std::{
    alloc::{Layout, alloc_zeroed, dealloc},
    ptr::NonNull,
    sync::atomic::{AtomicIsize, Ordering},
};

use oskit_ring_buffer::{LocalCpu, PageAlloc, format::PAGE_SIZE};

/// Pages from the global allocator, counting what is outstanding.
#[derive(Default)]
pub struct HeapPages {
    pub outstanding: AtomicIsize,
}

// SAFETY: `alloc_zeroed` with page alignment returns zeroed, page-aligned, unshared memory.
unsafe impl PageAlloc for HeapPages {
    fn alloc_pages(&self, order: u32) -> Option<NonNull<u8>> {
        let layout = Layout::from_size_align(PAGE_SIZE << order, PAGE_SIZE).ok()?;
        // SAFETY: non-zero size.
        let p = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        self.outstanding.fetch_add(1 << order, Ordering::Relaxed);
        Some(p)
    }

    unsafe fn free_pages(&self, pages: NonNull<u8>, order: u32) {
        let layout = Layout::from_size_align(PAGE_SIZE << order, PAGE_SIZE).unwrap();
        self.outstanding.fetch_sub(1 << order, Ordering::Relaxed);
        // SAFETY: allocated above with this layout.
        unsafe { dealloc(pages.as_ptr(), layout) };
    }
}

/// xorshift64*: tiny, seeded, good enough for test inputs.
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// CPU 0 of a test: the test thread is its only writer.
pub fn cpu0() -> LocalCpu {
    // SAFETY: each test that uses this writes CPU 0 from its own thread only, and buffers are
    // not shared between tests.
    unsafe { LocalCpu::new(0) }
}

/// The payload of event number `seq` of length `len`: a pattern that differs per event.
pub fn payload(seq: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seq as u8).wrapping_mul(31).wrapping_add(i as u8) ^ 0x5a)
        .collect()
}

/// `data` as stored: zero-padded to a multiple of 4, at least 4.
pub fn stored(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    v.resize(data.len().max(1).div_ceil(4) * 4, 0);
    v
}
