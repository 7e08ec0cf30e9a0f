//! Instruction-count probes of the batched fork copy and zap, for `cargo xtask budgets`
//! (callgrind counts the instructions inside each `icount_*` function): `icount PROBE ITERS`,
//! where ITERS is the number of PTEs copied or zapped, so the budgets are per PTE.
//!
//! `{copy,zap}_{4k,16k,64k,2m}` run the batched code over a COW anon mapping of folios of that
//! size (`4k`: every PTE takes the single-PTE path); `{copy,zap}_{size}_reference` run the
//! per-PTE reference (Linux before batching) on the same table.
//!
//! `x86_{copy,zap}_{4k,64k,2m}[_reference]` (feature `x86`) run the same on the real x86-64
//! walker (`X86PageTables`) over 4-level page tables in ordinary memory.

#[path = "../benches/support/mod.rs"]
mod support;

use oskit_pte_batch::hal::PAGE_SIZE;
use oskit_pte_batch::sim::{SimFolios, SimPage, SimSpace};
use oskit_pte_batch::{Fork, PteFormat, Rss, X86Pte, Zap, reference};
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
#[inline(never)]
fn copy_reference(parent: &mut [u64], pages: &mut [SimPage], child: &mut [u64]) {
    let end = BASE + parent.len() as u64 * PAGE_SIZE;
    let mut f = SimFolios::from_pages(PFN, pages);
    let mut p = SimSpace::<X86Pte>::new(BASE, parent);
    let mut c = SimSpace::<X86Pte>::new(BASE, child);
    let vma = vma(X86Pte::USER_READONLY);
    let mut rss = Rss::default();
    reference::copy_range(&mut c, &mut p, &mut f, vma, vma, BASE, end, &mut rss)
        .expect("copy succeeds");
}

/// Zaps the `parent.len()` PTEs.
#[inline(never)]
fn zap(parent: &mut [u64], pages: &mut [SimPage], _: &mut [u64]) {
    let end = BASE + parent.len() as u64 * PAGE_SIZE;
    let mut f = SimFolios::from_pages(PFN, pages);
    let mut p = SimSpace::<X86Pte>::new(BASE, parent);
    let mut zap = Zap::new(&mut f, vma(X86Pte::USER_READONLY));
    zap.zap_range(&mut p, BASE, end).expect("zap succeeds");
}

/// The same zap with Linux's pre-batch semantics, one PTE at a time.
#[inline(never)]
fn zap_reference(parent: &mut [u64], pages: &mut [SimPage], _: &mut [u64]) {
    let end = BASE + parent.len() as u64 * PAGE_SIZE;
    let mut f = SimFolios::from_pages(PFN, pages);
    let mut p = SimSpace::<X86Pte>::new(BASE, parent);
    let mut rss = Rss::default();
    reference::zap_range(
        &mut p,
        &mut f,
        vma(X86Pte::USER_READONLY),
        BASE,
        end,
        &mut rss,
    )
    .expect("zap succeeds");
}

type Probe = fn(&mut [u64], &mut [SimPage], &mut [u64]);

macro_rules! probes {
    ($($name:ident = $f:ident, $order:expr;)*) => {
        $(
            /// Runs one probe (folios of the given order).
            #[unsafe(no_mangle)]
            #[inline(never)]
            pub fn $name(parent: &mut [u64], pages: &mut [SimPage], child: &mut [u64]) {
                // Keeps the probes distinct functions (identical code would be merged).
                std::hint::black_box($order);
                $f(parent, pages, child)
            }
        )*
        /// The probe named `name` (without `icount_`) and its folio order.
        fn lookup(name: &str) -> Option<(Probe, u8)> {
            $(
                if stringify!($name).strip_prefix("icount_") == Some(name) {
                    return Some(($name as Probe, $order));
                }
            )*
            None
        }
    };
}

