//! DReLU on shares (docs/method.md 8.4): the MSB extraction with one PrivateCompare (the
//! default), SecureNN's ShareConvert + ComputeMSB (the published protocol), PrivateCompare in
//! Z_67, approximate windows and batches.
use super::super::party::{Party, Role};
use super::super::plan::DreluProtocol;
use super::super::ring::{trunc_share, zp_add, zp_sub, Modulus, P};
use super::super::wire;
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Bytes per packed ring element of a k-bit ring.
fn width(bits: u32) -> usize {
    bits.div_ceil(8) as usize
}

/// The client's / server's half of PrivateCompare (SecureNN) over k bit positions in Z_67:
/// for each element, with x's bits shared in Z_67 (`xbits`, k per element, bit i at i), the
/// public value `r` and the common random bit `beta`, sends the dealer the masked, multiplied
/// and per-element permuted vector whose reconstruction has a zero iff beta XOR [x > r].
fn pc_send(p: &mut Party, xbits: &[u8], r: &[u64], beta: &[u8], k: usize) -> Result<()> {
    let n = r.len();
    let j = p.j() as u8;
    let mask = if k >= 64 { u64::MAX } else { (1u64 << k) - 1 };
    // Common randomness first (sequential: both sides draw in the same order), then the
    // per-element work in parallel.
    let prf = p.prf(p.other());
    let s = prf.zp_nonzero(n * k);
    let u = prf.zp(n * k);
    let perms = prf.permutations(n, k);
    let mut out = vec![0u8; n * k];
    out.par_chunks_mut(k).enumerate().for_each(|(e, out)| {
        let mut c = [0u32; 64];
        let xb = &xbits[e * k..(e + 1) * k];
        // beta = 0: [x > r]. beta = 1: [x <= r] = [x < r + 1], always true when r = 2^k - 1.
        let (lt, t, always) = if beta[e] == 0 {
            (false, r[e], false)
        } else if r[e] & mask == mask {
            (true, 0, true)
        } else {
            (true, r[e] + 1, false)
        };
        // Unreduced sums (all terms are below 67 and there are at most 64 of them, so they fit
        // a u32); one reduction per position at the end.
        let p32 = P as u32;
        let j32 = j as u32;
        if always {
            for (i, ci) in c.iter_mut().enumerate().take(k) {
                *ci = if i == 0 { 0 } else { j32 };
            }
        } else {
            let mut acc = 0u32; // share of the sum over higher bits of x_l XOR t_l
            for i in (0..k).rev() {
                let ti = ((t >> i) & 1) as u32;
                let xi = xb[i] as u32;
                c[i] = if lt {
                    // x_i - t_i + 1 + acc
                    xi + j32 * (1 - ti) + acc
                } else {
                    // t_i - x_i + 1 + acc
                    j32 * (ti + 1) + (p32 - xi) + acc
                };
                acc += if ti == 0 { xi } else { j32 + p32 - xi };
            }
        }
        let base = e * k;
        for i in 0..k {
            let ui = u[base + i] as u32;
            let mask = if j == 0 { ui } else { p32 - ui };
            out[perms[base + i] as usize] = ((s[base + i] as u32 * c[i] + mask) % p32) as u8;
        }
    });
    p.send_bytes(Role::Dealer, wire::Kind::Data, &out)
}

/// The dealer's half of PrivateCompare: beta XOR [x > r] per element.
fn pc_dealer(p: &mut Party, n: usize, k: usize) -> Result<Vec<u8>> {
    let d0 = p.recv_bytes(Role::Client, wire::Kind::Data, n * k)?;
    let d1 = p.recv_bytes(Role::Server, wire::Kind::Data, n * k)?;
    if d0.iter().chain(&d1).any(|&v| v >= P) {
        return Err(Error::Malformed {
            peer: "client/server".into(),
            msg: "PrivateCompare value outside Z_67".into(),
        });
    }
    Ok(d0
        .par_chunks(k)
        .zip(d1.par_chunks(k))
        .map(|(a, b)| a.iter().zip(b).any(|(x, y)| zp_add(*x, *y) == 0) as u8)
        .collect())
}

