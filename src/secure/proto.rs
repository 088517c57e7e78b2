//! The protocols (docs/method.md 8.4), written once for all three roles: each function is called by
//! the client and the server with their shares and by the dealer with empty inputs and the
//! public sizes; the role decides what each does.
//!
//! Design notes:
//! - Randomness one party would otherwise receive comes from the pairwise PRF; the dealer
//!   always draws the server's share from the server-dealer PRF and *sends* the client's
//!   share, so dealer -> client is the only dealer traffic besides the comparisons. The
//!   dealer's input-independent part of every protocol (`Phase::Offline`) runs for the whole
//!   image before its online part (`Phase::Online`), on separate PRF streams (`prf_off`).
//! - Weight masks B are drawn once per session and F = W - B is opened once per session (see
//!   [`setup_linear`]); a linear layer then costs one exchange of E = X - A.
//! - DReLU returns shares of [a > 0] (the tie rule of docs/method.md 2: a patch summing to exactly 0
//!   gets 0). It computes MSB(-2a) so the value handed to ShareConvert is even and can never be
//!   2^k - 1; this is exact for |a| < 2^(k-2).
use super::gemm::{self, ConvGeom};
use super::party::{Party, Role};
use super::plan::DreluProtocol;
use super::ring::{self, trunc_share, zp_add, zp_sub, Modulus, P};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// A bilinear layer: convolution or fully connected.
#[derive(Clone, Copy, Debug)]
pub enum LinOp {
    Conv(ConvGeom),
    Fc { cin: usize, cout: usize },
}

impl LinOp {
    pub fn in_len(&self) -> usize {
        match self {
            LinOp::Conv(g) => g.in_len(),
            LinOp::Fc { cin, .. } => *cin,
        }
    }

    pub fn out_len(&self) -> usize {
        match self {
            LinOp::Conv(g) => g.out_len(),
            LinOp::Fc { cout, .. } => *cout,
        }
    }

    pub fn weight_len(&self) -> usize {
        match self {
            LinOp::Conv(g) => g.weight_len(),
            LinOp::Fc { cin, cout } => cin * cout,
        }
    }

    /// Output elements per bias entry (per output channel).
    pub fn per_channel(&self) -> usize {
        match self {
            LinOp::Conv(g) => g.out_len() / g.cout,
            LinOp::Fc { .. } => 1,
        }
    }

    pub fn apply(&self, x: &[u64], w: &[u64]) -> Vec<u64> {
        match self {
            LinOp::Conv(g) => gemm::conv(x, w, g),
            LinOp::Fc { cin, cout } => gemm::linear(x, w, *cin, *cout),
        }
    }
}

/// Session state of one linear layer.
#[derive(Default)]
pub struct LinearMask {
    /// Server and dealer: the weight mask B (drawn from their PRF once per session).
    pub b: Vec<u64>,
    /// Client and server: the opened F = W - B.
    pub f: Vec<u64>,
}

/// The client's and server's shares of the input image (no messages): the server's share is
/// drawn from the client-server PRF, the client's is enc(image) minus that.
pub fn share_input(p: &mut Party, image: Option<&[u64]>, n: usize) -> Result<Vec<u64>> {
    match p.role {
        Role::Client => {
            let img =
                image.ok_or_else(|| Error::InvalidArgument("client needs an image".into()))?;
            let r = p.prf(Role::Server).ring(n);
            Ok(ring::sub(img, &r))
        }
        Role::Server => Ok(p.prf(Role::Client).ring(n)),
        Role::Dealer => Ok(Vec::new()),
    }
}

