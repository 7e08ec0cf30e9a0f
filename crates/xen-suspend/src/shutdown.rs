//! The `control/shutdown` and `control/sysrq` watches: parse the toolstack's request,
//! acknowledge it, and act, one request at a time.

use crate::error::{Error, Outcome, errno};
use crate::hal::{HalError, Transaction, XenStore};
use crate::sync::{AtomicU8, Ordering};

/// Path of the shutdown request.
pub const SHUTDOWN_PATH: &str = "control/shutdown";
/// Path of the sysrq request.
pub const SYSRQ_PATH: &str = "control/sysrq";
/// Feature nodes advertised by [`ShutdownHandler::advertise`].
pub const FEATURES: [&str; 4] = [
    "control/feature-poweroff",
    "control/feature-reboot",
    "control/feature-suspend",
    "control/feature-sysrq",
];
/// "No transaction" (`XBT_NIL`).
pub const XBT_NIL: Transaction = 0;

/// Transactions retried on `EAGAIN` before giving up.
const MAX_RETRIES: usize = 64;
/// Longest request value recognised; longer ones are unknown.
const MAX_REQUEST: usize = 16;

/// A recognised shutdown request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Request {
    /// `"poweroff"`.
    Poweroff,
    /// `"halt"` (a poweroff to the guest; the toolstack tells them apart).
    Halt,
    /// `"reboot"`.
    Reboot,
    /// `"suspend"`: save or migrate.
    Suspend,
}

/// What a `control/shutdown` value says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Parsed {
    /// Empty: no request (also our own acknowledgement).
    Empty,
    /// A recognised request.
    Request(Request),
    /// `"crash"`: a domain can only report a crash, not be told to crash; ignored.
    Crash,
    /// Anything else; ignored.
    Unknown,
}

/// Parses a `control/shutdown` value. The value ends at its first NUL, as a C string does;
/// matching is exact (no trimming, case-sensitive).
pub fn parse_request(value: &[u8]) -> Parsed {
    let value = value
        .iter()
        .position(|&b| b == 0)
        .map_or(value, |nul| &value[..nul]);
    match value {
        b"" => Parsed::Empty,
        b"poweroff" => Parsed::Request(Request::Poweroff),
        b"halt" => Parsed::Request(Request::Halt),
        b"reboot" => Parsed::Request(Request::Reboot),
        b"suspend" => Parsed::Request(Request::Suspend),
        b"crash" => Parsed::Crash,
        _ => Parsed::Unknown,
    }
}

/// What the kernel does on a request.
pub trait ShutdownActions {
    /// Start an orderly poweroff, halt or reboot (never [`Request::Suspend`]).
    fn shutdown(&mut self, request: Request);
    /// Save the domain, typically [`crate::Machine::suspend`]; returns once it runs again.
    fn suspend(&mut self) -> Result<Outcome, Error>;
    /// Handle a sysrq key.
    fn sysrq(&mut self, key: u8);
    /// Log an ignored request (`"crash"` or unknown; `value` may be truncated).
    fn ignored(&mut self, value: &[u8]);
}

impl<T: ShutdownActions + ?Sized> ShutdownActions for &mut T {
    fn shutdown(&mut self, request: Request) {
        (**self).shutdown(request)
    }
    fn suspend(&mut self) -> Result<Outcome, Error> {
        (**self).suspend()
    }
    fn sysrq(&mut self, key: u8) {
        (**self).sysrq(key)
    }
    fn ignored(&mut self, value: &[u8]) {
        (**self).ignored(value)
    }
}

/// What one watch event led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Handled {
    /// Nothing to do: the node is empty or absent.
    Nothing,
    /// A request is already in progress: this event was ignored (not read, not acknowledged).
    Busy,
    /// `"crash"` or an unknown value: logged and ignored, not acknowledged.
    Ignored(Parsed),
    /// Acknowledged and started a poweroff, halt or reboot (which stays in progress).
    Shutdown(Request),
    /// Acknowledged and suspended; the guest runs again and the handler is idle.
    Suspended(Outcome),
}

/// What the handler is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Waiting for a request.
    Idle,
    /// Reading a request.
    Reading,
    /// A poweroff, halt or reboot was started.
    ShuttingDown,
    /// A suspend runs.
    Suspending,
}

const IDLE: u8 = 0;
const READING: u8 = 1;
const SHUTTING_DOWN: u8 = 2;
const SUSPENDING: u8 = 3;

/// The shutdown watch's state: one request at a time. Share it (`&self`) between every context
/// that can see the watch fire.
#[derive(Debug)]
pub struct ShutdownHandler {
    state: AtomicU8,
}

impl Default for ShutdownHandler {
    fn default() -> Self {
        Self::new()
    }
}

