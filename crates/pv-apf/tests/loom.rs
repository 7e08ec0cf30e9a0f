//! Model checking of the sleeper table with loom.
//!
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p oskit-pv-apf --release --test loom`
#![cfg(loom)]

use std::pin::pin;

use loom::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread::{self, Thread},
};
use oskit_pv_apf::table::{Enqueue, SleepTable, WaitNode, Waiter, Wake, bucket_index};

/// Task `task` waits for `token` on `cpu`, parking until woken; returns how it went.
fn wait<const D: usize, const B: usize>(
    table: &SleepTable<usize, D, B>,
    token: u32,
    cpu: u32,
    task: usize,
) -> Enqueue {
    let node = pin!(WaitNode::new(table, token, cpu, Waiter::Task(task)));
    let node = node.into_ref();
    let how = node.enqueue();
    if how == Enqueue::Queued {
        while !node.is_woken() {
            thread::park();
        }
    }
    how
}

/// Unparks `threads[task]` and counts it in `unblocks[task]`.
fn resume(threads: &[Thread], unblocks: &[AtomicUsize], waiter: Waiter<usize>) {
    let Waiter::Task(task) = waiter else {
        panic!("no halting waiters here")
    };
    unblocks[task].fetch_add(1, Ordering::SeqCst);
    threads[task].unpark();
}

fn counters(n: usize) -> Arc<Vec<AtomicUsize>> {
    Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect())
}

#[test]
fn wait_and_wake_in_either_order() {
    loom::model(|| {
        let table = Arc::new(SleepTable::<usize, 2, 4>::new());
        let unblocks = counters(1);
        let main = thread::current();
        let waker = {
            let (table, unblocks) = (table.clone(), unblocks.clone());
            thread::spawn(move || table.wake(7, 0, |w| resume(&[main.clone()], &unblocks, w)))
        };
        let how = wait(&table, 7, 0, 0);
        let woke = waker.join().unwrap();
        match how {
            Enqueue::Ready => {
                assert_eq!(woke, Wake::DummyAdded);
                assert_eq!(unblocks[0].load(Ordering::SeqCst), 0);
            }
            Enqueue::Queued => {
                assert_eq!(woke, Wake::Woke(1));
                assert_eq!(unblocks[0].load(Ordering::SeqCst), 1);
            }
            Enqueue::WakeLost => panic!("no wake can be dropped: the pool is never full here"),
        }
        assert_eq!(table.census(None), (0, 0));
        assert_eq!(table.dummies_in_use(), 0);
    });
}

#[test]
fn wake_all_races_a_wait_and_leaves_other_cpus_alone() {
    loom::model(|| {
        let table = Arc::new(SleepTable::<usize, 2, 2>::new());
        let unblocks = counters(2);
        // A task of CPU 1 already waits (its node is parked here, nobody blocks on it).
        let other = pin!(WaitNode::new(&*table, 9, 1, Waiter::Task(1)));
        let other = other.into_ref();
        assert_eq!(other.enqueue(), Enqueue::Queued);

        let sleeper = {
            let table = table.clone();
            thread::spawn(move || wait(&table, 7, 0, 0))
        };
        let threads = [sleeper.thread().clone(), thread::current()];
        let all = table.wake_all(0, |w| resume(&threads, &unblocks, w));
        if all.woken == 0 {
            // The wait came after the wake-all; its own wake follows, as a host's would.
            table.wake(7, 0, |w| resume(&threads, &unblocks, w));
        }
        let how = sleeper.join().unwrap();
        let expected = usize::from(how == Enqueue::Queued);
        assert_eq!(unblocks[0].load(Ordering::SeqCst), expected);
        assert!(!other.is_woken(), "wake-all of CPU 0 woke a CPU 1 task");
        assert_eq!(unblocks[1].load(Ordering::SeqCst), 0);
        assert_eq!(table.census(None), (1, 0));
        assert_eq!(table.dummies_in_use(), 0);
    });
}

/// Two tokens that share a bucket among the default 256.
fn colliding_tokens() -> (u32, u32) {
    let a = 1;
    let b = (2..)
        .find(|&t| bucket_index(t, 256) == bucket_index(a, 256))
        .unwrap();
    (a, b)
}

#[test]
fn two_tokens_in_one_bucket() {
    let (a, b) = colliding_tokens();
    loom::model(move || {
        let table = Arc::new(SleepTable::<usize, 2>::new());
        let unblocks = counters(2);
        let other = {
            let table = table.clone();
            thread::spawn(move || wait(&table, b, 0, 1))
        };
        let threads = vec![thread::current(), other.thread().clone()];
        let waker = {
            let (table, unblocks) = (table.clone(), unblocks.clone());
            thread::spawn(move || {
                let wb = table.wake(b, 0, |w| resume(&threads, &unblocks, w));
                let wa = table.wake(a, 0, |w| resume(&threads, &unblocks, w));
                (wa, wb)
            })
        };
        let how_a = wait(&table, a, 0, 0);
        let how_b = other.join().unwrap();
        let (wa, wb) = waker.join().unwrap();
        for (how, wake, task) in [(how_a, wa, 0), (how_b, wb, 1)] {
            let n = unblocks[task].load(Ordering::SeqCst);
            match how {
                Enqueue::Ready => assert_eq!((wake, n), (Wake::DummyAdded, 0)),
                Enqueue::Queued => assert_eq!((wake, n), (Wake::Woke(1), 1)),
                Enqueue::WakeLost => panic!("no wake can be dropped: the pool is never full here"),
            }
        }
        assert_eq!(table.census(None), (0, 0));
        assert_eq!(table.dummies_in_use(), 0);
    });
}

#[test]
fn a_waiter_dropped_while_a_wake_runs() {
    loom::model(|| {
        let table = Arc::new(SleepTable::<usize, 2, 2>::new());
        let unblocks = counters(1);
        let main = thread::current();
        let waker = {
            let (table, unblocks) = (table.clone(), unblocks.clone());
            thread::spawn(move || table.wake(3, 0, |w| resume(&[main.clone()], &unblocks, w)))
        };
        {
            let node = pin!(WaitNode::new(&*table, 3, 0, Waiter::Task(0)));
            node.into_ref().enqueue();
            // Dropped here without waiting: cancelled.
        }
        let woke = waker.join().unwrap();
        let (waiters, dummies) = table.census(None);
        assert_eq!(waiters, 0);
        match woke {
            Wake::Woke(1) => assert_eq!(dummies, 0),
            // Either the wake came before the node (whose enqueue took its dummy), or after
            // the cancel (and left a dummy).
            Wake::DummyAdded => assert!(dummies <= 1),
            other => panic!("{other:?}"),
        }
    });
}
