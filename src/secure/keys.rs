//! Pairwise keys and PRF streams (docs/method.md 8.3).
//!
//! At session start each pair of parties runs an ephemeral X25519 key agreement (fresh secrets
//! from the operating system's RNG). The shared point is hashed with SHA-256 together with both
//! public keys and the session hash into a 32-byte seed for a ChaCha20 stream: the pair's PRF.
//! One party's share of every correlated value is drawn from that stream instead of being sent,
//! so both sides must draw in the same order (the protocols fix that order).
use super::ring::{Modulus, P};
use rand_chacha::ChaCha20Rng;
use rand_core::{OsRng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use x25519_dalek::{EphemeralSecret, PublicKey};

/// One side of an X25519 key agreement; the secret is consumed by [`KeyPair::agree`].
pub struct KeyPair {
    secret: EphemeralSecret,
    pub public: [u8; 32],
}

impl KeyPair {
    /// A fresh ephemeral key from the OS RNG.
    pub fn generate() -> KeyPair {
        let secret = EphemeralSecret::random_from_rng(OsRng);
        let public = PublicKey::from(&secret).to_bytes();
        KeyPair { secret, public }
    }

    /// The PRF shared with the peer whose public key is `peer`. `lower_first` orders the two
    /// public keys the same way on both sides (true on the party with the lower role index).
    pub fn agree(self, peer: &[u8; 32], lower_first: bool, context: &[u8]) -> Prf {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer));
        let (a, b) = if lower_first {
            (&self.public, peer)
        } else {
            (peer, &self.public)
        };
        let mut h = Sha256::new();
        h.update(b"brelu secure prf v1");
        h.update(shared.as_bytes());
        h.update(a);
        h.update(b);
        h.update(context);
        let seed: [u8; 32] = h.finalize().into();
        Prf::from_seed(seed)
    }
}

/// 256 mod m for m in 0..=256 (entry 0 unused).
const REJECT: [u16; 257] = {
    let mut t = [0u16; 257];
    let mut m = 1;
    while m <= 256 {
        t[m] = (256 % m) as u16;
        m += 1;
    }
    t
};

/// Bytes drawn from the stream at a time for the byte-level samplers.
const BUF: usize = 4096;

/// A cryptographic pseudo-random stream (ChaCha20) shared by two parties.
pub struct Prf {
    rng: ChaCha20Rng,
    buf: Box<[u8; BUF]>,
    pos: usize,
}

impl Prf {
    pub fn from_seed(seed: [u8; 32]) -> Prf {
        Prf {
            rng: ChaCha20Rng::from_seed(seed),
            buf: Box::new([0u8; BUF]),
            pos: BUF,
        }
    }

    /// The next byte of the buffered byte stream.
    #[inline]
    fn byte(&mut self) -> u8 {
        if self.pos == BUF {
            self.rng.fill_bytes(&mut self.buf[..]);
            self.pos = 0;
        }
        let b = self.buf[self.pos];
        self.pos += 1;
        b
    }

    /// A uniform integer in 0..m (1 <= m <= 256) from bytes, without bias and without a
    /// division: Lemire's multiply-and-reject with the rejection thresholds 256 mod m
    /// precomputed.
    #[inline]
    fn below(&mut self, m: u16) -> u8 {
        let t = REJECT[m as usize];
        loop {
            let prod = self.byte() as u16 * m;
            if (prod & 0xff) >= t {
                return (prod >> 8) as u8;
            }
        }
    }

    /// A stream seeded from the OS RNG: private randomness of one party.
    pub fn private() -> Prf {
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        Prf::from_seed(seed)
    }

    /// `n` uniform ring elements of Z_2^64 (bulk stream output, little-endian words).
    pub fn ring(&mut self, n: usize) -> Vec<u64> {
        let mut out = vec![0u64; n];
        self.rng
            .fill_bytes(bytemuck::cast_slice_mut::<u64, u8>(&mut out));
        out.iter_mut().for_each(|v| *v = u64::from_le(*v));
        out
    }

    /// `n` uniform elements of Z_2^k or Z_(2^k - 1).
    pub fn ring_mod(&mut self, n: usize, m: Modulus) -> Vec<u64> {
        let mask = m.mask();
        let mut out = self.ring(n);
        for v in out.iter_mut() {
            *v &= mask;
            while m.odd && *v == mask {
                *v = self.rng.next_u64() & mask;
            }
        }
        out
    }

