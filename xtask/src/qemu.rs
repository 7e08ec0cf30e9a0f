//! Building the example kernel and booting it under QEMU: `cargo xtask run`.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use crate::{cmd, setup, tracedump};

/// QEMU's exit status when the kernel writes 0x10 to `isa-debug-exit`: `(0x10 << 1) | 1`.
const EXIT_SUCCESS: i32 = 33;
/// QEMU's exit status when the kernel writes 0x11.
const EXIT_FAILURE: i32 = 35;

/// The accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl Accel {
    fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG",
        }
    }
}

/// Options of `cargo xtask run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// `None`: KVM when it is usable, TCG otherwise.
    pub accel: Option<Accel>,
    /// vCPUs (2 by default: the kernel brings up every CPU the firmware describes).
    pub smp: u32,
    /// The guest is killed, and the run failed, after this long.
    pub timeout: Duration,
    /// `scenario=` on the kernel command line (`None`: everything).
    pub scenario: Option<String>,
    /// More QEMU arguments (e.g. a file-backed guest RAM for the real async-PF run).
    pub extra_args: Vec<String>,
    /// Also sends every line the kernel prints here, as it arrives.
    pub lines: Option<mpsc::Sender<String>>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            accel: None,
            smp: 2,
            timeout: Duration::from_secs(120),
            scenario: None,
            extra_args: Vec::new(),
            lines: None,
        }
    }
}

impl RunOptions {
    /// Parses `[--tcg | --kvm] [--smp N] [--timeout SECS] [--scenario NAME] [--icount]`.
    /// `--icount` runs TCG with `-icount shift=0` (the guest's TSC then counts instructions:
    /// the fork step reports instruction counts of its copies); it needs TCG and one vCPU.
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut opts = Self::default();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value =
                |name: &str| args.next().cloned().ok_or(format!("{name} needs a value"));
            match arg.as_str() {
                "--tcg" => opts.accel = Some(Accel::Tcg),
                "--kvm" => opts.accel = Some(Accel::Kvm),
                "--smp" => {
                    opts.smp = value("--smp")?.parse().map_err(|e| format!("--smp: {e}"))?;
                    if !(1..=4).contains(&opts.smp) {
                        return Err("--smp takes 1 to 4 (the kernel's MAX_CPUS)".into());
                    }
                }
                "--timeout" => {
                    let secs: u64 = value("--timeout")?
                        .parse()
                        .map_err(|e| format!("--timeout: {e}"))?;
                    opts.timeout = Duration::from_secs(secs.max(1));
                }
                "--scenario" => opts.scenario = Some(value("--scenario")?),
                "--icount" => opts.extra_args.extend(["-icount".into(), "shift=0".into()]),
                other => return Err(format!("unknown option `{other}` for run")),
            }
        }
        if opts.extra_args.iter().any(|a| a == "-icount") {
            if opts.accel == Some(Accel::Kvm) {
                return Err("--icount counts instructions under TCG only".into());
            }
            if opts.smp != 1 {
                return Err("--icount needs --smp 1 (icount runs one vCPU at a time)".into());
            }
            opts.accel = Some(Accel::Tcg);
        }
        Ok(opts)
    }
}

/// How a boot ended.
#[derive(Debug)]
pub struct Boot {
    /// The accelerator it ran on.
    pub accel: Accel,
    /// Everything the kernel printed.
    pub log: String,
    /// Whether the kernel reported success through the exit device.
    pub passed: bool,
    /// Why it failed, in one line (`None` when it passed).
    pub failure: Option<String>,
    /// How long the guest ran.
    pub elapsed: Duration,
    /// The kernel's trace dump, decoded (`None` when the run wrote none).
    pub trace: Option<Vec<tracedump::CpuEvents>>,
}

