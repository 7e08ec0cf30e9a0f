//! User tasks: starting a Rust function in ring 3 in a fresh address space, and the basic
//! system calls (write, exit, yield, getpid, fork, wait).
//!
//! A user task's address space has a 64 KiB stack just below [`STACK_TOP`] and a 1 MiB data
//! region at [`DATA_START`], both anonymous (filled on first touch). The task enters ring 3 at
//! [`crate::task::ulib::user_start`] with interrupts on.

use crate::{
    arch::gdt,
    arch::syscall::{self, nr},
    arch::trap::TrapFrame,
    mm::vm,
    println,
    task::sched,
    task::ulib,
};

/// Start of every user task's data region.
pub const DATA_START: u64 = vm::USER_START;
/// Size of the data region.
pub const DATA_SIZE: u64 = 1 << 20;
/// One past the top of every user task's stack.
pub const STACK_TOP: u64 = vm::USER_START + (1 << 30);
/// Size of the user stack.
pub const STACK_SIZE: u64 = 64 << 10;

const EINVAL: i64 = 22;
const EFAULT: i64 = 14;
const ENOMEM: i64 = 12;
const ECHILD: i64 = 10;

/// Why a user task could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnError {
    /// No address space, page table or task slot.
    NoMemory,
}

/// Starts `entry(arg)` in ring 3 in a new address space; its return value is its exit code.
pub fn spawn(
    name: &'static str,
    entry: fn(u64) -> i64,
    arg: u64,
) -> Result<sched::TaskId, SpawnError> {
    spawn_with(name, entry, arg, |_| Ok(()))
}

/// [`spawn`], with `setup` adding mappings to the new address space before the task starts.
pub fn spawn_with(
    name: &'static str,
    entry: fn(u64) -> i64,
    arg: u64,
    setup: impl FnOnce(vm::SpaceId) -> Result<(), vm::VmError>,
) -> Result<sched::TaskId, SpawnError> {
    let space = vm::create().map_err(|_| SpawnError::NoMemory)?;
    let setup = vm::map_anonymous(space, STACK_TOP - STACK_SIZE, STACK_SIZE, true)
        .and_then(|()| vm::map_anonymous(space, DATA_START, DATA_SIZE, true))
        .and_then(|()| setup(space));
    if setup.is_err() {
        vm::destroy(space);
        return Err(SpawnError::NoMemory);
    }
    let frame = TrapFrame {
        rdi: entry as usize as u64,
        rsi: arg,
        rip: ulib::user_start as *const () as usize as u64,
        cs: u64::from(gdt::USER_CS),
        rflags: 0x202,      // IF
        rsp: STACK_TOP - 8, // as if `user_start` had been called
        ss: u64::from(gdt::USER_DS),
        ..TrapFrame::ZERO
    };
    sched::spawn_user(name, &frame, space, None).ok_or_else(|| {
        vm::destroy(space);
        SpawnError::NoMemory
    })
}

fn sys_write(frame: &mut TrapFrame) -> i64 {
    let (addr, len) = (frame.rdi, frame.rsi);
    let Some(space) = sched::current_space() else {
        return -EINVAL;
    };
    if len > 4096 {
        return -EINVAL;
    }
    if !vm::user_range_ok(space, addr, len, false) {
        return -EFAULT;
    }
    // SAFETY: the range is readable by this task (checked above); the kernel reads it through
    // the same mapping, and an untouched anonymous page is filled by the fault handler.
    let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) };
    crate::arch::serial::write_bytes(bytes);
    len as i64
}

fn sys_exit(frame: &mut TrapFrame) -> i64 {
    sched::exit_current(frame.rdi as i64)
}

fn sys_yield(_frame: &mut TrapFrame) -> i64 {
    sched::yield_now();
    0
}

fn sys_getpid(_frame: &mut TrapFrame) -> i64 {
    sched::current().map_or(0, |t| t.pid() as i64)
}

fn sys_fork(frame: &mut TrapFrame) -> i64 {
    let Some(parent) = sched::current_space() else {
        return -EINVAL;
    };
    let Ok(child) = vm::fork(parent) else {
        return -ENOMEM;
    };
    let mut child_frame = TrapFrame { ..*frame };
    child_frame.rax = 0;
    match sched::spawn_user(sched::current_name(), &child_frame, child, sched::current()) {
        Some(id) => id.pid() as i64,
        None => {
            vm::destroy(child);
            -ENOMEM
        }
    }
}

fn sys_wait(frame: &mut TrapFrame) -> i64 {
    let child = sched::TaskId::from_pid(frame.rdi);
    if sched::current().is_none() || sched::parent_of(child) != sched::current() {
        return -ECHILD;
    }
    sched::join(child).unwrap_or(-ECHILD)
}

/// Installs the basic system calls.
pub fn init() {
    syscall::register(nr::WRITE, sys_write);
    syscall::register(nr::EXIT, sys_exit);
    syscall::register(nr::YIELD, sys_yield);
    syscall::register(nr::GETPID, sys_getpid);
    syscall::register(nr::FORK, sys_fork);
    syscall::register(nr::WAIT, sys_wait);
    println!("usermode: system calls 0-5 installed (write, exit, yield, getpid, fork, wait)");
}
