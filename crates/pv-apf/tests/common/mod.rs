//! A scheduler made of std threads: a task is a registered thread, block is `park`.
#![allow(dead_code, unreachable_pub)]

use std::{
    cell::Cell,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread::Thread,
};

use oskit_pv_apf::Scheduler;

thread_local! {
    static TASK: Cell<usize> = const { Cell::new(usize::MAX) };
    static CPU: Cell<u32> = const { Cell::new(0) };
    static CAN_SLEEP: Cell<bool> = const { Cell::new(true) };
}

/// Threads as tasks. `unblocks[t]` counts the wakes task `t` received.
pub struct ThreadSched {
    threads: Mutex<Vec<Thread>>,
    pub unblocks: Vec<AtomicUsize>,
    pub kicks: AtomicUsize,
}

impl ThreadSched {
    pub fn new(tasks: usize) -> Self {
        Self {
            threads: Mutex::new(Vec::new()),
            unblocks: (0..tasks).map(|_| AtomicUsize::new(0)).collect(),
            kicks: AtomicUsize::new(0),
        }
    }

    /// Registers the calling thread as a task on `cpu`; returns its task number.
    pub fn enter(&self, cpu: u32, can_sleep: bool) -> usize {
        let mut threads = self.threads.lock().unwrap();
        threads.push(std::thread::current());
        let id = threads.len() - 1;
        assert!(id < self.unblocks.len(), "more tasks than declared");
        TASK.with(|t| t.set(id));
        CPU.with(|c| c.set(cpu));
        CAN_SLEEP.with(|c| c.set(can_sleep));
        id
    }

    /// Moves the calling thread (an interrupt handler, say) onto `cpu`.
    pub fn on_cpu(cpu: u32) {
        CPU.with(|c| c.set(cpu));
    }

    pub fn unblocked(&self, task: usize) -> usize {
        self.unblocks[task].load(Ordering::SeqCst)
    }
}

impl Scheduler for ThreadSched {
    type Task = usize;

    fn current_task(&self) -> usize {
        TASK.with(Cell::get)
    }

    fn current_cpu(&self) -> u32 {
        CPU.with(Cell::get)
    }

    fn can_sleep(&self) -> bool {
        CAN_SLEEP.with(Cell::get)
    }

    fn block(&self) {
        std::thread::park();
    }

    fn unblock(&self, task: usize) {
        self.unblocks[task].fetch_add(1, Ordering::SeqCst);
        self.threads.lock().unwrap()[task].unpark();
    }

    fn halt(&self) {
        std::thread::yield_now();
    }

    fn kick(&self, _cpu: u32) {
        self.kicks.fetch_add(1, Ordering::SeqCst);
    }
}

/// A tiny seeded xorshift64* generator.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
