//! The real-async-page-fault run: the example kernel's `scenario=apf-real` under this machine's
//! KVM, with the host evicting guest memory while ring-3 tasks in the guest touch it.
//!
//! - The guest's RAM is a file (`-object memory-backend-file,...,share=on`), so the host can
//!   drop its pages: the guest names the 2 MiB blocks its sweepers touch (`apf-real: evict
//!   ADDR LEN` lines, guest-physical = file offset), and while it sweeps (`apf-real: sweeping`
//!   .. `apf-real: done`) xtask writes the file back (`fdatasync`: dirty pages are not dropped)
//!   and calls `process_madvise(MADV_PAGEOUT)` on QEMU's mapping of those blocks, every 300 ms.
//!   The guest's next touch of an evicted page makes KVM fetch it asynchronously: a real "page
//!   not present" #PF, then a real "page ready" interrupt.
//! - A private tracefs instance (`/sys/kernel/tracing/instances/oskit-apf-PID`, removed after)
//!   counts KVM's own events for the same run: `kvm_try_async_get_page`,
//!   `kvm_async_pf_not_present`, `kvm_async_pf_ready`, `kvm_async_pf_completed`. (The events
//!   are host-wide: another VM with async PF enabled at the same time would add to them.)
//! - The run passes when the kernel passed (every wait ended with exactly one wake, none left
//!   asleep), the guest handled at least [`MIN_NOT_PRESENT`] not-present events, and the
//!   guest's not-present and page-ready counts equal the host's.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::Duration,
};

use crate::{
    cmd,
    qemu::{self, Accel, RunOptions},
};

/// Not-present events one run must show.
pub const MIN_NOT_PRESENT: u64 = 100;

/// The KVM tracepoints counted, in the order printed.
const EVENTS: [&str; 4] = [
    "kvm_try_async_get_page",
    "kvm_async_pf_not_present",
    "kvm_async_pf_ready",
    "kvm_async_pf_completed",
];

const TRACEFS: &str = "/sys/kernel/tracing";

/// Why the run cannot happen here (the stage is then skipped), or `Ok`.
pub fn available() -> Result<(), String> {
    let uid = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next().map(str::to_string))
        })
        .unwrap_or_default();
    if uid != "0" {
        return Err("needs root (tracefs instance, process_madvise on QEMU)".into());
    }
    qemu::kvm_available()?;
    if !Path::new(TRACEFS)
        .join("events/kvm/kvm_async_pf_not_present")
        .exists()
    {
        return Err(format!("no KVM async-PF tracepoints under {TRACEFS}"));
    }
    Ok(())
}

/// A tracefs instance with the four events on; removed when dropped.
struct Instance(PathBuf);

impl Instance {
    fn create() -> Result<Self, String> {
        let dir = Path::new(TRACEFS)
            .join("instances")
            .join(format!("oskit-apf-{}", std::process::id()));
        let _ = fs::remove_dir(&dir);
        fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let instance = Self(dir);
        let write = |file: &str, value: &str| {
            fs::write(instance.0.join(file), value)
                .map_err(|e| format!("{}/{file}: {e}", instance.0.display()))
        };
        write("buffer_size_kb", "8192")?;
        for event in EVENTS {
            write(&format!("events/kvm/{event}/enable"), "1")?;
        }
        write("tracing_on", "1")?;
        Ok(instance)
    }

    /// How many of each event the instance recorded.
    fn counts(&self) -> Result<[u64; 4], String> {
        let _ = fs::write(self.0.join("tracing_on"), "0");
        let text = fs::read_to_string(self.0.join("trace"))
            .map_err(|e| format!("{}/trace: {e}", self.0.display()))?;
        if text.contains("LOST EVENTS") {
            return Err("the trace buffer overflowed (LOST EVENTS)".into());
        }
        Ok(EVENTS.map(|event| {
            let needle = format!(" {event}:");
            text.lines().filter(|l| l.contains(&needle)).count() as u64
        }))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = fs::write(self.0.join("tracing_on"), "0");
        for event in EVENTS {
            let _ = fs::write(self.0.join(format!("events/kvm/{event}/enable")), "0");
        }
        let _ = fs::remove_dir(&self.0);
    }
}

