//! Instruction-count probes of the suspend + resume benchmark (`benches/suspend.rs`), for
//! callgrind: `icount PROBE ITERS` builds the benchmark's world and runs ITERS cycles inside
//! `icount_PROBE`. The cost of one cycle is the count at 2N minus the count at N, over N (the
//! world's set-up cancels out), as `cargo xtask budgets` measures it:
//!
//! ```text
//! valgrind --tool=callgrind --toggle-collect='icount_*' target/release/examples/icount cycle_64vcpu 8
//! ```
//!
//! `cycle_128vcpu` doubles vCPUs, bindings, port space and roots: its cycle must cost twice the
//! instructions of `cycle_64vcpu`'s.

#[path = "../benches/support/mod.rs"]
mod support;

use support::{cycle, world};

macro_rules! probe {
    ($name:ident, $cpus:literal, $irqs:literal, $ports:literal, $roots:literal) => {
        /// Builds the world and runs `iters` suspend + resume cycles.
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $name(iters: u64) {
            let mut w = world::<$cpus, $irqs, $ports>($roots);
            for _ in 0..iters {
                cycle(&mut w);
            }
        }
    };
}

probe!(icount_cycle_64vcpu, 64, 1024, 4096, 10_000);
probe!(icount_cycle_128vcpu, 128, 2048, 8192, 20_000);

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
        "cycle_64vcpu" => icount_cycle_64vcpu(iters),
        "cycle_128vcpu" => icount_cycle_128vcpu(iters),
        other => panic!("unknown probe {other}"),
    }
}
