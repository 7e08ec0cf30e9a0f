//! The `fork` step: a ring-3 task whose space is backed by large folios of order 9, 4, 2 and 0
//! forks with `oskit-pte-batch` on the real page tables; parent and child then write every
//! page from ring 3 (the #PF handler breaks COW); each checks it sees its own data and the
//! other's writes never reach it; the kernel inspects both spaces (entries, frames, data,
//! reference and map counts, resident counts) after the fork and the parent's writes, and
//! after the child's; both exit and the batched zap tears the spaces down; every frame comes
//! back with no reference or map left.
//!
//! A second set of folios of the same orders is only read after the fork, so it stays shared
//! copy-on-write until the end: the teardown zaps those in batches (once written, every page
//! sits on its own order-0 copy, and a zap of those is one page per batch).
//!
//! A stale writable translation in the parent after the fork (a missing TLB flush) shows as
//! parent writes the child sees, but only if nothing reloads CR3 between the fork and those
//! writes: a timer tick that preempts the parent there (about half the time under TCG) hides
//! it. So the step ends with a probe: rounds of a small fork (one order-4 folio) whose parent
//! writes right after `fork()` returns and whose child then checks it still sees the old data;
//! a missing flush fails a round unless every round is preempted at that point.
//!
//! Then the same at scale ([`super::fork_scale`]): 64 MiB of 64 KiB folios and 64 MiB of 2 MiB
//! folios, forked and written by both sides, with the copy's work batched and per PTE
//! ([`super::fork_measure`]).
//!
//! Ring 3 and the kernel talk through a control page ([`super::fork_control`]): the tasks
//! report their progress in it and wait for the kernel's go-ahead, so the kernel can look at
//! both spaces between the steps. The `u_*` functions run in ring 3 (see
//! [`crate::task::ulib`]).

use core::sync::atomic::Ordering;

use crate::{
    arch::apic,
    checks::sched::wait_for,
    checks::{self, Outcome},
    ensure, fail,
    mm::framemeta,
    mm::frames,
    mm::ptbatch,
    mm::vm::{self, PTE_FIXED, PTE_P, PTE_W},
    println,
    spin::SpinLock,
    steps::fork_control::{
        CHILD, CONTROL, Control, FIRST_FREE, PARENT, ctl_get, ctl_set, u_aborted, u_state,
        u_wait_phase,
    },
    task::sched,
    task::ulib,
    task::usermode::{self, DATA_START},
};

const PAGE: u64 = 4096;
const WORDS: u64 = PAGE / 8;
/// The folios, mapped back to back from [`FOLIO_BASE`]: the order-9 one fills a whole page
/// table (2 MiB aligned), the others share the next one.
const ORDERS: [u32; 4] = [9, 4, 2, 0];
const FOLIOS: usize = ORDERS.len();
const PAGES: u64 = 512 + 16 + 4 + 1;
const FOLIO_BASE: u64 = DATA_START + (4 << 20);
/// The second set (same layout), only read after the fork.
const KEPT_BASE: u64 = DATA_START + (12 << 20);
const BASES: [u64; 2] = [FOLIO_BASE, KEPT_BASE];
/// This step's control words (beside each side's state and the phase): the child's pid, the
/// round the probe's parent has written, and the probe's result.
const CHILD_PID: u64 = FIRST_FREE;
const PROBE_WRITTEN: u64 = FIRST_FREE + 1;
const PROBE_RESULT: u64 = FIRST_FREE + 2;
/// Phases the kernel lets the tasks into (the parent writes right after the fork): the child
/// checks it still sees the parent's pre-fork data, then writes; both check their data again,
/// then exit.
const CHILD_WRITES: u64 = 1;
const RECHECK: u64 = 2;
/// States: the child saw the pre-fork data after the fork / it still saw it after the
/// parent's writes / each wrote and saw its own data / both saw it again at the end. Negative
/// values (as `i64`) are the failing step.
const FORKED: i64 = 1;
const SAW_OLD: i64 = 2;
const WROTE: i64 = 3;
const DONE: i64 = 4;

/// Tags of the data: parent before the fork, parent after it, child.
const TAG_PARENT_OLD: u64 = 0xa1;
const TAG_PARENT_NEW: u64 = 0xc3;
const TAG_CHILD: u64 = 0xb2;
/// Data of the second set (never rewritten).
const TAG_KEPT: u64 = 0xd4;

