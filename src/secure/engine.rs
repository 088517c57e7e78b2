//! Walks a [`Plan`] layer by layer for one party: session setup (weight masks), then per image
//! input sharing, every layer's protocol, and the output reveal; counts time, bytes, rounds
//! and DReLUs per layer. [`run_local`] runs all three parties in one process on loopback TCP.
use super::join::{local_streams, Join, LocalNet};
use super::link::LinkConfig;
use super::noise::ephemeral_session;
use super::party::{LayerStats, Party, Role, TAG_SESSION};
use super::plan::{Layer, Plan, Weights};
use super::proto::{self, LinOp, LinearMask};
use super::ring;
use super::wire::Kind;
use crate::error::{Error, Result};
use serde::Serialize;
use std::time::Instant;

/// The linear map of a layer, if it has one.
pub fn lin_op(l: &Layer) -> Option<LinOp> {
    match l {
        Layer::Conv { geom, .. } => Some(LinOp::Conv(*geom)),
        Layer::Linear { cin, cout, .. } => Some(LinOp::Fc {
            cin: *cin,
            cout: *cout,
        }),
        _ => None,
    }
}

/// What one party saw of one image.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImageRun {
    /// Client only: the revealed logits (absent in arg-max-only mode).
    pub logits: Option<Vec<f64>>,
    /// Client only: the revealed arg-max (arg-max-only mode, classifiers).
    pub argmax: Option<usize>,
    /// Client only: the revealed class of every pixel (arg-max-only mode, segmentation maps).
    pub pixel_classes: Option<Vec<usize>>,
    pub seconds: f64,
    /// Bytes this party sent to each role during the image (index = role).
    pub bytes_sent: [u64; 3],
}

/// The result of one party's session.
#[derive(Clone, Debug, Serialize)]
pub struct PartyRun {
    pub role: Role,
    pub images: Vec<ImageRun>,
    /// Per layer, summed over images.
    pub layers: Vec<LayerStats>,
    /// Output reveal, summed over images.
    pub output: LayerStats,
    /// Bytes sent to each role by the once-per-session setup (weight masks).
    pub setup_bytes: [u64; 3],
    pub setup_seconds: f64,
    /// The most bytes of the dealer's material kept before use (the client's buffer).
    pub peak_ahead: u64,
}

/// What the client feeds in: encoded images, and whether to reveal only the arg-max.
pub struct ClientInput {
    pub images: Vec<Vec<u64>>,
}

/// The control message before each image: the client sends whether another image follows
/// (`more`: `None` for the other roles) and the output policy; the server and the dealer
/// receive it and check the policy against the one agreed in the session hash (a client
/// asking otherwise is not following the protocol). Returns whether an image follows.
fn control(p: &mut Party, more: Option<bool>, argmax_only: bool) -> Result<bool> {
    p.tag = TAG_SESSION;
    let what = |a: bool| if a { "the arg-max only" } else { "the logits" };
    match (p.role, more) {
        (Role::Client, Some(more)) => {
            let msg = [more as u8, argmax_only as u8];
            p.send_bytes(Role::Server, Kind::Control, &msg)?;
            p.send_bytes(Role::Dealer, Kind::Control, &msg)?;
            Ok(more)
        }
        (Role::Client, None) => Err(Error::InvalidArgument(
            "the client needs input images".into(),
        )),
        _ => {
            let m = p.recv_bytes(Role::Client, Kind::Control, 2)?;
            let bad = |msg: String| Error::Malformed {
                peer: "client".into(),
                msg,
            };
            if m[0] > 1 || m[1] > 1 {
                return Err(bad(format!("bad control message {m:?}")));
            }
            if (m[1] == 1) != argmax_only {
                return Err(bad(format!(
                    "asked for {} although the session's policy (the server's --argmax-only) \
                     is {}",
                    what(m[1] == 1),
                    what(argmax_only)
                )));
            }
            Ok(m[0] == 1)
        }
    }
}

