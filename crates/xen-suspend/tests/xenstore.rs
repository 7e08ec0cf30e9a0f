//! The xenstore ring client against a software xenstored serving the shared page, golden
//! bytes from the header, and hostile servers.

mod xsd;

use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, Ordering};

use oskit_xen_suspend::hal::{Errno, XenStore};
use oskit_xen_suspend::shutdown::{SHUTDOWN_PATH, ShutdownActions};
use oskit_xen_suspend::xenstore::ring::{Ring, XenstoreDomainInterface};
use oskit_xen_suspend::xenstore::wire::{self, Header, WireError, msg};
use oskit_xen_suspend::xenstore::{StoreChannel, XsClient};
use oskit_xen_suspend::{Handled, Outcome, Request, ShutdownHandler};
use xsd::{RingServer, page};

/// The store channel: a notify counts, a wait lets xenstored run (up to `fuel` times).
struct Chan<'s, 'p> {
    server: &'s RefCell<RingServer<'p>>,
    fuel: u32,
}

impl StoreChannel for Chan<'_, '_> {
    type Error = Errno;
    fn notify(&mut self) {
        self.server.borrow_mut().notifies += 1;
    }
    fn wait(&mut self) -> Result<(), Errno> {
        if self.fuel == 0 {
            return Err(Errno(110)); // ETIMEDOUT
        }
        self.fuel -= 1;
        let mut s = self.server.borrow_mut();
        s.waits += 1;
        s.serve();
        Ok(())
    }
}

fn client<'s, 'p>(
    page: &'p [AtomicU32; 1024],
    server: &'s RefCell<RingServer<'p>>,
) -> XsClient<'p, Chan<'s, 'p>> {
    XsClient::new(Ring::new(page), Chan { server, fuel: 1000 })
}

#[test]
fn header_bytes_are_the_ones_libxenstore_sends() {
    // What `xenstore-read /foo` wrote to the socket (captured with a listening socket).
    let h = Header {
        ty: msg::READ,
        req_id: 0,
        tx_id: 0,
        len: 5,
    };
    assert_eq!(h.encode(), [2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0]);
    let h = Header {
        ty: msg::WATCH_EVENT,
        req_id: 0x0102_0304,
        tx_id: 7,
        len: 4096,
    };
    let raw = h.encode();
    assert_eq!(raw, [15, 0, 0, 0, 4, 3, 2, 1, 7, 0, 0, 0, 0, 0x10, 0, 0]);
    assert_eq!(Header::parse(&raw), Ok(h));
    // The numbers of xs_wire.h's enum, in order.
    assert_eq!(
        [
            msg::DIRECTORY,
            msg::READ,
            msg::WATCH,
            msg::UNWATCH,
            msg::TRANSACTION_START,
            msg::TRANSACTION_END,
            msg::WRITE,
            msg::MKDIR,
            msg::RM,
            msg::WATCH_EVENT,
            msg::ERROR
        ],
        [1, 2, 4, 5, 6, 7, 11, 12, 13, 15, 16]
    );
    assert_eq!(core::mem::size_of::<XenstoreDomainInterface>(), 2076);
}

#[test]
fn bad_headers_and_payloads_are_typed_errors() {
    let mut raw = Header {
        ty: 99,
        ..Header::default()
    }
    .encode();
    assert_eq!(Header::parse(&raw), Err(WireError::BadType(99)));
    raw[0] = msg::READ as u8;
    raw[12..16].copy_from_slice(&4097u32.to_le_bytes());
    assert_eq!(Header::parse(&raw), Err(WireError::TooLong(4097)));
    assert_eq!(wire::error_errno(b"EAGAIN\0"), Ok(11));
    assert_eq!(wire::error_errno(b"EWHAT\0"), Ok(22));
    assert_eq!(wire::error_errno(b"EAGAIN"), Err(WireError::BadString));
    assert_eq!(wire::parse_u32(b"17\0"), Ok(17));
    assert_eq!(wire::parse_u32(b"17"), Err(WireError::BadString));
    assert_eq!(wire::parse_u32(b"99999999999\0"), Err(WireError::BadString));
    assert_eq!(wire::parse_u32(b"1x\0"), Err(WireError::BadString));
    assert_eq!(wire::watch_event(b"a\0"), Err(WireError::BadString));
    assert_eq!(wire::watch_event(b"a\0t\0"), Ok((&b"a"[..], &b"t"[..])));
}

