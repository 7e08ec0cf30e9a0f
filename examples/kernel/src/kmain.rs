//! Boot: the PVH entry, bring-up of the boot CPU, the checks, and the end of the run.

use core::{
    arch::{asm, global_asm},
    panic::PanicInfo,
    sync::atomic::{AtomicUsize, Ordering},
};

use crate::{
    arch::apic,
    arch::gdt,
    arch::idt,
    arch::percpu,
    arch::pvh::{self, BootInfo},
    arch::qemu::{self, Exit},
    arch::serial,
    arch::smp,
    arch::syscall,
    arch::trap::{self, Handled, TrapFrame},
    checks::{self, Check, Outcome},
    ensure, fail,
    mm::fault,
    mm::framemeta,
    mm::frames,
    mm::vm,
    println,
    spin::SpinLock,
    steps,
    task::sched,
    task::usermode,
    task::workqueue,
    trace,
};

global_asm!(include_str!("arch/boot.S"), options(att_syntax));

/// What the loader told us, set once by the boot CPU before any check runs.
static BOOT: SpinLock<Option<BootInfo>> = SpinLock::new(None);

fn boot_info() -> BootInfo {
    BOOT.lock().expect("boot info is set before the checks run")
}

/// The value of `key=value` on the kernel command line (for a check's parameters). Callable
/// once the checks run.
pub fn boot_arg(key: &str) -> Option<&'static str> {
    boot_info().arg(key)
}

/// Entered from `boot.S` in long mode, on the boot stack, with the start-info address.
#[unsafe(no_mangle)]
extern "C" fn kernel_main(start_info: u32) -> ! {
    serial::init();
    println!("oskit example kernel: booting");
    // SAFETY: the boot CPU, once, before anything else uses segments or traps.
    unsafe { gdt::init(0) };
    idt::init();
    idt::load();
    // SAFETY: `start_info` is what the PVH loader passed in %ebx; the kernel never overwrites low
    // memory (the frame allocator keeps the first MiB).
    let boot = match unsafe { pvh::parse(start_info) } {
        Ok(boot) => boot,
        Err(why) => {
            println!("boot: {why}");
            qemu::exit(Exit::Failure);
        }
    };
    *BOOT.lock() = Some(boot);
    // Before the frame allocator: the ACPI tables may sit in memory it would hand out.
    let cpus = smp::find_cpus(boot.rsdp);
    frames::init(&boot);
    framemeta::init();
    vm::init();
    sched::init();
    println!(
        "boot: command line {:?}, {} frames free",
        boot.cmdline,
        frames::free_count()
    );
    // SAFETY: the boot CPU, once, before anything uses per-CPU data.
    unsafe { percpu::init(0, apic::id()) };
    // SAFETY: ring 0, after the GDT and per-CPU data.
    unsafe { syscall::init_this_cpu() };
    fault::init();
    trap::set_handler(13, syscall::on_general_protection);
    smp::init();
    usermode::init();
    apic::init_this_cpu(true);
    percpu::cpu(0).online.store(true, Ordering::Release);
    match cpus {
        Ok(cpus) => {
            let memmap = boot.memmap.as_ptr() as u64;
            let cmdline = boot.cmdline.as_ptr() as u64;
            let loader_data = [
                u64::from(start_info)..u64::from(start_info) + 56,
                memmap..memmap + core::mem::size_of_val(boot.memmap) as u64,
                cmdline..cmdline + boot.cmdline.len() as u64 + 1,
            ];
            let started = smp::start_aps(&cpus, &loader_data);
            println!(
                "smp: {} CPU(s) in the MADT{}, {} started",
                cpus.count,
                if cpus.ignored > 0 {
                    " (more ignored)"
                } else {
                    ""
                },
                started
            );
            CPUS_FOUND.store(cpus.count, Ordering::Relaxed);
        }
        Err(why) => {
            println!("smp: {why}; running on the boot CPU only");
            CPUS_FOUND.store(1, Ordering::Relaxed);
        }
    }
    println!(
        "boot: {} CPU(s) online, xAPIC timer {} Hz ({} counts per tick; x2APIC {})",
        percpu::online_count(),
        apic::HZ,
        apic::timer_counts_per_tick(),
        if apic::x2apic_offered() {
            "offered, unused"
        } else {
            "not offered"
        }
    );
    workqueue::init();
    match trace::init() {
        Ok(()) => println!(
            "trace: {} per-CPU rings of {} sub-buffers",
            percpu::online_count(),
            trace::SUBBUFS_PER_CPU
        ),
        Err(e) => println!("trace: no trace buffer ({e:?}); events are counted as missed"),
    }
    if sched::spawn("checks", run_scenario, 0).is_none() {
        println!("boot: cannot start the checks task");
        qemu::exit(Exit::Failure);
    }
    sched::run()
}