/// The word `w` of folio page `page` with data `tag`.
const fn pattern(tag: u64, page: u64, w: u64) -> u64 {
    (tag << 56) ^ (page << 24) ^ w.wrapping_mul(0x9e37_79b9)
}

/// Writes `tag`'s data into every word of the first `pages` pages of the set at `set`
/// (ring 3), from the first page up, or from the last page down.
fn u_fill_n(set: u64, pages: u64, tag: u64, down: bool) {
    for i in 0..pages {
        let page = if down { pages - 1 - i } else { i };
        let base = (set + page * PAGE) as *mut u64;
        for w in 0..WORDS {
            // SAFETY: inside this task's folio regions.
            unsafe { base.add(w as usize).write_volatile(pattern(tag, page, w)) };
        }
    }
}

/// [`u_fill_n`] of every page of the set.
fn u_fill(set: u64, tag: u64, down: bool) {
    u_fill_n(set, PAGES, tag, down);
}

/// Whether every word of every page of the set at `set` holds `tag`'s data (ring 3).
fn u_holds(set: u64, tag: u64) -> bool {
    u_holds_n(set, PAGES, tag)
}

/// Whether every word of the first `pages` pages of the set at `set` holds `tag`'s data.
fn u_holds_n(set: u64, pages: u64, tag: u64) -> bool {
    for page in 0..pages {
        let base = (set + page * PAGE) as *const u64;
        for w in 0..WORDS {
            // SAFETY: inside this task's folio regions.
            if unsafe { base.add(w as usize).read_volatile() } != pattern(tag, page, w) {
                return false;
            }
        }
    }
    true
}

/// Whether the written set holds `tag`'s data and the kept set its own.
fn u_sees(tag: u64) -> bool {
    u_holds(FOLIO_BASE, tag) && u_holds(KEPT_BASE, TAG_KEPT)
}

fn u_child() -> ! {
    if !u_state(CHILD, u_sees(TAG_PARENT_OLD), FORKED) || !u_wait_phase(CHILD_WRITES) {
        ulib::exit(1);
    }
    // The parent has written everything by now: none of it may show here.
    if !u_state(CHILD, u_sees(TAG_PARENT_OLD), SAW_OLD) {
        ulib::exit(2);
    }
    u_fill(FOLIO_BASE, TAG_CHILD, false);
    if !u_state(CHILD, u_sees(TAG_CHILD), WROTE) || !u_wait_phase(RECHECK) {
        ulib::exit(3);
    }
    ulib::exit(if u_state(CHILD, u_sees(TAG_CHILD), DONE) {
        0
    } else {
        4
    })
}

fn u_fork_parent(_: u64) -> i64 {
    u_fill(KEPT_BASE, TAG_KEPT, false);
    // Last, so its writable translations are the freshest in this CPU's TLB at the fork.
    u_fill(FOLIO_BASE, TAG_PARENT_OLD, false);
    let pid = ulib::fork();
    if pid < 0 {
        return -100;
    }
    if pid == 0 {
        u_child();
    }
    // Straight away, with no system call or yield in between (a CR3 reload would hide a
    // missing flush), and from the last page down, the translations used last (a TLB that
    // evicts by address would lose them all to an ascending sweep): a write through a
    // translation the fork left writable would land in the frame the child shares, and the
    // child would see it.
    u_fill(FOLIO_BASE, TAG_PARENT_NEW, true);
    ctl_set(CHILD_PID, pid as u64);
    let mut ok = u_state(PARENT, u_sees(TAG_PARENT_NEW), WROTE) && u_wait_phase(RECHECK);
    // The child has written everything by now: none of it may show here.
    ok = ok && u_state(PARENT, u_sees(TAG_PARENT_NEW), DONE);
    let child = ulib::wait(pid as u64);
    match (ok, child) {
        (true, 0) => 42,
        (false, _) => 20,
        (true, c) => 10 + c,
    }
}

/// Rounds of the TLB probe, and its folio.
const PROBE_ROUNDS: u64 = 8;
const PROBE_ORDER: u32 = 4;
const PROBE_PAGES: u64 = 1 << PROBE_ORDER;

