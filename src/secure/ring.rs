//! The ring Z_2^64 (wrapping `u64`), fixed-point encoding, local share truncation and the small
//! prime field Z_67 used by the comparison protocol (docs/method.md 8.2).
//!
//! Values are two's-complement fixed point with `frac` fractional bits: `enc(v) = round(v *
//! 2^frac)` as an `i64`, stored as the `u64` with the same bits. Secret shares are additive:
//! `x = x0 + x1 mod 2^64`.

/// The prime of the comparison field (SecureNN): larger than 64 + 2, so a sum of 64 bit terms
/// plus two never wraps.
pub const P: u8 = 67;

/// Fixed-point parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fixed {
    pub frac: u32,
}

impl Default for Fixed {
    fn default() -> Self {
        Fixed { frac: 12 }
    }
}

impl Fixed {
    pub fn scale(&self) -> f64 {
        (1u64 << self.frac) as f64
    }

    /// round(v * 2^frac) in the ring (saturating at the i64 range).
    pub fn encode(&self, v: f64) -> u64 {
        (v * self.scale()).round() as i64 as u64
    }

    pub fn decode(&self, x: u64) -> f64 {
        x as i64 as f64 / self.scale()
    }

    /// Encodes every value of `what` (an image, a layer's weights), refusing NaN, infinities
    /// and magnitudes of 2^(62 - frac) or more (beyond them the ring wraps and the exact
    /// DReLU's guarantee ends) instead of silently saturating or zeroing them.
    pub fn encode_all(&self, v: &[f32], what: &str) -> crate::error::Result<Vec<u64>> {
        let limit = (1u64 << (62 - self.frac)) as f64;
        v.iter()
            .enumerate()
            .map(|(i, &x)| {
                if !x.is_finite() || (x as f64).abs() >= limit {
                    return Err(crate::error::Error::InvalidArgument(format!(
                        "{what}: element {i} is {x}, which {} fixed point with {} fractional \
                         bits (|value| < 2^{})",
                        if x.is_finite() { "exceeds" } else { "has no" },
                        self.frac,
                        62 - self.frac
                    )));
                }
                Ok(self.encode(x as f64))
            })
            .collect()
    }

    pub fn decode_all(&self, x: &[u64]) -> Vec<f64> {
        x.iter().map(|&x| self.decode(x)).collect()
    }
}

/// Plaintext truncation: arithmetic shift right (floor division by 2^bits).
pub fn trunc_plain(x: u64, bits: u32) -> u64 {
    ((x as i64) >> bits) as u64
}

/// Local truncation of one share (SecureML): party 0 shifts its share, party 1 shifts the
/// negation of its share and negates back. The shares then add up to floor(x / 2^bits) or one
/// more, except with probability about |x| / 2^64 (a "truncation failure", off by 2^(64-bits)).
pub fn trunc_share(x: u64, bits: u32, party: usize) -> u64 {
    if party == 0 {
        x >> bits
    } else {
        (x.wrapping_neg() >> bits).wrapping_neg()
    }
}

pub fn trunc_share_all(x: &mut [u64], bits: u32, party: usize) {
    x.iter_mut().for_each(|v| *v = trunc_share(*v, bits, party));
}

/// Element-wise wrapping sum.
pub fn add(a: &[u64], b: &[u64]) -> Vec<u64> {
    a.iter().zip(b).map(|(x, y)| x.wrapping_add(*y)).collect()
}

/// Element-wise wrapping difference.
pub fn sub(a: &[u64], b: &[u64]) -> Vec<u64> {
    a.iter().zip(b).map(|(x, y)| x.wrapping_sub(*y)).collect()
}

pub fn add_assign(a: &mut [u64], b: &[u64]) {
    a.iter_mut()
        .zip(b)
        .for_each(|(x, y)| *x = x.wrapping_add(*y));
}

pub fn sub_assign(a: &mut [u64], b: &[u64]) {
    a.iter_mut()
        .zip(b)
        .for_each(|(x, y)| *x = x.wrapping_sub(*y));
}

/// Arithmetic modulo 2^k (k <= 64) or 2^k - 1, on `u64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Modulus {
    /// 2^k (as `mask + 1`) or 2^k - 1.
    pub odd: bool,
    pub bits: u32,
}

impl Modulus {
    pub fn even(bits: u32) -> Self {
        Modulus { odd: false, bits }
    }

    pub fn odd(bits: u32) -> Self {
        Modulus { odd: true, bits }
    }

    /// 2^k - 1 as a mask of the low k bits.
    pub fn mask(&self) -> u64 {
        if self.bits >= 64 {
            u64::MAX
        } else {
            (1u64 << self.bits) - 1
        }
    }

    /// Whether `x` is a valid element (below 2^k, or 2^k - 1).
    pub fn contains(&self, x: u64) -> bool {
        if self.odd {
            x < self.mask()
        } else {
            x <= self.mask()
        }
    }

