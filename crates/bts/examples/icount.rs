//! Instruction-count probes of the hot paths, for `cargo xtask budgets` (callgrind counts the
//! instructions inside each `icount_*` function): `icount PROBE ITERS`.

#[path = "../benches/support/mod.rs"]
mod support;

use std::hint::black_box;

use oskit_bts::{BtsCpu, Flags, sim::SoftCpu};
use support::{Ignore, RECORDS, Task, Tracer, fill, traced};

/// `read(index)` of a record in a wrapped 65,536-record buffer, `iters` times.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn icount_read_record(bts: &Tracer, task: &Task, iters: u64) {
    for i in 0..iters {
        black_box(bts.read(task, black_box(i as usize % 64)).ok());
    }
}

/// A context switch away from and back to a traced task (TRACE | SCHED, circular): the
/// switch-out then switch-in hooks, `iters` times.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn icount_switch_traced_sched(
    bts: &Tracer,
    task: &Task,
    cpu: &mut BtsCpu<SoftCpu>,
    iters: u64,
) {
    for i in 0..iters {
        // The results stay unread, as in a scheduler of circular traces (they never overflow).
        let _ = bts.switch_out(cpu, i, &mut Ignore, &mut Ignore);
        let _ = bts.switch_in(cpu, black_box(task), i, &mut Ignore, &mut Ignore);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (probe, iters) = match args.as_slice() {
        [_, probe, iters] => (
            probe.as_str(),
            iters.parse::<u64>().expect("ITERS is a number"),
        ),
        _ => panic!("usage: icount PROBE ITERS"),
    };
    match probe {
        "read_record" => {
            let (bts, task, mut cpu) = traced(Flags::TRACE, RECORDS);
            fill(&bts, &task, &mut cpu, RECORDS + 100);
            icount_read_record(&bts, &task, iters);
        }
        "switch_traced_sched" => {
            let (bts, task, mut cpu) = traced(Flags::TRACE | Flags::SCHED, 1024);
            icount_switch_traced_sched(&bts, &task, &mut cpu, iters);
        }
        other => panic!("unknown probe {other}"),
    }
}
