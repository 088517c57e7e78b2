//! The plaintext fixed-point forward pass secure results are checked against.
use super::{reciprocal, Layer, Plan, Weights, AVG_SHIFT};
use crate::models::Slot;
use crate::secure::gemm;
use crate::secure::ring;

/// The plaintext fixed-point forward pass of one image: what secure inference computes, up to
/// the +-1 ulp of each local truncation. Returns the logits in the ring.
pub fn forward_fixed(plan: &Plan, weights: &Weights, input: &[u64]) -> Vec<u64> {
    let f = plan.settings.fixed.frac;
    let mut vals: Vec<Option<Vec<u64>>> = vec![None; plan.slots];
    vals[0] = Some(input.to_vec());
    for (i, l) in plan.layers.iter().enumerate() {
        let get = |s: Slot| vals[s].as_ref().expect("slot written before read");
        let y = match l {
            Layer::Conv { x, geom, .. } => {
                let (w, b) = weights.layers[i].as_ref().expect("conv has weights");
                let mut y = gemm::conv(get(*x), w, geom);
                let npix = geom.out_len() / geom.cout;
                for (j, v) in y.iter_mut().enumerate() {
                    *v = ring::trunc_plain(*v, f).wrapping_add(b[j / npix]);
                }
                y
            }
            Layer::Linear { x, cin, cout, .. } => {
                let (w, b) = weights.layers[i].as_ref().expect("linear has weights");
                let mut y = gemm::linear(get(*x), w, *cin, *cout);
                for (j, v) in y.iter_mut().enumerate() {
                    *v = ring::trunc_plain(*v, f).wrapping_add(b[j]);
                }
                y
            }
            Layer::Act { x, act, .. } => {
                let xv = get(*x);
                let sums = act.patch_sums(xv);
                let mut y = vec![0u64; act.len];
                for &i in &act.identity {
                    y[i as usize] = xv[i as usize];
                }
                for (&i, &p) in act.active.iter().zip(&act.patch_of) {
                    if (sums[p as usize] as i64) > 0 {
                        y[i as usize] = xv[i as usize];
                    }
                }
                y
            }
            Layer::Add { a, b, .. } => ring::add(get(*a), get(*b)),
            Layer::MaxPool { x, win, .. } => {
                let xv = get(*x);
                win.idx
                    .iter()
                    .map(|v| v.iter().map(|&i| xv[i as usize] as i64).max().unwrap_or(0) as u64)
                    .collect()
            }
            Layer::AvgPool { x, win, .. } => win
                .sums(get(*x))
                .iter()
                .zip(win.reciprocals())
                .map(|(s, r)| ring::trunc_plain(s.wrapping_mul(r), AVG_SHIFT))
                .collect(),
            Layer::GlobalAvgPool { x, c, hw, .. } => {
                let xv = get(*x);
                let r = reciprocal(*hw);
                (0..*c)
                    .map(|ch| {
                        let s = xv[ch * hw..(ch + 1) * hw]
                            .iter()
                            .fold(0u64, |a, v| a.wrapping_add(*v));
                        ring::trunc_plain(s.wrapping_mul(r), AVG_SHIFT)
                    })
                    .collect()
            }
            Layer::Concat { xs, .. } => xs.iter().flat_map(|&s| get(s).iter().copied()).collect(),
            Layer::Resize { x, interp, .. } => interp.apply(get(*x), None),
        };
        vals[l.output()] = Some(y);
    }
    vals[plan.output].take().unwrap_or_default()
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}
