//! A small preemptive scheduler: kernel and user tasks on one global run queue, run by every
//! CPU's scheduler loop.
//!
//! Design (xv6-like): each CPU runs [`run`] on its own boot stack. The loop takes the scheduler
//! lock, pops a runnable task and switches to it *with the lock held*; the task releases it.
//! A task gives the CPU back (yield, preemption, block, exit) by taking the lock and switching
//! to its CPU's loop, which then requeues it, frees it, or leaves it blocked, and releases the
//! lock. Holding the lock across the switch is what makes a task's saved context complete
//! before any other CPU can pick it up. The lock is taken with interrupts off, so interrupt
//! handlers may call [`unblock`] and the timer may call [`preempt`].
//!
//! Blocking has park/unpark semantics: [`unblock`] on a task that is not (yet) blocked leaves a
//! wake-up pending, and its next [`block_current`] returns at once. So a wake that races ahead
//! of its wait is never lost; callers re-check their condition in a loop.
//!
//! Every task slot has its own kernel stack, mapped once at boot in the kernel half at a
//! fixed address ([`stack_top`]) with unmapped guard pages below it, so an overflow faults
//! (and is reported as one) instead of overwriting memory. User tasks also own an address
//! space ([`crate::mm::vm`]), which the loop loads into CR3 for them; the loop itself always runs
//! on the kernel page tables, so a CPU never keeps a user address space loaded while it is not
//! running that space's task (no TLB shootdowns are needed: one task per address space).