    /// `n` uniform bits (0/1).
    pub fn bits(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let w = self.rng.next_u64();
            for i in 0..64.min(n - out.len()) {
                out.push(((w >> i) & 1) as u8);
            }
        }
        out
    }

    /// `n` uniform elements of Z_67 (rejection sampling on bytes).
    pub fn zp(&mut self, n: usize) -> Vec<u8> {
        self.bulk_below(n, P as u16, 0)
    }

    /// `n` uniform nonzero elements of Z_67.
    pub fn zp_nonzero(&mut self, n: usize) -> Vec<u8> {
        self.bulk_below(n, P as u16 - 1, 1)
    }

    /// `n` uniform values in offset..offset+m: one bulk draw of n bytes, each mapped like
    /// [`Prf::below`] in a branch-free pass that also lists the rejected positions; those are
    /// then redrawn from the buffered stream in order.
    fn bulk_below(&mut self, n: usize, m: u16, offset: u8) -> Vec<u8> {
        let t = REJECT[m as usize];
        let mut out = vec![0u8; n];
        self.rng.fill_bytes(&mut out);
        let mut rejected = vec![0u32; n + 1];
        let mut count = 0usize;
        for (i, b) in out.iter_mut().enumerate() {
            let prod = *b as u16 * m;
            *b = (prod >> 8) as u8 + offset;
            rejected[count] = i as u32;
            count += ((prod & 0xff) < t) as usize;
        }
        for &i in &rejected[..count] {
            out[i as usize] = self.below(m) + offset;
        }
        out
    }

    /// A uniform permutation of 0..k, k <= 256 (Fisher-Yates with unbiased draws).
    pub fn permutation(&mut self, k: usize, out: &mut Vec<u8>) {
        out.clear();
        out.extend((0..k).map(|i| i as u8));
        for i in (1..k).rev() {
            let j = self.below(i as u16 + 1) as usize;
            out.swap(i, j);
        }
    }

    /// `n` permutations of 0..k (k <= 256), concatenated: Fisher-Yates from one bulk draw of
    /// k - 1 bytes per permutation, a rejected byte redrawn from the buffered stream.
    pub fn permutations(&mut self, n: usize, k: usize) -> Vec<u8> {
        let steps = k.saturating_sub(1);
        let mut bytes = vec![0u8; n * steps];
        self.rng.fill_bytes(&mut bytes);
        let mut all = Vec::with_capacity(n * k);
        for e in 0..n {
            let start = all.len();
            all.extend((0..k).map(|i| i as u8));
            let perm = &mut all[start..];
            for (step, i) in (1..k).rev().enumerate() {
                let m = i as u16 + 1;
                let prod = bytes[e * steps + step] as u16 * m;
                let j = if (prod & 0xff) < REJECT[m as usize] {
                    self.below(m)
                } else {
                    (prod >> 8) as u8
                };
                perm.swap(i, j as usize);
            }
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_derive_the_same_stream() {
        let a = KeyPair::generate();
        let b = KeyPair::generate();
        let (pa, pb) = (a.public, b.public);
        let mut sa = a.agree(&pb, true, b"ctx");
        let mut sb = b.agree(&pa, false, b"ctx");
        assert_eq!(sa.ring(16), sb.ring(16));
        assert_eq!(sa.zp(100), sb.zp(100));
        // A different context gives an unrelated stream.
        let c = KeyPair::generate();
        let d = KeyPair::generate();
        let (pc, pd) = (c.public, d.public);
        assert_ne!(
            c.agree(&pd, true, b"x").ring(4),
            d.agree(&pc, false, b"y").ring(4)
        );
    }

    #[test]
    fn field_samplers_stay_in_range() {
        let mut p = Prf::from_seed([3; 32]);
        assert!(p.zp(10_000).iter().all(|&v| v < P));
        let nz = p.zp_nonzero(10_000);
        assert!(nz.iter().all(|&v| (1..P).contains(&v)));
        let m = Modulus::odd(8);
        assert!(p.ring_mod(10_000, m).iter().all(|&v| v < 255));
        // Every value of a small range appears about equally often.
        let mut counts = [0usize; 67];
        for v in p.zp(670_000) {
            counts[v as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_400..10_600).contains(&c)),
            "{counts:?}"
        );
        let mut perm = Vec::new();
        p.permutation(64, &mut perm);
        let mut s = perm.clone();
        s.sort();
        assert_eq!(s, (0..64).collect::<Vec<u8>>());
        let many = p.permutations(1000, 5);
        let mut first = [0usize; 5];
        for c in many.chunks(5) {
            let mut s = c.to_vec();
            s.sort();
            assert_eq!(s, vec![0, 1, 2, 3, 4]);
            first[c[0] as usize] += 1;
        }
        assert!(first.iter().all(|&f| (140..260).contains(&f)), "{first:?}");
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// `cargo test --release --lib secure::keys::timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn sampler_speed() {
        let mut p = Prf::from_seed([1; 32]);
        let n = 1 << 22;
        for name in ["zp", "zp_nonzero", "perm64", "ring"] {
            let t = std::time::Instant::now();
            let s: usize = match name {
                "zp" => p.zp(n).len(),
                "zp_nonzero" => p.zp_nonzero(n).len(),
                "perm64" => p.permutations(n / 64, 64).len(),
                _ => p.ring(n).len(),
            };
            let ns = t.elapsed().as_secs_f64() * 1e9 / s as f64;
            println!("{name}: {ns:.2} ns/element");
        }
    }
}
