//! One party of a session: its role, its links and PRFs with the two others, per-layer
//! counters, and the session handshake: each link authenticates with the parties' static keys
//! ([`super::noise`]), and the handshake payloads carry the role, an ephemeral X25519 key for
//! the pair's PRF and the hash of model + spec + settings.
use super::ahead::Dealer;
use super::conn::{self, Stream};
use super::keys::{KeyPair, Prf};
use super::link::{Link, LinkConfig, LinkSender};
use super::noise::{self, Identity, Transport, Trust};
use super::plan::Settings;
pub use super::wire::Role;
use super::wire::{pack_u64, unpack_u64, Kind};
use crate::error::{Error, Result};
use serde::Serialize;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Counters of one layer as seen by one party.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LayerStats {
    pub seconds: f64,
    /// Bytes this party sent during the layer (headers included).
    pub bytes_sent: u64,
    /// Sequential message trips of the layer's protocol.
    pub rounds: u64,
    pub drelus: u64,
}

/// A party in a running session.
pub struct Party {
    pub role: Role,
    /// Senders on the connections. Declared (so dropped) before `links`: a link's writer
    /// thread ends when its last sender is gone.
    out: [Option<LinkSender>; 3],
    /// The connections (receiving; absent in the dealer's offline half).
    links: [Option<Link>; 3],
    /// Per peer: the PRF of online draws (and of the session setup) ...
    prfs: [Option<Prf>; 3],
    /// ... and the PRF of offline draws (the dealer's correlated randomness), so the dealer
    /// can produce all of an image's offline values before its online part.
    prfs_off: [Option<Prf>; 3],
    /// The dealer's own state (absent for the client and the server).
    pub dealer: Option<Dealer>,
    /// Private randomness of this party.
    pub own: Prf,
    pub settings: Settings,
    /// The step (layer index) messages are tagged with.
    pub tag: u32,
    /// Counters per tag: one per layer, then the output reveal, then session control.
    pub stats: Vec<LayerStats>,
}

const HELLO_LEN: usize = 1 + 32 + 64;
/// Tag of the session control frames.
pub const TAG_SESSION: u32 = u32::MAX;
/// Longest a listener spends on one incoming connection's handshake, so a silent impostor
/// cannot hold the port for the whole session timeout.
const HANDSHAKE_PER_CONNECTION: Duration = Duration::from_secs(10);