/// Shares of bits of `v` (k per element) in Z_67: the server's from the PRF (`rand`), the
/// client's returned.
fn bit_shares(v: &[u64], k: usize, server_share: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * k);
    for (e, x) in v.iter().enumerate() {
        for i in 0..k {
            let bit = ((x >> i) & 1) as u8;
            out.push(zp_sub(bit, server_share[e * k + i]));
        }
    }
    out
}

/// The dealer's part of [`drelu`]: correlated randomness ahead (offline), then the two
/// PrivateCompare results (online).
fn drelu_dealer(p: &mut Party, n: usize) -> Result<Vec<u64>> {
    let bits = p.settings.drelu_bits;
    let k = bits as usize;
    let me = Modulus::even(bits);
    let mo = Modulus::odd(bits);
    let w = width(bits);
    if p.does_offline() {
        p.dealer()?.batch_ahead()?;
        // Correlated randomness, sent ahead: z in Z_2^k with shares in Z_2^k and
        // Z_(2^k-1) and bit shares; x in Z_(2^k-1) with shares and bit shares.
        let z = p.own.ring_mod(n, me);
        let x = p.own.ring_mod(n, mo);
        let sd = p.prf_off(Role::Server);
        let z1 = sd.ring_mod(n, me);
        let zo1 = sd.ring_mod(n, mo);
        let zb1 = sd.zp(n * k);
        let x1 = sd.ring_mod(n, mo);
        let xb1 = sd.zp(n * k);
        let z0: Vec<u64> = z.iter().zip(&z1).map(|(a, b)| me.sub(*a, *b)).collect();
        let zo0: Vec<u64> = z
            .iter()
            .zip(&zo1)
            .map(|(a, b)| mo.sub(mo.reduce(*a), *b))
            .collect();
        let x0: Vec<u64> = x.iter().zip(&x1).map(|(a, b)| mo.sub(*a, *b)).collect();
        let mut msg = wire::pack_u64(&z0, w);
        msg.extend(wire::pack_u64(&zo0, w));
        msg.extend(bit_shares(&z, k, &zb1));
        msg.extend(wire::pack_u64(&x0, w));
        msg.extend(bit_shares(&x, k, &xb1));
        p.send_bytes(Role::Client, wire::Kind::Offline, &msg)?;
        p.dealer()?.carry.push(x)?;
    }
    if !p.does_online() {
        return Ok(Vec::new());
    }
    let x = p.dealer()?.carry.pop()?;
    // ShareConvert: g' = beta1 XOR [z > c], shared in Z_(2^k-1).
    let g = pc_dealer(p, n, k)?;
    let g1 = p.prf(Role::Server).ring_mod(n, mo);
    let g0: Vec<u64> = g
        .iter()
        .zip(&g1)
        .map(|(a, b)| mo.sub(*a as u64, *b))
        .collect();
    p.send_ring(Role::Client, &g0, w)?;
    // ComputeMSB: h = beta2 XOR [x > r] XOR lsb(x), shared in Z_2^64.
    let bp = pc_dealer(p, n, k)?;
    p.dealer()?.batch_done();
    let h1 = p.prf(Role::Server).ring(n);
    let h0: Vec<u64> = (0..n)
        .map(|e| ((bp[e] as u64) ^ (x[e] & 1)).wrapping_sub(h1[e]))
        .collect();
    p.send_ring(Role::Client, &h0, 8)?;
    p.round();
    p.round();
    Ok(Vec::new())
}

/// The dealer sent values outside their ring or Z_67: they would break the field arithmetic
/// (a share of 68 or more underflows in PrivateCompare), so they are refused by name.
fn bad_randomness() -> Error {
    Error::Malformed {
        peer: "dealer".into(),
        msg: "DReLU randomness outside its ring or Z_67".into(),
    }
}

