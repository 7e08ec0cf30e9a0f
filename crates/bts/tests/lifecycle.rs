//! Untrace with deferred teardown: references, refunds, exactly-once, reads after untrace.

mod common;

use common::{Ignore, Space, Task, tracer, user_cpu};
use oskit_bts::{BtsCpu, Config, Error, Flags, Record, format::RECORD_SIZE};

fn cfg(records: usize) -> Config {
    Config {
        size: records * RECORD_SIZE,
        flags: Flags::TRACE | Flags::ALLOC,
        signal: 0,
    }
}

#[test]
fn untrace_only_unlinks_and_schedules_teardown_does_the_rest() {
    let (bts, alloc, work) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    bts.config(&t, &mm, cfg(4)).unwrap();
    bts.untrace(&t).unwrap();
    assert_eq!(work.scheduled(), 1);
    // Nothing released yet: that is the deferred work's job.
    assert_eq!(
        (t.refs(), mm.refs(), mm.locked(), alloc.live()),
        (2, 2, 1, 1)
    );
    assert_eq!(bts.contexts(), 1);
    // Reads after untrace fail.
    assert_eq!(bts.size(&t), Err(Error::NoSuchContext));
    assert_eq!(bts.read(&t, 0), Err(Error::NoSuchContext));
    assert_eq!(bts.untrace(&t), Err(Error::NoSuchContext));
    assert!(!bts.is_traced(&t));
    assert_eq!(bts.run_deferred(), 1);
    assert_eq!(
        (t.refs(), mm.refs(), mm.locked(), alloc.live()),
        (1, 1, 0, 0)
    );
    assert_eq!(bts.contexts(), 0);
    assert_eq!(bts.run_deferred(), 0, "exactly once");
}

#[test]
fn refund_reaches_the_payer_after_the_tracer_exited() {
    let (bts, alloc, _) = tracer::<4>();
    let t = Task::new(7);
    let mm = Space::new(100);
    let state = mm.0.clone();
    bts.config(&t, &mm, cfg(400)).unwrap();
    drop(mm); // the tracer exits: only the context's reference keeps its space
    assert_eq!(state.refs.load(std::sync::atomic::Ordering::SeqCst), 1);
    bts.untrace(&t).unwrap();
    bts.run_deferred();
    assert_eq!(state.locked.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(state.refs.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn teardown_waits_for_the_task_to_leave_the_cpu() {
    let (bts, alloc, work) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    bts.config(&t, &mm, cfg(4)).unwrap();
    bts.switch_in(&mut cpu, &t, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    bts.untrace(&t).unwrap(); // e.g. reaped from another CPU, irqs off
    assert_eq!(
        work.scheduled(),
        0,
        "still loaded: the switch-out schedules"
    );
    assert_eq!(bts.run_deferred(), 0);
    // The CPU still writes into the (still allocated) buffer.
    cpu.hw_mut().branch(1, 2, false);
    assert_eq!(alloc.live(), 1);
    bts.switch_out(&mut cpu, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    assert_eq!(work.scheduled(), 1);
    assert_eq!(bts.run_deferred(), 1);
    assert_eq!((alloc.live(), mm.locked(), t.refs()), (0, 0, 1));
}

#[test]
fn a_switched_in_untraced_context_is_not_loaded() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    bts.config(&t, &mm, cfg(4)).unwrap();
    bts.untrace(&t).unwrap();
    bts.switch_in(&mut cpu, &t, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    assert!(!cpu.is_loaded());
    bts.run_deferred();
}

#[test]
fn retracing_the_same_task_before_teardown_gets_a_fresh_context() {
    let (bts, alloc, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    bts.config(&t, &mm, cfg(4)).unwrap();
    bts.untrace(&t).unwrap();
    bts.config(&t, &mm, cfg(8)).unwrap();
    assert_eq!(bts.contexts(), 2);
    bts.switch_in(&mut cpu, &t, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    cpu.hw_mut().branch(5, 6, false);
    bts.switch_out(&mut cpu, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    assert_eq!(bts.run_deferred(), 1);
    assert_eq!(bts.status(&t).unwrap().size, 8 * RECORD_SIZE);
    assert_eq!(
        bts.read(&t, 0),
        Ok(Record::Branch {
            from: 5,
            to: 6,
            predicted: false
        })
    );
    bts.untrace(&t).unwrap();
    bts.run_deferred();
    assert_eq!(
        (alloc.live(), mm.locked(), t.refs(), bts.contexts()),
        (0, 0, 1, 0)
    );
}

#[test]
fn teardown_releases_the_hardware_tracer() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    bts.config(&t, &mm, cfg(4)).unwrap();
    assert!(bts.claim_cpu_tracing().is_err());
    bts.untrace(&t).unwrap();
    assert!(
        bts.claim_cpu_tracing().is_err(),
        "released by the teardown, not the unlink"
    );
    bts.run_deferred();
    assert!(bts.claim_cpu_tracing().is_ok());
}

#[test]
fn slots_are_reused_after_teardown() {
    let (bts, alloc, _) = tracer::<2>();
    let mm = Space::new(1000);
    for round in 0..10u32 {
        let tasks = [Task::new(round * 2), Task::new(round * 2 + 1)];
        for t in &tasks {
            bts.config(t, &mm, cfg(4)).unwrap();
        }
        for t in &tasks {
            bts.untrace(t).unwrap();
        }
        assert_eq!(bts.run_deferred(), 2);
        assert!(tasks.iter().all(|t| t.refs() == 1));
    }
    assert_eq!((alloc.live(), mm.locked(), mm.refs()), (0, 0, 1));
}

#[test]
fn dropping_the_tracer_tears_down_what_no_cpu_holds() {
    let (bts, alloc, _) = tracer::<4>();
    let (t, u, mm) = (Task::new(7), Task::new(8), Space::new(100));
    bts.config(&t, &mm, cfg(4)).unwrap();
    bts.config(&u, &mm, cfg(400)).unwrap();
    bts.untrace(&u).unwrap(); // dying, teardown not run yet
    drop(bts);
    assert_eq!(
        (alloc.live(), mm.locked(), mm.refs(), t.refs(), u.refs()),
        (0, 0, 1, 1, 1)
    );
}
