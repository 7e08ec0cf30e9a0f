//! Real peer: libxenstore's own clients (Debian's `xenstore-write`, `xenstore-read`,
//! `xenstore-ls`, `xenstore-watch`) talk to a server built on the crate's codec over a unix
//! socket (`XENSTORED_PATH`), and get correct answers. Skipped when xenstore-utils is absent.

mod xsd;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oskit_xen_suspend::xenstore::wire::{HEADER_LEN, Header};
use xsd::Xsd;

type Conns = Arc<Mutex<HashMap<u32, UnixStream>>>;

/// Serves one connection: header through the crate's codec, payload, replies and events.
fn serve(conn: u32, mut s: UnixStream, xsd: Arc<Mutex<Xsd>>, conns: Conns) {
    loop {
        let mut raw = [0u8; HEADER_LEN];
        if s.read_exact(&mut raw).is_err() {
            break;
        }
        let h = match Header::parse(&raw) {
            Ok(h) => h,
            Err(e) => {
                eprintln!("xsd: bad header from the client: {e:?}");
                break;
            }
        };
        let mut payload = vec![0u8; h.len as usize];
        if s.read_exact(&mut payload).is_err() {
            break;
        }
        let out = xsd.lock().unwrap().handle(conn, h, &payload);
        let mut conns = conns.lock().unwrap();
        for (to, rh, body) in out {
            if let Some(c) = conns.get_mut(&to) {
                let mut msg = rh.encode().to_vec();
                msg.extend_from_slice(&body);
                let _ = c.write_all(&msg);
            }
        }
    }
    conns.lock().unwrap().remove(&conn);
    xsd.lock().unwrap().watches.retain(|w| w.0 != conn);
}

fn start_server(path: &Path) -> Arc<Mutex<Xsd>> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).expect("bind the test socket");
    let xsd = Arc::new(Mutex::new(Xsd::new()));
    let conns: Conns = Arc::default();
    let (x, c) = (xsd.clone(), conns.clone());
    std::thread::spawn(move || {
        for (id, stream) in (1u32..).zip(listener.incoming()) {
            let Ok(stream) = stream else { break };
            c.lock()
                .unwrap()
                .insert(id, stream.try_clone().expect("clone stream"));
            let (x, c) = (x.clone(), c.clone());
            std::thread::spawn(move || serve(id, stream, x, c));
        }
    });
    xsd
}

/// Runs a tool against the socket, killed after 10 s.
fn tool(sock: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .env("XENSTORED_PATH", sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "{:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn missing_tools() -> Option<String> {
    if cfg!(miri) {
        return Some("Miri cannot open sockets or run the xenstore tools".into());
    }
    for t in [
        "xenstore-read",
        "xenstore-write",
        "xenstore-ls",
        "xenstore-watch",
    ] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()));
        if !found {
            return Some(format!("{t} not found (package xenstore-utils)"));
        }
    }
    None
}

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("oskit-xsd-{}-{name}.sock", std::process::id()))
}

#[test]
fn peer_xenstore_tools_talk_to_the_codec_server() {
    if let Some(why) = missing_tools() {
        println!("skipped: {why}");
        return;
    }
    let sock = socket_path("tools");
    let xsd = start_server(&sock);

    stdout(&tool(
        &sock,
        &["xenstore-write", "/vm/name", "guest-1", "/vm/uuid", "42"],
    ));
    assert_eq!(
        xsd.lock().unwrap().tree.get("/vm/name").unwrap(),
        b"guest-1"
    );
    assert_eq!(
        stdout(&tool(&sock, &["xenstore-read", "/vm/name"])),
        "guest-1\n"
    );
    assert_eq!(
        stdout(&tool(&sock, &["xenstore-read", "/vm/name", "/vm/uuid"])),
        "guest-1\n42\n"
    );
    // A missing node: the tool reports our XS_ERROR ENOENT as a failure.
    let missing = tool(&sock, &["xenstore-read", "/vm/nope"]);
    assert!(!missing.status.success());

    let ls = stdout(&tool(&sock, &["xenstore-ls", "/vm"]));
    assert_eq!(ls, "name = \"guest-1\"\nuuid = \"42\"\n");

    // xenstore-watch prints the registration's event and the next write's, then exits.
    let watcher = {
        let sock = sock.clone();
        std::thread::spawn(move || tool(&sock, &["xenstore-watch", "-n", "2", "/vm"]))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while xsd.lock().unwrap().watches.is_empty() {
        assert!(Instant::now() < deadline, "xenstore-watch never registered");
        std::thread::sleep(Duration::from_millis(10));
    }
    stdout(&tool(&sock, &["xenstore-write", "/vm/state", "running"]));
    let watched = stdout(&watcher.join().unwrap());
    let lines: Vec<&str> = watched.lines().collect();
    assert_eq!(lines, ["/vm", "/vm/state"], "{watched:?}");

    // Every request the tools sent parsed through the crate's codec.
    let seen = xsd.lock().unwrap().seen.clone();
    assert!(seen.len() >= 8, "{seen:?}");
    let _ = std::fs::remove_file(&sock);
}