/// Once per session and linear layer: server and dealer draw the weight mask B from their PRF;
/// the server opens F = W - B to the client. `weight` is the server's W. Opening F once per
/// session instead of once per image is safe because W and B are the same for every image:
/// the client sees the same F each time, and every image gets a fresh input mask A.
pub fn setup_linear(p: &mut Party, op: &LinOp, weight: Option<&[u64]>) -> Result<LinearMask> {
    let n = op.weight_len();
    match p.role {
        Role::Client => Ok(LinearMask {
            b: Vec::new(),
            f: p.recv_ring(Role::Server, n, 8)?,
        }),
        Role::Server => {
            let b = p.prf(Role::Dealer).ring(n);
            let w = weight.ok_or_else(|| Error::InvalidArgument("server needs weights".into()))?;
            let f = ring::sub(w, &b);
            p.send_ring(Role::Client, &f, 8)?;
            Ok(LinearMask { b, f })
        }
        Role::Dealer => Ok(LinearMask {
            b: p.prf(Role::Server).ring(n),
            f: Vec::new(),
        }),
    }
}

/// A convolution / fully connected layer on shares with a Beaver triple for the bilinear map
/// (A fresh per image, B per session): client Y0 = op(X0, F) + Z0, server
/// Y1 = op(E, B) + op(X1, F) + Z1 with E = X - A opened, then local truncation; the server adds
/// the bias. Bytes: 8|X| each way between client and server, 8|Y| dealer -> client.
pub fn linear(
    p: &mut Party,
    op: &LinOp,
    mask: &LinearMask,
    x: &[u64],
    bias: Option<&[u64]>,
) -> Result<Vec<u64>> {
    let (nx, ny) = (op.in_len(), op.out_len());
    let f = p.settings.fixed.frac;
    match p.role {
        Role::Dealer => {
            if !p.does_offline() {
                return Ok(Vec::new());
            }
            let mut a = p.prf_off(Role::Client).ring(nx);
            let a1 = p.prf_off(Role::Server).ring(nx);
            ring::add_assign(&mut a, &a1);
            let z1 = p.prf_off(Role::Server).ring(ny);
            let mut z = op.apply(&a, &mask.b);
            ring::sub_assign(&mut z, &z1);
            p.send_offline(Role::Client, &z)?;
            Ok(Vec::new())
        }
        Role::Client => {
            let a0 = p.prf_off(Role::Dealer).ring(nx);
            let e0 = ring::sub(x, &a0);
            p.open_with(&e0, 8, u64::wrapping_add)?;
            let z0 = p.recv_offline(Role::Dealer, ny)?;
            let mut y = op.apply(x, &mask.f);
            ring::add_assign(&mut y, &z0);
            ring::trunc_share_all(&mut y, f, 0);
            Ok(y)
        }
        Role::Server => {
            let a1 = p.prf_off(Role::Dealer).ring(nx);
            let z1 = p.prf_off(Role::Dealer).ring(ny);
            let e1 = ring::sub(x, &a1);
            let e = p.open_with(&e1, 8, u64::wrapping_add)?;
            let mut y = op.apply(&e, &mask.b);
            ring::add_assign(&mut y, &op.apply(x, &mask.f));
            ring::add_assign(&mut y, &z1);
            ring::trunc_share_all(&mut y, f, 1);
            if let Some(bias) = bias {
                let per = op.per_channel();
                for (i, v) in y.iter_mut().enumerate() {
                    *v = v.wrapping_add(bias[i / per]);
                }
            }
            Ok(y)
        }
    }
}