use core::{
    arch::global_asm,
    cell::UnsafeCell,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use crate::{
    arch::gdt,
    arch::percpu::{self, NO_TASK},
    arch::trap::TrapFrame,
    mm::frames,
    mm::vm,
    spin::{irq_restore, irq_save},
};

/// The most tasks alive at once (running, runnable, blocked, or exited and not yet joined).
pub const MAX_TASKS: usize = 32;
const KSTACK_ORDER: u32 = 3;
/// Size of every task's kernel stack.
pub const KSTACK_SIZE: u64 = frames::FRAME_SIZE << KSTACK_ORDER;
/// Where the task stacks live (kernel half: PML4 entry 0, shared by every address space).
const KSTACKS_BASE: u64 = 256 << 30;
/// Virtual distance between two slots' stacks: the stack at the top, unmapped guard below.
const KSTACK_STRIDE: u64 = 4 * KSTACK_SIZE;
/// Exit code of a user task killed for a fault (like a shell's 128 + SIGSEGV).
pub const EXIT_KILLED: i64 = 139;

global_asm!(
    r#"
    .section .text
    .global sched_switch
    // sched_switch(save: *mut u64 /* rdi */, to: u64 /* rsi */)
sched_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret

sched_kernel_task_start:
    movq %r12, %rdi
    movq %r13, %rsi
    call sched_kernel_task_entry
    ud2

sched_user_task_start:
    call sched_unlock_after_switch
    jmp trap_return
"#,
    options(att_syntax)
);

unsafe extern "C" {
    fn sched_switch(save: *mut u64, to: u64);
    static sched_kernel_task_start: u8;
    static sched_user_task_start: u8;
}

/// A task, as its process id: slot in the low 16 bits, slot generation above (so an id of an
/// exited and reaped task never names the slot's next task).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskId(u64);

impl TaskId {
    fn new(slot: usize, generation: u64) -> Self {
        Self(generation << 16 | slot as u64)
    }

    /// The process id user space sees.
    pub fn pid(self) -> u64 {
        self.0
    }

    /// The id of process `pid`.
    pub fn from_pid(pid: u64) -> Self {
        Self(pid)
    }

    fn slot(self) -> usize {
        (self.0 & 0xffff) as usize
    }

    fn generation(self) -> u64 {
        self.0 >> 16
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    /// Reserved by a spawn that is writing the initial stack.
    New,
    Runnable,
    Running,
    Blocked,
    Exited,
}

impl Task {
    /// Frees the slot of an exited task; its id (generation) is never reused.
    fn reap(&mut self) {
        self.state = State::Free;
        self.generation += 1;
    }
}

#[derive(Clone, Copy)]
struct Task {
    state: State,
    generation: u64,
    name: &'static str,
    /// Saved RSP while not running.
    rsp: u64,
    /// Address space of a user task.
    space: Option<vm::SpaceId>,
    wake_pending: bool,
    exit_code: i64,
    joiner: Option<usize>,
    /// The task that forked this one (only it may wait for it from user space).
    parent: Option<TaskId>,
    /// Its parent exited: nobody will join it, so its slot is freed as soon as it exits.
    orphan: bool,
    preemptions: u64,
    /// Tick (of [`ticks`]) at which a sleeping task is woken; 0 when not sleeping.
    wake_at: u64,
}

const FREE: Task = Task {
    state: State::Free,
    generation: 1,
    name: "",
    rsp: 0,
    space: None,
    wake_pending: false,
    exit_code: 0,
    joiner: None,
    parent: None,
    orphan: false,
    preemptions: 0,
    wake_at: 0,
};

struct Inner {
    tasks: [Task; MAX_TASKS],
    queue: [u8; MAX_TASKS],
    head: usize,
    len: usize,
}

impl Inner {
    fn push(&mut self, slot: usize) {
        assert!(self.len < MAX_TASKS, "run queue overflow");
        self.queue[(self.head + self.len) % MAX_TASKS] = slot as u8;
        self.len += 1;
    }

    fn pop(&mut self) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let slot = self.queue[self.head];
        self.head = (self.head + 1) % MAX_TASKS;
        self.len -= 1;
        Some(usize::from(slot))
    }

    /// Makes a blocked task runnable, or leaves a wake-up pending for a live one.
    fn wake(&mut self, slot: usize) {
        let task = &mut self.tasks[slot];
        match task.state {
            State::Blocked => {
                task.state = State::Runnable;
                self.push(slot);
            }
            State::Runnable | State::Running => task.wake_pending = true,
            State::Free | State::New | State::Exited => {}
        }
    }
}

struct Sched {
    locked: AtomicBool,
    inner: UnsafeCell<Inner>,
}

// SAFETY: `inner` is only reached through `inner()`, whose callers hold `locked`.
unsafe impl Sync for Sched {}

static SCHED: Sched = Sched {
    locked: AtomicBool::new(false),
    inner: UnsafeCell::new(Inner {
        tasks: [FREE; MAX_TASKS],
        queue: [0; MAX_TASKS],
        head: 0,
        len: 0,
    }),
};

/// Tasks preempted by the timer since boot.
static PREEMPTIONS: AtomicU64 = AtomicU64::new(0);

/// Disables interrupts, takes the scheduler lock; returns whether interrupts were on.
fn lock() -> bool {
    let irq = irq_save();
    while SCHED
        .locked
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    irq
}

fn unlock() {
    SCHED.locked.store(false, Ordering::Release);
}

/// The scheduler state.
///
/// # Safety
/// The caller holds the lock, and drops the reference before releasing it or switching.
#[allow(clippy::mut_from_ref)]
unsafe fn inner() -> &'static mut Inner {
    // SAFETY: by the contract, the lock makes this the only live reference.
    unsafe { &mut *SCHED.inner.get() }
}

/// Called by a freshly started task, on its own stack: the loop switched here holding the lock.
#[unsafe(no_mangle)]
extern "C" fn sched_unlock_after_switch() {
    unlock();
}

#[unsafe(no_mangle)]
extern "C" fn sched_kernel_task_entry(entry: usize, arg: u64) -> ! {
    unlock();
    irq_restore(true);
    // SAFETY: `spawn` stored a `fn(u64) -> i64` in r12, which the start stub passed here.
    let entry = unsafe { core::mem::transmute::<usize, fn(u64) -> i64>(entry) };
    exit_current(entry(arg))
}

/// The top of slot `slot`'s kernel stack.
pub fn stack_top(slot: usize) -> u64 {
    KSTACKS_BASE + (slot as u64 + 1) * KSTACK_STRIDE
}

/// The task slot whose stack guard holds `vaddr`, if any (to name a kernel stack overflow).
pub fn stack_guard_slot(vaddr: u64) -> Option<usize> {
    let off = vaddr.checked_sub(KSTACKS_BASE)?;
    let slot = (off / KSTACK_STRIDE) as usize;
    (slot < MAX_TASKS && off % KSTACK_STRIDE < KSTACK_STRIDE - KSTACK_SIZE).then_some(slot)
}

