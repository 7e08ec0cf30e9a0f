//! The per-CPU state: bound to one tracer, IA32_DS_AREA given back, user-only tracing by
//! default, and the NMI path that never waits on the code it interrupted.

mod common;

use std::num::NonZeroU32;

use common::{Ignore, Space, Task, cfg, tracer, user_cpu};
use oskit_bts::{
    BtsCpu, CpuCell, Error, Flags, Pmi, Record,
    hal::{BtsHardware, DebugCtl, RecordSink, Signaller},
    sim::{SoftCpu, Store},
};

/// The measured soundness hole, run under Miri too: `bts2.switch_out(&mut cpu1)` with a CPU
/// loaded by `bts1` used to clear HELD on bts2's slot 0, whose task runs on `cpu2`; `config`
/// then freed that buffer while `cpu2` still had it in IA32_DS_AREA, and `cpu2`'s next branch
/// wrote into freed memory. Now the foreign hooks are refused and change nothing.
#[test]
fn a_foreign_tracers_hooks_are_refused_and_change_nothing() {
    let (bts1, _, _) = tracer::<4>();
    let (bts2, alloc2, _) = tracer::<4>();
    let (a, b, mm) = (Task::new(1), Task::new(2), Space::new(100));
    let (mut cpu1, mut cpu2) = (BtsCpu::new(user_cpu()), BtsCpu::new(user_cpu()));
    bts1.config(&a, &mm, cfg(4, Flags::TRACE)).unwrap();
    bts2.config(&b, &mm, cfg(4, Flags::TRACE)).unwrap();
    bts1.switch_in(&mut cpu1, &a, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    bts2.switch_in(&mut cpu2, &b, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    let ds1 = cpu1.hw().ds_area();

    assert_eq!(
        bts2.switch_out(&mut cpu1, 0, &mut Ignore, &mut Ignore),
        Err(Error::ForeignCpu)
    );
    assert_eq!(
        bts2.switch_in(&mut cpu1, &b, 0, &mut Ignore, &mut Ignore),
        Err(Error::ForeignCpu)
    );
    assert_eq!(
        bts2.threshold_interrupt(&mut cpu1, &mut Ignore, &mut Ignore),
        Err(Error::ForeignCpu)
    );
    assert!(cpu1.is_loaded() && cpu1.hw().debugctl().has(DebugCtl::BTS));
    assert_eq!(cpu1.hw().ds_area(), ds1);
    // bts2's context is still held by cpu2: no reconfiguration frees its buffer.
    assert_eq!(
        bts2.config(&b, &mm, cfg(400, Flags::TRACE)),
        Err(Error::Busy)
    );
    let pages = alloc2.live();
    // The CPUs store into live buffers (under Miri: no use after free).
    assert_eq!(cpu2.hw_mut().branch(0x10, 0x20, false), Store::Stored);
    assert_eq!(cpu1.hw_mut().branch(0x30, 0x40, false), Store::Stored);
    bts2.switch_out(&mut cpu2, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    bts1.switch_out(&mut cpu1, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    assert_eq!(alloc2.live(), pages);
    assert_eq!(
        bts2.read(&b, 0),
        Ok(Record::Branch {
            from: 0x10,
            to: 0x20,
            predicted: false
        })
    );
    assert_eq!(bts1.size(&a), Ok(1));
}

#[test]
fn trace_records_user_branches_only_unless_kernel_is_asked_for() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(SoftCpu::default());
    bts.config(&t, &mm, cfg(8, Flags::TRACE)).unwrap();
    bts.switch_in(&mut cpu, &t, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    assert!(cpu.hw().debugctl().has(DebugCtl::BTS_OFF_OS));
    cpu.hw_mut().set_cpl(0);
    assert_eq!(
        cpu.hw_mut().branch(0xffff_8000_0000_1000, 1, false),
        Store::NotStored
    );
    cpu.hw_mut().set_cpl(3);
    assert_eq!(cpu.hw_mut().branch(0x40_1000, 2, false), Store::Stored);
    bts.switch_out(&mut cpu, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    assert_eq!(bts.size(&t), Ok(1), "no kernel address in the trace");

    bts.config(&t, &mm, cfg(8, Flags::TRACE | Flags::KERNEL))
        .unwrap();
    bts.switch_in(&mut cpu, &t, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    assert!(!cpu.hw().debugctl().has(DebugCtl::BTS_OFF_OS));
    cpu.hw_mut().set_cpl(0);
    assert_eq!(
        cpu.hw_mut().branch(0xffff_8000_0000_1000, 1, false),
        Store::Stored
    );
    bts.switch_out(&mut cpu, 0, &mut Ignore, &mut Ignore)
        .unwrap();

    assert_eq!(
        bts.config(
            &t,
            &mm,
            cfg(8, Flags::TRACE | Flags::KERNEL | Flags::NO_KERNEL)
        ),
        Err(Error::InvalidArgument)
    );
}

/// The kernel's own DS area (say, for PEBS) is back after every traced time slice, and no
/// CPU is left pointing at a torn-down buffer.
#[test]
fn switch_out_gives_ds_area_back_and_teardown_leaves_no_cpu_on_the_buffer() {
    let (bts, alloc, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    const KERNEL_DS: u64 = 0xffff_8880_0001_0000;
    // SAFETY: BTS is off: the value is never dereferenced.
    unsafe { cpu.hw_mut().set_ds_area(KERNEL_DS) };
    bts.config(&t, &mm, cfg(8, Flags::TRACE)).unwrap();
    for _ in 0..2 {
        bts.switch_in(&mut cpu, &t, 0, &mut Ignore, &mut Ignore)
            .unwrap();
        let ours = cpu.hw().ds_area();
        assert_ne!(ours, KERNEL_DS);
        cpu.hw_mut().branch(1, 2, false);
        bts.switch_out(&mut cpu, 0, &mut Ignore, &mut Ignore)
            .unwrap();
        assert_eq!(cpu.hw().ds_area(), KERNEL_DS);
    }
    // Untraced while running: torn down after the switch-out, and the CPU is on the
    // kernel's DS area, not on the freed one.
    bts.switch_in(&mut cpu, &t, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    bts.untrace(&t).unwrap();
    bts.switch_out(&mut cpu, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    assert_eq!(bts.run_deferred(), 1);
    assert_eq!(alloc.live(), 0);
    assert_eq!(cpu.hw().ds_area(), KERNEL_DS);
}

#[derive(Default)]
struct Sink(Vec<Record>);
impl RecordSink for Sink {
    fn push(&mut self, _pid: u32, record: Record) -> bool {
        self.0.push(record);
        true
    }
}
struct NoSignal;
impl Signaller<Task> for NoSignal {
    fn signal(&mut self, _: &Task, _: NonZeroU32) {
        panic!("no signal configured");
    }
}

/// NMI delivery: the NMI that interrupts a switch hook (which holds this CPU's state) touches
/// nothing and says so; the hook handles the overflow and re-arms the LVT. An NMI that finds
/// the state free is handled like the interrupt.
#[test]
fn an_nmi_interrupting_a_switch_hook_leaves_the_overflow_to_it() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let cell = CpuCell::new(BtsCpu::new(user_cpu()));
    bts.config(&t, &mm, cfg(16, Flags::TRACE | Flags::INTERRUPT))
        .unwrap();
    let mut sink = Sink::default();

    // Overflow, NMI taken at once with the state free: handled in the NMI.
    {
        let mut cpu = cell.try_lock().unwrap();
        bts.switch_in(&mut cpu, &t, 0, &mut sink, &mut NoSignal)
            .unwrap();
        let mut i = 0;
        while cpu.hw_mut().branch(i + 1, 2, false) != Store::Interrupt {
            i += 1;
        }
    }
    let pmi = bts.nmi(&cell, &mut sink, &mut NoSignal).unwrap();
    assert_eq!(pmi.overflow().map(|o| o.drained), Some(14));
    assert!(!cell.try_lock().unwrap().hw().interrupt_masked());

    // Overflow again; the NMI arrives while the scheduler is inside switch_out (it holds
    // the state): deferred, nothing touched.
    let mut cpu = cell.try_lock().unwrap();
    let mut i = 100;
    while cpu.hw_mut().branch(i, 2, false) != Store::Interrupt {
        i += 1;
    }
    assert_eq!(bts.nmi(&cell, &mut sink, &mut NoSignal), Ok(Pmi::Deferred));
    assert_eq!(sink.0.len(), 14, "nothing drained from under the hook");
    // The hook goes on: it handles the overflow and re-arms.
    let out = bts
        .switch_out(&mut cpu, 0, &mut sink, &mut NoSignal)
        .unwrap();
    assert_eq!(out.map(|o| o.drained), Some(14));
    assert!(!cpu.hw().interrupt_masked());
    drop(cpu);
    assert_eq!(sink.0.len(), 28);
    assert_eq!(bts.size(&t), Ok(0));
}
