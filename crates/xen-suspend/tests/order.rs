//! do_suspend runs its steps in the seed's order: checked with recording implementations of
//! every trait, independent of the software host.

use std::cell::RefCell;

use oskit_xen_suspend::events::EventStorage;
use oskit_xen_suspend::hal::*;
use oskit_xen_suspend::{Machine, Outcome};

#[derive(Default)]
struct Log {
    events: RefCell<Vec<String>>,
    result: Option<SuspendResult>,
    frames: RefCell<StartInfoFrames>,
    next_port: RefCell<u32>,
    roots: RefCell<Vec<RootState>>,
}

#[derive(Clone, Copy)]
struct Rec<'a>(&'a Log);

impl Rec<'_> {
    fn push(&self, s: impl Into<String>) {
        self.0.events.borrow_mut().push(s.into());
    }
}

impl Freezer for Rec<'_> {
    type Error = Errno;
    fn freeze(&mut self) -> Result<(), Errno> {
        self.push("freeze");
        Ok(())
    }
    fn thaw(&mut self) {
        self.push("thaw");
    }
}
impl Devices for Rec<'_> {
    type Error = Errno;
    fn suspend(&mut self) -> Result<(), Errno> {
        self.push("devices.suspend");
        Ok(())
    }
    fn resume(&mut self) {
        self.push("devices.resume");
    }
}
impl XenBus for Rec<'_> {
    fn suspend(&mut self) {
        self.push("xenbus.suspend");
    }
    fn resume(&mut self) {
        self.push("xenbus.resume");
    }
    fn suspend_cancel(&mut self) {
        self.push("xenbus.suspend_cancel");
    }
}
impl StopMachine for Rec<'_> {
    type Error = Errno;
    fn stop_machine<R>(&mut self, f: impl FnOnce() -> R) -> Result<R, Errno> {
        self.push("stop");
        let r = f();
        self.push("restart");
        Ok(r)
    }
}
impl P2m for Rec<'_> {
    fn pfn_to_mfn(&self, pfn: u64) -> Option<u64> {
        Some(pfn + 1000)
    }
    fn mfn_to_pfn(&self, mfn: u64) -> Option<u64> {
        mfn.checked_sub(1000)
    }
}
impl PageTables for Rec<'_> {
    type Error = Errno;
    fn switch_to_kernel_root(&mut self) {
        self.push("kernel_root");
    }
    fn root_count(&self) -> usize {
        self.0.roots.borrow().len()
    }
    fn root(&self, index: usize) -> RootState {
        self.0.roots.borrow()[index]
    }
    fn pin(&mut self, index: usize) -> Result<(), Errno> {
        self.push(format!("pin {index}"));
        self.0.roots.borrow_mut()[index].pinned = true;
        Ok(())
    }
    fn unpin(&mut self, index: usize) -> Result<(), Errno> {
        self.push(format!("unpin {index}"));
        self.0.roots.borrow_mut()[index].pinned = false;
        Ok(())
    }
    fn set_save_pinned(&mut self, index: usize, mark: bool) {
        self.push(format!("save_pinned {index} {mark}"));
        self.0.roots.borrow_mut()[index].save_pinned = mark;
    }
}
impl GrantTable for Rec<'_> {
    type Error = Errno;
    fn suspend(&mut self) -> Result<(), Errno> {
        self.push("grant.suspend");
        Ok(())
    }
    fn resume(&mut self) -> Result<(), Errno> {
        self.push("grant.resume");
        Ok(())
    }
}
impl Time for Rec<'_> {
    fn suspend(&mut self) {
        self.push("time.suspend");
    }
    fn resume(&mut self) {
        self.push("time.resume");
    }
}
impl Console for Rec<'_> {
    type Error = Errno;
    fn resume(&mut self) -> Result<(), Errno> {
        self.push("console.resume");
        Ok(())
    }
}
impl Hypervisor for Rec<'_> {
    type Error = Errno;
    fn bind_virq(&mut self, virq: u32, vcpu: u32) -> Result<u32, Errno> {
        let mut p = self.0.next_port.borrow_mut();
        *p += 1;
        self.push(format!("bind_virq {virq} {vcpu} -> {}", *p));
        Ok(*p)
    }
    fn bind_ipi(&mut self, vcpu: u32) -> Result<u32, Errno> {
        let mut p = self.0.next_port.borrow_mut();
        *p += 1;
        self.push(format!("bind_ipi {vcpu} -> {}", *p));
        Ok(*p)
    }
    fn mask(&mut self, port: u32) {
        self.push(format!("mask {port}"));
    }
    fn close(&mut self, port: u32) -> Result<(), Errno> {
        self.push(format!("close {port}"));
        Ok(())
    }
    fn max_ports(&self) -> usize {
        4096
    }
    fn unmask(&mut self, port: u32) -> Result<(), Errno> {
        self.push(format!("unmask {port}"));
        Ok(())
    }
    fn suspend(&mut self) -> Result<SuspendResult, Errno> {
        self.push("HYPERCALL");
        Ok(self.0.result.unwrap())
    }
    fn update_va_mapping(&mut self, va: u64, pte: u64, _flags: u64) -> Result<(), Errno> {
        self.push(format!("update_va_mapping {va:#x} {pte}"));
        Ok(())
    }
    fn start_info_frames(&self) -> StartInfoFrames {
        *self.0.frames.borrow()
    }
    fn set_start_info_frames(&mut self, f: StartInfoFrames) {
        self.push(format!("start_info {} {}", f.store, f.console));
        *self.0.frames.borrow_mut() = f;
    }
    fn shared_info_va(&self) -> u64 {
        0x5000
    }
    fn use_dummy_shared_info(&mut self) {
        self.push("dummy_shared_info");
    }
    fn setup_shared_info(&mut self) -> Result<(), Errno> {
        self.push("setup_shared_info");
        Ok(())
    }
    fn reset_cpu_map(&mut self) {
        self.push("reset_cpu_map");
    }
}

