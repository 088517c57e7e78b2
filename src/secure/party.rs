//! One party of a session: its role, its links and PRFs with the two others, per-layer
//! counters, and the session handshake (roles, X25519 keys, hash of model + spec + settings).
use super::keys::{KeyPair, Prf};
use super::link::{Link, LinkConfig};
use super::plan::Settings;
use super::wire::{pack_u64, unpack_u64, Kind};
use crate::error::{Error, Result};
use serde::Serialize;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// The three roles (docs/method.md 8.1). The index is also the arithmetic party index of the two
/// share holders: the client holds share 0, the server share 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Client = 0,
    Server = 1,
    Dealer = 2,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Client, Role::Server, Role::Dealer];

    pub fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
            Role::Dealer => "dealer",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "client" => Some(Role::Client),
            "server" => Some(Role::Server),
            "dealer" => Some(Role::Dealer),
            _ => None,
        }
    }

    fn from_u8(v: u8) -> Option<Role> {
        Role::ALL.get(v as usize).copied()
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

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

/// What the dealer does in a protocol call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Both parts in each call (protocol tests).
    Inline,
    /// Only the input-independent part: correlated randomness, sent ahead.
    Offline,
    /// Only the part that needs the other parties' messages (the comparisons).
    Online,
}

/// A party in a running session.
pub struct Party {
    pub role: Role,
    links: [Option<Link>; 3],
    /// Per peer: the PRF of online draws (and of the session setup) ...
    prfs: [Option<Prf>; 3],
    /// ... and the PRF of offline draws (the dealer's correlated randomness), so the dealer
    /// can produce all of an image's offline values before its online part.
    prfs_off: [Option<Prf>; 3],
    /// Dealer only: which part of each protocol to run.
    pub phase: Phase,
    /// Dealer only: private values the offline part keeps for the online part, in order.
    pub carry: std::collections::VecDeque<Vec<u64>>,
    /// Private randomness of this party.
    pub own: Prf,
    pub settings: Settings,
    /// The step (layer index) messages are tagged with.
    pub tag: u32,
    /// Counters per tag: one per layer, then the output reveal, then session control.
    pub stats: Vec<LayerStats>,
}

const HELLO_LEN: usize = 1 + 32 + 64;
/// Tag of the handshake and session control frames.
pub const TAG_SESSION: u32 = u32::MAX;

impl Party {
    /// Runs the handshake on every stream: exchange role, X25519 public key and the session
    /// hash; fail on a wrong role or a different hash; derive the pairwise PRFs.
    pub fn handshake(
        role: Role,
        streams: Vec<TcpStream>,
        settings: Settings,
        session_hash: &str,
        cfg: LinkConfig,
        layers: usize,
    ) -> Result<Party> {
        let mut links: [Option<Link>; 3] = [None, None, None];
        let mut prfs: [Option<Prf>; 3] = [None, None, None];
        let mut pending = Vec::new();
        for s in streams {
            let peer = s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "peer".into());
            let mut link = Link::new(s, &peer, cfg)?;
            let keys = KeyPair::generate();
            let mut hello = Vec::with_capacity(HELLO_LEN);
            hello.push(role as u8);
            hello.extend_from_slice(&keys.public);
            hello.extend_from_slice(session_hash.as_bytes());
            hello.resize(HELLO_LEN, b' ');
            link.send(Kind::Hello, TAG_SESSION, &hello)?;
            pending.push((link, keys));
        }
        for (mut link, keys) in pending {
            let h = link.recv(Kind::Hello, TAG_SESSION, Some(HELLO_LEN))?;
            let peer_role = Role::from_u8(h[0]).ok_or_else(|| Error::Malformed {
                peer: link.peer().to_string(),
                msg: format!("unknown role {}", h[0]),
            })?;
            if peer_role == role || links[peer_role as usize].is_some() {
                return Err(Error::Malformed {
                    peer: link.peer().to_string(),
                    msg: format!("a second {peer_role} connected"),
                });
            }
            link.set_peer(peer_role.name());
            let theirs = String::from_utf8_lossy(&h[33..]).trim().to_string();
            if theirs != session_hash {
                return Err(Error::SessionMismatch {
                    peer: peer_role.name().into(),
                    ours: session_hash.into(),
                    theirs,
                });
            }
            let mut pk = [0u8; 32];
            pk.copy_from_slice(&h[1..33]);
            prfs[peer_role as usize] = Some(keys.agree(
                &pk,
                (role as u8) < (peer_role as u8),
                session_hash.as_bytes(),
            ));
            links[peer_role as usize] = Some(link);
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
        Ok(Party {
            role,
            links,
            prfs,
            prfs_off,
            phase: Phase::Inline,
            carry: std::collections::VecDeque::new(),
            own: Prf::private(),
            settings,
            tag: TAG_SESSION,
            stats: vec![LayerStats::default(); layers + 2],
        })
    }

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

    /// Dealer: whether this call runs the offline / the online part.
    pub fn does_offline(&self) -> bool {
        self.phase != Phase::Online
    }

    pub fn does_online(&self) -> bool {
        self.phase != Phase::Offline
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
        let link = self.link(to);
        let before = link.bytes_sent;
        link.send(kind, tag, data)?;
        let sent = link.bytes_sent - before;
        self.stat().bytes_sent += sent;
        Ok(())
    }

    pub fn recv_bytes(&mut self, from: Role, kind: Kind, len: usize) -> Result<Vec<u8>> {
        let tag = self.tag;
        self.link(from).recv(kind, tag, Some(len))
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

    /// Bytes sent so far to each peer (indexed by role).
    pub fn bytes_sent(&self) -> [u64; 3] {
        let mut out = [0u64; 3];
        for (i, l) in self.links.iter().enumerate() {
            if let Some(l) = l {
                out[i] = l.bytes_sent;
            }
        }
        out
    }

    /// Flushes and closes every link.
    pub fn finish(mut self) -> Result<()> {
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

/// Connected stream pairs for the three links of a session on loopback, by role.
pub fn loopback_streams() -> Result<[Vec<TcpStream>; 3]> {
    let mut out: [Vec<TcpStream>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for (a, b) in [(0usize, 1usize), (0, 2), (1, 2)] {
        let io = |e: std::io::Error| Error::Link {
            peer: "loopback".into(),
            msg: e.to_string(),
        };
        let l = TcpListener::bind("127.0.0.1:0").map_err(io)?;
        let addr = l.local_addr().map_err(io)?;
        let s = TcpStream::connect(addr).map_err(io)?;
        let (t, _) = l.accept().map_err(io)?;
        out[a].push(t);
        out[b].push(s);
    }
    Ok(out)
}

/// Connects to `addr`, retrying until `timeout` (the peer may not listen yet).
pub fn connect_retry(addr: &str, peer: &str, timeout: Duration) -> Result<TcpStream> {
    let start = Instant::now();
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() >= timeout => {
                return Err(Error::Link {
                    peer: format!("{peer} at {addr}"),
                    msg: e.to_string(),
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Accepts `n` connections on `listener` within `timeout`.
pub fn accept_n(listener: &TcpListener, n: usize, timeout: Duration) -> Result<Vec<TcpStream>> {
    let io = |e: std::io::Error| Error::Link {
        peer: "listener".into(),
        msg: e.to_string(),
    };
    listener.set_nonblocking(true).map_err(io)?;
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < n {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(io)?;
                out.push(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() >= timeout {
                    return Err(Error::Timeout {
                        peer: format!("{} more peer(s) to connect", n - out.len()),
                        secs: timeout.as_secs_f64(),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io(e)),
        }
    }
    Ok(out)
}
