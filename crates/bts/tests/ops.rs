//! Every tracer operation and its error paths.

mod common;

use common::{Ignore, Space, Task, tracer, user_cpu};
use oskit_bts::{
    BtsCpu, Config, Error, Flags, Record, format::RECORD_SIZE, pages_for, sim::SoftCpu,
};

fn alloc_cfg(records: usize, flags: Flags) -> Config {
    Config {
        size: records * RECORD_SIZE,
        flags: flags | Flags::ALLOC,
        signal: 0,
    }
}

/// Runs `task` on a software CPU taking branches (i, i + 1000) for `i` in `from..to`.
fn run_branches(
    bts: &common::Tracer<4>,
    cpu: &mut BtsCpu<SoftCpu>,
    task: &Task,
    range: std::ops::Range<u64>,
) {
    bts.switch_in(cpu, task, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    for i in range {
        cpu.hw_mut().branch(i, i + 1000, i % 2 == 0);
    }
    bts.switch_out(cpu, 0, &mut Ignore, &mut Ignore).unwrap();
}

fn branch(i: u64) -> Record {
    Record::Branch {
        from: i,
        to: i + 1000,
        predicted: i % 2 == 0,
    }
}

#[test]
fn errnos_are_linux_values() {
    assert_eq!(Error::NoSuchContext.errno(), 3);
    assert_eq!(Error::InvalidArgument.errno(), 22);
    assert_eq!(Error::NoMemory.errno(), 12);
    assert_eq!(Error::PermissionDenied.errno(), 1);
    assert_eq!(Error::Busy.errno(), 16);
}

#[test]
fn every_operation_without_a_context_is_no_such_context() {
    let (bts, _, _) = tracer::<4>();
    let t = Task::new(7);
    assert_eq!(bts.status(&t), Err(Error::NoSuchContext));
    assert_eq!(bts.size(&t), Err(Error::NoSuchContext));
    assert_eq!(bts.read(&t, 0), Err(Error::NoSuchContext));
    assert_eq!(bts.drain(&t, &mut []), Err(Error::NoSuchContext));
    assert_eq!(bts.clear(&t), Err(Error::NoSuchContext));
    assert_eq!(bts.untrace(&t), Err(Error::NoSuchContext));
    assert!(!bts.is_traced(&t));
}

#[test]
fn config_allocates_charges_and_reports_status() {
    let (bts, alloc, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    // 100 bytes round down to 4 whole records.
    let cfg = Config {
        size: 100,
        flags: Flags::TRACE | Flags::ALLOC,
        signal: 0,
    };
    bts.config(&t, &mm, cfg).unwrap();
    let pages = pages_for(4).unwrap();
    assert_eq!(pages, 1);
    assert_eq!((mm.locked(), alloc.live()), (1, 1));
    assert_eq!(t.refs(), 2, "context holds a task reference");
    assert_eq!(mm.refs(), 2, "context holds the paying space");
    let st = bts.status(&t).unwrap();
    assert_eq!((st.size, st.signal, st.record_size), (4 * 24, 0, 24));
    assert_eq!(st.flags, Flags::TRACE, "ALLOC is an action, not a state");
    assert_eq!(bts.size(&t), Ok(0));
    assert!(bts.is_traced(&t));
}

#[test]
fn pages_are_charged_for_the_ds_area_and_whole_records() {
    assert_eq!(pages_for(0), Some(1));
    assert_eq!(pages_for((4096 - 0x60) / 24), Some(1));
    assert_eq!(pages_for((4096 - 0x60) / 24 + 1), Some(2));
    assert_eq!(pages_for(usize::MAX / 8), None);
}

#[test]
fn read_indexes_from_the_newest_and_drain_returns_oldest_first() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    bts.config(&t, &mm, alloc_cfg(8, Flags::TRACE)).unwrap();
    run_branches(&bts, &mut cpu, &t, 1..6);
    assert_eq!(bts.size(&t), Ok(5));
    assert_eq!(bts.read(&t, 0), Ok(branch(5)));
    assert_eq!(bts.read(&t, 4), Ok(branch(1)));
    assert_eq!(bts.read(&t, 5), Err(Error::InvalidArgument));
    let mut small = [Record::Invalid; 4];
    assert_eq!(bts.drain(&t, &mut small), Err(Error::InvalidArgument));
    assert_eq!(bts.size(&t), Ok(5), "a failed drain leaves the trace");
    let mut out = [Record::Invalid; 8];
    assert_eq!(bts.drain(&t, &mut out), Ok(5));
    assert_eq!(
        out[..5],
        [branch(1), branch(2), branch(3), branch(4), branch(5)]
    );
    assert_eq!(bts.size(&t), Ok(0));
    assert_eq!(bts.read(&t, 0), Err(Error::InvalidArgument));
}

#[test]
fn circular_trace_keeps_the_newest_after_wrapping() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    bts.config(&t, &mm, alloc_cfg(4, Flags::TRACE)).unwrap();
    run_branches(&bts, &mut cpu, &t, 1..11);
    assert_eq!(bts.size(&t), Ok(4));
    assert_eq!(bts.read(&t, 0), Ok(branch(10)));
    assert_eq!(bts.read(&t, 3), Ok(branch(7)));
    let mut out = [Record::Invalid; 4];
    assert_eq!(bts.drain(&t, &mut out), Ok(4));
    assert_eq!(out, [branch(7), branch(8), branch(9), branch(10)]);
    // After the drain the buffer is empty again and wrap detection starts afresh.
    run_branches(&bts, &mut cpu, &t, 20..22);
    assert_eq!(bts.size(&t), Ok(2));
    assert_eq!(bts.read(&t, 1), Ok(branch(20)));
}