/// Element-wise Beaver multiply z = x * y[map], x of `n` elements, y of `m` (`map[i]` is the
/// element of y that multiplies x[i]; `None`: identity, m = n). No truncation: used with y a
/// 0/1 value. Bytes: 8(n + m) each way between client and server, 8n from the dealer.
pub fn mul_expand(
    p: &mut Party,
    n: usize,
    m: usize,
    x: &[u64],
    y: &[u64],
    map: Option<&[u32]>,
) -> Result<Vec<u64>> {
    let at = |i: usize| map.map(|m| m[i] as usize).unwrap_or(i);
    match p.role {
        Role::Dealer => {
            if !p.does_offline() {
                return Ok(Vec::new());
            }
            let a0 = p.prf_off(Role::Client).ring(n);
            let b0 = p.prf_off(Role::Client).ring(m);
            let a1 = p.prf_off(Role::Server).ring(n);
            let b1 = p.prf_off(Role::Server).ring(m);
            let c1 = p.prf_off(Role::Server).ring(n);
            let c0: Vec<u64> = (0..n)
                .map(|i| {
                    let a = a0[i].wrapping_add(a1[i]);
                    let b = b0[at(i)].wrapping_add(b1[at(i)]);
                    a.wrapping_mul(b).wrapping_sub(c1[i])
                })
                .collect();
            p.send_offline(Role::Client, &c0)?;
            Ok(Vec::new())
        }
        _ => {
            let j = p.j();
            let (a, b, c) = if j == 0 {
                let a = p.prf_off(Role::Dealer).ring(n);
                let b = p.prf_off(Role::Dealer).ring(m);
                (a, b, None)
            } else {
                let a = p.prf_off(Role::Dealer).ring(n);
                let b = p.prf_off(Role::Dealer).ring(m);
                let c = p.prf_off(Role::Dealer).ring(n);
                (a, b, Some(c))
            };
            let mut ef = ring::sub(x, &a);
            ef.extend(ring::sub(y, &b));
            let opened = p.open_with(&ef, 8, u64::wrapping_add)?;
            let c = match c {
                Some(c) => c,
                None => p.recv_offline(Role::Dealer, n)?,
            };
            let (e, f) = opened.split_at(n);
            Ok((0..n)
                .map(|i| {
                    let fi = f[at(i)];
                    let mut z = e[i]
                        .wrapping_mul(b[at(i)])
                        .wrapping_add(fi.wrapping_mul(a[i]))
                        .wrapping_add(c[i]);
                    if j == 1 {
                        z = z.wrapping_add(e[i].wrapping_mul(fi));
                    }
                    z
                })
                .collect())
        }
    }
}

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
    p.send_bytes(Role::Dealer, super::wire::Kind::Data, &out)
}

/// The dealer's half of PrivateCompare: beta XOR [x > r] per element.
fn pc_dealer(p: &mut Party, n: usize, k: usize) -> Result<Vec<u8>> {
    let d0 = p.recv_bytes(Role::Client, super::wire::Kind::Data, n * k)?;
    let d1 = p.recv_bytes(Role::Server, super::wire::Kind::Data, n * k)?;
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
        p.batch_ahead()?;
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
        let mut msg = super::wire::pack_u64(&z0, w);
        msg.extend(super::wire::pack_u64(&zo0, w));
        msg.extend(bit_shares(&z, k, &zb1));
        msg.extend(super::wire::pack_u64(&x0, w));
        msg.extend(bit_shares(&x, k, &xb1));
        p.send_bytes(Role::Client, super::wire::Kind::Offline, &msg)?;
        p.carry.push(x)?;
    }
    if !p.does_online() {
        return Ok(Vec::new());
    }
    let x = p.carry.pop()?;
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
    p.batch_done();
    let h1 = p.prf(Role::Server).ring(n);
    let h0: Vec<u64> = (0..n)
        .map(|e| ((bp[e] as u64) ^ (x[e] & 1)).wrapping_sub(h1[e]))
        .collect();
    p.send_ring(Role::Client, &h0, 8)?;
    p.round();
    p.round();
    Ok(Vec::new())
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
        let m = p.recv_bytes(Role::Dealer, super::wire::Kind::Offline, len)?;
        let ring = |s: &[u8]| super::wire::unpack_u64(s, w).unwrap_or_default();
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
        // Out-of-range values would break the field arithmetic (a share of 68 or more
        // underflows in PrivateCompare): refuse them by name.
        let bad = !z.iter().all(|&v| me.contains(v))
            || !zo.iter().chain(&x).all(|&v| mo.contains(v))
            || zb.iter().chain(&xb).any(|&v| v >= P);
        if bad {
            return Err(Error::Malformed {
                peer: "dealer".into(),
                msg: "DReLU randomness outside its ring or Z_67".into(),
            });
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
        let m = p.recv_bytes(Role::Dealer, super::wire::Kind::Offline, n * w + n * k)?;
        let r = super::wire::unpack_u64(&m[..n * w], w).unwrap_or_default();
        let rb = m[n * w..].to_vec();
        if !r.iter().all(|&x| me.contains(x)) || rb.iter().any(|&b| b >= P) {
            return Err(Error::Malformed {
                peer: "dealer".into(),
                msg: "DReLU randomness outside its ring or Z_67".into(),
            });
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
        p.batch_ahead()?;
        let r = p.own.ring_mod(n, me);
        let sd = p.prf_off(Role::Server);
        let r1 = sd.ring_mod(n, me);
        let rb1 = sd.zp(n * k);
        let r0: Vec<u64> = r.iter().zip(&r1).map(|(a, b)| me.sub(*a, *b)).collect();
        let mut msg = super::wire::pack_u64(&r0, w);
        msg.extend(bit_shares(&r, k, &rb1));
        p.send_bytes(Role::Client, super::wire::Kind::Offline, &msg)?;
        p.carry.push(r)?;
    }
    if !p.does_online() {
        return Ok(Vec::new());
    }
    let r = p.carry.pop()?;
    let t = pc_dealer(p, n, k)?;
    p.batch_done();
    let u1 = p.prf(Role::Server).ring(n);
    let u0: Vec<u64> = (0..n)
        .map(|e| ((t[e] as u64) ^ ((r[e] >> k) & 1)).wrapping_sub(u1[e]))
        .collect();
    p.send_ring(Role::Client, &u0, 8)?;
    p.round();
    p.round();
    Ok(Vec::new())
}

