//! The `trace.dat` export against the real trace-cmd (Debian's 3.1.6 here): `trace-cmd report`
//! of the file lists every event of the buffer with the time stamp and text the crate's own
//! page parser finds, CPU by CPU, and the lost events where the sub-buffers flag them.
//! Without `trace-cmd` it prints `skipped: <reason>` and returns.
#![cfg(feature = "std")]

mod common;

use std::process::Command;

use common::HeapPages;
use oskit_ring_buffer::{
    Clock, Config, LocalCpu, Mode, RingBuffer, format::Subbuf, sim::ManualClock,
    tracedat::write_trace_dat,
};

/// What a reader of the pages sees, in order: `Lost(Some(n))`/`Lost(None)` (count unknown)
/// before a sub-buffer that flags lost events, then its events.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    Lost(Option<u64>),
    Event(u64, String),
}

/// The crate's own decoding of one CPU's pages.
fn decode(data: &[u8], subbuf_size: usize) -> Vec<Line> {
    let mut out = Vec::new();
    for page in data.chunks(subbuf_size) {
        let mut sb = Subbuf::new(page).unwrap();
        if let Some(n) = sb.missed_events(page) {
            out.push(Line::Lost(n));
        }
        while let Some(ev) = sb.next_event().unwrap() {
            let end = ev
                .payload
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(ev.payload.len());
            let text = String::from_utf8(ev.payload[..end].to_vec()).unwrap();
            out.push(Line::Event(ev.ts, text));
        }
    }
    out
}

/// `trace-cmd report -t` output, per CPU.
fn parse_report(text: &str, cpus: usize) -> Vec<Vec<Line>> {
    let mut out = vec![Vec::new(); cpus];
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("CPU:") {
            // `CPU:0 [EVENTS DROPPED]` or `CPU:0 [12 EVENTS DROPPED]`
            let (cpu, rest) = rest.split_once(' ').unwrap();
            let n = rest
                .trim_start_matches('[')
                .split_whitespace()
                .next()
                .unwrap();
            out[cpu.parse::<usize>().unwrap()].push(Line::Lost(n.parse().ok()));
            continue;
        }
        let Some(open) = line.find('[') else { continue };
        let Some(close) = line[open..].find(']') else {
            continue;
        };
        let Ok(cpu) = line[open + 1..open + close].parse::<usize>() else {
            continue;
        };
        let rest = line[open + close + 1..].trim_start();
        let (ts, rest) = rest.split_once(": ").unwrap();
        let (secs, frac) = ts.split_once('.').unwrap();
        assert_eq!(frac.len(), 9, "`-t` prints nanoseconds: {line}");
        let ns = secs.parse::<u64>().unwrap() * 1_000_000_000 + frac.parse::<u64>().unwrap();
        let (name, text) = rest.split_once(':').unwrap();
        assert!(name.starts_with("text_"), "{line}");
        out[cpu].push(Line::Event(ns, text.trim_start().to_string()));
    }
    out
}

#[test]
#[cfg_attr(miri, ignore = "runs the trace-cmd program")]
fn peer_trace_cmd_report_lists_every_event() {
    let version = match Command::new("trace-cmd").arg("--version").output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => return println!("skipped: trace-cmd not installed ({e})"),
    };
    let alloc = HeapPages::default();
    let clock = ManualClock::new(5_000_000_000);
    let rb = RingBuffer::new(Config::new(3, 4).mode(Mode::Overwrite), &alloc, &clock).unwrap();
    // CPU 0 overwritten many times (lost events), CPU 1 a few events with large gaps (time
    // extends), CPU 2 nothing.
    for (cpu, n) in [(0usize, 3000usize), (1, 40)] {
        // SAFETY: this thread is the only writer of each CPU, one after the other.
        let here = unsafe { LocalCpu::new(cpu) };
        for i in 0..n {
            clock.advance(if cpu == 1 {
                1 + (i as u64) * 40_000_000
            } else {
                7 + i as u64 % 5
            });
            let pad = "x".repeat(i % 13);
            let text = format!("event {i} on cpu{cpu} at {} {pad}", clock.now());
            rb.write(here, text.as_bytes()).unwrap();
        }
    }
    let mut page = rb.alloc_read_page().unwrap();
    let mut cpus = vec![Vec::new(); rb.cpus()];
    for (cpu, data) in cpus.iter_mut().enumerate() {
        while rb.read_page(cpu, &mut page, false).unwrap().is_some() {
            data.extend_from_slice(page.as_bytes());
        }
    }
    rb.free_read_page(page);
    let dir = std::env::temp_dir().join(format!("oskit-tracedat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("trace.dat");
    let slices: Vec<&[u8]> = cpus.iter().map(Vec::as_slice).collect();
    write_trace_dat(
        std::fs::File::create(&path).unwrap(),
        rb.subbuf_size(),
        &slices,
    )
    .unwrap();

    let out = Command::new("trace-cmd")
        .args(["report", "-t"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "trace-cmd {version} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = parse_report(&report, rb.cpus());
    for (cpu, data) in cpus.iter().enumerate() {
        let want = decode(data, rb.subbuf_size());
        assert_eq!(got[cpu].len(), want.len(), "CPU {cpu}: lines");
        for (g, w) in got[cpu].iter().zip(&want) {
            assert_eq!(g, w, "CPU {cpu}");
        }
    }
    assert!(
        got[0].iter().any(|l| matches!(l, Line::Lost(_))),
        "CPU 0 lost nothing"
    );
    let total: u64 = decode(&cpus[0], rb.subbuf_size())
        .iter()
        .map(|l| match l {
            Line::Lost(Some(n)) => *n,
            _ => 0,
        })
        .sum();
    let st = rb.stats(0).unwrap();
    assert!(total <= st.overrun, "stored lost counts exceed the overrun");
    assert_eq!(got[1].len(), 40);
    assert!(got[2].is_empty());
}
