//! The control/shutdown and control/sysrq watches.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use oskit_xen_suspend::hal::{Errno, Transaction, XenStore};
use oskit_xen_suspend::shutdown::{
    FEATURES, Handled, Parsed, Request, SHUTDOWN_PATH, SYSRQ_PATH, ShutdownActions,
    ShutdownHandler, State, parse_request,
};
use oskit_xen_suspend::sim::SimStore;
use oskit_xen_suspend::{Error, Outcome};

type Store = SimStore<16>;

#[derive(Default)]
struct Actions {
    shutdowns: Vec<Request>,
    suspends: usize,
    sysrqs: Vec<u8>,
    ignored: Vec<Vec<u8>>,
}

impl ShutdownActions for Actions {
    fn shutdown(&mut self, request: Request) {
        self.shutdowns.push(request);
    }
    fn suspend(&mut self) -> Result<Outcome, Error> {
        self.suspends += 1;
        Ok(Outcome::Resumed)
    }
    fn sysrq(&mut self, key: u8) {
        self.sysrqs.push(key);
    }
    fn ignored(&mut self, value: &[u8]) {
        self.ignored.push(value.to_vec());
    }
}

fn store_with(value: &[u8]) -> Store {
    let mut s = Store::new();
    s.set(SHUTDOWN_PATH, value).unwrap();
    s
}

#[test]
fn parses_exactly_the_four_requests() {
    let cases: &[(&[u8], Parsed)] = &[
        (b"poweroff", Parsed::Request(Request::Poweroff)),
        (b"halt", Parsed::Request(Request::Halt)),
        (b"reboot", Parsed::Request(Request::Reboot)),
        (b"suspend", Parsed::Request(Request::Suspend)),
        (b"suspend\0trailing", Parsed::Request(Request::Suspend)),
        (b"crash", Parsed::Crash),
        (b"", Parsed::Empty),
        (b"\0suspend", Parsed::Empty),
        (b"Suspend", Parsed::Unknown),
        (b"suspend ", Parsed::Unknown),
        (b"suspen", Parsed::Unknown),
        (b"reboot\n", Parsed::Unknown),
        (b"\xff\xfe", Parsed::Unknown),
    ];
    for (value, parsed) in cases {
        assert_eq!(parse_request(value), *parsed, "{value:?}");
    }
}

#[test]
fn recognised_requests_are_acknowledged_and_acted_on() {
    for (value, request) in [
        (&b"poweroff"[..], Request::Poweroff),
        (b"halt", Request::Halt),
        (b"reboot", Request::Reboot),
    ] {
        let h = ShutdownHandler::new();
        let mut store = store_with(value);
        let mut a = Actions::default();
        assert_eq!(
            h.handle_shutdown(&mut store, &mut a),
            Ok(Handled::Shutdown(request))
        );
        assert_eq!(store.get(SHUTDOWN_PATH), Some(&b""[..]), "acknowledged");
        assert_eq!(a.shutdowns, [request]);
        assert_eq!(h.state(), State::ShuttingDown);
    }
    let h = ShutdownHandler::new();
    let mut store = store_with(b"suspend");
    let mut a = Actions::default();
    assert_eq!(
        h.handle_shutdown(&mut store, &mut a),
        Ok(Handled::Suspended(Outcome::Resumed))
    );
    assert_eq!(store.get(SHUTDOWN_PATH), Some(&b""[..]));
    assert_eq!(a.suspends, 1);
    assert_eq!(h.state(), State::Idle, "ready for the next request");
}

#[test]
fn crash_and_unknown_requests_are_logged_not_acknowledged() {
    for value in [&b"crash"[..], b"explode", b"suspendsuspendsuspend"] {
        let h = ShutdownHandler::new();
        let mut store = store_with(value);
        let mut a = Actions::default();
        let r = h.handle_shutdown(&mut store, &mut a).unwrap();
        assert!(matches!(r, Handled::Ignored(_)), "{r:?}");
        assert_eq!(store.get(SHUTDOWN_PATH), Some(value), "left alone");
        assert_eq!(a.ignored.len(), 1);
        assert!(value.starts_with(&a.ignored[0]));
        assert!(a.shutdowns.is_empty() && a.suspends == 0);
        assert_eq!(h.state(), State::Idle);
    }
}

#[test]
fn empty_or_absent_node_does_nothing() {
    let h = ShutdownHandler::new();
    let mut a = Actions::default();
    assert_eq!(
        h.handle_shutdown(&mut store_with(b""), &mut a),
        Ok(Handled::Nothing)
    );
    assert_eq!(
        h.handle_shutdown(&mut Store::new(), &mut a),
        Ok(Handled::Nothing)
    );
    assert_eq!(h.state(), State::Idle);
}

