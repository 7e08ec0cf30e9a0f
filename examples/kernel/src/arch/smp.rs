//! Bringing up the other CPUs: find them in the ACPI MADT, start each with INIT-SIPI-SIPI
//! through a real-mode trampoline (`ap_boot.S`) copied to a fixed page below 1 MiB (the frame
//! allocator never hands out the first MiB), and finish their set-up in [`ap_main`]: GDT/TSS,
//! IDT, per-CPU data, SYSCALL, local APIC timer; then they join the scheduler.

use core::{
    arch::global_asm,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
};

use crate::{
    arch::apic,
    arch::gdt,
    arch::idt,
    arch::percpu,
    arch::syscall,
    arch::trap::{self, Handled, TrapFrame},
    mm::frames,
    mm::vm,
    println, spin,
    task::sched,
};

/// Vector of the function-call IPI of [`on_each_cpu`].
pub const CALL_VECTOR: u8 = 0x22;

/// Where the trampoline runs (STARTUP vector 0x08).
const AP_BASE: u64 = 0x8000;
const AP_STACK_ORDER: u32 = 2;

global_asm!(
    ".set AP_BASE, {base}",
    include_str!("ap_boot.S"),
    base = const AP_BASE,
    options(att_syntax)
);

unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static ap_param_cr3: u8;
    static ap_param_efer: u8;
    static ap_param_stack: u8;
    static ap_param_cpu: u8;
    static ap_param_entry: u8;
}

/// The CPUs the firmware describes.
#[derive(Debug, Clone, Copy)]
pub struct Cpus {
    /// Local APIC ids of the enabled CPUs, the boot CPU among them.
    pub apic_ids: [u32; gdt::MAX_CPUS],
    /// How many of `apic_ids` are valid.
    pub count: usize,
    /// Enabled CPUs beyond [`gdt::MAX_CPUS`], left off.
    pub ignored: usize,
}

fn read<T: Copy>(paddr: u64) -> T {
    // SAFETY: ACPI tables sit in identity-mapped RAM below 4 GiB (checked by the callers) and
    // are only read; `read_unaligned` copes with their byte packing.
    unsafe { core::ptr::read_unaligned(paddr as *const T) }
}

fn checksum_ok(paddr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |sum, i| sum.wrapping_add(read::<u8>(paddr + i))) == 0
}

/// Finds the enabled CPUs in the MADT reached from the RSDP at `rsdp` (0: none given).
pub fn find_cpus(rsdp: u64) -> Result<Cpus, &'static str> {
    const LOW4G: u64 = 1 << 32;
    if rsdp == 0 || rsdp >= LOW4G - 36 {
        return Err("no RSDP from the loader");
    }
    if read::<[u8; 8]>(rsdp) != *b"RSD PTR " || !checksum_ok(rsdp, 20) {
        return Err("RSDP signature or checksum is wrong");
    }
    let revision = read::<u8>(rsdp + 15);
    let xsdt = if revision >= 2 {
        read::<u64>(rsdp + 24)
    } else {
        0
    };
    let (root, entry_size) = if xsdt != 0 {
        (xsdt, 8)
    } else {
        (u64::from(read::<u32>(rsdp + 16)), 4)
    };
    if root == 0 || root >= LOW4G - 36 {
        return Err("RSDT/XSDT is missing or above 4 GiB");
    }
    let root_len = u64::from(read::<u32>(root + 4));
    if !(36..=1 << 20).contains(&root_len) || !checksum_ok(root, root_len) {
        return Err("RSDT/XSDT has a bad length or checksum");
    }
    let madt = (36..root_len)
        .step_by(entry_size)
        .map(|off| {
            if entry_size == 8 {
                read::<u64>(root + off)
            } else {
                u64::from(read::<u32>(root + off))
            }
        })
        .find(|&t| t != 0 && t < LOW4G - 44 && read::<[u8; 4]>(t) == *b"APIC")
        .ok_or("no MADT")?;
    let madt_len = u64::from(read::<u32>(madt + 4));
    if !(44..=1 << 20).contains(&madt_len) || !checksum_ok(madt, madt_len) {
        return Err("MADT has a bad length or checksum");
    }
    let mut cpus = Cpus {
        apic_ids: [0; gdt::MAX_CPUS],
        count: 0,
        ignored: 0,
    };
    let mut off = 44;
    while off + 2 <= madt_len {
        let (kind, len) = (
            read::<u8>(madt + off),
            u64::from(read::<u8>(madt + off + 1)),
        );
        if len < 2 || off + len > madt_len {
            return Err("MADT entry overruns the table");
        }
        // Type 0: processor local APIC (ACPI id, APIC id, flags: bit 0 enabled).
        if kind == 0 && len >= 8 && read::<u32>(madt + off + 4) & 1 != 0 {
            let id = u32::from(read::<u8>(madt + off + 3));
            if cpus.count < gdt::MAX_CPUS {
                cpus.apic_ids[cpus.count] = id;
                cpus.count += 1;
            } else {
                cpus.ignored += 1;
            }
        }
        off += len;
    }
    if cpus.count == 0 {
        return Err("MADT lists no enabled CPU");
    }
    Ok(cpus)
}

