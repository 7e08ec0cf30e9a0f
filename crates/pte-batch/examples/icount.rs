//! Instruction-count probes of the batched fork copy, for `cargo xtask budgets` (callgrind
//! counts the instructions inside each `icount_*` function): `icount PROBE ITERS`, where ITERS
//! is the number of PTEs copied, so the budgets are per PTE.
//!
//! - `copy_64k`: anon folios of 64 KiB (order 4): batches of 16 PTEs.
//! - `copy_4k`: small folios (order 0): every PTE takes the single-PTE path.
//! - `copy_4k_reference`: the per-PTE reference (Linux before batching) on the same table.

#[path = "../benches/support/mod.rs"]
mod support;

use oskit_pte_batch::hal::PAGE_SIZE;
use oskit_pte_batch::sim::{SimFolios, SimPage, SimSpace};
use oskit_pte_batch::{Fork, PteFormat, Rss, X86Pte, reference};
use support::{BASE, PFN, vma, world, x86_flags};

/// Forks the `parent.len()` PTEs into `child` (a COW mapping).
#[inline(never)]
fn copy(parent: &mut [u64], pages: &mut [SimPage], child: &mut [u64]) {
    let end = BASE + parent.len() as u64 * PAGE_SIZE;
    let mut f = SimFolios::from_pages(PFN, pages);
    let mut p = SimSpace::<X86Pte>::new(BASE, parent);
    let mut c = SimSpace::<X86Pte>::new(BASE, child);
    let vma = vma(X86Pte::USER_READONLY);
    let mut fork = Fork::new(&mut f, vma, vma);
    fork.copy_range(&mut c, &mut p, BASE, end)
        .expect("copy succeeds");
}

/// The same fork with Linux's pre-batch semantics, one PTE at a time.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn icount_copy_4k_reference(parent: &mut [u64], pages: &mut [SimPage], child: &mut [u64]) {
    let end = BASE + parent.len() as u64 * PAGE_SIZE;
    let mut f = SimFolios::from_pages(PFN, pages);
    let mut p = SimSpace::<X86Pte>::new(BASE, parent);
    let mut c = SimSpace::<X86Pte>::new(BASE, child);
    let vma = vma(X86Pte::USER_READONLY);
    let mut rss = Rss::default();
    reference::copy_range(&mut c, &mut p, &mut f, vma, vma, BASE, end, &mut rss)
        .expect("copy succeeds");
}

macro_rules! probe {
    ($name:ident, $order:expr) => {
        /// Copies every PTE of the parent (folios of the given order) into the child.
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub fn $name(parent: &mut [u64], pages: &mut [SimPage], child: &mut [u64]) {
            // Keeps the two probes distinct functions (identical code would be merged).
            std::hint::black_box($order);
            copy(parent, pages, child)
        }
    };
}

probe!(icount_copy_64k, 4u8);
probe!(icount_copy_4k, 0u8);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (probe, iters) = match args.as_slice() {
        [_, probe, iters] => (
            probe.as_str(),
            iters.parse::<usize>().expect("ITERS is a number"),
        ),
        _ => panic!("usage: icount PROBE ITERS"),
    };
    let order = match probe {
        "copy_64k" => 4,
        "copy_4k" | "copy_4k_reference" => 0,
        other => panic!("unknown probe {other}"),
    };
    let (mut parent, mut pages) = world::<X86Pte>(iters, order, x86_flags());
    let mut child = vec![0u64; iters];
    match probe {
        "copy_64k" => icount_copy_64k(&mut parent, &mut pages, &mut child),
        "copy_4k" => icount_copy_4k(&mut parent, &mut pages, &mut child),
        _ => icount_copy_4k_reference(&mut parent, &mut pages, &mut child),
    }
    assert!(
        child.iter().all(|&pte| X86Pte::is_present(pte)),
        "the child got every PTE"
    );
}
