//! oskit's task runner (`cargo xtask <command>`).
//!
//! - `run`: set up, build the example kernel, boot it under QEMU and print its report.
//! - `test`: the whole suite CI runs, one line per stage, closing with `N passed, N failed`.
//! - `setup`: install what the other commands need (QEMU, the bare-metal target).
//! - `fuzz`, `bench`, `miri`: the slow campaigns kept out of CI.

// A binary has no public API: `pub` marks what the other modules use.
#![allow(unreachable_pub)]

mod apfreal;
mod budgets;
mod cmd;
mod qemu;
mod release;
mod report;
mod setup;
mod suite;
mod tracedump;
mod xen_hvm;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  run     [--tcg | --kvm] [--smp N] [--timeout SECS] [--scenario NAME] [--icount]
          build the example kernel, boot it under QEMU (2 vCPUs unless --smp), print its report
  test    the whole suite (what CI runs): host tests, loom, no_std builds,
          fuzz corpora, bench smoke, QEMU boots
  setup   install QEMU, valgrind, trace-cmd, xenstore-utils and the x86_64-unknown-none target (never removes a package)
  fuzz    [TARGET] [--seconds N]   run cargo-fuzz targets (all, briefly, by default)
  bench   [CRATE] [--report]       run the criterion benches (all crates by default);
                                   --report also rewrites those crates' sections of
                                   BENCHMARKS.md (the others stay)
  budgets                          check the hot paths' instruction budgets (callgrind)
  miri    [CRATE]                  run the crates' tests under Miri (nightly)
  release                          the release checks of `test` alone: rustdoc, publish
                                   dry-run, consumer lockfiles, MSRV
  stress  [SECS]                   ring-buffer nested-writer stress, SECS (60) per configuration
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = match command.as_str() {
        "run" => qemu::RunOptions::parse(rest).and_then(|opts| qemu::run(&opts)),
        "test" => no_args(rest).and_then(|()| suite::test()),
        "setup" => no_args(rest).and_then(|()| setup::setup()),
        "fuzz" => suite::fuzz(rest),
        "bench" => suite::bench(rest),
        "miri" => suite::miri(rest),
        "budgets" => no_args(rest).and_then(|()| suite::budgets()),
        "release" => no_args(rest).and_then(|()| suite::release_checks()),
        "stress" => suite::stress(rest),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("xtask: {why}");
            ExitCode::FAILURE
        }
    }
}

fn no_args(rest: &[String]) -> Result<(), String> {
    match rest.first() {
        None => Ok(()),
        Some(arg) => Err(format!("unexpected argument `{arg}`\n\n{USAGE}")),
    }
}

/// Every crate of the family, by folder under `crates/`.
const CRATES: [&str; 5] = ["ring-buffer", "pte-batch", "bts", "pv-apf", "xen-suspend"];