/// What the guest reported on its `apf-real: guest ...` line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GuestCounts {
    /// "Not present" events the guest's #PF hook handled.
    pub not_present: u64,
    /// Page-ready interrupts (wake-alls included).
    pub page_ready: u64,
    /// Tasks still waiting in the sleeper table at the end.
    pub left: u64,
}

/// Parses `apf-real: guest not-present=N page-ready=N ... left=N`.
pub fn parse_guest(log: &str) -> Option<GuestCounts> {
    let line = log
        .lines()
        .find_map(|l| l.strip_prefix("apf-real: guest "))?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
    };
    Some(GuestCounts {
        not_present: field("not-present")?,
        page_ready: field("page-ready")?,
        left: field("left")?,
    })
}

/// Raw Linux system calls the evictor needs (std has no wrapper; xtask has no libc).
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod sys {
    /// `struct iovec`.
    #[repr(C)]
    pub(super) struct IoVec {
        pub(super) base: u64,
        pub(super) len: u64,
    }

    const SYS_PIDFD_OPEN: i64 = 434;
    const SYS_PROCESS_MADVISE: i64 = 440;
    const MADV_PAGEOUT: u64 = 21;

    fn syscall5(nr: i64, args: [u64; 5]) -> i64 {
        let ret: i64;
        // SAFETY: a plain Linux system call with five integer arguments; the kernel clobbers
        // RCX and R11 only. The two calls made here read memory the caller lends (an iovec
        // array that outlives the call) and write none of ours.
        unsafe {
            core::arch::asm!(
                "syscall",
                inlateout("rax") nr => ret,
                in("rdi") args[0],
                in("rsi") args[1],
                in("rdx") args[2],
                in("r10") args[3],
                in("r8") args[4],
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            )
        };
        ret
    }

    /// `pidfd_open(pid, 0)`, as an owned descriptor.
    pub(super) fn pidfd_open(pid: u32) -> Result<std::os::fd::OwnedFd, String> {
        use std::os::fd::FromRawFd;
        let fd = syscall5(SYS_PIDFD_OPEN, [u64::from(pid), 0, 0, 0, 0]);
        if fd < 0 {
            return Err(format!("pidfd_open({pid}): errno {}", -fd));
        }
        // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
    }

    /// `process_madvise(pidfd, iov, MADV_PAGEOUT)`: bytes advised.
    pub(super) fn pageout(pidfd: &std::os::fd::OwnedFd, iov: &[IoVec]) -> Result<u64, String> {
        use std::os::fd::AsRawFd;
        let ret = syscall5(
            SYS_PROCESS_MADVISE,
            [
                pidfd.as_raw_fd() as u64,
                iov.as_ptr() as u64,
                iov.len() as u64,
                MADV_PAGEOUT,
                0,
            ],
        );
        if ret < 0 {
            return Err(format!("process_madvise(MADV_PAGEOUT): errno {}", -ret));
        }
        Ok(ret as u64)
    }
}

/// The process that has `file` mapped, and where.
fn find_mapping(file: &Path) -> Option<(u32, u64)> {
    let name = file.to_str()?;
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(maps) = fs::read_to_string(entry.path().join("maps")) else {
            continue;
        };
        let base = maps
            .lines()
            .filter(|l| l.ends_with(name))
            .find_map(|l| u64::from_str_radix(l.split('-').next()?, 16).ok());
        if let Some(base) = base {
            return Some((pid, base));
        }
    }
    None
}

