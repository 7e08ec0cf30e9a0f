//! Harnesses of `oskit-bts`.

use std::{
    alloc::Layout,
    cell::Cell,
    num::NonZeroU32,
    ptr::NonNull,
    rc::Rc,
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
};

use oskit_bts::{
    Bts, BtsCpu, Config, Error, Flags, Pmi, Record,
    format::{BtsRecord, DsArea, RECORD_SIZE},
    hal::{
        AddressSpace, BtsHardware, DebugCtl, DeferredWork, LockedAlloc, PAGE_SIZE, RecordSink,
        Signaller, TaskRef,
    },
    sim::{SoftCpu, Store},
    view::{TraceView, clamp_index},
};

/// A counted task handle (single-threaded harness).
#[derive(Debug)]
struct Task {
    pid: u32,
    refs: Rc<Cell<usize>>,
}
impl Clone for Task {
    fn clone(&self) -> Self {
        self.refs.set(self.refs.get() + 1);
        Self {
            pid: self.pid,
            refs: self.refs.clone(),
        }
    }
}
impl Drop for Task {
    fn drop(&mut self) {
        self.refs.set(self.refs.get() - 1);
    }
}
impl TaskRef for Task {
    fn pid(&self) -> u32 {
        self.pid
    }
}

#[derive(Debug, Default)]
struct SpaceState {
    locked: Cell<usize>,
    limit: Cell<usize>,
    refs: Cell<usize>,
}
#[derive(Debug)]
struct Space(Rc<SpaceState>);
impl Clone for Space {
    fn clone(&self) -> Self {
        self.0.refs.set(self.0.refs.get() + 1);
        Self(self.0.clone())
    }
}
impl Drop for Space {
    fn drop(&mut self) {
        self.0.refs.set(self.0.refs.get() - 1);
    }
}
impl AddressSpace for Space {
    fn charge_locked(&self, pages: usize) -> bool {
        let now = self.0.locked.get() + pages;
        if now > self.0.limit.get() {
            return false;
        }
        self.0.locked.set(now);
        true
    }
    fn refund_locked(&self, pages: usize) {
        let locked = self.0.locked.get();
        assert!(
            locked >= pages,
            "refund of {pages} pages, only {locked} charged"
        );
        self.0.locked.set(locked - pages);
    }
}

#[derive(Debug, Default)]
struct Alloc {
    live: AtomicUsize,
    fail: std::sync::atomic::AtomicBool,
}
// SAFETY: fresh page-aligned allocations of `pages * PAGE_SIZE` bytes, freed with that layout.
unsafe impl LockedAlloc for Alloc {
    fn alloc_pages(&self, pages: usize) -> Option<NonNull<u8>> {
        if self.fail.load(Relaxed) || pages > 64 {
            return None;
        }
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).ok()?;
        // SAFETY: non-zero size.
        let p = NonNull::new(unsafe { std::alloc::alloc(layout) })?;
        // Garbage, as fresh pages may hold: the tracer must initialise what it reads.
        // SAFETY: just allocated with this size.
        unsafe { p.as_ptr().write_bytes(0xa5, layout.size()) };
        self.live.fetch_add(pages, Relaxed);
        Some(p)
    }
    unsafe fn free_pages(&self, ptr: NonNull<u8>, pages: usize) {
        self.live.fetch_sub(pages, Relaxed);
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).unwrap();
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) }
    }
}

#[derive(Debug, Default)]
struct Work(AtomicUsize);
impl DeferredWork for Work {
    fn schedule(&self) {
        self.0.fetch_add(1, Relaxed);
    }
}

struct Sink(usize);
impl RecordSink for Sink {
    fn push(&mut self, _pid: u32, record: Record) -> bool {
        assert_ne!(record, Record::Invalid, "drained an empty slot");
        if self.0 == 0 {
            return false;
        }
        self.0 -= 1;
        true
    }
}
struct Signals;
impl Signaller<Task> for Signals {
    fn signal(&mut self, _task: &Task, signal: NonZeroU32) {
        assert!(signal.get() != 0);
    }
}

