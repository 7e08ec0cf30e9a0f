//! Instruction-count probes of the page-fault hook, for `cargo xtask budgets` (callgrind counts
//! the instructions inside each `icount_*` function): `icount PROBE ITERS`. Each probe runs an
//! ordinary (not async) fault through one of the handler variants `iters` times; the budgets
//! bound the hooked variants' cost minus the unhooked one's, for two handler shapes: `fault_*`
//! (a kernel handler with a stack frame, like Linux's `exc_page_fault`) and `tail_*` (a handler
//! that is only a tail call, the one shape where the hook can cost a frame).

#[path = "../benches/support/mod.rs"]
mod support;

use std::hint::black_box;

use oskit_pv_apf::ApfCpu;
use support::{
    CPU_OFF, pv_apf_bench_fault_native_hook, pv_apf_bench_fault_no_hook,
    pv_apf_bench_fault_runtime_hook, pv_apf_bench_tail_native_hook, pv_apf_bench_tail_no_hook,
    pv_apf_bench_tail_runtime_hook,
};

/// The three variants take the same arguments; calling them through an opaque pointer makes the
/// caller's side identical, so the counts differ only by what each handler does.
type Handler = fn(&ApfCpu, u64) -> u64;

/// Runs `iters` ordinary faults through `handler`.
#[inline(never)]
fn faults(handler: Handler, iters: u64) {
    let handler = black_box(handler);
    for i in 0..iters {
        black_box(handler(black_box(&CPU_OFF), black_box(0x1000 + i)));
    }
}

macro_rules! probe {
    ($name:ident, $handler:ident) => {
        /// Runs `iters` ordinary faults through the handler variant.
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $name(iters: u64) {
            faults($handler, iters)
        }
    };
}

probe!(icount_fault_no_hook, pv_apf_bench_fault_no_hook);
probe!(icount_fault_native_hook, pv_apf_bench_fault_native_hook);
probe!(icount_fault_runtime_hook, pv_apf_bench_fault_runtime_hook);
probe!(icount_tail_no_hook, pv_apf_bench_tail_no_hook);
probe!(icount_tail_native_hook, pv_apf_bench_tail_native_hook);
probe!(icount_tail_runtime_hook, pv_apf_bench_tail_runtime_hook);

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
        "fault_no_hook" => icount_fault_no_hook(iters),
        "fault_native_hook" => icount_fault_native_hook(iters),
        "fault_runtime_hook" => icount_fault_runtime_hook(iters),
        "tail_no_hook" => icount_tail_no_hook(iters),
        "tail_native_hook" => icount_tail_native_hook(iters),
        "tail_runtime_hook" => icount_tail_runtime_hook(iters),
        other => panic!("unknown probe {other}"),
    }
}
