//! Joining a session: the handshakes of a party's links (Noise KK through
//! [`super::noise`], then the key confirmation and the session id, docs/method.md 8.1), the
//! listener that runs them side by side, and the connections they run over (dialled with a
//! deadline, or in one process).
use super::conn::{self, Stream};
use super::keys::{KeyPair, Prf};
use super::link::{Link, LinkConfig};
use super::noise::{self, Identity, Trust};
use super::party::{Party, TAG_SESSION};
use super::plan::Settings;
use super::wire::{Kind, Role};
use crate::error::{Error, Result};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// A session's identity: picked at random by the client and carried in every link's
/// handshake, so links of two sessions (even with the same keys, model and settings) are never
/// combined.
pub type SessionId = [u8; 16];

/// role | ephemeral X25519 key of the pair's PRF | session id | session hash (space-padded).
const HELLO_LEN: usize = 1 + 32 + 16 + 64;
/// A connection's preamble and first handshake message must arrive this soon after it is
/// accepted, so silent connections cannot hold the listener ...
const FIRST_MESSAGE_WITHIN: Duration = Duration::from_secs(1);
/// ... and its key confirmation this soon after that (a replayed first message never sends
/// one).
const CONFIRMATION_WITHIN: Duration = Duration::from_secs(2);
/// Handshakes a listener runs at once, and of those from one address; a new connection beyond
/// either ends the oldest one in progress (a real peer finishes in milliseconds).
pub const MAX_HANDSHAKES: usize = 64;
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 48;

fn hello(role: Role, ephemeral: &[u8; 32], sid: &SessionId, session_hash: &str) -> Vec<u8> {
    let mut h = Vec::with_capacity(HELLO_LEN);
    h.push(role as u8);
    h.extend_from_slice(ephemeral);
    h.extend_from_slice(sid);
    h.extend_from_slice(session_hash.as_bytes());
    h.resize(HELLO_LEN, b' ');
    h
}

/// A peer's hello.
struct Hello {
    ephemeral: [u8; 32],
    sid: SessionId,
    /// Its hash of model, spec and settings.
    hash: String,
}

/// Everything a party needs to join a session.
pub struct Join<'a> {
    pub identity: &'a Identity,
    /// The pinned keys of the two other roles.
    pub trust: &'a Trust,
    pub settings: Settings,
    /// Hash of model, spec and settings: every party must have the same.
    pub session_hash: &'a str,
    pub cfg: LinkConfig,
    /// Layers of the plan (sizes the per-layer counters).
    pub layers: usize,
}

/// One authenticated, confirmed link before the party is assembled.
struct Joined {
    peer: Role,
    link: Link,
    prf: Prf,
    /// The link's handshake hash (checked by the third party in the transcript exchange).
    transcript: [u8; 32],
}

