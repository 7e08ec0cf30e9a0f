//! A tiny xenstored for tests, built on the crate's codec ([`wire`]): a tree of nodes,
//! watches per connection, transactions with injectable `EAGAIN` conflicts. Serves the
//! shared ring ([`RingServer`]) and, in the peer test, xenstored's unix socket.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};

use oskit_xen_suspend::xenstore::wire::{self, HEADER_LEN, Header, msg};

/// The domain's home for relative paths.
pub const HOME: &str = "/local/domain/1";

#[derive(Default)]
pub struct Xsd {
    pub tree: BTreeMap<String, Vec<u8>>,
    /// (connection, path, token)
    pub watches: Vec<(u32, String, Vec<u8>)>,
    next_tx: u32,
    /// Commits that fail with EAGAIN before one succeeds.
    pub conflicts: u32,
    /// Every request seen: (type, req_id, tx_id).
    pub seen: Vec<(u32, u32, u32)>,
    /// Writes of open transactions, applied at a successful commit.
    tx_writes: BTreeMap<u32, Vec<(String, Vec<u8>)>>,
}

/// One reply or event to send: (connection, header, payload).
pub type Out = (u32, Header, Vec<u8>);

fn abs(path: &[u8]) -> String {
    let p = String::from_utf8_lossy(path).into_owned();
    if p.starts_with('/') {
        p
    } else {
        format!("{HOME}/{p}")
    }
}

fn parent(p: &str) -> Option<&str> {
    if p == "/" {
        return None;
    }
    Some(match p.rfind('/') {
        Some(0) => "/",
        Some(i) => &p[..i],
        None => "/",
    })
}

impl Xsd {
    pub fn new() -> Self {
        let mut x = Self::default();
        x.tree.insert("/".into(), vec![]);
        x.next_tx = 1;
        x
    }

    fn create(&mut self, p: &str) {
        let mut cur = Some(p.to_string());
        while let Some(c) = cur {
            if self.tree.contains_key(&c) {
                break;
            }
            self.tree.insert(c.clone(), vec![]);
            cur = parent(&c).map(str::to_string);
        }
    }

    fn fire(&self, p: &str, out: &mut Vec<Out>) {
        for (conn, wpath, token) in &self.watches {
            let w = abs(wpath.as_bytes());
            if p == w || p.starts_with(&format!("{}/", w.trim_end_matches('/'))) || w == "/" {
                out.push(event(*conn, wpath_for(p, wpath), token));
            }
        }
    }

    /// Handles one request of connection `conn`; returns the reply and any watch events.
    pub fn handle(&mut self, conn: u32, h: Header, payload: &[u8]) -> Vec<Out> {
        self.seen.push((h.ty, h.req_id, h.tx_id));
        let mut out = Vec::new();
        let reply = |ty: u32, body: Vec<u8>| {
            (
                conn,
                Header {
                    ty,
                    req_id: h.req_id,
                    tx_id: h.tx_id,
                    len: body.len() as u32,
                },
                body,
            )
        };
        let err = |e: &str| reply(msg::ERROR, format!("{e}\0").into_bytes());
        let ok = || reply(h.ty, b"OK\0".to_vec());
        let strs: Vec<Vec<u8>> = match wire::strings(payload) {
            Ok(it) => it.map(<[u8]>::to_vec).collect(),
            // WRITE's value is not terminated.
            Err(_) if h.ty == msg::WRITE => vec![],
            Err(_) => {
                out.push(err("EINVAL"));
                return out;
            }
        };
        let first = strs.first().cloned().unwrap_or_default();
        let r = match h.ty {
            msg::READ => {
                let p = abs(&first);
                let pending = self
                    .tx_writes
                    .get(&h.tx_id)
                    .and_then(|w| w.iter().rev().find(|(k, _)| *k == p))
                    .map(|(_, v)| v.clone());
                match pending.or_else(|| self.tree.get(&p).cloned()) {
                    Some(v) => reply(msg::READ, v),
                    None => err("ENOENT"),
                }
            }
            msg::WRITE => {
                let Some(nul) = payload.iter().position(|&b| b == 0) else {
                    out.push(err("EINVAL"));
                    return out;
                };
                let p = abs(&payload[..nul]);
                if h.tx_id != 0 {
                    if let Some(w) = self.tx_writes.get_mut(&h.tx_id) {
                        w.push((p, payload[nul + 1..].to_vec()));
                        out.push(ok());
                        return out;
                    }
                }
                self.create(&p);
                self.tree.insert(p.clone(), payload[nul + 1..].to_vec());
                self.fire(&p, &mut out);
                ok()
            }
            msg::MKDIR => {
                let p = abs(&first);
                self.create(&p);
                self.fire(&p, &mut out);
                ok()
            }
            msg::RM => {
                let p = abs(&first);
                if !self.tree.contains_key(&p) {
                    err("ENOENT")
                } else {
                    let prefix = format!("{}/", p.trim_end_matches('/'));
                    self.tree.retain(|k, _| k != &p && !k.starts_with(&prefix));
                    self.fire(&p, &mut out);
                    ok()
                }
            }
            msg::DIRECTORY => {
                let p = abs(&first);
                if !self.tree.contains_key(&p) {
                    err("ENOENT")
                } else {
                    let prefix = if p == "/" {
                        "/".to_string()
                    } else {
                        format!("{p}/")
                    };
                    let mut body = Vec::new();
                    for k in self.tree.keys() {
                        if let Some(rest) = k.strip_prefix(&prefix) {
                            if !rest.is_empty() && !rest.contains('/') {
                                body.extend_from_slice(rest.as_bytes());
                                body.push(0);
                            }
                        }
                    }
                    reply(msg::DIRECTORY, body)
                }
            }
            msg::GET_PERMS => {
                if self.tree.contains_key(&abs(&first)) {
                    reply(msg::GET_PERMS, b"n0\0".to_vec())
                } else {
                    err("ENOENT")
                }
            }
            msg::WATCH => {
                let token = strs.get(1).cloned().unwrap_or_default();
                let path = String::from_utf8_lossy(&first).into_owned();
                self.watches.push((conn, path.clone(), token.clone()));
                out.push(ok());
                // A new watch fires once.
                out.push(event(conn, path, &token));
                return out;
            }
            msg::UNWATCH => {
                let token = strs.get(1).cloned().unwrap_or_default();
                let path = String::from_utf8_lossy(&first).into_owned();
                self.watches
                    .retain(|(c, p, t)| !(*c == conn && *p == path && *t == token));
                ok()
            }
            msg::TRANSACTION_START => {
                let id = self.next_tx;
                self.next_tx += 1;
                self.tx_writes.insert(id, Vec::new());
                reply(msg::TRANSACTION_START, format!("{id}\0").into_bytes())
            }
            msg::TRANSACTION_END => {
                let writes = self.tx_writes.remove(&h.tx_id).unwrap_or_default();
                if first == b"T" && self.conflicts > 0 {
                    self.conflicts -= 1;
                    err("EAGAIN")
                } else {
                    if first == b"T" {
                        for (p, v) in writes {
                            self.create(&p);
                            self.tree.insert(p.clone(), v);
                            self.fire(&p, &mut out);
                        }
                    }
                    ok()
                }
            }
            _ => err("EINVAL"),
        };
        out.insert(0, r);
        out
    }
}

