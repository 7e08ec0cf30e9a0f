//! The sleeper table on its own, single-threaded.

mod common;

use std::pin::pin;

use common::XorShift;
use oskit_pv_apf::table::{Enqueue, SleepTable, WaitNode, Waiter, Wake, bucket_index};

#[test]
fn the_hash_spreads_tokens_over_all_buckets() {
    let mut hits = [0u32; 256];
    for token in 0..256 * 64 {
        hits[bucket_index(token, 256)] += 1;
    }
    assert!(hits.iter().all(|&h| h > 0), "an empty bucket");
    assert!(hits.iter().all(|&h| h < 64 * 2), "a hot bucket: {hits:?}");
    assert!((0..1000).all(|t| bucket_index(t, 7) < 7));
}

#[test]
fn a_table_with_pending_dummies_can_move() {
    let table = SleepTable::<u32, 4, 4>::new();
    assert_eq!(table.wake(5, 0, |_| {}), Wake::DummyAdded);
    assert_eq!(table.wake(9, 1, |_| {}), Wake::DummyAdded);
    let moved = Box::new(table);
    assert_eq!(moved.census(None), (0, 2));
    assert_eq!(moved.wake(5, 0, |_| {}), Wake::AlreadyPending);
    let node = pin!(WaitNode::new(&*moved, 5, 0, Waiter::Task(1)));
    assert_eq!(node.as_ref().enqueue(), Enqueue::Ready);
    assert!(node.is_woken());
    assert_eq!(moved.census(None), (0, 1));
}

#[test]
fn a_wake_the_full_pool_drops_makes_unmatched_waits_on_its_cpu_return_at_once() {
    let table = SleepTable::<u32, 1, 4>::new();
    assert_eq!(table.wake(1, 0, |_| {}), Wake::DummyAdded);
    // No room for token 2's early wake.
    assert_eq!(table.wake(2, 0, |_| {}), Wake::Dropped);
    assert_eq!(table.dropped_wakes(), 1);
    assert!(table.wake_lost(0) && !table.wake_lost(1));
    // Its wait must not sleep (nobody would ever wake it): not queued, ends at once.
    let node = pin!(WaitNode::new(&table, 2, 0, Waiter::Task(7)));
    assert_eq!(node.as_ref().enqueue(), Enqueue::WakeLost);
    assert!(node.is_woken());
    assert_eq!(table.census(None), (0, 1));
    // Nor does a wait on another CPU (a host need not pair a token with one vCPU).
    let other = pin!(WaitNode::new(&table, 2, 1, Waiter::Task(8)));
    assert_eq!(other.as_ref().enqueue(), Enqueue::WakeLost);
    // Dummies are still consumed first.
    let first = pin!(WaitNode::new(&table, 1, 0, Waiter::Task(6)));
    assert_eq!(first.as_ref().enqueue(), Enqueue::Ready);
    // A wake-all of CPU 0 clears the mark: waits sleep again.
    table.wake_all(0, |_| {});
    assert!(!table.wake_lost(0));
    let later = pin!(WaitNode::new(&table, 4, 1, Waiter::Task(9)));
    assert_eq!(later.as_ref().enqueue(), Enqueue::Queued);
    assert_eq!(table.wake(4, 1, |_| {}), Wake::Woke(1));
    // CPUs from 63 up share one mark, which no single wake-all below 63 clears.
    let big = SleepTable::<u32, 0, 1>::new();
    assert_eq!(big.wake(9, 64, |_| {}), Wake::Dropped);
    assert!(big.wake_lost(63) && big.wake_lost(100) && !big.wake_lost(62));
}

#[test]
fn colliding_tokens_are_told_apart() {
    let a = 3u32;
    let b = (4..)
        .find(|&t| bucket_index(t, 256) == bucket_index(a, 256))
        .unwrap();
    let table = SleepTable::<u32>::new();
    let na = pin!(WaitNode::new(&table, a, 0, Waiter::Task(10)));
    let nb = pin!(WaitNode::new(&table, b, 0, Waiter::Task(11)));
    assert_eq!(na.as_ref().enqueue(), Enqueue::Queued);
    assert_eq!(nb.as_ref().enqueue(), Enqueue::Queued);
    let mut woken = Vec::new();
    assert_eq!(table.wake(b, 0, |w| woken.push(w)), Wake::Woke(1));
    assert_eq!(woken, [Waiter::Task(11)]);
    assert!(nb.is_woken() && !na.is_woken());
    assert_eq!(table.wake(a, 0, |w| woken.push(w)), Wake::Woke(1));
    assert!(na.is_woken());
}

