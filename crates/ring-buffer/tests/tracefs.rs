//! Against the running Linux kernel (root, tracefs, Linux >= 6.10; otherwise each test prints
//! `skipped: <reason>` and returns). Each test works in a private tracefs instance with a
//! small buffer (16 KiB per CPU), removed afterwards, and overwrites it many times:
//!
//! - read through the mapping (`TracefsMap` + `MappedReader`), the lost counts add up to the
//!   kernel's own `per_cpu/cpuN/stats` overrun and the events are exactly the newest ones;
//!   read through `trace_pipe_raw` and the crate's page parser, likewise;
//! - with a writer on every CPU while a reader drains every CPU's mapping, per CPU: events
//!   read + lost = events written, lost = the kernel's overrun;
//! - `TracefsMap::wait` times out on an empty buffer and returns once data arrives.
#![cfg(all(feature = "std", target_os = "linux"))]

use std::{
    fs,
    io::{Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use oskit_ring_buffer::{
    format::Subbuf,
    tracefs::{TracefsMap, find_tracefs},
};

/// A private tracefs instance, removed on the way out whatever happens.
struct Instance(PathBuf);

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = fs::write(self.0.join("tracing_on"), "0");
        let _ = fs::remove_dir(&self.0);
    }
}

/// A fresh instance with `kb` KiB per CPU, or the reason there is none.
fn instance(tag: &str, kb: usize) -> Result<Instance, String> {
    let tracefs = match find_tracefs() {
        Some(t) => t,
        None => {
            let _ = std::process::Command::new("mount")
                .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
                .status();
            find_tracefs().ok_or("no tracefs mount and mounting one failed")?
        }
    };
    let dir = tracefs.join(format!("instances/oskit_rb_{tag}_{}", std::process::id()));
    fs::create_dir(&dir).map_err(|e| format!("cannot create a tracefs instance (root?): {e}"))?;
    let inst = Instance(dir);
    fs::write(inst.0.join("buffer_size_kb"), kb.to_string())
        .map_err(|e| format!("buffer_size_kb: {e}"))?;
    Ok(inst)
}

/// Maps CPU `cpu` of the instance, or the reason it cannot be.
fn map(inst: &Instance, cpu: usize) -> Result<TracefsMap, String> {
    TracefsMap::open(&inst.0, cpu)
        .map_err(|e| format!("kernel cannot mmap trace_pipe_raw (Linux >= 6.10): {e}"))
}

/// An instance's CPU 0 buffer, mapped (fields drop in order: the mapping goes before the
/// instance).
struct Mapped {
    map: TracefsMap,
    inst: Instance,
}

/// A fresh instance of `kb` KiB per CPU with CPU 0's buffer mapped, this thread pinned to
/// CPU 0; or why not (the test then says skipped).
fn mapped_on_cpu0(tag: &str, kb: usize) -> Result<Mapped, String> {
    let inst = instance(tag, kb)?;
    let map = map(&inst, 0)?;
    if !pin_to(0) {
        return Err("cannot pin the test thread to CPU 0".into());
    }
    Ok(Mapped { map, inst })
}

