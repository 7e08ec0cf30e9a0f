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

/// A fault handler without the hook.
#[inline(never)]
#[unsafe(no_mangle)]
pub fn pv_apf_bench_fault_no_hook(_cpu: &ApfCpu, cr2: u64) -> u64 {
    pv_apf_bench_handle_mm_fault(cr2)
}

/// The hook with a backend that is never a guest: must compile to nothing.
#[inline(never)]
#[unsafe(no_mangle)]
pub fn pv_apf_bench_fault_native_hook(cpu: &ApfCpu, cr2: u64) -> u64 {
    if NATIVE.handle_page_fault(cpu, cr2).is_handled() {
        return 0;
    }
    pv_apf_bench_handle_mm_fault(cr2)
}

/// The hook with runtime detection: one load and one branch on the ordinary path.
#[inline(never)]
#[unsafe(no_mangle)]
pub fn pv_apf_bench_fault_runtime_hook(cpu: &ApfCpu, cr2: u64) -> u64 {
    if RUNTIME.handle_page_fault(cpu, cr2).is_handled() {
        return 0;
    }
    pv_apf_bench_handle_mm_fault(cr2)
}
