//! The sleeper table: tasks waiting for a token, and page-ready wakes that came first.
//!
//! A token hashes to one of `B` buckets (256 by default), each a spinlock over an intrusive
//! list of waiters and a chain of dummies. A waiting task links a [`WaitNode`] that lives on its
//! own stack; a wake for a token nobody waits for yet chains a *dummy* taken from a fixed pool
//! of `D` inside the table, so the memory the table uses never grows, whatever the host sends.
//!
//! Waking early is always harmless: a task that returns from its wait re-executes the faulting
//! access, which at worst faults again. Losing a wake is what must never happen. When the
//! dummy pool is full the table cannot remember a wake's token (see [`Wake::Dropped`]); it
//! remembers instead that the CPU lost one, and every later wait that finds no dummy returns
//! at once ([`Enqueue::WakeLost`]) until a wake-all of that CPU: a spurious re-fault instead
//! of a task that sleeps forever.

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
    /// No dummy, but a CPU dropped a wake since that CPU's last wake-all (the pool was full):
    /// that wake may have been this one's, so the node was not queued and the wait ends at
    /// once. The faulting access re-executes (and faults again if the page is still
    /// out, which costs the host a synchronous fault, not a hang).
    WakeLost,
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
    /// Nobody waited and the dummy pool was empty: the token is not remembered (counted in
    /// [`SleepTable::dropped_wakes`]); instead the CPU is marked, so that every later wait
    /// that finds no dummy returns at once ([`Enqueue::WakeLost`]) until a wake-all of that
    /// CPU. No wait sleeps forever for want of a dummy, and the guest never allocates,
    /// whatever the host sends. A correct host keeps at most a handful of wakes ahead of their
    /// faults, so this takes a broken or hostile host.
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

/// A waiter's list node, on the waiting task's stack. `token`, `cpu` and `waiter` never change;
/// `next` is read and written only under the lock of the bucket the node is linked in.
struct Node<T> {
    next: Cell<*const Node<T>>,
    token: u32,
    cpu: u32,
    waiter: Waiter<T>,
    /// In a bucket list. Cleared (Release) by a waker as its very last access to the node, so
    /// a waiter that sees it clear (Acquire) may free the node.
    linked: AtomicBool,
}

/// Index of no dummy: the end of a dummy chain.
const NONE: u32 = u32::MAX;

/// A pending early wake. Chained by index (not by pointer) so the table stays movable. Its
/// cells are touched only under the lock of the bucket whose chain holds it, or by the one
/// who won its `used` flag while it is in no chain.
struct Dummy {
    token: Cell<u32>,
    cpu: Cell<u32>,
    next: Cell<u32>,
}

impl Dummy {
    const fn free() -> Self {
        Self {
            token: Cell::new(0),
            cpu: Cell::new(0),
            next: Cell::new(NONE),
        }
    }
}

/// One hash chain of waiters, and one of dummies. Invariant: every node reachable from
/// `waiters` is alive and has `linked` set; every index in the `dummies` chain is a used slot.
struct Bucket<T> {
    waiters: *const Node<T>,
    dummies: u32,
}

// SAFETY: a bucket only holds pointers to nodes that are handed between CPUs under the bucket's
// lock; the `T` (task handle) inside them is `Send`.
unsafe impl<T: Send> Send for Bucket<T> {}

impl<T: Copy> Bucket<T> {
    #[cfg(not(loom))]
    const EMPTY: Self = Self {
        waiters: ptr::null(),
        dummies: NONE,
    };

    /// The first waiter matching `pred`. `&self` comes from a guard, so the lock is held; the
    /// node returned may be used only while that guard lives (callers use it at once), which
    /// is why its lifetime is not tied to `&self`: the caller may then `unlink` it.
    fn find<'n>(&self, mut pred: impl FnMut(&Node<T>) -> bool) -> Option<&'n Node<T>> {
        let mut cur = self.waiters;
        while !cur.is_null() {
            // SAFETY: by the bucket invariant a linked node is alive, and we hold the lock
            // that makes its `next` ours to read.
            let node = unsafe { &*cur };
            if pred(node) {
                return Some(node);
            }
            cur = node.next.get();
        }
        None
    }

    /// Links `node` at the head. The caller owns the unlinked, pinned node and holds the lock.
    fn push(&mut self, node: &Node<T>) {
        node.next.set(self.waiters);
        node.linked.store(true, Ordering::Relaxed);
        self.waiters = node;
    }

