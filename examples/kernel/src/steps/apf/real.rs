//! The `apf` check under KVM with async-PF-int, and `scenario=apf-real`: real async page faults
//! from this machine's KVM while the host evicts the guest's memory.

use core::sync::atomic::Ordering;

use oskit_pv_apf::KvmFeatures;

use super::{
    APF_REAL, APF_VECTOR, CAME_FIRST, DROPPED, DUMMIES_ADDED, ENABLE_FAILED, ENABLED, ERRORS, MODE,
    OFF, READY_IRQS, REAL, RETURNED_EARLY, SLEPT, WAKE_ALLS, WOKEN, apf_hook, disable_real,
    each_task_woken_once_per_sleep, enable_real, on_page_ready, reset,
};
use crate::{
    arch::apic,
    arch::percpu,
    arch::smp,
    arch::trap,
    checks::{self, Outcome},
    ensure, fail,
    mm::fault,
    mm::{frames, vm},
    println,
    task::sched,
    task::usermode,
};

/// Under KVM with async-PF-int: enable on every CPU for real, wait, report, disable.
pub(super) fn real_apf(features: KvmFeatures) -> Outcome {
    MODE.store(REAL, Ordering::Release);
    fault::set_hook(Some(apf_hook));
    smp::on_each_cpu(enable_real);
    let enabled = ENABLED.load(Ordering::Relaxed);
    sched::sleep_ticks(2 * apic::HZ);
    smp::on_each_cpu(disable_real);
    fault::set_hook(None);
    MODE.store(OFF, Ordering::Release);
    let online = percpu::online_count();
    ensure!(
        enabled == online && ENABLE_FAILED.load(Ordering::Relaxed) == 0,
        "enabled on {enabled} of {online} CPUs ({} failures)",
        ENABLE_FAILED.load(Ordering::Relaxed)
    );
    let events = SLEPT.load(Ordering::Relaxed)
        + CAME_FIRST.load(Ordering::Relaxed)
        + READY_IRQS.load(Ordering::Relaxed);
    println!(
        "  kvm {features:?}: async PF (interrupt protocol) enabled on {enabled} CPUs; the host \
         delivered {events} events in 2 s"
    );
    checks::figures(format_args!(
        "KVM: enabled on {enabled} CPUs, {events} host events, {} waits",
        SLEPT.load(Ordering::Relaxed)
    ));
    Ok(())
}

/// Where each ring-3 sweeper's region starts (past the data region and the shared page).
const SWEEP_START: u64 = usermode::DATA_START + (64 << 20);
/// Bytes each sweeper touches (4 KiB pages).
const SWEEP_BYTES: u64 = 24 << 20;
/// The page shared with every sweeper: word 0 = stop, word 1 + n = sweeper n's passes.
const SWEEP_SHARED: u64 = usermode::DATA_START + (60 << 20);
/// Sweepers at most.
const MAX_SWEEPERS: usize = 4;
/// A sweeper region's blocks: 2 MiB each (order 9).
const BLOCK: u64 = 2 << 20;
const SWEEP_BLOCKS: usize = (SWEEP_BYTES / BLOCK) as usize;
/// How long the sweep lasts, in ticks, at most, and the not-present events it aims for.
const SWEEP_TICKS: u64 = 90 * apic::HZ;
const SWEEP_TARGET: usize = 300;

/// Ring 3: writes every page of its region, then sweeps it (read, check, rewrite) until the
/// kernel says stop; counts its passes in the shared page. Returns 0, or -1 if a page lost its
/// contents (the host's eviction must be invisible).
fn u_sweep(n: u64) -> i64 {
    let pages = SWEEP_BYTES / 4096;
    let stop = SWEEP_SHARED as *const u64;
    let passes = (SWEEP_SHARED + 8 * (n + 1)) as *mut u64;
    let page = |i: u64| (SWEEP_START + i * 4096) as *mut u64;
    // SAFETY: the region and the shared page are mapped writable in this task's space.
    unsafe {
        for i in 0..pages {
            page(i).write_volatile(n << 32 | i);
        }
        let mut pass = 0u64;
        while stop.read_volatile() == 0 {
            for i in 0..pages {
                let p = page(i);
                if p.read_volatile() != (n << 32 | i) + pass {
                    return -1;
                }
                p.write_volatile((n << 32 | i) + pass + 1);
            }
            pass += 1;
            passes.write_volatile(pass);
        }
    }
    0
}

