//! Checks of user mode: system calls from ring 3, isolation of kernel memory, demand paging,
//! fork with copy-on-write, and that every frame comes back.
//!
//! The `u_*` functions run in ring 3 (see [`crate::task::ulib`] for what they may touch).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::{
    arch::apic,
    arch::syscall,
    arch::trap::{Handled, TrapFrame},
    checks::Outcome,
    ensure, fail,
    mm::fault,
    mm::framemeta,
    mm::frames,
    mm::vm,
    println,
    task::sched::{self, EXIT_KILLED},
    task::ulib,
    task::usermode::{self, DATA_START},
};

const PAGE: u64 = 4096;

fn u_hello(_: u64) -> i64 {
    ulib::write("  hello from ring 3\n");
    let pid = ulib::getpid();
    ulib::yield_now();
    // Reserved and unknown numbers answer -ENOSYS; a wait for a task that is not our child
    // answers -ECHILD (10).
    if ulib::syscall3(syscall::nr::MAP_TRACE_BUFFER, 0, 0, 0) != -syscall::ENOSYS
        || ulib::syscall3(syscall::nr::GET_READER, 0, 0, 0) != -syscall::ENOSYS
        || ulib::syscall3(1000, 0, 0, 0) != -syscall::ENOSYS
        || ulib::wait(pid) != -10
        || ulib::write_raw(0x10, 8) != -14
    {
        return -1;
    }
    ((pid as i64) << 4) | ulib::privilege_level() as i64
}

/// A ring-3 task makes system calls (write, getpid, yield, exit) and runs at privilege level 3.
pub fn syscalls() -> Outcome {
    let before = syscall::COUNT.load(Ordering::Relaxed);
    let Ok(task) = usermode::spawn("hello", u_hello, 0) else {
        fail!("cannot start the user task")
    };
    let code = sched::join(task);
    let calls = syscall::COUNT.load(Ordering::Relaxed) - before;
    ensure!(
        code == Some(((task.pid() as i64) << 4) | 3),
        "exit code {code:?}: want pid {:#x} and privilege level 3 (-1: a bad call was served)",
        task.pid()
    );
    ensure!(calls >= 9, "only {calls} system calls were served");
    println!("  pid {:#x}: {calls} system calls", task.pid());
    Ok(())
}

/// Kernel data a user task tries to overwrite.
static CANARY: AtomicU64 = AtomicU64::new(0x5afe);

fn u_poke(addr: u64) -> i64 {
    // SAFETY: deliberately writes where ring 3 must not: the write faults and kills the task.
    unsafe { core::ptr::write_volatile(addr as *mut u64, 0xbad) };
    0
}

fn u_privileged(_: u64) -> i64 {
    // SAFETY: deliberately privileged: CLI in ring 3 raises #GP, which kills the task.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
    0
}

fn u_peek(addr: u64) -> i64 {
    // SAFETY: deliberately reads where ring 3 must not: the read faults and kills the task.
    unsafe { core::ptr::read_volatile(addr as *const u64) as i64 }
}

