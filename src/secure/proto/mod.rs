//! The protocols (docs/method.md 8.4), written once for all three roles: each function is called by
//! the client and the server with their shares and by the dealer with empty inputs and the
//! public sizes; the role decides what each does.
//!
//! Design notes:
//! - Randomness one party would otherwise receive comes from the pairwise PRF; the dealer
//!   always draws the server's share from the server-dealer PRF and *sends* the client's
//!   share, so dealer -> client is the only dealer traffic besides the comparisons. The
//!   dealer's input-independent part of every protocol (`Phase::Offline`) runs on its own
//!   thread ahead of its online part (`Phase::Online`), on separate PRF streams (`prf_off`).
//! - Weight masks B are drawn once per session and F = W - B is opened once per session (see
//!   [`setup_linear`]); a linear layer then costs one exchange of E = X - A.
//! - DReLU returns shares of [a > 0] (the tie rule of docs/method.md 2: a patch summing to exactly 0
//!   gets 0); see [`drelu`].
mod drelu;

pub use drelu::{drelu, drelu_in_window};

use super::gemm::{self, ConvGeom};
use super::party::{Party, Role};
use super::ring::{self, trunc_share};
use crate::error::{Error, Result};

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