impl Join<'_> {
    fn role(&self) -> Role {
        self.identity.role
    }

    /// The session id this party starts with: the client picks it, the others learn it from
    /// the client's link (the server dials the client before it answers the dealer).
    fn first_sid(&self) -> Option<SessionId> {
        (self.role() == Role::Client).then(|| {
            let mut sid = [0u8; 16];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut sid);
            sid
        })
    }

    /// A peer's hello, parsed; [`Join::check_hello`] then compares it with this session.
    fn parse_hello(peer: Role, theirs: &[u8]) -> Result<Hello> {
        if theirs.len() != HELLO_LEN || theirs[0] != peer as u8 {
            return Err(Error::Malformed {
                peer: peer.name().into(),
                msg: format!("bad handshake payload ({} bytes)", theirs.len()),
            });
        }
        let mut h = Hello {
            ephemeral: [0u8; 32],
            sid: [0u8; 16],
            hash: String::from_utf8_lossy(&theirs[49..]).trim().to_string(),
        };
        h.ephemeral.copy_from_slice(&theirs[1..33]);
        h.sid.copy_from_slice(&theirs[33..49]);
        Ok(h)
    }

    /// The same model, spec and settings, and the same session.
    fn check_hello(&self, peer: Role, theirs: &Hello, sid: &SessionId) -> Result<()> {
        if theirs.hash != self.session_hash {
            return Err(Error::SessionMismatch {
                peer: peer.name().into(),
                ours: self.session_hash.into(),
                theirs: theirs.hash.clone(),
            });
        }
        if theirs.sid != *sid {
            return Err(Error::OtherSession {
                peer: format!("the {peer}"),
                msg: format!(
                    "its session id is {}, ours {}",
                    noise::hex(&theirs.sid),
                    noise::hex(sid)
                ),
            });
        }
        Ok(())
    }

    /// The pair's PRF (bound to this link's handshake) and the link, ready.
    fn joined(
        &self,
        peer: Role,
        mut link: Link,
        transcript: [u8; 32],
        ours: KeyPair,
        theirs: &Hello,
    ) -> Joined {
        let mut context = self.session_hash.as_bytes().to_vec();
        context.extend_from_slice(&transcript);
        let prf = ours.agree(
            &theirs.ephemeral,
            (self.role() as u8) < (peer as u8),
            &context,
        );
        link.accepts_offline = peer == Role::Dealer;
        Joined {
            peer,
            link,
            prf,
            transcript,
        }
    }

    /// Dials side of one link: `stream` is connected to `peer` (a lower role). Learns the
    /// session id from the peer's reply (or checks it against the one already known), then
    /// confirms the keys with its hello as the first record under them.
    fn initiate(
        &self,
        peer: Role,
        mut stream: Stream,
        sid: &mut Option<SessionId>,
    ) -> Result<Joined> {
        let key = self.trust.get(peer).ok_or_else(|| Error::Refused {
            peer: peer.name().into(),
            msg: format!("no pinned key for the {peer}"),
        })?;
        let keys = KeyPair::generate();
        let deadline = Instant::now() + self.cfg.connect_timeout;
        let hs = noise::initiate(&mut *stream, self.identity, peer, key, &[], deadline)?;
        let theirs = Self::parse_hello(peer, &hs.payload)?;
        let ours_sid = sid.unwrap_or(theirs.sid);
        let ours = hello(self.role(), &keys.public, &ours_sid, self.session_hash);
        let mut link = Link::new(stream, peer.name(), self.cfg, hs.transport)?;
        // Sent before our own checks: on a mismatch the peer names it too.
        link.send(Kind::Session, TAG_SESSION, &ours)?;
        self.check_hello(peer, &theirs, &ours_sid)?;
        *sid = Some(ours_sid);
        Ok(self.joined(peer, link, hs.hash, keys, &theirs))
    }

    /// Answering side of one link: `stream` comes from one of the `allowed` roles. Nothing is
    /// committed until the initiator's key confirmation arrives by `by.1`: a recording of an
    /// earlier first message authenticates, but cannot confirm.
    fn respond(
        &self,
        mut stream: Stream,
        allowed: &[Role],
        by: (Instant, Instant),
        sid: &SessionId,
    ) -> Result<Joined> {
        let keys = KeyPair::generate();
        let ours = hello(self.role(), &keys.public, sid, self.session_hash);
        let who = stream.peer_name();
        let (peer, hs) = noise::respond(
            &mut *stream,
            self.identity,
            self.trust,
            allowed,
            by,
            |_, _| ours,
        )?;
        let left = by.1.saturating_duration_since(Instant::now());
        let mut link = Link::new(stream, peer.name(), self.cfg, hs.transport)?;
        link.set_timeout(left.max(Duration::from_millis(1)));
        let confirm = link
            .recv(Kind::Session, TAG_SESSION, HELLO_LEN)
            .map_err(|e| match e {
                Error::Malformed { .. } | Error::Tampered { .. } => e,
                e => Error::Refused {
                    peer: format!("{peer} at {who}"),
                    msg: format!(
                        "no key confirmation within {:.1} s (a recording of an earlier handshake, \
                         or a peer that stopped): {e}",
                        left.as_secs_f64()
                    ),
                },
            })?;
        link.set_timeout(self.cfg.timeout);
        let theirs = Self::parse_hello(peer, &confirm)?;
        self.check_hello(peer, &theirs, sid)?;
        Ok(self.joined(peer, link, hs.hash, keys, &theirs))
    }

    /// Answers one connection as this party would, up to and including the key
    /// confirmation (the fuzzer's way past a valid handshake into the transport layer).
    pub(crate) fn answer_one(
        &self,
        stream: Stream,
        allowed: &[Role],
        by: (Instant, Instant),
    ) -> Result<()> {
        let sid = self.known_sid(self.first_sid())?;
        self.respond(stream, allowed, by, &sid).map(|_| ())
    }

    /// Joins over streams already connected to each peer (sessions in one process): a party
    /// dials the lower roles and answers the higher ones.
    pub fn connected(&self, mut streams: Vec<(Role, Stream)>) -> Result<Party> {
        // Lower roles first: the session id comes from the client's side.
        streams.sort_by_key(|(r, _)| *r);
        let mut sid = self.first_sid();
        let mut joined = Vec::new();
        for (peer, s) in streams {
            joined.push(if peer < self.role() {
                self.initiate(peer, s, &mut sid)?
            } else {
                let by = Instant::now() + self.cfg.connect_timeout;
                self.respond(s, &[peer], (by, by), &self.known_sid(sid)?)?
            });
        }
        self.assemble(joined)
    }

    fn known_sid(&self, sid: Option<SessionId>) -> Result<SessionId> {
        sid.ok_or_else(|| Error::InvalidArgument(format!(
            "the {} answers a link before it knows the session id (connect to the lower roles first)",
            self.role()
        )))
    }

    /// Joins with `dialed` streams to the lower roles and a listener for the higher ones.
    /// Handshakes run concurrently (at most [`MAX_HANDSHAKES`], [`MAX_HANDSHAKES_PER_ADDRESS`]
    /// from one address; beyond either the oldest in progress ends), each with short
    /// deadlines, and a role is taken only by a confirmed link. Connections that do not
    /// authenticate and confirm as an expected role are refused (reported to `on_refused`,
    /// sent nothing before authentication) and the listener keeps waiting until the timeout.
    pub fn listening(
        &self,
        dialed: Vec<(Role, Stream)>,
        listener: &TcpListener,
        on_refused: &mut dyn FnMut(&Error),
    ) -> Result<Party> {
        let mut sid = self.first_sid();
        let mut joined = Vec::new();
        for (peer, s) in dialed {
            joined.push(self.initiate(peer, s, &mut sid)?);
        }
        let sid = self.known_sid(sid)?;
        let needed: Vec<Role> = Role::ALL.into_iter().filter(|r| *r > self.role()).collect();
        let accepted =
            std::thread::scope(|scope| self.accept(scope, listener, &needed, &sid, on_refused))?;
        joined.extend(accepted);
        self.assemble(joined)
    }

    /// Why the roles in `missing` never joined by the connect timeout.
    fn never_joined(
        &self,
        missing: &[Role],
        last_refusal: Option<String>,
        refusals: usize,
    ) -> Error {
        let who = missing
            .iter()
            .map(|r| r.name())
            .collect::<Vec<_>>()
            .join(" and the ");
        let secs = self.cfg.connect_timeout.as_secs_f64();
        match last_refusal {
            Some(last) => Error::Refused {
                peer: format!("every connection claiming to be the {who}"),
                msg: format!(
                    "none authenticated within {secs} s ({refusals} refused; the last: {last})"
                ),
            },
            None => Error::Timeout {
                peer: format!("the {who} (never connected)"),
                secs,
            },
        }
    }

    /// The listener's loop: a thread per handshake, the first confirmed link of each needed
    /// role kept.
    fn accept<'s>(
        &'s self,
        scope: &'s std::thread::Scope<'s, '_>,
        listener: &TcpListener,
        needed: &[Role],
        sid: &'s SessionId,
        on_refused: &mut dyn FnMut(&Error),
    ) -> Result<Vec<Joined>> {
        let io = |e: std::io::Error| Error::Link {
            peer: "listener".into(),
            msg: e.to_string(),
        };
        listener.set_nonblocking(true).map_err(io)?;
        let deadline = Instant::now() + self.cfg.connect_timeout;
        let (tx, rx) = std::sync::mpsc::channel::<(u64, Result<Joined>)>();
        let mut running = Running::new();
        let mut next_id = 0u64;
        let mut missing = needed.to_vec();
        let mut joined = Vec::new();
        let mut last_refusal: Option<String> = None;
        let mut refusals = 0usize;
        let result = loop {
            match listener.accept() {
                Ok((s, addr)) => {
                    s.set_nonblocking(false).map_err(io)?;
                    let s = conn::tcp(s).map_err(io)?;
                    let ip = addr.ip();
                    let from_ip = running.values().filter(|(a, _)| *a == ip).count();
                    let oldest = if from_ip >= MAX_HANDSHAKES_PER_ADDRESS {
                        running
                            .iter()
                            .find(|(_, (a, _))| *a == ip)
                            .map(|(id, _)| *id)
                    } else if running.len() >= MAX_HANDSHAKES {
                        running.keys().next().copied()
                    } else {
                        None
                    };
                    if let Some((_, h)) = oldest.and_then(|id| running.remove(&id)) {
                        let _ = h.shutdown_both();
                    }
                    running.insert(next_id, (ip, s.try_clone_conn().map_err(io)?));
                    let (tx, id) = (tx.clone(), next_id);
                    next_id += 1;
                    let allowed = missing.clone();
                    let now = Instant::now();
                    let first_by = deadline.min(now + FIRST_MESSAGE_WITHIN);
                    let by = deadline.min(now + FIRST_MESSAGE_WITHIN + CONFIRMATION_WITHIN);
                    scope.spawn(move || {
                        let _ = tx.send((id, self.respond(s, &allowed, (first_by, by), sid)));
                    });
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => break Err(io(e)),
            }
            while let Ok((id, r)) = rx.try_recv() {
                running.remove(&id);
                match r {
                    Ok(j) if missing.contains(&j.peer) => {
                        missing.retain(|r| *r != j.peer);
                        joined.push(j);
                    }
                    Ok(j) => {
                        let e = Error::Refused {
                            peer: format!("the {}", j.peer),
                            msg: format!("a second {} connected (the role is taken)", j.peer),
                        };
                        on_refused(&e);
                        refusals += 1;
                        last_refusal = Some(e.to_string());
                    }
                    // An authenticated, confirmed peer of another model or session: the
                    // session cannot form as configured.
                    Err(e @ (Error::SessionMismatch { .. } | Error::OtherSession { .. })) => {
                        end_all(&mut running);
                        return Err(e);
                    }
                    Err(e) => {
                        on_refused(&e);
                        refusals += 1;
                        last_refusal = Some(e.to_string());
                    }
                }
            }
            if missing.is_empty() {
                break Ok(joined);
            }
            if Instant::now() >= deadline {
                break Err(self.never_joined(&missing, last_refusal.take(), refusals));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // Handshakes still running (silent or replayed connections) end now, not at their
        // deadlines, and are reported with the rest.
        end_all(&mut running);
        drop(tx);
        for (_, r) in rx {
            if let Err(e) = r {
                on_refused(&e);
            }
        }
        result
    }

    /// The party over its confirmed links (`Party::assemble` checks the transcripts).
    fn assemble(&self, joined: Vec<Joined>) -> Result<Party> {
        let role = self.role();
        let mut links: [Option<Link>; 3] = [None, None, None];
        let mut prfs: [Option<Prf>; 3] = [None, None, None];
        let mut transcripts = [[0u8; 32]; 3];
        for j in joined {
            if j.peer == role || links[j.peer as usize].is_some() {
                return Err(Error::Refused {
                    peer: j.peer.name().into(),
                    msg: format!("a second {} connected", j.peer),
                });
            }
            links[j.peer as usize] = Some(j.link);
            prfs[j.peer as usize] = Some(j.prf);
            transcripts[j.peer as usize] = j.transcript;
        }
        Party::assemble(
            role,
            links,
            prfs,
            &transcripts,
            self.settings,
            self.cfg.ahead_batches,
            self.layers,
        )
    }
}

/// A listener's handshakes in progress: id (oldest first) -> (address, a handle to end it).
type Running = std::collections::BTreeMap<u64, (std::net::IpAddr, Stream)>;

/// Ends every handshake in `running`: its reads and writes fail at once.
fn end_all(running: &mut Running) {
    for (_, (_, h)) in std::mem::take(running) {
        let _ = h.shutdown_both();
    }
}

/// Where the three parties of one process talk: loopback TCP (the network stack a deployment
/// uses) or in-memory pipes (tests of everything above the network).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalNet {
    Tcp,
    Memory,
}

/// Connected streams for the three links of a session in this process: per role, its streams
/// to the two others, each labelled with the peer's role.
pub fn local_streams(net: LocalNet) -> Result<[Vec<(Role, Stream)>; 3]> {
    let mut out: [Vec<(Role, Stream)>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for (a, b) in [
        (Role::Client, Role::Server),
        (Role::Client, Role::Dealer),
        (Role::Server, Role::Dealer),
    ] {
        let io = |e: std::io::Error| Error::Link {
            peer: "loopback".into(),
            msg: e.to_string(),
        };
        let (s, t): (Stream, Stream) = match net {
            LocalNet::Tcp => {
                let l = TcpListener::bind("127.0.0.1:0").map_err(io)?;
                let addr = l.local_addr().map_err(io)?;
                let s = TcpStream::connect(addr).map_err(io)?;
                let (t, _) = l.accept().map_err(io)?;
                (conn::tcp(s).map_err(io)?, conn::tcp(t).map_err(io)?)
            }
            LocalNet::Memory => {
                let (s, t) = conn::mem_pair();
                (Box::new(s), Box::new(t))
            }
        };
        out[a as usize].push((b, t));
        out[b as usize].push((a, s));
    }
    Ok(out)
}

/// Connects to `addr`, retrying until `timeout` (the peer may not listen yet).
pub fn connect_retry(addr: &str, peer: &str, timeout: Duration) -> Result<Stream> {
    use std::net::ToSocketAddrs;
    let deadline = Instant::now() + timeout;
    loop {
        // Each attempt waits only until the deadline: a host that drops the handshake (a
        // firewall, a full accept queue) must not hold the party for the kernel's minutes.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let attempt = addr.to_socket_addrs().and_then(|addrs| {
            let mut last = std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the address resolves to nothing",
            );
            for sa in addrs {
                match TcpStream::connect_timeout(&sa, left) {
                    Ok(s) => return Ok(s),
                    Err(e) => last = e,
                }
            }
            Err(last)
        });
        match attempt {
            Ok(s) => {
                return conn::tcp(s).map_err(|e| Error::Link {
                    peer: format!("{peer} at {addr}"),
                    msg: e.to_string(),
                })
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::Link {
                    peer: format!("{peer} at {addr}"),
                    msg: e.to_string(),
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
