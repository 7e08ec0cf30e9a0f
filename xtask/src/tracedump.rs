//! The example kernel's trace dump: what its ring-3 trace reader was shown, written to the
//! serial log, decoded here with the ring buffer crate's own `MappedReader`.
//!
//! The kernel writes, between `TRACE-DUMP-BEGIN` and `TRACE-DUMP-END`, per CPU:
//!
//! ```text
//! TRACE-DUMP cpu=N page=ID <hex>      the reader sub-buffer ID (header + committed bytes)
//! TRACE-DUMP cpu=N meta=<hex>         the meta page (struct trace_buffer_meta): ends a step
//! TRACE-DUMP cpu=N done read=R entries=E overrun=O
//! ```
//!
//! One step at the mapping, then one after each get-reader call. Replaying them in order into
//! an image of the mapping (meta page, then the sub-buffers by ID) gives a `MappedReader` here
//! the same bytes the ring-3 one read at each point, so it must read the same events: `R`, which
//! the kernel checked to be `E - O`.

use std::cell::{Cell, RefCell};

use oskit_ring_buffer::{Error, MapRegion, MappedReader};

/// Prefix of every dump line.
pub const PREFIX: &str = "TRACE-DUMP";

/// One step of what a CPU's mapped consumer was shown.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Step {
    /// Sub-buffers (ID, leading bytes) that changed.
    pages: Vec<(u32, Vec<u8>)>,
    /// The meta page's leading bytes.
    meta: Vec<u8>,
}

/// Everything dumped for one CPU.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct CpuDump {
    cpu: usize,
    steps: Vec<Step>,
    /// Pages read since the last meta line.
    pending: Vec<(u32, Vec<u8>)>,
    /// `(read, entries, overrun)` of the `done` line.
    done: Option<(u64, u64, u64)>,
}

/// The events decoded for one CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuEvents {
    /// The CPU.
    pub cpu: usize,
    /// Every event: time stamp and text.
    pub events: Vec<(u64, String)>,
    /// Lost events the reader was told about.
    pub lost: u64,
    /// Entries minus overrun, as the kernel reported them.
    pub expected: u64,
    /// `(index of the event, lost count)` for every event that came with lost events.
    pub lost_at: Vec<(usize, u64)>,
    /// The reader sub-buffers the events came from, in order, each as last seen (whole
    /// `subbuf_size` bytes): the CPU's data of a `trace.dat`.
    pub subbufs: Vec<u8>,
    /// Sub-buffer size, header included.
    pub subbuf_size: usize,
}

fn hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(|| format!("bad hex at {i}"))
        })
        .collect()
}

fn field<'a>(word: Option<&'a str>, key: &str) -> Result<&'a str, String> {
    word.and_then(|w| w.strip_prefix(key))
        .and_then(|w| w.strip_prefix('='))
        .ok_or_else(|| format!("expected `{key}=`"))
}

fn number<T: std::str::FromStr>(word: Option<&str>, key: &str) -> Result<T, String> {
    field(word, key)?
        .parse()
        .map_err(|_| format!("bad number for `{key}`"))
}

