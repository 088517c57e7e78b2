//! Secure-inference links in one process: frames inside the encrypted records, tampering and
//! replay, deadlines, chunked messages, and the authenticated handshake against hostile peers
//! (wrong key, duplicate role, garbage, a silent connection). Nothing hangs, every failure is
//! named, and a refused connection receives nothing.
use brelu::secure::conn::{mem_pair, Conn, MemConn};
use brelu::secure::link::{Link, LinkConfig};
use brelu::secure::noise::{self, handshake_pair, Identity, RecordWriter, Trust};
use brelu::secure::party::{local_streams, Join, LocalNet, Party};
use brelu::secure::wire::{Header, Kind};
use brelu::secure::{Role, Settings};
use brelu::Error;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Links are tested over in-memory connections: what they carry, not the network.
fn pair() -> (MemConn, MemConn) {
    mem_pair()
}

fn short() -> LinkConfig {
    LinkConfig {
        timeout: Duration::from_millis(400),
        max_frame: 1 << 20,
        max_ahead: 1 << 20,
        ..LinkConfig::default()
    }
}

/// A link on one end of a fresh authenticated connection, an encrypting writer on the other
/// end (to send hand-made frames) and that end's raw stream (to send bytes past the cipher).
fn authenticated(cfg: LinkConfig) -> (Link, RecordWriter, MemConn) {
    let (mut a, mut b) = pair();
    let (ta, tb) = handshake_pair(&mut a, &mut b).unwrap();
    let link = Link::new(Box::new(a), "peer", cfg, ta).unwrap();
    let w = RecordWriter::new(b.try_clone_conn().unwrap(), tb, Duration::from_secs(5));
    (link, w, b)
}

fn frame(kind: Kind, tag: u32, seq: u32, payload: &[u8]) -> Vec<u8> {
    let h = Header {
        kind,
        more: false,
        tag,
        seq,
        len: payload.len() as u32,
    };
    let mut f = h.encode().to_vec();
    f.extend_from_slice(payload);
    f
}

fn send(w: &mut RecordWriter, bytes: &[u8]) {
    w.write_all(bytes).unwrap();
    w.flush().unwrap();
}

