//! The `fork` step at scale: a 64 MiB address space of 64 KiB folios, then one of 2 MiB folios,
//! forked from ring 3 with `oskit-pte-batch` on the real x86-64 tables; both sides then write
//! every page (the parent first: all 16,384 pages are COW-copied; then the child: every page
//! but each folio's last, which the COW fault reuses once it holds the folio's last reference);
//! every frame comes back when both exit.
//!
//! The ring-3 side writes two words per page (the first and the last, stamped with the side and
//! the page): each write is what breaks COW, and under TCG filling all of 128 MiB word by word
//! would cost tens of seconds per layout. The kernel checks, between the steps, every entry of
//! both spaces, each side's stamps in its own frames, and the reference and map count of every
//! folio, exactly.
//!
//! Before the task starts, the kernel also copies the parent's 64 MiB into scratch tables twice,
//! with the crate's batched `Fork::copy_range` and with its per-PTE `reference::copy_range`,
//! over the same backend types the kernel's fork uses, and reports the work each did (entries
//! read and written, backend calls, folio lookups and reference/rmap updates, TLB flushes): exact
//! counts, the same under TCG and KVM ([`super::fork_measure`]).
//!
//! The region is smaller when the command line says so (`fork_mib=N`, [`region_mib`]): xtask
//! asks for 4 MiB under kvm_pvm, whose emulated ring 0 makes each COW fault cost milliseconds.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::{
    checks::{self, sched::wait_for},
    ensure, fail,
    mm::framemeta,
    mm::frames,
    mm::ptbatch,
    mm::vm::{self, PTE_P, PTE_W},
    steps::fork_control::{CHILD, CONTROL, Control, PARENT, u_state, u_wait_phase},
    steps::fork_measure::{self, Measured},
    task::sched,
    task::ulib,
    task::usermode::{self, DATA_START},
};

const PAGE: u64 = 4096;
/// The folio region: 2 MiB aligned, up to [`MAX_MIB`] (32 page tables).
pub const BASE: u64 = DATA_START + (256 << 20);
/// The largest region, in MiB, and the default: 16,384 pages (1,024 folios of 64 KiB).
pub const MAX_MIB: u64 = 64;
/// Folio heads the kernel remembers (64 MiB of 64 KiB folios).
const MAX_FOLIOS: usize = 1024;
/// Phases: the parent may write; the child may write; both check again and exit.
const PARENT_WRITES: u64 = 1;
const CHILD_WRITES: u64 = 2;
const RECHECK: u64 = 3;
/// States: forked (the side saw the pre-fork stamps) / wrote its own and sees them / saw them
/// again at the end. Negative values (as `i64`) are the failing step.
const FORKED: i64 = 1;
const WROTE: i64 = 2;
const DONE: i64 = 3;

/// Stamps: parent before the fork, parent after it, child.
const TAG_OLD: u64 = 0x51;
const TAG_PARENT: u64 = 0x62;
const TAG_CHILD: u64 = 0x73;

/// The stamp of word `w` (0: first, 1: last) of page `page`.
const fn stamp(tag: u64, page: u64, w: u64) -> u64 {
    (tag << 56) ^ (page << 8) ^ (w * 0x9e37_79b9_0000)
}

/// The two stamped words of page `page`.
const fn words(page: u64) -> [u64; 2] {
    let at = BASE + page * PAGE;
    [at, at + PAGE - 8]
}

/// Stamps the region's `pages` pages with `tag` (ring 3).
fn u_write(tag: u64, pages: u64) {
    for page in 0..pages {
        for (w, at) in words(page).into_iter().enumerate() {
            // SAFETY: inside this task's folio region.
            unsafe { (at as *mut u64).write_volatile(stamp(tag, page, w as u64)) };
        }
    }
}

/// Whether the region's `pages` pages hold `tag`'s stamps (ring 3).
fn u_holds(tag: u64, pages: u64) -> bool {
    (0..pages).all(|page| {
        words(page).into_iter().enumerate().all(|(w, at)| {
            // SAFETY: inside this task's folio region.
            unsafe { (at as *const u64).read_volatile() == stamp(tag, page, w as u64) }
        })
    })
}