/// Picks the dump out of a serial log. `Ok(None)` when the log has none.
fn parse(log: &str) -> Result<Option<Vec<CpuDump>>, String> {
    let mut cpus: Option<Vec<CpuDump>> = None;
    let mut ended = false;
    for (n, line) in log.lines().enumerate() {
        let line = line.trim_end();
        let Some(rest) = line.strip_prefix(PREFIX) else {
            continue;
        };
        let at = |why: String| format!("trace dump, log line {}: {why}", n + 1);
        if let Some(begin) = rest.strip_prefix("-BEGIN") {
            let count: usize = number(begin.split_whitespace().next(), "cpus").map_err(at)?;
            if cpus.is_some() {
                return Err(at("a second TRACE-DUMP-BEGIN".into()));
            }
            cpus = Some(
                (0..count)
                    .map(|cpu| CpuDump {
                        cpu,
                        ..CpuDump::default()
                    })
                    .collect(),
            );
            continue;
        }
        let Some(dump) = cpus.as_mut() else {
            return Err(at("dump line before TRACE-DUMP-BEGIN".into()));
        };
        if rest == "-END" {
            ended = true;
            break;
        }
        let mut words = rest.split_whitespace();
        let cpu: usize = number(words.next(), "cpu").map_err(at)?;
        let Some(c) = dump.get_mut(cpu) else {
            return Err(at(format!("cpu {cpu} out of range")));
        };
        let word = words.next().unwrap_or("");
        if let Some(meta) = word.strip_prefix("meta=") {
            let pages = std::mem::take(&mut c.pending);
            c.steps.push(Step {
                pages,
                meta: hex(meta).map_err(at)?,
            });
        } else if word.starts_with("page=") {
            let id: u32 = number(Some(word), "page").map_err(at)?;
            let bytes = hex(words.next().unwrap_or("")).map_err(at)?;
            c.pending.push((id, bytes));
        } else if word == "done" {
            c.done = Some((
                number(words.next(), "read").map_err(at)?,
                number(words.next(), "entries").map_err(at)?,
                number(words.next(), "overrun").map_err(at)?,
            ));
        } else {
            return Err(at(format!("unknown dump line `{line}`")));
        }
    }
    match cpus {
        Some(_) if !ended => Err("trace dump: no TRACE-DUMP-END".into()),
        other => Ok(other),
    }
}

/// The image of a mapping, written by the replay while the reader reads it.
struct Image(RefCell<Vec<u8>>);

impl MapRegion for Image {
    fn len(&self) -> usize {
        self.0.borrow().len()
    }

    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), Error> {
        self.0.borrow().as_slice().read(offset, buf)
    }
}

fn le_u32(b: &[u8], at: usize) -> Result<usize, String> {
    b.get(at..at + 4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize)
        .ok_or_else(|| "meta page too short".into())
}

/// Replays one CPU's steps into a `MappedReader`.
fn replay(c: &CpuDump) -> Result<CpuEvents, String> {
    let cpu = c.cpu;
    let err = |why: String| format!("trace dump, cpu {cpu}: {why}");
    let Some(first) = c.steps.first() else {
        return Err(err("no meta page".into()));
    };
    let Some((read, entries, overrun)) = c.done else {
        return Err(err("no `done` line".into()));
    };
    // Geometry from the meta page (the reader validates it against the image).
    let meta_size = le_u32(&first.meta, 0).map_err(err)?;
    let subbuf_size = le_u32(&first.meta, 8).map_err(err)?;
    let nr_subbufs = le_u32(&first.meta, 12).map_err(err)?;
    let len = nr_subbufs
        .checked_mul(subbuf_size)
        .and_then(|s| s.checked_add(meta_size))
        .filter(|&l| l <= 1 << 30)
        .ok_or_else(|| err("impossible geometry in the meta page".into()))?;
    let image = Image(RefCell::new(vec![0; len]));
    let apply = |step: &Step| -> Result<(), Error> {
        let mut img = image.0.borrow_mut();
        for (id, bytes) in &step.pages {
            let at = meta_size + *id as usize * subbuf_size;
            if *id as usize >= nr_subbufs || bytes.len() > subbuf_size {
                return Err(Error::Corrupt);
            }
            img[at..at + subbuf_size].fill(0);
            img[at..at + bytes.len()].copy_from_slice(bytes);
        }
        if step.meta.len() > meta_size {
            return Err(Error::Corrupt);
        }
        img[..step.meta.len()].copy_from_slice(&step.meta);
        Ok(())
    };
    apply(first).map_err(|e| err(format!("first step: {e}")))?;
    let next = Cell::new(1);
    let get_reader = || {
        let i = next.get();
        // A call the ring-3 reader did not make: the replay went another way.
        let step = c.steps.get(i).ok_or(Error::Os(-1))?;
        next.set(i + 1);
        apply(step)
    };
    let mut reader =
        MappedReader::new(&image, get_reader).map_err(|e| err(format!("meta page: {e}")))?;
    let mut buf = vec![0u8; subbuf_size];
    let (mut events, mut lost, mut lost_at) = (Vec::new(), 0, Vec::new());
    // The reader sub-buffer being read (ID and its bytes as last seen), and those done.
    let (mut current, mut subbufs): (Option<(u32, Vec<u8>)>, Vec<u8>) = (None, Vec::new());
    loop {
        match reader.next_event(&mut buf) {
            Ok(Some(ev)) => {
                let text = &buf[..ev.len];
                let end = text.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
                if ev.lost > 0 {
                    lost_at.push((events.len(), ev.lost));
                }
                events.push((ev.ts, String::from_utf8_lossy(&text[..end]).into_owned()));
                lost += ev.lost;
                let id = reader.reader_id();
                if current.as_ref().map(|c| Some(c.0)) != Some(id) {
                    subbufs.extend(current.take().map(|c| c.1).unwrap_or_default());
                }
                let mut page = vec![0u8; subbuf_size];
                reader
                    .copy_subbuf(&mut page)
                    .map_err(|e| err(format!("copying a sub-buffer: {e}")))?;
                current = id.map(|id| (id, page));
            }
            Ok(None) => break,
            Err(Error::Os(-1)) => {
                return Err(err("the replay asked for more than was dumped".into()));
            }
            Err(e) => return Err(err(format!("after {} events: {e}", events.len()))),
        }
    }
    if next.get() != c.steps.len() {
        return Err(err(format!(
            "the replay used {} of {} dumped steps",
            next.get(),
            c.steps.len()
        )));
    }
    let expected = entries.saturating_sub(overrun);
    if events.len() as u64 != read || read != expected {
        return Err(err(format!(
            "decoded {} events; the ring-3 reader read {read}, entries - overrun = {expected}",
            events.len()
        )));
    }
    subbufs.extend(current.map(|c| c.1).unwrap_or_default());
    Ok(CpuEvents {
        cpu,
        events,
        lost,
        expected,
        lost_at,
        subbufs,
        subbuf_size,
    })
}