impl ShutdownHandler {
    /// An idle handler.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            state: AtomicU8::new(IDLE),
        }
    }

    /// An idle handler.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            state: AtomicU8::new(IDLE),
        }
    }

    /// What the handler is doing now.
    pub fn state(&self) -> State {
        match self.state.load(Ordering::Acquire) {
            IDLE => State::Idle,
            READING => State::Reading,
            SHUTTING_DOWN => State::ShuttingDown,
            _ => State::Suspending,
        }
    }

    /// Accept requests again after a poweroff, halt or reboot that did not happen.
    pub fn finish(&self) {
        self.state.store(IDLE, Ordering::Release);
    }

    /// Tells the toolstack what the guest handles: writes `"1"` to each of [`FEATURES`].
    pub fn advertise<S: XenStore>(&self, store: &mut S) -> Result<(), Error> {
        for path in FEATURES {
            store
                .write(XBT_NIL, path, b"1")
                .map_err(|e| Error::Store(e.errno()))?;
        }
        Ok(())
    }

    /// The `control/shutdown` watch fired: reads the request in a transaction, acknowledges a
    /// recognised one by writing `""` (retrying the transaction on `EAGAIN`), then acts on it.
    /// Ignored while another request is in progress.
    pub fn handle_shutdown<S: XenStore, A: ShutdownActions>(
        &self,
        store: &mut S,
        actions: &mut A,
    ) -> Result<Handled, Error> {
        if self
            .state
            .compare_exchange(IDLE, READING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Ok(Handled::Busy);
        }
        let mut buf = [0u8; MAX_REQUEST];
        let read = read_and_ack(store, &mut buf);
        let (parsed, len) = match read {
            Ok(Some(r)) => r,
            Ok(None) => {
                self.finish();
                return Ok(Handled::Nothing);
            }
            Err(e) => {
                self.finish();
                return Err(e);
            }
        };
        match parsed {
            Parsed::Empty => {
                self.finish();
                Ok(Handled::Nothing)
            }
            Parsed::Crash | Parsed::Unknown => {
                actions.ignored(&buf[..len.min(buf.len())]);
                self.finish();
                Ok(Handled::Ignored(parsed))
            }
            Parsed::Request(Request::Suspend) => {
                self.state.store(SUSPENDING, Ordering::Release);
                let result = actions.suspend();
                self.finish();
                result.map(Handled::Suspended)
            }
            Parsed::Request(request) => {
                self.state.store(SHUTTING_DOWN, Ordering::Release);
                actions.shutdown(request);
                Ok(Handled::Shutdown(request))
            }
        }
    }

    /// The `control/sysrq` watch fired: reads the key, clears it (in a transaction retried on
    /// `EAGAIN`), then hands it to `actions`. Returns the key, `None` when there was none.
    pub fn handle_sysrq<S: XenStore, A: ShutdownActions>(
        &self,
        store: &mut S,
        actions: &mut A,
    ) -> Result<Option<u8>, Error> {
        let store_err = |e: S::Error| Error::Store(e.errno());
        for _ in 0..MAX_RETRIES {
            let txn = store.start().map_err(store_err)?;
            let mut key = [0u8; 1];
            let len = match store.read(txn, SYSRQ_PATH, &mut key) {
                Ok(len) => len,
                Err(e) => {
                    let _ = store.end(txn, true);
                    return if e.errno() == errno::ENOENT {
                        Ok(None)
                    } else {
                        Err(store_err(e))
                    };
                }
            };
            let key = if len == 0 { 0 } else { key[0] };
            if key != 0 {
                if let Err(e) = store.write(txn, SYSRQ_PATH, b"") {
                    let _ = store.end(txn, true);
                    return Err(store_err(e));
                }
            }
            match store.end(txn, false) {
                Ok(()) => {
                    if key == 0 {
                        return Ok(None);
                    }
                    actions.sysrq(key);
                    return Ok(Some(key));
                }
                Err(e) if e.errno() == errno::EAGAIN => continue,
                Err(e) => return Err(store_err(e)),
            }
        }
        Err(Error::Store(errno::EAGAIN))
    }
}

/// Reads `control/shutdown` and acknowledges a recognised request, in one transaction retried
/// on `EAGAIN`. `None` when the node is absent.
fn read_and_ack<S: XenStore>(
    store: &mut S,
    buf: &mut [u8; MAX_REQUEST],
) -> Result<Option<(Parsed, usize)>, Error> {
    let store_err = |e: S::Error| Error::Store(e.errno());
    for _ in 0..MAX_RETRIES {
        let txn = store.start().map_err(store_err)?;
        let len = match store.read(txn, SHUTDOWN_PATH, buf) {
            Ok(len) => len,
            Err(e) => {
                let _ = store.end(txn, true);
                return if e.errno() == errno::ENOENT {
                    Ok(None)
                } else {
                    Err(store_err(e))
                };
            }
        };
        // The value is a C string: it ends at its first NUL. Longer than any request without
        // a NUL in what we read means unknown, whatever its prefix.
        let parsed = if len > buf.len() && !buf.contains(&0) {
            Parsed::Unknown
        } else {
            parse_request(&buf[..len.min(buf.len())])
        };
        if matches!(parsed, Parsed::Request(_)) {
            if let Err(e) = store.write(txn, SHUTDOWN_PATH, b"") {
                let _ = store.end(txn, true);
                return Err(store_err(e));
            }
        }
        // Nothing written for anything else: end without committing.
        let abort = !matches!(parsed, Parsed::Request(_));
        match store.end(txn, abort) {
            Ok(()) => return Ok(Some((parsed, len))),
            Err(e) if e.errno() == errno::EAGAIN => continue,
            Err(e) => return Err(store_err(e)),
        }
    }
    Err(Error::Store(errno::EAGAIN))
}