/// `scenario=apf-real`: under KVM with async-PF-int, async PF enabled for real on every CPU
/// while ring-3 tasks sweep far more memory than the host lets stay resident (`cargo xtask
/// test` backs the guest's RAM with a file and evicts it while this runs). Every "not present"
/// the host sends puts a sweeper to sleep in the #PF; every page ready wakes it. Passes when
/// at least one not-present came, every wait ended with exactly one wake, and nobody is left
/// asleep; prints the guest's counts for the host to compare with its tracepoints.
pub fn apf_real() -> Outcome {
    reset();
    trap::set_handler(APF_VECTOR, on_page_ready);
    let Some(features) = oskit_pv_apf::x86::probe().filter(|f| f.has(KvmFeatures::ASYNC_PF_INT))
    else {
        fail!("not running on a KVM that offers async-PF-int")
    };
    MODE.store(REAL, Ordering::Release);
    fault::set_hook(Some(apf_hook));
    smp::on_each_cpu(enable_real);
    let online = percpu::online_count();
    let enabled = ENABLED.load(Ordering::Relaxed);
    let Some(shared) = frames::alloc(0) else {
        smp::on_each_cpu(disable_real);
        fail!("no frame")
    };
    // SAFETY: a frame we own, identity-mapped.
    unsafe { core::ptr::write_bytes(shared as *mut u8, 0, 4096) };
    let sweepers = (online * 2).min(MAX_SWEEPERS);
    // Each sweeper's region is made of 2 MiB blocks the check owns (mapped fixed), so that the
    // host can be told exactly which guest-physical memory to evict (the kernel's own memory
    // stays resident: emulated ring-0 code refetched from disk would only crawl).
    let mut blocks = [[0u64; SWEEP_BLOCKS]; MAX_SWEEPERS];
    let mut got = 0;
    for block in blocks.iter_mut().take(sweepers).flatten() {
        match frames::alloc(frames::MAX_ORDER) {
            Some(paddr) => {
                *block = paddr;
                got += 1;
            }
            None => break,
        }
    }
    let free_blocks = |blocks: &[[u64; SWEEP_BLOCKS]; MAX_SWEEPERS]| {
        for &b in blocks.iter().flatten().filter(|&&b| b != 0) {
            frames::free(b, frames::MAX_ORDER);
        }
    };
    if got < sweepers * SWEEP_BLOCKS {
        free_blocks(&blocks);
        frames::free(shared, 0);
        smp::on_each_cpu(disable_real);
        fault::set_hook(None);
        MODE.store(OFF, Ordering::Release);
        fail!("not enough 2 MiB blocks for {sweepers} sweepers");
    }
    let mut tasks = [None; MAX_SWEEPERS];
    for (n, slot) in tasks.iter_mut().enumerate().take(sweepers) {
        let mine = blocks[n];
        *slot = usermode::spawn_with("apf-sweeper", u_sweep, n as u64, |space| {
            vm::map_fixed(space, SWEEP_SHARED, shared, 4096, true)?;
            for (k, &paddr) in mine.iter().enumerate() {
                vm::map_fixed(space, SWEEP_START + k as u64 * BLOCK, paddr, BLOCK, true)?;
            }
            Ok(())
        })
        .ok();
    }
    // Once every sweeper has written its region, tell the host what to evict.
    let written = || {
        (0..sweepers).all(|n| {
            // SAFETY: the shared frame is ours; the sweepers write their pass counters.
            let passes = unsafe { ((shared + 8 * (n as u64 + 1)) as *const u64).read_volatile() };
            passes >= 1
        })
    };
    let deadline = sched::ticks() + SWEEP_TICKS;
    while !written() && sched::ticks() < deadline {
        sched::sleep_ticks(apic::HZ / 10);
    }
    for &b in blocks.iter().take(sweepers).flatten() {
        println!("apf-real: evict {b:#x} {BLOCK:#x}");
    }
    println!("apf-real: sweeping");
    let not_presents = || SLEPT.load(Ordering::Relaxed) + CAME_FIRST.load(Ordering::Relaxed);
    let start = sched::ticks();
    while sched::ticks() - start < SWEEP_TICKS && not_presents() < SWEEP_TARGET {
        sched::sleep_ticks(apic::HZ / 10);
    }
    // SAFETY: the frame stays ours while the sweepers run; they only read the stop word.
    unsafe { (shared as *mut u64).write_volatile(1) };
    let mut codes = [None; MAX_SWEEPERS];
    for (code, task) in codes.iter_mut().zip(tasks.iter()) {
        *code = task.map(sched::join);
    }
    println!("apf-real: done");
    free_blocks(&blocks);
    // Every not present has had its page ready by now (each sweeper returned); a short grace
    // for page readys still on their way to tasks that came first.
    sched::sleep_ticks(apic::HZ / 10);
    let left = APF_REAL.table().census(None);
    smp::on_each_cpu(disable_real);
    fault::set_hook(None);
    MODE.store(OFF, Ordering::Release);
    // SAFETY: as above; the sweepers are gone.
    let passes: u64 = (0..sweepers)
        .map(|n| unsafe { ((shared + 8 * (n as u64 + 1)) as *const u64).read_volatile() })
        .sum();
    frames::free(shared, 0);

    let slept = SLEPT.load(Ordering::Relaxed);
    let came_first = CAME_FIRST.load(Ordering::Relaxed);
    let early = RETURNED_EARLY.load(Ordering::Relaxed);
    let woken = WOKEN.load(Ordering::Relaxed);
    let wake_alls = WAKE_ALLS.load(Ordering::Relaxed);
    let dummies = DUMMIES_ADDED.load(Ordering::Relaxed);
    let irqs = READY_IRQS.load(Ordering::Relaxed);
    // The line xtask compares with the host's tracepoints.
    println!(
        "apf-real: guest not-present={} page-ready={irqs} wake-all={wake_alls} slept={slept} \
         wake-came-first={came_first} returned-early={early} woken={woken} dummies={dummies} \
         left={}",
        slept + came_first + early,
        left.0
    );
    println!(
        "  kvm {features:?}: enabled on {enabled}/{online} CPUs; {sweepers} ring-3 sweepers of \
         {} MiB, {passes} passes",
        SWEEP_BYTES >> 20
    );
    checks::figures(format_args!(
        "KVM: {} not presents, {irqs} page readys ({wake_alls} wake-alls), {slept} sleeps",
        slept + came_first + early
    ));
    ensure!(
        enabled == online && ENABLE_FAILED.load(Ordering::Relaxed) == 0,
        "enabled on {enabled} of {online} CPUs"
    );
    ensure!(
        codes[..sweepers].iter().all(|c| *c == Some(Some(0))),
        "sweepers ended with {:?} (-1: a page lost its contents)",
        &codes[..sweepers]
    );
    each_task_woken_once_per_sleep()?;
    ensure!(left == (0, 0), "left in the table: {left:?}");
    ensure!(
        ERRORS.load(Ordering::Relaxed) == 0 && DROPPED.load(Ordering::Relaxed) == 0,
        "{} handler errors, {} dropped wakes",
        ERRORS.load(Ordering::Relaxed),
        DROPPED.load(Ordering::Relaxed)
    );
    ensure!(
        slept + came_first + early > 0,
        "the host sent no not-present in {} s",
        (sched::ticks() - start) / apic::HZ
    );
    Ok(())
}
