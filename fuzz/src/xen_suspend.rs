//! Harnesses of `oskit-xen-suspend`.

use oskit_xen_suspend::hal::{Cpuid, XEN_SIGNATURE, find_xen_base};

/// Arbitrary CPUID leaves: Xen detection never panics, and a base it reports really carries
/// Xen's signature and enough leaves.
pub fn cpuid(data: &[u8]) {
    struct Table(Vec<(u32, [u32; 4])>);
    impl Cpuid for Table {
        fn cpuid(&self, leaf: u32) -> [u32; 4] {
            self.0
                .iter()
                .find(|(l, _)| *l == leaf)
                .map_or([0; 4], |(_, r)| *r)
        }
    }
    let words: Vec<u32> = crate::words(data).collect();
    // Each entry: a base index (0..=0xff, so the scan can find it) and four registers.
    let table = Table(
        words
            .chunks_exact(5)
            .map(|w| {
                (
                    0x4000_0000 + (w[0] & 0xff) * 0x100,
                    [w[1], w[2], w[3], w[4]],
                )
            })
            .collect(),
    );
    if let Some(base) = find_xen_base(&table) {
        let [max, b, c, d] = table.cpuid(base);
        let sig: Vec<u8> = [b, c, d].iter().flat_map(|r| r.to_le_bytes()).collect();
        assert_eq!(sig, XEN_SIGNATURE, "reported base {base:#x} is not Xen's");
        assert!(
            max >= base + 2,
            "reported base {base:#x} has too few leaves"
        );
    }
}

use oskit_xen_suspend::events::{EventStorage, IrqKind};
use oskit_xen_suspend::hal::RootState;
use oskit_xen_suspend::shutdown::{
    Handled, Parsed, Request, SHUTDOWN_PATH, ShutdownActions, ShutdownHandler, State, parse_request,
};
use oskit_xen_suspend::sim::{
    Fault, MAX_VALUE, SimConfig, SimPageTables, SimPlan, SimStore, SimXen, Violations,
};
use oskit_xen_suspend::{Error, Outcome};

/// A `control/shutdown` value: parsing never panics and recognises exactly the four requests
/// (up to the first NUL); the handler acknowledges and acts on exactly those.
pub fn request(data: &[u8]) {
    let parsed = parse_request(data);
    let cstr = data.split(|&b| b == 0).next().unwrap_or(&[]);
    let expected = match cstr {
        b"" => Parsed::Empty,
        b"poweroff" => Parsed::Request(Request::Poweroff),
        b"halt" => Parsed::Request(Request::Halt),
        b"reboot" => Parsed::Request(Request::Reboot),
        b"suspend" => Parsed::Request(Request::Suspend),
        b"crash" => Parsed::Crash,
        _ => Parsed::Unknown,
    };
    assert_eq!(parsed, expected, "{data:?}");

    if data.len() > MAX_VALUE {
        return;
    }
    #[derive(Default)]
    struct Count {
        acted: usize,
        ignored: usize,
    }
    impl ShutdownActions for Count {
        fn shutdown(&mut self, _: Request) {
            self.acted += 1;
        }
        fn suspend(&mut self) -> Result<Outcome, Error> {
            self.acted += 1;
            Ok(Outcome::Cancelled)
        }
        fn sysrq(&mut self, _: u8) {}
        fn ignored(&mut self, _: &[u8]) {
            self.ignored += 1;
        }
    }
    let mut store = SimStore::<4>::new();
    store.set(SHUTDOWN_PATH, data).expect("fits");
    let handler = ShutdownHandler::new();
    let mut count = Count::default();
    let handled = handler
        .handle_shutdown(&mut store, &mut count)
        .expect("store works");
    let left = store.get(SHUTDOWN_PATH).expect("node stays");
    match expected {
        Parsed::Request(r) => {
            assert_eq!(left, b"", "recognised request not acknowledged");
            assert_eq!(count.acted, 1);
            if r == Request::Suspend {
                assert_eq!(handled, Handled::Suspended(Outcome::Cancelled));
                assert_eq!(handler.state(), State::Idle);
            } else {
                assert_eq!(handled, Handled::Shutdown(r));
                assert_eq!(handler.state(), State::ShuttingDown);
            }
        }
        Parsed::Empty => assert_eq!(handled, Handled::Nothing),
        Parsed::Crash | Parsed::Unknown => {
            assert_eq!(left, data, "ignored request was touched");
            assert_eq!((count.acted, count.ignored), (0, 1));
            assert_eq!(handler.state(), State::Idle);
        }
    }
}