const TASKS: usize = 3;
const CPUS: usize = 2;

/// Random sequences of config/read/drain/clear/switch/branch/interrupt/untrace/teardown on
/// three tasks, two CPUs and two paying address spaces. Checks each operation's contract
/// and, at the end, after untracing everything and running the deferred work: every page
/// freed, every locked page refunded, every reference put, teardown run once per context.
pub fn ops(data: &[u8]) {
    let alloc = Alloc::default();
    let work = Work::default();
    let bts: Bts<Task, Space, &Alloc, &Work, 4> = Bts::new(&alloc, &work);
    let tasks: Vec<Task> = (0..TASKS as u32)
        .map(|pid| Task {
            pid: pid + 100,
            refs: Rc::new(Cell::new(1)),
        })
        .collect();
    let spaces: Vec<Space> = [4, 64]
        .iter()
        .map(|&limit| {
            let s = SpaceState::default();
            s.limit.set(limit);
            s.refs.set(1);
            Space(Rc::new(s))
        })
        .collect();
    let mut cpus: Vec<BtsCpu<SoftCpu>> =
        (0..CPUS).map(|_| BtsCpu::new(SoftCpu::default())).collect();
    // Which task runs on which CPU (a task runs on at most one).
    let mut running: [Option<usize>; CPUS] = [None; CPUS];
    let mut claim = None;
    let mut clock = 0u64;
    let mut bytes = data.iter().copied();
    let mut next = move || bytes.next();

    while let Some(op) = next() {
        let arg = next().unwrap_or(0);
        let t = (arg as usize) % TASKS;
        let task = &tasks[t];
        clock += 1;
        match op % 12 {
            0 => {
                let size = usize::from(next().unwrap_or(0)) * 16 + usize::from(next().unwrap_or(0));
                let flags = Flags(u32::from(next().unwrap_or(0)));
                let signal = u32::from(arg >> 4) % 3;
                let space = &spaces[(arg as usize >> 2) % 2];
                let r = bts.config(
                    task,
                    space,
                    Config {
                        size,
                        flags,
                        signal,
                    },
                );
                if let Err(e) = r {
                    assert!(matches!(
                        e,
                        Error::InvalidArgument
                            | Error::NoMemory
                            | Error::PermissionDenied
                            | Error::Busy
                    ));
                }
                if r.is_ok() && flags.contains(Flags::ALLOC) && size >= RECORD_SIZE {
                    assert_eq!(bts.size(task), Ok(0));
                    let st = bts.status(task).unwrap();
                    assert_eq!(st.size, size / RECORD_SIZE * RECORD_SIZE);
                }
            }
            1 => {
                if let Ok(n) = bts.size(task) {
                    let cap = bts.status(task).unwrap().size / RECORD_SIZE;
                    assert!(n <= cap);
                    if n > 0 {
                        assert!(bts.read(task, n - 1).is_ok());
                        assert!(bts.read(task, 0).is_ok());
                    }
                    assert_eq!(bts.read(task, n), Err(Error::InvalidArgument));
                }
            }
            2 => {
                let before = bts.size(task);
                let mut out = vec![Record::Invalid; usize::from(arg)];
                match bts.drain(task, &mut out) {
                    Ok(n) => {
                        assert_eq!(Ok(n), before);
                        assert!(out[..n].iter().all(|r| *r != Record::Invalid));
                        assert_eq!(bts.size(task), Ok(0));
                    }
                    Err(Error::InvalidArgument) => assert!(before.unwrap() > out.len()),
                    Err(e) => assert_eq!(Err(e), before.map(|_| ())),
                }
            }
            3 => {
                if bts.clear(task).is_ok() {
                    assert_eq!(bts.size(task), Ok(0));
                }
            }
            4 | 5 => {
                let c = (arg as usize >> 4) % CPUS;
                if running
                    .iter()
                    .enumerate()
                    .any(|(i, r)| i != c && *r == Some(t))
                {
                    continue; // that task runs elsewhere
                }
                let mut sink = Sink(usize::from(arg));
                bts.switch_in(&mut cpus[c], task, clock, &mut sink, &mut Signals)
                    .expect("the CPU is this tracer's");
                running[c] = Some(t);
            }
            6 => {
                let c = (arg as usize) % CPUS;
                let mut sink = Sink(usize::from(arg));
                bts.switch_out(&mut cpus[c], clock, &mut sink, &mut Signals)
                    .expect("the CPU is this tracer's");
                running[c] = None;
            }
            7 | 8 => {
                let c = (arg as usize) % CPUS;
                let cpl = if arg & 0x80 != 0 { 3 } else { 0 };
                cpus[c].hw_mut().set_cpl(cpl);
                for i in 0..usize::from(next().unwrap_or(0) % 64) {
                    let from = 0x40_0000 + i as u64;
                    let s = cpus[c].hw_mut().branch(from, from + 0x100, i % 3 == 0);
                    assert_ne!(s, Store::Fault, "the tracer programmed a bad DS area");
                    if s == Store::Interrupt {
                        assert!(cpus[c].hw_mut().take_interrupt());
                        let mut sink = Sink(usize::from(arg));
                        let pmi = bts.threshold_interrupt(&mut cpus[c], &mut sink, &mut Signals);
                        // The interrupt was raised by the loaded context: it is handled.
                        assert!(matches!(pmi, Ok(Pmi::Overflow(_))), "{pmi:?}");
                        assert!(!cpus[c].hw().interrupt_masked(), "LVT left masked");
                    }
                }
            }
            9 => {
                let _ = bts.untrace(task);
                assert!(!bts.is_traced(task));
                assert_eq!(bts.size(task), Err(Error::NoSuchContext));
            }
            10 => {
                bts.run_deferred();
            }
            _ => match arg % 3 {
                0 => {
                    claim = claim
                        .take()
                        .map_or_else(|| bts.claim_cpu_tracing().ok(), |_| None)
                }
                1 => alloc.fail.store(arg & 4 != 0, Relaxed),
                _ => {
                    let c = (arg as usize >> 2) % CPUS;
                    let mut sink = Sink(usize::from(arg));
                    let pmi = bts.threshold_interrupt(&mut cpus[c], &mut sink, &mut Signals);
                    assert!(pmi.is_ok(), "{pmi:?}");
                }
            },
        }
        // While a CPU has BTS on, its DS area is a live context's.
        for cpu in &cpus {
            if cpu.hw().debugctl().has(DebugCtl::BTS) {
                assert!(cpu.is_loaded());
            }
        }
    }

    drop(claim);
    for cpu in &mut cpus {
        bts.switch_out(cpu, clock, &mut Sink(0), &mut Signals)
            .expect("the CPU is this tracer's");
    }
    for task in &tasks {
        let _ = bts.untrace(task);
    }
    bts.run_deferred();
    assert_eq!(bts.contexts(), 0, "a context was not torn down");
    assert_eq!(alloc.live.load(Relaxed), 0, "pages leaked");
    for s in &spaces {
        assert_eq!(s.0.locked.get(), 0, "locked pages not refunded");
        assert_eq!(s.0.refs.get(), 1, "address space reference leaked");
    }
    for t in &tasks {
        assert_eq!(t.refs.get(), 1, "task reference leaked");
    }
    assert!(bts.run_deferred() == 0);
}

