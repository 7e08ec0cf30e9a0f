//! Writes any buffer as a trace-cmd `trace.dat`: here a 2-CPU buffer of text events, CPU 0
//! overwritten so some are lost; every sub-buffer is taken out with `read_page` (Linux's
//! `trace_pipe_raw` path) and handed to `tracedat::write_trace_dat` unchanged. Prints the
//! path; `trace-cmd report PATH` lists the events.
//!
//! `trace-dat [PATH]` (default `trace.dat` in the current directory)

use oskit_ring_buffer::{
    Config, LocalCpu, Mode, RingBuffer,
    sim::{CountingClock, PagePool},
    tracedat::write_trace_dat,
};

const CONFIG: Config = Config::new(2, 4).mode(Mode::Overwrite);
static PAGES: PagePool<{ CONFIG.pages_needed() + 1 }> = PagePool::new();

fn main() -> std::io::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "trace.dat".into());
    let rb = RingBuffer::new(CONFIG, &PAGES, CountingClock::new(1000)).expect("pages");
    for cpu in 0..2 {
        // SAFETY: this thread is the only writer of each CPU, one after the other.
        let here = unsafe { LocalCpu::new(cpu) };
        let n = if cpu == 0 { 2000 } else { 20 };
        for i in 0..n {
            let text = format!("hello {i} from cpu{cpu}");
            rb.write(here, text.as_bytes()).expect("write");
        }
    }
    let mut page = rb.alloc_read_page().expect("spare page");
    let mut cpus = vec![Vec::new(); rb.cpus()];
    for (cpu, data) in cpus.iter_mut().enumerate() {
        while rb
            .read_page(cpu, &mut page, false)
            .expect("read_page")
            .is_some()
        {
            data.extend_from_slice(page.as_bytes());
        }
    }
    rb.free_read_page(page);
    let slices: Vec<&[u8]> = cpus.iter().map(Vec::as_slice).collect();
    write_trace_dat(std::fs::File::create(&path)?, rb.subbuf_size(), &slices)?;
    println!("{path}");
    Ok(())
}