/// Block ReLU on shares: one DReLU per patch on the local patch sums, then a multiply with the
/// patch-level mask expanded to pixels; identity channels pass through, zero channels are 0.
pub fn block_relu(p: &mut Party, act: &super::plan::ActPlan, x: &[u64]) -> Result<Vec<u64>> {
    let sums = if p.role == Role::Dealer {
        Vec::new()
    } else {
        act.patch_sums(x)
    };
    let d = drelu_in_window(p, &sums, act.patches, &act.sum_bits)?;
    let xa: Vec<u64> = if p.role == Role::Dealer {
        Vec::new()
    } else {
        act.active.iter().map(|&i| x[i as usize]).collect()
    };
    let z = mul_expand(
        p,
        act.active.len(),
        act.patches,
        &xa,
        &d,
        Some(&act.patch_of),
    )?;
    if p.role == Role::Dealer {
        return Ok(Vec::new());
    }
    let mut y = vec![0u64; act.len];
    for &i in &act.identity {
        y[i as usize] = x[i as usize];
    }
    for (&i, v) in act.active.iter().zip(z) {
        y[i as usize] = v;
    }
    Ok(y)
}

/// Max pool on shares: a tournament inside every window, all windows' comparisons of one
/// level in one DReLU batch (max(a, b) = a + [b - a > 0] (b - a)). A 3x3 window costs 8
/// DReLUs and multiplies in 4 levels of 7 message trips.
pub fn max_pool(p: &mut Party, win: &super::plan::Windows, x: &[u64]) -> Result<Vec<u64>> {
    let dealer = p.role == Role::Dealer;
    let mut lens: Vec<usize> = win.idx.iter().map(|v| v.len()).collect();
    let mut cur: Vec<Vec<u64>> = if dealer {
        Vec::new()
    } else {
        win.idx
            .iter()
            .map(|v| v.iter().map(|&i| x[i as usize]).collect())
            .collect()
    };
    while lens.iter().any(|&l| l > 1) {
        let pairs: usize = lens.iter().map(|l| l / 2).sum();
        let diff: Vec<u64> = if dealer {
            Vec::new()
        } else {
            cur.iter()
                .flat_map(|c| c.chunks_exact(2).map(|ab| ab[1].wrapping_sub(ab[0])))
                .collect()
        };
        let d = drelu(p, &diff, pairs)?;
        let prod = mul_expand(p, pairs, pairs, &diff, &d, None)?;
        if !dealer {
            let mut k = 0;
            for c in cur.iter_mut() {
                let mut next = Vec::with_capacity(c.len().div_ceil(2));
                for ab in c.chunks(2) {
                    if ab.len() == 2 {
                        next.push(ab[0].wrapping_add(prod[k]));
                        k += 1;
                    } else {
                        next.push(ab[0]);
                    }
                }
                *c = next;
            }
        }
        lens.iter_mut().for_each(|l| *l = l.div_ceil(2));
    }
    Ok(cur
        .into_iter()
        .map(|c| c.first().copied().unwrap_or(0))
        .collect())
}

