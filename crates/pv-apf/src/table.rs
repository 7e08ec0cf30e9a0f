//! The sleeper table: tasks waiting for a token, and page-ready wakes that came first.
//!
//! A token hashes to one of `B` buckets (256 by default), each a spinlock over an intrusive
//! list. A waiting task links a [`WaitNode`] that lives on its own stack; a wake for a token
//! nobody waits for yet links a *dummy* node taken from a fixed pool of `D` nodes inside the
//! table, so the memory the table uses never grows, whatever the host sends.
//!
//! Waking early is always harmless: a task that returns from its wait re-executes the faulting
//! access, which at worst faults again. Losing a wake is what must never happen; the only
//! case where the table drops one is a full dummy pool (see [`Wake::Dropped`]).

use core::{cell::Cell, marker::PhantomPinned, pin::Pin, ptr};

use crate::sync::{AtomicBool, AtomicU64, Ordering, SpinGuard, SpinLock};

/// Buckets of a table (`B`), as in the original series (`KVM_TASK_SLEEP_HASHBITS` = 8).
pub const DEFAULT_BUCKETS: usize = 256;
/// Dummy nodes of a table (`D`): wakes that may be pending ahead of their "not present".
pub const DEFAULT_DUMMIES: usize = 64;

/// The bucket of `token` among `buckets`: a multiplicative (golden-ratio) hash, reduced by
/// multiply-shift. With 256 buckets it is the top byte of `token * 0x61c88647`.
pub const fn bucket_index(token: u32, buckets: usize) -> usize {
    let h = token.wrapping_mul(0x61c8_8647);
    ((h as u64 * buckets as u64) >> 32) as usize
}

/// Whom a wake resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiter<T> {
    /// A task that blocked through the scheduler: unblock it.
    Task(T),
    /// A context that could not sleep and halt-polls on CPU `cpu`: kick that CPU.
    Halted {
        /// The CPU that is halting.
        cpu: u32,
    },
}

/// What [`WaitNode::enqueue`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueue {
    /// The wake came first: its dummy was consumed and there is nothing to wait for.
    Ready,
    /// The node is in the table until a wake for its token (or a wake-all of its CPU).
    Queued,
}

/// What [`SleepTable::wake`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Woke this many waiters of the token (more than one only if the host reused a token).
    Woke(usize),
    /// Nobody waited: a dummy now remembers the wake for the "not present" still to come.
    DummyAdded,
    /// Nobody waited and a dummy for the token was already pending (a duplicate wake).
    AlreadyPending,
    /// Nobody waited and the dummy pool was empty: the wake is dropped and counted in
    /// [`SleepTable::dropped_wakes`]. A later wait for the token sleeps until a wake-all of its
    /// CPU. A correct host keeps at most a handful of wakes ahead of their faults, so this
    /// means a broken or hostile host, which could hang that task anyway by never sending the
    /// wake; what it cannot do is make the guest allocate memory.
    Dropped,
}

/// What [`SleepTable::wake_all`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WakeAll {
    /// Waiters of the CPU that were woken.
    pub woken: usize,
    /// Dummies of the CPU that were discarded (their faults will never come).
    pub dummies_freed: usize,
}

#[derive(Clone, Copy)]
enum Kind<T> {
    Waiter(Waiter<T>),
    Dummy(usize),
}

/// A list node. Its `Cell`s are read and written only by whoever holds the lock of the bucket
/// it is linked in (or, while unlinked, by its owner: the waiting task or the pool slot's
/// allocator).
struct Node<T> {
    next: Cell<*const Node<T>>,
    token: Cell<u32>,
    cpu: Cell<u32>,
    kind: Cell<Kind<T>>,
    /// In a bucket list. Cleared (Release) by a waker as its very last access to the node, so
    /// a waiter that sees it clear (Acquire) may free the node.
    linked: AtomicBool,
}

impl<T: Copy> Node<T> {
    #[cfg(not(loom))]
    const fn new(token: u32, cpu: u32, kind: Kind<T>) -> Self {
        Self {
            next: Cell::new(ptr::null()),
            token: Cell::new(token),
            cpu: Cell::new(cpu),
            kind: Cell::new(kind),
            linked: AtomicBool::new(false),
        }
    }

