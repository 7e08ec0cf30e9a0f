//! The `trace` check: a ring-3 task per CPU consumes that CPU's trace buffer through the
//! read-only mapping ([`crate::steps::trace_map`]) with the crate's `MappedReader`, counting events
//! per step; the counts must match the buffer's counters and the kernel's tally of what each
//! step logged.
//!
//! Recording is disabled for the whole read (events logged meanwhile are refused and counted
//! as such), so the buffer's counters do not move while it is read and compared: every CPU
//! takes an IPI after the disable, so no write that began before it is still in flight.

use oskit_ring_buffer::{Error, MappedReader, RawRegion, Stats};

use crate::{
    arch::gdt::MAX_CPUS,
    arch::smp,
    arch::syscall::nr,
    checks::{self, Outcome},
    ensure, fail,
    mm::frames,
    mm::vm,
    println,
    steps::trace_map,
    task::sched,
    task::ulib,
    task::usermode,
    trace::{self, MAX_STEPS, STEP_NAME},
};

/// Where the ring-3 reader maps the buffer.
const MAP_AT: u64 = vm::USER_START + (2 << 30);
/// Where the ring-3 reader writes its [`Report`] (a kernel frame, shared writable).
const REPORT_AT: u64 = vm::USER_START + (3 << 30);

/// What the ring-3 reader found, per step name.
#[repr(C)]
#[derive(Clone, Copy)]
struct StepCount {
    count: u64,
    len: u64,
    name: [u8; STEP_NAME],
}

/// The ring-3 reader's results, in the shared page.
#[repr(C)]
struct Report {
    events: u64,
    lost: u64,
    /// Events whose text has no `step:` prefix, or whose step did not fit in `steps`.
    other: u64,
    nsteps: u64,
    steps: [StepCount; MAX_STEPS],
}

const _: () = assert!(core::mem::size_of::<Report>() <= frames::FRAME_SIZE as usize);

/// The step name of an event's text: the bytes before its first `:` (cut to [`STEP_NAME`]).
fn step_of(payload: &[u8]) -> Option<&[u8]> {
    let colon = payload.iter().position(|&b| b == b':')?;
    let name = &payload[..colon];
    if name.is_empty() || !name.iter().all(u8::is_ascii_graphic) {
        return None;
    }
    Some(&name[..name.len().min(STEP_NAME)])
}

/// Ring 3: maps CPU `cpu`'s buffer, reads every event with `MappedReader`, counts them per
/// step into the report page; exits with the number read (negative errno on failure).
fn reader(cpu: u64) -> i64 {
    let report = REPORT_AT as *mut Report;
    let len = ulib::syscall3(nr::MAP_TRACE_BUFFER, cpu, MAP_AT, 0);
    if len < 0 {
        return len;
    }
    // SAFETY: the kernel mapped `len` readable bytes at MAP_AT for the life of this task.
    let region = unsafe { RawRegion::new(MAP_AT as *const u8, len as usize) };
    let get_reader = || match ulib::syscall3(nr::GET_READER, cpu, 0, 0) {
        0 => Ok(()),
        e => Err(Error::Os(-e as i32)),
    };
    let mut reader = match MappedReader::new(region, get_reader) {
        Ok(r) => r,
        Err(e) => return -i64::from(e.errno()),
    };
    let mut payload = [0u8; 4096];
    let mut events = 0u64;
    loop {
        let ev = match reader.next_event(&mut payload) {
            Ok(Some(ev)) => ev,
            Ok(None) => break,
            Err(e) => return -i64::from(e.errno()),
        };
        events += 1;
        // SAFETY: REPORT_AT is this task's writable shared page, which holds a Report (zeroed by
        // the kernel); only this task touches it while it runs.
        let r = unsafe { &mut *report };
        r.events = events;
        r.lost += ev.lost;
        let Some(name) = step_of(&payload[..ev.len.min(payload.len())]) else {
            r.other += 1;
            continue;
        };
        let n = r.nsteps as usize;
        match r.steps[..n.min(MAX_STEPS)]
            .iter_mut()
            .find(|s| &s.name[..s.len as usize] == name)
        {
            Some(s) => s.count += 1,
            None if n < MAX_STEPS => {
                let s = &mut r.steps[n];
                s.name[..name.len()].copy_from_slice(name);
                s.len = name.len() as u64;
                s.count = 1;
                r.nsteps += 1;
            }
            None => r.other += 1,
        }
    }
    events as i64
}

/// Ring 3: maps CPU 0's buffer and writes to its meta page, which must kill it.
fn writer(_: u64) -> i64 {
    let len = ulib::syscall3(nr::MAP_TRACE_BUFFER, 0, MAP_AT, 0);
    if len < 0 {
        return len;
    }
    // SAFETY: MAP_AT is mapped for this task, read-only: the write faults by design and the
    // kernel kills the task; no memory changes.
    unsafe { (MAP_AT as *mut u64).write_volatile(0) };
    0
}

