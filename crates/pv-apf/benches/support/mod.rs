//! The scheduler double and the three fault-path variants, shared by the benches and the
//! instruction-count probes (`examples/icount.rs`).

#![allow(dead_code, unreachable_pub)]

use std::{
    hint::black_box,
    sync::Mutex,
    thread::{self, Thread},
};

use oskit_pv_apf::{
    ApfCpu, AsyncPf, Native, Scheduler,
    sim::{SimHost, SimVcpu},
};

/// One task per thread; `unblock` unparks the registered waiter thread.
pub struct Sched;

pub static WAITER: Mutex<Option<Thread>> = Mutex::new(None);

impl Scheduler for Sched {
    type Task = u32;
    fn current_task(&self) -> u32 {
        0
    }
    fn current_cpu(&self) -> u32 {
        0
    }
    fn can_sleep(&self) -> bool {
        true
    }
    fn block(&self) {
        thread::park();
    }
    fn unblock(&self, _task: u32) {
        if let Some(t) = &*WAITER.lock().unwrap() {
            t.unpark();
        }
    }
    fn halt(&self) {}
}

pub static HOST: SimHost<1> = SimHost::modern();
pub static CPU_ON: ApfCpu = ApfCpu::new();
pub static CPU_OFF: ApfCpu = ApfCpu::new();
pub static NATIVE: AsyncPf<Native, Sched> = AsyncPf::new(Sched);
pub static RUNTIME: AsyncPf<SimVcpu<'static, 1>, Sched> = AsyncPf::new(Sched);

/// Stands for the rest of the kernel's page-fault handler.
#[inline(never)]
#[unsafe(no_mangle)]
pub fn pv_apf_bench_handle_mm_fault(cr2: u64) -> u64 {
    black_box(cr2).rotate_left(7) ^ 0x9e37_79b9
}

/// Stands for the kernel's entry work before the handler proper (`irqentry_enter` in Linux).
#[inline(never)]
#[unsafe(no_mangle)]
pub fn pv_apf_bench_fault_enter(cr2: u64) -> u64 {
    black_box(cr2)
}

/// Stands for the kernel's exit work after it (`irqentry_exit` in Linux).
#[inline(never)]
#[unsafe(no_mangle)]
pub fn pv_apf_bench_fault_exit(state: u64) {
    black_box(state);
}

/// The rest of a kernel page-fault handler, after the hook: entry work, the fault proper, exit
/// work. Calls that are not tail calls, so the handler has a stack frame, as every real one does.
#[inline(always)]
fn rest_of_handler(cr2: u64) -> u64 {
    let state = pv_apf_bench_fault_enter(cr2);
    let result = pv_apf_bench_handle_mm_fault(cr2);
    pv_apf_bench_fault_exit(state);
    result
}

/// The rest of a minimal handler: only a tail call, so without the hook it needs no frame.
#[inline(always)]
fn tail_of_handler(cr2: u64) -> u64 {
    pv_apf_bench_handle_mm_fault(cr2)
}

/// Defines the three variants of one handler shape: without the hook, with the hook on a backend
/// that is never a guest (must compile to the very same code) and with runtime detection (the
/// ordinary fault pays one compare-with-memory and one branch).
macro_rules! variants {
    ($rest:ident: $no_hook:ident, $native_hook:ident, $runtime_hook:ident) => {
        /// The handler without the hook.
        #[inline(never)]
        #[unsafe(no_mangle)]
        pub fn $no_hook(_cpu: &ApfCpu, cr2: u64) -> u64 {
            $rest(cr2)
        }

        /// The hook with a backend that is never a guest.
        #[inline(never)]
        #[unsafe(no_mangle)]
        pub fn $native_hook(cpu: &ApfCpu, cr2: u64) -> u64 {
            if NATIVE.handle_page_fault(cpu, cr2).is_handled() {
                return 0;
            }
            $rest(cr2)
        }

        /// The hook with runtime detection.
        #[inline(never)]
        #[unsafe(no_mangle)]
        pub fn $runtime_hook(cpu: &ApfCpu, cr2: u64) -> u64 {
            if RUNTIME.handle_page_fault(cpu, cr2).is_handled() {
                return 0;
            }
            $rest(cr2)
        }
    };
}

variants!(rest_of_handler: pv_apf_bench_fault_no_hook, pv_apf_bench_fault_native_hook, pv_apf_bench_fault_runtime_hook);
variants!(tail_of_handler: pv_apf_bench_tail_no_hook, pv_apf_bench_tail_native_hook, pv_apf_bench_tail_runtime_hook);