/// Maps every task slot's kernel stack. Boot CPU, once, after [`vm::init`], before any spawn.
pub fn init() {
    for slot in 0..MAX_TASKS {
        let frames = frames::alloc(KSTACK_ORDER).expect("no memory for the task stacks");
        vm::map_kernel(stack_top(slot) - KSTACK_SIZE, frames, KSTACK_SIZE)
            .expect("no memory for the task stacks' page tables");
    }
}

/// Reserves a free task slot.
fn reserve() -> Option<usize> {
    let irq = lock();
    // SAFETY: the lock is held.
    let inner = unsafe { inner() };
    let slot = inner.tasks.iter().position(|t| t.state == State::Free);
    if let Some(slot) = slot {
        inner.tasks[slot].state = State::New;
    }
    unlock();
    irq_restore(irq);
    slot
}

/// Makes reserved slot `slot`, whose stack holds its initial context at `rsp`, runnable.
fn start(
    slot: usize,
    name: &'static str,
    rsp: u64,
    space: Option<vm::SpaceId>,
    parent: Option<TaskId>,
) -> TaskId {
    let irq = lock();
    // SAFETY: the lock is held.
    let inner = unsafe { inner() };
    let generation = inner.tasks[slot].generation;
    debug_assert_eq!(inner.tasks[slot].state, State::New);
    inner.tasks[slot] = Task {
        state: State::Runnable,
        generation,
        name,
        rsp,
        space,
        parent,
        ..FREE
    };
    inner.push(slot);
    unlock();
    kick_idle_cpu();
    irq_restore(irq);
    TaskId::new(slot, generation)
}

/// Wakes one halted CPU (other than this one) to pick up a task just queued.
fn kick_idle_cpu() {
    let me = percpu::this_cpu().id.load(Ordering::Relaxed);
    let idle = (0..crate::arch::gdt::MAX_CPUS)
        .map(percpu::cpu)
        .find(|c| c.id.load(Ordering::Relaxed) != me && c.idle.load(Ordering::SeqCst));
    if let Some(cpu) = idle
        && cpu.online.load(Ordering::Acquire)
    {
        crate::arch::apic::send_reschedule(cpu.apic_id.load(Ordering::Relaxed));
    }
}

/// Writes the six callee-saved registers and a return address below `top`; returns the RSP
/// that `sched_switch` resumes from.
fn initial_context(top: u64, ret: u64, r12: u64, r13: u64) -> u64 {
    let sp = top - 7 * 8;
    let regs: [u64; 7] = [0, 0, r13, r12, 0, 0, ret]; // r15 r14 r13 r12 rbx rbp ret
    // SAFETY: `[sp, top)` is inside the stack of a slot the caller reserved.
    unsafe { core::ptr::copy_nonoverlapping(regs.as_ptr(), sp as *mut u64, 7) };
    sp
}

/// Starts a kernel task running `entry(arg)`; its return value is the exit code [`join`]
/// returns. `None` when no task slot is free.
pub fn spawn(name: &'static str, entry: fn(u64) -> i64, arg: u64) -> Option<TaskId> {
    let slot = reserve()?;
    let sp = initial_context(
        stack_top(slot),
        &raw const sched_kernel_task_start as u64,
        entry as usize as u64,
        arg,
    );
    Some(start(slot, name, sp, None, None))
}

/// Starts a user task in address space `space`, entering ring 3 with the registers of
/// `frame` (RIP, RSP, CS/SS of ring 3, arguments). The task owns `space` from now on: it is
/// destroyed when the task exits. On `None` (no free slot) the caller still owns it.
/// `parent` (the forking task) is the only user task allowed to wait for it.
pub fn spawn_user(
    name: &'static str,
    frame: &TrapFrame,
    space: vm::SpaceId,
    parent: Option<TaskId>,
) -> Option<TaskId> {
    let slot = reserve()?;
    let frame_at = stack_top(slot) - core::mem::size_of::<TrapFrame>() as u64;
    // SAFETY: the frame goes at the top of the reserved slot's stack, which nothing else uses;
    // TrapFrame is plain data.
    unsafe { core::ptr::copy_nonoverlapping(frame, frame_at as *mut TrapFrame, 1) };
    let sp = initial_context(frame_at, &raw const sched_user_task_start as u64, 0, 0);
    Some(start(slot, name, sp, Some(space), parent))
}