/// The mapping is read-only: a ring-3 write to it is killed, and the ring unmaps afterwards.
fn write_to_mapping() -> Outcome {
    let Ok(task) = usermode::spawn("trace-writer", writer, 0) else {
        fail!("cannot start the ring-3 writer")
    };
    let code = sched::join(task);
    let was_mapped = trace_map::release(0);
    ensure!(
        code == Some(sched::EXIT_KILLED),
        "a ring-3 write to the trace mapping was not killed (exit {code:?})"
    );
    ensure!(was_mapped, "the ring-3 writer did not map the buffer");
    println!("  a ring-3 write to the read-only mapping was killed");
    Ok(())
}

/// Logs one event on the CPU it runs on (an IPI from `on_each_cpu`).
fn mark(cpu: usize) {
    crate::trace!("trace", "cpu {cpu} marks its ring before the mapping");
}

/// Runs nothing: an IPI round on every CPU, after which no write begun earlier is in flight.
fn barrier(_cpu: usize) {}

/// What the readers found, summed over the CPUs.
struct Seen {
    steps: [StepCount; MAX_STEPS],
    nsteps: usize,
    other: u64,
}

impl Seen {
    fn add(&mut self, name: &[u8], count: u64) {
        if let Some(s) = self.steps[..self.nsteps]
            .iter_mut()
            .find(|s| &s.name[..s.len as usize] == name)
        {
            s.count += count;
        } else if self.nsteps < MAX_STEPS {
            let s = &mut self.steps[self.nsteps];
            s.name[..name.len()].copy_from_slice(name);
            s.len = name.len() as u64;
            s.count = count;
            self.nsteps += 1;
        } else {
            self.other += count;
        }
    }

    fn count(&self, name: &[u8]) -> u64 {
        self.steps[..self.nsteps]
            .iter()
            .find(|s| &s.name[..s.len as usize] == name)
            .map_or(0, |s| s.count)
    }
}

/// The `trace` check (see the module docs).
pub fn check() -> Outcome {
    let Some(rb) = trace::buffer() else {
        fail!("no trace buffer (trace::init failed)")
    };
    smp::on_each_cpu(mark);
    crate::trace!(
        "trace",
        "mapping {} CPU buffers into ring 3, recording disabled for the read",
        rb.cpus()
    );
    trace_map::install();
    let refused = trace::missed();
    rb.record_disable();
    smp::on_each_cpu(barrier);
    let Some(frame) = frames::alloc(0) else {
        rb.record_enable();
        fail!("no frame for the report page")
    };
    println!("TRACE-DUMP-BEGIN cpus={}", rb.cpus());
    trace_map::set_dump(true);
    let outcome = read_every_cpu(rb, frame);
    trace_map::set_dump(false);
    println!("TRACE-DUMP-END");
    let read_only = outcome.is_ok().then(write_to_mapping);
    frames::free(frame, 0);
    rb.record_enable();
    let totals = outcome?;
    if let Some(Err(why)) = read_only {
        return Err(why);
    }
    let refused = trace::missed() - refused;
    let seen = &totals.seen;

    // Every step that logged reached the reader. When nothing was overwritten and every event
    // came through `trace!`, each step was seen exactly as often as it logged.
    let mut written_total = 0;
    trace::steps(|_, written, _| written_total += written);
    let direct = totals.entries.saturating_sub(written_total);
    let exact = totals.overrun == 0 && direct == 0;
    let mut failure = None;
    crate::print!("  events by step (read in ring 3 / written):");
    trace::steps(|name, written, _| {
        let got = seen.count(name);
        let name = core::str::from_utf8(name).unwrap_or("?");
        crate::print!(" {name} {got}/{written}");
        let bad = (written > 0 && got == 0)
            || (direct == 0 && got > written)
            || (exact && got != written);
        if bad && failure.is_none() {
            failure = Some((name, got, written));
        }
    });
    println!(
        "; {} without a step, {direct} not written by trace!",
        seen.other
    );
    if let Some((name, got, written)) = failure {
        fail!(
            "step {name}: the ring-3 reader saw {got} of its {written} events (overrun {})",
            totals.overrun
        );
    }
    for required in ["boot", "trace"] {
        ensure!(
            seen.count(required.as_bytes()) > 0,
            "no {required} event reached the ring-3 reader"
        );
    }
    // The scenario steps log into the trace buffer: each one that ran must have been read.
    for step in ["fork", "bts", "apf", "xen"] {
        ensure!(
            !checks::ran(step) || seen.count(step.as_bytes()) > 0,
            "step {step} ran but none of its events reached the ring-3 reader"
        );
    }
    let per_cpu = PerCpu(totals.per_cpu, rb.cpus());
    checks::figures(format_args!(
        "{per_cpu} = {} read in ring 3 = entries {} - overrun {}; {} steps; dumped for the host",
        totals.read, totals.entries, totals.overrun, seen.nsteps
    ));
    println!("  {refused} events refused while recording was disabled for the read");
    Ok(())
}