impl EventDelivery for Rec<'_> {
    type Error = Errno;
    fn set_callback(&mut self) -> Result<(), Errno> {
        self.push("set_callback");
        Ok(())
    }
    fn register_vcpu_info(&mut self, vcpu: u32) -> Result<(), Errno> {
        self.push(format!("register_vcpu_info {vcpu}"));
        Ok(())
    }
    fn reread_channels(&mut self) -> Result<(), Errno> {
        self.push("reread_channels");
        Ok(())
    }
}

struct RecPlatform<'a>(std::marker::PhantomData<&'a ()>);

impl<'a> Platform for RecPlatform<'a> {
    type Freezer = Rec<'a>;
    type Devices = Rec<'a>;
    type XenBus = Rec<'a>;
    type Stop = Rec<'a>;
    type P2m = Rec<'a>;
    type PageTables = Rec<'a>;
    type Grants = Rec<'a>;
    type Time = Rec<'a>;
    type Console = Rec<'a>;
    type Hypervisor = Rec<'a>;
}

/// Every mask is recorded; a run of consecutive ports collapses to one `mask a..b` line so the
/// expected sequences stay readable (the range is exact: a gap or a missing port shows).
fn collapse_masks(log: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(u32, u32)> = None;
    let flush = |out: &mut Vec<String>, run: &mut Option<(u32, u32)>| {
        if let Some((a, b)) = run.take() {
            out.push(format!("mask {a}..{}", b + 1));
        }
    };
    for line in log {
        if let Some(port) = line
            .strip_prefix("mask ")
            .and_then(|p| p.parse::<u32>().ok())
        {
            match run {
                Some((a, b)) if port == b + 1 => run = Some((a, port)),
                _ => {
                    flush(&mut out, &mut run);
                    run = Some((port, port));
                }
            }
        } else {
            flush(&mut out, &mut run);
            out.push(line);
        }
    }
    flush(&mut out, &mut run);
    out
}

fn run(result: SuspendResult) -> (Outcome, Vec<String>) {
    let log = Log {
        result: Some(result),
        frames: RefCell::new(StartInfoFrames {
            store: 1007,
            console: 1008,
        }),
        roots: RefCell::new(vec![
            RootState {
                pinned: true,
                save_pinned: false,
            },
            RootState::default(),
            RootState {
                pinned: true,
                save_pinned: false,
            },
            RootState::default(),
        ]),
        ..Log::default()
    };
    let r = Rec(&log);
    let mut storage = EventStorage::<2, 8, 16>::new();
    let mut ch = storage.channels();
    let mut hv = r;
    ch.bind_virq(&mut hv, 0, 1).unwrap();
    ch.bind_ipi(&mut hv, 3, 0).unwrap();
    log.events.borrow_mut().clear();
    let mut m = Machine::<RecPlatform<'_>> {
        freezer: r,
        devices: r,
        xenbus: r,
        stop: r,
        p2m: r,
        page_tables: r,
        grants: r,
        time: r,
        console: r,
        hypervisor: r,
    };
    let outcome = m.suspend(&mut ch).unwrap();
    (outcome, collapse_masks(log.events.take()))
}

const BEFORE: &[&str] = &[
    "freeze",
    "devices.suspend",
    "xenbus.suspend",
    "stop",
    "kernel_root",
    "pin 1",
    "save_pinned 1 true",
    "pin 3",
    "save_pinned 3 true",
    "grant.suspend",
    "time.suspend",
    "start_info 7 8",
    "dummy_shared_info",
    "update_va_mapping 0x5000 0",
    "HYPERCALL",
];

#[test]
fn resumed_suspend_runs_in_the_seeds_order() {
    let (outcome, log) = run(SuspendResult::Resumed);
    assert_eq!(outcome, Outcome::Resumed);
    let after = [
        "reset_cpu_map",
        "setup_shared_info",
        // A new domain delivers nothing until the callback and every vCPU's vcpu_info are
        // set up again; the store and console channels may have moved.
        "set_callback",
        "register_vcpu_info 0",
        "register_vcpu_info 1",
        "reread_channels",
        "time.resume",
        "grant.resume",
        "unpin 1",
        "save_pinned 1 false",
        "unpin 3",
        "save_pinned 3 false",
        // The whole hypervisor port space (4096), not the table's 16 ports; then CPU 0
        // first: IPI 3; then CPU 1: VIRQ 0.
        "mask 0..4096",
        "bind_ipi 0 -> 3",
        "unmask 3",
        "bind_virq 0 1 -> 4",
        "unmask 4",
        "console.resume",
        "restart",
        "xenbus.resume",
        "devices.resume",
        "thaw",
    ];
    let expected: Vec<&str> = BEFORE.iter().copied().chain(after).collect();
    assert_eq!(log, expected);
}

#[test]
fn cancelled_suspend_runs_in_the_seeds_order() {
    let (outcome, log) = run(SuspendResult::Cancelled);
    assert_eq!(outcome, Outcome::Cancelled);
    let after = [
        "start_info 1007 1008",
        "setup_shared_info",
        "time.resume",
        "grant.resume",
        "unpin 1",
        "save_pinned 1 false",
        "unpin 3",
        "save_pinned 3 false",
        "restart",
        "xenbus.suspend_cancel",
        "devices.resume",
        "thaw",
    ];
    let expected: Vec<&str> = BEFORE.iter().copied().chain(after).collect();
    assert_eq!(log, expected);
}