probes! {
    icount_copy_4k = copy, 0u8;
    icount_copy_16k = copy, 2u8;
    icount_copy_64k = copy, 4u8;
    icount_copy_2m = copy, 9u8;
    icount_copy_4k_reference = copy_reference, 0u8;
    icount_copy_16k_reference = copy_reference, 2u8;
    icount_copy_64k_reference = copy_reference, 4u8;
    icount_copy_2m_reference = copy_reference, 9u8;
    icount_zap_4k = zap, 0u8;
    icount_zap_16k = zap, 2u8;
    icount_zap_64k = zap, 4u8;
    icount_zap_2m = zap, 9u8;
    icount_zap_4k_reference = zap_reference, 0u8;
    icount_zap_16k_reference = zap_reference, 2u8;
    icount_zap_64k_reference = zap_reference, 4u8;
    icount_zap_2m_reference = zap_reference, 9u8;
}

#[cfg(all(feature = "x86", target_arch = "x86_64"))]
#[allow(unreachable_pub)]
mod x86_probes {
    use super::support::real::Real;

    type Probe = fn(&mut Real);

    macro_rules! real_probes {
        ($($name:ident = $copy:expr, $batched:expr, $order:expr;)*) => {
            $(
                /// Runs one real-walker probe (folios of the given order).
                #[unsafe(no_mangle)]
                #[inline(never)]
                pub fn $name(real: &mut Real) {
                    std::hint::black_box($order);
                    if $copy {
                        std::hint::black_box(real.copy($batched));
                    } else {
                        std::hint::black_box(real.zap($batched));
                    }
                }
            )*
            /// The probe named `name` (without `icount_`), its folio order and whether it
            /// copies.
            pub fn lookup(name: &str) -> Option<(Probe, u8, bool)> {
                $(
                    if stringify!($name).strip_prefix("icount_") == Some(name) {
                        return Some(($name as Probe, $order, $copy));
                    }
                )*
                None
            }
        };
    }

    real_probes! {
        icount_x86_copy_4k = true, true, 0u8;
        icount_x86_copy_64k = true, true, 4u8;
        icount_x86_copy_2m = true, true, 9u8;
        icount_x86_copy_4k_reference = true, false, 0u8;
        icount_x86_copy_64k_reference = true, false, 4u8;
        icount_x86_copy_2m_reference = true, false, 9u8;
        icount_x86_zap_4k = false, true, 0u8;
        icount_x86_zap_64k = false, true, 4u8;
        icount_x86_zap_2m = false, true, 9u8;
        icount_x86_zap_4k_reference = false, false, 0u8;
        icount_x86_zap_64k_reference = false, false, 4u8;
        icount_x86_zap_2m_reference = false, false, 9u8;
    }

    /// Runs `probe` over `iters` PTEs; false if it is not a real-walker probe.
    pub fn run(probe: &str, iters: usize) -> bool {
        let Some((run, order, copy)) = lookup(probe) else {
            return false;
        };
        let mut real = Real::new(iters, order);
        run(&mut real);
        assert!(real.check(copy), "every PTE copied / cleared");
        true
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (probe, iters) = match args.as_slice() {
        [_, probe, iters] => (
            probe.as_str(),
            iters.parse::<usize>().expect("ITERS is a number"),
        ),
        _ => panic!("usage: icount PROBE ITERS"),
    };
    #[cfg(all(feature = "x86", target_arch = "x86_64"))]
    if x86_probes::run(probe, iters) {
        return;
    }
    let (run, order) = lookup(probe).unwrap_or_else(|| panic!("unknown probe {probe}"));
    let (mut parent, mut pages) = world::<X86Pte>(iters, order, x86_flags());
    let mut child = vec![0u64; iters];
    run(&mut parent, &mut pages, &mut child);
    if probe.starts_with("copy") {
        assert!(
            child.iter().all(|&pte| X86Pte::is_present(pte)),
            "the child got every PTE"
        );
    } else {
        assert!(parent.iter().all(|&pte| pte == 0), "every PTE is cleared");
    }
}