/// Follows the guest's lines; once it sweeps, evicts its blocks every 300 ms until it is done.
/// Returns how many eviction rounds it made.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn evict(lines: mpsc::Receiver<String>, file: PathBuf) -> Result<u64, String> {
    let mut blocks = Vec::new();
    loop {
        let line = lines
            .recv()
            .map_err(|_| "the guest never started sweeping")?;
        if let Some(rest) = line.strip_prefix("apf-real: evict ") {
            let mut it = rest
                .split_whitespace()
                .map(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16));
            if let (Some(Ok(addr)), Some(Ok(len))) = (it.next(), it.next()) {
                blocks.push((addr, len));
            }
        } else if line.starts_with("apf-real: sweeping") {
            break;
        }
    }
    let (pid, base) = find_mapping(&file).ok_or("no process maps the guest RAM file")?;
    let pidfd = sys::pidfd_open(pid)?;
    let ram = fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let iov: Vec<sys::IoVec> = blocks
        .iter()
        .map(|&(addr, len)| sys::IoVec {
            base: base + addr,
            len,
        })
        .collect();
    let mut rounds = 0;
    loop {
        match lines.recv_timeout(Duration::from_millis(300)) {
            Ok(line) if line.starts_with("apf-real: done") => return Ok(rounds),
            Ok(_) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(rounds),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        // Dirty file pages are not dropped: write them back first.
        ram.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
        sys::pageout(&pidfd, &iov)?;
        rounds += 1;
    }
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn evict(_lines: mpsc::Receiver<String>, _file: PathBuf) -> Result<u64, String> {
    Err("eviction needs Linux on x86-64".into())
}

/// The outcome of one run: the guest's and the host's counts, and what went wrong.
pub struct Report {
    /// The lines printed for it (guest beside host).
    pub lines: Vec<String>,
    /// `None` when it passed.
    pub failure: Option<String>,
    /// The kernel's serial log.
    pub log: String,
}

/// One `scenario=apf-real` boot under KVM with eviction and tracing.
pub fn run(kernel: &PathBuf) -> Result<Report, String> {
    let dir = cmd::root().join("target").join("apf-real");
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let file = dir.join(format!("guest-ram-{}", std::process::id()));
    let _ = fs::remove_file(&file);
    let instance = Instance::create()?;
    let (tx, rx) = mpsc::channel();
    let evictor = {
        let file = file.clone();
        thread::spawn(move || evict(rx, file))
    };
    let opts = RunOptions {
        accel: Some(Accel::Kvm),
        smp: 2,
        timeout: Duration::from_secs(300),
        scenario: Some("apf-real".into()),
        extra_args: vec![
            "-object".into(),
            format!(
                "memory-backend-file,id=ram,size=512M,mem-path={},share=on",
                file.display()
            ),
            "-machine".into(),
            "memory-backend=ram".into(),
        ],
        lines: Some(tx),
    };
    let boot = qemu::boot(kernel, &opts, false);
    drop(opts);
    let evicted = evictor
        .join()
        .unwrap_or_else(|_| Err("the evictor panicked".into()));
    let host = instance.counts();
    drop(instance);
    let _ = fs::remove_file(&file);
    let boot = boot?;
    let host = host?;
    let guest = parse_guest(&boot.log);
    let mut lines = Vec::new();
    let mut failure = boot.failure.clone();
    match &evicted {
        Ok(rounds) => lines.push(format!(
            "host: {rounds} eviction rounds (fdatasync + MADV_PAGEOUT)"
        )),
        Err(why) => {
            failure.get_or_insert(format!("eviction: {why}"));
        }
    }
    for (event, count) in EVENTS.iter().zip(host) {
        lines.push(format!("host tracepoint {event:<26} {count}"));
    }
    match &guest {
        Some(g) => {
            lines.push(format!(
                "guest: not-present {} (host {}), page-ready {} (host {}), left asleep {}",
                g.not_present, host[1], g.page_ready, host[2], g.left
            ));
            let why = if g.not_present < MIN_NOT_PRESENT {
                Some(format!(
                    "only {} not-present events (want >= {MIN_NOT_PRESENT})",
                    g.not_present
                ))
            } else if g.not_present != host[1] || g.page_ready != host[2] {
                Some(format!(
                    "guest and host disagree: not-present {} vs {}, page-ready {} vs {}",
                    g.not_present, host[1], g.page_ready, host[2]
                ))
            } else if g.left != 0 {
                Some(format!("{} tasks left asleep", g.left))
            } else {
                None
            };
            if let Some(why) = why {
                failure.get_or_insert(why);
            }
        }
        None => {
            failure.get_or_insert("the guest printed no `apf-real: guest` line".into());
        }
    }
    Ok(Report {
        lines,
        failure,
        log: boot.log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_line_is_parsed_and_a_missing_field_is_none() {
        let log = "x\napf-real: guest not-present=314 page-ready=316 wake-all=2 slept=314 \
                   left=0\ny\n";
        assert_eq!(
            parse_guest(log),
            Some(GuestCounts {
                not_present: 314,
                page_ready: 316,
                left: 0
            })
        );
        assert_eq!(parse_guest("apf-real: guest page-ready=3 left=0"), None);
        assert_eq!(parse_guest("nothing here"), None);
    }
}