fn u_child(pages: u64) -> ! {
    if !u_state(CHILD, u_holds(TAG_OLD, pages), FORKED) || !u_wait_phase(CHILD_WRITES) {
        ulib::exit(1);
    }
    // The parent has written every page by now: none of it may show here.
    if !u_holds(TAG_OLD, pages) {
        u_state(CHILD, false, WROTE);
        ulib::exit(2);
    }
    u_write(TAG_CHILD, pages);
    if !u_state(CHILD, u_holds(TAG_CHILD, pages), WROTE) || !u_wait_phase(RECHECK) {
        ulib::exit(3);
    }
    ulib::exit(if u_state(CHILD, u_holds(TAG_CHILD, pages), DONE) {
        0
    } else {
        4
    })
}

/// The forking task (ring 3) over a region of `pages` pages.
fn u_scale_parent(pages: u64) -> i64 {
    u_write(TAG_OLD, pages);
    let pid = ulib::fork();
    if pid < 0 {
        return -100;
    }
    if pid == 0 {
        u_child(pages);
    }
    if !u_state(PARENT, u_holds(TAG_OLD, pages), FORKED) || !u_wait_phase(PARENT_WRITES) {
        ulib::wait(pid as u64);
        return 20;
    }
    u_write(TAG_PARENT, pages);
    let mut ok = u_state(PARENT, u_holds(TAG_PARENT, pages), WROTE) && u_wait_phase(RECHECK);
    // The child has written every page by now: none of it may show here.
    ok = ok && u_state(PARENT, u_holds(TAG_PARENT, pages), DONE);
    let child = ulib::wait(pid as u64);
    match (ok, child) {
        (true, 0) => 42,
        (false, _) => 20,
        (true, c) => 10 + c,
    }
}

/// Whether the frame at `frame` holds `tag`'s stamps for page `page` (identity map).
fn frame_holds(frame: u64, tag: u64, page: u64) -> bool {
    [frame, frame + PAGE - 8]
        .into_iter()
        .enumerate()
        .all(|(w, at)| {
            // SAFETY: a frame a live space of this check maps (so allocated), identity-mapped; the
            // tasks are waiting for the kernel, not writing.
            unsafe { (at as *const u64).read_volatile() == stamp(tag, page, w as u64) }
        })
}

/// The folio heads of the layout.
static HEADS: [AtomicU64; MAX_FOLIOS] = [const { AtomicU64::new(0) }; MAX_FOLIOS];

fn head(k: u64) -> u64 {
    HEADS[k as usize].load(Ordering::Relaxed)
}

/// The original frame of page `page` of a layout of order-`order` folios.
fn original(order: u32, page: u64) -> u64 {
    head(page >> order) + (page & ((1 << order) - 1)) * PAGE
}

fn counts(frame: u64) -> (u32, u32) {
    let h = framemeta::get(framemeta::folio_head(frame));
    (
        h.refcount.load(Ordering::Relaxed),
        framemeta::get(frame).mapcount.load(Ordering::Relaxed),
    )
}

/// Right after the fork: both spaces map every page to its original frame, read-only, with
/// the pre-fork stamps; each folio has two references per page and each page two maps.
fn inspect_forked(
    order: u32,
    region: u64,
    parent: vm::SpaceId,
    child: vm::SpaceId,
) -> checks::Outcome {
    let pages = 1u64 << order;
    for page in 0..region {
        let want = original(order, page);
        for (side, space) in [parent, child].into_iter().enumerate() {
            let pte = vm::pte(space, BASE + page * PAGE);
            ensure!(
                pte & (PTE_P | PTE_W) == PTE_P && pte & vm::PTE_ADDR == want,
                "after fork: page {page} of space {side} is {pte:#x}, want {want:#x} read-only"
            );
        }
        let (refs, maps) = counts(want);
        ensure!(
            refs == 2 * pages as u32 && maps == 2 && frame_holds(want, TAG_OLD, page),
            "after fork: page {page} ({want:#x}): {refs} folio refs, {maps} maps, or its data"
        );
    }
    Ok(())
}

