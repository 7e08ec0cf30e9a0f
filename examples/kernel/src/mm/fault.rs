//! The page-fault handler: an optional hook first (for the paravirtual async-page-fault
//! handler), then demand paging and copy-on-write in the running task's address space.
//!
//! A fault nobody resolves is passed on as unhandled: from ring 3 it kills the task (with a
//! `user fault:` line), from ring 0 it is fatal for the run (see [`crate::arch::trap`]). Kernel code
//! touching a user address of the running task's space (a system call reading its buffer) is
//! resolved the same way as the task's own access.

use core::sync::atomic::{AtomicUsize, Ordering};

use crate::{
    arch::trap::{self, Handled, TrapFrame},
    mm::vm,
    task::sched,
};

/// The #PF vector.
pub const PAGE_FAULT_VECTOR: u8 = 14;

/// A hook that sees every page fault first, with CR2; `Handled::Yes` ends the fault there.
pub type FaultHook = fn(frame: &mut TrapFrame, cr2: u64) -> Handled;

static HOOK: AtomicUsize = AtomicUsize::new(0);

/// Installs (or with `None` removes) the hook that runs before demand paging.
pub fn set_hook(hook: Option<FaultHook>) {
    HOOK.store(hook.map_or(0, |h| h as usize), Ordering::Release);
}

/// Installs the page-fault handler.
pub fn init() {
    trap::set_handler(PAGE_FAULT_VECTOR, on_page_fault);
}

fn on_page_fault(frame: &mut TrapFrame) -> Handled {
    let addr = trap::cr2();
    let hook = HOOK.load(Ordering::Acquire);
    if hook != 0 {
        // SAFETY: only `set_hook` stores into HOOK, and it stores `FaultHook` values.
        let hook = unsafe { core::mem::transmute::<usize, FaultHook>(hook) };
        if hook(frame, addr) == Handled::Yes {
            return Handled::Yes;
        }
    }
    if (vm::USER_START..vm::USER_END).contains(&addr)
        && let Some(space) = sched::current_space()
        && vm::handle_fault(space, addr, frame.error_code)
    {
        return Handled::Yes;
    }
    Handled::No
}
