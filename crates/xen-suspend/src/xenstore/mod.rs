//! A xenstore client over the shared ring (Mini-OS's and Linux's `xenbus_comms` job):
//! requests with `req_id` matching, transactions retried on `EAGAIN`
//! ([`XsClient::transaction`]), watches with their events queued, and suspend/resume of the
//! connection.
//!
//! [`wire`] is the message codec (also what a test server over xenstored's unix socket
//! speaks); [`ring`] the shared page. Nothing allocates; one client is about 9 KiB.

pub mod ring;
pub mod wire;

use crate::hal::{HalError, Transaction, XenStore};
use ring::Ring;
use wire::{HEADER_LEN, Header, PAYLOAD_MAX, WireError, msg};

/// The store's event channel, as the client needs it.
pub trait StoreChannel {
    /// Why waiting failed (e.g. a timeout the kernel imposes).
    type Error: HalError;
    /// Tells xenstored the ring changed (`EVTCHNOP_send` on the store port).
    fn notify(&mut self);
    /// Waits for xenstored to notify (or for a moment to pass): called when the request ring
    /// is full or a reply has not arrived yet. May sleep.
    fn wait(&mut self) -> Result<(), Self::Error>;
}

impl<T: StoreChannel + ?Sized> StoreChannel for &mut T {
    type Error = T::Error;
    fn notify(&mut self) {
        (**self).notify()
    }
    fn wait(&mut self) -> Result<(), Self::Error> {
        (**self).wait()
    }
}

/// Longest watched path the client keeps for re-registration.
pub const WATCH_PATH_MAX: usize = 256;
/// Longest watch token the client keeps.
pub const WATCH_TOKEN_MAX: usize = 64;
/// Bytes of queued watch events (each costs its path and token plus 4).
const EVENT_QUEUE: usize = 2048;

#[derive(Clone, Copy)]
struct Watch {
    used: bool,
    path: [u8; WATCH_PATH_MAX],
    plen: usize,
    token: [u8; WATCH_TOKEN_MAX],
    tlen: usize,
}

impl Watch {
    const EMPTY: Self = Self {
        used: false,
        path: [0; WATCH_PATH_MAX],
        plen: 0,
        token: [0; WATCH_TOKEN_MAX],
        tlen: 0,
    };
}

/// Queued watch events: `[plen: u16][tlen: u16][path][token]`, oldest first.
struct Events {
    buf: [u8; EVENT_QUEUE],
    len: usize,
    lost: u32,
}

impl Events {
    fn push(&mut self, path: &[u8], token: &[u8]) {
        let need = 4 + path.len() + token.len();
        if self.len + need > EVENT_QUEUE {
            self.lost = self.lost.saturating_add(1);
            return;
        }
        let b = &mut self.buf[self.len..self.len + need];
        b[0..2].copy_from_slice(&(path.len() as u16).to_le_bytes());
        b[2..4].copy_from_slice(&(token.len() as u16).to_le_bytes());
        b[4..4 + path.len()].copy_from_slice(path);
        b[4 + path.len()..].copy_from_slice(token);
        self.len += need;
    }

    fn pop(&mut self, path: &mut [u8], token: &mut [u8]) -> Option<(usize, usize)> {
        if self.len == 0 {
            return None;
        }
        let plen = usize::from(u16::from_le_bytes([self.buf[0], self.buf[1]]));
        let tlen = usize::from(u16::from_le_bytes([self.buf[2], self.buf[3]]));
        let p = &self.buf[4..4 + plen];
        let t = &self.buf[4 + plen..4 + plen + tlen];
        let pn = plen.min(path.len());
        path[..pn].copy_from_slice(&p[..pn]);
        let tn = tlen.min(token.len());
        token[..tn].copy_from_slice(&t[..tn]);
        let need = 4 + plen + tlen;
        self.buf.copy_within(need..self.len, 0);
        self.len -= need;
        Some((plen, tlen))
    }
}

/// A xenstore client over the shared ring, keeping up to `W` watches.
///
/// Calling context: process context (it waits on the store channel); one request at a time
/// (wrap it in the kernel's lock when shared). Allocates nothing.
pub struct XsClient<'a, C: StoreChannel, const W: usize = 8> {
    ring: Ring<'a>,
    chan: C,
    next_id: u32,
    scratch: [u8; PAYLOAD_MAX],
    watches: [Watch; W],
    events: Events,
}

impl<C: StoreChannel, const W: usize> core::fmt::Debug for XsClient<'_, C, W> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("XsClient")
            .field("next_id", &self.next_id)
            .field("queued_event_bytes", &self.events.len)
            .finish_non_exhaustive()
    }
}