/// After both wrote: every page private and writable on each side with its own stamps; the
/// parent on a new order-0 frame everywhere, the child too except on each folio's last page,
/// which is the original (the COW fault found the folio's last reference and reused it).
/// Exact counts: copies hold one reference and one map; each original folio one reference
/// (the child's last page) and that page one map. Returns the child's reused pages.
fn inspect_written(
    order: u32,
    region: u64,
    parent: vm::SpaceId,
    child: vm::SpaceId,
) -> Result<u64, checks::Failure> {
    let pages = 1u64 << order;
    let mut reused = 0;
    for page in 0..region {
        let want = original(order, page);
        let last = page % pages == pages - 1;
        let (pp, cp) = (
            vm::pte(parent, BASE + page * PAGE),
            vm::pte(child, BASE + page * PAGE),
        );
        let (pf, cf) = (pp & vm::PTE_ADDR, cp & vm::PTE_ADDR);
        ensure!(
            pp & cp & (PTE_P | PTE_W) == PTE_P | PTE_W && pf != want && pf != cf,
            "after writes: page {page}: parent {pp:#x}, child {cp:#x}: not private + writable"
        );
        ensure!(
            (cf == want) == last,
            "after writes: the child's page {page} is {cf:#x} (original {want:#x}): only a \
             folio's last page is reused"
        );
        reused += u64::from(cf == want);
        ensure!(
            frame_holds(pf, TAG_PARENT, page) && frame_holds(cf, TAG_CHILD, page),
            "after writes: page {page}: the parent's ({pf:#x}) or child's ({cf:#x}) data is wrong"
        );
        for f in [pf, cf] {
            let order_now = framemeta::get(f).order.load(Ordering::Relaxed);
            let (refs, maps) = counts(f);
            ensure!(
                refs == 1 && maps == 1 && (f == want || order_now == 0),
                "after writes: page {page}: frame {f:#x} (order {order_now}): {refs} refs, \
                 {maps} maps, want a private page"
            );
        }
        if !last {
            let (_, maps) = counts(want);
            ensure!(
                maps == 0,
                "after writes: copied-away frame {want:#x} still has {maps} maps"
            );
        }
    }
    Ok(reused)
}

/// Counters read before and after one layout.
fn counters() -> [u64; 8] {
    [
        &vm::PTES_COPIED,
        &vm::FORK_BATCHES,
        &vm::FORK_TLB_FLUSHES,
        &vm::COW_COPIES,
        &vm::COW_REUSES,
        &vm::ZAP_PTES,
        &vm::ZAP_BATCHES,
        &vm::ZAP_TLB_FLUSHES,
    ]
    .map(|c| c.load(Ordering::Relaxed))
}

/// What one layout did.
#[derive(Clone, Copy, Default)]
pub struct Layout {
    /// Folio order.
    pub order: u32,
    /// The region's size in MiB.
    pub mib: u64,
    /// The region's copy at fork: PTEs, batches, parent TLB flushes.
    pub copy: (u64, u64, u64),
    /// COW copies and reuses during the run (the stacks' included).
    pub cow: (u64, u64),
    /// Teardown: PTEs, batches, TLB flushes (both spaces, every region).
    pub zap: (u64, u64, u64),
    /// The scratch copies of the same tables: batched and per-PTE.
    pub measured: [Measured; 2],
}