/// Recurses with a 1 KiB frame until the task's stack runs into its guard page.
fn recurse(depth: u64) -> u64 {
    let frame = core::hint::black_box([depth; 128]);
    if depth == u64::MAX {
        return frame[0];
    }
    recurse(core::hint::black_box(depth + 1)) + frame[depth as usize % 128]
}

/// How many CPUs the firmware described (1 when it described none).
pub static CPUS_FOUND: AtomicUsize = AtomicUsize::new(1);

/// The first task: runs the scenario named on the command line and ends the run.
fn run_scenario(_: u64) -> i64 {
    let scenario = boot_info().arg("scenario").unwrap_or("all");
    crate::trace!(
        "boot",
        "scenario {scenario} on {} CPU(s)",
        percpu::online_count()
    );
    let tally = match scenario {
        "all" => checks::run(CHECKS),
        // Deliberate failures: the runner's tests prove that each one turns the run red
        // (stack-overflow: a kernel task overflowing its stack is caught by the guard page).
        "fail-check" => checks::run(&[Check {
            name: "deliberate-failure",
            run: deliberate_failure,
        }]),
        "apf-real" => checks::run(&[Check {
            name: "apf-real",
            run: steps::apf::apf_real,
        }]),
        "apf-double-wake" => checks::run(&[Check {
            name: "apf",
            run: steps::apf::apf_double_wake,
        }]),
        "panic" => panic!("deliberate panic requested by scenario=panic"),
        "stack-overflow" => {
            let depth = recurse(0);
            unreachable!("recursed {depth} levels without overflowing");
        }
        "exception" => {
            // SAFETY: UD2 raises #UD, which no handler claims: the run must end red.
            unsafe { asm!("ud2", options(nomem, nostack)) };
            unreachable!("#UD returned");
        }
        name => match CHECKS.iter().find(|c| c.name == name) {
            Some(check) => checks::run([check]),
            None => {
                println!("unknown scenario {name:?}; known: all, {}", CheckNames);
                qemu::exit(Exit::Failure);
            }
        },
    };
    if let Some(rb) = trace::buffer() {
        let (mut entries, mut overrun) = (0, 0);
        for cpu in 0..rb.cpus() {
            if let Ok(stats) = rb.stats(cpu) {
                entries += stats.entries;
                overrun += stats.overrun;
            }
        }
        println!(
            "trace: {entries} events recorded, {overrun} overwritten, {} missed",
            trace::missed()
        );
    }
    println!("summary: {} passed, {} failed", tally.passed, tally.failed);
    if tally.failed == 0 && tally.passed > 0 {
        println!("oskit-kernel: PASS");
        qemu::exit(Exit::Success)
    } else {
        println!("oskit-kernel: FAIL");
        qemu::exit(Exit::Failure)
    }
}

struct CheckNames;

impl core::fmt::Display for CheckNames {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, check) in CHECKS.iter().enumerate() {
            write!(f, "{}{}", if i == 0 { "" } else { ", " }, check.name)?;
        }
        Ok(())
    }
}

