//! Loom models of the deferred teardown: `untrace` (interrupts off, another CPU) racing reads,
//! drains, the context-switch hooks and the work queue.
//!
//! Checked in every interleaving: the context's data is never touched by two parties at once
//! (loom's cell tracking), the buffer is never freed while a CPU has it loaded or an operation
//! reads it, teardown runs exactly once, and the locked-memory accounting and references end
//! balanced.
#![cfg(loom)]

mod common;

use common::{Ignore, Space, Task, Tracer, tracer, user_cpu};
use loom::{sync::Arc, thread};
use oskit_bts::{BtsCpu, Config, Error, Flags, Record, format::RECORD_SIZE};

fn cfg() -> Config {
    Config {
        size: 4 * RECORD_SIZE,
        flags: Flags::TRACE | Flags::ALLOC,
        signal: 0,
    }
}

/// The work queue: runs teardown as often as it was scheduled (plus once more, harmlessly).
fn drain_work<const N: usize>(bts: &Tracer<N>, work: &common::Work, ran: usize) -> usize {
    let mut done = 0;
    for _ in ran..work.scheduled() + 1 {
        done += bts.run_deferred();
    }
    done
}

#[test]
fn untrace_racing_read_and_drain_tears_down_once() {
    loom::model(|| {
        let (bts, alloc, work) = tracer::<2>();
        let (t, mm) = (Task::new(7), Space::new(10));
        bts.config(&t, &mm, cfg()).unwrap();
        let bts = Arc::new(bts);

        let reader = {
            let (bts, t) = (bts.clone(), t.clone());
            thread::spawn(move || {
                let r = bts.read(&t, 0);
                assert!(
                    matches!(r, Err(Error::InvalidArgument | Error::NoSuchContext)),
                    "{r:?}"
                );
                let mut out = [Record::Invalid; 4];
                let d = bts.drain(&t, &mut out);
                assert!(matches!(d, Ok(0) | Err(Error::NoSuchContext)), "{d:?}");
            })
        };
        // Another CPU unlinks with interrupts off, and its work queue runs right away.
        let unlinker = {
            let (bts, t) = (bts.clone(), t.clone());
            thread::spawn(move || {
                bts.untrace(&t).unwrap();
                bts.run_deferred()
            })
        };
        reader.join().unwrap();
        let early = unlinker.join().unwrap();
        assert!(early <= 1);
        let late = drain_work(&bts, &work, 1);
        assert_eq!(early + late, 1, "exactly one teardown");
        assert_eq!(work.scheduled(), 1, "scheduled exactly once");
        assert_eq!(
            (alloc.live(), mm.locked(), mm.refs(), t.refs()),
            (0, 0, 1, 1)
        );
        assert_eq!(bts.contexts(), 0);
    });
}

#[test]
fn untrace_while_the_task_runs_waits_for_switch_out() {
    loom::model(|| {
        let (bts, alloc, work) = tracer::<2>();
        let (t, mm) = (Task::new(7), Space::new(10));
        bts.config(&t, &mm, cfg()).unwrap();
        let pages = alloc.live();
        let bts = Arc::new(bts);

        let cpu_thread = {
            let (bts, t, alloc) = (bts.clone(), t.clone(), alloc.clone());
            thread::spawn(move || {
                let mut cpu = BtsCpu::new(user_cpu());
                bts.switch_in(&mut cpu, &t, 1, &mut Ignore, &mut Ignore)
                    .unwrap();
                if cpu.is_loaded() {
                    // The DS area is loaded: the buffer must still be there.
                    assert_eq!(alloc.live(), pages, "buffer freed while loaded");
                    cpu.hw_mut().branch(1, 2, false);
                }
                bts.switch_out(&mut cpu, 2, &mut Ignore, &mut Ignore)
                    .unwrap();
            })
        };
        let unlinker = {
            let (bts, t) = (bts.clone(), t.clone());
            thread::spawn(move || {
                bts.untrace(&t).unwrap();
                bts.run_deferred()
            })
        };
        cpu_thread.join().unwrap();
        let early = unlinker.join().unwrap();
        let late = drain_work(&bts, &work, 1);
        assert_eq!(early + late, 1, "exactly one teardown");
        assert_eq!(work.scheduled(), 1);
        assert_eq!(
            (alloc.live(), mm.locked(), mm.refs(), t.refs()),
            (0, 0, 1, 1)
        );
    });
}