/// Writes the decoded CPUs' sub-buffers as a trace-cmd `trace.dat` at `path`.
pub fn write_trace_dat(cpus: &[CpuEvents], path: &std::path::Path) -> Result<(), String> {
    let n = cpus.iter().map(|c| c.cpu + 1).max().unwrap_or(0);
    let subbuf_size = cpus.first().map_or(4096, |c| c.subbuf_size);
    let mut data: Vec<&[u8]> = vec![&[]; n];
    for c in cpus {
        data[c.cpu] = &c.subbufs;
    }
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    oskit_ring_buffer::tracedat::write_trace_dat(file, subbuf_size, &data)
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// One line of `trace-cmd report -t`: lost events on a CPU (the count when stored), or an
/// event (CPU, time in ns, text).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reported {
    Lost(usize, Option<u64>),
    Event(usize, u64, String),
}

fn parse_report(text: &str) -> Result<Vec<Reported>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let bad = || format!("trace-cmd report: unexpected line `{line}`");
        if let Some(rest) = line.strip_prefix("CPU:") {
            // `CPU:0 [EVENTS DROPPED]` or `CPU:0 [12 EVENTS DROPPED]`
            let (cpu, rest) = rest.split_once(' ').ok_or_else(bad)?;
            let n = rest.trim_start_matches('[').split_whitespace().next();
            out.push(Reported::Lost(
                cpu.parse().map_err(|_| bad())?,
                n.and_then(|n| n.parse().ok()),
            ));
            continue;
        }
        // An event line: `COMM-PID [CPU] SECS.NANOS: SYSTEM/EVENT: text`.
        let cpu_field = line.find('[').and_then(|open| {
            let close = open + line[open..].find(']')?;
            let cpu = line[open + 1..close].trim().parse::<usize>().ok()?;
            line[..open].contains('-').then_some((cpu, close))
        });
        let Some((cpu, close)) = cpu_field else {
            // The `cpus=N` header, or a further line of an event whose text holds newlines
            // (trace-cmd prints the text as it is).
            if let Some(Reported::Event(_, _, text)) = out.last_mut() {
                text.push('\n');
                text.push_str(line);
            }
            continue;
        };
        let (ts, rest) = line[close + 1..]
            .trim_start()
            .split_once(": ")
            .ok_or_else(bad)?;
        let (secs, frac) = ts.split_once('.').ok_or_else(bad)?;
        let ns = secs.parse::<u64>().map_err(|_| bad())? * 1_000_000_000
            + frac.parse::<u64>().map_err(|_| bad())?;
        let (_, text) = rest.split_once(':').ok_or_else(bad)?;
        out.push(Reported::Event(cpu, ns, text.trim_start().to_string()));
    }
    Ok(out)
}

