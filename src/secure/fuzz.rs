//! Fuzzing entry point of the receive side of a link (`fuzz/fuzz_targets/link_recv.rs`), and a
//! seeded property test of the same that runs with `make test`.
//!
//! The first byte picks what the bytes attack: the handshake of a listening party (bytes
//! before any authentication), the key confirmation behind a valid handshake (the fuzzer
//! holds the dealer's real key, so its bytes are sealed records the listener decrypts and
//! parses), the frames inside an authenticated link (bytes sealed by the peer's genuine
//! cipher, so they reach the frame decoder, the sequence check, the pending buffer of early
//! offline frames and message reassembly), or raw bytes injected into an established link. Whatever arrives must end in an error or in a message of exactly the
//! expected length: never a panic, a hang, an allocation beyond the limits, or a reply to an
//! unauthenticated peer.
use super::conn::{mem_pair, Conn, MemConn};
use super::join::Join;
use super::link::{Link, LinkConfig};
use super::noise::{ephemeral_session, handshake_pair, initiate, respond, RecordWriter};
use super::party::Role;
use super::plan::Settings;
use super::wire::Kind;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// An in-memory connection whose far end never blocks its writer for long (the fuzzer writes
/// a whole input before the link reads it).
fn pair() -> (MemConn, MemConn) {
    let (a, b) = mem_pair();
    let _ = b.set_write_timeout(Some(CFG.timeout));
    (a, b)
}

/// Limits small enough that fuzz inputs reach them.
const CFG: LinkConfig = LinkConfig {
    timeout: Duration::from_secs(2),
    connect_timeout: Duration::from_secs(2),
    max_frame: 1024,
    max_ahead: 4096,
    ahead_batches: 1,
};

/// Feeds `data` to the receive side of a link; panics only on a broken invariant. Returns the
/// number of messages accepted (for the property test's coverage check).
pub fn link_recv(data: &[u8]) -> usize {
    let Some((&mode, rest)) = data.split_first() else {
        return 0;
    };
    match mode % 4 {
        0 => {
            handshake(rest);
            0
        }
        1 => frames(rest, true),
        2 => frames(rest, false),
        _ => keyed(rest) as usize,
    }
}

/// The receives [`link_recv`] makes for a control byte: (kind, tag, length) each.
pub fn receives(ctl: u8) -> Vec<(Kind, u32, usize)> {
    let n = (ctl % 8) as usize;
    (0..n)
        .map(|i| {
            let kind = [Kind::Data, Kind::Offline, Kind::Setup, Kind::Control][i % 4];
            (
                kind,
                (i % 3) as u32,
                [0usize, 1, 16, 1000, 5000][(i + n) % 5],
            )
        })
        .collect()
}

/// Bytes from an unauthenticated peer: refused, and nothing is sent back.
fn handshake(bytes: &[u8]) {
    let [(client, trust), _, _] = ephemeral_session().expect("keys");
    let (mut a, mut b) = pair();
    let _ = b.write_all(bytes);
    b.close_write();
    let deadline = Instant::now() + CFG.timeout;
    let allowed = [Role::Server, Role::Dealer];
    let r = respond(
        &mut a,
        &client,
        &trust,
        &allowed,
        (deadline, deadline),
        |_, _| Vec::new(),
    );
    assert!(r.is_err(), "bytes without the key authenticated");
    drop(a);
    let mut got = Vec::new();
    let _ = b.read_to_end(&mut got);
    assert!(
        got.is_empty(),
        "an unauthenticated peer got {} bytes",
        got.len()
    );
}

/// A valid handshake by the real dealer, then `bytes` sealed under the new keys as what follows
/// (the key confirmation the listener waits for). Returns whether the listener answered the
/// handshake, i.e. whether the bytes reached its transport layer.
fn keyed(bytes: &[u8]) -> bool {
    let keys = ephemeral_session().expect("keys");
    let (a, mut b) = pair();
    let join = Join {
        identity: &keys[0].0,
        trust: &keys[0].1,
        settings: Settings::default(),
        session_hash: "fuzz",
        cfg: CFG,
        layers: 1,
    };
    std::thread::scope(|sc| {
        let listener = sc.spawn(|| {
            let by = Instant::now() + CFG.timeout;
            join.answer_one(Box::new(a), &[Role::Dealer], (by, by))
        });
        let by = Instant::now() + CFG.timeout;
        let dealer = &keys[2].0;
        let reached = match initiate(&mut b, dealer, Role::Client, &keys[0].0.public, &[], by) {
            Ok(hs) => {
                let stream = b.try_clone_conn().expect("clone");
                let mut w = RecordWriter::new(stream, hs.transport, CFG.timeout);
                let _ = w.write_all(bytes).and_then(|_| w.flush());
                true
            }
            Err(_) => false,
        };
        let _ = b.shutdown_both();
        // Refused or (for a well-formed confirmation) accepted: either way it returns.
        let _ = listener.join().expect("listener thread");
        reached
    })
}

