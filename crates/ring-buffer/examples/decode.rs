//! Decodes a stream of sub-buffers (a `dump` file, or `cat per_cpu/cpuN/trace_pipe_raw > FILE`
//! on Linux) with the crate's own page parser, one event per line.
//!
//! `decode FILE [--subbuf-size N] [--cpu N]`

use std::process::ExitCode;

use oskit_ring_buffer::format::{EventLine, Subbuf};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut file, mut subbuf_size, mut cpu) = (None, 4096usize, 0usize);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--subbuf-size" => subbuf_size = args.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            "--cpu" => cpu = args.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            _ => file = Some(a),
        }
    }
    let Some(file) = file else {
        eprintln!("usage: decode FILE [--subbuf-size N] [--cpu N]");
        return ExitCode::from(2);
    };
    if subbuf_size < 32 {
        eprintln!("decode: bad --subbuf-size");
        return ExitCode::from(2);
    }
    let bytes = match std::fs::read(&file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("decode: {file}: {e}");
            return ExitCode::FAILURE;
        }
    };
    for (i, chunk) in bytes.chunks(subbuf_size).enumerate() {
        let mut sb = match Subbuf::new(chunk) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("decode: sub-buffer {i}: {e}");
                return ExitCode::FAILURE;
            }
        };
        match sb.missed_events(chunk) {
            Some(Some(n)) => println!("lost={n}"),
            Some(None) => println!("lost=unknown"),
            None => {}
        }
        loop {
            match sb.next_event() {
                Ok(Some(ev)) => println!(
                    "{}",
                    EventLine {
                        cpu,
                        ts: ev.ts,
                        payload: ev.payload
                    }
                ),
                Ok(None) => break,
                Err(e) => {
                    eprintln!("decode: sub-buffer {i}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::SUCCESS
}