    /// Reduces any u64 (k < 64) / keeps (k = 64) in the ring 2^k; reduces mod 2^k - 1.
    pub fn reduce(&self, x: u64) -> u64 {
        if self.odd {
            let n = self.mask();
            if self.bits >= 64 {
                if x == u64::MAX {
                    0
                } else {
                    x
                }
            } else {
                x % n
            }
        } else {
            x & self.mask()
        }
    }

    pub fn add(&self, a: u64, b: u64) -> u64 {
        if self.odd {
            let n = self.mask();
            // a, b < n: a + b < 2n; compute without overflow.
            let (s, carry) = a.overflowing_add(b);
            if carry {
                // a + b = s + 2^64 = s + n + 1 (k = 64)
                s + 1
            } else if s >= n {
                s - n
            } else {
                s
            }
        } else {
            a.wrapping_add(b) & self.mask()
        }
    }

    pub fn neg(&self, a: u64) -> u64 {
        if self.odd {
            if a == 0 {
                0
            } else {
                self.mask() - a
            }
        } else {
            a.wrapping_neg() & self.mask()
        }
    }

    pub fn sub(&self, a: u64, b: u64) -> u64 {
        self.add(a, self.neg(b))
    }

    /// a * small (small < 2^8), by repeated doubling-free widening multiply.
    pub fn mul(&self, a: u64, b: u64) -> u64 {
        if self.odd {
            ((a as u128 * b as u128) % self.mask() as u128) as u64
        } else {
            a.wrapping_mul(b) & self.mask()
        }
    }
}

/// Z_67 helpers on bytes.
pub fn zp_add(a: u8, b: u8) -> u8 {
    ((a as u16 + b as u16) % P as u16) as u8
}

pub fn zp_sub(a: u8, b: u8) -> u8 {
    ((a as u16 + P as u16 - b as u16) % P as u16) as u8
}

pub fn zp_mul(a: u8, b: u8) -> u8 {
    ((a as u16 * b as u16) % P as u16) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let f = Fixed::default();
        for v in [0.0, 1.0, -1.0, 0.5, -3.25, 1000.125] {
            assert_eq!(f.decode(f.encode(v)), v);
        }
        assert_eq!(f.encode(1.0 / 4096.0), 1);
        assert_eq!(f.encode(-1.0 / 4096.0), u64::MAX);
    }

    #[test]
    fn local_truncation_is_off_by_at_most_one() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let mut failures = 0;
        for i in 0..100_000 {
            let x: i64 = rng.gen_range(-(1i64 << 40)..(1i64 << 40)) + (i % 3) - 1;
            let x0: u64 = rng.gen();
            let x1 = (x as u64).wrapping_sub(x0);
            let t = trunc_share(x0, 12, 0).wrapping_add(trunc_share(x1, 12, 1)) as i64;
            let want = x >> 12;
            let d = t.wrapping_sub(want);
            if d != 0 && d != 1 {
                failures += 1;
            }
        }
        // Failure probability is about 2^40 / 2^64 per value.
        assert_eq!(failures, 0);
    }

    /// Large values: the failure rate follows |x| / 2^64 (docs/method.md 8.2 asks to measure it).
    #[test]
    fn local_truncation_failure_rate_is_measured() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
        let n = 200_000;
        let mut failures = 0;
        let mut expected = 0.0;
        for _ in 0..n {
            let x: i64 = rng.gen_range(-(1i64 << 56)..(1i64 << 56));
            expected += (x.unsigned_abs() as f64) / 2f64.powi(64);
            let x0: u64 = rng.gen();
            let x1 = (x as u64).wrapping_sub(x0);
            let t = trunc_share(x0, 12, 0).wrapping_add(trunc_share(x1, 12, 1)) as i64;
            let d = t.wrapping_sub(x >> 12);
            if d != 0 && d != 1 {
                failures += 1;
            }
        }
        // E|x| / 2^64 = 2^55 / 2^64 = 1/512: about 390 failures in 200,000.
        assert!(
            (expected * 0.7..expected * 1.3).contains(&(failures as f64)),
            "failures {failures}, expected about {expected:.0}"
        );
    }

    #[test]
    fn odd_modulus_arithmetic() {
        let m = Modulus::odd(64);
        let n = u64::MAX;
        assert_eq!(m.add(n - 1, 1), 0);
        assert_eq!(m.add(n - 1, n - 1), n - 2);
        assert_eq!(m.neg(5), n - 5);
        assert_eq!(m.sub(3, 5), n - 2);
        let m8 = Modulus::odd(8);
        assert_eq!(m8.add(254, 3), 2);
        assert_eq!(m8.reduce(255), 0);
        let e8 = Modulus::even(8);
        assert_eq!(e8.add(255, 3), 2);
        assert_eq!(e8.neg(1), 255);
    }
}