/// This CPU's scheduler loop: runs tasks until the machine stops, halting when none is runnable.
pub fn run() -> ! {
    let cpu = percpu::this_cpu();
    let cpu_id = cpu.id.load(Ordering::Relaxed);
    loop {
        let irq = lock();
        // SAFETY: the lock is held.
        let queue = unsafe { inner() };
        let Some(slot) = queue.pop() else {
            // Set under the lock: whoever queues a task after this sees it and kicks us.
            cpu.idle.store(true, Ordering::SeqCst);
            unlock();
            irq_restore(irq);
            // SAFETY: STI takes effect after HLT starts, so no wake-up interrupt is missed.
            unsafe { core::arch::asm!("sti", "hlt", options(nostack)) };
            cpu.idle.store(false, Ordering::Relaxed);
            continue;
        };
        let task = &mut queue.tasks[slot];
        task.state = State::Running;
        let top = stack_top(slot);
        cpu.kernel_stack.store(top, Ordering::Relaxed);
        // SAFETY: on this CPU, with the stack of the task about to run here.
        unsafe { gdt::set_kernel_stack(cpu_id, top) };
        if let Some(space) = task.space {
            vm::activate(space);
        }
        cpu.current.store(slot, Ordering::Relaxed);
        cpu.switches.fetch_add(1, Ordering::Relaxed);
        let to = task.rsp;
        // SAFETY: `to` is the task's saved context (or initial one); the task returns here
        // through `sched_switch` with the lock held. `sched_rsp` is this CPU's own slot.
        unsafe { sched_switch(cpu.sched_rsp.as_ptr(), to) };
        cpu.current.store(NO_TASK, Ordering::Relaxed);
        vm::activate_kernel();
        // SAFETY: the task handed the lock back to us.
        let sched = unsafe { inner() };
        let task = &mut sched.tasks[slot];
        match task.state {
            State::Running => {
                task.state = State::Runnable;
                sched.push(slot);
            }
            State::Exited => {
                if let Some(joiner) = task.joiner.take() {
                    sched.wake(joiner);
                } else if task.orphan {
                    task.reap();
                }
            }
            State::Blocked => {}
            State::Free | State::New | State::Runnable => {
                unreachable!("task {slot} switched out while {:?}", task.state)
            }
        }
        unlock();
        irq_restore(irq);
    }
}

/// Gives this CPU back to its loop with the lock held (interrupts off); returns, lock still
/// held, when the task runs again.
///
/// # Safety
/// The lock is held, a task (slot `slot`) runs on this CPU, and no reference into the
/// scheduler state is live.
unsafe fn switch_to_loop(slot: usize) {
    let cpu = percpu::this_cpu();
    // SAFETY: the lock is held; only the raw pointer to the slot's `rsp` outlives this line.
    let save = unsafe { &raw mut inner().tasks[slot].rsp };
    // SAFETY: `sched_rsp` is this CPU's loop context, saved when it switched to us.
    unsafe { sched_switch(save, cpu.sched_rsp.load(Ordering::Relaxed)) };
}

fn current_slot() -> Option<usize> {
    let slot = percpu::this_cpu().current.load(Ordering::Relaxed);
    (slot != NO_TASK).then_some(slot)
}

/// The task running on this CPU (`None` in a scheduler loop or before the scheduler starts).
pub fn current() -> Option<TaskId> {
    let irq = lock();
    // SAFETY: the lock is held.
    let id =
        current_slot().map(|slot| TaskId::new(slot, unsafe { inner() }.tasks[slot].generation));
    unlock();
    irq_restore(irq);
    id
}