/// The TLB probe (ring 3): each round fills the folio (warming writable translations), forks,
/// and overwrites it at once from the last page down; the child, once the parent is done,
/// must still see the old data. Writes its result into the control page.
fn u_tlb_probe(_: u64) -> i64 {
    let result = u_probe_rounds();
    ctl_set(PROBE_RESULT, result as u64);
    result
}

fn u_probe_rounds() -> i64 {
    for round in 0..PROBE_ROUNDS {
        let (old, new) = (0x10 + round, 0x20 + round);
        u_fill_n(FOLIO_BASE, PROBE_PAGES, old, false);
        let pid = ulib::fork();
        if pid < 0 {
            return -100;
        }
        if pid == 0 {
            while ctl_get(PROBE_WRITTEN) != round + 1 {
                if u_aborted() {
                    ulib::exit(9);
                }
                ulib::yield_now();
            }
            ulib::exit(i64::from(!u_holds_n(FOLIO_BASE, PROBE_PAGES, old)));
        }
        u_fill_n(FOLIO_BASE, PROBE_PAGES, new, true);
        ctl_set(PROBE_WRITTEN, round + 1);
        if !u_holds_n(FOLIO_BASE, PROBE_PAGES, new) {
            return 200 + round as i64;
        }
        let child = ulib::wait(pid as u64);
        if child != 0 {
            return 100 * child + round as i64;
        }
    }
    42
}

/// The folio heads of each set (written, kept), in [`ORDERS`] order.
type Heads = [[u64; FOLIOS]; 2];

/// Snapshot entries: both spaces' frames for every page of both sets.
const SNAP: usize = 4 * PAGES as usize;

/// Frames of both spaces' pages of both sets, taken by the last inspection: entry
/// `2 * (set * PAGES + page) + side` (side 0: parent, 1: child). [`check_counts`] sorts it;
/// each inspection writes every entry again first.
static SNAP_FRAME: SpinLock<[u64; SNAP]> = SpinLock::new([0; SNAP]);

fn snap(set: usize, page: u64, side: usize, frame: u64) {
    SNAP_FRAME.lock()[2 * (set * PAGES as usize + page as usize) + side] = frame;
}

/// The mapping of page `page` of the set at `base` in `space`: (frame, entry).
fn mapping(space: vm::SpaceId, base: u64, page: u64) -> (u64, u64) {
    let pte = vm::pte(space, base + page * PAGE);
    (pte & vm::PTE_ADDR, pte)
}

/// Whether the frame holds `tag`'s data for set page `page` (read through the identity map):
/// its first, middle and last words, each of which names the tag and the page. The tasks
/// check every word of every page through their own mappings (ring 3, native speed); the
/// kernel's part is which frame each entry points at, and three words settle that: reading
/// all 512 in ring 0 took 8 s per inspection under kvm_pvm, which emulates ring 0.
fn frame_holds(frame: u64, tag: u64, page: u64) -> bool {
    [0, WORDS / 2, WORDS - 1].into_iter().all(|w| {
        // SAFETY: `frame` is mapped by a live space of this check (so allocated),
        // identity-mapped; the tasks do not write these pages while the kernel inspects them.
        unsafe { ((frame + w * 8) as *const u64).read_volatile() == pattern(tag, page, w) }
    })
}

/// Page `page` of a set: (folio index, page in the folio).
fn folio_of(page: u64) -> (usize, u64) {
    let mut first = 0;
    for (k, order) in ORDERS.into_iter().enumerate() {
        if page < first + (1 << order) {
            return (k, page - first);
        }
        first += 1 << order;
    }
    (FOLIOS, 0)
}

