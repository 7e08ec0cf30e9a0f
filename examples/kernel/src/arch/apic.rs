//! The local APIC (xAPIC, memory-mapped at its reset address): periodic timer, EOI, spurious
//! vector and the INIT/SIPI interprocessor interrupts that start the other CPUs.
//!
//! The timer is calibrated once, on the boot CPU, against PIT channel 2 (the PC speaker gate,
//! which needs no interrupt); the TSC is calibrated in the same window for [`delay_us`].

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use x86::io::{inb, outb};

use crate::{
    arch::percpu,
    arch::trap::{self, Handled, TrapFrame},
};

/// The xAPIC's physical (and, identity-mapped, virtual) base.
const APIC_BASE: u64 = 0xfee0_0000;

/// Vector of the local APIC timer.
pub const TIMER_VECTOR: u8 = 0x20;
/// Vector the APIC delivers for spurious interrupts (no EOI).
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// Timer frequency.
pub const HZ: u64 = 100;

const REG_ID: u64 = 0x20;
const REG_TPR: u64 = 0x80;
const REG_EOI: u64 = 0xb0;
const REG_SVR: u64 = 0xf0;
const REG_ICR_LOW: u64 = 0x300;
const REG_ICR_HIGH: u64 = 0x310;
const REG_LVT_TIMER: u64 = 0x320;
const REG_LVT_LINT0: u64 = 0x350;
const REG_LVT_LINT1: u64 = 0x360;
const REG_TIMER_INIT: u64 = 0x380;
const REG_TIMER_CURRENT: u64 = 0x390;
const REG_TIMER_DIVIDE: u64 = 0x3e0;

const LVT_MASKED: u32 = 1 << 16;
const TIMER_PERIODIC: u32 = 1 << 17;

/// APIC timer counts (divide by 16) per timer period, set by [`calibrate`].
static TIMER_COUNT: AtomicU64 = AtomicU64::new(0);
/// TSC cycles per microsecond, set by [`calibrate`].
static TSC_PER_US: AtomicU64 = AtomicU64::new(0);
/// Vector of the reschedule IPI, which only wakes an idle CPU out of `hlt`.
pub const RESCHEDULE_VECTOR: u8 = 0x21;
/// How many tick hooks can be installed at once.
pub const MAX_TICK_HOOKS: usize = 4;

/// Functions every timer interrupt calls (after EOI, before preemption); 0 = empty slot.
static TICK_HOOKS: [AtomicUsize; MAX_TICK_HOOKS] = [const { AtomicUsize::new(0) }; MAX_TICK_HOOKS];

/// What [`add_tick_hook`] installs: called on every tick of every CPU, in interrupt context
/// (interrupts off), with the index of the CPU it runs on (the interrupted task may sleep in a
/// hook and resume elsewhere, so the index is read again for each hook).
pub type TickHook = fn(cpu: usize);

fn read(reg: u64) -> u32 {
    // SAFETY: a local APIC register inside the identity-mapped (uncached) APIC page.
    unsafe { core::ptr::read_volatile((APIC_BASE + reg) as *const u32) }
}

fn write(reg: u64, value: u32) {
    // SAFETY: as in `read`; writes to APIC registers only affect this CPU's APIC.
    unsafe { core::ptr::write_volatile((APIC_BASE + reg) as *mut u32, value) }
}

/// Whether CPUID offers x2APIC mode (this kernel drives the APIC in xAPIC mode either way).
pub fn x2apic_offered() -> bool {
    let leaf = core::arch::x86_64::__cpuid(1);
    leaf.ecx & (1 << 21) != 0
}

/// This CPU's local APIC id.
pub fn id() -> u32 {
    read(REG_ID) >> 24
}

/// Signals the end of the interrupt being handled.
pub fn eoi() {
    write(REG_EOI, 0);
}