/// One layout: `mib` MiB (a multiple of 2, at most [`MAX_MIB`]) of order-`order` folios
/// (4 or 9), forked, written by both sides, torn down.
pub fn run(order: u32, mib: u64) -> Result<Layout, checks::Failure> {
    let size = mib << 20;
    let pages = size / PAGE;
    let folios = pages >> order;
    let free = frames::free_count();
    let violations = framemeta::violations();
    let Some(control) = frames::alloc(0) else {
        fail!("no frame for the control page")
    };
    // SAFETY: a frame we just allocated, identity-mapped.
    unsafe { core::ptr::write_bytes(control as *mut u8, 0, PAGE as usize) };
    let c = Control(control);
    let mut parent = None;
    let mut measured = Ok([Measured::default(); 2]);
    let task = usermode::spawn_with("fork-scale", u_scale_parent, pages, |space| {
        parent = Some(space);
        vm::map_anonymous(space, BASE, size, true)?;
        for k in 0..folios {
            let head = framemeta::alloc_folio(order).ok_or(vm::VmError::NoMemory)?;
            if let Err(e) = vm::map_folio_into(space, BASE + (k << order) * PAGE, head, order) {
                framemeta::put_folio(head);
                return Err(e);
            }
            HEADS[k as usize].store(head, Ordering::Relaxed);
        }
        vm::map_fixed(space, CONTROL, control, PAGE, true)?;
        measured = fork_measure::measure(space, BASE, BASE + size);
        Ok(())
    });
    let (Ok(task), Some(parent)) = (task, parent) else {
        frames::free(control, 0);
        fail!(
            "cannot start the order-{order} forking task: {:?}",
            task.err()
        )
    };
    let before = counters();
    let phases = phases(&c, order, pages, parent);
    if phases.is_err() {
        c.abort();
    }
    let code = sched::join(task);
    let returned = wait_for(|| frames::free_count() + 1 == free);
    let after = counters();
    if returned {
        frames::free(control, 0);
    }
    let copy = phases?;
    let measured = measured.map_err(|why| checks::Failure::new(format_args!("{why}")))?;
    ensure!(
        code == Some(42),
        "order {order}: the parent ended with {code:?} (10+N: the child exited with N, 20: the \
         parent saw wrong data, -100: fork failed)"
    );
    ensure!(
        returned,
        "order {order}: {} frames not returned after both exited",
        free as i64 - frames::free_count() as i64 - 1
    );
    for k in 0..folios {
        let (refs, maps) = counts(head(k));
        ensure!(
            refs == 0 && maps == 0,
            "after teardown: folio {:#x}: {refs} refs, {maps} maps",
            head(k)
        );
    }
    let bad = framemeta::violations() - violations;
    ensure!(bad == 0, "{bad} refcount < mapcount violations");
    let d: [u64; 8] = core::array::from_fn(|i| after[i] - before[i]);
    // The region: every page copied once by the parent and once by the child, but the
    // child's reuse of each folio's last page. The stacks add their own (each a copy for the
    // first writer and a reuse for the second).
    let (copies, reuses) = (d[3], d[4]);
    ensure!(
        copies >= 2 * pages - folios && reuses >= folios,
        "order {order}: {copies} COW copies and {reuses} reuses, want at least {} and {folios}",
        2 * pages - folios
    );
    // Teardown: each space's region pages are all private (one batch each).
    ensure!(
        d[5] >= 2 * pages && d[6] >= 2 * pages,
        "order {order}: teardown zapped {} PTEs in {} batches, want at least {} of one page",
        d[5],
        d[6],
        2 * pages
    );
    Ok(Layout {
        order,
        mib,
        copy,
        cow: (copies, reuses),
        zap: (d[5], d[6], d[7]),
        measured,
    })
}

/// Drives the tasks, inspecting both spaces in between; returns the region's copy report.
fn phases(
    c: &Control,
    order: u32,
    pages: u64,
    parent: vm::SpaceId,
) -> Result<(u64, u64, u64), checks::Failure> {
    let folios = pages >> order;
    c.wait_states(FORKED, FORKED, 120, "fork")?;
    let Some((child, copied)) = vm::forked_child(parent) else {
        fail!("no (single) space forked from the parent's")
    };
    let Some(r) = copied.iter().flatten().find(|r| r.start == BASE) else {
        fail!("no fork report for the folio region")
    };
    // One batch per folio, one parent flush per page table (2 MiB).
    let tables = pages >> 9;
    ensure!(
        r.ptes == pages && r.batches == folios && r.tlb_flushes == tables,
        "order {order}: the fork copied {} PTEs in {} batches with {} TLB flushes, want \
         {pages}, {folios}, {tables}",
        r.ptes,
        r.batches,
        r.tlb_flushes
    );
    inspect_forked(order, pages, parent, child)?;
    c.set_phase(PARENT_WRITES);
    c.wait_states(WROTE, FORKED, 120, "the parent's writes")?;
    c.set_phase(CHILD_WRITES);
    c.wait_states(WROTE, WROTE, 120, "the child's writes")?;
    let reused = inspect_written(order, pages, parent, child)?;
    ensure!(
        reused == folios,
        "order {order}: the child reused {reused} original frames, want one per folio"
    );
    c.set_phase(RECHECK);
    c.wait_states(DONE, DONE, 120, "final check")?;
    Ok((r.ptes, r.batches, r.tlb_flushes))
}