    #[cfg(loom)]
    fn new(token: u32, cpu: u32, kind: Kind<T>) -> Self {
        Self {
            next: Cell::new(ptr::null()),
            token: Cell::new(token),
            cpu: Cell::new(cpu),
            kind: Cell::new(kind),
            linked: AtomicBool::new(false),
        }
    }

    fn is_dummy(&self) -> bool {
        matches!(self.kind.get(), Kind::Dummy(_))
    }
}

/// One hash chain. Invariant: every node reachable from `head` is alive and has `linked` set.
struct Bucket<T> {
    head: *const Node<T>,
}

// SAFETY: a bucket only holds pointers; the nodes they point to are handed between CPUs under
// the bucket's lock, and `T` (the task handle inside them) is `Send`.
unsafe impl<T: Send> Send for Bucket<T> {}

impl<T: Copy> Bucket<T> {
    #[cfg(not(loom))]
    const EMPTY: Self = Self { head: ptr::null() };

    /// The first node matching `pred`. `&self` comes from a guard, so the lock is held; the
    /// node returned may be used only while that guard lives (callers use it at once), which
    /// is why its lifetime is not tied to `&self`: the caller may then `unlink` it.
    fn find<'n>(&self, mut pred: impl FnMut(&Node<T>) -> bool) -> Option<&'n Node<T>> {
        let mut cur = self.head;
        while !cur.is_null() {
            // SAFETY: by the bucket invariant a linked node is alive, and we hold the lock
            // that makes its cells ours to read.
            let node = unsafe { &*cur };
            if pred(node) {
                return Some(node);
            }
            cur = node.next.get();
        }
        None
    }

    /// Links `node` at the head. The caller owns the unlinked node and holds the lock.
    fn push(&mut self, node: &Node<T>) {
        node.next.set(self.head);
        node.linked.store(true, Ordering::Relaxed);
        self.head = node;
    }

    /// Unlinks `target`, which is in this list. `linked` stays set: the caller clears it last.
    fn unlink(&mut self, target: &Node<T>) {
        let target: *const Node<T> = target;
        let mut prev: *const Node<T> = ptr::null();
        let mut cur = self.head;
        while !cur.is_null() {
            // SAFETY: as in `find`: linked nodes are alive and their cells are ours under the
            // lock.
            let node = unsafe { &*cur };
            let next = node.next.get();
            if cur == target {
                if prev.is_null() {
                    self.head = next;
                } else {
                    // SAFETY: `prev` is a linked node we just walked past; see above.
                    unsafe { &*prev }.next.set(next);
                }
                node.next.set(ptr::null());
                return;
            }
            prev = cur;
            cur = next;
        }
        debug_assert!(false, "unlinking a node that is not in its bucket");
    }
}

/// The fixed pool dummies come from.
struct Pool<T, const D: usize> {
    nodes: [Node<T>; D],
    used: [AtomicBool; D],
}

impl<T: Copy, const D: usize> Pool<T, D> {
    fn alloc(&self) -> Option<usize> {
        (0..D).find(|&i| {
            self.used[i]
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        })
    }

    fn free(&self, slot: usize) {
        self.used[slot].store(false, Ordering::Release);
    }
}

/// Tasks sleeping on async-page-fault tokens, with room for `D` early wakes, in `B` buckets.
///
/// `T` is the scheduler's task handle. All memory is inside the value: put it in a `static`.
pub struct SleepTable<T, const D: usize = DEFAULT_DUMMIES, const B: usize = DEFAULT_BUCKETS> {
    buckets: [SpinLock<Bucket<T>>; B],
    pool: Pool<T, D>,
    dropped: AtomicU64,
}

// SAFETY: the node cells reachable from the table (pool nodes, and waiters linked into it)
// are accessed only under the lock of the bucket they are linked in, or by the single owner
// of an unlinked node (a pool slot is owned by whoever won its `used` flag). Task handles
// cross CPUs inside them, hence `T: Send`.
unsafe impl<T: Send, const D: usize, const B: usize> Sync for SleepTable<T, D, B> {}
// SAFETY: moving the table moves the pool nodes and the bucket heads with it; it can only
// move while nothing borrows it, so no waiter is linked into it then.
unsafe impl<T: Send, const D: usize, const B: usize> Send for SleepTable<T, D, B> {}