#[test]
fn malformed_oversize_and_closed_frames_are_errors() {
    // Bad magic inside an authentic record.
    let (mut link, mut w, _b) = authenticated(short());
    send(&mut w, b"XXXXXXXXXXXXXXXXXXXX");
    let e = link.recv(Kind::Data, 0, 4).unwrap_err();
    assert!(matches!(e, Error::Malformed { .. }), "{e}");
    // Oversize length: rejected from the header, before anything is allocated.
    let (mut link, mut w, _b) = authenticated(short());
    let h = Header {
        kind: Kind::Data,
        more: false,
        tag: 0,
        seq: 0,
        len: u32::MAX,
    };
    send(&mut w, &h.encode());
    let e = link.recv(Kind::Data, 0, 4).unwrap_err();
    assert!(e.to_string().contains("exceeds the maximum"), "{e}");
    // A frame longer than the message expected (but under the maximum): also refused from
    // its header.
    let (mut link, mut w, _b) = authenticated(short());
    let h = Header {
        kind: Kind::Data,
        more: false,
        tag: 0,
        seq: 0,
        len: 1000,
    };
    send(&mut w, &h.encode());
    let e = link.recv(Kind::Data, 0, 4).unwrap_err();
    assert!(e.to_string().contains("at most 4 expected"), "{e}");
    // Wrong step tag.
    let (mut link, mut w, _b) = authenticated(short());
    send(&mut w, &frame(Kind::Data, 3, 0, &[1, 2]));
    let e = link.recv(Kind::Data, 4, 2).unwrap_err();
    assert!(matches!(e, Error::Malformed { .. }), "{e}");
    // The dealer's offline frames may run ahead of online ones; they wait until asked for.
    let (mut link, mut w, _b) = authenticated(short());
    link.accepts_offline = true;
    let mut all = Vec::new();
    for (seq, (kind, tag, byte)) in [
        (Kind::Offline, 5, 1u8),
        (Kind::Data, 2, 2),
        (Kind::Offline, 5, 3),
    ]
    .into_iter()
    .enumerate()
    {
        all.extend(frame(kind, tag, seq as u32, &[byte]));
    }
    send(&mut w, &all);
    assert_eq!(link.recv(Kind::Data, 2, 1).unwrap(), vec![2]);
    assert_eq!(link.recv(Kind::Offline, 5, 1).unwrap(), vec![1]);
    assert_eq!(link.recv(Kind::Offline, 5, 1).unwrap(), vec![3]);
    // ... but from any other peer an offline frame out of order is a violation, not buffered.
    let (mut link, mut w, _b) = authenticated(short());
    send(&mut w, &frame(Kind::Offline, 5, 0, &[1]));
    let e = link.recv(Kind::Data, 2, 1).unwrap_err();
    assert!(matches!(e, Error::Malformed { .. }), "{e}");
    // An offline flood beyond the limit ends the session instead of filling memory.
    let (mut link, mut w, _b) = authenticated(short());
    link.accepts_offline = true;
    let chunk = vec![7u8; 1 << 19];
    let mut flood = Vec::new();
    for seq in 0..3 {
        flood.extend(frame(Kind::Offline, 9, seq, &chunk));
    }
    send(&mut w, &flood);
    let e = link.recv(Kind::Data, 0, 1).unwrap_err();
    assert!(e.to_string().contains("sent ahead"), "{e}");
    // A truncated frame: the header promises 100 bytes, 10 arrive, then the peer closes.
    let (mut link, mut w, b) = authenticated(short());
    let mut f = frame(Kind::Data, 0, 0, &[5u8; 100]);
    f.truncate(16 + 10);
    send(&mut w, &f);
    drop((w, b));
    let e = link.recv(Kind::Data, 0, 100).unwrap_err();
    assert!(matches!(e, Error::Link { .. }), "{e}");
    // Closed connection.
    let (mut link, w, b) = authenticated(short());
    drop((w, b));
    let e = link.recv(Kind::Data, 0, 4).unwrap_err();
    assert!(matches!(e, Error::Link { .. }), "{e}");
    // Stalled peer: a timeout, not a hang.
    let (mut link, _w, _b) = authenticated(short());
    let t = Instant::now();
    let e = link.recv(Kind::Data, 0, 4).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3));
}

/// A record changed, replayed, or bytes injected past the cipher end the session by name.
#[test]
fn tampered_and_replayed_records_are_refused() {
    // Capture one genuine record as it travels.
    let (mut a, mut b) = pair();
    let (ta, tb) = handshake_pair(&mut a, &mut b).unwrap();
    let mut w = RecordWriter::new(b.try_clone_conn().unwrap(), tb, Duration::from_secs(5));
    send(&mut w, &frame(Kind::Data, 0, 0, &[1, 2, 3, 4]));
    let mut record = vec![0u8; 2 + 16 + 4 + 16];
    a.read_exact(&mut record).unwrap();
    let cfg = short();
    // Replayed: the genuine record, twice.
    let mut link = Link::new(Box::new(a), "server", cfg, ta.clone()).unwrap();
    w.write_raw(&record).unwrap();
    w.write_raw(&record).unwrap();
    assert_eq!(link.recv(Kind::Data, 0, 4).unwrap(), vec![1, 2, 3, 4]);
    let e = link.recv(Kind::Data, 0, 4).unwrap_err();
    assert!(matches!(e, Error::Tampered { .. }), "{e}");
    assert!(e.to_string().contains("server"), "{e}");
    // Tampered: one bit of a fresh record flipped.
    let (mut link, mut w, mut raw) = authenticated(cfg);
    let _ = &mut w;
    let mut fake = record.clone();
    fake[5] ^= 1;
    raw.write_all(&fake).unwrap();
    let e = link.recv(Kind::Data, 0, 4).unwrap_err();
    assert!(matches!(e, Error::Tampered { .. }), "{e}");
    // Plaintext bytes injected into an established link.
    let (mut link, _w, mut raw) = authenticated(cfg);
    raw.write_all(&[40, 0]).unwrap();
    raw.write_all(&frame(Kind::Data, 0, 0, &[0u8; 24])).unwrap();
    let e = link.recv(Kind::Data, 0, 24).unwrap_err();
    assert!(matches!(e, Error::Tampered { .. }), "{e}");
}