/// Exact reference and map counts of every folio behind the snapshot: a folio's reference
/// count is the number of PTEs (of both spaces) mapping its pages, each page's map count the
/// PTEs mapping it (so refcount >= mapcount), the folio's map total their sum, and no other
/// space maps them. Returns the number of distinct folios.
///
/// Sorted, the snapshot holds each folio's frames side by side (a folio is an aligned block),
/// so the check is one pass over it and over each folio's pages: it runs in ring 0 with the
/// snapshot locked (interrupts off), which kvm_pvm emulates instruction by instruction.
fn check_counts(what: &str) -> Result<u64, checks::Failure> {
    let mut snap = SNAP_FRAME.lock();
    snap.sort_unstable();
    let mut folios = 0;
    let mut rest = &snap[..];
    while let Some(&first) = rest.first() {
        let head = framemeta::folio_head(first);
        let meta = framemeta::get(head);
        let order = meta.order.load(Ordering::Relaxed);
        let end = head + (PAGE << order);
        let ptes = rest.iter().take_while(|&&f| f < end).count();
        let (mine, next) = rest.split_at(ptes);
        rest = next;
        folios += 1;
        let refs = u64::from(meta.refcount.load(Ordering::Relaxed));
        let total = u64::from(meta.folio_maps.load(Ordering::Relaxed));
        let ptes = ptes as u64;
        let mut maps = 0;
        let mut at = mine;
        for p in 0..1u64 << order {
            let f = head + p * PAGE;
            let m = u64::from(framemeta::get(f).mapcount.load(Ordering::Relaxed));
            let want = at.iter().take_while(|&&g| g == f).count();
            at = &at[want..];
            ensure!(
                m == want as u64,
                "{what}: frame {f:#x} has map count {m}, {want} PTEs map it"
            );
            ensure!(
                refs >= m,
                "{what}: folio {head:#x}: {refs} refs < map count {m} of {f:#x}"
            );
            maps += m;
        }
        ensure!(
            refs == ptes && maps == ptes && total == maps,
            "{what}: order-{order} folio {head:#x}: {refs} refs, {maps} maps ({total} on the \
             head), {ptes} PTEs"
        );
    }
    Ok(folios)
}

/// The space's resident count equals the owned pages its tables map.
fn check_rss(space: vm::SpaceId, who: &str) -> Outcome {
    let (rss, mapped) = (vm::rss(space), vm::resident_pages(space));
    ensure!(
        rss == mapped as i64,
        "{who}: resident count {rss}, {mapped} owned pages mapped"
    );
    Ok(())
}

/// Both spaces map page `page` of set `set` to its original frame, read-only, with `tag`'s
/// data (still shared copy-on-write).
fn check_shared(
    parent: vm::SpaceId,
    child: vm::SpaceId,
    heads: &Heads,
    set: usize,
    page: u64,
    tag: u64,
) -> Outcome {
    let (k, j) = folio_of(page);
    let original = heads[set][k] + j * PAGE;
    for (side, space) in [parent, child].into_iter().enumerate() {
        let (frame, pte) = mapping(space, BASES[set], page);
        ensure!(
            pte & PTE_P != 0 && pte & (PTE_W | PTE_FIXED) == 0 && frame == original,
            "set {set} page {page} of space {side}: entry {pte:#x}, want {original:#x} read-only"
        );
        snap(set, page, side, frame);
    }
    ensure!(
        frame_holds(original, tag, page),
        "frame {original:#x} (set {set} page {page}) lost its data"
    );
    Ok(())
}

/// After the fork and the parent's writes: the parent's written pages are private and
/// writable, on new frames, with its new data; the child still maps the original frames
/// read-only, with the pre-fork data; the kept set is shared by both (two references per page,
/// two maps per page); the resident counts match the tables and each other.
fn inspect_forked(parent: vm::SpaceId, child: vm::SpaceId, heads: &Heads) -> Outcome {
    for page in 0..PAGES {
        let (k, j) = folio_of(page);
        let original = heads[0][k] + j * PAGE;
        let (pf, pp) = mapping(parent, FOLIO_BASE, page);
        let (cf, cp) = mapping(child, FOLIO_BASE, page);
        ensure!(
            pp & (PTE_P | PTE_W) == PTE_P | PTE_W && pf != original,
            "after the parent's writes: its page {page} is {pp:#x}, not a writable copy"
        );
        ensure!(
            cp & (PTE_P | PTE_W) == PTE_P && cf == original,
            "after the parent's writes: the child's page {page} is {cp:#x}, want {original:#x} \
             read-only"
        );
        ensure!(
            frame_holds(pf, TAG_PARENT_NEW, page) && frame_holds(cf, TAG_PARENT_OLD, page),
            "after the parent's writes: page {page}: its ({pf:#x}) or the child's ({cf:#x}) \
             data is wrong"
        );
        snap(0, page, 0, pf);
        snap(0, page, 1, cf);
        check_shared(parent, child, heads, 1, page, TAG_KEPT)?;
    }
    let folios = check_counts("after fork")?;
    // The parent's copies (order 0), the original folios (the child's), the kept set's.
    let want = PAGES + 2 * FOLIOS as u64;
    ensure!(
        folios == want,
        "after the parent's writes: {folios} folios behind the PTEs, want {want}"
    );
    check_rss(parent, "parent")?;
    check_rss(child, "child")?;
    ensure!(
        vm::rss(parent) == vm::rss(child),
        "the child's resident count {} differs from the parent's {}",
        vm::rss(child),
        vm::rss(parent)
    );
    Ok(())
}