/// Runs one party's whole session over its connected `party`.
pub fn run_party(
    mut p: Party,
    plan: &Plan,
    weights: Option<&Weights>,
    input: Option<&ClientInput>,
) -> Result<PartyRun> {
    let nl = plan.layers.len();
    // ---- session setup: weight masks, F opened once ----
    let t0 = Instant::now();
    let mut masks: Vec<Option<LinearMask>> = Vec::with_capacity(nl);
    for (i, l) in plan.layers.iter().enumerate() {
        p.tag = i as u32;
        masks.push(match lin_op(l) {
            Some(op) => {
                let w = weights.and_then(|w| w.layers[i].as_ref().map(|(w, _)| w.as_slice()));
                Some(proto::setup_linear(&mut p, &op, w)?)
            }
            None => None,
        });
    }
    let setup_bytes = p.bytes_sent();
    let setup_seconds = t0.elapsed().as_secs_f64();
    for s in p.stats.iter_mut() {
        *s = LayerStats::default();
    }
    let last_use = plan.last_use();
    let n_in: usize = plan.input.iter().product();
    let mut images = Vec::new();
    let mut next = 0usize;
    // The client knows how many images follow: a bar on a terminal, lines with an ETA in a log.
    let bar = crate::progress::bar(
        input.is_some(),
        input.map_or(0, |i| i.images.len() as u64),
        "secure inference",
        "images",
    );
    loop {
        // ---- control: the client says whether another image follows ----
        let argmax_only = plan.settings.argmax_only;
        let more = control(&mut p, input.map(|i| next < i.images.len()), argmax_only)?;
        if !more {
            break;
        }
        if let Some(b) = &p.budget {
            b.admit()?;
        }
        let start = Instant::now();
        let bytes0 = p.bytes_sent();
        let image = input.map(|i| i.images[next].as_slice());
        if let Some(img) = image {
            if img.len() != n_in {
                return Err(Error::InvalidArgument(format!(
                    "image {next} has {} values, the model takes {n_in}",
                    img.len()
                )));
            }
        }
        let mut run = if p.role == Role::Dealer {
            dealer_image(&mut p, plan, weights, &masks, &last_use, argmax_only)?
        } else {
            run_image(&mut p, plan, weights, &masks, &last_use, image, argmax_only)?
        };
        let bytes1 = p.bytes_sent();
        run.seconds = start.elapsed().as_secs_f64();
        for r in 0..3 {
            run.bytes_sent[r] = bytes1[r] - bytes0[r];
        }
        images.push(run);
        next += 1;
        bar.inc(1);
    }
    let layers = p.stats[..nl].to_vec();
    let output = p.stats[nl].clone();
    bar.finish_and_clear();
    let role = p.role;
    let peak_ahead = p.peak_ahead();
    p.finish()?;
    Ok(PartyRun {
        role,
        images,
        layers,
        output,
        setup_bytes,
        setup_seconds,
        peak_ahead,
    })
}

/// The dealer's part of one image: the correlated randomness on its own thread, a bounded
/// number of DReLU batches ahead (`secure::ahead`), while this thread serves the comparisons
/// as the client and server reach them.
fn dealer_image(
    p: &mut Party,
    plan: &Plan,
    weights: Option<&Weights>,
    masks: &[Option<LinearMask>],
    last_use: &[usize],
    argmax_only: bool,
) -> Result<ImageRun> {
    let mut off = p.split_offline()?;
    let (offline, online) = std::thread::scope(|s| {
        let h = s.spawn(|| run_image(&mut off, plan, weights, masks, last_use, None, argmax_only));
        let r = run_image(p, plan, weights, masks, last_use, None, argmax_only);
        if let Some(d) = &p.dealer {
            d.stop();
        }
        (h.join(), r)
    });
    p.rejoin(off);
    let online = online?;
    offline.map_err(|_| Error::Link {
        peer: "dealer".into(),
        msg: "the offline thread panicked".into(),
    })??;
    Ok(online)
}

/// One image through every layer and the output reveal (for the dealer: the part of `phase`).
fn run_image(
    p: &mut Party,
    plan: &Plan,
    weights: Option<&Weights>,
    masks: &[Option<LinearMask>],
    last_use: &[usize],
    image: Option<&[u64]>,
    argmax_only: bool,
) -> Result<ImageRun> {
    let nl = plan.layers.len();
    let n_in: usize = plan.input.iter().product();
    let mut vals: Vec<Option<Vec<u64>>> = vec![None; plan.slots];
    p.tag = 0;
    vals[0] = Some(proto::share_input(p, image, n_in)?);
    for (i, l) in plan.layers.iter().enumerate() {
        p.tag = i as u32;
        let t = Instant::now();
        let get = |s: usize| vals[s].as_deref().unwrap_or(&[]);
        let y = match l {
            Layer::Conv { x, .. } | Layer::Linear { x, .. } => {
                let op = lin_op(l).expect("linear layer");
                let bias = weights.and_then(|w| w.layers[i].as_ref().map(|(_, b)| b.clone()));
                let mask = masks[i].as_ref().expect("mask set up");
                let xv = get(*x).to_vec();
                proto::linear(p, &op, mask, &xv, bias.as_deref())?
            }
            Layer::Act { x, act, .. } => {
                let xv = get(*x).to_vec();
                proto::block_relu(p, act, &xv)?
            }
            Layer::Add { a, b, .. } => {
                if p.role == Role::Dealer {
                    Vec::new()
                } else {
                    ring::add(get(*a), get(*b))
                }
            }
            Layer::MaxPool { x, win, .. } => {
                let xv = get(*x).to_vec();
                proto::max_pool(p, win, &xv)?
            }
            Layer::AvgPool { x, win, .. } => proto::avg_pool(p, win, get(*x)),
            Layer::GlobalAvgPool { x, c, hw, .. } => proto::global_avg_pool(p, *c, *hw, get(*x)),
            Layer::Concat { xs, .. } => xs.iter().flat_map(|&s| get(s).iter().copied()).collect(),
            Layer::Resize { x, interp, .. } => {
                if p.role == Role::Dealer {
                    Vec::new()
                } else {
                    interp.apply(get(*x), Some(p.j() as usize))
                }
            }
        };
        vals[l.output()] = Some(y);
        for s in l.inputs() {
            if last_use[s] == i {
                vals[s] = None;
            }
        }
        p.add_time(t.elapsed());
    }
    // ---- output ----
    p.tag = nl as u32;
    let t = Instant::now();
    let out = vals[plan.output].take().unwrap_or_default();
    let mut run = ImageRun::default();
    let frac = plan.settings.fixed;
    if argmax_only {
        // One column for a classifier, one per pixel for a segmentation map.
        let cols = plan.outputs / plan.classes.max(1);
        let idx = proto::argmax_columns(p, &out, plan.classes, cols)?;
        match p.role {
            Role::Server => p.send_ring(Role::Client, &idx, 8)?,
            Role::Client => {
                let theirs = p.recv_ring(Role::Server, cols, 8)?;
                p.round();
                let v: Vec<usize> = ring::add(&idx, &theirs)
                    .into_iter()
                    .map(|c| c as usize)
                    .collect();
                if let Some(bad) = v.iter().find(|&&c| c >= plan.classes) {
                    return Err(Error::Malformed {
                        peer: "server".into(),
                        msg: format!("revealed class {bad} out of range"),
                    });
                }
                if plan.outputs == plan.classes {
                    run.argmax = Some(v[0]);
                } else {
                    run.pixel_classes = Some(v);
                }
            }
            Role::Dealer => {}
        }
    } else {
        match p.role {
            Role::Server => p.send_ring(Role::Client, &out, 8)?,
            Role::Client => {
                let theirs = p.recv_ring(Role::Server, plan.outputs, 8)?;
                p.round();
                run.logits = Some(frac.decode_all(&ring::add(&out, &theirs)));
            }
            Role::Dealer => {}
        }
    }
    p.add_time(t.elapsed());
    Ok(run)
}