#[test]
fn read_write_directory_mkdir_rm_over_the_ring() {
    let page = page();
    let server = RefCell::new(RingServer::new(&page));
    let mut xs = client(&page, &server);
    xs.write(0, "/data/a", b"hello").unwrap();
    xs.mkdir(0, "/data/b").unwrap();
    let mut buf = [0u8; 16];
    let n = xs.read(0, "/data/a", &mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    assert_eq!(xs.read(0, "/nope", &mut buf), Err(WireError::Errno(2)));
    let n = xs.directory(0, "/data", &mut buf).unwrap();
    assert_eq!(&buf[..n], b"a\0b\0");
    xs.rm(0, "/data/a").unwrap();
    assert_eq!(xs.read(0, "/data/a", &mut buf), Err(WireError::Errno(2)));
    // A value longer than the buffer: truncated, full length returned.
    xs.write(0, "/big", &[7u8; 3000]).unwrap();
    let n = xs.read(0, "/big", &mut buf).unwrap();
    assert_eq!((n, buf), (3000, [7u8; 16]));
    // Every request had its own req_id.
    let ids: Vec<u32> = server.borrow().xsd.seen.iter().map(|s| s.1).collect();
    assert_eq!(ids, (0..ids.len() as u32).collect::<Vec<_>>());
    let too_long = vec![b'x'; 5000];
    assert_eq!(
        xs.write(0, "/big", &too_long),
        Err(WireError::RequestTooLong)
    );
}

#[test]
fn watch_events_are_queued_while_a_reply_is_awaited() {
    let page = page();
    let server = RefCell::new(RingServer::new(&page));
    let mut xs = client(&page, &server);
    xs.watch("/ctl", "tok").unwrap();
    xs.write(0, "/ctl/x", b"1").unwrap();
    let (mut p, mut t) = ([0u8; 32], [0u8; 8]);
    // The registration fired once, then the write.
    let (pl, tl) = xs.next_event(&mut p, &mut t).unwrap();
    assert_eq!((&p[..pl], &t[..tl]), (&b"/ctl"[..], &b"tok"[..]));
    // The write's event came after its reply: still in the ring.
    xs.poll().unwrap();
    let (pl, _) = xs.next_event(&mut p, &mut t).unwrap();
    assert_eq!(&p[..pl], b"/ctl/x");
    assert_eq!(xs.next_event(&mut p, &mut t), None);
    // An event with no request outstanding is picked up by poll.
    let body = b"/ctl/y\0tok\0";
    server.borrow_mut().send(
        Header {
            ty: msg::WATCH_EVENT,
            req_id: 0,
            tx_id: 0,
            len: body.len() as u32,
        },
        body,
    );
    server.borrow_mut().serve();
    xs.poll().unwrap();
    let (pl, _) = xs.next_event(&mut p, &mut t).unwrap();
    assert_eq!(&p[..pl], b"/ctl/y");
    xs.unwatch("/ctl", "tok").unwrap();
    assert!(server.borrow().xsd.watches.is_empty());
}

#[test]
fn the_shutdown_handler_runs_over_the_ring_client_and_retries_eagain() {
    struct Kernel(Vec<Request>);
    impl ShutdownActions for Kernel {
        fn shutdown(&mut self, r: Request) {
            self.0.push(r);
        }
        fn suspend(&mut self) -> Result<Outcome, oskit_xen_suspend::Error> {
            Ok(Outcome::Resumed)
        }
        fn sysrq(&mut self, _: u8) {}
        fn ignored(&mut self, _: &[u8]) {}
    }
    let page = page();
    let server = RefCell::new(RingServer::new(&page));
    let mut xs = client(&page, &server);
    let handler = ShutdownHandler::new();
    handler.advertise(&mut xs).unwrap();
    xs.write(0, SHUTDOWN_PATH, b"poweroff").unwrap();
    server.borrow_mut().xsd.conflicts = 2;
    let mut k = Kernel(vec![]);
    assert_eq!(
        handler.handle_shutdown(&mut xs, &mut k),
        Ok(Handled::Shutdown(Request::Poweroff))
    );
    let mut buf = [1u8; 8];
    assert_eq!(xs.read(0, SHUTDOWN_PATH, &mut buf), Ok(0), "acknowledged");
    let ends = server
        .borrow()
        .xsd
        .seen
        .iter()
        .filter(|s| s.0 == msg::TRANSACTION_END)
        .count();
    assert!(ends >= 3, "two conflicts, then a commit: {ends}");
    assert_eq!(k.0, [Request::Poweroff]);
    let mut b = [0u8; 4];
    let n = xs
        .read(0, "/local/domain/1/control/feature-suspend", &mut b)
        .unwrap();
    assert_eq!(&b[..n], b"1");
}

#[test]
fn resume_drops_stale_replies_and_registers_every_watch_again() {
    let page = page();
    let server = RefCell::new(RingServer::new(&page));
    let mut xs = client(&page, &server);
    xs.watch("/a", "1").unwrap();
    xs.watch("/b", "2").unwrap();
    let mut p = [0u8; 8];
    while xs.next_event(&mut p, &mut [0u8; 4]).is_some() {}
    // The old domain left a half-written reply in the ring; the new xenstored knows no
    // watches.
    server.borrow_mut().outbuf.extend([9u8; 7]);
    server.borrow_mut().serve();
    server.borrow_mut().xsd.watches.clear();
    xs.resume().unwrap();
    let watches: Vec<_> = server
        .borrow()
        .xsd
        .watches
        .iter()
        .map(|w| w.1.clone())
        .collect();
    assert_eq!(watches, ["/a", "/b"]);
    // And it works afterwards.
    xs.write(0, "/a/x", b"v").unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(xs.read(0, "/a/x", &mut buf), Ok(1));
}

#[test]
fn a_reply_with_another_req_id_is_refused() {
    let page = page();
    let server = RefCell::new(RingServer::new(&page));
    let mut xs = client(&page, &server);
    let body = b"OK\0";
    server.borrow_mut().inject = Header {
        ty: msg::WRITE,
        req_id: 77,
        tx_id: 0,
        len: 3,
    }
    .encode()
    .iter()
    .chain(body)
    .copied()
    .collect();
    assert_eq!(xs.write(0, "/x", b"1"), Err(WireError::BadId(77)));
}

#[test]
fn hostile_indices_and_headers_are_errors_not_panics() {
    let page = page();
    let server = RefCell::new(RingServer::new(&page));
    let mut xs = client(&page, &server);
    // rsp_prod far ahead of rsp_cons: more than a ring's worth unread.
    page[515].store(5000, Ordering::Release);
    assert_eq!(xs.poll(), Err(WireError::BadIndex));
    page[515].store(0, Ordering::Release);
    // req_cons ahead of req_prod: the space computation would underflow.
    page[512].store(3000, Ordering::Release);
    assert_eq!(xs.write(0, "/x", b"1"), Err(WireError::BadIndex));
    page[512].store(0, Ordering::Release);
    // A reply header claiming 5000 bytes.
    let page2 = page_with_reply(&Header {
        ty: msg::READ,
        req_id: 0,
        tx_id: 0,
        len: 5000,
    });
    let server2 = RefCell::new(RingServer::new(&page2));
    let mut xs2 = client(&page2, &server2);
    assert_eq!(xs2.poll(), Err(WireError::TooLong(5000)));
    // An error reply without its NUL.
    let page3 = xsd::page();
    let server3 = RefCell::new(RingServer::new(&page3));
    server3.borrow_mut().inject = Header {
        ty: msg::ERROR,
        req_id: 0,
        tx_id: 0,
        len: 6,
    }
    .encode()
    .iter()
    .chain(b"EAGAIN")
    .copied()
    .collect();
    let mut xs3 = client(&page3, &server3);
    assert_eq!(xs3.write(0, "/x", b"1"), Err(WireError::BadString));
    // A server that never answers: the channel's own error.
    let page4 = xsd::page();
    let server4 = RefCell::new(RingServer::new(&page4));
    let mut xs4 = XsClient::<_, 8>::new(Ring::new(&page4), Never { server: &server4 });
    assert_eq!(xs4.read(0, "/x", &mut []), Err(WireError::Channel(110)));
}

struct Never<'s, 'p> {
    server: &'s RefCell<RingServer<'p>>,
}

impl StoreChannel for Never<'_, '_> {
    type Error = Errno;
    fn notify(&mut self) {
        self.server.borrow_mut().notifies += 1;
    }
    fn wait(&mut self) -> Result<(), Errno> {
        Err(Errno(110))
    }
}

fn page_with_reply(h: &Header) -> Box<[AtomicU32; 1024]> {
    let p = page();
    let raw = h.encode();
    for (i, w) in raw.chunks(4).enumerate() {
        p[256 + i].store(u32::from_le_bytes(w.try_into().unwrap()), Ordering::Relaxed);
    }
    p[515].store(16, Ordering::Release);
    p
}

#[test]
fn a_transaction_is_retried_while_the_commit_answers_eagain() {
    let page = page();
    let server = RefCell::new(RingServer::new(&page));
    let mut xs = client(&page, &server);
    xs.write(0, "/n", b"1").unwrap();
    server.borrow_mut().xsd.conflicts = 2;
    let mut runs = 0;
    let r = xs.transaction(5, |xs, tx| {
        runs += 1;
        let mut b = [0u8; 4];
        let n = xs.read(tx, "/n", &mut b)?;
        xs.write(tx, "/n", &[b[..n][0] + 1])?;
        Ok(n)
    });
    assert_eq!((r, runs), (Ok(1), 3));
    let mut b = [0u8; 4];
    assert_eq!(xs.read(0, "/n", &mut b), Ok(1));
    assert_eq!(b[0], b'2', "committed once");
    // Out of tries: the last EAGAIN, nothing committed.
    server.borrow_mut().xsd.conflicts = 9;
    let r = xs.transaction(2, |xs, tx| xs.write(tx, "/n", b"x"));
    assert_eq!(r, Err(WireError::Errno(11)));
    assert_eq!(xs.read(0, "/n", &mut b), Ok(1));
    assert_eq!(b[0], b'2');
}