/// Installs a timer-tick hook; false when all [`MAX_TICK_HOOKS`] slots are taken.
pub fn add_tick_hook(hook: TickHook) -> bool {
    TICK_HOOKS.iter().any(|slot| {
        slot.compare_exchange(0, hook as usize, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    })
}

/// Removes a hook installed by [`add_tick_hook`] (a tick already running it may still finish).
pub fn remove_tick_hook(hook: TickHook) {
    for slot in &TICK_HOOKS {
        let _ = slot.compare_exchange(hook as usize, 0, Ordering::AcqRel, Ordering::Relaxed);
    }
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Microseconds since an arbitrary point (TSC-based; needs [`calibrate`]).
pub fn now_us() -> u64 {
    rdtsc() / TSC_PER_US.load(Ordering::Relaxed).max(1)
}

/// Busy-waits at least `us` microseconds (TSC-based; needs [`calibrate`]).
pub fn delay_us(us: u64) {
    let per_us = TSC_PER_US.load(Ordering::Relaxed).max(1);
    let end = rdtsc() + us * per_us;
    while rdtsc() < end {
        core::hint::spin_loop();
    }
}

/// Masks the legacy 8259 PICs: firmware left them delivering IRQ 0 at vector 8, which would
/// look like a double fault. Everything here goes through the local APIC.
fn mask_pic() {
    // SAFETY: the PICs' data ports; writing 0xff masks every line.
    unsafe {
        outb(0x21, 0xff);
        outb(0xa1, 0xff);
    }
}

/// Measures the APIC timer and the TSC against 10 ms of PIT channel 2. Boot CPU, once, with
/// interrupts off.
fn calibrate() {
    const PIT_HZ: u64 = 1_193_182;
    const WINDOW_MS: u64 = 10;
    let pit_count = (PIT_HZ * WINDOW_MS / 1000) as u16;
    write(REG_TIMER_DIVIDE, 0x3); // divide by 16
    write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    // SAFETY: PIT channel 2 and its gate in port 0x61 (speaker off); no memory is touched.
    let (apic_counts, tsc_cycles) = unsafe {
        let gate = inb(0x61);
        outb(0x61, (gate & !0x02) & !0x01); // gate low, speaker off
        outb(0x43, 0xb0); // channel 2, lobyte/hibyte, mode 0 (count down once), binary
        outb(0x42, pit_count as u8);
        outb(0x42, (pit_count >> 8) as u8);
        write(REG_TIMER_INIT, u32::MAX);
        let tsc0 = rdtsc();
        outb(0x61, (gate & !0x02) | 0x01); // gate high: the count starts
        while inb(0x61) & 0x20 == 0 {
            core::hint::spin_loop();
        }
        let tsc1 = rdtsc();
        let left = read(REG_TIMER_CURRENT);
        write(REG_TIMER_INIT, 0);
        outb(0x61, gate & !0x03);
        (u64::from(u32::MAX - left), tsc1 - tsc0)
    };
    let per_second = apic_counts * 1000 / WINDOW_MS;
    TIMER_COUNT.store((per_second / HZ).max(1000), Ordering::Relaxed);
    TSC_PER_US.store((tsc_cycles / (WINDOW_MS * 1000)).max(1), Ordering::Relaxed);
}

/// Enables this CPU's local APIC and starts its periodic timer. The boot CPU calls it first
/// (which also calibrates and installs the handlers); every AP calls it during bring-up.
/// Interrupts stay off: the caller enables them when it is ready to be preempted.
pub fn init_this_cpu(boot_cpu: bool) {
    if boot_cpu {
        mask_pic();
        trap::set_handler(TIMER_VECTOR, on_timer);
        trap::set_handler(SPURIOUS_VECTOR, on_spurious);
        trap::set_handler(RESCHEDULE_VECTOR, on_reschedule);
    }
    write(REG_SVR, 0x100 | u32::from(SPURIOUS_VECTOR)); // software enable
    write(REG_TPR, 0);
    write(REG_LVT_LINT0, LVT_MASKED);
    write(REG_LVT_LINT1, LVT_MASKED);
    if boot_cpu {
        calibrate();
    }
    write(REG_TIMER_DIVIDE, 0x3);
    write(REG_LVT_TIMER, TIMER_PERIODIC | u32::from(TIMER_VECTOR));
    write(
        REG_TIMER_INIT,
        TIMER_COUNT.load(Ordering::Relaxed).min(u64::from(u32::MAX)) as u32,
    );
}

/// The timer frequency found by calibration, in APIC counts per second (for the boot log).
pub fn timer_counts_per_tick() -> u64 {
    TIMER_COUNT.load(Ordering::Relaxed)
}

fn on_timer(frame: &mut TrapFrame) -> Handled {
    eoi();
    percpu::this_cpu().ticks.fetch_add(1, Ordering::Relaxed);
    for slot in &TICK_HOOKS {
        let hook = slot.load(Ordering::Acquire);
        if hook != 0 {
            // SAFETY: only `add_tick_hook` stores non-zero values into TICK_HOOKS, and it
            // stores `TickHook` values.
            let hook: TickHook = unsafe { core::mem::transmute::<usize, TickHook>(hook) };
            // Read afresh for each hook: one that makes the task sleep (the apf host model
            // raises a not-present fault) can resume it on another CPU.
            hook(percpu::cpu_id());
        }
    }
    crate::task::sched::preempt(frame);
    Handled::Yes
}

fn on_spurious(_frame: &mut TrapFrame) -> Handled {
    Handled::Yes
}

fn on_reschedule(_frame: &mut TrapFrame) -> Handled {
    eoi();
    Handled::Yes
}

/// Sends the reschedule IPI to the CPU with APIC id `apic_id` (wakes it from `hlt`).
pub fn send_reschedule(apic_id: u32) {
    send_ipi(apic_id, RESCHEDULE_VECTOR);
}

/// Sends a fixed interrupt with `vector` to the CPU with APIC id `apic_id`.
pub fn send_ipi(apic_id: u32, vector: u8) {
    let irq = crate::spin::irq_save(); // ICR high + low must not interleave with a handler's
    wait_icr_idle();
    write(REG_ICR_HIGH, apic_id << 24);
    write(REG_ICR_LOW, u32::from(vector)); // fixed delivery, physical destination, edge
    crate::spin::irq_restore(irq);
}

/// Sends a non-maskable interrupt (ICR delivery mode NMI, vector ignored) to the CPU with
/// APIC id `apic_id`; to itself, it is taken right away, even with interrupts disabled.
pub fn send_nmi(apic_id: u32) {
    let irq = crate::spin::irq_save(); // as in `send_ipi`
    wait_icr_idle();
    write(REG_ICR_HIGH, apic_id << 24);
    write(REG_ICR_LOW, 0b100 << 8); // NMI delivery, physical destination, edge
    crate::spin::irq_restore(irq);
}

fn wait_icr_idle() {
    while read(REG_ICR_LOW) & (1 << 12) != 0 {
        core::hint::spin_loop();
    }
}

/// Sends INIT, then two STARTUP IPIs with start page `page` (the trampoline's physical address
/// / 4096), to the CPU with APIC id `apic_id`, with the delays the MP specification asks for.
pub fn start_ap(apic_id: u32, page: u8) {
    wait_icr_idle();
    write(REG_ICR_HIGH, apic_id << 24);
    write(REG_ICR_LOW, 0x4500); // INIT, level assert
    wait_icr_idle();
    delay_us(10_000);
    for _ in 0..2 {
        write(REG_ICR_HIGH, apic_id << 24);
        write(REG_ICR_LOW, 0x4600 | u32::from(page)); // STARTUP
        wait_icr_idle();
        delay_us(200);
    }
}