/// Bytes inside (`sealed`) or injected into an authenticated link, then a few receives.
fn frames(bytes: &[u8], sealed: bool) -> usize {
    let (ctl, body) = bytes.split_at(bytes.len().min(2));
    let (mut a, mut b) = pair();
    let (ta, tb) = handshake_pair(&mut a, &mut b).expect("handshake");
    let mut link = Link::new(Box::new(a), "peer", CFG, ta).expect("link");
    link.accepts_offline = ctl.first().is_some_and(|c| c & 1 == 1);
    if sealed {
        let mut w = RecordWriter::new(b.try_clone_conn().expect("clone"), tb, CFG.timeout);
        let _ = w.write_all(body).and_then(|_| w.flush());
    } else {
        let _ = b.write_all(body);
    }
    let _ = b.shutdown_both();
    let mut accepted = 0;
    for (kind, tag, len) in receives(ctl.get(1).copied().unwrap_or(4)) {
        match link.recv(kind, tag, len) {
            Ok(v) => {
                assert_eq!(v.len(), len, "a message of the wrong length was accepted");
                accepted += 1;
            }
            Err(_) => break,
        }
    }
    accepted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secure::wire::Header;
    use rand::{Rng, SeedableRng};

    /// A plausible frame stream: the frames the receives of `ctl` ask for (cut at the frame
    /// limit) or random ones, with random kinds, tags, sequence numbers, `more` bits and
    /// lengths (sometimes over the limits), some bytes flipped.
    fn frame_stream(rng: &mut impl Rng, ctl: u8) -> Vec<u8> {
        let mut out = Vec::new();
        let mut seq = 0u32;
        if rng.gen_bool(0.6) {
            for (kind, tag, len) in receives(ctl) {
                let frames = len.div_ceil(CFG.max_frame).max(1);
                for i in 0..frames {
                    let n = (len - i * CFG.max_frame).min(CFG.max_frame);
                    let h = Header {
                        kind,
                        more: i + 1 < frames,
                        tag,
                        seq,
                        len: n as u32,
                    };
                    seq += 1;
                    out.extend(h.encode());
                    out.extend((0..n).map(|_| rng.gen::<u8>()));
                }
            }
        }
        for _ in 0..rng.gen_range(0..6) {
            let len = *[0u32, 1, 16, 600, 1000, 1024, 1025, 5000]
                .get(rng.gen_range(0..8))
                .unwrap_or(&0);
            let kind = [
                Kind::Data,
                Kind::Offline,
                Kind::Setup,
                Kind::Control,
                Kind::Output,
            ][rng.gen_range(0..5)];
            let h = Header {
                kind,
                more: rng.gen_bool(0.3),
                tag: rng.gen_range(0..3),
                seq: if rng.gen_bool(0.9) { seq } else { rng.gen() },
                len,
            };
            seq = seq.wrapping_add(1);
            out.extend(h.encode());
            let n = if rng.gen_bool(0.9) {
                len as usize
            } else {
                rng.gen_range(0..64)
            };
            out.extend((0..n.min(6000)).map(|_| rng.gen::<u8>()));
        }
        if !out.is_empty() && rng.gen_bool(0.2) {
            let i = rng.gen_range(0..out.len());
            out[i] ^= 1 << rng.gen_range(0..8);
        }
        out
    }

    /// The fuzz target's property on 320 seeded inputs: random bytes in each mode, plausible
    /// frame streams sealed by the genuine cipher, and key confirmations behind a valid
    /// handshake.
    #[test]
    fn receive_side_survives_hostile_input() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(18);
        let (mut accepted, mut reached) = (0, 0);
        for case in 0..320 {
            let mut data = vec![(case % 4) as u8, rng.gen(), rng.gen()];
            if case % 4 == 3 {
                // A confirmation-shaped frame (kind, tag, length right) or random bytes.
                if rng.gen_bool(0.5) {
                    let h = Header {
                        kind: Kind::Session,
                        more: false,
                        tag: u32::MAX,
                        seq: 0,
                        len: rng.gen_range(100..120),
                    };
                    data.extend(h.encode());
                }
                let n = rng.gen_range(0..160);
                data.extend((0..n).map(|_| rng.gen::<u8>()));
                reached += link_recv(&data);
                continue;
            }
            if case % 4 == 1 && (case / 4) % 2 == 0 {
                data.extend(frame_stream(&mut rng, data[2]));
            } else {
                let n = rng.gen_range(0..200);
                data.extend((0..n).map(|_| rng.gen::<u8>()));
                if case % 4 == 0 && rng.gen_bool(0.5) {
                    // A genuine preamble, so the bytes reach the Noise message.
                    data[1..]
                        .iter_mut()
                        .zip(b"BRNK\x02\x01\x00\x00")
                        .for_each(|(d, p)| *d = *p);
                }
            }
            accepted += link_recv(&data);
        }
        // The structured inputs reach complete messages, not only the first checks, and every
        // keyed case reaches the transport layer behind the handshake.
        assert!(accepted >= 20, "only {accepted} messages accepted");
        assert_eq!(reached, 80, "keyed cases past the handshake");
    }
}