/// Average pool on shares (local): window sum times round(2^s / count), truncated by s.
pub fn avg_pool(p: &Party, win: &super::plan::Windows, x: &[u64]) -> Vec<u64> {
    if p.role == Role::Dealer {
        return Vec::new();
    }
    let j = p.j() as usize;
    win.sums(x)
        .iter()
        .zip(win.reciprocals())
        .map(|(s, r)| trunc_share(s.wrapping_mul(r), super::plan::AVG_SHIFT, j))
        .collect()
}

/// Global average pool on shares (local).
pub fn global_avg_pool(p: &Party, c: usize, hw: usize, x: &[u64]) -> Vec<u64> {
    if p.role == Role::Dealer {
        return Vec::new();
    }
    let j = p.j() as usize;
    let r = super::plan::reciprocal(hw);
    (0..c)
        .map(|ch| {
            let s = x[ch * hw..(ch + 1) * hw]
                .iter()
                .fold(0u64, |a, v| a.wrapping_add(*v));
            trunc_share(s.wrapping_mul(r), super::plan::AVG_SHIFT, j)
        })
        .collect()
}

/// Secure arg-max of `n` shared values: a tournament of DReLUs; returns shares of the index
/// (ties go to the lower index).
pub fn argmax(p: &mut Party, v: &[u64], n: usize) -> Result<Vec<u64>> {
    argmax_columns(p, v, n, 1)
}

/// Secure arg-max down each of the `m` columns of an `n` x `m` shared matrix (row-major, so
/// row k = class k of a class-major [K, H, W] logit map and column j = pixel j): one
/// tournament for all columns at once, the same number of rounds as for one. Returns shares
/// of the `m` indices (ties go to the lower index).
pub fn argmax_columns(p: &mut Party, v: &[u64], n: usize, m: usize) -> Result<Vec<u64>> {
    let dealer = p.role == Role::Dealer;
    let j = p.j();
    let mut vals = v.to_vec();
    let mut idx: Vec<u64> = if dealer {
        Vec::new()
    } else {
        (0..n as u64)
            .flat_map(|i| std::iter::repeat_n(i * j, m))
            .collect()
    };
    let mut len = n;
    while len > 1 {
        let cnt = (len / 2) * m;
        let (dv, di): (Vec<u64>, Vec<u64>) = if dealer {
            (Vec::new(), Vec::new())
        } else {
            (0..cnt)
                .map(|e| {
                    let (a, b) = (2 * (e / m) * m + e % m, (2 * (e / m) + 1) * m + e % m);
                    (vals[b].wrapping_sub(vals[a]), idx[b].wrapping_sub(idx[a]))
                })
                .unzip()
        };
        let d = drelu(p, &dv, cnt)?;
        let map: Vec<u32> = (0..2 * cnt).map(|i| (i % cnt) as u32).collect();
        let mut both = dv.clone();
        both.extend(di);
        let prod = mul_expand(p, 2 * cnt, cnt, &both, &d, Some(&map))?;
        let next = len.div_ceil(2);
        if !dealer {
            let mut nv = Vec::with_capacity(next * m);
            let mut ni = Vec::with_capacity(next * m);
            for e in 0..cnt {
                let a = 2 * (e / m) * m + e % m;
                nv.push(vals[a].wrapping_add(prod[e]));
                ni.push(idx[a].wrapping_add(prod[cnt + e]));
            }
            if len % 2 == 1 {
                nv.extend_from_slice(&vals[(len - 1) * m..len * m]);
                ni.extend_from_slice(&idx[(len - 1) * m..len * m]);
            }
            vals = nv;
            idx = ni;
        }
        len = next;
    }
    Ok(idx)
}
