//! Deferred work: functions queued from any context (interrupt handlers and interrupts-off
//! paths included) and run later, in order, by one kernel task (`kworker`) with interrupts on.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::{
    spin::SpinLock,
    task::sched::{self, TaskId},
};

/// The most work items waiting at once.
pub const CAPACITY: usize = 32;

/// A work item: a function and its argument.
pub type Work = fn(u64);

struct Queue {
    items: [(usize, u64); CAPACITY],
    head: usize,
    len: usize,
    worker: Option<TaskId>,
}

static QUEUE: SpinLock<Queue> = SpinLock::new(Queue {
    items: [(0, 0); CAPACITY],
    head: 0,
    len: 0,
    worker: None,
});

/// Items queued and items run since boot.
static QUEUED: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicU64 = AtomicU64::new(0);

/// Starts the worker task. Once, before anything is queued.
pub fn init() {
    let worker = sched::spawn("kworker", worker, 0).expect("cannot start the work-queue task");
    QUEUE.lock().worker = Some(worker);
}

/// Queues `work(arg)`; false when the queue is full. Safe from interrupt context.
pub fn queue(work: Work, arg: u64) -> bool {
    let worker = {
        let mut q = QUEUE.lock();
        if q.len == CAPACITY {
            return false;
        }
        let at = (q.head + q.len) % CAPACITY;
        q.items[at] = (work as usize, arg);
        q.len += 1;
        QUEUED.fetch_add(1, Ordering::Relaxed);
        q.worker
    };
    // A wake-up that races ahead of the worker's block is kept pending, never lost.
    if let Some(worker) = worker {
        sched::unblock(worker);
    }
    true
}

/// Waits (sleeping) until every item queued before the call has run. Task context only, and
/// not from the worker itself.
pub fn flush() {
    let target = QUEUED.load(Ordering::Relaxed);
    while DONE.load(Ordering::Acquire) < target {
        sched::sleep_ticks(1);
    }
}

fn worker(_: u64) -> i64 {
    loop {
        let next = {
            let mut q = QUEUE.lock();
            (q.len > 0).then(|| {
                let item = q.items[q.head];
                q.head = (q.head + 1) % CAPACITY;
                q.len -= 1;
                item
            })
        };
        match next {
            Some((work, arg)) => {
                // SAFETY: only `queue` stores items, and it stores `Work` values.
                let work = unsafe { core::mem::transmute::<usize, Work>(work) };
                work(arg);
                DONE.fetch_add(1, Ordering::Release);
            }
            None => sched::block_current(),
        }
    }
}