#[test]
fn clear_empties_the_trace() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    bts.config(&t, &mm, alloc_cfg(4, Flags::TRACE)).unwrap();
    run_branches(&bts, &mut cpu, &t, 1..7);
    bts.clear(&t).unwrap();
    assert_eq!(bts.size(&t), Ok(0));
    run_branches(&bts, &mut cpu, &t, 1..2);
    assert_eq!(bts.size(&t), Ok(1), "no stale wrap after clear");
}

#[test]
fn without_trace_flag_no_branch_is_recorded() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    bts.config(&t, &mm, alloc_cfg(4, Flags::empty())).unwrap();
    run_branches(&bts, &mut cpu, &t, 1..3);
    assert_eq!(bts.size(&t), Ok(0));
}

#[test]
fn signal_zero_is_invalid_and_signal_is_reported() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let bad = Config {
        signal: 0,
        ..alloc_cfg(4, Flags::TRACE | Flags::SIGNAL)
    };
    assert_eq!(bts.config(&t, &mm, bad), Err(Error::InvalidArgument));
    let good = Config { signal: 10, ..bad };
    bts.config(&t, &mm, good).unwrap();
    let st = bts.status(&t).unwrap();
    assert_eq!(st.signal, 10);
    assert!(st.flags.contains(Flags::SIGNAL));
}

#[test]
fn unknown_flags_are_invalid() {
    let (bts, alloc, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let cfg = Config {
        size: 96,
        flags: Flags(0x1000),
        signal: 0,
    };
    assert_eq!(bts.config(&t, &mm, cfg), Err(Error::InvalidArgument));
    assert_eq!((bts.contexts(), alloc.live(), t.refs()), (0, 0, 1));
}

#[test]
fn tracing_without_a_buffer_is_invalid() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let cfg = Config {
        size: 0,
        flags: Flags::TRACE,
        signal: 0,
    };
    assert_eq!(bts.config(&t, &mm, cfg), Err(Error::InvalidArgument));
    assert_eq!(
        bts.status(&t),
        Err(Error::NoSuchContext),
        "context but no tracer"
    );
}