impl<T: Copy, const D: usize, const B: usize> SleepTable<T, D, B> {
    /// An empty table (usable in a `static`).
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        const { assert!(B > 0, "a sleep table needs at least one bucket") };
        Self {
            buckets: [const { SpinLock::new(Bucket::EMPTY) }; B],
            pool: Pool {
                nodes: [const { Node::new(0, 0, Kind::Dummy(0)) }; D],
                used: [const { AtomicBool::new(false) }; D],
            },
            dropped: AtomicU64::new(0),
        }
    }

    /// An empty table.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            buckets: core::array::from_fn(|_| SpinLock::new(Bucket { head: ptr::null() })),
            pool: Pool {
                nodes: core::array::from_fn(|_| Node::new(0, 0, Kind::Dummy(0))),
                used: core::array::from_fn(|_| AtomicBool::new(false)),
            },
            dropped: AtomicU64::new(0),
        }
    }

    fn bucket(&self, token: u32) -> SpinGuard<'_, Bucket<T>> {
        self.buckets[bucket_index(token, B)].lock()
    }

    /// Resumes every waiter of `token`; if there is none, leaves a dummy (from CPU `cpu`) so
    /// that the coming wait for `token` returns at once. `resume` runs under the bucket lock.
    pub fn wake(&self, token: u32, cpu: u32, mut resume: impl FnMut(Waiter<T>)) -> Wake {
        let mut bucket = self.bucket(token);
        let mut woken = 0;
        while let Some(node) = bucket.find(|n| n.token.get() == token && !n.is_dummy()) {
            bucket.unlink(node);
            let waiter = release_waiter(node);
            resume(waiter);
            woken += 1;
        }
        if woken > 0 {
            return Wake::Woke(woken);
        }
        if bucket.find(|n| n.token.get() == token).is_some() {
            return Wake::AlreadyPending;
        }
        let Some(slot) = self.pool.alloc() else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Wake::Dropped;
        };
        let node = &self.pool.nodes[slot];
        node.token.set(token);
        node.cpu.set(cpu);
        node.kind.set(Kind::Dummy(slot));
        bucket.push(node);
        Wake::DummyAdded
    }

    /// Resumes every waiter that faulted on CPU `cpu` and discards that CPU's dummies: the
    /// host has nothing pending for the CPU any more (page-ready token `0xffffffff`, or the CPU
    /// is going offline). Other CPUs' entries are left alone.
    pub fn wake_all(&self, cpu: u32, mut resume: impl FnMut(Waiter<T>)) -> WakeAll {
        let mut done = WakeAll::default();
        for bucket in &self.buckets {
            let mut bucket = bucket.lock();
            while let Some(node) = bucket.find(|n| n.cpu.get() == cpu) {
                bucket.unlink(node);
                match node.kind.get() {
                    Kind::Dummy(slot) => {
                        node.linked.store(false, Ordering::Relaxed);
                        self.pool.free(slot);
                        done.dummies_freed += 1;
                    }
                    Kind::Waiter(_) => {
                        resume(release_waiter(node));
                        done.woken += 1;
                    }
                }
            }
        }
        done
    }

    /// Dummies currently pending (at most `D`).
    pub fn dummies_in_use(&self) -> usize {
        self.pool
            .used
            .iter()
            .filter(|u| u.load(Ordering::Relaxed))
            .count()
    }

    /// Wakes dropped so far because the dummy pool was empty (see [`Wake::Dropped`]).
    pub fn dropped_wakes(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Counts the entries of CPU `cpu` (`None`: of every CPU) as `(waiters, dummies)`. Takes
    /// every bucket lock in turn: for tests and diagnostics, not for hot paths.
    pub fn census(&self, cpu: Option<u32>) -> (usize, usize) {
        let (mut waiters, mut dummies) = (0, 0);
        for bucket in &self.buckets {
            let bucket = bucket.lock();
            bucket.find(|n| {
                if cpu.is_none_or(|c| c == n.cpu.get()) {
                    if n.is_dummy() {
                        dummies += 1;
                    } else {
                        waiters += 1;
                    }
                }
                false
            });
        }
        (waiters, dummies)
    }
}

