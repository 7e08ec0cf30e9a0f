//! The physical frame allocator: a bitmap over RAM below 4 GiB, built from the PVH memory map,
//! handing out naturally aligned blocks of 2^order frames.

use crate::{arch::pvh::BootInfo, spin::SpinLock};

/// Frame size.
pub const FRAME_SIZE: u64 = 4096;
/// The kernel maps (and so manages) the first 4 GiB only.
const MAX_FRAMES: usize = 1 << 20;
/// The largest block [`alloc`] hands out: 2^9 frames = 2 MiB.
pub const MAX_ORDER: u32 = 9;

struct Bitmap {
    /// Bit set = frame free (clear: in use, or not RAM), so the bitmap starts out in `.bss`.
    free_bits: [u64; MAX_FRAMES / 64],
    /// One past the highest RAM frame.
    end: usize,
    free: usize,
}

impl Bitmap {
    fn is_free(&self, frame: usize) -> bool {
        self.free_bits[frame / 64] & (1 << (frame % 64)) != 0
    }

    fn set(&mut self, frame: usize, used: bool) {
        let (word, bit) = (frame / 64, 1u64 << (frame % 64));
        if used {
            self.free_bits[word] &= !bit;
        } else {
            self.free_bits[word] |= bit;
        }
    }
}

static FRAMES: SpinLock<Bitmap> = SpinLock::new(Bitmap {
    free_bits: [0; MAX_FRAMES / 64],
    end: 0,
    free: 0,
});

unsafe extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
}

/// Frees every whole RAM frame of the memory map except the first MiB and the kernel image.
pub fn init(boot: &BootInfo) {
    let kernel_start = (&raw const __kernel_start) as u64 / FRAME_SIZE;
    let kernel_end = (&raw const __kernel_end) as u64 / FRAME_SIZE;
    let mut map = FRAMES.lock();
    for entry in boot
        .memmap
        .iter()
        .filter(|e| e.kind == crate::arch::pvh::MEMMAP_RAM)
    {
        let first = entry.addr.div_ceil(FRAME_SIZE);
        let last = (entry.addr.saturating_add(entry.size) / FRAME_SIZE).min(MAX_FRAMES as u64);
        for frame in first..last {
            if frame < 256 || (kernel_start..kernel_end).contains(&frame) {
                continue;
            }
            if !map.is_free(frame as usize) {
                map.set(frame as usize, false);
                map.free += 1;
            }
            map.end = map.end.max(frame as usize + 1);
        }
    }
}

/// Allocates 2^`order` contiguous frames aligned to their size; returns the physical address.
pub fn alloc(order: u32) -> Option<u64> {
    if order > MAX_ORDER {
        return None;
    }
    take_run(&mut FRAMES.lock(), 1 << order, 1 << order)
}

/// Marks the first free run of `count` frames starting on a multiple of `align` as used;
/// returns its physical address.
fn take_run(map: &mut Bitmap, count: usize, align: usize) -> Option<u64> {
    let mut start = 0;
    while start + count <= map.end {
        match (start..start + count).find(|&f| !map.is_free(f)) {
            None => {
                (start..start + count).for_each(|f| map.set(f, true));
                map.free -= count;
                return Some(start as u64 * FRAME_SIZE);
            }
            // Skip to the next aligned start at or past the first free frame after the one in
            // use (whole words of used frames at once: every aligned start before it would
            // begin with a used frame).
            Some(used) => start = next_free(map, used + 1).div_ceil(align) * align,
        }
    }
    None
}

/// The first free frame at or after `frame` (`map.end` or more when there is none).
fn next_free(map: &Bitmap, mut frame: usize) -> usize {
    while frame < map.end {
        let bits = map.free_bits[frame / 64] >> (frame % 64);
        if bits != 0 {
            return frame + bits.trailing_zeros() as usize;
        }
        frame = (frame / 64 + 1) * 64;
    }
    frame
}

/// Returns a block from [`alloc`].
///
/// # Panics
/// If any frame of the block is already free: a double free is a kernel bug.
pub fn free(paddr: u64, order: u32) {
    let first = (paddr / FRAME_SIZE) as usize;
    let mut map = FRAMES.lock();
    for frame in first..first + (1 << order) {
        assert!(!map.is_free(frame), "double free of frame {frame:#x}");
        map.set(frame, false);
    }
    map.free += 1 << order;
}

/// Allocates `count` contiguous frames (any count, frame-aligned), for boot-time tables larger
/// than a [`MAX_ORDER`] block. Returns the physical address of the first.
pub fn alloc_contiguous(count: usize) -> Option<u64> {
    take_run(&mut FRAMES.lock(), count, 1)
}

/// One past the highest frame number the allocator manages.
pub fn end_frame() -> usize {
    FRAMES.lock().end
}

/// How many frames are free.
pub fn free_count() -> usize {
    FRAMES.lock().free
}