/// Writes the kernel's trace as `path` and checks that `trace-cmd report` lists, per CPU,
/// every event the crate's reader decoded, with the same time stamp and text, and the lost
/// events where the reader was told about them. Returns a one-line summary.
pub fn check_with_trace_cmd(cpus: &[CpuEvents], path: &std::path::Path) -> Result<String, String> {
    write_trace_dat(cpus, path)?;
    let out = std::process::Command::new("trace-cmd")
        .args(["report", "-t"])
        .arg(path)
        .output()
        .map_err(|e| format!("trace-cmd: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "trace-cmd report {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let lines = parse_report(&String::from_utf8_lossy(&out.stdout))?;
    let mut total = 0;
    for c in cpus {
        let mine: Vec<&Reported> = lines
            .iter()
            .filter(|l| matches!(l, Reported::Lost(cpu, _) | Reported::Event(cpu, _, _) if *cpu == c.cpu))
            .collect();
        let mut events = 0;
        let mut pending_lost = None;
        for l in mine {
            match l {
                Reported::Lost(_, n) => pending_lost = Some(*n),
                Reported::Event(_, ts, text) => {
                    let Some((want_ts, want_text)) = c.events.get(events) else {
                        return Err(format!(
                            "cpu {}: trace-cmd lists more events than the crate decoded",
                            c.cpu
                        ));
                    };
                    if (ts, text) != (want_ts, want_text) {
                        return Err(format!(
                            "cpu {} event {events}: trace-cmd `{ts} {text}`, the crate `{want_ts} {want_text}`",
                            c.cpu
                        ));
                    }
                    let want_lost = c.lost_at.iter().find(|l| l.0 == events).map(|l| l.1);
                    match (pending_lost.take(), want_lost) {
                        (None, None) | (Some(None), Some(_)) => {}
                        (Some(Some(n)), Some(m)) if n == m => {}
                        (got, want) => {
                            return Err(format!(
                                "cpu {} before event {events}: trace-cmd lost {got:?}, the crate {want:?}",
                                c.cpu
                            ));
                        }
                    }
                    events += 1;
                }
            }
        }
        if events != c.events.len() {
            return Err(format!(
                "cpu {}: trace-cmd lists {events} events, the crate decoded {}",
                c.cpu,
                c.events.len()
            ));
        }
        total += events;
    }
    Ok(format!(
        "trace-cmd report lists all {total} events with the crate's time stamps and text"
    ))
}

/// Decodes the trace dump of a serial log: `Ok(None)` when there is none.
pub fn decode(log: &str) -> Result<Option<Vec<CpuEvents>>, String> {
    let Some(cpus) = parse(log)? else {
        return Ok(None);
    };
    cpus.iter().map(replay).collect::<Result<_, _>>().map(Some)
}

/// Prints the last `last` events of each CPU and the counts.
pub fn print(cpus: &[CpuEvents], last: usize) {
    let total: usize = cpus.iter().map(|c| c.events.len()).sum();
    println!(
        "trace: the host decoded {total} events from the kernel's dump ({}), with the crate's MappedReader; the last {last} per CPU:",
        cpus.iter()
            .map(|c| format!("cpu{} {}", c.cpu, c.events.len()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for c in cpus {
        if c.lost > 0 {
            println!(
                "cpu={} lost={} (overwritten before the read)",
                c.cpu, c.lost
            );
        }
        for (ts, text) in &c.events[c.events.len().saturating_sub(last)..] {
            println!("cpu={} ts={ts} {text}", c.cpu);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write;

    use oskit_ring_buffer::{
        Config, LocalCpu, MapPage, Mode, RingBuffer,
        format::{COMMIT_MASK, RB_MISSED_STORED},
        sim::{ManualClock, PagePool},
    };

    use super::*;

    fn hex_of(bytes: &[u8]) -> String {
        bytes.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// What the kernel's `trace_map::dump_step` writes.
    fn dump_step<A, C>(
        rb: &RingBuffer<A, C>,
        cpu: usize,
        last: &mut Option<(u32, u64)>,
        out: &mut String,
    ) where
        A: oskit_ring_buffer::PageAlloc,
        C: oskit_ring_buffer::Clock,
    {
        let page = |p| {
            let ptr = rb.map_page(cpu, p).unwrap().unwrap();
            // SAFETY: a page of the mapping, allocated while mapped.
            unsafe { std::slice::from_raw_parts(ptr.as_ptr(), 4096) }.to_vec()
        };
        let meta = page(MapPage::Meta)[..80].to_vec();
        let id = u32::from_le_bytes(meta[24..28].try_into().unwrap());
        let sub = page(MapPage::Subbuf { id, page: 0 });
        let commit = u64::from_le_bytes(sub[8..16].try_into().unwrap());
        if *last != Some((id, commit)) {
            let stored = if commit & RB_MISSED_STORED != 0 { 8 } else { 0 };
            let used = 16 + (commit & COMMIT_MASK) as usize + stored;
            writeln!(
                out,
                "TRACE-DUMP cpu={cpu} page={id} {}",
                hex_of(&sub[..used])
            )
            .unwrap();
            *last = Some((id, commit));
        }
        writeln!(out, "TRACE-DUMP cpu={cpu} meta={}", hex_of(&meta)).unwrap();
    }

    /// Writes `n` events on CPU 1 of a real ring buffer (2 CPUs, 4 sub-buffers), consumes it
    /// through the mapping with `MappedReader` as the kernel's ring-3 reader does, dumping each
    /// step as the kernel does; returns the log and what that reader read.
    fn kernel_like_log(n: usize) -> (String, Vec<(u64, Vec<u8>)>, u64) {
        static PAGES: PagePool<64> = PagePool::new();
        let clock = ManualClock::new(1_000);
        let rb = RingBuffer::new(Config::new(2, 4).mode(Mode::Overwrite), &PAGES, &clock).unwrap();
        // SAFETY: this test thread is the only writer of CPU 1.
        let cpu1 = unsafe { LocalCpu::new(1) };
        for i in 0..n {
            // Some texts span lines and hold brackets, as a `{:#x?}` of the kernel's does.
            let text = match i % 5 {
                2 => format!(
                    "step{}: event {i} [\n    0x{i:x},\n] and 0x8000 [\n]",
                    i % 3
                ),
                _ => format!("step{}: event {i}", i % 3),
            };
            rb.write(cpu1, text.as_bytes()).unwrap();
            clock.advance(7);
        }
        let stats = rb.stats(1).unwrap();
        let mut log = String::from("boot\nTRACE-DUMP-BEGIN cpus=2\n");
        let mut read = Vec::new();
        for cpu in 0..2 {
            rb.map(cpu).unwrap();
            let mut last = None;
            let out = RefCell::new(String::new());
            dump_step(&rb, cpu, &mut last, &mut out.borrow_mut());
            let last = RefCell::new(last);
            let view = rb.mapped_view(cpu).unwrap();
            let get = || {
                rb.map_get_reader(cpu)?;
                dump_step(&rb, cpu, &mut last.borrow_mut(), &mut out.borrow_mut());
                Ok(())
            };
            let mut reader = MappedReader::new(view, get).unwrap();
            let mut buf = [0u8; 4096];
            let mut count = 0;
            while let Some(ev) = reader.next_event(&mut buf).unwrap() {
                read.push((ev.ts, buf[..ev.len].to_vec()));
                count += 1;
            }
            rb.unmap(cpu).unwrap();
            let s = rb.stats(cpu).unwrap();
            log.push_str(&out.into_inner());
            writeln!(
                log,
                "TRACE-DUMP cpu={cpu} done read={count} entries={} overrun={}",
                s.entries, s.overrun
            )
            .unwrap();
        }
        log.push_str("TRACE-DUMP-END\nsummary\n");
        (log, read, stats.overrun)
    }

    #[test]
    fn decodes_what_the_ring3_reader_read() {
        for n in [0, 5, 200, 2000] {
            let (log, read, overrun) = kernel_like_log(n);
            let cpus = decode(&log).unwrap().expect("a dump");
            assert_eq!(cpus.len(), 2);
            assert!(cpus[0].events.is_empty());
            let c = &cpus[1];
            assert_eq!(c.events.len(), read.len(), "n = {n}");
            assert_eq!(c.expected, read.len() as u64);
            assert_eq!(c.lost, overrun);
            for ((ts, text), (rts, raw)) in c.events.iter().zip(&read) {
                assert_eq!(ts, rts);
                assert!(raw.starts_with(text.as_bytes()));
            }
            if n == 2000 {
                assert!(overrun > 0, "the ring wrapped");
                assert_eq!(c.events.last().unwrap().1, "step1: event 1999");
            }
        }
    }

    /// The `trace.dat` of a dump, lost events included, reads back through the real
    /// trace-cmd as the crate decoded it (skipped without trace-cmd).
    #[test]
    fn trace_cmd_reports_what_the_crate_decoded() {
        if std::process::Command::new("trace-cmd").output().is_err() {
            return println!("skipped: trace-cmd not installed");
        }
        for n in [5, 2000] {
            let (log, _, overrun) = kernel_like_log(n);
            let cpus = decode(&log).unwrap().expect("a dump");
            assert_eq!(cpus[1].lost, overrun);
            let dir = std::env::temp_dir().join(format!("oskit-xtask-dat-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{n}.dat"));
            let summary = check_with_trace_cmd(&cpus, &path);
            let _ = std::fs::remove_dir_all(&dir);
            let summary = summary.unwrap();
            assert!(summary.contains(&format!("all {} events", cpus[1].events.len())));
            // A trace with a changed event does not pass.
            let mut wrong = cpus.clone();
            if let Some(e) = wrong[1].events.last_mut() {
                e.1.push('!');
            }
            let path =
                std::env::temp_dir().join(format!("oskit-xtask-bad-{}.dat", std::process::id()));
            let res = check_with_trace_cmd(&wrong, &path);
            let _ = std::fs::remove_file(&path);
            assert!(res.is_err());
        }
    }

    #[test]
    fn no_dump_and_broken_dumps() {
        assert_eq!(decode("boot\ncheck x ... ok\n").unwrap(), None);
        let (log, _, _) = kernel_like_log(50);
        // Cut before the end marker.
        let cut = &log[..log.find("TRACE-DUMP-END").unwrap()];
        assert!(decode(cut).unwrap_err().contains("no TRACE-DUMP-END"));
        // A flipped count.
        let bad = log.replace("done read=50", "done read=49");
        assert!(decode(&bad).unwrap_err().contains("decoded 50 events"));
        // A lost step: the replay runs out.
        let mut lines: Vec<&str> = log.lines().collect();
        let metas: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].starts_with("TRACE-DUMP cpu=1 meta="))
            .collect();
        lines.remove(metas[1]);
        assert!(decode(&lines.join("\n")).is_err());
        // Garbage.
        assert!(decode("TRACE-DUMP-BEGIN cpus=1\nTRACE-DUMP cpu=0 page=0 zz\n").is_err());
        assert!(decode("TRACE-DUMP cpu=0 meta=00\n").is_err());
        assert!(decode("TRACE-DUMP-BEGIN cpus=1\nTRACE-DUMP cpu=3 meta=00\n").is_err());
    }
}