/// A peer that sends a frame one byte at a time stays within any per-syscall timeout; the
/// deadline per frame still ends the wait.
#[test]
fn a_trickling_peer_times_out() {
    let (mut link, _w, b) = authenticated(short());
    let mut raw = b.try_clone_conn().unwrap();
    let trickle = std::thread::spawn(move || {
        // A record of 65,535 bytes announced, then a byte every 100 ms for 3 s, then the
        // connection closed: with a timeout per read the link would see that close (a Link
        // error); with the 0.4 s deadline per frame it times out long before.
        for _ in 0..30 {
            if raw.write_all(&[0xff]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = raw.shutdown_both();
    });
    let e = link.recv(Kind::Data, 0, 4).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    drop(link);
    let _ = trickle.join();
}

/// A message larger than the maximum frame travels as several frames and arrives whole.
#[test]
fn large_messages_travel_in_frames() {
    let (mut a, mut b) = pair();
    let (ta, tb) = handshake_pair(&mut a, &mut b).unwrap();
    let cfg = LinkConfig {
        max_frame: 1000,
        ..short()
    };
    let mut rx = Link::new(Box::new(a), "client", cfg, ta).unwrap();
    let mut tx = Link::new(Box::new(b), "server", cfg, tb).unwrap();
    let big: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    tx.send(Kind::Data, 1, &big).unwrap();
    tx.send(Kind::Data, 2, &[]).unwrap();
    tx.send(Kind::Data, 3, &big[..1000]).unwrap();
    assert_eq!(tx.frames_sent(), 100 + 1 + 1);
    assert_eq!(rx.recv(Kind::Data, 1, big.len()).unwrap(), big);
    assert_eq!(rx.recv(Kind::Data, 2, 0).unwrap(), Vec::<u8>::new());
    // The receiver's expected length is checked across frames too.
    let e = rx.recv(Kind::Data, 3, 999).unwrap_err();
    assert!(e.to_string().contains("at most 999"), "{e}");
    // Counted bytes are the bytes on the wire: frames, record headers and tags.
    let wire = brelu::secure::link::wire_len;
    assert_eq!(tx.bytes_sent(), 101 * wire(1016) + wire(16));
    tx.finish().unwrap();
}

/// Keys for a session plus a fourth identity nobody pinned.
fn keys() -> ([(Identity, Trust); 3], Identity) {
    (
        noise::ephemeral_session().unwrap(),
        Identity::generate(Role::Dealer).unwrap(),
    )
}

fn join<'a>(k: &'a (Identity, Trust), hash: &'a str, cfg: LinkConfig) -> Join<'a> {
    Join {
        identity: &k.0,
        trust: &k.1,
        settings: Settings::default(),
        session_hash: hash,
        cfg,
        layers: 1,
    }
}

#[test]
fn session_hash_mismatch_is_named() {
    let [c, s, d] = local_streams(LocalNet::Memory).unwrap();
    let (k, _) = keys();
    let cfg = short();
    let (rc, rs, rd) = std::thread::scope(|sc| {
        let a = sc.spawn(|| join(&k[0], "aaaa", cfg).connected(c).map(|_| ()));
        let b = sc.spawn(|| join(&k[1], "bbbb", cfg).connected(s).map(|_| ()));
        let e = sc.spawn(|| join(&k[2], "aaaa", cfg).connected(d).map(|_| ()));
        (a.join().unwrap(), b.join().unwrap(), e.join().unwrap())
    });
    let e = rc.unwrap_err();
    assert!(matches!(e, Error::SessionMismatch { .. }), "{e}");
    assert!(e.to_string().contains("server"), "{e}");
    assert!(matches!(rs.unwrap_err(), Error::SessionMismatch { .. }));
    // The dealer agrees with the client, but not with the server.
    assert!(rd.is_err());
}

/// Reads everything a connection receives until it closes.
fn drain(mut s: TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

/// The handshake payload a party sends (role, an ephemeral key, the session hash).
fn hello(role: Role, hash: &str) -> Vec<u8> {
    let mut h = vec![role as u8];
    h.extend([9u8; 32]);
    h.extend(hash.as_bytes());
    h.resize(97, b' ');
    h
}

/// Dials `addr` as `id` towards the client whose key is `client`.
fn dial(addr: std::net::SocketAddr, id: &Identity, client: &[u8; 32]) -> Result<(), Error> {
    let mut s = TcpStream::connect(addr).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    noise::initiate(
        &mut s,
        id,
        Role::Client,
        client,
        &hello(id.role, "h"),
        deadline,
    )
    .map(|_| ())
}

/// The client listens for server and dealer while hostile connections arrive: garbage, an
/// impostor dealer with an unpinned key, a preamble for another role, and a second dealer
/// after the real one. Each is refused by name and receives nothing; the real parties join.
#[test]
fn the_listener_refuses_impostors_and_keeps_waiting() {
    let (k, impostor) = keys();
    let cfg = LinkConfig {
        timeout: Duration::from_secs(30),
        ..short()
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client_key = k[0].0.public;
    let refusals = std::sync::Mutex::new(Vec::<String>::new());
    std::thread::scope(|sc| {
        let client = sc.spawn(|| {
            let mut on_refused = |e: &Error| {
                assert!(matches!(e, Error::Refused { .. }), "{e}");
                refusals.lock().unwrap().push(e.to_string());
            };
            join(&k[0], "h", cfg).listening(Vec::new(), &listener, &mut on_refused)
        });
        // Garbage before any handshake.
        let mut g = TcpStream::connect(addr).unwrap();
        g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert!(drain(g).is_empty(), "garbage got an answer");
        // An impostor dealer: a valid handshake, but with a key nobody pinned. It sees the
        // connection close before a single byte comes back.
        let e = dial(addr, &impostor, &client_key).unwrap_err();
        assert!(matches!(e, Error::Refused { .. }), "{e}");
        assert!(e.to_string().contains("closed the connection"), "{e}");
        // A preamble addressed to the server's role.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"BRNK\x01\x02\x01\x00").unwrap();
        assert!(drain(s).is_empty());
        // The real dealer, then a second connection with the dealer's own key.
        dial(addr, &k[2].0, &client_key).unwrap();
        let e = dial(addr, &k[2].0, &client_key).unwrap_err();
        assert!(matches!(e, Error::Refused { .. }), "{e}");
        // The real server completes the session's links.
        dial(addr, &k[1].0, &client_key).unwrap();
        let p: Party = client.join().unwrap().unwrap();
        drop(p);
    });
    let r = refusals.into_inner().unwrap();
    assert_eq!(r.len(), 4, "{r:?}");
    assert!(r[0].contains("not a brelu handshake"), "{r:?}");
    assert!(
        r[1].contains("dealer") && r[1].contains("does not hold the pinned dealer key"),
        "{r:?}"
    );
    assert!(r[2].contains("wants to reach role 1"), "{r:?}");
    assert!(
        r[3].contains("dealer") && r[3].contains("not expected here"),
        "{r:?}"
    );
}

/// With a wrong pinned key the listener refuses the real dealer and, at its timeout, names
/// the role that never authenticated and why.
#[test]
fn a_wrong_pinned_key_is_refused_by_name() {
    let (mut k, other) = keys();
    k[0].1.pin(Role::Dealer, other.public);
    let cfg = LinkConfig {
        timeout: Duration::from_secs(3),
        connect_timeout: Duration::from_secs(3),
        ..short()
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client_key = k[0].0.public;
    std::thread::scope(|sc| {
        let client =
            sc.spawn(|| join(&k[0], "h", cfg).listening(Vec::new(), &listener, &mut |_| {}));
        let e = dial(addr, &k[2].0, &client_key).unwrap_err();
        assert!(matches!(e, Error::Refused { .. }), "{e}");
        let e = client
            .join()
            .unwrap()
            .err()
            .expect("the client must refuse");
        let m = e.to_string();
        assert!(matches!(e, Error::Refused { .. }), "{m}");
        assert!(
            m.contains("dealer") && m.contains("pinned dealer key"),
            "{m}"
        );
    });
}
