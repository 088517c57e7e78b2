//! The attacks of issue 32, each against a session that must survive it or end it by name:
//! a recorded first handshake message replayed into a later session, silent sockets queued at
//! a listener, links of two concurrent sessions spliced by a relay, and records flipped,
//! reordered, dropped or cut inside one session.
use brelu::secure::conn::{mem_pair, Conn, Stream};
use brelu::secure::join::{connect_retry, local_streams, Join, LocalNet};
use brelu::secure::link::{Link, LinkConfig};
use brelu::secure::noise::{self, handshake_pair, Identity, Trust};
use brelu::secure::party::Party;
use brelu::secure::wire::Kind;
use brelu::secure::{Role, Settings};
use brelu::Error;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

fn join<'a>(k: &'a (Identity, Trust), cfg: LinkConfig) -> Join<'a> {
    Join {
        identity: &k.0,
        trust: &k.1,
        settings: Settings::default(),
        session_hash: "attack-test",
        cfg,
        layers: 1,
    }
}

fn cfg() -> LinkConfig {
    LinkConfig {
        timeout: Duration::from_secs(20),
        connect_timeout: Duration::from_secs(20),
        ..LinkConfig::default()
    }
}

/// A session as `brelu secure party` runs one: the client listens for the server and the
/// dealer, the server dials the client and listens for the dealer, the dealer dials both.
/// `attack` runs once both listen and before the server and dealer start. Returns each
/// party's result and the client's refusals.
fn listened_session(
    k: &[(Identity, Trust); 3],
    attack: impl FnOnce(SocketAddr, SocketAddr),
) -> ([Result<Party, Error>; 3], Vec<String>) {
    let (lc, ls) = (
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    let (ac, as_) = (lc.local_addr().unwrap(), ls.local_addr().unwrap());
    let refusals = Mutex::new(Vec::new());
    let c = cfg();
    let results = std::thread::scope(|sc| {
        let client = sc.spawn(|| {
            let mut on = |e: &Error| refusals.lock().unwrap().push(e.to_string());
            join(&k[0], c).listening(Vec::new(), &lc, &mut on)
        });
        attack(ac, as_);
        let server = sc.spawn(|| {
            let s = connect_retry(&ac.to_string(), "client", c.connect_timeout)?;
            join(&k[1], c).listening(vec![(Role::Client, s)], &ls, &mut |_| {})
        });
        let dealer = sc.spawn(|| {
            let s1 = connect_retry(&ac.to_string(), "client", c.connect_timeout)?;
            let s2 = connect_retry(&as_.to_string(), "server", c.connect_timeout)?;
            join(&k[2], c).connected(vec![(Role::Client, s1), (Role::Server, s2)])
        });
        [client, server, dealer].map(|h| h.join().unwrap())
    });
    (results, refusals.into_inner().unwrap())
}

/// What a passive network attacker records of the dealer dialing the client: its preamble
/// and first handshake message (the dealer's real keys, a fresh ephemeral key).
fn recorded_first_message(dealer: &Identity, client: &[u8; 32]) -> Vec<u8> {
    let (mut a, mut b) = mem_pair();
    std::thread::scope(|sc| {
        let h = sc.spawn(move || {
            let by = Instant::now() + Duration::from_secs(2);
            noise::initiate(&mut a, dealer, Role::Client, client, &[], by).err()
        });
        let mut rec = vec![0u8; 10];
        b.read_exact(&mut rec).unwrap();
        let len = u16::from_le_bytes([rec[8], rec[9]]) as usize;
        let mut body = vec![0u8; len];
        b.read_exact(&mut body).unwrap();
        rec.extend(body);
        drop(b);
        assert!(
            h.join().unwrap().is_some(),
            "no reply: the recording ends there"
        );
        rec
    })
}

/// Before issue 32 a replayed first message authenticated and took the dealer's role: the
/// real dealer was refused as "already connected". Now a role is taken only by a link whose
/// initiator confirmed the keys, which a recording cannot; the real session forms.
#[test]
fn a_replayed_first_message_leaves_the_session_intact() {
    let k = noise::ephemeral_session().unwrap();
    let recording = recorded_first_message(&k[2].0, &k[0].0.public);
    let held = Mutex::new(Vec::new());
    let (r, refusals) = listened_session(&k, |client, _| {
        for _ in 0..3 {
            let mut s = TcpStream::connect(client).unwrap();
            s.write_all(&recording).unwrap();
            held.lock().unwrap().push(s);
        }
        // The listener answers each replay (it cannot tell it from the real dealer yet).
        std::thread::sleep(Duration::from_millis(200));
    });
    for (role, p) in ["client", "server", "dealer"].iter().zip(&r) {
        assert!(p.is_ok(), "{role}: {:?}", p.as_ref().err());
    }
    assert!(
        refusals.iter().any(|e| e.contains("no key confirmation")),
        "{refusals:?}"
    );
}

/// Before issue 32 the listener handshook one connection at a time, up to 10 s each: a dozen
/// silent sockets outlasted the peers' connect timeout. Now they wait side by side (the
/// oldest beyond the per-address limit is ended) and each is dropped after 1 s.
#[test]
fn silent_sockets_do_not_stop_a_session_from_forming() {
    let k = noise::ephemeral_session().unwrap();
    let held = Mutex::new(Vec::new());
    let (r, refusals) = listened_session(&k, |client, server| {
        for i in 0..60 {
            let to = if i % 4 == 3 { server } else { client };
            held.lock().unwrap().push(TcpStream::connect(to).unwrap());
        }
    });
    // Forming at all proves it: every party's connect timeout is 20 s, and 60 handshakes one
    // after another, at up to 10 s each as before, would have outlasted it.
    for (role, p) in ["client", "server", "dealer"].iter().zip(&r) {
        assert!(p.is_ok(), "{role}: {:?}", p.as_ref().err());
    }
    assert!(!refusals.is_empty(), "the silent sockets were not refused");
}

/// Two concurrent sessions with the same keys, model and settings; a relay swaps their
/// client-server links. Every party of both sessions stops, and each session names the
/// other session's link.
#[test]
fn links_of_two_sessions_spliced_by_a_relay_end_both() {
    let k = noise::ephemeral_session().unwrap();
    let [mut ca, sa, da] = local_streams(LocalNet::Memory).unwrap();
    let [mut cb, sb, db] = local_streams(LocalNet::Memory).unwrap();
    let to_server = |v: &Vec<(Role, Stream)>| v.iter().position(|(r, _)| *r == Role::Server);
    let (ia, ib) = (to_server(&ca).unwrap(), to_server(&cb).unwrap());
    std::mem::swap(&mut ca[ia].1, &mut cb[ib].1);
    let c = LinkConfig {
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        ..LinkConfig::default()
    };
    let results: Vec<Result<Party, Error>> = std::thread::scope(|sc| {
        let hs: Vec<_> = [(0, ca), (1, sa), (2, da), (0, cb), (1, sb), (2, db)]
            .into_iter()
            .map(|(i, s)| {
                let k = &k;
                sc.spawn(move || join(&k[i], c).connected(s))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (session, rs) in ["A", "B"].iter().zip(results.chunks(3)) {
        let errs: Vec<String> = rs
            .iter()
            .map(|r| match r {
                Ok(_) => panic!("session {session}: a party started on spliced links"),
                Err(e) => e.to_string(),
            })
            .collect();
        assert!(
            rs.iter()
                .any(|r| matches!(r, Err(Error::OtherSession { .. }))),
            "session {session}: {errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("belongs to another session")),
            "{errs:?}"
        );
    }
}

/// What a relay does to the sender's records after the handshake.
#[derive(Clone, Copy, Debug)]
enum Op {
    Flip,
    Reorder,
    Drop,
    Cut,
}

/// A link to a receiver through a relay that applies `op` at record `at` (of the records
/// after the handshake); returns the sender's link and the receiver's.
fn relayed(op: Op, at: usize) -> (Link, Link) {
    let (mut x, mut y) = mem_pair();
    let (t_client, t_server) = handshake_pair(&mut x, &mut y).unwrap();
    let (a, mut from) = mem_pair();
    let (mut to, b) = mem_pair();
    std::thread::spawn(move || {
        let read = |s: &mut dyn Conn| -> Option<Vec<u8>> {
            let mut len = [0u8; 2];
            s.read_exact(&mut len).ok()?;
            let mut r = len.to_vec();
            r.resize(2 + u16::from_le_bytes(len) as usize, 0);
            s.read_exact(&mut r[2..]).ok()?;
            Some(r)
        };
        let mut i = 0;
        while let Some(mut r) = read(&mut from) {
            if i == at {
                match op {
                    Op::Flip => r[5] ^= 0x10,
                    Op::Reorder => {
                        let next = read(&mut from).unwrap();
                        let _ = to.write_all(&next);
                        i += 1;
                    }
                    Op::Drop => {
                        i += 1;
                        continue;
                    }
                    Op::Cut => {
                        let _ = to.write_all(&r);
                        let _ = to.shutdown_both();
                        return;
                    }
                }
            }
            if to.write_all(&r).is_err() {
                return;
            }
            i += 1;
        }
        let _ = to.shutdown_both();
    });
    let cfg = LinkConfig {
        timeout: Duration::from_secs(5),
        ..LinkConfig::default()
    };
    (
        Link::new(Box::new(a), "client", cfg, t_server).unwrap(),
        Link::new(Box::new(b), "server", cfg, t_client).unwrap(),
    )
}

/// A bit flipped, two records swapped, a record dropped, or the connection cut at a record
/// boundary, inside an authenticated session: the receiver takes the messages before it and
/// ends at the change, naming the peer.
#[test]
fn records_changed_in_flight_end_the_session_by_name() {
    let msgs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 100 + i as usize]).collect();
    for op in [Op::Flip, Op::Reorder, Op::Drop, Op::Cut] {
        let at = 2;
        let (mut tx, mut rx) = relayed(op, at);
        for (i, m) in msgs.iter().enumerate() {
            tx.send(Kind::Data, i as u32, m).unwrap();
        }
        let mut got = 0;
        let err = loop {
            match rx.recv(Kind::Data, got as u32, msgs[got].len()) {
                Ok(v) => {
                    assert_eq!(v, msgs[got], "{op:?}: message {got}");
                    got += 1;
                }
                Err(e) => break e,
            }
        };
        // Each message is one record: the change shows at record `at` (after a cut, at the
        // one after it).
        let want = if matches!(op, Op::Cut) { at + 1 } else { at };
        assert_eq!(got, want, "{op:?}: {err}");
        let m = err.to_string();
        match op {
            Op::Cut => assert!(
                matches!(err, Error::Link { .. }) && m.contains("closed"),
                "{op:?}: {m}"
            ),
            _ => assert!(matches!(err, Error::Tampered { .. }), "{op:?}: {m}"),
        }
        assert!(m.contains("server"), "{op:?}: {m}");
        drop(tx);
    }
}

/// Reads everything a connection receives until it closes.
fn drain(mut s: TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

/// Dials `addr` as `id` towards the client whose key is `client` and runs the first two
/// handshake messages (no key confirmation).
fn dial(addr: SocketAddr, id: &Identity, client: &[u8; 32]) -> Result<(), Error> {
    let mut s = TcpStream::connect(addr).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    noise::initiate(&mut s, id, Role::Client, client, &[], deadline).map(|_| ())
}

/// Hostile connections reach the client's listener before the real peers: garbage, an
/// impostor dealer with an unpinned key, a preamble for another role. Each is refused by
/// name and receives nothing; the real parties then form the session.
#[test]
fn the_listener_refuses_impostors_and_keeps_waiting() {
    let (k, impostor) = (
        noise::ephemeral_session().unwrap(),
        Identity::generate(Role::Dealer).unwrap(),
    );
    let (r, refusals) = listened_session(&k, |client, _| {
        let mut g = TcpStream::connect(client).unwrap();
        g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert!(drain(g).is_empty(), "garbage got an answer");
        // An impostor dealer: a valid handshake, but with a key nobody pinned. It sees the
        // connection close before a single byte comes back.
        let e = dial(client, &impostor, &k[0].0.public).unwrap_err();
        assert!(matches!(e, Error::Refused { .. }), "{e}");
        assert!(e.to_string().contains("closed the connection"), "{e}");
        let mut s = TcpStream::connect(client).unwrap();
        s.write_all(b"BRNK\x02\x02\x01\x00").unwrap();
        assert!(drain(s).is_empty());
    });
    for (role, p) in ["client", "server", "dealer"].iter().zip(&r) {
        assert!(p.is_ok(), "{role}: {:?}", p.as_ref().err());
    }
    assert_eq!(refusals.len(), 3, "{refusals:?}");
    assert!(
        refusals[0].contains("not a brelu handshake"),
        "{refusals:?}"
    );
    assert!(
        refusals[1].contains("dealer")
            && refusals[1].contains("does not hold the pinned dealer key"),
        "{refusals:?}"
    );
    assert!(
        refusals[2].contains("wants to reach role 1"),
        "{refusals:?}"
    );
}

/// With a wrong pinned key the listener refuses the real dealer and, at its timeout, names
/// the role that never authenticated and why.
#[test]
fn a_wrong_pinned_key_is_refused_by_name() {
    let mut k = noise::ephemeral_session().unwrap();
    let other = Identity::generate(Role::Dealer).unwrap();
    k[0].1.pin(Role::Dealer, other.public);
    let c = LinkConfig {
        timeout: Duration::from_secs(3),
        connect_timeout: Duration::from_secs(3),
        ..LinkConfig::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client_key = k[0].0.public;
    std::thread::scope(|sc| {
        let client = sc.spawn(|| join(&k[0], c).listening(Vec::new(), &listener, &mut |_| {}));
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