/// A computing party's shares of the dealer's correlated randomness of [`drelu`].
struct DreluRandomness {
    /// z in Z_2^k.
    z: Vec<u64>,
    /// z in Z_(2^k-1).
    zo: Vec<u64>,
    /// Bits of z in Z_67.
    zb: Vec<u8>,
    /// x in Z_(2^k-1).
    x: Vec<u64>,
    /// Bits of x in Z_67.
    xb: Vec<u8>,
}

fn drelu_randomness(p: &mut Party, n: usize) -> Result<DreluRandomness> {
    let bits = p.settings.drelu_bits;
    let k = bits as usize;
    let me = Modulus::even(bits);
    let mo = Modulus::odd(bits);
    let w = width(bits);
    let j = p.j();
    Ok(if j == 1 {
        let sd = p.prf_off(Role::Dealer);
        let z = sd.ring_mod(n, me);
        let zo = sd.ring_mod(n, mo);
        let zb = sd.zp(n * k);
        let x = sd.ring_mod(n, mo);
        let xb = sd.zp(n * k);
        DreluRandomness { z, zo, zb, x, xb }
    } else {
        let len = 3 * n * w + 2 * n * k;
        let m = p.recv_bytes(Role::Dealer, wire::Kind::Offline, len)?;
        let ring = |s: &[u8]| wire::unpack_u64(s, w).unwrap_or_default();
        let mut o = 0;
        let mut take = |len: usize| {
            let s = &m[o..o + len];
            o += len;
            s
        };
        let z = ring(take(n * w));
        let zo = ring(take(n * w));
        let zb = take(n * k).to_vec();
        let x = ring(take(n * w));
        let xb = take(n * k).to_vec();
        let bad = !z.iter().all(|&v| me.contains(v))
            || !zo.iter().chain(&x).all(|&v| mo.contains(v))
            || zb.iter().chain(&xb).any(|&v| v >= P);
        if bad {
            return Err(bad_randomness());
        }
        DreluRandomness { z, zo, zb, x, xb }
    })
}

/// DReLU: shares of [a > 0] in Z_2^64 for shares of `n` values `a` (SecureNN ShareConvert +
/// ComputeMSB, each with a PrivateCompare in Z_67). With `drelu_bits` k < 64 only a window of
/// k bits (after dropping `drelu_shift` low bits) is compared; see [`drelu_in_window`] for
/// sums of several values. Bytes per element, w =
/// ceil(k/8): dealer -> client 3w + 2k (correlated randomness, sent ahead), w and 8 (the two
/// comparison results); client <-> server 2 x 2w (the two openings); client, server -> dealer
/// 2 x 2k (the two PrivateCompare vectors). In all 6k + 8w + 8: 456 bytes for k = 64, 120 for
/// k = 16. Six sequential message trips.
pub fn drelu(p: &mut Party, a: &[u64], n: usize) -> Result<Vec<u64>> {
    drelu_in_window(p, a, n, &[])
}

/// [`drelu`] where element `e` is a sum of up to 2^`sum_bits[e]` values (a block-ReLU patch):
/// an approximate window drops that many more low bits, so it bounds the mean as the
/// published method's mean comparison does, instead of wrapping on a large patch whose sum
/// leaves the window. Exact DReLU (64 bits) ignores `sum_bits`.
pub fn drelu_in_window(p: &mut Party, a: &[u64], n: usize, sum_bits: &[u8]) -> Result<Vec<u64>> {
    p.count_drelus(n);
    if n == 0 {
        return Ok(Vec::new());
    }
    let batch = p.settings.drelu_batch.max(1);
    if n > batch {
        let mut out = Vec::with_capacity(if p.role == Role::Dealer { 0 } else { n });
        for start in (0..n).step_by(batch) {
            let m = batch.min(n - start);
            let (a, s) = match p.role {
                Role::Dealer => (&[][..], &[][..]),
                _ => (
                    &a[start..start + m],
                    sum_bits.get(start..start + m).unwrap_or(&[]),
                ),
            };
            out.extend(drelu_batch(p, a, m, s)?);
        }
        return Ok(out);
    }
    drelu_batch(p, a, n, sum_bits)
}