#[test]
fn requests_during_a_shutdown_are_ignored_until_finished() {
    let h = ShutdownHandler::new();
    let mut store = store_with(b"poweroff");
    let mut a = Actions::default();
    h.handle_shutdown(&mut store, &mut a).unwrap();
    for value in [&b"reboot"[..], b"suspend", b"poweroff"] {
        store.set(SHUTDOWN_PATH, value).unwrap();
        assert_eq!(h.handle_shutdown(&mut store, &mut a), Ok(Handled::Busy));
        assert_eq!(store.get(SHUTDOWN_PATH), Some(value), "not acknowledged");
    }
    assert_eq!(a.shutdowns, [Request::Poweroff]);
    h.finish();
    assert_eq!(
        h.handle_shutdown(&mut store, &mut a),
        Ok(Handled::Shutdown(Request::Poweroff))
    );
}

#[test]
fn repeated_suspend_requests_each_suspend_once() {
    let h = ShutdownHandler::new();
    let mut store = Store::new();
    let mut a = Actions::default();
    for i in 1..=5 {
        store.set(SHUTDOWN_PATH, b"suspend").unwrap();
        assert_eq!(
            h.handle_shutdown(&mut store, &mut a),
            Ok(Handled::Suspended(Outcome::Resumed))
        );
        // The watch fires again for our own acknowledgement: nothing to do.
        assert_eq!(h.handle_shutdown(&mut store, &mut a), Ok(Handled::Nothing));
        assert_eq!(a.suspends, i);
    }
}

/// A store shared by reference within one thread; each access borrows it.
struct Local<'a>(&'a RefCell<Store>);

impl XenStore for Local<'_> {
    type Error = Errno;
    fn start(&mut self) -> Result<Transaction, Errno> {
        self.0.borrow_mut().start()
    }
    fn end(&mut self, txn: Transaction, abort: bool) -> Result<(), Errno> {
        self.0.borrow_mut().end(txn, abort)
    }
    fn read(&mut self, txn: Transaction, path: &str, buf: &mut [u8]) -> Result<usize, Errno> {
        self.0.borrow_mut().read(txn, path, buf)
    }
    fn write(&mut self, txn: Transaction, path: &str, value: &[u8]) -> Result<(), Errno> {
        self.0.borrow_mut().write(txn, path, value)
    }
}

#[test]
fn a_request_arriving_during_a_suspend_is_ignored() {
    struct Nested<'a> {
        handler: &'a ShutdownHandler,
        store: &'a RefCell<Store>,
        inner: Option<Result<Handled, Error>>,
    }
    impl ShutdownActions for Nested<'_> {
        fn shutdown(&mut self, _: Request) {}
        fn suspend(&mut self) -> Result<Outcome, Error> {
            // The toolstack writes a new request and the watch fires mid-suspend.
            self.store
                .borrow_mut()
                .set(SHUTDOWN_PATH, b"reboot")
                .unwrap();
            let mut a = Actions::default();
            self.inner = Some(self.handler.handle_shutdown(&mut Local(self.store), &mut a));
            Ok(Outcome::Cancelled)
        }
        fn sysrq(&mut self, _: u8) {}
        fn ignored(&mut self, _: &[u8]) {}
    }
    let h = ShutdownHandler::new();
    let store = RefCell::new(store_with(b"suspend"));
    let mut n = Nested {
        handler: &h,
        store: &store,
        inner: None,
    };
    let r = h.handle_shutdown(&mut Local(&store), &mut n);
    assert_eq!(r, Ok(Handled::Suspended(Outcome::Cancelled)));
    assert_eq!(n.inner, Some(Ok(Handled::Busy)));
    assert_eq!(
        store.borrow().get(SHUTDOWN_PATH),
        Some(&b"reboot"[..]),
        "left for later"
    );
}

#[test]
fn transaction_conflicts_are_retried() {
    let h = ShutdownHandler::new();
    let mut store = store_with(b"reboot");
    store.inject_conflicts(3);
    let mut a = Actions::default();
    assert_eq!(
        h.handle_shutdown(&mut store, &mut a),
        Ok(Handled::Shutdown(Request::Reboot))
    );
    assert_eq!(a.shutdowns, [Request::Reboot], "acted on exactly once");
    assert_eq!(store.get(SHUTDOWN_PATH), Some(&b""[..]));
    assert_eq!(store.commits(), 1);
}

#[test]
fn endless_conflicts_give_up_with_eagain_and_go_idle() {
    let h = ShutdownHandler::new();
    let mut store = store_with(b"reboot");
    store.inject_conflicts(u32::MAX);
    let mut a = Actions::default();
    assert_eq!(h.handle_shutdown(&mut store, &mut a), Err(Error::Store(11)));
    assert!(a.shutdowns.is_empty());
    assert_eq!(store.get(SHUTDOWN_PATH), Some(&b"reboot"[..]));
    assert_eq!(h.state(), State::Idle);
}