/// `cargo xtask run`: set up, build, boot with the serial log streamed, report.
pub fn run(opts: &RunOptions) -> Result<(), String> {
    setup::setup()?;
    let kernel = build_kernel()?;
    if opts.scenario.as_deref() == Some("apf-real") {
        // Real async page faults need the host side: file-backed RAM, eviction, tracepoints.
        crate::apfreal::available()?;
        let report = crate::apfreal::run(&kernel)?;
        for line in report
            .log
            .lines()
            .filter(|l| !l.starts_with(tracedump::PREFIX))
        {
            println!("{line}");
        }
        report.lines.iter().for_each(|l| println!("{l}"));
        return match report.failure {
            None => {
                println!("apf-real: PASS under KVM");
                Ok(())
            }
            Some(why) => Err(format!("apf-real: FAIL: {why}")),
        };
    }
    let boot = boot(&kernel, opts, true)?;
    println!();
    if let Some(trace) = &boot.trace {
        tracedump::print(trace, 10);
        let dat = crate::cmd::root()
            .join("target")
            .join("oskit-kernel-trace.dat");
        match tracedump::write_trace_dat(trace, &dat) {
            Ok(()) => println!(
                "trace: the kernel's sub-buffers as a trace-cmd file: {} (`trace-cmd report` it)",
                dat.display()
            ),
            Err(why) => println!("trace: no trace.dat: {why}"),
        }
        println!();
    }
    match &boot.failure {
        None => {
            println!(
                "kernel: PASS under {} in {:.1} s",
                boot.accel.name(),
                boot.elapsed.as_secs_f64()
            );
            Ok(())
        }
        Some(why) => Err(format!("kernel: FAIL under {}: {why}", boot.accel.name())),
    }
}

/// Builds the kernel (release) and returns the ELF's path.
pub fn build_kernel() -> Result<PathBuf, String> {
    let mut build = cmd::cargo();
    build.args([
        "build",
        "--release",
        "--package",
        "oskit-example-kernel",
        "--target",
        setup::TARGET,
    ]);
    cmd::run(&mut build)?;
    Ok(cmd::root()
        .join("target")
        .join(setup::TARGET)
        .join("release")
        .join("oskit-example-kernel"))
}

/// The `-cpu` models tried under KVM, most faithful first; the first one QEMU can create and
/// reset a vCPU with is used ([`kvm_cpu_model`]).
///
/// The rule: `host` passes the host CPU through as it is. Some KVMs refuse part of it: this
/// machine's `kvm_pvm` (a paravirtual KVM) fails QEMU's write of IA32_ARCH_CAPABILITIES (MSR
/// 0x10a; QEMU aborts with "failed to set MSR 0x10a"), so the next candidate is the same CPU
/// without that MSR. `qemu64` is the last resort (a baseline x86-64 that every KVM takes).
pub const KVM_CPU_MODELS: [&str; 3] = ["host", "host,arch-capabilities=off", "qemu64"];

