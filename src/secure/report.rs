//! Runs a model under secure inference (all three parties in this process) next to the
//! plaintext fixed-point oracle and the float model, and summarises per image and per layer.
use super::engine::{run_local, ClientInput, PartyRun};
use super::link::LinkConfig;
use super::plan::{argmax, forward_fixed, Plan, Settings};
use crate::error::Result;
use crate::models::Model;
use serde::Serialize;
use tch::{Kind, Tensor};

/// A secure logit this far (real units) from the plaintext fixed-point one did not just
/// collect the +-1 ulp of each local truncation: a truncation failed (probability about
/// |value| / 2^64 in ring units, so it grows with the fractional bits) or a near-zero patch
/// decided differently.
pub const FAR_OFF: f64 = 1.0;

/// Bytes on each link (both directions), headers included.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct LinkBytes {
    pub client_server: u64,
    pub client_dealer: u64,
    pub server_dealer: u64,
    pub total: u64,
}

impl LinkBytes {
    /// From what each party sent to each role ([client, server, dealer][to]).
    fn from_sent(s: [[u64; 3]; 3]) -> LinkBytes {
        let cs = s[0][1] + s[1][0];
        let cd = s[0][2] + s[2][0];
        let sd = s[1][2] + s[2][1];
        LinkBytes {
            client_server: cs,
            client_dealer: cd,
            server_dealer: sd,
            total: cs + cd + sd,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ImageReport {
    pub index: usize,
    pub label: Option<usize>,
    /// Secure prediction (revealed arg-max, or arg-max of the revealed logits).
    pub prediction: usize,
    /// Prediction of the plaintext fixed-point forward pass.
    pub plaintext_prediction: usize,
    /// Prediction of the float model (with the same spec).
    pub float_prediction: usize,
    /// max |secure logit - plaintext fixed-point logit| (absent in arg-max-only mode).
    pub max_logit_error: Option<f64>,
    /// max |secure logit - float logit|.
    pub max_float_error: Option<f64>,
    /// Logits more than [`FAR_OFF`] from the plaintext fixed-point pass: the trace of a local
    /// truncation that failed (or of a patch sum within a few ulps of 0 that decided
    /// differently). Absent in arg-max-only mode.
    pub far_off: Option<usize>,
    /// The plaintext fixed-point logits (class-major [K, H, W] for a segmentation map).
    pub plaintext_logits: Vec<f64>,
    /// Segmentation maps only: the fraction of pixels whose class (arg-max over the K classes)
    /// is the same in the secure result (revealed logits, or the revealed classes in
    /// arg-max-only mode) and the plaintext fixed-point logits. (`prediction` and its
    /// companions are then the arg-max over all K x H x W logits, 0 in arg-max-only mode.)
    pub pixel_agreement: Option<f64>,
    pub seconds: f64,
    pub bytes: LinkBytes,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    pub name: String,
    pub kind: String,
    /// Client wall time per image.
    pub seconds: f64,
    /// Bytes sent by all parties per image.
    pub bytes: u64,
    /// Sequential message trips per image.
    pub rounds: u64,
    pub drelus: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub model: String,
    pub input: [usize; 3],
    pub classes: usize,
    pub frac_bits: u32,
    pub drelu_bits: u32,
    pub drelu_protocol: super::plan::DreluProtocol,
    pub argmax_only: bool,
    pub session_hash: String,
    pub relus: usize,
    pub drelus_per_image: usize,
    /// Once per session: the opened weight masks F (server -> client).
    pub setup_bytes: LinkBytes,
    pub setup_seconds: f64,
    pub images: Vec<ImageReport>,
    pub layers: Vec<LayerReport>,
    pub mean_seconds: f64,
    pub mean_bytes: LinkBytes,
    /// Images whose secure prediction equals the plaintext fixed-point prediction.
    pub agree_plaintext: usize,
    /// Images with at least one far-off logit (see [`ImageReport::far_off`]).
    pub far_off_images: usize,
    /// The most bytes of the dealer's material the client kept before use.
    pub client_peak_ahead: u64,
    /// Images whose secure prediction equals the label (when labels are known).
    pub correct: Option<usize>,
}

/// Runs `images` (each [C, H, W] floats, already normalised) through `model` (its active spec
/// included) securely and in plaintext.
pub fn run_compare(
    model: &Model,
    images: &[Vec<f32>],
    labels: Option<&[usize]>,
    settings: Settings,
    cfg: LinkConfig,
) -> Result<RunReport> {
    let (plan, weights) = Plan::from_model(model, settings)?;
    let fx = settings.fixed;
    let encoded: Vec<Vec<u64>> = images
        .iter()
        .enumerate()
        .map(|(i, x)| fx.encode_all(x, &format!("image {i}")))
        .collect::<Result<_>>()?;
    let input = ClientInput {
        images: encoded.clone(),
    };
    let runs = run_local(&plan, &weights, &input, cfg)?;
    let [client, _, _] = &runs;
    let c = plan.input;
    let mut reports = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let fixed = fx.decode_all(&forward_fixed(&plan, &weights, &encoded[i]));
        let float: Vec<f64> = {
            let _g = tch::no_grad_guard();
            let x = Tensor::from_slice(img).view([1, c[0] as i64, c[1] as i64, c[2] as i64]);
            let y = model.forward_t(&x.to_device(model.device()), false);
            Vec::<f64>::try_from(y.to_kind(Kind::Double).flatten(0, -1))?
        };
        let run = &client.images[i];
        let max_err = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max)
        };
        let sent = [0, 1, 2].map(|r| runs[r].images[i].bytes_sent);
        reports.push(ImageReport {
            index: i,
            label: labels.and_then(|l| l.get(i).copied()),
            prediction: run
                .argmax
                .unwrap_or_else(|| argmax(run.logits.as_deref().unwrap_or(&[]))),
            plaintext_prediction: argmax(&fixed),
            float_prediction: argmax(&float),
            max_logit_error: run.logits.as_deref().map(|l| max_err(l, &fixed)),
            max_float_error: run.logits.as_deref().map(|l| max_err(l, &float)),
            far_off: run.logits.as_deref().map(|l| {
                l.iter()
                    .zip(&fixed)
                    .filter(|(a, b)| (*a - *b).abs() > FAR_OFF)
                    .count()
            }),
            pixel_agreement: if plan.outputs != plan.classes {
                let secure = match (&run.pixel_classes, run.logits.as_deref()) {
                    (Some(c), _) => Some(c.clone()),
                    (None, Some(l)) => Some(pixel_classes(l, plan.classes)),
                    (None, None) => None,
                };
                let plain = pixel_classes(&fixed, plan.classes);
                secure.map(|s| {
                    let same = s.iter().zip(&plain).filter(|(a, b)| a == b).count();
                    same as f64 / plain.len().max(1) as f64
                })
            } else {
                None
            },
            plaintext_logits: fixed,
            seconds: run.seconds,
            bytes: LinkBytes::from_sent(sent),
        });
    }
    let n = images.len().max(1) as u64;
    let layers = layer_reports(&plan, &runs, n);
    let mean = |f: fn(&LinkBytes) -> u64| reports.iter().map(|r| f(&r.bytes)).sum::<u64>() / n;
    let mean_bytes = LinkBytes {
        client_server: mean(|b| b.client_server),
        client_dealer: mean(|b| b.client_dealer),
        server_dealer: mean(|b| b.server_dealer),
        total: mean(|b| b.total),
    };
    let relus = model.sites().iter().map(|s| s.relus()).sum();
    Ok(RunReport {
        model: plan.model.clone(),
        input: plan.input,
        classes: plan.classes,
        frac_bits: fx.frac,
        drelu_bits: settings.drelu_bits,
        drelu_protocol: settings.drelu,
        argmax_only: settings.argmax_only,
        session_hash: plan.hash(),
        relus,
        drelus_per_image: plan.drelus(),
        setup_bytes: LinkBytes::from_sent([0, 1, 2].map(|r| runs[r].setup_bytes)),
        setup_seconds: client.setup_seconds,
        mean_seconds: reports.iter().map(|r| r.seconds).sum::<f64>() / n as f64,
        mean_bytes,
        agree_plaintext: reports
            .iter()
            .filter(|r| r.prediction == r.plaintext_prediction)
            .count(),
        client_peak_ahead: client.peak_ahead,
        far_off_images: reports
            .iter()
            .filter(|r| r.far_off.unwrap_or(0) > 0)
            .count(),
        correct: labels.map(|_| {
            reports
                .iter()
                .filter(|r| Some(r.prediction) == r.label)
                .count()
        }),
        images: reports,
        layers,
    })
}