const CPUS: usize = 4;
const PORTS: usize = 128;

/// A fault-injection schedule: suspend cycles with faults at arbitrary steps. Whatever fails,
/// the guest ends running and thawed, the error names the first injected fault, the host sees
/// no violation at any hypercall, and a clean suspend afterwards restores everything.
pub fn faults(data: &[u8]) {
    let mut bytes = data.iter().copied();
    let mut next = move || bytes.next().unwrap_or(0);

    let host = SimXen::<CPUS, PORTS>::new(SimConfig {
        nr_pages: 0x1000,
        grant_frames: 2,
        max_grant_frames: 4,
    });
    let mut storage = Box::new(EventStorage::<CPUS, 64, PORTS>::new());
    let mut hv = host.guest();
    let shape = next();
    {
        let mut ch = storage.channels();
        for cpu in 0..CPUS as u32 {
            if shape & (1 << cpu) != 0 {
                ch.bind_virq(&mut hv, 0, cpu).expect("bind");
                ch.bind_ipi(&mut hv, 0, cpu).expect("bind");
            }
            if shape & (0x10 << cpu) != 0 {
                ch.bind_ipi(&mut hv, 1, cpu).expect("bind");
            }
        }
        if next() & 1 != 0 {
            ch.bind_virq(&mut hv, 1, 0).expect("bind");
        }
    }
    let pins = next();
    let mut roots: Vec<RootState> = (0..(next() % 12))
        .map(|i| RootState {
            pinned: pins & (1 << (i % 8)) != 0,
            save_pinned: false,
        })
        .collect();

    let cycles = 1 + next() % 4;
    // Whether an earlier fault may have left damage (a dead binding, a stale console) that
    // only a successful restore repairs.
    let mut damaged = false;
    for _ in 0..cycles {
        let ctl = next();
        host.set_plan(if ctl & 1 != 0 {
            SimPlan::Cancel
        } else {
            SimPlan::Resume
        });
        let nfaults = (ctl >> 1) % 4;
        let plan: Vec<(Fault, u32)> = (0..nfaults)
            .map(|_| {
                let b = next();
                (
                    Fault::ALL[usize::from(b % Fault::ALL.len() as u8)],
                    1 + u32::from(b >> 5),
                )
            })
            .collect();
        host.set_faults(&plan);
        let generation = host.generation();
        let result = {
            let guest = host.guest();
            let mut pt = SimPageTables::new(guest, &mut roots);
            let mut ch = storage.channels();
            pt.machine(guest).suspend(&mut ch)
        };
        let outcome = match (host.fired(), result) {
            (None, Ok(outcome)) => outcome,
            (
                Some(f),
                Err(Error::Suspend {
                    step,
                    errno,
                    outcome,
                }),
            ) => {
                assert_eq!((step, errno), (f.step(), f.errno()), "{plan:?}");
                outcome
            }
            (fired, result) => panic!("fired {fired:?} but {result:?} ({plan:?})"),
        };
        assert_eq!(
            host.generation() != generation,
            outcome == Outcome::Resumed,
            "{plan:?}"
        );
        assert_eq!(host.hypercall_violations(), Violations::NONE, "{plan:?}");
        let audit = host.audit(&storage.channels(), &roots);
        let never = Violations::TASKS_FROZEN
            | Violations::DEVICES_SUSPENDED
            | Violations::XENBUS_STALE
            | Violations::TIME_STOPPED
            | Violations::CPUS_STOPPED;
        assert_eq!(Violations(audit.0 & never.0), Violations::NONE, "{plan:?}");
        // A clean restore repairs everything; any fault may leave damage behind.
        if host.fired().is_some() {
            damaged = true;
        } else if outcome == Outcome::Resumed {
            damaged = false;
        }
        if !damaged {
            assert!(audit.is_empty(), "{plan:?}: {audit:?}");
        }
    }

    // A clean restore repairs whatever the faults left behind.
    host.set_faults(&[]);
    host.set_plan(SimPlan::Resume);
    let result = {
        let guest = host.guest();
        let mut pt = SimPageTables::new(guest, &mut roots);
        let mut ch = storage.channels();
        pt.machine(guest).suspend(&mut ch)
    };
    assert_eq!(result, Ok(Outcome::Resumed));
    let ch = storage.channels();
    assert!(host.audit(&ch, &roots).is_empty());
    for (irq, info) in ch.bindings() {
        let port = match info.kind {
            IrqKind::Virq => host.raise_virq(info.cpu, info.index),
            IrqKind::Ipi => host.send_ipi(info.port).map(|_| info.port),
            IrqKind::Free => None,
        };
        assert_eq!(port.and_then(|p| ch.irq_for_port(p)), Some(irq));
    }
}

