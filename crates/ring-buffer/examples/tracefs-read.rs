//! Reads the running Linux kernel's trace buffer of one CPU through the user-space mapping
//! (Linux ≥ 6.10), one event per line.
//!
//! `tracefs-read [--tracefs DIR] --cpu N`

use std::{path::PathBuf, process::ExitCode};

use oskit_ring_buffer::{format::EventLine, tracefs};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut dir, mut cpu) = (None, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--tracefs" => dir = args.next().map(PathBuf::from),
            "--cpu" => cpu = args.next().and_then(|v| v.parse::<usize>().ok()),
            _ => {}
        }
    }
    let Some(cpu) = cpu else {
        eprintln!("usage: tracefs-read [--tracefs DIR] --cpu N");
        return ExitCode::from(2);
    };
    let Some(dir) = dir.or_else(tracefs::find_tracefs) else {
        eprintln!(
            "tracefs-read: no tracefs mount found (try: mount -t tracefs nodev /sys/kernel/tracing)"
        );
        return ExitCode::FAILURE;
    };
    let map = match tracefs::TracefsMap::open(&dir, cpu) {
        Ok(m) => m,
        Err(e) => {
            eprintln!(
                "tracefs-read: mapping cpu{cpu} under {}: {e}",
                dir.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let mut reader = match map.reader() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tracefs-read: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut buf = vec![0u8; reader.subbuf_size()];
    loop {
        match reader.next_event(&mut buf) {
            Ok(Some(ev)) => {
                if ev.lost > 0 {
                    println!("lost={}", ev.lost);
                }
                println!(
                    "{}",
                    EventLine {
                        cpu,
                        ts: ev.ts,
                        payload: &buf[..ev.len]
                    }
                );
            }
            Ok(None) => return ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tracefs-read: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
}