/// Events per CPU, `cpu0 12 + cpu1 7`.
struct PerCpu([u64; MAX_CPUS], usize);

impl core::fmt::Display for PerCpu {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (cpu, n) in self.0.iter().enumerate().take(self.1) {
            write!(f, "{}cpu{cpu} {n}", if cpu == 0 { "" } else { " + " })?;
        }
        Ok(())
    }
}

/// What the readers of every CPU read.
struct Totals {
    read: u64,
    entries: u64,
    overrun: u64,
    per_cpu: [u64; MAX_CPUS],
    seen: Seen,
}

/// Spawns the ring-3 reader of each CPU in turn and checks its count against the counters.
fn read_every_cpu(rb: &trace::TraceBuffer, frame: u64) -> Result<Totals, checks::Failure> {
    let mut before = [Stats::default(); MAX_CPUS];
    for (cpu, b) in before.iter_mut().enumerate().take(rb.cpus()) {
        let Ok(stats) = rb.stats(cpu) else {
            fail!("no stats for cpu {cpu}")
        };
        ensure!(
            stats.read == 0,
            "cpu {cpu}: {} events were consumed before the check",
            stats.read
        );
        *b = stats;
    }
    let mut seen = Seen {
        steps: [StepCount {
            count: 0,
            len: 0,
            name: [0; STEP_NAME],
        }; MAX_STEPS],
        nsteps: 0,
        other: 0,
    };
    let (mut read_total, mut entries, mut overrun) = (0, 0, 0);
    let report = frame as *mut Report;
    let mut per_cpu = [0u64; MAX_CPUS];
    for cpu in 0..rb.cpus() {
        // SAFETY: a frame we own, identity-mapped; no task maps it now.
        unsafe { core::ptr::write_bytes(frame as *mut u8, 0, frames::FRAME_SIZE as usize) };
        let task = usermode::spawn_with("trace-reader", reader, cpu as u64, |space| {
            vm::map_fixed(space, REPORT_AT, frame, frames::FRAME_SIZE, true)
        });
        let Ok(task) = task else {
            fail!("cannot start the ring-3 reader of cpu {cpu}")
        };
        let code = sched::join(task);
        // The task and its address space are gone: the ring can be unmapped.
        let was_mapped = trace_map::release(cpu);
        // SAFETY: the reader is gone; the frame is ours again.
        let r = unsafe { report.read_volatile() };
        let b = before[cpu];
        let Ok(after) = rb.stats(cpu) else {
            fail!("no stats for cpu {cpu}")
        };
        let expected = b.entries - b.overrun;
        println!(
            "TRACE-DUMP cpu={cpu} done read={} entries={} overrun={}",
            r.events, b.entries, b.overrun
        );
        ensure!(
            was_mapped,
            "cpu {cpu}: the reader did not map the buffer (exit {code:?})"
        );
        ensure!(
            code == Some(r.events as i64),
            "cpu {cpu}: the reader exited with {code:?}, its report says {} events",
            r.events
        );
        ensure!(
            r.events == expected,
            "cpu {cpu}: the ring-3 reader read {} events, entries - overrun = {} - {}",
            r.events,
            b.entries,
            b.overrun
        );
        ensure!(
            after.entries == b.entries && after.overrun == b.overrun,
            "cpu {cpu}: the buffer changed while recording was disabled"
        );
        ensure!(
            after.read - b.read == r.events,
            "cpu {cpu}: the buffer accounts {} events as read, the reader read {}",
            after.read - b.read,
            r.events
        );
        ensure!(
            r.lost == b.overrun,
            "cpu {cpu}: the reader was told of {} lost events, overrun is {}",
            r.lost,
            b.overrun
        );
        ensure!(
            rb.map_count(cpu) == Ok(0),
            "cpu {cpu}: still mapped after the unmap"
        );
        for s in &r.steps[..(r.nsteps as usize).min(MAX_STEPS)] {
            seen.add(&s.name[..(s.len as usize).min(STEP_NAME)], s.count);
        }
        seen.other += r.other;
        per_cpu[cpu] = r.events;
        read_total += r.events;
        entries += b.entries;
        overrun += b.overrun;
    }
    println!(
        "  ring-3 readers: {} = {read_total} events = entries {entries} - overrun {overrun}",
        PerCpu(per_cpu, rb.cpus())
    );
    Ok(Totals {
        read: read_total,
        entries,
        overrun,
        per_cpu,
        seen,
    })
}
