//! Test doubles for the tracer's traits: counted task and address-space handles, a counting
//! page allocator with failure injection, a counting work queue, and a record sink and a
//! signaller that keep what they get.
#![allow(dead_code, unreachable_pub)]

use std::{
    alloc::Layout,
    num::NonZeroU32,
    ptr::NonNull,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering::SeqCst},
    },
};

use oskit_bts::{
    Bts, Config, Flags, Record,
    format::RECORD_SIZE,
    hal::{AddressSpace, DeferredWork, LockedAlloc, PAGE_SIZE, RecordSink, Signaller, TaskRef},
};

/// A task handle; `refs` counts live handles (the test's own included).
#[derive(Debug)]
pub struct Task {
    pub pid: u32,
    pub refs: Arc<AtomicUsize>,
}

impl Task {
    pub fn new(pid: u32) -> Self {
        Self {
            pid,
            refs: Arc::new(AtomicUsize::new(1)),
        }
    }
    pub fn refs(&self) -> usize {
        self.refs.load(SeqCst)
    }
}

impl Clone for Task {
    fn clone(&self) -> Self {
        self.refs.fetch_add(1, SeqCst);
        Self {
            pid: self.pid,
            refs: self.refs.clone(),
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.refs.fetch_sub(1, SeqCst);
    }
}

impl TaskRef for Task {
    fn pid(&self) -> u32 {
        self.pid
    }
}

#[derive(Debug, Default)]
pub struct SpaceState {
    pub locked: AtomicIsize,
    pub limit: AtomicIsize,
    pub refs: AtomicUsize,
}

/// An address-space handle with a locked-page count and a limit.
#[derive(Debug)]
pub struct Space(pub Arc<SpaceState>);

impl Space {
    pub fn new(limit_pages: isize) -> Self {
        let s = SpaceState::default();
        s.limit.store(limit_pages, SeqCst);
        s.refs.store(1, SeqCst);
        Self(Arc::new(s))
    }
    pub fn locked(&self) -> isize {
        self.0.locked.load(SeqCst)
    }
    pub fn refs(&self) -> usize {
        self.0.refs.load(SeqCst)
    }
}

impl Clone for Space {
    fn clone(&self) -> Self {
        self.0.refs.fetch_add(1, SeqCst);
        Self(self.0.clone())
    }
}

impl Drop for Space {
    fn drop(&mut self) {
        self.0.refs.fetch_sub(1, SeqCst);
    }
}

impl AddressSpace for Space {
    fn charge_locked(&self, pages: usize) -> bool {
        let pages = pages as isize;
        let now = self.0.locked.fetch_add(pages, SeqCst) + pages;
        if now > self.0.limit.load(SeqCst) {
            self.0.locked.fetch_sub(pages, SeqCst);
            return false;
        }
        true
    }
    fn refund_locked(&self, pages: usize) {
        let before = self.0.locked.fetch_sub(pages as isize, SeqCst);
        assert!(before >= pages as isize, "refund of more than was charged");
    }
}

/// Page allocator on the global allocator, counting live pages; can be told to fail.
#[derive(Debug, Default)]
pub struct Alloc {
    pub live: AtomicUsize,
    pub fail: AtomicBool,
}

impl Alloc {
    pub fn live(&self) -> usize {
        self.live.load(SeqCst)
    }
}

// SAFETY: allocations are fresh, page aligned, `pages * PAGE_SIZE` bytes, freed with the same
// layout.
unsafe impl LockedAlloc for Alloc {
    fn alloc_pages(&self, pages: usize) -> Option<NonNull<u8>> {
        if self.fail.load(SeqCst) {
            return None;
        }
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).ok()?;
        // SAFETY: non-zero size.
        let p = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        self.live.fetch_add(pages, SeqCst);
        Some(p)
    }
    unsafe fn free_pages(&self, ptr: NonNull<u8>, pages: usize) {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).unwrap();
        self.live.fetch_sub(pages, SeqCst);
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) }
    }
}

/// Counts `schedule` calls.
#[derive(Debug, Default)]
pub struct Work {
    pub scheduled: AtomicUsize,
}

impl Work {
    pub fn scheduled(&self) -> usize {
        self.scheduled.load(SeqCst)
    }
}

impl DeferredWork for Work {
    fn schedule(&self) {
        self.scheduled.fetch_add(1, SeqCst);
    }
}

/// Shared handle on an [`Alloc`].
#[derive(Debug, Clone)]
pub struct AllocRef(pub Arc<Alloc>);

// SAFETY: forwards to `Alloc`.
unsafe impl LockedAlloc for AllocRef {
    fn alloc_pages(&self, pages: usize) -> Option<NonNull<u8>> {
        self.0.alloc_pages(pages)
    }
    unsafe fn free_pages(&self, ptr: NonNull<u8>, pages: usize) {
        // SAFETY: the caller upholds the contract.
        unsafe { self.0.free_pages(ptr, pages) }
    }
}

/// Shared handle on a [`Work`].
#[derive(Debug, Clone)]
pub struct WorkRef(pub Arc<Work>);

impl DeferredWork for WorkRef {
    fn schedule(&self) {
        self.0.schedule()
    }
}

pub type Tracer<const N: usize> = Bts<Task, Space, AllocRef, WorkRef, N>;

/// A tracer over a fresh allocator and work queue.
pub fn tracer<const N: usize>() -> (Tracer<N>, Arc<Alloc>, Arc<Work>) {
    let alloc = Arc::new(Alloc::default());
    let work = Arc::new(Work::default());
    (
        Bts::new(AllocRef(alloc.clone()), WorkRef(work.clone())),
        alloc,
        work,
    )
}

/// A sink and a signaller for tests whose contexts never overflow (circular buffers): takes
/// every record, ignores every signal.
#[derive(Debug, Default)]
pub struct Ignore;

impl oskit_bts::hal::RecordSink for Ignore {
    fn push(&mut self, _pid: u32, _record: oskit_bts::Record) -> bool {
        true
    }
}

impl oskit_bts::hal::Signaller<Task> for Ignore {
    fn signal(&mut self, _task: &Task, _signal: std::num::NonZeroU32) {}
}

/// A software CPU running user code (CPL 3): what `Flags::TRACE` records by default.
pub fn user_cpu() -> oskit_bts::sim::SoftCpu {
    let mut cpu = oskit_bts::sim::SoftCpu::default();
    cpu.set_cpl(3);
    cpu
}

/// A configuration of `records` records with `flags` (and `ALLOC`), no signal.
pub fn cfg(records: usize, flags: Flags) -> Config {
    Config {
        size: records * RECORD_SIZE,
        flags: flags | Flags::ALLOC,
        signal: 0,
    }
}

/// Every record drained, with the pid it came from (never full).
#[derive(Default)]
pub struct Sink(pub Vec<(u32, Record)>);

impl RecordSink for Sink {
    fn push(&mut self, pid: u32, record: Record) -> bool {
        self.0.push((pid, record));
        true
    }
}

/// Every signal sent: (pid, signal).
#[derive(Default)]
pub struct Signals(pub Vec<(u32, u32)>);

impl Signaller<Task> for Signals {
    fn signal(&mut self, task: &Task, signal: NonZeroU32) {
        self.0.push((task.pid, signal.get()));
    }
}

/// Branch record number `i` (from `i` to 0x9000).
pub fn br(i: u64) -> Record {
    Record::Branch {
        from: i,
        to: 0x9000,
        predicted: false,
    }
}
