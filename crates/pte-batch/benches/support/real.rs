//! The real x86-64 walker (`X86PageTables`) over page tables in ordinary memory: a fake
//! physical address space of 4 KiB frames, the parent's 4-level tables mapping `n` pages from
//! [`BASE`](super::BASE), and room for the child's tables. Used by the benches and the
//! instruction-count probes to measure copy and zap on the real walker.

use oskit_pte_batch::sim::{SimFolios, SimPage};
use oskit_pte_batch::x86::{DirectMap, FrameAlloc, NoFrames, NoTlb, X86PageTables};
use oskit_pte_batch::{Fork, PteFormat, Rss, X86Pte, Zap, reference};

use super::{BASE, PFN, vma, world, x86_flags};

/// One 4 KiB frame.
#[repr(C, align(4096))]
#[derive(Clone, Copy)]
pub struct Frame(pub [u64; 512]);

/// Fake physical memory: frame `i` is physical address `i * 4096`. Frame 1 is the parent's
/// PML4, frame 2 the child's; the parent's tables follow, then the child's table frames.
pub struct Real {
    pub frames: Vec<Frame>,
    pub initial: Vec<Frame>,
    pub pages: Vec<SimPage>,
    pub initial_pages: Vec<SimPage>,
    n: usize,
    child_first: usize,
}

const PARENT_ROOT: u64 = 4096;
const CHILD_ROOT: u64 = 2 * 4096;

/// Hands out the frames `[next, end)`.
pub struct Bump {
    next: u64,
    end: u64,
}

impl FrameAlloc for Bump {
    fn alloc_frame(&mut self) -> Option<u64> {
        (self.next < self.end).then(|| {
            self.next += 1;
            (self.next - 1) * 4096
        })
    }
}

impl Real {
    /// `n` pages (a multiple of 512 or not) in anon folios of `order`, writable, dirty, young.
    pub fn new(n: usize, order: u8) -> Self {
        let (leaf, pages) = world::<X86Pte>(n, order, x86_flags());
        let tables = n.div_ceil(512);
        // Frames: 0 unused, 1-2 roots, then per side a PDPT, a PD and the tables.
        let per_side = 2 + tables;
        let mut frames = vec![Frame([0; 512]); 3 + 2 * per_side];
        let child_first = 3 + per_side;
        let (pdpt, pd) = (3u64, 4u64);
        let table = |u: u64| 0x7 | (u * 4096);
        let idx = |va: u64, level: u32| ((va >> (12 + 9 * level)) & 0x1ff) as usize;
        frames[1].0[idx(BASE, 3)] = table(pdpt);
        frames[pdpt as usize].0[idx(BASE, 2)] = table(pd);
        for t in 0..tables {
            let frame = 5 + t;
            let va = BASE + (t as u64) * 512 * 4096;
            frames[pd as usize].0[idx(va, 1)] = table(frame as u64);
            for k in 0..512 {
                if let Some(&e) = leaf.get(t * 512 + k) {
                    frames[frame].0[k] = e;
                }
            }
        }
        Self {
            initial: frames.clone(),
            frames,
            initial_pages: pages.clone(),
            pages,
            n,
            child_first,
        }
    }

    /// Back to the state `new` built (the buffers stay allocated).
    pub fn reset(&mut self) {
        self.frames.copy_from_slice(&self.initial);
        self.pages.copy_from_slice(&self.initial_pages);
    }

    fn end(&self) -> u64 {
        BASE + self.n as u64 * 4096
    }

    fn window(&mut self) -> DirectMap {
        // SAFETY: `frames` is a live allocation of `len * 4096` bytes that is not resized
        // while the walkers built from this window are used (they live inside one call).
        unsafe {
            DirectMap::new(
                self.frames.as_mut_ptr() as u64,
                (self.frames.len() * 4096) as u64,
            )
        }
    }

    /// Forks the parent into the child with the batched copy (`batched`) or the per-PTE
    /// reference.
    pub fn copy(&mut self, batched: bool) -> Rss {
        let window = self.window();
        let end = self.end();
        let mut alloc = Bump {
            next: self.child_first as u64,
            end: self.frames.len() as u64,
        };
        // SAFETY: frames 1 and 2 are the roots, the parent's tables are the frames after them
        // and the allocator hands out the child's unused frames; `self.frames` outlives both
        // walkers (dropped at the end of this call).
        let (mut parent, mut child) = unsafe {
            (
                X86PageTables::new(PARENT_ROOT, window, NoFrames, NoTlb),
                X86PageTables::new(CHILD_ROOT, window, &mut alloc, NoTlb),
            )
        };
        let mut f = SimFolios::from_pages(PFN, &mut self.pages);
        let v = vma(X86Pte::USER_READONLY);
        if batched {
            let mut fork = Fork::new(&mut f, v, v);
            fork.copy_range(&mut child, &mut parent, BASE, end)
                .expect("copy succeeds");
            fork.rss()
        } else {
            let mut rss = Rss::default();
            reference::copy_range(&mut child, &mut parent, &mut f, v, v, BASE, end, &mut rss)
                .expect("copy succeeds");
            rss
        }
    }

    /// Zaps the parent with the batched zap (`batched`) or the per-PTE reference.
    pub fn zap(&mut self, batched: bool) -> Rss {
        let window = self.window();
        let end = self.end();
        // SAFETY: as in `copy`.
        let mut parent = unsafe { X86PageTables::new(PARENT_ROOT, window, NoFrames, NoTlb) };
        let mut f = SimFolios::from_pages(PFN, &mut self.pages);
        let v = vma(X86Pte::USER_READONLY);
        if batched {
            let mut zap = Zap::new(&mut f, v);
            zap.zap_range(&mut parent, BASE, end).expect("zap succeeds");
            zap.rss()
        } else {
            let mut rss = Rss::default();
            reference::zap_range(&mut parent, &mut f, v, BASE, end, &mut rss)
                .expect("zap succeeds");
            rss
        }
    }

    /// Whether the child maps every page (after `copy`) / the parent none (after `zap`).
    pub fn check(&mut self, copied: bool) -> bool {
        let window = self.window();
        let root = if copied { CHILD_ROOT } else { PARENT_ROOT };
        // SAFETY: as in `copy`.
        let t = unsafe { X86PageTables::new(root, window, NoFrames, NoTlb) };
        (0..self.n as u64).all(|k| {
            let e = oskit_pte_batch::PageTable::get(&t, BASE + k * 4096);
            X86Pte::is_present(e) == copied
        })
    }
}