#[test]
fn racing_untraces_unlink_once() {
    loom::model(|| {
        let (bts, alloc, work) = tracer::<2>();
        let (t, mm) = (Task::new(7), Space::new(10));
        bts.config(&t, &mm, cfg()).unwrap();
        let bts = Arc::new(bts);
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (bts, t) = (bts.clone(), t.clone());
                thread::spawn(move || bts.untrace(&t).is_ok())
            })
            .collect();
        let ok = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|&ok| ok)
            .count();
        assert_eq!(ok, 1);
        assert_eq!(work.scheduled(), 1);
        assert_eq!(bts.run_deferred(), 1);
        assert_eq!((alloc.live(), mm.locked(), t.refs()), (0, 0, 1));
    });
}

#[test]
fn untrace_racing_a_resize_refunds_both_buffers() {
    loom::model(|| {
        let (bts, alloc, work) = tracer::<2>();
        let (t, a, b) = (Task::new(7), Space::new(10), Space::new(10));
        bts.config(&t, &a, cfg()).unwrap();
        let bts = Arc::new(bts);

        let tracer_thread = {
            let (bts, t, b) = (bts.clone(), t.clone(), b.clone());
            thread::spawn(move || {
                let bigger = Config {
                    size: 400 * RECORD_SIZE,
                    ..cfg()
                };
                let r = bts.config(&t, &b, bigger);
                assert!(matches!(r, Ok(()) | Err(Error::NoSuchContext)), "{r:?}");
            })
        };
        let unlinker = {
            let (bts, t) = (bts.clone(), t.clone());
            thread::spawn(move || {
                bts.untrace(&t).unwrap();
                bts.run_deferred()
            })
        };
        tracer_thread.join().unwrap();
        let early = unlinker.join().unwrap();
        // A config that lost the race created a fresh context: untrace that one too.
        let _ = bts.untrace(&t);
        let late = drain_work(&bts, &work, 0);
        assert!(early + late >= 1);
        assert_eq!(bts.contexts(), 0);
        assert_eq!((alloc.live(), a.locked(), b.locked()), (0, 0, 0));
        assert_eq!((a.refs(), b.refs(), t.refs()), (1, 1, 1));
    });
}

#[test]
fn read_cpu_and_untrace_all_at_once() {
    loom::model(|| {
        let (bts, alloc, work) = tracer::<2>();
        let (t, mm) = (Task::new(7), Space::new(10));
        bts.config(&t, &mm, cfg()).unwrap();
        let bts = Arc::new(bts);
        let reader = {
            let (bts, t) = (bts.clone(), t.clone());
            thread::spawn(move || {
                let r = bts.size(&t);
                assert!(
                    matches!(r, Ok(0 | 1) | Err(Error::NoSuchContext | Error::Busy)),
                    "{r:?}"
                );
            })
        };
        let cpu_thread = {
            let (bts, t) = (bts.clone(), t.clone());
            thread::spawn(move || {
                let mut cpu = BtsCpu::new(user_cpu());
                bts.switch_in(&mut cpu, &t, 1, &mut Ignore, &mut Ignore)
                    .unwrap();
                cpu.hw_mut().branch(1, 2, false);
                bts.switch_out(&mut cpu, 2, &mut Ignore, &mut Ignore)
                    .unwrap();
            })
        };
        bts.untrace(&t).unwrap();
        let early = bts.run_deferred();
        reader.join().unwrap();
        cpu_thread.join().unwrap();
        let late = drain_work(&bts, &work, 1);
        assert_eq!(early + late, 1);
        assert_eq!(work.scheduled(), 1);
        assert_eq!(
            (alloc.live(), mm.locked(), mm.refs(), t.refs()),
            (0, 0, 1, 1)
        );
    });
}

#[test]
fn a_stale_untrace_never_unlinks_the_slots_next_context() {
    loom::model(|| {
        let (bts, alloc, work) = tracer::<1>();
        let (p, q, mm) = (Task::new(7), Task::new(8), Space::new(10));
        bts.config(&p, &mm, cfg()).unwrap();
        let bts = Arc::new(bts);
        let stale = {
            let (bts, p) = (bts.clone(), p.clone());
            thread::spawn(move || {
                let _ = bts.untrace(&p);
            })
        };
        // Meanwhile P is untraced, torn down, and its slot reused for Q.
        let _ = bts.untrace(&p);
        bts.run_deferred();
        bts.config(&q, &mm, cfg()).unwrap();
        stale.join().unwrap();
        assert!(bts.is_traced(&q), "P's untrace unlinked Q's context");
        bts.untrace(&q).unwrap();
        drain_work(&bts, &work, 0);
        assert_eq!(
            (alloc.live(), mm.locked(), p.refs(), q.refs()),
            (0, 0, 1, 1)
        );
    });
}
