//! Host doubles shared by the benches and the instruction-count probes: a task, an address
//! space that accepts every charge, page-aligned heap pages, a no-op deferred-work hook, and a
//! tracer with one traced task on the software CPU.

#![allow(dead_code, unreachable_pub)]

use std::{alloc::Layout, num::NonZeroU32, ptr::NonNull};

use oskit_bts::{
    Bts, BtsCpu, Config, Flags, Record,
    format::RECORD_SIZE,
    hal::{AddressSpace, DeferredWork, LockedAlloc, PAGE_SIZE, RecordSink, Signaller, TaskRef},
    sim::SoftCpu,
};

#[derive(Clone)]
pub struct Task(pub u32);
impl TaskRef for Task {
    fn pid(&self) -> u32 {
        self.0
    }
}
#[derive(Clone)]
pub struct Space;
impl AddressSpace for Space {
    fn charge_locked(&self, _: usize) -> bool {
        true
    }
    fn refund_locked(&self, _: usize) {}
}
pub struct Alloc;
// SAFETY: fresh page-aligned allocations, freed with the same layout.
unsafe impl LockedAlloc for Alloc {
    fn alloc_pages(&self, pages: usize) -> Option<NonNull<u8>> {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).ok()?;
        // SAFETY: non-zero size.
        NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })
    }
    unsafe fn free_pages(&self, ptr: NonNull<u8>, pages: usize) {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).unwrap();
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) }
    }
}
pub struct Work;
impl DeferredWork for Work {
    fn schedule(&self) {}
}
/// Sink and signaller for circular traces (which never overflow).
pub struct Ignore;
impl RecordSink for Ignore {
    fn push(&mut self, _: u32, _: Record) -> bool {
        true
    }
}
impl Signaller<Task> for Ignore {
    fn signal(&mut self, _: &Task, _: NonZeroU32) {}
}

pub type Tracer = Bts<Task, Space, Alloc, Work, 64>;
pub const RECORDS: usize = 65_536;

pub fn traced(flags: Flags, records: usize) -> (Tracer, Task, BtsCpu<SoftCpu>) {
    let bts = Bts::new(Alloc, Work);
    let task = Task(1);
    let cfg = Config {
        size: records * RECORD_SIZE,
        flags: flags | Flags::ALLOC,
        signal: 0,
    };
    bts.config(&task, &Space, cfg).unwrap();
    // User mode: what TRACE records.
    let mut cpu = SoftCpu::default();
    cpu.set_cpl(3);
    (bts, task, BtsCpu::new(cpu))
}

pub fn fill(bts: &Tracer, task: &Task, cpu: &mut BtsCpu<SoftCpu>, n: usize) {
    bts.switch_in(cpu, task, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    for i in 0..n as u64 {
        cpu.hw_mut()
            .branch(0x40_0000 + i, 0x50_0000 + i, i & 1 == 0);
    }
    bts.switch_out(cpu, 0, &mut Ignore, &mut Ignore).unwrap();
}