/// After both wrote: every written page is private and writable on each side, with its own
/// data; the only original frames left there are each large folio's last page in the child
/// (the parent wrote first and copied everything; the COW fault that finds a folio's last
/// reference reuses it). The kept set is still shared. Counts are exact again.
fn inspect_written(parent: vm::SpaceId, child: vm::SpaceId, heads: &Heads) -> Outcome {
    let mut kept = 0;
    for page in 0..PAGES {
        let (k, j) = folio_of(page);
        let original = heads[0][k] + j * PAGE;
        let (pf, pp) = mapping(parent, FOLIO_BASE, page);
        let (cf, cp) = mapping(child, FOLIO_BASE, page);
        ensure!(
            pp & cp & (PTE_P | PTE_W) == PTE_P | PTE_W && pf != cf,
            "after writes: page {page}: parent {pp:#x}, child {cp:#x}: not private + writable"
        );
        ensure!(
            frame_holds(pf, TAG_PARENT_NEW, page) && frame_holds(cf, TAG_CHILD, page),
            "after writes: page {page}: the parent's ({pf:#x}) or child's ({cf:#x}) data is wrong"
        );
        ensure!(
            pf != original,
            "the parent kept original frame {original:#x}"
        );
        if cf == original {
            kept += 1;
            ensure!(
                j + 1 == 1 << ORDERS[k],
                "the child reused page {j} of an order-{} folio, not its last",
                ORDERS[k]
            );
        }
        snap(0, page, 0, pf);
        snap(0, page, 1, cf);
        check_shared(parent, child, heads, 1, page, TAG_KEPT)?;
    }
    ensure!(
        kept == FOLIOS,
        "{kept} original frames reused, want one per folio"
    );
    let folios = check_counts("after writes")?;
    // Each written page on its own order-0 folio, but the reused ones on the originals; the
    // kept set's folios as they were.
    let want = 2 * PAGES + FOLIOS as u64;
    ensure!(
        folios == want,
        "after writes: {folios} folios behind the PTEs, want {want}"
    );
    check_rss(parent, "parent")?;
    check_rss(child, "child")
}

/// After teardown: no frame of the snapshot (the kept set's included) is referenced or
/// mapped any more.
fn inspect_freed() -> Outcome {
    for &f in SNAP_FRAME.lock().iter() {
        let meta = framemeta::get(f);
        let head = framemeta::get(framemeta::folio_head(f));
        let (refs, maps) = (
            head.refcount.load(Ordering::Relaxed),
            meta.mapcount.load(Ordering::Relaxed),
        );
        ensure!(
            refs == 0 && maps == 0,
            "after teardown: frame {f:#x}: {refs} refs, {maps} maps"
        );
    }
    Ok(())
}

/// The counters the check reports, read before and after.
fn counters() -> [u64; 13] {
    [
        &vm::PTES_COPIED,
        &vm::FORK_BATCHES,
        &vm::FORK_TLB_FLUSHES,
        &ptbatch::TLB_FLUSHES_ISSUED,
        &ptbatch::INVLPG_PAGES,
        &ptbatch::CR3_RELOADS,
        &vm::COW_COPIES,
        &vm::COW_REUSES,
        &vm::ZAP_PTES,
        &vm::ZAP_BATCHES,
        &vm::ZAP_TLB_FLUSHES,
        &ptbatch::SET_PTES_CALLS,
        &vm::RSS_MISMATCHES,
    ]
    .map(|c| c.load(Ordering::Relaxed))
}