/// Ring 3 cannot write kernel data, write kernel code, read kernel data, touch an unmapped user
/// address, or run a privileged instruction: each attempt kills only that task, and the kernel
/// (and its data) carry on.
pub fn isolation() -> Outcome {
    let free = frames::free_count();
    type Attempt = (&'static str, fn(u64) -> i64, u64);
    let attempts: [Attempt; 5] = [
        ("write kernel data", u_poke, &raw const CANARY as u64),
        (
            "write kernel code",
            u_poke,
            u_poke as *const () as usize as u64,
        ),
        ("read kernel data", u_peek, &raw const CANARY as u64),
        (
            "write unmapped",
            u_poke,
            DATA_START + usermode::DATA_SIZE + PAGE,
        ),
        ("run CLI", u_privileged, 0),
    ];
    for (what, entry, addr) in attempts {
        let Ok(task) = usermode::spawn("intruder", entry, addr) else {
            fail!("cannot start the user task")
        };
        let code = sched::join(task);
        ensure!(
            code == Some(EXIT_KILLED),
            "{what} at {addr:#x}: the task ended with {code:?}, not killed"
        );
    }
    ensure!(
        CANARY.load(Ordering::Relaxed) == 0x5afe,
        "kernel data changed to {:#x}",
        CANARY.load(Ordering::Relaxed)
    );
    ensure!(
        frames::free_count() == free,
        "killed tasks leaked {} frames",
        free as i64 - frames::free_count() as i64
    );
    Ok(())
}

const TOUCHED: u64 = 16;

fn u_touch(pages: u64) -> i64 {
    let mut sum = 0i64;
    for i in 0..pages {
        let p = (DATA_START + i * PAGE) as *mut u64;
        // SAFETY: inside this task's anonymous data region.
        unsafe {
            if p.read_volatile() != 0 {
                return -1; // a fresh page must read as zero
            }
            p.write_volatile(i * 3 + 1);
        }
    }
    for i in 0..pages {
        // SAFETY: as above.
        sum += unsafe { ((DATA_START + i * PAGE) as *const u64).read_volatile() } as i64;
    }
    sum
}

/// Untouched user pages are filled (with zeroes) on first touch, and every frame returns when
/// the task exits.
pub fn demand_paging() -> Outcome {
    let free = frames::free_count();
    let faults = vm::DEMAND_FAULTS.load(Ordering::Relaxed);
    let Ok(task) = usermode::spawn("toucher", u_touch, TOUCHED) else {
        fail!("cannot start the user task")
    };
    let code = sched::join(task);
    let want: i64 = (0..TOUCHED as i64).map(|i| i * 3 + 1).sum();
    ensure!(
        code == Some(want),
        "the task saw {code:?}, not {want} (-1: a fresh page was not zero)"
    );
    let faults = vm::DEMAND_FAULTS.load(Ordering::Relaxed) - faults;
    ensure!(
        faults > TOUCHED,
        "{faults} demand faults for {TOUCHED} data pages and a stack"
    );
    ensure!(
        frames::free_count() == free,
        "{} frames not returned",
        free as i64 - frames::free_count() as i64
    );
    println!("  {faults} demand faults, all frames returned");
    Ok(())
}

const FORKED: u64 = 8;
/// Where the fork check maps its large folios: orders 4, 2 and 0, back to back.
const FOLIO_START: u64 = DATA_START + (2 << 20);
const FOLIO_ORDERS: [u32; 3] = [4, 2, 0];
const FOLIO_PAGES: u64 = 16 + 4 + 1;
const SHARED_PAGES: u64 = FORKED + FOLIO_PAGES;

/// The word at the start of shared page `i`: anonymous data pages, then the folios' pages.
fn page_word(i: u64) -> *mut u64 {
    if i < FORKED {
        (DATA_START + i * PAGE) as *mut u64
    } else {
        (FOLIO_START + (i - FORKED) * PAGE) as *mut u64
    }
}

fn u_fork(_: u64) -> i64 {
    for i in 0..SHARED_PAGES {
        // SAFETY: inside this task's data region or its folio regions.
        unsafe { page_word(i).write_volatile(0x1000 + i) };
    }
    let pid = ulib::fork();
    if pid < 0 {
        return -100;
    }
    if pid == 0 {
        for i in 0..SHARED_PAGES {
            // SAFETY: as above, in the child's copy.
            if unsafe { page_word(i).read_volatile() } != 0x1000 + i {
                ulib::exit(1);
            }
            // SAFETY: as above.
            unsafe { page_word(i).write_volatile(0x2000 + i) };
        }
        ulib::yield_now();
        for i in 0..SHARED_PAGES {
            // SAFETY: as above.
            if unsafe { page_word(i).read_volatile() } != 0x2000 + i {
                ulib::exit(2);
            }
        }
        ulib::exit(0);
    }
    for i in 0..SHARED_PAGES {
        // SAFETY: as above, in the parent's copy.
        unsafe { page_word(i).write_volatile(0x3000 + i) };
    }
    let child = ulib::wait(pid as u64);
    if child != 0 {
        return 10 + child;
    }
    for i in 0..SHARED_PAGES {
        // SAFETY: as above.
        if unsafe { page_word(i).read_volatile() } != 0x3000 + i {
            return 20;
        }
    }
    42
}

/// Maps the fork check's folios into a new task's space.
fn map_folios(space: vm::SpaceId) -> Result<(), vm::VmError> {
    let mut at = FOLIO_START;
    for order in FOLIO_ORDERS {
        let head = framemeta::alloc_folio(order).ok_or(vm::VmError::NoMemory)?;
        if let Err(e) = vm::map_folio(space, at, head, order, true) {
            framemeta::put_folio(head);
            return Err(e);
        }
        at += PAGE << order;
    }
    Ok(())
}

/// A ring-3 task with anonymous pages and large folios (orders 4, 2, 0) forks; parent and
/// child then write every shared page: each sees its own data, the other's is untouched
/// (copy-on-write), and every frame (folios included) returns after both exit.
pub fn fork_cow() -> Outcome {
    let free = frames::free_count();
    let copies = vm::COW_COPIES.load(Ordering::Relaxed);
    let reuses = vm::COW_REUSES.load(Ordering::Relaxed);
    let ptes = vm::PTES_COPIED.load(Ordering::Relaxed);
    let Ok(task) = usermode::spawn_with("forker", u_fork, 0, map_folios) else {
        fail!("cannot start the user task")
    };
    let code = sched::join(task);
    let copies = vm::COW_COPIES.load(Ordering::Relaxed) - copies;
    let reuses = vm::COW_REUSES.load(Ordering::Relaxed) - reuses;
    let ptes = vm::PTES_COPIED.load(Ordering::Relaxed) - ptes;
    ensure!(
        code == Some(42),
        "the parent ended with {code:?} (11/12: child saw wrong data, 20: parent's data \
         changed, -100: fork failed)"
    );
    ensure!(
        ptes >= SHARED_PAGES,
        "fork copied {ptes} PTEs for {SHARED_PAGES} shared pages"
    );
    ensure!(
        copies >= SHARED_PAGES,
        "only {copies} copy-on-write copies for {SHARED_PAGES} shared pages"
    );
    ensure!(
        frames::free_count() == free,
        "{} frames not returned",
        free as i64 - frames::free_count() as i64
    );
    println!("  {ptes} PTEs copied, {copies} COW copies, {reuses} COW reuses, all frames returned");
    Ok(())
}

/// Forkers running at once in the stress check.
const CONCURRENT_FORKERS: usize = 6;

/// Several forkers (each with its folios, each forking a child) run at once, on every CPU:
/// all see only their own data, and every frame returns.
pub fn fork_stress() -> Outcome {
    let free = frames::free_count();
    let mut tasks = [None; CONCURRENT_FORKERS];
    for task in tasks.iter_mut() {
        *task = usermode::spawn_with("forker", u_fork, 0, map_folios).ok();
        ensure!(task.is_some(), "cannot start a forker");
    }
    let codes: [Option<i64>; CONCURRENT_FORKERS] =
        core::array::from_fn(|i| tasks[i].and_then(sched::join));
    ensure!(
        codes.iter().all(|&c| c == Some(42)),
        "forkers ended with {codes:?}"
    );
    ensure!(
        frames::free_count() == free,
        "{} frames not returned",
        free as i64 - frames::free_count() as i64
    );
    Ok(())
}

fn u_orphaner(_: u64) -> i64 {
    // SAFETY: inside this task's data region.
    unsafe { page_word(0).write_volatile(1) };
    match ulib::fork() {
        0 => {
            for _ in 0..20 {
                ulib::yield_now();
            }
            // SAFETY: as above, in the child's copy.
            unsafe { page_word(0).write_volatile(2) };
            ulib::exit(0)
        }
        pid if pid > 0 => 5, // exit without waiting: the child is orphaned
        _ => -1,
    }
}

/// A parent that exits without waiting leaves an orphan, whose slot (and frames) come back
/// when it exits, with nobody joining it.
pub fn orphans() -> Outcome {
    let free = frames::free_count();
    let slots = sched::free_slots();
    let Ok(task) = usermode::spawn("orphaner", u_orphaner, 0) else {
        fail!("cannot start the user task")
    };
    let code = sched::join(task);
    ensure!(code == Some(5), "the parent ended with {code:?}");
    let reaped = crate::checks::sched::wait_for(|| {
        sched::free_slots() == slots && frames::free_count() == free
    });
    ensure!(
        reaped,
        "after the orphan exited: {} of {slots} slots free, {} frames missing",
        sched::free_slots(),
        free as i64 - frames::free_count() as i64
    );
    Ok(())
}

/// The page the fault hook supplies: outside every region of a user task.
const HOOKED_PAGE: u64 = DATA_START + usermode::DATA_SIZE + 64 * PAGE;
/// The frame behind it, and the value it holds.
static HOOKED_FRAME: AtomicU64 = AtomicU64::new(0);
const HOOKED_VALUE: u64 = 0x600d_f00d;
/// Pid of the task sleeping in the hook (0: none), and whether the page is "ready".
static SLEEPER: AtomicU64 = AtomicU64::new(0);
static READY: AtomicBool = AtomicBool::new(false);
static SLEPT: AtomicU64 = AtomicU64::new(0);

/// The shape of an async-page-fault handler: a fault on the page puts the task to sleep (in
/// the exception, on its kernel stack) until the "host" makes the page ready from the timer
/// interrupt; then the page is mapped (read-only, kernel-owned) and the access retried.
fn hook(frame: &mut TrapFrame, cr2: u64) -> Handled {
    if cr2 & !(PAGE - 1) != HOOKED_PAGE || !frame.is_from_user() {
        return Handled::No;
    }
    let (Some(me), Some(space)) = (sched::current(), sched::current_space()) else {
        return Handled::No;
    };
    if !READY.load(Ordering::Acquire) {
        SLEEPER.store(me.pid(), Ordering::Release);
        while !READY.load(Ordering::Acquire) {
            sched::block_current();
        }
        SLEPT.fetch_add(1, Ordering::Relaxed);
    }
    // A second fault on the mapped page (a write) is not ours to fix: the region exists.
    match vm::map_fixed(
        space,
        HOOKED_PAGE,
        HOOKED_FRAME.load(Ordering::Relaxed),
        PAGE,
        false,
    ) {
        Ok(()) => Handled::Yes,
        Err(_) => Handled::No,
    }
}

fn page_ready(_cpu: usize) {
    let pid = SLEEPER.load(Ordering::Acquire);
    if pid != 0 && sched::is_blocked(sched::TaskId::from_pid(pid)) {
        SLEEPER.store(0, Ordering::Relaxed);
        READY.store(true, Ordering::Release);
        sched::unblock(sched::TaskId::from_pid(pid));
    }
}

/// The page-fault hook runs first: it can put the faulting user task to sleep and have it
/// woken from an interrupt, then resolve the fault (a read-only kernel frame mapped into the
/// task); a write to that read-only mapping still kills the task, and the frame survives.
pub fn fault_hook() -> Outcome {
    ensure!(apic::add_tick_hook(page_ready), "no free tick-hook slot");
    let Some(frame) = frames::alloc(0) else {
        apic::remove_tick_hook(page_ready);
        fail!("no frame")
    };
    // SAFETY: a frame we own, identity-mapped.
    unsafe { (frame as *mut u64).write_volatile(HOOKED_VALUE) };
    HOOKED_FRAME.store(frame, Ordering::Relaxed);
    READY.store(false, Ordering::Relaxed);
    SLEPT.store(0, Ordering::Relaxed);
    let free = frames::free_count();
    fault::set_hook(Some(hook));
    let reader = usermode::spawn("apf-reader", u_peek, HOOKED_PAGE).map(sched::join);
    let writer = usermode::spawn("apf-writer", u_poke, HOOKED_PAGE).map(sched::join);
    fault::set_hook(None);
    apic::remove_tick_hook(page_ready);
    // SAFETY: the frame is still ours: the spaces that mapped it never freed it.
    let intact = unsafe { (frame as *const u64).read_volatile() } == HOOKED_VALUE;
    let leaked = free as i64 - frames::free_count() as i64;
    frames::free(frame, 0);
    ensure!(
        reader == Ok(Some(HOOKED_VALUE as i64)),
        "the reader ended with {reader:?}"
    );
    ensure!(
        SLEPT.load(Ordering::Relaxed) == 1,
        "the reader slept {} times in the fault",
        SLEPT.load(Ordering::Relaxed)
    );
    ensure!(
        writer == Ok(Some(EXIT_KILLED)),
        "the writer to a read-only mapping ended with {writer:?}"
    );
    ensure!(intact, "the kernel frame was changed through the mapping");
    ensure!(leaked == 0, "{leaked} frames leaked");
    Ok(())
}

/// Where the preemption check maps its shared page (a kernel frame, writable by the task).
const SHARED_PAGE: u64 = DATA_START + usermode::DATA_SIZE + 128 * PAGE;

fn u_spin(_: u64) -> i64 {
    let stop = SHARED_PAGE as *const u64;
    let count = (SHARED_PAGE + 8) as *mut u64;
    // SAFETY: the shared page is mapped writable in this task's space.
    unsafe {
        while stop.read_volatile() == 0 {
            count.write_volatile(count.read_volatile() + 1);
        }
        count.read_volatile() as i64
    }
}

/// A CPU-bound ring-3 task that never makes a system call is preempted by the timer like a
/// kernel task (on one CPU the check itself could not run otherwise), and the kernel sees its
/// progress through a shared page.
pub fn user_preemption() -> Outcome {
    let Some(frame) = frames::alloc(0) else {
        fail!("no frame")
    };
    // SAFETY: a frame we own, identity-mapped.
    unsafe { core::ptr::write_bytes(frame as *mut u8, 0, PAGE as usize) };
    let stop = frame as *mut u64;
    let count = (frame + 8) as *const u64;
    let free = frames::free_count();
    let spawned = usermode::spawn_with("user-spinner", u_spin, 0, |space| {
        vm::map_fixed(space, SHARED_PAGE, frame, PAGE, true)
    });
    let Ok(task) = spawned else {
        frames::free(frame, 0);
        fail!("cannot start the user task")
    };
    let progressed = crate::checks::sched::wait_for(|| {
        // SAFETY: the frame stays ours while the task runs; the task writes only the count
        // word and reads only the stop word.
        let seen = unsafe { count.read_volatile() };
        seen > 1000 && sched::preemptions(task).unwrap_or(0) >= 3
    });
    let preempted = sched::preemptions(task).unwrap_or(0);
    // SAFETY: as above.
    unsafe { stop.write_volatile(1) };
    let code = sched::join(task);
    // SAFETY: as above; the task is gone.
    let seen = unsafe { count.read_volatile() } as i64;
    let leaked = free as i64 - frames::free_count() as i64;
    frames::free(frame, 0);
    ensure!(
        progressed,
        "the ring-3 spinner counted {seen} and was preempted {preempted} times"
    );
    ensure!(
        code == Some(seen),
        "the spinner exited with {code:?}, the page says {seen}"
    );
    ensure!(leaked == 0, "{leaked} frames leaked");
    println!("  ring-3 spinner: {seen} iterations, preempted {preempted}+ times");
    Ok(())
}

fn parked(_: u64) -> i64 {
    while !RELEASE_PARKED.load(Ordering::Acquire) {
        sched::sleep_ticks(1);
    }
    7
}

static RELEASE_PARKED: AtomicBool = AtomicBool::new(false);

/// With every task slot taken, starting a kernel or user task fails cleanly (nothing leaks),
/// and the slots come back after join.
pub fn exhaustion() -> Outcome {
    RELEASE_PARKED.store(false, Ordering::Relaxed);
    let free = frames::free_count();
    let mut tasks = [None; sched::MAX_TASKS];
    let mut started = 0;
    for slot in tasks.iter_mut() {
        *slot = sched::spawn("parked", parked, 0);
        if slot.is_none() {
            break;
        }
        started += 1;
    }
    let during = frames::free_count();
    let user = usermode::spawn("one-too-many", u_hello, 0);
    let kernel = sched::spawn("one-too-many", parked, 0);
    let leaked_by_failure = during as i64 - frames::free_count() as i64;
    RELEASE_PARKED.store(true, Ordering::Release);
    let mut codes_ok = true;
    for task in tasks.iter().flatten() {
        codes_ok &= sched::join(*task) == Some(7);
    }
    ensure!(
        started > 0 && started < sched::MAX_TASKS,
        "started {started} tasks with {} slots (some are in use)",
        sched::MAX_TASKS
    );
    ensure!(
        user.is_err() && kernel.is_none(),
        "a task started with every slot taken"
    );
    ensure!(
        leaked_by_failure == 0,
        "failed starts leaked {leaked_by_failure} frames"
    );
    ensure!(codes_ok, "a parked task joined with the wrong code");
    ensure!(
        frames::free_count() == free,
        "{} frames not returned",
        free as i64 - frames::free_count() as i64
    );
    println!("  {started} tasks filled the free slots; the next start failed cleanly");
    Ok(())
}