fn wpath_for(written: &str, _watched: &str) -> String {
    written.to_string()
}

fn event(conn: u32, path: String, token: &[u8]) -> Out {
    let mut body = path.into_bytes();
    body.push(0);
    body.extend_from_slice(token);
    body.push(0);
    (
        conn,
        Header {
            ty: msg::WATCH_EVENT,
            req_id: 0,
            tx_id: 0,
            len: body.len() as u32,
        },
        body,
    )
}

/// A 4 KiB store page, zeroed.
pub fn page() -> Box<[AtomicU32; 1024]> {
    Box::new(std::array::from_fn(|_| AtomicU32::new(0)))
}

const REQ_CONS: usize = 512;
const REQ_PROD: usize = 513;
const RSP_CONS: usize = 514;
const RSP_PROD: usize = 515;

fn get(page: &[AtomicU32; 1024], base: usize, i: u32) -> u8 {
    let at = base + (i as usize & 1023);
    (page[at / 4].load(Ordering::Relaxed) >> ((at % 4) * 8)) as u8
}

fn put(page: &[AtomicU32; 1024], base: usize, i: u32, b: u8) {
    let at = base + (i as usize & 1023);
    let w = &page[at / 4];
    let s = (at % 4) * 8;
    let old = w.load(Ordering::Relaxed);
    w.store(
        (old & !(0xff << s)) | (u32::from(b) << s),
        Ordering::Relaxed,
    );
}

/// xenstored's end of the shared ring: collects request bytes, handles whole messages, and
/// streams replies into the response ring as space allows.
pub struct RingServer<'p> {
    pub page: &'p [AtomicU32; 1024],
    pub xsd: Xsd,
    inbuf: Vec<u8>,
    pub outbuf: std::collections::VecDeque<u8>,
    /// Extra raw bytes to inject into the response stream before the next reply.
    pub inject: Vec<u8>,
    pub notifies: u32,
    pub waits: u32,
}

impl<'p> RingServer<'p> {
    pub fn new(page: &'p [AtomicU32; 1024]) -> Self {
        Self {
            page,
            xsd: Xsd::new(),
            inbuf: Vec::new(),
            outbuf: Default::default(),
            inject: Vec::new(),
            notifies: 0,
            waits: 0,
        }
    }

    /// Queues an unsolicited message (e.g. a watch event) for the guest.
    pub fn send(&mut self, h: Header, body: &[u8]) {
        self.outbuf.extend(h.encode());
        self.outbuf.extend(body);
    }

    /// One round of xenstored's work.
    pub fn serve(&mut self) {
        let p = self.page;
        let cons = p[REQ_CONS].load(Ordering::Acquire);
        let prod = p[REQ_PROD].load(Ordering::Acquire);
        let mut c = cons;
        while c != prod {
            self.inbuf.push(get(p, 0, c));
            c = c.wrapping_add(1);
        }
        p[REQ_CONS].store(c, Ordering::Release);
        while self.inbuf.len() >= HEADER_LEN {
            let raw: [u8; HEADER_LEN] = self.inbuf[..HEADER_LEN].try_into().unwrap();
            let h = Header::parse(&raw).expect("the client sends good headers");
            let total = HEADER_LEN + h.len as usize;
            if self.inbuf.len() < total {
                break;
            }
            let payload: Vec<u8> = self.inbuf[HEADER_LEN..total].to_vec();
            self.inbuf.drain(..total);
            let inject = std::mem::take(&mut self.inject);
            self.outbuf.extend(inject);
            for (_, rh, body) in self.xsd.handle(1, h, &payload) {
                self.send(rh, &body);
            }
        }
        let rc = p[RSP_CONS].load(Ordering::Acquire);
        let mut rp = p[RSP_PROD].load(Ordering::Relaxed);
        while rp.wrapping_sub(rc) < 1024 {
            let Some(b) = self.outbuf.pop_front() else {
                break;
            };
            put(p, 1024, rp, b);
            rp = rp.wrapping_add(1);
        }
        p[RSP_PROD].store(rp, Ordering::Release);
    }
}