/// Maps both sets of folios and the control page into the parent's new space.
fn map_sets(space: vm::SpaceId, heads: &mut Heads, control: u64) -> Result<(), vm::VmError> {
    for (set, base) in BASES.into_iter().enumerate() {
        let mut at = base;
        for (k, order) in ORDERS.into_iter().enumerate() {
            let head = framemeta::alloc_folio(order).ok_or(vm::VmError::NoMemory)?;
            if let Err(e) = vm::map_folio(space, at, head, order, true) {
                framemeta::put_folio(head);
                return Err(e);
            }
            heads[set][k] = head;
            at += PAGE << order;
        }
    }
    vm::map_fixed(space, CONTROL, control, PAGE, true)
}

/// The `fork` check.
pub fn fork() -> Outcome {
    let free = frames::free_count();
    let violations = framemeta::violations();
    let Some(control) = frames::alloc(0) else {
        fail!("no frame for the control page")
    };
    // SAFETY: a frame we just allocated, identity-mapped.
    unsafe { core::ptr::write_bytes(control as *mut u8, 0, PAGE as usize) };
    let c = Control(control);
    let before = counters();
    let mut heads = [[0u64; FOLIOS]; 2];
    let mut parent = None;
    let task = usermode::spawn_with("fork-parent", u_fork_parent, 0, |space| {
        parent = Some(space);
        map_sets(space, &mut heads, control)
    });
    let (Ok(task), Some(parent)) = (task, parent) else {
        frames::free(control, 0);
        fail!("cannot start the forking task: {:?}", task.err())
    };
    crate::trace!(
        "fork",
        "parent mapped order 9, 4, 2, 0 folios at {FOLIO_BASE:#x} {:#x?} and {KEPT_BASE:#x} {:#x?}",
        heads[0],
        heads[1]
    );
    let phases = run_phases(&c, parent, &heads);
    if phases.is_err() {
        c.abort();
    }
    let code = sched::join(task);
    // The child exits on its own (the parent waits for it unless it died): wait until every
    // frame but the control page is back before going on.
    let returned = wait_for(|| frames::free_count() + 1 == free);
    let after = counters();
    let probe = if phases.is_ok() && code == Some(42) && returned {
        tlb_probe(&c, control)
    } else {
        Ok(())
    };
    // Free the control page only when no space can map it any more.
    if frames::free_count() + 1 == free {
        frames::free(control, 0);
    }
    phases?;
    ensure!(
        code == Some(42),
        "the parent ended with {code:?} (10+N: the child exited with N, 20: the parent saw \
         wrong data, -100: fork failed)"
    );
    ensure!(
        returned,
        "{} frames not returned after both exited",
        free as i64 - frames::free_count() as i64 - 1
    );
    inspect_freed()?;
    let d: [u64; 13] = core::array::from_fn(|i| after[i] - before[i]);
    let [
        ptes,
        batches,
        flushes,
        issued,
        invlpg,
        cr3,
        copies,
        reuses,
        zapped,
        zap_batches,
        zap_flushes,
        set_ptes,
        rss_bad,
    ] = d;
    let bad = framemeta::violations() - violations;
    ensure!(
        bad == 0,
        "{bad} refcount < mapcount violations in the folio metadata"
    );
    ensure!(
        rss_bad == 0,
        "{rss_bad} spaces torn down with a resident count left over"
    );
    ensure!(
        set_ptes == batches,
        "the crate counted {batches} batches, the page tables saw {set_ptes} set_ptes"
    );
    // Everything zapped is a batch of one but the kept set's folios: one batch each, in each
    // space.
    let merged = 2 * (PAGES - FOLIOS as u64);
    ensure!(
        zapped >= 4 * PAGES && zapped - zap_batches == merged,
        "teardown zapped {zapped} PTEs in {zap_batches} batches: want {merged} PTEs merged \
         into the kept folios' batches"
    );
    ensure!(
        frames::free_count() == free,
        "frames: {} now, {free} before",
        frames::free_count()
    );
    println!(
        "  fork: {ptes} PTEs in {batches} batches, {flushes} parent TLB flushes ({issued} \
         issued: {invlpg} INVLPG pages, {cr3} CR3 reloads)"
    );
    println!(
        "  COW: {copies} copies, {reuses} reuses; teardown: {zapped} PTEs in {zap_batches} \
         batches, {zap_flushes} TLB flushes; all frames returned"
    );
    probe?;
    println!("  TLB probe: {PROBE_ROUNDS} forks, no parent write reached a child");
    let mib = super::fork_scale::region_mib()?;
    let [small, large] = super::fork_scale::both(mib)?;
    crate::trace!(
        "fork",
        "done: fork {ptes} PTEs/{batches} batches/{flushes} TLB flushes, COW {copies} copies + \
         {reuses} reuses, zap {zapped} PTEs/{zap_batches} batches/{zap_flushes} TLB flushes"
    );
    checks::figures(format_args!(
        "fork {ptes}/{batches} batches; COW {copies}+{reuses}; {mib} MiB batched/per-PTE: \
         {}; {}",
        super::fork_scale::Figure(&small),
        super::fork_scale::Figure(&large)
    ));
    Ok(())
}

