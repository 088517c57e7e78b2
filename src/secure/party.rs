//! One party of a session: its role, its links and PRFs with the two others, per-layer
//! counters and the messages of the protocols. `secure::join` makes the links.
use super::ahead::Dealer;
use super::keys::Prf;
use super::link::{Link, LinkSender};
use super::plan::Settings;
pub use super::wire::Role;
use super::wire::{pack_u64, unpack_u64, Kind};
use crate::error::{Error, Result};
use serde::Serialize;
use std::time::Duration;

/// Tag of the session control frames.
pub const TAG_SESSION: u32 = u32::MAX;

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
    /// The server's budget of images for this client (`--max-queries`), checked before each.
    pub budget: Option<super::budget::QueryBudget>,
    /// Private randomness of this party.
    pub own: Prf,
    pub settings: Settings,
    /// The step (layer index) messages are tagged with.
    pub tag: u32,
    /// Counters per tag: one per layer, then the output reveal, then session control.
    pub stats: Vec<LayerStats>,
}

impl Party {
    /// The party over its confirmed links (one per other role) and their PRFs
    /// (`secure::join` makes them), after the transcript check.
    pub(super) fn assemble(
        role: Role,
        links: [Option<Link>; 3],
        mut prfs: [Option<Prf>; 3],
        transcripts: &[[u8; 32]; 3],
        settings: Settings,
        ahead_batches: u64,
        layers: usize,
    ) -> Result<Party> {
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
        let mut p = Party {
            role,
            links,
            out,
            prfs,
            prfs_off,
            dealer: (role == Role::Dealer).then(|| Dealer::new(ahead_batches)),
            budget: None,
            own: Prf::private(),
            settings,
            tag: TAG_SESSION,
            stats: vec![LayerStats::default(); layers + 2],
        };
        p.check_transcripts(transcripts)?;
        Ok(p)
    }

    /// Every link's handshake hash is checked by the third party: each party tells each peer
    /// its hash of the link with the other peer, and the two peers' accounts of the link
    /// between them must agree. Links of different sessions spliced together by a relay
    /// cannot.
    fn check_transcripts(&mut self, ours: &[[u8; 32]; 3]) -> Result<()> {
        let mut peers = Role::ALL.into_iter().filter(|x| *x != self.role);
        let (q, r) = (
            peers.next().expect("two peers"),
            peers.next().expect("two peers"),
        );
        self.send_bytes(q, Kind::Session, &ours[r as usize])?;
        self.send_bytes(r, Kind::Session, &ours[q as usize])?;
        let from_q = self.recv_bytes(q, Kind::Session, 32)?;
        let from_r = self.recv_bytes(r, Kind::Session, 32)?;
        if from_q != from_r {
            return Err(Error::OtherSession {
                peer: format!("the link between the {q} and the {r}"),
                msg: format!(
                    "the {q} and the {r} report different handshakes for it (one of them is \
                     connected to a party of another session)"
                ),
            });
        }
        Ok(())
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
            budget: None,
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