fn hello(role: Role, ephemeral: &[u8; 32], session_hash: &str) -> Vec<u8> {
    let mut h = Vec::with_capacity(HELLO_LEN);
    h.push(role as u8);
    h.extend_from_slice(ephemeral);
    h.extend_from_slice(session_hash.as_bytes());
    h.resize(HELLO_LEN, b' ');
    h
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

/// One authenticated link before the party is assembled.
struct Joined {
    peer: Role,
    link: Link,
    prf: Prf,
}

impl Join<'_> {
    fn role(&self) -> Role {
        self.identity.role
    }

    /// Checks the peer's hello, derives the pair's PRF and wraps the link.
    fn finish_link(
        &self,
        peer: Role,
        stream: Stream,
        transport: Transport,
        ours: KeyPair,
        theirs: &[u8],
    ) -> Result<Joined> {
        let malformed = |msg: String| Error::Malformed {
            peer: peer.name().into(),
            msg,
        };
        if theirs.len() != HELLO_LEN || theirs[0] != peer as u8 {
            return Err(malformed(format!(
                "bad handshake payload ({} bytes)",
                theirs.len()
            )));
        }
        let hash = String::from_utf8_lossy(&theirs[33..]).trim().to_string();
        if hash != self.session_hash {
            return Err(Error::SessionMismatch {
                peer: peer.name().into(),
                ours: self.session_hash.into(),
                theirs: hash,
            });
        }
        let mut pk = [0u8; 32];
        pk.copy_from_slice(&theirs[1..33]);
        let prf = ours.agree(
            &pk,
            (self.role() as u8) < (peer as u8),
            self.session_hash.as_bytes(),
        );
        let mut link = Link::new(stream, peer.name(), self.cfg, transport)?;
        link.accepts_offline = peer == Role::Dealer;
        Ok(Joined { peer, link, prf })
    }

    /// Dials side of one link: `stream` is connected to `peer` (a lower role).
    fn initiate(&self, peer: Role, mut stream: Stream) -> Result<Joined> {
        let key = self.trust.get(peer).ok_or_else(|| Error::Refused {
            peer: peer.name().into(),
            msg: format!("no pinned key for the {peer}"),
        })?;
        let keys = KeyPair::generate();
        let deadline = Instant::now() + self.cfg.connect_timeout;
        let ours = hello(self.role(), &keys.public, self.session_hash);
        let (t, theirs) = noise::initiate(&mut *stream, self.identity, peer, key, &ours, deadline)?;
        self.finish_link(peer, stream, t, keys, &theirs)
    }

    /// Answering side of one link: `stream` comes from one of the `allowed` roles.
    fn respond(&self, mut stream: Stream, allowed: &[Role], deadline: Instant) -> Result<Joined> {
        let keys = KeyPair::generate();
        let ours = hello(self.role(), &keys.public, self.session_hash);
        let (peer, t, theirs) = noise::respond(
            &mut *stream,
            self.identity,
            self.trust,
            allowed,
            deadline,
            |_, _| ours,
        )?;
        self.finish_link(peer, stream, t, keys, &theirs)
    }

    /// Joins over streams already connected to each peer (loopback sessions): a party dials
    /// the lower roles and answers the higher ones.
    pub fn connected(&self, streams: Vec<(Role, Stream)>) -> Result<Party> {
        let mut joined = Vec::new();
        for (peer, s) in streams {
            joined.push(if peer < self.role() {
                self.initiate(peer, s)?
            } else {
                self.respond(s, &[peer], Instant::now() + self.cfg.connect_timeout)?
            });
        }
        self.assemble(joined)
    }

    /// Joins with `dialed` streams to the lower roles and a listener for the higher ones.
    /// Connections that do not authenticate as an expected role are refused (reported to
    /// `on_refused`, sent nothing) and the listener keeps waiting until the timeout.
    pub fn listening(
        &self,
        dialed: Vec<(Role, Stream)>,
        listener: &TcpListener,
        on_refused: &mut dyn FnMut(&Error),
    ) -> Result<Party> {
        let mut joined = Vec::new();
        for (peer, s) in dialed {
            joined.push(self.initiate(peer, s)?);
        }
        let mut needed: Vec<Role> = Role::ALL.into_iter().filter(|r| *r > self.role()).collect();
        let io = |e: std::io::Error| Error::Link {
            peer: "listener".into(),
            msg: e.to_string(),
        };
        listener.set_nonblocking(true).map_err(io)?;
        let deadline = Instant::now() + self.cfg.connect_timeout;
        let mut last_refusal: Option<String> = None;
        let mut refusals = 0usize;
        while !needed.is_empty() {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).map_err(io)?;
                    let s = conn::tcp(s).map_err(io)?;
                    let by = deadline.min(Instant::now() + HANDSHAKE_PER_CONNECTION);
                    match self.respond(s, &needed, by) {
                        Ok(j) => {
                            needed.retain(|r| *r != j.peer);
                            joined.push(j);
                        }
                        Err(e @ (Error::Refused { .. } | Error::Malformed { .. })) => {
                            on_refused(&e);
                            refusals += 1;
                            last_refusal = Some(e.to_string());
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let who = needed
                            .iter()
                            .map(|r| r.name())
                            .collect::<Vec<_>>()
                            .join(" and the ");
                        let secs = self.cfg.connect_timeout.as_secs_f64();
                        return Err(match last_refusal {
                            Some(last) => Error::Refused {
                                peer: format!("every connection claiming to be the {who}"),
                                msg: format!(
                                    "none authenticated within {secs} s ({refusals} refused;                                      the last: {last})"
                                ),
                            },
                            None => Error::Timeout {
                                peer: format!("the {who} (never connected)"),
                                secs,
                            },
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(io(e)),
            }
        }
        self.assemble(joined)
    }

    fn assemble(&self, joined: Vec<Joined>) -> Result<Party> {
        let role = self.role();
        let mut links: [Option<Link>; 3] = [None, None, None];
        let mut prfs: [Option<Prf>; 3] = [None, None, None];
        for j in joined {
            if j.peer == role || links[j.peer as usize].is_some() {
                return Err(Error::Refused {
                    peer: j.peer.name().into(),
                    msg: format!("a second {} connected", j.peer),
                });
            }
            links[j.peer as usize] = Some(j.link);
            prfs[j.peer as usize] = Some(j.prf);
        }
        let mut prfs_off: [Option<Prf>; 3] = [None, None, None];
        for (off, prf) in prfs_off.iter_mut().zip(prfs.iter_mut()) {
            if let Some(prf) = prf {
                let words = prf.ring(4);
                let mut seed = [0u8; 32];
                for (i, w) in words.iter().enumerate() {
                    seed[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
                }
                *off = Some(Prf::from_seed(seed));
            }
        }
        for r in Role::ALL {
            if r != role && links[r as usize].is_none() {
                return Err(Error::Link {
                    peer: r.name().into(),
                    msg: "no connection".into(),
                });
            }
        }
        let out = links.each_ref().map(|l| l.as_ref().and_then(Link::sender));
        Ok(Party {
            role,
            links,
            out,
            prfs,
            prfs_off,
            dealer: (role == Role::Dealer).then(|| Dealer::new(self.cfg.ahead_batches)),
            own: Prf::private(),
            settings: self.settings,
            tag: TAG_SESSION,
            stats: vec![LayerStats::default(); self.layers + 2],
        })
    }
}

impl Party {
    /// Arithmetic party index: 0 for the client, 1 for the server.
    pub fn j(&self) -> u64 {
        match self.role {
            Role::Server => 1,
            _ => 0,
        }
    }

    /// The other share holder.
    pub fn other(&self) -> Role {
        match self.role {
            Role::Client => Role::Server,
            _ => Role::Client,
        }
    }

    pub fn prf(&mut self, with: Role) -> &mut Prf {
        self.prfs[with as usize]
            .as_mut()
            .expect("a PRF with every other party")
    }

    /// The PRF of offline draws shared with `with`.
    pub fn prf_off(&mut self, with: Role) -> &mut Prf {
        self.prfs_off[with as usize]
            .as_mut()
            .expect("a PRF with every other party")
    }

    /// Whether this call runs the offline / the online part (only the dealer splits them).
    pub fn does_offline(&self) -> bool {
        self.dealer.as_ref().is_none_or(Dealer::does_offline)
    }

    pub fn does_online(&self) -> bool {
        self.dealer.as_ref().is_none_or(Dealer::does_online)
    }

    /// The dealer's state; an error on another role (a protocol ran the dealer's part).
    pub fn dealer(&mut self) -> Result<&mut Dealer> {
        let role = self.role;
        self.dealer.as_mut().ok_or_else(|| {
            Error::InvalidArgument(format!("the {role} ran a part only the dealer runs"))
        })
    }

    fn link(&mut self, peer: Role) -> &mut Link {
        self.links[peer as usize]
            .as_mut()
            .expect("a link to every other party")
    }

    fn stat(&mut self) -> &mut LayerStats {
        let last = self.stats.len() - 1;
        let i = if self.tag == TAG_SESSION {
            last
        } else {
            (self.tag as usize).min(last - 1)
        };
        &mut self.stats[i]
    }

    /// Counts one sequential message trip in the current layer.
    pub fn round(&mut self) {
        self.stat().rounds += 1;
    }

    pub fn count_drelus(&mut self, n: usize) {
        self.stat().drelus += n as u64;
    }

    pub fn add_time(&mut self, t: Duration) {
        self.stat().seconds += t.as_secs_f64();
    }

    pub fn send_bytes(&mut self, to: Role, kind: Kind, data: &[u8]) -> Result<()> {
        let tag = self.tag;
        let sent = match self.links[to as usize].as_mut() {
            Some(link) => link.send(kind, tag, data)?,
            None => self.out[to as usize]
                .as_ref()
                .expect("a sender to every other party")
                .send(kind, tag, data)?,
        };
        self.stat().bytes_sent += sent;
        Ok(())
    }

    pub fn recv_bytes(&mut self, from: Role, kind: Kind, len: usize) -> Result<Vec<u8>> {
        let tag = self.tag;
        self.link(from).recv(kind, tag, len)
    }

    /// Sends ring elements packed `width` bytes each.
    pub fn send_ring(&mut self, to: Role, v: &[u64], width: usize) -> Result<()> {
        self.send_bytes(to, Kind::Data, &pack_u64(v, width))
    }

    pub fn recv_ring(&mut self, from: Role, n: usize, width: usize) -> Result<Vec<u64>> {
        self.recv_ring_as(from, Kind::Data, n, width)
    }

    /// Sends the dealer's offline (input-independent) ring elements.
    pub fn send_offline(&mut self, to: Role, v: &[u64]) -> Result<()> {
        self.send_bytes(to, Kind::Offline, &pack_u64(v, 8))
    }

    pub fn recv_offline(&mut self, from: Role, n: usize) -> Result<Vec<u64>> {
        self.recv_ring_as(from, Kind::Offline, n, 8)
    }

    fn recv_ring_as(&mut self, from: Role, kind: Kind, n: usize, width: usize) -> Result<Vec<u64>> {
        let b = self.recv_bytes(from, kind, n * width)?;
        unpack_u64(&b, width).ok_or_else(|| Error::Malformed {
            peer: from.name().into(),
            msg: "ring payload of the wrong size".into(),
        })
    }

    /// Client and server swap their shares of a masked value and return its opening (sum
    /// with `add`). Both send before either receives.
    pub fn open_with(
        &mut self,
        share: &[u64],
        width: usize,
        add: impl Fn(u64, u64) -> u64,
    ) -> Result<Vec<u64>> {
        let other = self.other();
        self.send_ring(other, share, width)?;
        let theirs = self.recv_ring(other, share.len(), width)?;
        self.round();
        Ok(share
            .iter()
            .zip(&theirs)
            .map(|(a, b)| add(*a, *b))
            .collect())
    }

    /// The most bytes of the dealer's material this party kept ahead of use.
    pub fn peak_ahead(&self) -> u64 {
        self.links
            .iter()
            .flatten()
            .map(|l| l.peak_pending as u64)
            .max()
            .unwrap_or(0)
    }

    /// Bytes sent so far to each peer (indexed by role).
    pub fn bytes_sent(&self) -> [u64; 3] {
        let mut out = [0u64; 3];
        for (i, l) in self.out.iter().enumerate() {
            if let Some(l) = l {
                out[i] = l.bytes_sent();
            }
        }
        out
    }

    /// Dealer: a second party for the offline part of one image, to run on its own thread
    /// while this one runs the online part; the offline PRFs move to it until [`Party::rejoin`].
    pub fn split_offline(&mut self) -> Result<Party> {
        let off = self.dealer()?.split();
        Ok(Party {
            role: self.role,
            links: [None, None, None],
            out: self.out.clone(),
            prfs: [None, None, None],
            prfs_off: std::mem::take(&mut self.prfs_off),
            dealer: Some(off),
            own: Prf::private(),
            settings: self.settings,
            tag: self.tag,
            stats: vec![LayerStats::default(); self.stats.len()],
        })
    }

    /// Dealer: takes back the offline PRFs and adds the offline part's bytes to the counters.
    pub fn rejoin(&mut self, off: Party) {
        self.prfs_off = off.prfs_off;
        for (s, o) in self.stats.iter_mut().zip(&off.stats) {
            s.bytes_sent += o.bytes_sent;
        }
        if let Some(d) = &mut self.dealer {
            d.rejoin();
        }
    }

    /// Flushes and closes every link.
    pub fn finish(mut self) -> Result<()> {
        self.out = [None, None, None];
        let mut first = Ok(());
        for l in self.links.iter_mut() {
            if let Some(l) = l.take() {
                let r = l.finish();
                if first.is_ok() {
                    first = r;
                }
            }
        }
        first
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