/// Polls `done` a tick at a time for up to a minute.
fn poll(mut done: impl FnMut() -> bool) -> bool {
    let deadline = apic::now_us() + 60_000_000;
    while !done() {
        if apic::now_us() > deadline {
            return false;
        }
        sched::sleep_ticks(1);
    }
    true
}

/// Runs the TLB probe in a task of its own (one order-4 folio and the control page); every
/// frame it used comes back.
fn tlb_probe(c: &Control, control: u64) -> Outcome {
    let free = frames::free_count();
    let task = usermode::spawn_with("tlb-probe", u_tlb_probe, 0, |space| {
        let head = framemeta::alloc_folio(PROBE_ORDER).ok_or(vm::VmError::NoMemory)?;
        if let Err(e) = vm::map_folio(space, FOLIO_BASE, head, PROBE_ORDER, true) {
            framemeta::put_folio(head);
            return Err(e);
        }
        vm::map_fixed(space, CONTROL, control, PAGE, true)
    });
    let Ok(task) = task else {
        fail!("cannot start the TLB probe: {:?}", task.err())
    };
    let finished = poll(|| c.word(PROBE_RESULT).load(Ordering::Acquire) != 0);
    if !finished {
        c.abort();
    }
    let code = sched::join(task);
    let returned = poll(|| frames::free_count() == free);
    crate::trace!(
        "fork",
        "TLB probe: {PROBE_ROUNDS} rounds, exit code {code:?}"
    );
    ensure!(finished, "the TLB probe timed out");
    ensure!(
        code == Some(42),
        "TLB probe ended with {code:?} (100 + round: that round's child saw its parent's \
         post-fork writes, a writable translation survived the fork)"
    );
    ensure!(
        returned,
        "the TLB probe left {} frames behind",
        free as i64 - frames::free_count() as i64
    );
    Ok(())
}

/// Drives the tasks through the phases, inspecting both spaces in between.
fn run_phases(c: &Control, parent: vm::SpaceId, heads: &Heads) -> Outcome {
    c.wait_states(WROTE, FORKED, 60, "fork and the parent's writes")?;
    let Some((child, copied)) = vm::forked_child(parent) else {
        fail!("no (single) space forked from the parent's")
    };
    crate::trace!(
        "fork",
        "forked: child pid {:#x}",
        c.word(CHILD_PID).load(Ordering::Relaxed)
    );
    // Each folio region was copied in one batch, with one flush of the parent's range.
    for base in BASES {
        let mut at = base;
        for order in ORDERS {
            let pages = 1u64 << order;
            let Some(r) = copied.iter().flatten().find(|r| r.start == at) else {
                fail!("no fork report for the order-{order} folio at {at:#x}")
            };
            ensure!(
                r.ptes == pages && r.batches == 1 && r.tlb_flushes == 1,
                "order-{order} folio at {at:#x}: {} PTEs in {} batches, {} TLB flushes (want \
                 {pages}, 1, 1)",
                r.ptes,
                r.batches,
                r.tlb_flushes
            );
            at += PAGE * pages;
        }
    }
    inspect_forked(parent, child, heads)?;
    c.set_phase(CHILD_WRITES);
    c.wait_states(WROTE, WROTE, 60, "child's writes")?;
    inspect_written(parent, child, heads)?;
    crate::trace!(
        "fork",
        "both spaces private, kept set shared: data, counts and resident pages exact"
    );
    c.set_phase(RECHECK);
    c.wait_states(DONE, DONE, 60, "final check")
}