/// Runs the three parties as threads of this process over loopback TCP and returns their
/// results (client, server, dealer). On failure, returns the error that started it (a party's
/// own error rather than the "connection closed" its peers see).
pub fn run_local(
    plan: &Plan,
    weights: &Weights,
    input: &ClientInput,
    cfg: LinkConfig,
) -> Result<[PartyRun; 3]> {
    let hash = plan.hash();
    let [sc, ss, sd] = local_streams(LocalNet::Tcp)?;
    let [kc, ks, kd] = ephemeral_session()?;
    let join = |(identity, trust)| Join {
        identity,
        trust,
        settings: plan.settings,
        session_hash: &hash,
        cfg,
        layers: plan.layers.len(),
    };
    let (jc, js, jd) = (
        join((&kc.0, &kc.1)),
        join((&ks.0, &ks.1)),
        join((&kd.0, &kd.1)),
    );
    let (rc, rs, rd) = std::thread::scope(|scope| {
        let hc = scope.spawn(|| run_party(jc.connected(sc)?, plan, None, Some(input)));
        let hs = scope.spawn(|| run_party(js.connected(ss)?, plan, Some(weights), None));
        let hd = scope.spawn(|| run_party(jd.connected(sd)?, plan, None, None));
        let join = |h: std::thread::ScopedJoinHandle<'_, Result<PartyRun>>| {
            h.join().unwrap_or_else(|_| {
                Err(Error::Link {
                    peer: "local party".into(),
                    msg: "party thread panicked".into(),
                })
            })
        };
        (join(hc), join(hs), join(hd))
    });
    match (rc, rs, rd) {
        (Ok(c), Ok(s), Ok(d)) => Ok([c, s, d]),
        (c, s, d) => {
            let errs: Vec<Error> = [c.err(), s.err(), d.err()].into_iter().flatten().collect();
            let root = errs
                .iter()
                .position(|e| !matches!(e, Error::Link { .. }))
                .unwrap_or(0);
            Err(errs.into_iter().nth(root).expect("at least one error"))
        }
    }
}

/// Runs `f` once per role, each on its own thread with a connected [`Party`] (in-memory
/// connections, real handshake): the harness for protocol tests. Results in role order.
pub fn with_parties<T: Send>(
    settings: super::plan::Settings,
    f: impl Fn(&mut Party) -> Result<T> + Sync,
) -> Result<[T; 3]> {
    let [sc, ss, sd] = local_streams(LocalNet::Memory)?;
    let keys = ephemeral_session()?;
    let f = &f;
    let keys = &keys;
    let run = move |role: Role, streams| -> Result<T> {
        let (identity, trust) = &keys[role as usize];
        let join = Join {
            identity,
            trust,
            settings,
            session_hash: "protocol-test",
            cfg: LinkConfig::default(),
            layers: 1,
        };
        let mut p = join.connected(streams)?;
        p.tag = 0;
        let out = f(&mut p)?;
        p.finish()?;
        Ok(out)
    };
    let (a, b, c) = std::thread::scope(|s| {
        let a = s.spawn(move || run(Role::Client, sc));
        let b = s.spawn(move || run(Role::Server, ss));
        let c = s.spawn(move || run(Role::Dealer, sd));
        (
            a.join().expect("client thread"),
            b.join().expect("server thread"),
            c.join().expect("dealer thread"),
        )
    });
    Ok([a?, b?, c?])
}