/// The arg-max class of every pixel of a class-major [K, P] logit map (first on ties).
pub fn pixel_classes(v: &[f64], classes: usize) -> Vec<usize> {
    let p = v.len() / classes.max(1);
    (0..p)
        .map(|px| (0..classes).fold(0, |k, c| if v[c * p + px] > v[k * p + px] { c } else { k }))
        .collect()
}

fn layer_reports(plan: &Plan, runs: &[PartyRun; 3], n: u64) -> Vec<LayerReport> {
    let mut out: Vec<LayerReport> = plan
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let c = &runs[0].layers[i];
            LayerReport {
                name: plan.names[i].clone(),
                kind: l.kind().to_string(),
                seconds: c.seconds / n as f64,
                bytes: runs.iter().map(|r| r.layers[i].bytes_sent).sum::<u64>() / n,
                rounds: c.rounds / n,
                drelus: c.drelus / n,
            }
        })
        .collect();
    let o = &runs[0].output;
    out.push(LayerReport {
        name: "output".into(),
        kind: "reveal".into(),
        seconds: o.seconds / n as f64,
        bytes: runs.iter().map(|r| r.output.bytes_sent).sum::<u64>() / n,
        rounds: o.rounds / n,
        drelus: o.drelus / n,
    });
    out
}