impl<'a, C: StoreChannel, const W: usize> XsClient<'a, C, W> {
    /// A client of the ring `ring` whose event channel is `chan`.
    pub fn new(ring: Ring<'a>, chan: C) -> Self {
        Self {
            ring,
            chan,
            next_id: 0,
            scratch: [0; PAYLOAD_MAX],
            watches: [Watch::EMPTY; W],
            events: Events {
                buf: [0; EVENT_QUEUE],
                len: 0,
                lost: 0,
            },
        }
    }

    /// The event channel (e.g. to point it at the new domain's port).
    pub fn channel(&mut self) -> &mut C {
        &mut self.chan
    }

    fn wait(&mut self) -> Result<(), WireError> {
        self.chan.wait().map_err(|e| WireError::Channel(e.errno()))
    }

    fn write_all(&mut self, mut data: &[u8]) -> Result<(), WireError> {
        while !data.is_empty() {
            let n = self.ring.write_req(data)?;
            data = &data[n..];
            if !data.is_empty() {
                self.chan.notify();
                self.wait()?;
            }
        }
        Ok(())
    }

    /// Reads one message into the scratch buffer: its header and payload length.
    fn read_message(&mut self) -> Result<Header, WireError> {
        let mut raw = [0; HEADER_LEN];
        read_exact(&self.ring, &mut self.chan, &mut raw)?;
        let h = Header::parse(&raw)?;
        read_exact(
            &self.ring,
            &mut self.chan,
            &mut self.scratch[..h.len as usize],
        )?;
        Ok(h)
    }

    /// Sends a request of type `ty` in transaction `tx` whose payload is `parts` concatenated,
    /// and waits for its reply; watch events arriving meanwhile are queued. Returns the reply
    /// payload's length, copying as much as fits into `out`.
    ///
    /// Errors: `XS_ERROR` replies as [`WireError::Errno`]; a reply with another `req_id`,
    /// bad indices, a bad header as the other [`WireError`]s (the connection is then
    /// unusable until [`XsClient::resume`]).
    pub fn request(
        &mut self,
        ty: u32,
        tx: Transaction,
        parts: &[&[u8]],
        out: &mut [u8],
    ) -> Result<usize, WireError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > PAYLOAD_MAX {
            return Err(WireError::RequestTooLong);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let h = Header {
            ty,
            req_id: id,
            tx_id: tx,
            len: len as u32,
        };
        self.write_all(&h.encode())?;
        for p in parts {
            self.write_all(p)?;
        }
        self.chan.notify();
        loop {
            let r = self.read_message()?;
            let payload = &self.scratch[..r.len as usize];
            if r.ty == msg::WATCH_EVENT {
                if let Ok((path, token)) = wire::watch_event(payload) {
                    self.events.push(path, token);
                }
                continue;
            }
            if r.req_id != id {
                return Err(WireError::BadId(r.req_id));
            }
            if r.ty == msg::ERROR {
                return Err(WireError::Errno(wire::error_errno(payload)?));
            }
            let n = payload.len().min(out.len());
            out[..n].copy_from_slice(&payload[..n]);
            return Ok(payload.len());
        }
    }