/// Arbitrary bytes in the shared xenstore page and arbitrary server behaviour: the ring
/// client returns a value or a typed error for every request, never panics or reads out of
/// bounds, and never reports a reply longer than `XENSTORE_PAYLOAD_MAX`.
pub fn xenstore_ring(data: &[u8]) {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU32, Ordering};

    use oskit_xen_suspend::hal::{Errno, XenStore};
    use oskit_xen_suspend::xenstore::wire::PAYLOAD_MAX;
    use oskit_xen_suspend::xenstore::{StoreChannel, XsClient, ring::Ring};

    const PAGE_BYTES: usize = 2076;
    let (init, script) = data.split_at(data.len().min(PAGE_BYTES));
    let page: Box<[AtomicU32; 1024]> = Box::new(std::array::from_fn(|_| AtomicU32::new(0)));
    for (i, w) in crate::words(init).enumerate() {
        page[i].store(w, Ordering::Relaxed);
    }

    /// xenstored as the script says: each wait runs one step.
    struct Server<'a> {
        page: &'a [AtomicU32; 1024],
        script: &'a [u8],
        at: Cell<usize>,
    }
    impl StoreChannel for &Server<'_> {
        type Error = Errno;
        fn notify(&mut self) {}
        fn wait(&mut self) -> Result<(), Errno> {
            let at = self.at.get();
            let Some(&op) = self.script.get(at) else {
                return Err(Errno(110));
            };
            let n = usize::from(*self.script.get(at + 1).unwrap_or(&0));
            let bytes = self
                .script
                .get(at + 2..(at + 2 + n).min(self.script.len()))
                .unwrap_or(&[]);
            self.at.set(at + 2 + bytes.len());
            match op % 4 {
                // Reply bytes at rsp_prod.
                0 => {
                    let mut prod = self.page[515].load(Ordering::Relaxed);
                    for &b in bytes {
                        let at = 1024 + (prod as usize & 1023);
                        let w = &self.page[at / 4];
                        let s = (at % 4) * 8;
                        let old = w.load(Ordering::Relaxed);
                        w.store(
                            (old & !(0xff << s)) | (u32::from(b) << s),
                            Ordering::Relaxed,
                        );
                        prod = prod.wrapping_add(1);
                    }
                    self.page[515].store(prod, Ordering::Release);
                }
                // Scribble an index or control word.
                1 => {
                    let v = crate::words(bytes).next().unwrap_or(0);
                    self.page[512 + usize::from(op / 4) % 7].store(v, Ordering::Release);
                }
                // Consume every request.
                2 => {
                    let prod = self.page[513].load(Ordering::Acquire);
                    self.page[512].store(prod, Ordering::Release);
                }
                _ => {}
            }
            Ok(())
        }
    }

    let server = Server {
        page: &page,
        script,
        at: Cell::new(0),
    };
    let mut xs = XsClient::<_, 2>::new(Ring::new(&page), &server);
    let mut buf = [0u8; 64];
    for round in 0..16u32 {
        if server.at.get() >= script.len() {
            break;
        }
        match round % 8 {
            0 => {
                if let Ok(n) = xs.read(0, "control/shutdown", &mut buf) {
                    assert!(n <= PAYLOAD_MAX, "reply of {n} bytes");
                }
            }
            1 => drop(xs.write(0, "control/shutdown", b"")),
            2 => drop(xs.start().and_then(|t| xs.end(t, false))),
            3 => drop(xs.watch("control/shutdown", "t")),
            4 => drop(xs.poll()),
            5 => {
                if let Ok(n) = xs.directory(0, "device", &mut buf) {
                    assert!(n <= PAYLOAD_MAX);
                }
            }
            6 => drop(xs.resume()),
            _ => {
                let (mut p, mut t) = ([0u8; 8], [0u8; 4]);
                while let Some((pl, tl)) = xs.next_event(&mut p, &mut t) {
                    assert!(pl <= PAYLOAD_MAX && tl <= PAYLOAD_MAX);
                }
            }
        }
    }
}