#[test]
fn sysrq_key_is_cleared_and_handled() {
    let h = ShutdownHandler::new();
    let mut store = Store::new();
    let mut a = Actions::default();
    assert_eq!(h.handle_sysrq(&mut store, &mut a), Ok(None));
    store.set(SYSRQ_PATH, b"b").unwrap();
    store.inject_conflicts(1);
    assert_eq!(h.handle_sysrq(&mut store, &mut a), Ok(Some(b'b')));
    assert_eq!(store.get(SYSRQ_PATH), Some(&b""[..]));
    assert_eq!(h.handle_sysrq(&mut store, &mut a), Ok(None));
    assert_eq!(a.sysrqs, [b'b']);
}

#[test]
fn advertises_features() {
    let h = ShutdownHandler::new();
    let mut store = Store::new();
    h.advertise(&mut store).unwrap();
    for f in FEATURES {
        assert_eq!(store.get(f), Some(&b"1"[..]), "{f}");
    }
    assert!(FEATURES.contains(&"control/feature-suspend"));
}

/// A store shared between threads; each access takes the lock.
struct Shared<'a>(&'a Mutex<Store>);

impl XenStore for Shared<'_> {
    type Error = Errno;
    fn start(&mut self) -> Result<Transaction, Errno> {
        self.0.lock().unwrap().start()
    }
    fn end(&mut self, txn: Transaction, abort: bool) -> Result<(), Errno> {
        self.0.lock().unwrap().end(txn, abort)
    }
    fn read(&mut self, txn: Transaction, path: &str, buf: &mut [u8]) -> Result<usize, Errno> {
        self.0.lock().unwrap().read(txn, path, buf)
    }
    fn write(&mut self, txn: Transaction, path: &str, value: &[u8]) -> Result<(), Errno> {
        self.0.lock().unwrap().write(txn, path, value)
    }
}

#[test]
fn concurrent_watch_events_suspend_exactly_once() {
    const THREADS: usize = 4;
    let handler = ShutdownHandler::new();
    let store = Mutex::new(store_with(b"suspend"));
    let suspends = AtomicUsize::new(0);
    let returned = AtomicUsize::new(0);
    let barrier = Barrier::new(THREADS);

    struct Slow<'a> {
        suspends: &'a AtomicUsize,
        returned: &'a AtomicUsize,
    }
    impl ShutdownActions for Slow<'_> {
        fn shutdown(&mut self, _: Request) {}
        fn suspend(&mut self) -> Result<Outcome, Error> {
            self.suspends.fetch_add(1, Ordering::SeqCst);
            // Stay suspended until every other watch event has been handled.
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.returned.load(Ordering::SeqCst) < THREADS - 1 && Instant::now() < deadline {
                std::thread::yield_now();
            }
            Ok(Outcome::Resumed)
        }
        fn sysrq(&mut self, _: u8) {}
        fn ignored(&mut self, _: &[u8]) {}
    }

    let results: Vec<Handled> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    let mut a = Slow {
                        suspends: &suspends,
                        returned: &returned,
                    };
                    barrier.wait();
                    let r = handler
                        .handle_shutdown(&mut Shared(&store), &mut a)
                        .unwrap();
                    if !matches!(r, Handled::Suspended(_)) {
                        returned.fetch_add(1, Ordering::SeqCst);
                    }
                    r
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(suspends.load(Ordering::SeqCst), 1);
    assert_eq!(
        results
            .iter()
            .filter(|r| matches!(r, Handled::Suspended(_)))
            .count(),
        1
    );
    assert_eq!(
        results.iter().filter(|r| **r == Handled::Busy).count(),
        THREADS - 1,
        "{results:?}"
    );
    assert_eq!(store.lock().unwrap().get(SHUTDOWN_PATH), Some(&b""[..]));
}

#[test]
fn a_long_value_is_a_c_string_up_to_its_first_nul() {
    let h = ShutdownHandler::new();
    let mut a = Actions::default();
    let mut long = b"reboot\0".to_vec();
    long.extend_from_slice(&[0xda; 20]);
    assert_eq!(
        h.handle_shutdown(&mut store_with(&long), &mut a),
        Ok(Handled::Shutdown(Request::Reboot))
    );
    let mut empty = vec![0u8; 3];
    empty.extend_from_slice(&[0xda; 20]);
    assert_eq!(
        ShutdownHandler::new().handle_shutdown(&mut store_with(&empty), &mut a),
        Ok(Handled::Nothing)
    );
}