    /// Runs `body` in a transaction and commits it, starting over (up to `tries` times in
    /// all) while the commit answers `EAGAIN` (another writer got there first). An error of
    /// `body` aborts the transaction and is returned; so is the last `EAGAIN`.
    pub fn transaction<R>(
        &mut self,
        tries: u32,
        mut body: impl FnMut(&mut Self, Transaction) -> Result<R, WireError>,
    ) -> Result<R, WireError> {
        let mut last = WireError::Errno(crate::error::errno::EAGAIN);
        for _ in 0..tries {
            let tx = self.start()?;
            let r = match body(self, tx) {
                Ok(r) => r,
                Err(e) => {
                    let _ = self.end(tx, true);
                    return Err(e);
                }
            };
            match self.end(tx, false) {
                Ok(()) => return Ok(r),
                Err(e @ WireError::Errno(crate::error::errno::EAGAIN)) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// `XS_DIRECTORY`: the children of `path`, NUL-separated, into `out`; returns the full
    /// length.
    pub fn directory(
        &mut self,
        tx: Transaction,
        path: &str,
        out: &mut [u8],
    ) -> Result<usize, WireError> {
        self.request(msg::DIRECTORY, tx, &[path.as_bytes(), b"\0"], out)
    }

    /// `XS_MKDIR`.
    pub fn mkdir(&mut self, tx: Transaction, path: &str) -> Result<(), WireError> {
        self.request(msg::MKDIR, tx, &[path.as_bytes(), b"\0"], &mut [])
            .map(drop)
    }

    /// `XS_RM`.
    pub fn rm(&mut self, tx: Transaction, path: &str) -> Result<(), WireError> {
        self.request(msg::RM, tx, &[path.as_bytes(), b"\0"], &mut [])
            .map(drop)
    }

    /// `XS_WATCH`: watches `path` with `token` and keeps both so [`XsClient::resume`]
    /// registers the watch again. xenstored fires every new watch once.
    pub fn watch(&mut self, path: &str, token: &str) -> Result<(), WireError> {
        if path.len() > WATCH_PATH_MAX || token.len() > WATCH_TOKEN_MAX {
            return Err(WireError::RequestTooLong);
        }
        let slot = self
            .watches
            .iter()
            .position(|w| !w.used)
            .ok_or(WireError::NoWatchSlot)?;
        self.send_watch(msg::WATCH, path.as_bytes(), token.as_bytes())?;
        let w = &mut self.watches[slot];
        w.used = true;
        w.path[..path.len()].copy_from_slice(path.as_bytes());
        w.plen = path.len();
        w.token[..token.len()].copy_from_slice(token.as_bytes());
        w.tlen = token.len();
        Ok(())
    }

    /// `XS_UNWATCH` of a watch made by [`XsClient::watch`]; forgets it.
    pub fn unwatch(&mut self, path: &str, token: &str) -> Result<(), WireError> {
        if let Some(w) = self.watches.iter_mut().find(|w| {
            w.used && &w.path[..w.plen] == path.as_bytes() && &w.token[..w.tlen] == token.as_bytes()
        }) {
            w.used = false;
        }
        self.send_watch(msg::UNWATCH, path.as_bytes(), token.as_bytes())
    }

    fn send_watch(&mut self, ty: u32, path: &[u8], token: &[u8]) -> Result<(), WireError> {
        self.request(ty, 0, &[path, b"\0", token, b"\0"], &mut [])
            .map(drop)
    }

    /// Reads whatever complete or started messages xenstored sent unasked (watch events)
    /// without waiting when nothing is there; a started message is read to its end.
    pub fn poll(&mut self) -> Result<(), WireError> {
        while self.ring.rsp_available()? > 0 {
            let r = self.read_message()?;
            if r.ty != msg::WATCH_EVENT {
                return Err(WireError::BadId(r.req_id));
            }
            if let Ok((path, token)) = wire::watch_event(&self.scratch[..r.len as usize]) {
                self.events.push(path, token);
            }
        }
        Ok(())
    }

    /// The oldest queued watch event: copies its path and token (truncated to the buffers)
    /// and returns their full lengths.
    pub fn next_event(&mut self, path: &mut [u8], token: &mut [u8]) -> Option<(usize, usize)> {
        self.events.pop(path, token)
    }

    /// Watch events dropped because the queue was full.
    pub fn lost_events(&self) -> u32 {
        self.events.lost
    }

    /// After a restore (xenbus resume): drops replies and events of the old connection and
    /// registers every kept watch again (each fires once, as in Linux's `xs_resume`).
    ///
    /// Calling context: the xenbus resume path, process context, after the store channel
    /// points at the new domain's port (see [`crate::hal::EventDelivery::reread_channels`]).
    pub fn resume(&mut self) -> Result<(), WireError> {
        self.ring.discard_rsp();
        self.events.len = 0;
        let mut first = Ok(());
        for i in 0..W {
            let w = self.watches[i];
            if w.used {
                let r = self.send_watch(msg::WATCH, &w.path[..w.plen], &w.token[..w.tlen]);
                if first.is_ok() {
                    first = r;
                }
            }
        }
        first
    }
}

/// Reads exactly `out.len()` response bytes, waiting on `chan` while the ring is empty.
fn read_exact<C: StoreChannel>(
    ring: &Ring<'_>,
    chan: &mut C,
    out: &mut [u8],
) -> Result<(), WireError> {
    let mut got = 0;
    while got < out.len() {
        let n = ring.read_rsp(&mut out[got..])?;
        got += n;
        if n > 0 {
            // Space for xenstored to write more.
            chan.notify();
        } else {
            chan.wait().map_err(|e| WireError::Channel(e.errno()))?;
        }
    }
    Ok(())
}

impl<C: StoreChannel, const W: usize> XenStore for XsClient<'_, C, W> {
    type Error = WireError;

    fn start(&mut self) -> Result<Transaction, WireError> {
        let mut out = [0; 12];
        let n = self.request(msg::TRANSACTION_START, 0, &[b"\0"], &mut out)?;
        wire::parse_u32(out.get(..n).ok_or(WireError::BadString)?)
    }

    fn end(&mut self, txn: Transaction, abort: bool) -> Result<(), WireError> {
        let arg: &[u8] = if abort { b"F\0" } else { b"T\0" };
        self.request(msg::TRANSACTION_END, txn, &[arg], &mut [])
            .map(drop)
    }

    fn read(&mut self, txn: Transaction, path: &str, buf: &mut [u8]) -> Result<usize, WireError> {
        self.request(msg::READ, txn, &[path.as_bytes(), b"\0"], buf)
    }

    fn write(&mut self, txn: Transaction, path: &str, value: &[u8]) -> Result<(), WireError> {
        self.request(msg::WRITE, txn, &[path.as_bytes(), b"\0", value], &mut [])
            .map(drop)
    }
}