/// Every check of a full run, in order.
const CHECKS: &[Check] = &[
    Check {
        name: "boot",
        run: check_boot,
    },
    Check {
        name: "traps",
        run: check_traps,
    },
    Check {
        name: "frames",
        run: check_frames,
    },
    Check {
        name: "probes",
        run: check_probes,
    },
    Check {
        name: "timer",
        run: checks::sched::timer,
    },
    Check {
        name: "preemption",
        run: checks::sched::preemption,
    },
    Check {
        name: "block-unblock",
        run: checks::sched::block_unblock,
    },
    Check {
        name: "smp",
        run: checks::sched::smp,
    },
    Check {
        name: "workqueue",
        run: checks::sched::workqueue,
    },
    Check {
        name: "user-syscalls",
        run: checks::user::syscalls,
    },
    Check {
        name: "user-preemption",
        run: checks::user::user_preemption,
    },
    Check {
        name: "task-exhaustion",
        run: checks::user::exhaustion,
    },
    Check {
        name: "user-isolation",
        run: checks::user::isolation,
    },
    Check {
        name: "demand-paging",
        run: checks::user::demand_paging,
    },
    Check {
        name: "fork-cow",
        run: checks::user::fork_cow,
    },
    Check {
        name: "orphans",
        run: checks::user::orphans,
    },
    Check {
        name: "fork-stress",
        run: checks::user::fork_stress,
    },
    Check {
        name: "fault-hook",
        run: checks::user::fault_hook,
    },
    Check {
        name: "fork",
        run: crate::steps::fork::fork,
    },
    Check {
        name: "bts",
        run: crate::steps::bts::bts,
    },
    Check {
        name: "apf",
        run: crate::steps::apf::apf,
    },
    Check {
        name: "xen",
        run: crate::steps::xen::xen_suspend,
    },
    // Last: it reads the events every step before it logged.
    Check {
        name: "trace",
        run: steps::trace::check,
    },
];

fn deliberate_failure() -> Outcome {
    fail!("this check fails on purpose (scenario=fail-check)")
}

/// The loader's memory map describes RAM that holds the kernel.
fn check_boot() -> Outcome {
    let boot = boot_info();
    let kernel = check_boot as fn() -> Outcome as usize as u64;
    let ram: u64 = boot
        .memmap
        .iter()
        .filter(|e| e.kind == pvh::MEMMAP_RAM)
        .map(|e| e.size)
        .sum();
    ensure!(ram >= 64 << 20, "only {ram} bytes of RAM in the memory map");
    ensure!(
        boot.memmap
            .iter()
            .any(|e| e.kind == pvh::MEMMAP_RAM && (e.addr..e.addr + e.size).contains(&kernel)),
        "kernel text at {kernel:#x} is not in RAM according to the memory map"
    );
    println!(
        "  {} memory map entries, {} MiB of RAM",
        boot.memmap.len(),
        ram >> 20
    );
    checks::figures(format_args!(
        "{} MiB of RAM, {} map entries",
        ram >> 20,
        boot.memmap.len()
    ));
    Ok(())
}

static BREAKPOINTS: AtomicUsize = AtomicUsize::new(0);

fn on_breakpoint(_frame: &mut TrapFrame) -> Handled {
    BREAKPOINTS.fetch_add(1, Ordering::SeqCst);
    Handled::Yes
}

/// Ring 3: raises #BP with RBX holding a marker, and returns what RBX holds afterwards.
fn u_breakpoint(_: u64) -> i64 {
    let marker: u64;
    // SAFETY: INT3 traps to `on_breakpoint` through a DPL-3 gate, which returns here; RBX
    // (reserved by LLVM, hence the exchange) must survive the round trip.
    unsafe {
        asm!("mov {m}, 0x0badcafe", "xchg rbx, {m}", "int3", "xchg rbx, {m}", m = out(reg) marker)
    };
    marker as i64
}

/// A trap goes through the IDT, reaches its handler with the right vector, and returns.
///
/// The `int3` runs in ring 3 (through a DPL-3 gate, as Linux's is): a kernel-mode `int3`
/// works on TCG and on hardware KVM, but a paravirtual KVM that runs the guest's ring 0
/// through KVM's instruction emulator (kvm_pvm) cannot emulate it and kills the VM, while ring
/// 3 runs natively there. The ring-3 path covers the same gate, handler and return, on every
/// accelerator.
fn check_traps() -> Outcome {
    trap::set_handler(3, on_breakpoint);
    idt::allow_from_user(3);
    let before = BREAKPOINTS.load(Ordering::SeqCst);
    let Ok(task) = usermode::spawn("int3", u_breakpoint, 0) else {
        fail!("cannot start the user task")
    };
    let code = sched::join(task);
    let after = BREAKPOINTS.load(Ordering::SeqCst);
    ensure!(
        after == before + 1,
        "int3 reached the handler {} times, not once",
        after - before
    );
    ensure!(
        code == Some(0x0bad_cafe),
        "rbx came back from the trap as {code:#x?}"
    );
    Ok(())
}

