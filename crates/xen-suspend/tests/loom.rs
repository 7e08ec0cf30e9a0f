//! Model-checks the shutdown handler's one-request-at-a-time claim.
#![cfg(loom)]

use loom::sync::{Arc, Mutex};
use loom::thread;

use oskit_xen_suspend::hal::{Errno, Transaction, XenStore};
use oskit_xen_suspend::shutdown::{
    Handled, Request, SHUTDOWN_PATH, ShutdownActions, ShutdownHandler, State,
};
use oskit_xen_suspend::sim::SimStore;
use oskit_xen_suspend::{Error, Outcome};

type Store = SimStore<4>;

struct Shared(Arc<Mutex<Store>>);

impl XenStore for Shared {
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

#[derive(Default)]
struct Count {
    shutdowns: usize,
    suspends: usize,
}

impl ShutdownActions for Count {
    fn shutdown(&mut self, _: Request) {
        self.shutdowns += 1;
    }
    fn suspend(&mut self) -> Result<Outcome, Error> {
        self.suspends += 1;
        Ok(Outcome::Resumed)
    }
    fn sysrq(&mut self, _: u8) {}
    fn ignored(&mut self, _: &[u8]) {}
}

fn race(value: &'static [u8]) -> (Vec<Handled>, Count, Vec<u8>, State) {
    let handler = Arc::new(ShutdownHandler::new());
    let mut store = Store::new();
    store.set(SHUTDOWN_PATH, value).unwrap();
    let store = Arc::new(Mutex::new(store));
    let spawn = || {
        let (h, s) = (handler.clone(), store.clone());
        thread::spawn(move || {
            let mut c = Count::default();
            let r = h.handle_shutdown(&mut Shared(s), &mut c).unwrap();
            (r, c)
        })
    };
    let (a, b) = (spawn(), spawn());
    let (ra, ca) = a.join().unwrap();
    let (rb, cb) = b.join().unwrap();
    let total = Count {
        shutdowns: ca.shutdowns + cb.shutdowns,
        suspends: ca.suspends + cb.suspends,
    };
    let left = store.lock().unwrap().get(SHUTDOWN_PATH).unwrap().to_vec();
    (vec![ra, rb], total, left, handler.state())
}

#[test]
fn concurrent_poweroff_acts_once_and_the_other_is_busy() {
    loom::model(|| {
        let (results, count, left, state) = race(b"poweroff");
        assert_eq!(count.shutdowns, 1);
        assert!(results.contains(&Handled::Shutdown(Request::Poweroff)));
        assert!(results.contains(&Handled::Busy), "{results:?}");
        assert!(left.is_empty());
        assert_eq!(state, State::ShuttingDown);
    });
}

#[test]
fn concurrent_suspend_suspends_once() {
    loom::model(|| {
        let (results, count, left, state) = race(b"suspend");
        assert_eq!(count.suspends, 1);
        let suspended = results
            .iter()
            .filter(|r| matches!(r, Handled::Suspended(Outcome::Resumed)))
            .count();
        assert_eq!(suspended, 1);
        // The other saw the suspend in progress, or ran after it and found the ack.
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Handled::Suspended(_) | Handled::Busy | Handled::Nothing)),
            "{results:?}"
        );
        assert!(left.is_empty());
        assert_eq!(state, State::Idle);
    });
}