/// Arbitrary DS areas: the read-back view stays inside the buffer whatever `bts_index` says,
/// and the software CPU never stores outside `[base, absolute maximum)`.
pub fn ds_area(data: &[u8]) {
    if data.len() < 0x60 {
        return;
    }
    let (head, rest) = data.split_at(0x60);
    let w: Vec<u64> = head.chunks_exact(8).map(le64).collect();
    let ds = DsArea {
        bts_buffer_base: w[0],
        bts_index: w[1],
        bts_absolute_maximum: w[2],
        bts_interrupt_threshold: w[3],
        pebs_buffer_base: w[4],
        pebs_index: w[5],
        pebs_absolute_maximum: w[6],
        pebs_interrupt_threshold: w[7],
        pebs_counter_reset: [w[8], w[9], w[10], w[11]],
    };
    let n = rest.len() / RECORD_SIZE % 64;
    let mut records = vec![BtsRecord::default(); n];
    for (r, chunk) in records.iter_mut().zip(rest.chunks_exact(RECORD_SIZE)) {
        *r = BtsRecord {
            from: le64(&chunk[..8]),
            to: le64(&chunk[8..16]),
            flags: le64(&chunk[16..]),
        };
    }
    let base = ds.bts_buffer_base;
    for circular in [false, true] {
        let view = TraceView::new(&records, &ds, base, circular);
        assert!(view.len() <= n);
        assert!(clamp_index(&ds, base, n) <= n);
        assert_eq!(view.iter().count(), view.len());
        let (a, b) = view.as_slices();
        assert_eq!(a.len() + b.len(), view.len());
        for i in 0..view.len() {
            assert!(view.newest_raw(i).is_some());
        }
        assert!(view.newest(view.len()).is_none());
        if !view.is_empty() {
            assert_eq!(view.newest_raw(0), b.last().or(a.last()));
        }
    }

    // The software CPU on a real buffer with guard words around it: base and maximum inside
    // it (from the input), index and threshold arbitrary.
    const WORDS: usize = 3 * 64;
    let mut mem = vec![0u64; 12 + 8 + WORDS + 8];
    let start = mem.as_mut_ptr().expose_provenance() as u64 + 8 * (12 + 8);
    let lo = (ds.bts_buffer_base % (WORDS as u64 * 8 + 1)) & !7;
    let hi = (ds.bts_absolute_maximum % (WORDS as u64 * 8 + 1)) & !7;
    let (lo, hi) = (lo.min(hi), lo.max(hi));
    let guard = 0x5a5a_5a5a_5a5a_5a5a;
    let area = DsArea {
        bts_buffer_base: start + lo,
        bts_index: start
            .wrapping_add(ds.bts_index % 0x2000)
            .wrapping_sub(0x1000),
        bts_absolute_maximum: start + hi,
        bts_interrupt_threshold: ds.bts_interrupt_threshold,
        ..DsArea::default()
    };
    mem[..12].copy_from_slice(&[
        area.bts_buffer_base,
        area.bts_index,
        area.bts_absolute_maximum,
        area.bts_interrupt_threshold,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ]);
    for w in &mut mem[12..] {
        *w = guard;
    }
    let mut cpu = SoftCpu::default();
    // SAFETY: `mem` outlives `cpu` and is not reallocated; its buffer lies inside `mem`.
    unsafe {
        cpu.set_ds_area(mem.as_mut_ptr().expose_provenance() as u64);
        cpu.set_debugctl(DebugCtl(
            DebugCtl::TR | DebugCtl::BTS | (ds.pebs_index & DebugCtl::BTINT),
        ));
    }
    for i in 0..(ds.pebs_buffer_base % 300) {
        cpu.branch(i + 1, i + 2, false);
        if i % 7 == 0 {
            cpu.rearm_threshold_interrupt();
        }
    }
    let inside = |w: usize| {
        let addr = mem.as_ptr().expose_provenance() as u64 + 8 * w as u64;
        addr >= start + lo && addr < start + hi
    };
    for (w, &v) in mem.iter().enumerate().skip(12) {
        if !inside(w) {
            assert_eq!(v, guard, "store outside the BTS buffer at word {w}");
        }
    }
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}