/// Blocks of every order come out aligned, distinct and usable, and all go back.
fn check_frames() -> Outcome {
    let before = frames::free_count();
    let mut blocks = [(0u64, 0u32); 4];
    for (slot, order) in blocks.iter_mut().zip([0, 2, 4, frames::MAX_ORDER]) {
        let Some(paddr) = frames::alloc(order) else {
            fail!("no block of order {order}")
        };
        let bytes = frames::FRAME_SIZE << order;
        ensure!(
            paddr % bytes == 0,
            "order-{order} block at {paddr:#x} is not aligned"
        );
        // SAFETY: the block is ours and identity-mapped (below 4 GiB).
        let words =
            unsafe { core::slice::from_raw_parts_mut(paddr as *mut u64, bytes as usize / 8) };
        words
            .iter_mut()
            .enumerate()
            .for_each(|(i, w)| *w = paddr ^ i as u64);
        *slot = (paddr, order);
    }
    for (i, &(a, oa)) in blocks.iter().enumerate() {
        for &(b, ob) in &blocks[i + 1..] {
            let (a_end, b_end) = (
                a + (frames::FRAME_SIZE << oa),
                b + (frames::FRAME_SIZE << ob),
            );
            ensure!(a_end <= b || b_end <= a, "blocks {a:#x} and {b:#x} overlap");
        }
    }
    for &(paddr, order) in &blocks {
        // SAFETY: as above; nobody else wrote the block meanwhile.
        let words = unsafe {
            core::slice::from_raw_parts(
                paddr as *const u64,
                (frames::FRAME_SIZE << order) as usize / 8,
            )
        };
        ensure!(
            words
                .iter()
                .enumerate()
                .all(|(i, &w)| w == paddr ^ i as u64),
            "block {paddr:#x} lost its contents"
        );
        frames::free(paddr, order);
    }
    ensure!(
        frames::free_count() == before,
        "{} frames leaked",
        before - frames::free_count()
    );
    ensure!(
        frames::alloc(frames::MAX_ORDER + 1).is_none(),
        "an order beyond MAX_ORDER was granted"
    );
    checks::figures(format_args!(
        "orders 0, 2, 4, {} allocated, verified, freed",
        frames::MAX_ORDER
    ));
    Ok(())
}

/// The crates' real x86 backends probe the machine from ring 0.
fn check_probes() -> Outcome {
    use oskit_bts::hal::BtsHardware;
    use oskit_pv_apf::hal::KvmFeatures;

    // SAFETY: the kernel runs in ring 0; probing reads CPUID and IA32_MISC_ENABLE only, never
    // the LVT, so the x2APIC choice is never acted on.
    let bts = unsafe { oskit_bts::x86::Cpu::new(0xf0, oskit_bts::x86::LvtPmi::X2Apic) }.probe();
    println!(
        "  bts: {}",
        if bts.usable() {
            "available"
        } else {
            "unavailable"
        }
    );
    match oskit_pv_apf::x86::probe() {
        Some(f) => println!(
            "  kvm: yes, async-PF-int {}",
            if f.has(KvmFeatures::ASYNC_PF_INT) {
                "offered"
            } else {
                "not offered"
            }
        ),
        None => println!("  kvm: not running on KVM"),
    }
    match oskit_xen_suspend::x86::probe() {
        Ok(xen) => fail!("Xen found ({xen:?}), but QEMU does not emulate Xen"),
        Err(oskit_xen_suspend::Error::NotXen) => println!("  xen: not running on Xen"),
        Err(e) => fail!("the Xen probe failed: {e:?}"),
    }
    Ok(())
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    serial::print_emergency(format_args!("\nPANIC: {info}\n"));
    qemu::exit(Exit::Failure)
}