    /// Unlinks `target`, which is in this list. `linked` stays set: the caller clears it last.
    fn unlink(&mut self, target: &Node<T>) {
        let target: *const Node<T> = target;
        let mut prev: *const Node<T> = ptr::null();
        let mut cur = self.waiters;
        while !cur.is_null() {
            // SAFETY: as in `find`: linked nodes are alive and their `next` is ours under the
            // lock.
            let node = unsafe { &*cur };
            let next = node.next.get();
            if cur == target {
                if prev.is_null() {
                    self.waiters = next;
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
struct Pool<const D: usize> {
    slots: [Dummy; D],
    used: [AtomicBool; D],
}

impl<const D: usize> Pool<D> {
    fn alloc(&self) -> Option<u32> {
        (0..D)
            .find(|&i| {
                self.used[i]
                    .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            })
            .map(|i| i as u32)
    }

    fn slot(&self, index: u32) -> &Dummy {
        &self.slots[index as usize]
    }

    /// The first dummy of `bucket`'s chain matching `pred`, with its predecessor.
    fn find<T>(
        &self,
        bucket: &Bucket<T>,
        mut pred: impl FnMut(&Dummy) -> bool,
    ) -> Option<(u32, u32)> {
        let (mut prev, mut cur) = (NONE, bucket.dummies);
        while cur != NONE {
            let dummy = self.slot(cur);
            if pred(dummy) {
                return Some((prev, cur));
            }
            (prev, cur) = (cur, dummy.next.get());
        }
        None
    }

    /// Takes `index` (found after `prev`) out of `bucket`'s chain and frees it.
    fn remove<T>(&self, bucket: &mut Bucket<T>, (prev, index): (u32, u32)) {
        let next = self.slot(index).next.get();
        if prev == NONE {
            bucket.dummies = next;
        } else {
            self.slot(prev).next.set(next);
        }
        self.used[index as usize].store(false, Ordering::Release);
    }
}

/// The lost-wake mark of CPU `cpu`: one bit per CPU below 63; CPUs from 63 up share bit 63
/// (a wake lost on one of them makes unmatched waits on all of them return early: spurious
/// re-faults, still bounded and never a hang).
const fn lost_bit(cpu: u32) -> u64 {
    1 << (if cpu < 63 { cpu } else { 63 })
}

/// Tasks sleeping on async-page-fault tokens, with room for `D` early wakes, in `B` buckets.
///
/// `T` is the scheduler's task handle. All memory is inside the value: put it in a `static`.
pub struct SleepTable<T, const D: usize = DEFAULT_DUMMIES, const B: usize = DEFAULT_BUCKETS> {
    buckets: [SpinLock<Bucket<T>>; B],
    pool: Pool<D>,
    dropped: AtomicU64,
    /// CPUs that dropped a wake since their last wake-all ([`lost_bit`]).
    lost: AtomicU64,
}

// SAFETY: the cells reachable from the table (dummy slots, and the `next` of waiters linked
// into it) are accessed only under the lock of the bucket whose chain holds them, or by the
// single owner of an unchained slot (whoever won its `used` flag). Task handles cross CPUs
// inside waiter nodes, hence `T: Send`.
unsafe impl<T: Send, const D: usize, const B: usize> Sync for SleepTable<T, D, B> {}

impl<T: Copy, const D: usize, const B: usize> SleepTable<T, D, B> {
    /// An empty table (usable in a `static`).
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        const {
            assert!(B > 0, "a sleep table needs at least one bucket");
            assert!(D < NONE as usize, "too many dummies");
        };
        Self {
            buckets: [const { SpinLock::new(Bucket::EMPTY) }; B],
            pool: Pool {
                slots: [const { Dummy::free() }; D],
                used: [const { AtomicBool::new(false) }; D],
            },
            dropped: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        }
    }

    /// An empty table.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            buckets: core::array::from_fn(|_| {
                SpinLock::new(Bucket {
                    waiters: ptr::null(),
                    dummies: NONE,
                })
            }),
            pool: Pool {
                slots: core::array::from_fn(|_| Dummy::free()),
                used: core::array::from_fn(|_| AtomicBool::new(false)),
            },
            dropped: AtomicU64::new(0),
            lost: AtomicU64::new(0),
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
        while let Some(node) = bucket.find(|n| n.token == token) {
            bucket.unlink(node);
            resume(release_waiter(node));
            woken += 1;
        }
        if woken > 0 {
            return Wake::Woke(woken);
        }
        if self
            .pool
            .find(&bucket, |d| d.token.get() == token)
            .is_some()
        {
            return Wake::AlreadyPending;
        }
        let Some(index) = self.pool.alloc() else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            // Under the bucket lock: a wait for `token` (same bucket) that comes after this
            // wake sees the mark (the lock orders them).
            self.lost.fetch_or(lost_bit(cpu), Ordering::Relaxed);
            return Wake::Dropped;
        };
        let dummy = self.pool.slot(index);
        dummy.token.set(token);
        dummy.cpu.set(cpu);
        dummy.next.set(bucket.dummies);
        bucket.dummies = index;
        Wake::DummyAdded
    }