#[test]
fn alloc_with_size_zero_frees_the_buffer_and_refunds() {
    let (bts, alloc, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    bts.config(&t, &mm, alloc_cfg(4, Flags::TRACE)).unwrap();
    bts.config(&t, &mm, alloc_cfg(0, Flags::TRACE)).unwrap();
    assert_eq!((mm.locked(), alloc.live(), mm.refs()), (0, 0, 1));
    assert_eq!(bts.size(&t), Err(Error::NoSuchContext));
    // Without a buffer, ALLOC 0 again changes nothing and tracing has nothing to trace into.
    assert_eq!(
        bts.config(&t, &mm, alloc_cfg(0, Flags::TRACE)),
        Err(Error::InvalidArgument)
    );
    // A size below one record also rounds to zero.
    bts.config(&t, &mm, alloc_cfg(4, Flags::TRACE)).unwrap();
    bts.config(
        &t,
        &mm,
        Config {
            size: 23,
            ..alloc_cfg(0, Flags::TRACE)
        },
    )
    .unwrap();
    assert_eq!((mm.locked(), alloc.live()), (0, 0));
}

#[test]
fn resizing_refunds_the_old_buffer_and_charges_the_new_payer() {
    let (bts, alloc, _) = tracer::<4>();
    let (t, a, b) = (Task::new(7), Space::new(100), Space::new(100));
    bts.config(&t, &a, alloc_cfg(4, Flags::TRACE)).unwrap();
    bts.config(&t, &b, alloc_cfg(400, Flags::TRACE)).unwrap();
    assert_eq!((a.locked(), a.refs()), (0, 1));
    assert_eq!(b.locked(), pages_for(400).unwrap() as isize);
    assert_eq!(alloc.live(), pages_for(400).unwrap());
    // Same size again: the buffer is kept (no new charge), the trace restarts.
    bts.config(&t, &a, alloc_cfg(400, Flags::TRACE)).unwrap();
    assert_eq!((a.locked(), b.locked()), (0, 3));
}

#[test]
fn reconfig_without_alloc_keeps_the_buffer_and_restarts_the_trace() {
    let (bts, alloc, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    bts.config(&t, &mm, alloc_cfg(4, Flags::TRACE)).unwrap();
    run_branches(&bts, &mut cpu, &t, 1..3);
    let cfg = Config {
        size: 0,
        flags: Flags::TRACE | Flags::SCHED,
        signal: 0,
    };
    bts.config(&t, &mm, cfg).unwrap();
    assert_eq!(bts.size(&t), Ok(0));
    assert_eq!(bts.status(&t).unwrap().size, 96);
    assert_eq!(alloc.live(), 1);
}

#[test]
fn over_the_locked_limit_is_no_memory_with_nothing_leaked() {
    let (bts, alloc, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(1));
    assert_eq!(
        bts.config(&t, &mm, alloc_cfg(1000, Flags::TRACE)),
        Err(Error::NoMemory)
    );
    assert_eq!((mm.locked(), alloc.live(), mm.refs()), (0, 0, 1));
    assert_eq!(bts.size(&t), Err(Error::NoSuchContext));
}

#[test]
fn allocator_failure_is_no_memory_with_the_charge_refunded() {
    let (bts, alloc, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    alloc.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        bts.config(&t, &mm, alloc_cfg(4, Flags::TRACE)),
        Err(Error::NoMemory)
    );
    assert_eq!((mm.locked(), alloc.live(), mm.refs()), (0, 0, 1));
}

#[test]
fn a_full_table_is_no_memory() {
    let (bts, _, _) = tracer::<4>();
    let mm = Space::new(100);
    let tasks: Vec<Task> = (0..5).map(Task::new).collect();
    for t in &tasks[..4] {
        bts.config(t, &mm, alloc_cfg(1, Flags::TRACE)).unwrap();
    }
    assert_eq!(
        bts.config(&tasks[4], &mm, alloc_cfg(1, Flags::TRACE)),
        Err(Error::NoMemory)
    );
    assert_eq!(tasks[4].refs(), 1);
}

#[test]
fn per_task_and_per_cpu_tracing_conflict() {
    let (bts, alloc, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let claim = bts.claim_cpu_tracing().unwrap();
    assert_eq!(
        bts.config(&t, &mm, alloc_cfg(4, Flags::TRACE)),
        Err(Error::PermissionDenied)
    );
    assert_eq!(
        (mm.locked(), alloc.live()),
        (0, 0),
        "buffer freed on failure"
    );
    drop(claim);
    bts.config(&t, &mm, alloc_cfg(4, Flags::TRACE)).unwrap();
    assert_eq!(bts.claim_cpu_tracing().err(), Some(Error::PermissionDenied));
    // Releasing the per-task tracer (ALLOC 0) lifts the conflict.
    bts.config(&t, &mm, alloc_cfg(0, Flags::TRACE)).unwrap();
    let _claim = bts.claim_cpu_tracing().unwrap();
}

#[test]
fn operations_on_a_running_traced_task_are_busy() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    bts.config(&t, &mm, alloc_cfg(4, Flags::TRACE)).unwrap();
    bts.switch_in(&mut cpu, &t, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    assert!(cpu.is_loaded());
    assert_eq!(bts.read(&t, 0), Err(Error::Busy));
    assert_eq!(
        bts.config(&t, &mm, alloc_cfg(8, Flags::TRACE)),
        Err(Error::Busy)
    );
    bts.switch_out(&mut cpu, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    assert_eq!(bts.size(&t), Ok(0));
}

#[test]
fn contexts_are_per_task() {
    let (bts, _, _) = tracer::<4>();
    let (a, b, mm) = (Task::new(1), Task::new(2), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    bts.config(&a, &mm, alloc_cfg(4, Flags::TRACE)).unwrap();
    bts.config(&b, &mm, alloc_cfg(4, Flags::TRACE)).unwrap();
    run_branches(&bts, &mut cpu, &a, 1..3);
    run_branches(&bts, &mut cpu, &b, 10..11);
    assert_eq!((bts.size(&a), bts.size(&b)), (Ok(2), Ok(1)));
    assert_eq!(bts.read(&b, 0), Ok(branch(10)));
    let untraced = Task::new(3);
    run_branches(&bts, &mut cpu, &untraced, 20..30);
    assert_eq!((bts.size(&a), bts.size(&b)), (Ok(2), Ok(1)));
}