fn pin_to(cpu: usize) -> bool {
    // SAFETY: `set` is a plain bitmask we own; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A counter of `per_cpu/cpuN/stats` ("overrun", "entries", ...).
fn stat(inst: &Instance, cpu: usize, name: &str) -> u64 {
    let text = fs::read_to_string(inst.0.join(format!("per_cpu/cpu{cpu}/stats"))).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// The marker text of writer `w`'s event `i`: `i` can be parsed back from a payload.
fn marker(w: usize, i: usize) -> String {
    let pad = if i % 7 == 3 {
        "L".repeat(90)
    } else {
        String::new()
    };
    format!("oskit-{}-w{w}-#{i}#{pad}", std::process::id())
}

/// Writer and index of a marker found in `payload` (a `print` event), if it is one of ours.
fn parse_marker(payload: &[u8]) -> Option<(usize, usize)> {
    let text = String::from_utf8_lossy(payload);
    let at = text.find(&format!("oskit-{}-w", std::process::id()))?;
    let rest = &text[at..];
    let w = rest.split("-w").nth(1)?.split('-').next()?.parse().ok()?;
    let i = rest.split('#').nth(1)?.parse().ok()?;
    Some((w, i))
}

/// Writes markers `0..n` of writer `w` through the instance's `trace_marker`.
fn write_markers(inst: &Instance, w: usize, n: usize) {
    write_markers_then(inst, w, n, || {});
}

/// Writes markers `0..n` as writer `w`, calling `halfway` after the first half.
fn write_markers_then(inst: &Instance, w: usize, n: usize, halfway: impl FnOnce()) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(inst.0.join("trace_marker"))
        .expect("trace_marker");
    let mut halfway = Some(halfway);
    for i in 0..n {
        if i == n / 2 {
            if let Some(f) = halfway.take() {
                f();
            }
        }
        f.write_all(marker(w, i).as_bytes()).expect("marker write");
    }
}

/// Drains CPU `cpu`'s mapping: `(writer, index)` of every marker and the lost counts summed.
fn drain_mapping(map: &TracefsMap, seen: &mut Vec<(usize, usize)>) -> u64 {
    let mut reader = map.reader().expect("meta page of the live kernel");
    let mut buf = vec![0u8; reader.subbuf_size()];
    let mut lost = 0;
    let mut last_ts = 0;
    while let Some(ev) = reader.next_event(&mut buf).expect("live buffer decodes") {
        assert!(
            ev.ts >= last_ts,
            "time went backwards: {last_ts} then {}",
            ev.ts
        );
        last_ts = ev.ts;
        lost += ev.lost;
        seen.extend(parse_marker(&buf[..ev.len]));
    }
    lost
}

/// The check of one overwritten CPU: the survivors are exactly the newest markers, in order,
/// and the lost count is the kernel's overrun.
fn check_newest(seen: &[(usize, usize)], lost: u64, written: usize, overrun: u64, how: &str) {
    assert!(overrun > 0, "{how}: the buffer was not overwritten");
    assert_eq!(lost, overrun, "{how}: lost count != the kernel's overrun");
    let want: Vec<(usize, usize)> = (overrun as usize..written).map(|i| (0, i)).collect();
    assert_eq!(seen.len(), want.len(), "{how}: events read");
    assert!(
        seen == want,
        "{how}: not exactly the newest markers in order"
    );
}

const WRITTEN: usize = 5000;

#[test]
#[cfg_attr(miri, ignore = "mmap, ioctl and sched_setaffinity of a real kernel")]
fn peer_overwritten_instance_read_through_the_mapping() {
    let Mapped { map, inst } = match mapped_on_cpu0("map", 16) {
        Ok(m) => m,
        Err(reason) => return println!("skipped: {reason}"),
    };
    write_markers(&inst, 0, WRITTEN);
    let overrun = stat(&inst, 0, "overrun");
    let mut seen = Vec::new();
    let lost = drain_mapping(&map, &mut seen);
    check_newest(&seen, lost, WRITTEN, overrun, "mapping");
    assert_eq!(stat(&inst, 0, "overrun"), overrun);
}

#[test]
#[cfg_attr(miri, ignore = "read of a real kernel's trace_pipe_raw")]
fn peer_overwritten_instance_read_through_trace_pipe_raw() {
    let inst = match instance("raw", 16) {
        Ok(i) => i,
        Err(reason) => return println!("skipped: {reason}"),
    };
    if !pin_to(0) {
        return println!("skipped: cannot pin the test thread to CPU 0");
    }
    write_markers(&inst, 0, WRITTEN);
    let overrun = stat(&inst, 0, "overrun");
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(inst.0.join("per_cpu/cpu0/trace_pipe_raw"))
        .expect("trace_pipe_raw");
    let (mut seen, mut lost) = (Vec::new(), 0);
    let mut page = vec![0u8; 4096];
    loop {
        match f.read(&mut page) {
            Ok(0) => break,
            Ok(n) => {
                assert_eq!(n, page.len(), "trace_pipe_raw reads whole pages");
                let mut sb = Subbuf::new(&page).expect("a Linux sub-buffer parses");
                match sb.missed_events(&page) {
                    Some(Some(n)) => lost += n,
                    Some(None) => panic!("lost events without a count"),
                    None => {}
                }
                while let Some(ev) = sb.next_event().expect("Linux events decode") {
                    seen.extend(parse_marker(ev.payload));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("trace_pipe_raw: {e}"),
        }
    }
    check_newest(&seen, lost, WRITTEN, overrun, "trace_pipe_raw");
}

#[test]
#[cfg_attr(miri, ignore = "mmap, ioctl and threads pinned on a real kernel")]
fn peer_writers_on_every_cpu_while_reading() {
    let inst = match instance("smp", 16) {
        Ok(i) => i,
        Err(reason) => return println!("skipped: {reason}"),
    };
    let n = cpus();
    // Declared first, dropped last: the instance goes once every mapping of it is gone.
    let inst = Arc::new(inst);
    let maps: Vec<TracefsMap> = match (0..n).map(|c| map(&inst, c)).collect() {
        Ok(m) => m,
        Err(reason) => return println!("skipped: {reason}"),
    };
    // Reader rounds so far: each writer pauses halfway until the reader has made two, so the
    // reading overlaps the writing however the two cores are shared with other work.
    let rounds_done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = (0..n)
        .map(|cpu| {
            let (inst, rounds_done) = (inst.clone(), rounds_done.clone());
            std::thread::spawn(move || {
                if !pin_to(cpu) {
                    return false;
                }
                write_markers_then(&inst, cpu, WRITTEN, || {
                    let start = Instant::now();
                    while rounds_done.load(std::sync::atomic::Ordering::Acquire) < 2
                        && start.elapsed() < Duration::from_secs(10)
                    {
                        std::thread::yield_now();
                    }
                });
                true
            })
        })
        .collect();
    let mut seen: Vec<Vec<(usize, usize)>> = vec![Vec::new(); n];
    let mut lost = vec![0u64; n];
    let drain_all = |seen: &mut Vec<Vec<(usize, usize)>>, lost: &mut Vec<u64>| {
        for (cpu, m) in maps.iter().enumerate() {
            lost[cpu] += drain_mapping(m, &mut seen[cpu]);
        }
    };
    let mut rounds = 0;
    while !writers.iter().all(|w| w.is_finished()) {
        drain_all(&mut seen, &mut lost);
        rounds += 1;
        rounds_done.store(rounds, std::sync::atomic::Ordering::Release);
    }
    if !writers.into_iter().all(|w| w.join().unwrap()) {
        return println!("skipped: cannot pin a writer thread to its CPU");
    }
    drain_all(&mut seen, &mut lost);
    assert!(rounds > 1, "the reader never ran while the writers did");
    for cpu in 0..n {
        let overrun = stat(&inst, cpu, "overrun");
        let mine: Vec<usize> = seen[cpu]
            .iter()
            .inspect(|(w, _)| assert_eq!(*w, cpu, "CPU {cpu} holds writer {w}'s marker"))
            .map(|&(_, i)| i)
            .collect();
        assert!(
            mine.windows(2).all(|p| p[0] < p[1]),
            "CPU {cpu}: markers reordered or repeated"
        );
        assert_eq!(
            lost[cpu], overrun,
            "CPU {cpu}: lost count != the kernel's overrun"
        );
        assert_eq!(
            mine.len() as u64 + lost[cpu],
            WRITTEN as u64,
            "CPU {cpu}: events read + lost != written (overrun {overrun})"
        );
    }
}

#[test]
#[cfg_attr(miri, ignore = "poll of a real kernel's trace_pipe_raw")]
fn peer_wait_times_out_then_wakes_on_data() {
    let Mapped { map, inst } = match mapped_on_cpu0("wait", 16) {
        Ok(m) => m,
        Err(reason) => return println!("skipped: {reason}"),
    };
    // Wake on any data, not at half full.
    fs::write(inst.0.join("buffer_percent"), "0").unwrap();
    let start = Instant::now();
    assert!(
        !map.wait(Duration::from_millis(100)).unwrap(),
        "woke on nothing"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(90),
        "returned early"
    );
    let writer = {
        let path = inst.0.join("trace_marker");
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            pin_to(0);
            fs::write(path, marker(0, 0)).unwrap();
        })
    };
    let start = Instant::now();
    assert!(map.wait(Duration::from_secs(10)).unwrap(), "no wake-up");
    assert!(start.elapsed() < Duration::from_secs(10));
    writer.join().unwrap();
    let mut seen = Vec::new();
    drain_mapping(&map, &mut seen);
    assert_eq!(seen, [(0, 0)]);
}