/// Why a `-cpu` model was refused, or `Ok` when QEMU created and reset a vCPU with it under
/// KVM (started paused with `-S`, then told to quit through its monitor).
fn kvm_accepts(model: &str) -> Result<(), String> {
    use std::io::Write;
    let mut qemu = Command::new(setup::QEMU)
        .args([
            "-accel", "kvm", "-cpu", model, "-machine", "q35", "-m", "64M",
        ])
        .args(["-nodefaults", "-display", "none", "-serial", "none", "-S"])
        .args(["-monitor", "stdio", "-no-reboot"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", setup::QEMU))?;
    if let Some(mut stdin) = qemu.stdin.take() {
        // A QEMU that failed to start has closed its end already: the write error is moot.
        let _ = stdin.write_all(b"quit\n");
    }
    let out = qemu
        .wait_with_output()
        .map_err(|e| format!("waiting for QEMU: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let why = err
        .lines()
        .find(|l| l.contains("error") || l.contains("failed"))
        .unwrap_or_else(|| err.lines().next().unwrap_or("no message"));
    Err(why.trim().to_string())
}

/// The KVM `-cpu` model for this machine: the first of [`KVM_CPU_MODELS`] that this KVM
/// accepts, with the reasons the earlier ones were refused. Probed once per process.
pub fn kvm_cpu_model() -> Result<(&'static str, Vec<String>), String> {
    static PROBE: std::sync::OnceLock<Result<(&'static str, Vec<String>), String>> =
        std::sync::OnceLock::new();
    PROBE
        .get_or_init(|| {
            let mut refused = Vec::new();
            for model in KVM_CPU_MODELS {
                match kvm_accepts(model) {
                    Ok(()) => return Ok((model, refused)),
                    Err(why) => refused.push(format!("-cpu {model}: {why}")),
                }
            }
            Err(format!(
                "KVM accepts none of the CPU models: {}",
                refused.join("; ")
            ))
        })
        .clone()
}

/// Whether `/dev/kvm` can be opened (read-write), and if not, why.
pub fn kvm_available() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm: {e}"))
}

/// Kernel arguments added under `kvm_pvm`, and why. Measured on this machine: kvm_pvm runs
/// every ring-0 instruction through KVM's instruction emulator, so a COW fault costs about
/// 3.5 ms there (about 30 s for the fork step's scaled part at 4 MiB, where 64 MiB means
/// 65,536 COW faults, which did not finish in 7 minutes). The fork step's scaled forks then
/// cover 4 MiB (two page tables, two 2 MiB folios, 64 of 64 KiB) instead of 64 MiB; every
/// check runs, and TCG runs them at full size.
pub const KVM_PVM_ARGS: (&str, &str) = (
    "fork_mib=4",
    "kvm_pvm emulates ring 0 instruction by instruction (a COW fault costs milliseconds): \
     the fork step's scaled forks cover 4 MiB instead of 64 MiB",
);

/// Which KVM implementation backs `/dev/kvm` (for the report): `kvm_intel`, `kvm_amd`,
/// `kvm_pvm` (a paravirtual KVM that runs the guest's ring 0 through KVM's instruction
/// emulator), or `kvm`.
pub fn kvm_flavour() -> &'static str {
    ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .find(|m| std::path::Path::new("/sys/module").join(m).exists())
        .unwrap_or("kvm")
}

/// KVM when `/dev/kvm` opens and a CPU model works (returned with why it was chosen), or why
/// not.
pub fn kvm_usable() -> Result<(&'static str, String), String> {
    kvm_available()?;
    let (model, refused) = kvm_cpu_model()?;
    let mut why = format!("/dev/kvm opens ({}), -cpu {model}", kvm_flavour());
    if !refused.is_empty() {
        why.push_str(&format!(" (refused: {})", refused.join("; ")));
    }
    Ok((model, why))
}

/// Boots `kernel` once; with `stream`, echoes the serial log as it arrives.
pub fn boot(kernel: &PathBuf, opts: &RunOptions, stream: bool) -> Result<Boot, String> {
    let (accel, kvm_model) = match opts.accel {
        Some(Accel::Tcg) => (Accel::Tcg, None),
        Some(Accel::Kvm) => {
            let (model, why) = kvm_usable()?;
            if stream {
                println!("run: KVM (--kvm; {why})");
            }
            (Accel::Kvm, Some(model))
        }
        None => match kvm_usable() {
            Ok((model, why)) => {
                if stream {
                    println!("run: KVM ({why})");
                }
                (Accel::Kvm, Some(model))
            }
            Err(why) => {
                if stream {
                    println!("run: TCG ({why})");
                }
                (Accel::Tcg, None)
            }
        },
    };
    let mut qemu = Command::new(setup::QEMU);
    qemu.args(["-machine", "q35", "-m", "512M", "-smp"])
        .arg(opts.smp.to_string())
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .args([
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel",
        ])
        .arg(kernel);
    match kvm_model {
        Some(model) => qemu.args(["-accel", "kvm", "-cpu", model]),
        None => qemu.args(["-accel", "tcg", "-cpu", "max"]),
    };
    qemu.args(&opts.extra_args);
    let mut append: Vec<String> = opts
        .scenario
        .iter()
        .map(|s| format!("scenario={s}"))
        .collect();
    if accel == Accel::Kvm && kvm_flavour() == "kvm_pvm" {
        let (arg, why) = KVM_PVM_ARGS;
        if stream {
            println!("run: {arg} under kvm_pvm: {why}");
        }
        append.push(arg.to_string());
    }
    if !append.is_empty() {
        qemu.args(["-append", &append.join(" ")]);
    }
    if stream {
        println!("run: {}", cmd::display(&qemu));
    }
    let start = Instant::now();
    let mut child = qemu
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", setup::QEMU))?;
    let (tx, rx) = mpsc::channel();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut log = String::new();
    let deadline = start + opts.timeout;
    let mut deadline = deadline;
    let mut timed_out = false;
    let mut vm_dead = false;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                // QEMU prints the register dump and then waits forever: read the dump, then
                // stop it instead of waiting for the timeout.
                if line.contains("KVM internal error") && !vm_dead {
                    vm_dead = true;
                    deadline = Instant::now() + Duration::from_secs(2);
                }
                // The trace dump is decoded after the run, not shown.
                if stream && !line.starts_with(tracedump::PREFIX) {
                    println!("{line}");
                }
                if let Some(lines) = &opts.lines {
                    let _ = lines.send(line.clone());
                }
                log.push_str(&line);
                log.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = !vm_dead;
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().map_err(|e| format!("waiting for QEMU: {e}"))?;
    let elapsed = start.elapsed();
    let code = status.code();
    let trace = tracedump::decode(&log);
    let failure = if timed_out {
        Some(format!(
            "the guest hung: killed after {} s",
            opts.timeout.as_secs()
        ))
    } else if code == Some(EXIT_SUCCESS) && log.contains("oskit-kernel: PASS") {
        trace.as_ref().err().cloned()
    } else {
        Some(explain(&log, code))
    };
    Ok(Boot {
        accel,
        passed: failure.is_none(),
        failure,
        log,
        elapsed,
        trace: trace.ok().flatten(),
    })
}

/// One line saying why a boot failed, from what the kernel printed last.
fn explain(log: &str, code: Option<i32>) -> String {
    let find = |marker: &str| log.lines().find(|l| l.contains(marker)).map(str::trim);
    if let Some(line) = find("PANIC:") {
        // The panic message follows on the next line.
        let next = log
            .lines()
            .skip_while(|l| !l.contains("PANIC:"))
            .nth(1)
            .unwrap_or("");
        return format!("{line} {}", next.trim());
    }
    if let Some(line) = find("EXCEPTION:") {
        return line.to_string();
    }
    if let Some(line) = find("KVM internal error") {
        return format!("{line} (QEMU could not run the guest on this KVM; try --tcg)");
    }
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("... FAILED"))
        .map(str::trim)
        .collect();
    if !failed.is_empty() {
        return failed.join("; ");
    }
    match code {
        Some(EXIT_FAILURE) => format!("the kernel reported failure: {}", cmd::tail(log, 1)),
        Some(EXIT_SUCCESS) => "the kernel exited with success but printed no PASS line".into(),
        Some(c) => format!(
            "QEMU exited with status {c}: {}",
            cmd::tail(log, 2).replace('\n', " | ")
        ),
        None => "QEMU was killed by a signal".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn icount_means_tcg_on_one_vcpu() {
        let o = RunOptions::parse(&args("--smp 1 --icount")).unwrap();
        assert_eq!(o.accel, Some(Accel::Tcg));
        assert_eq!(o.extra_args, ["-icount", "shift=0"]);
        assert!(RunOptions::parse(&args("--icount")).is_err(), "two vCPUs");
        assert!(RunOptions::parse(&args("--kvm --smp 1 --icount")).is_err());
    }

    #[test]
    fn run_options_parse_and_reject() {
        let o = RunOptions::parse(&args("--tcg --smp 2 --timeout 9 --scenario fork")).unwrap();
        assert_eq!(
            (o.accel, o.smp, o.timeout.as_secs()),
            (Some(Accel::Tcg), 2, 9)
        );
        assert_eq!(o.scenario.as_deref(), Some("fork"));
        assert_eq!(RunOptions::parse(&[]).unwrap().accel, None);
        assert_eq!(RunOptions::parse(&[]).unwrap().smp, 2);
        assert_eq!(RunOptions::parse(&args("--smp 1")).unwrap().smp, 1);
        assert!(RunOptions::parse(&args("--smp 0")).is_err());
        assert!(RunOptions::parse(&args("--smp")).is_err());
        assert!(RunOptions::parse(&args("--bogus")).is_err());
    }

    #[test]
    fn failures_are_explained_by_what_the_kernel_printed_last() {
        let panic = "boot\nPANIC: panicked at src/x.rs:1:2:\nboom\n";
        assert_eq!(
            explain(panic, Some(EXIT_FAILURE)),
            "PANIC: panicked at src/x.rs:1:2: boom"
        );
        let exc = "check a ... ok\nEXCEPTION: #PF page fault (vector 14) error=0x2\n";
        assert_eq!(
            explain(exc, Some(EXIT_FAILURE)),
            "EXCEPTION: #PF page fault (vector 14) error=0x2"
        );
        let checks = "check a ... FAILED: x\ncheck b ... ok\ncheck c ... FAILED: y\nsummary\n";
        assert_eq!(
            explain(checks, Some(EXIT_FAILURE)),
            "check a ... FAILED: x; check c ... FAILED: y"
        );
        assert!(
            explain("qemu: could not load kernel\n", Some(1))
                .starts_with("QEMU exited with status 1")
        );
        assert!(explain("", Some(EXIT_SUCCESS)).contains("no PASS line"));
    }
}