#[cfg(not(loom))]
impl<T: Copy, const D: usize, const B: usize> Default for SleepTable<T, D, B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, const D: usize, const B: usize> core::fmt::Debug for SleepTable<T, D, B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SleepTable")
            .field("buckets", &B)
            .field("dummy_capacity", &D)
            .field("dropped_wakes", &self.dropped.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Takes the waiter out of an unlinked waiter node and lets its owner go. Must be the last
/// access to `node`: once `linked` reads clear, the waiting task may return and free it.
fn release_waiter<T: Copy>(node: &Node<T>) -> Waiter<T> {
    let Kind::Waiter(waiter) = node.kind.get() else {
        unreachable!("release_waiter on a dummy")
    };
    node.linked.store(false, Ordering::Release);
    waiter
}

/// A task's entry in a [`SleepTable`] while it waits for one token. It lives on the waiting
/// task's stack: pin it (`core::pin::pin!`), [`enqueue`](Self::enqueue) it, then sleep until
/// [`is_woken`](Self::is_woken). Dropping it while still queued takes it out of the table.
pub struct WaitNode<'t, T: Copy, const D: usize = DEFAULT_DUMMIES, const B: usize = DEFAULT_BUCKETS>
{
    table: &'t SleepTable<T, D, B>,
    node: Node<T>,
    enqueued: Cell<bool>,
    _pinned: PhantomPinned,
}

impl<'t, T: Copy, const D: usize, const B: usize> WaitNode<'t, T, D, B> {
    /// A node for `waiter`, who faulted on CPU `cpu` and waits for `token`.
    pub fn new(table: &'t SleepTable<T, D, B>, token: u32, cpu: u32, waiter: Waiter<T>) -> Self {
        Self {
            table,
            node: Node::new(token, cpu, Kind::Waiter(waiter)),
            enqueued: Cell::new(false),
            _pinned: PhantomPinned,
        }
    }

    /// The token waited for.
    pub fn token(&self) -> u32 {
        self.node.token.get()
    }

    /// Consumes the token's dummy if its wake came first, or links the node into the table.
    /// A second call changes nothing and reports `Ready` once the node was woken.
    pub fn enqueue(self: Pin<&Self>) -> Enqueue {
        let this = self.get_ref();
        if this.enqueued.replace(true) {
            return if this.is_woken() {
                Enqueue::Ready
            } else {
                Enqueue::Queued
            };
        }
        let token = this.token();
        let mut bucket = this.table.bucket(token);
        if let Some(dummy) = bucket.find(|n| n.token.get() == token && n.is_dummy()) {
            bucket.unlink(dummy);
            let Kind::Dummy(slot) = dummy.kind.get() else {
                unreachable!("found a dummy")
            };
            dummy.linked.store(false, Ordering::Relaxed);
            this.table.pool.free(slot);
            return Enqueue::Ready;
        }
        // The node is pinned (we are behind `Pin`), and `Drop` unlinks it before its memory
        // goes, so the list never holds a dangling pointer.
        bucket.push(&this.node);
        Enqueue::Queued
    }

    /// Whether the node was enqueued and then woken (or found its wake already there).
    pub fn is_woken(&self) -> bool {
        self.enqueued.get() && !self.node.linked.load(Ordering::Acquire)
    }
}

impl<T: Copy, const D: usize, const B: usize> Drop for WaitNode<'_, T, D, B> {
    fn drop(&mut self) {
        if self.node.linked.load(Ordering::Acquire) {
            let mut bucket = self.table.bucket(self.node.token.get());
            if self.node.linked.load(Ordering::Relaxed) {
                bucket.unlink(&self.node);
                self.node.linked.store(false, Ordering::Relaxed);
            }
        }
    }
}

impl<T: Copy, const D: usize, const B: usize> core::fmt::Debug for WaitNode<'_, T, D, B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("WaitNode")
            .field("token", &self.token())
            .field("enqueued", &self.enqueued.get())
            .field("woken", &self.is_woken())
            .finish_non_exhaustive()
    }
}
