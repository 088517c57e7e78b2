//! The frame format of the secure-inference links. A frame is a 16-byte header and a payload:
//!
//! ```text
//! magic "BR" | version u8 | kind u8 (bit 7: more) | tag u32 LE | seq u32 LE | len u32 LE | payload
//! ```
//!
//! `tag` names the layer (op index) or session step a message belongs to, `seq` counts frames
//! per direction from 0, so a lost, duplicated or reordered frame is detected. A message larger
//! than the maximum frame size travels as several frames of the same kind and tag, all but the
//! last with the `more` bit set. Decoding checks the length against the maximum frame size
//! before anything is allocated and never panics. Frames travel inside the encrypted records of
//! [`super::noise`].

pub const MAGIC: [u8; 2] = *b"BR";
pub const VERSION: u8 = 2;
/// Bit of the kind byte set on every frame of a message but its last.
const MORE: u8 = 0x80;
pub const HEADER_LEN: usize = crate::spec::framing::FRAME_HEADER_LEN;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Joining: the initiator's key confirmation and the transcript check.
    Session = 1,
    /// Session setup: the opened weight masks F = W - B.
    Setup = 2,
    /// Protocol data of one layer.
    Data = 3,
    /// Control: start of an image or end of the session.
    Control = 4,
    /// Output shares.
    Output = 5,
    /// Input-independent correlated randomness from the dealer, sent ahead of use.
    Offline = 6,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Session,
            2 => Kind::Setup,
            3 => Kind::Data,
            4 => Kind::Control,
            5 => Kind::Output,
            6 => Kind::Offline,
            _ => return None,
        })
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    /// Another frame of the same message follows.
    pub more: bool,
    pub tag: u32,
    pub seq: u32,
    pub len: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC);
        b[2] = VERSION;
        b[3] = self.kind as u8 | if self.more { MORE } else { 0 };
        b[4..8].copy_from_slice(&self.tag.to_le_bytes());
        b[8..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes a header; fails (never panics) on bad magic, version, kind or an oversize length.
    pub fn decode(b: &[u8], max_frame: usize) -> Result<Header, String> {
        if b.len() != HEADER_LEN {
            return Err(format!(
                "header is {} bytes, expected {HEADER_LEN}",
                b.len()
            ));
        }
        if b[0..2] != MAGIC {
            return Err(format!("bad magic {:02x}{:02x}", b[0], b[1]));
        }
        if b[2] != VERSION {
            return Err(format!("protocol version {} (ours is {VERSION})", b[2]));
        }
        let kind = Kind::from_u8(b[3] & !MORE)
            .ok_or_else(|| format!("unknown frame type {}", b[3] & !MORE))?;
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let len = word(12);
        if len as usize > max_frame {
            return Err(format!(
                "frame of {len} bytes exceeds the maximum of {max_frame}"
            ));
        }
        Ok(Header {
            kind,
            more: b[3] & MORE != 0,
            tag: word(4),
            seq: word(8),
            len,
        })
    }
}

/// Ring elements as little-endian bytes, `width` bytes each (1..=8; the value must fit).
pub fn pack_u64(v: &[u64], width: usize) -> Vec<u8> {
    if width == 8 {
        let mut out = Vec::with_capacity(v.len() * 8);
        for x in v {
            out.extend_from_slice(&x.to_le_bytes());
        }
        return out;
    }
    let mut out = Vec::with_capacity(v.len() * width);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes()[..width]);
    }
    out
}

/// Inverse of [`pack_u64`]; `None` when the length is not a multiple of `width`.
pub fn unpack_u64(b: &[u8], width: usize) -> Option<Vec<u64>> {
    if width == 0 || width > 8 || !b.len().is_multiple_of(width) {
        return None;
    }
    Some(
        b.chunks_exact(width)
            .map(|c| {
                let mut w = [0u8; 8];
                w[..width].copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect(),
    )
}

/// The fuzzing entry point (`fuzz/fuzz_targets/wire_decode.rs`): decodes arbitrary bytes as a
/// header and a payload of packed ring elements; whatever decodes must re-encode to the same
/// bytes. Panics only if that round trip fails.
pub fn fuzz_decode(data: &[u8]) {
    if data.len() >= HEADER_LEN {
        if let Ok(h) = Header::decode(&data[..HEADER_LEN], 1 << 20) {
            assert_eq!(h.encode().as_slice(), &data[..HEADER_LEN]);
        }
    }
    let width = data.first().map(|b| (*b as usize % 9).max(1)).unwrap_or(8);
    if let Some(v) = unpack_u64(data, width) {
        assert_eq!(pack_u64(&v, width), data);
    }
}

/// The three roles (docs/method.md 8.1). The index is also the arithmetic party index of the two
/// share holders: the client holds share 0, the server share 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
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

    pub fn from_u8(v: u8) -> Option<Role> {
        Role::ALL.get(v as usize).copied()
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn header_round_trip() {
        let h = Header {
            kind: Kind::Data,
            more: true,
            tag: 7,
            seq: 99,
            len: 1234,
        };
        assert_eq!(Header::decode(&h.encode(), 1 << 20), Ok(h));
        assert!(Header::decode(&h.encode(), 1000).is_err());
    }

    /// Random bytes never make the decoder panic; whatever decodes re-encodes identically.
    #[test]
    fn decode_random_bytes_never_panics() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        for i in 0..200_000 {
            let n = if i % 10 == 0 {
                rng.gen_range(0..20)
            } else {
                16
            };
            let mut b: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            if i % 2 == 0 && n >= 4 {
                b[0..2].copy_from_slice(&MAGIC);
                b[2] = VERSION;
                b[3] = rng.gen_range(0..7) | if rng.gen() { MORE } else { 0 };
            }
            if let Ok(h) = Header::decode(&b, 1 << 24) {
                assert_eq!(h.encode().as_slice(), b.as_slice());
            }
            fuzz_decode(&b);
        }
    }

    #[test]
    fn pack_round_trip() {
        let v = vec![0u64, 1, 255, 65535, 1 << 20];
        for w in [3usize, 4, 8] {
            assert_eq!(unpack_u64(&pack_u64(&v, w), w).unwrap(), v);
        }
        assert!(unpack_u64(&[1, 2, 3], 2).is_none());
    }
}