/// One batch of [`drelu_in_window`].
fn drelu_batch(p: &mut Party, a: &[u64], n: usize, sum_bits: &[u8]) -> Result<Vec<u64>> {
    let bits = p.settings.drelu_bits;
    let shift = p.settings.drelu_shift();
    let k = bits as usize;
    let me = Modulus::even(bits);
    let mo = Modulus::odd(bits);
    let w = width(bits);
    let msb = p.settings.drelu == DreluProtocol::Msb;
    if p.role == Role::Dealer {
        return if msb {
            drelu_msb_dealer(p, n)
        } else {
            drelu_dealer(p, n)
        };
    }
    let j = p.j();
    // The windowed value (low bits dropped for an approximate DReLU), negated: MSB(-a) =
    // [a > 0], and for ShareConvert doubled as well (it must never see 2^k - 1).
    let windowed = a.iter().enumerate().map(|(e, &v)| {
        if bits < 64 {
            let extra = sum_bits.get(e).copied().unwrap_or(0) as u32;
            trunc_share(v, (shift + extra).min(63), j as usize)
        } else {
            v
        }
    });
    if msb {
        let neg: Vec<u64> = windowed.map(|v| me.reduce(v.wrapping_neg())).collect();
        return drelu_msb(p, &neg);
    }
    let b: Vec<u64> = windowed
        .map(|v| me.reduce(v.wrapping_mul(2).wrapping_neg()))
        .collect();
    let DreluRandomness { z, zo, zb, x, xb } = drelu_randomness(p, n)?;
    // ShareConvert: open c = b + z (mod 2^k); b = c - z + 2^k [z > c], so
    // b = c - z + [z > c] (mod 2^k - 1).
    let cs: Vec<u64> = b.iter().zip(&z).map(|(a, b)| me.add(*a, *b)).collect();
    let c = p.open_with(&cs, w, |a, b| me.add(a, b))?;
    let beta1 = p.prf(p.other()).bits(n);
    pc_send(p, &zb, &c, &beta1, k)?;
    let g = if j == 1 {
        p.prf(Role::Dealer).ring_mod(n, mo)
    } else {
        let g = p.recv_ring(Role::Dealer, n, w)?;
        if !g.iter().all(|&v| mo.contains(v)) {
            return Err(Error::Malformed {
                peer: "dealer".into(),
                msg: format!("ShareConvert result outside Z_(2^{bits}-1)"),
            });
        }
        g
    };
    p.round();
    p.round();
    // ComputeMSB: y = 2b (mod 2^k - 1) has LSB(y) = MSB(b); open r = y + x;
    // LSB(y) = lsb(r) XOR lsb(x) XOR [x > r].
    let rs: Vec<u64> = (0..n)
        .map(|e| {
            let gj = if beta1[e] == 0 { g[e] } else { mo.sub(j, g[e]) };
            let cj = if j == 1 { mo.reduce(c[e]) } else { 0 };
            let bj = mo.add(mo.sub(cj, zo[e]), gj);
            mo.add(mo.add(bj, bj), x[e])
        })
        .collect();
    let r = p.open_with(&rs, w, |a, b| mo.add(a, b))?;
    let beta2 = p.prf(p.other()).bits(n);
    pc_send(p, &xb, &r, &beta2, k)?;
    let h = if j == 1 {
        p.prf(Role::Dealer).ring(n)
    } else {
        p.recv_ring(Role::Dealer, n, 8)?
    };
    p.round();
    p.round();
    Ok((0..n)
        .map(|e| {
            let q = (beta2[e] as u64) ^ (r[e] & 1);
            if q == 0 {
                h[e]
            } else {
                j.wrapping_sub(h[e])
            }
        })
        .collect())
}

