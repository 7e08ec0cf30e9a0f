//! Against the running Linux kernel: markers written through `trace_marker` on one CPU come
//! back, in order, through the mapping of that CPU's `trace_pipe_raw` (the library path of the
//! `tracefs-read` example). Needs root, tracefs and Linux >= 6.10; otherwise it prints
//! `skipped: <reason>` and passes vacuously.
#![cfg(all(feature = "std", target_os = "linux"))]

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use oskit_ring_buffer::tracefs::{TracefsMap, find_tracefs};

fn skip(reason: &str) {
    println!("skipped: {reason}");
}

/// Removes the tracefs instance on the way out, whatever happens.
struct Instance(PathBuf);
impl Drop for Instance {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

fn pin_to_cpu0() -> bool {
    // SAFETY: `set` is a plain bitmask we own; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

#[test]
#[cfg_attr(miri, ignore = "mmap, ioctl and sched_setaffinity of a real kernel")]
fn peer_markers_come_back_through_the_mapping() {
    let tracefs = match find_tracefs() {
        Some(t) => t,
        None => {
            let _ = std::process::Command::new("mount")
                .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
                .status();
            match find_tracefs() {
                Some(t) => t,
                None => return skip("no tracefs mount and mounting one failed"),
            }
        }
    };
    let dir = tracefs.join(format!("instances/oskit_rb_test_{}", std::process::id()));
    if let Err(e) = fs::create_dir(&dir) {
        return skip(&format!(
            "cannot create a tracefs instance (root needed): {e}"
        ));
    }
    let _instance = Instance(dir.clone());
    if !pin_to_cpu0() {
        return skip("cannot pin the test thread to CPU 0");
    }
    let map = match TracefsMap::open(&dir, 0) {
        Ok(m) => m,
        Err(e) => {
            return skip(&format!(
                "kernel cannot mmap trace_pipe_raw (Linux >= 6.10): {e}"
            ));
        }
    };
    let markers: Vec<String> = (0..40)
        .map(|i| {
            let tail = if i % 7 == 3 {
                "L".repeat(150)
            } else {
                String::new()
            };
            format!("oskit-marker-{i}-{}{tail}", std::process::id())
        })
        .collect();
    write_markers(&dir, &markers);

    let mut reader = map.reader().expect("meta page of the live kernel");
    assert_eq!(reader.subbuf_size() % 4096, 0);
    let mut buf = vec![0u8; reader.subbuf_size()];
    let mut found = Vec::new();
    let mut last_ts = 0;
    while let Some(ev) = reader.next_event(&mut buf).expect("live buffer decodes") {
        assert!(
            ev.ts >= last_ts,
            "time went backwards: {last_ts} then {}",
            ev.ts
        );
        last_ts = ev.ts;
        let payload = &buf[..ev.len];
        if let Some(i) = markers.iter().position(|m| contains(payload, m.as_bytes())) {
            found.push(i);
        }
    }
    assert_eq!(
        found,
        (0..markers.len()).collect::<Vec<_>>(),
        "markers lost or reordered"
    );
    drop(reader);
    drop(map);
}

fn write_markers(dir: &Path, markers: &[String]) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("trace_marker"))
        .expect("trace_marker");
    for m in markers {
        f.write_all(m.as_bytes()).expect("marker write");
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