/// The region's size in MiB: `fork_mib=N` on the kernel command line (N even, 2 to
/// [`MAX_MIB`]), [`MAX_MIB`] without it.
///
/// `cargo xtask` asks for a smaller region under kvm_pvm, which emulates every ring-0
/// instruction: a COW fault costs milliseconds there, and 64 MiB written by both sides is
/// 32,768 of them per layout.
pub fn region_mib() -> Result<u64, checks::Failure> {
    let Some(arg) = crate::kmain::boot_arg("fork_mib") else {
        return Ok(MAX_MIB);
    };
    match arg.parse::<u64>() {
        Ok(mib) if mib % 2 == 0 && (2..=MAX_MIB).contains(&mib) => Ok(mib),
        _ => fail!("fork_mib={arg}: want an even number of MiB from 2 to {MAX_MIB}"),
    }
}

/// Both layouts (64 KiB, then 2 MiB folios) over `mib` MiB (see [`region_mib`]), with the
/// per-batch trace events off; prints what each did and returns them.
pub fn both(mib: u64) -> Result<[Layout; 2], checks::Failure> {
    ptbatch::set_quiet(true);
    let small = run(4, mib);
    let large = small.is_ok().then(|| run(9, mib));
    ptbatch::set_quiet(false);
    let layouts = [small?, large.unwrap_or_else(|| Ok(Layout::default()))?];
    for l in &layouts {
        let kib = 4u64 << l.order;
        let (ptes, batches, flushes) = l.copy;
        crate::println!(
            "  {} MiB of {kib} KiB folios: fork {ptes} PTEs in {batches} batches, {flushes} \
             parent TLB flushes; COW {} copies + {} reuses; teardown {} PTEs in {} batches, {} \
             flushes; every page private to its writer, all frames returned",
            l.mib,
            l.cow.0,
            l.cow.1,
            l.zap.0,
            l.zap.1,
            l.zap.2
        );
        for (m, name) in l.measured.iter().zip(["batched", "per-PTE"]) {
            crate::println!(
                "    scratch copy, {name}: {} PTEs; {} entries read, {} written; {} backend \
                 calls; {} folio lookups, {} ref/rmap updates; {} TLB flushes; {}",
                m.ptes,
                m.reads,
                m.writes,
                m.calls,
                m.lookups,
                m.updates,
                m.flushes,
                Insns(m.insns, m.ptes)
            );
        }
        crate::trace!(
            "fork",
            "{} MiB of {kib} KiB folios: fork {ptes} PTEs/{batches} batches, COW {} copies + {} \
             reuses, zap {} PTEs/{} batches",
            l.mib,
            l.cow.0,
            l.cow.1,
            l.zap.0,
            l.zap.1
        );
    }
    Ok(layouts)
}

/// An instruction count per PTE, or why there is none.
pub struct Insns(pub Option<u64>, pub u64);

impl core::fmt::Display for Insns {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(n) => write!(
                f,
                "{n} instructions ({}.{} per PTE; TCG -icount)",
                n / self.1.max(1),
                n * 10 / self.1.max(1) % 10
            ),
            None => f.write_str("no instruction count (the TSC does not count instructions here)"),
        }
    }
}

/// The layout's figures for the closing table: folio size, batches, ref/rmap updates and
/// (under `-icount`) instructions per PTE, batched/per-PTE.
pub struct Figure<'a>(pub &'a Layout);

impl core::fmt::Display for Figure<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let l = self.0;
        let [b, p] = &l.measured;
        let size = if l.order >= 8 {
            (2, "M")
        } else {
            (4 << l.order, "K")
        };
        write!(
            f,
            "{}{} {} batches, {}/{} upd",
            size.0, size.1, l.copy.1, b.updates, p.updates
        )?;
        if let (Some(bi), Some(pi)) = (b.insns, p.insns) {
            let per = |n: u64, m: &Measured| n / m.ptes.max(1);
            write!(f, ", {}/{} insn/PTE", per(bi, b), per(pi, p))?;
        }
        Ok(())
    }
}