fn symbol_offset(sym: *const u8) -> u64 {
    sym as u64 - &raw const ap_trampoline_start as u64
}

/// Starts every CPU of `cpus` but this one, one at a time; returns how many came online.
/// `keep` lists physical ranges still in use (the loader's data): if the trampoline page would
/// overwrite one, no AP is started.
pub fn start_aps(cpus: &Cpus, keep: &[core::ops::Range<u64>]) -> usize {
    let page = AP_BASE..AP_BASE + frames::FRAME_SIZE;
    if let Some(r) = keep
        .iter()
        .find(|r| r.start < page.end && page.start < r.end)
    {
        println!("smp: loader data at {r:#x?} occupies the AP trampoline page; one CPU only");
        return 0;
    }
    let me = apic::id();
    let start = &raw const ap_trampoline_start as u64;
    let len = &raw const ap_trampoline_end as u64 - start;
    assert!(
        len <= frames::FRAME_SIZE,
        "AP trampoline larger than a page"
    );
    // SAFETY: the trampoline page below 1 MiB is never handed out by the frame allocator and
    // nothing else lives there; we copy the code before any AP can run it.
    unsafe { core::ptr::copy_nonoverlapping(start as *const u8, AP_BASE as *mut u8, len as usize) };
    // SAFETY: reading EFER has no side effects.
    let efer = unsafe { x86::msr::rdmsr(0xc000_0080) } & !(1 << 10); // LMA is not writable
    let mut next_cpu = 1;
    let mut started = 0;
    for &apic_id in &cpus.apic_ids[..cpus.count] {
        if apic_id == me {
            continue;
        }
        let cpu = next_cpu;
        next_cpu += 1;
        let Some(stack) = frames::alloc(AP_STACK_ORDER) else {
            println!("smp: no stack for CPU {cpu}");
            break;
        };
        let params: [(*const u8, u64); 5] = [
            (&raw const ap_param_cr3, vm::kernel_root()),
            (&raw const ap_param_efer, efer),
            (
                &raw const ap_param_stack,
                stack + (frames::FRAME_SIZE << AP_STACK_ORDER),
            ),
            (&raw const ap_param_cpu, cpu as u64),
            (
                &raw const ap_param_entry,
                ap_main as *const () as usize as u64,
            ),
        ];
        for (sym, value) in params {
            let at = AP_BASE + symbol_offset(sym);
            // SAFETY: a parameter slot inside the trampoline copy; no AP runs it right now.
            unsafe { core::ptr::write_volatile(at as *mut u64, value) };
        }
        apic::start_ap(apic_id, (AP_BASE >> 12) as u8);
        // Wait up to a second for the AP to report in.
        let mut waited = 0;
        while !percpu::cpu(cpu).online.load(Ordering::Acquire) && waited < 1_000_000 {
            apic::delay_us(100);
            waited += 100;
        }
        if percpu::cpu(cpu).online.load(Ordering::Acquire) {
            started += 1;
        } else {
            println!("smp: CPU {cpu} (APIC id {apic_id}) did not come online");
            break;
        }
    }
    started
}