    /// Resumes every waiter that faulted on CPU `cpu` and discards that CPU's dummies: the
    /// host has nothing pending for the CPU any more (page-ready token `0xffffffff`, or the CPU
    /// is going offline). Other CPUs' entries are left alone.
    pub fn wake_all(&self, cpu: u32, mut resume: impl FnMut(Waiter<T>)) -> WakeAll {
        let mut done = WakeAll::default();
        // Nothing is pending for the CPU any more, so no wake of it can be lost: waits that
        // find no dummy sleep again. (CPUs from 63 up share a mark: only CPU 63's wake-all
        // would clear it for all, so leave it for them: they keep returning early.)
        if cpu < 63 {
            self.lost.fetch_and(!lost_bit(cpu), Ordering::Relaxed);
        }
        for bucket in &self.buckets {
            let mut bucket = bucket.lock();
            while let Some(node) = bucket.find(|n| n.cpu == cpu) {
                bucket.unlink(node);
                resume(release_waiter(node));
                done.woken += 1;
            }
            while let Some(found) = self.pool.find(&bucket, |d| d.cpu.get() == cpu) {
                self.pool.remove(&mut bucket, found);
                done.dummies_freed += 1;
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

    /// Whether CPU `cpu` dropped a wake since its last wake-all; while any CPU has, waits that
    /// find no dummy return at once ([`Enqueue::WakeLost`]).
    pub fn wake_lost(&self, cpu: u32) -> bool {
        self.lost.load(Ordering::Relaxed) & lost_bit(cpu) != 0
    }

    /// Counts the entries of CPU `cpu` (`None`: of every CPU) as `(waiters, dummies)`. Takes
    /// every bucket lock in turn: for tests and diagnostics, not for hot paths.
    pub fn census(&self, cpu: Option<u32>) -> (usize, usize) {
        let (mut waiters, mut dummies) = (0, 0);
        for bucket in &self.buckets {
            let bucket = bucket.lock();
            bucket.find(|n| {
                waiters += usize::from(cpu.is_none_or(|c| c == n.cpu));
                false
            });
            self.pool.find(&bucket, |d| {
                dummies += usize::from(cpu.is_none_or(|c| c == d.cpu.get()));
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

/// Lets the owner of an unlinked waiter node go, returning whom to resume. Must be the last
/// access to `node`: once `linked` reads clear, the waiting task may return and free it.
fn release_waiter<T: Copy>(node: &Node<T>) -> Waiter<T> {
    let waiter = node.waiter;
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
            node: Node {
                next: Cell::new(ptr::null()),
                token,
                cpu,
                waiter,
                linked: AtomicBool::new(false),
            },
            enqueued: Cell::new(false),
            _pinned: PhantomPinned,
        }
    }

    /// The token waited for.
    pub fn token(&self) -> u32 {
        self.node.token
    }

    /// Consumes the token's dummy if its wake came first, or links the node into the table
    /// (unless its CPU lost a wake: [`Enqueue::WakeLost`], not linked). A second call changes
    /// nothing and reports `Ready` once the node was woken (or was never linked).
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
        let pool = &this.table.pool;
        if let Some(found) = pool.find(&bucket, |d| d.token.get() == token) {
            pool.remove(&mut bucket, found);
            return Enqueue::Ready;
        }
        // KVM pairs a token's not present and page ready on one vCPU, but a host that does
        // not could have dropped this token's wake on another CPU: any mark counts.
        if this.table.lost.load(Ordering::Relaxed) != 0 {
            return Enqueue::WakeLost;
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
            let mut bucket = self.table.bucket(self.node.token);
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