#[test]
fn a_dropped_waiter_leaves_the_table() {
    let table = SleepTable::<u32>::new();
    {
        let node = pin!(WaitNode::new(&table, 42, 0, Waiter::Task(0)));
        assert_eq!(node.as_ref().enqueue(), Enqueue::Queued);
        assert_eq!(
            node.as_ref().enqueue(),
            Enqueue::Queued,
            "a second enqueue changes nothing"
        );
        assert_eq!(table.census(None), (1, 0));
    }
    assert_eq!(table.census(None), (0, 0));
    assert_eq!(
        table.wake(42, 0, |_| panic!("nobody waits")),
        Wake::DummyAdded
    );
}

/// Random single-threaded sequences against a plain model: the table wakes exactly the
/// waiters the model says, dummies match, and the pool bound holds.
#[test]
fn random_sequences_match_a_model() {
    const D: usize = 6;
    for seed in 1..=if cfg!(miri) { 3 } else { 200 } {
        let mut rng = XorShift::new(seed);
        let table = SleepTable::<usize, D, 8>::new();
        // Boxed pinned nodes: (task, token, cpu, node).
        let mut waiting = Vec::new();
        let mut dummies: Vec<(u32, u32)> = Vec::new();
        let mut dropped = 0u64;
        for step in 0..200 {
            let token = rng.below(12) as u32;
            let cpu = rng.below(2) as u32;
            match rng.below(4) {
                0 | 1 => {
                    let task = step;
                    let node = Box::pin(WaitNode::new(&table, token, cpu, Waiter::Task(task)));
                    let how = node.as_ref().enqueue();
                    if let Some(i) = dummies.iter().position(|&(t, _)| t == token) {
                        assert_eq!(how, Enqueue::Ready);
                        dummies.remove(i);
                    } else {
                        assert_eq!(how, Enqueue::Queued);
                        waiting.push((task, token, cpu, node));
                    }
                }
                2 => {
                    let mut woken = Vec::new();
                    let wake = table.wake(token, cpu, |w| woken.push(w));
                    let expect: Vec<_> = waiting
                        .iter()
                        .filter(|w| w.1 == token)
                        .map(|w| Waiter::Task(w.0))
                        .collect();
                    woken.sort_by_key(|w| match w {
                        Waiter::Task(t) => *t,
                        Waiter::Halted { .. } => usize::MAX,
                    });
                    assert_eq!(woken, expect);
                    if expect.is_empty() {
                        if dummies.iter().any(|&(t, _)| t == token) {
                            assert_eq!(wake, Wake::AlreadyPending);
                        } else if dummies.len() == D {
                            assert_eq!(wake, Wake::Dropped);
                            dropped += 1;
                        } else {
                            assert_eq!(wake, Wake::DummyAdded);
                            dummies.push((token, cpu));
                        }
                    } else {
                        assert_eq!(wake, Wake::Woke(expect.len()));
                    }
                    waiting.retain(|w| {
                        assert_eq!(w.3.is_woken(), w.1 == token);
                        w.1 != token
                    });
                }
                _ => {
                    let all = table.wake_all(cpu, |_| {});
                    let before = (waiting.len(), dummies.len());
                    waiting.retain(|w| w.2 != cpu || !w.3.is_woken());
                    dummies.retain(|d| d.1 != cpu);
                    assert_eq!(all.woken, before.0 - waiting.len());
                    assert_eq!(all.dummies_freed, before.1 - dummies.len());
                    assert!(waiting.iter().all(|w| w.2 != cpu));
                }
            }
            assert_eq!(table.census(None), (waiting.len(), dummies.len()));
            assert_eq!(table.dummies_in_use(), dummies.len());
            assert_eq!(table.dropped_wakes(), dropped);
        }
    }
}