/// Where an AP arrives from the trampoline, in long mode on its own stack.
extern "C" fn ap_main(cpu: u64) -> ! {
    let cpu = cpu as usize;
    // SAFETY: this AP, once, with a CPU index no other CPU uses.
    unsafe { gdt::init(cpu) };
    idt::load();
    // SAFETY: on this CPU, once, before anything here uses per-CPU data.
    unsafe { percpu::init(cpu, apic::id()) };
    // SAFETY: ring 0, after the GDT and per-CPU data.
    unsafe { syscall::init_this_cpu() };
    apic::init_this_cpu(false);
    percpu::cpu(cpu).online.store(true, Ordering::Release);
    sched::run()
}

/// Serialises [`on_each_cpu`] callers.
static CALL_BUSY: AtomicBool = AtomicBool::new(false);
/// The function of the call in progress.
static CALL_FN: AtomicUsize = AtomicUsize::new(0);
/// CPUs that have not run it yet.
static CALL_PENDING: AtomicUsize = AtomicUsize::new(0);

/// Installs the function-call IPI handler (boot CPU, before the APs start).
pub fn init() {
    trap::set_handler(CALL_VECTOR, on_call);
}

fn on_call(_frame: &mut TrapFrame) -> Handled {
    apic::eoi();
    // SAFETY: `on_each_cpu` stores a `fn(usize)` before sending the IPI and keeps it until
    // every CPU has run it.
    let f = unsafe { core::mem::transmute::<usize, fn(usize)>(CALL_FN.load(Ordering::Acquire)) };
    f(percpu::cpu_id());
    CALL_PENDING.fetch_sub(1, Ordering::Release);
    Handled::Yes
}

/// Runs `f(cpu)` once on every online CPU (the others in their call-IPI handler, with
/// interrupts off), and returns when all have. Call it from a task with interrupts on: a CPU
/// that waits with interrupts off (for instance for another `on_each_cpu`) could not take the
/// IPI. Per-CPU set-up such as enabling a paravirtual feature's MSR on every CPU uses it.
pub fn on_each_cpu(f: fn(usize)) {
    take_call_slot();
    let others = call_others(f);
    f(percpu::cpu_id());
    while CALL_PENDING.load(Ordering::Acquire) != 0 {
        core::hint::spin_loop();
    }
    let _ = others;
    CALL_BUSY.store(false, Ordering::Release);
}

/// Waits for and takes the call slot (released by the caller when every CPU has run the call).
fn take_call_slot() {
    while CALL_BUSY
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
}

/// With the call slot held, sends `f` to every other online CPU; returns how many.
fn call_others(f: fn(usize)) -> usize {
    CALL_FN.store(f as usize, Ordering::Release);
    let irq = spin::irq_save(); // stay on this CPU while choosing the others
    let me = percpu::cpu_id();
    let others: usize = (0..gdt::MAX_CPUS)
        .filter(|&c| c != me && percpu::cpu(c).online.load(Ordering::Acquire))
        .count();
    CALL_PENDING.store(others, Ordering::Release);
    for cpu in (0..gdt::MAX_CPUS).filter(|&c| c != me) {
        let c = percpu::cpu(cpu);
        if c.online.load(Ordering::Acquire) {
            apic::send_ipi(c.apic_id.load(Ordering::Relaxed), CALL_VECTOR);
        }
    }
    spin::irq_restore(irq);
    others
}

/// CPUs parked by [`stop_machine`], and the flag that releases them.
static PARKED: AtomicUsize = AtomicUsize::new(0);
static RELEASE: AtomicBool = AtomicBool::new(false);

fn park(_cpu: usize) {
    PARKED.fetch_add(1, Ordering::AcqRel);
    while !RELEASE.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    PARKED.fetch_sub(1, Ordering::AcqRel);
}

/// Runs `f` on this CPU with interrupts off while every other online CPU spins with interrupts
/// off (Linux's stop_machine, e.g. for a suspend). Task context with interrupts on, as
/// [`on_each_cpu`].
pub fn stop_machine(f: fn()) {
    // Only with the slot held: an earlier stop_machine's CPUs may still be leaving `park`.
    take_call_slot();
    RELEASE.store(false, Ordering::Release);
    let others = call_others(park);
    let irq = spin::irq_save();
    while PARKED.load(Ordering::Acquire) != others {
        core::hint::spin_loop();
    }
    f();
    RELEASE.store(true, Ordering::Release);
    spin::irq_restore(irq);
    while CALL_PENDING.load(Ordering::Acquire) != 0 {
        core::hint::spin_loop();
    }
    CALL_BUSY.store(false, Ordering::Release);
}