/// The task that forked `task` (`None` for tasks the kernel started, or unknown tasks).
pub fn parent_of(task: TaskId) -> Option<TaskId> {
    let irq = lock();
    // SAFETY: the lock is held.
    let parent = unsafe { inner() }
        .tasks
        .get(task.slot())
        .filter(|t| t.generation == task.generation() && t.state != State::Free)
        .and_then(|t| t.parent);
    unlock();
    irq_restore(irq);
    parent
}

/// Whether `task` is blocked right now (in [`block_current`] or [`join`]).
pub fn is_blocked(task: TaskId) -> bool {
    let irq = lock();
    // SAFETY: the lock is held.
    let blocked = unsafe { inner() }
        .tasks
        .get(task.slot())
        .is_some_and(|t| t.generation == task.generation() && t.state == State::Blocked);
    unlock();
    irq_restore(irq);
    blocked
}

/// The address space of the task running here, if it is a user task.
pub fn current_space() -> Option<vm::SpaceId> {
    let irq = lock();
    // SAFETY: the lock is held.
    let space = current_slot().and_then(|slot| unsafe { inner() }.tasks[slot].space);
    unlock();
    irq_restore(irq);
    space
}

/// Lets other runnable tasks run; returns when this one is scheduled again.
pub fn yield_now() {
    let irq = lock();
    if let Some(slot) = current_slot() {
        // SAFETY: the lock is held, a task runs here, no reference is live.
        unsafe { switch_to_loop(slot) };
    }
    unlock();
    irq_restore(irq);
}

/// The kernel's clock: timer ticks of the boot CPU since boot ([`crate::arch::apic::HZ`] a second).
pub fn ticks() -> u64 {
    percpu::cpu(0).ticks.load(Ordering::Relaxed)
}

/// Blocks the running task for at least `n` ticks (it may also return early for an
/// [`unblock`]: the caller re-checks what it waits for). Task context only.
pub fn sleep_ticks(n: u64) {
    let deadline = ticks() + n.max(1);
    while ticks() < deadline {
        let irq = lock();
        if let Some(slot) = current_slot() {
            // SAFETY: the lock is held.
            unsafe { inner() }.tasks[slot].wake_at = deadline;
        }
        unlock();
        irq_restore(irq);
        block_current();
    }
}

/// Called by the boot CPU's timer interrupt: wakes the sleepers whose time has come.
fn wake_sleepers(now: u64) {
    let irq = lock();
    // SAFETY: the lock is held.
    let inner = unsafe { inner() };
    let mut woke = false;
    for slot in 0..MAX_TASKS {
        let t = &mut inner.tasks[slot];
        if t.wake_at != 0 && t.wake_at <= now {
            t.wake_at = 0;
            woke |= t.state == State::Blocked;
            inner.wake(slot);
        }
    }
    unlock();
    if woke {
        kick_idle_cpu();
    }
    irq_restore(irq);
}

/// Called by the timer interrupt: wakes due sleepers (boot CPU), then the running task (if
/// any) goes to the back of the queue.
pub fn preempt(_frame: &mut TrapFrame) {
    if percpu::this_cpu().id.load(Ordering::Relaxed) == 0 {
        wake_sleepers(ticks());
    }
    let irq = lock();
    if let Some(slot) = current_slot() {
        // SAFETY: the lock is held.
        unsafe { inner() }.tasks[slot].preemptions += 1;
        PREEMPTIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the lock is held, a task runs here, the reference above is dead.
        unsafe { switch_to_loop(slot) };
    }
    unlock();
    irq_restore(irq);
}

/// Blocks the running task until [`unblock`]; returns at once if a wake-up is already pending
/// (it is consumed). May return for an earlier wake-up: re-check the condition.
///
/// Callable from task context and from an exception handler running on the task's stack
/// (e.g. a page-fault handler waiting for a page). Not from a scheduler loop.
pub fn block_current() {
    let irq = lock();
    let slot = current_slot().expect("block_current outside a task");
    // SAFETY: the lock is held.
    let task = &mut unsafe { inner() }.tasks[slot];
    if task.wake_pending {
        task.wake_pending = false;
    } else {
        task.state = State::Blocked;
        // SAFETY: the lock is held, a task runs here, `task` is dead from here on.
        unsafe { switch_to_loop(slot) };
    }
    unlock();
    irq_restore(irq);
}

