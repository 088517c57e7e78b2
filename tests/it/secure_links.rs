//! Secure-inference links in one process: frames inside the encrypted records, tampering and
//! replay, deadlines, chunked messages, a session hash mismatch. Nothing hangs and every
//! failure is named. The handshake against hostile peers is in `secure_attacks`.
use brelu::secure::conn::{mem_pair, Conn, MemConn};
use brelu::secure::join::{local_streams, Join, LocalNet};
use brelu::secure::link::{Link, LinkConfig};
use brelu::secure::noise::{self, handshake_pair, Identity, RecordWriter, Trust};
use brelu::secure::wire::{Header, Kind};
use brelu::secure::{Role, Settings};
use brelu::Error;
use std::io::{Read, Write};
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

/// What a hostile peer can make a link hold or wait for is bounded: an empty frame announcing
/// more is refused (frames must make progress), empty frames kept ahead count their headers
/// and their number, and a message cut into slow frames must still arrive within one timeout.
#[test]
fn hostile_frame_streams_are_bounded() {
    let header = |kind, more, tag, seq, len| {
        Header {
            kind,
            more,
            tag,
            seq,
            len,
        }
        .encode()
    };
    // Endless `more` frames: the first empty one ends it.
    let (mut link, mut w, _b) = authenticated(short());
    let mut f = header(Kind::Data, true, 0, 0, 0).to_vec();
    f.extend(header(Kind::Data, true, 0, 1, 0));
    send(&mut w, &f);
    let e = link.recv(Kind::Data, 0, 4).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    // Empty offline frames ahead: their headers count against max_ahead, and their number is
    // capped whatever the byte limit.
    let flood = |max_ahead: usize, frames: u32| {
        let (mut link, mut w, _b) = authenticated(LinkConfig {
            max_ahead,
            ..short()
        });
        link.accepts_offline = true;
        let all: Vec<u8> = (0..frames)
            .flat_map(|seq| header(Kind::Offline, false, 7, seq, 0))
            .collect();
        send(&mut w, &all);
        link.recv(Kind::Data, 0, 1).unwrap_err().to_string()
    };
    let e = flood(1000, 100);
    assert!(e.contains("sent ahead"), "{e}");
    let e = flood(64 << 20, brelu::secure::link::MAX_AHEAD_FRAMES as u32 + 1);
    assert!(e.contains("65536 frames"), "{e}");
    // A 3-frame message whose frames come 0.3 s apart, each well within a 0.5 s timeout: the
    // message as a whole is not.
    let cfg = LinkConfig {
        timeout: Duration::from_millis(500),
        ..short()
    };
    let (mut link, w, _b) = authenticated(cfg);
    let slow = std::thread::spawn(move || {
        let mut w = w;
        for seq in 0..3u32 {
            let mut f = header(Kind::Data, seq < 2, 0, seq, 10).to_vec();
            f.extend([seq as u8; 10]);
            if w.write_all(&f).and_then(|_| w.flush()).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let e = link.recv(Kind::Data, 0, 30).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    drop(link);
    let _ = slow.join();
}