/// MSB of `v` (shares in Z_2^k, k = `drelu_bits`) as shares of a bit in Z_2^64, with one
/// PrivateCompare (docs/method.md 8.4; the MSB extraction of Falcon, Wagh et al., PETS 2021).
/// The dealer shares a random r in Z_2^k and the bits of its low k-1 bits; client and server
/// open c = v + r. Writing x' for x mod 2^(k-1), v' + r' = c' + 2^(k-1) [r' > c'], so
/// MSB(v) = MSB(c) XOR MSB(r) XOR [r' > c']. PrivateCompare gives the dealer
/// beta XOR [r' > c'], which it XORs with MSB(r) and shares; client and server XOR in the public
/// MSB(c) XOR beta. Bytes per element, w = ceil(k/8): dealer -> client w + (k-1) ahead and 8
/// online; client <-> server 2w; client, server -> dealer 2(k-1). In all 3w + 3(k-1) + 8: 221
/// bytes for k = 64, 59 for k = 16. Three sequential message trips.
fn drelu_msb(p: &mut Party, v: &[u64]) -> Result<Vec<u64>> {
    let n = v.len();
    let bits = p.settings.drelu_bits;
    let (k, me, w, j) = (bits as usize - 1, Modulus::even(bits), width(bits), p.j());
    let (r, rb) = if j == 1 {
        let sd = p.prf_off(Role::Dealer);
        (sd.ring_mod(n, me), sd.zp(n * k))
    } else {
        let m = p.recv_bytes(Role::Dealer, wire::Kind::Offline, n * w + n * k)?;
        let r = wire::unpack_u64(&m[..n * w], w).unwrap_or_default();
        let rb = m[n * w..].to_vec();
        if !r.iter().all(|&x| me.contains(x)) || rb.iter().any(|&b| b >= P) {
            return Err(bad_randomness());
        }
        (r, rb)
    };
    let cs: Vec<u64> = v.iter().zip(&r).map(|(a, b)| me.add(*a, *b)).collect();
    let c = p.open_with(&cs, w, |a, b| me.add(a, b))?;
    let beta = p.prf(p.other()).bits(n);
    let low = Modulus::even(bits - 1);
    let c_low: Vec<u64> = c.iter().map(|&x| low.reduce(x)).collect();
    pc_send(p, &rb, &c_low, &beta, k)?;
    let u = if j == 1 {
        p.prf(Role::Dealer).ring(n)
    } else {
        p.recv_ring(Role::Dealer, n, 8)?
    };
    p.round();
    p.round();
    Ok((0..n)
        .map(|e| {
            if ((c[e] >> k) & 1) as u8 ^ beta[e] == 0 {
                u[e]
            } else {
                j.wrapping_sub(u[e])
            }
        })
        .collect())
}

/// The dealer's part of [`drelu_msb`].
fn drelu_msb_dealer(p: &mut Party, n: usize) -> Result<Vec<u64>> {
    let bits = p.settings.drelu_bits;
    let (k, me, w) = (bits as usize - 1, Modulus::even(bits), width(bits));
    if p.does_offline() {
        p.dealer()?.batch_ahead()?;
        let r = p.own.ring_mod(n, me);
        let sd = p.prf_off(Role::Server);
        let r1 = sd.ring_mod(n, me);
        let rb1 = sd.zp(n * k);
        let r0: Vec<u64> = r.iter().zip(&r1).map(|(a, b)| me.sub(*a, *b)).collect();
        let mut msg = wire::pack_u64(&r0, w);
        msg.extend(bit_shares(&r, k, &rb1));
        p.send_bytes(Role::Client, wire::Kind::Offline, &msg)?;
        p.dealer()?.carry.push(r)?;
    }
    if !p.does_online() {
        return Ok(Vec::new());
    }
    let r = p.dealer()?.carry.pop()?;
    let t = pc_dealer(p, n, k)?;
    p.dealer()?.batch_done();
    let u1 = p.prf(Role::Server).ring(n);
    let u0: Vec<u64> = (0..n)
        .map(|e| ((t[e] as u64) ^ ((r[e] >> k) & 1)).wrapping_sub(u1[e]))
        .collect();
    p.send_ring(Role::Client, &u0, 8)?;
    p.round();
    p.round();
    Ok(Vec::new())
}