/// Wakes `task`: a blocked task becomes runnable; a running or runnable one gets a pending
/// wake-up that its next [`block_current`] consumes. Safe from interrupt context. Returns false
/// when `task` no longer exists (exited).
pub fn unblock(task: TaskId) -> bool {
    let irq = lock();
    // SAFETY: the lock is held.
    let inner = unsafe { inner() };
    let slot = task.slot();
    let alive = slot < MAX_TASKS
        && inner.tasks[slot].generation == task.generation()
        && !matches!(inner.tasks[slot].state, State::Free | State::Exited);
    let queued = alive && inner.tasks[slot].state == State::Blocked;
    if alive {
        inner.wake(slot);
    }
    unlock();
    if queued {
        kick_idle_cpu();
    }
    irq_restore(irq);
    alive
}

/// Ends the running task with `code`; a user task's address space is destroyed first.
pub fn exit_current(code: i64) -> ! {
    // Interrupts stay off until the switch: the task must not be preempted half-dead.
    let _ = irq_save();
    let slot = current_slot().expect("exit_current outside a task");
    let _ = lock();
    // SAFETY: the lock is held.
    let space = unsafe { inner() }.tasks[slot].space.take();
    unlock();
    if let Some(space) = space {
        vm::activate_kernel();
        vm::destroy(space);
    }
    let _ = lock();
    // SAFETY: the lock is held.
    let inner = unsafe { inner() };
    // Our children will never be waited for: free the exited ones, mark the others.
    let me = TaskId::new(slot, inner.tasks[slot].generation);
    for child in inner.tasks.iter_mut().filter(|t| t.parent == Some(me)) {
        child.parent = None;
        match child.state {
            State::Exited => child.reap(),
            State::Free => {}
            _ => child.orphan = true,
        }
    }
    let task = &mut inner.tasks[slot];
    task.state = State::Exited;
    task.exit_code = code;
    // SAFETY: the lock is held, a task runs here, `task` is dead from here on.
    unsafe { switch_to_loop(slot) };
    unreachable!("an exited task was resumed");
}

/// Waits for `task` to exit and returns its exit code, freeing its slot. `None` if no such
/// task exists (never started, or already joined). One joiner per task.
pub fn join(task: TaskId) -> Option<i64> {
    let irq = lock();
    let me = current_slot().expect("join outside a task");
    let slot = task.slot();
    let code = loop {
        // SAFETY: the lock is held.
        let inner = unsafe { inner() };
        if slot >= MAX_TASKS || slot == me {
            break None;
        }
        let t = &mut inner.tasks[slot];
        if t.generation != task.generation() || t.state == State::Free {
            break None;
        }
        if t.state == State::Exited {
            let code = t.exit_code;
            t.reap();
            break Some(code);
        }
        t.joiner = Some(me);
        inner.tasks[me].state = State::Blocked;
        // SAFETY: the lock is held, we are a task, the references above are dead.
        unsafe { switch_to_loop(me) };
    };
    unlock();
    irq_restore(irq);
    code
}

/// How often `task` was preempted by the timer (`None` once it is gone).
pub fn preemptions(task: TaskId) -> Option<u64> {
    let irq = lock();
    // SAFETY: the lock is held.
    let t = unsafe { inner() }.tasks.get(task.slot()).copied();
    unlock();
    irq_restore(irq);
    t.filter(|t| t.generation == task.generation() && t.state != State::Free)
        .map(|t| t.preemptions)
}

/// Name of the running task (for fault reports).
pub fn current_name() -> &'static str {
    let irq = lock();
    // SAFETY: the lock is held.
    let name = current_slot().map_or("<none>", |slot| unsafe { inner() }.tasks[slot].name);
    unlock();
    irq_restore(irq);
    name
}

/// Task slots free right now.
pub fn free_slots() -> usize {
    let irq = lock();
    // SAFETY: the lock is held.
    let free = unsafe { inner() }
        .tasks
        .iter()
        .filter(|t| t.state == State::Free)
        .count();
    unlock();
    irq_restore(irq);
    free
}

/// Preemptions since boot.
pub fn total_preemptions() -> u64 {
    PREEMPTIONS.load(Ordering::Relaxed)
}
