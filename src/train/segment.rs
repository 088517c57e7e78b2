//! Segmentation: the per-pixel loss (logits resized to the label size, ignore label 255), the
//! confusion matrix behind mIoU / per-class IoU / pixel accuracy, and evaluation by
//! whole-image or sliding-window inference.
//!
//! Evaluation runs one image at a time (images differ in size, and padding them to a common
//! size would change what the network sees at the borders); `eval_batch_size` images are
//! decoded at once in parallel, and in sliding-window mode up to that many windows share a
//! forward pass.
use super::{EvalResult, SegMetrics};
use crate::data::seg::{Inference, Transform, IGNORE};
use crate::data::{Dataset, Normalize};
use crate::error::{Error, Result};
use crate::models::Model;
use tch::{Kind, Reduction, Tensor};

/// Bilinear resize (align_corners = False) of logits [N, K, h, w] to [N, K, H, W].
pub fn resize_logits(logits: &Tensor, h: i64, w: i64) -> Tensor {
    let s = logits.size();
    if s[2] == h && s[3] == w {
        return logits.shallow_clone();
    }
    logits.upsample_bilinear2d([h, w], false, None, None)
}

/// Mean cross-entropy over the non-ignored pixels of `labels` [N, H, W], the number of those
/// pixels (a device scalar: nothing waits for the device) and the logits resized to the label
/// size (on which the loss is taken); a batch without any labelled pixel gives a zero loss that
/// still depends on the logits (so backward works).
pub fn seg_loss(logits: &Tensor, labels: &Tensor) -> (Tensor, Tensor, Tensor) {
    let s = labels.size();
    let up = resize_logits(logits, s[1], s[2]);
    let valid = labels.ne(IGNORE as i64).sum(Kind::Int64);
    let sum = up.cross_entropy_loss::<Tensor>(labels, None, Reduction::Sum, IGNORE as i64, 0.0);
    let loss = sum / valid.clamp_min(1).to_kind(Kind::Float);
    (loss, valid, up)
}

/// Pixels counted by (label, prediction), ignore-labelled pixels left out.
#[derive(Clone, Debug, PartialEq)]
pub struct Confusion {
    pub classes: usize,
    /// Row-major [label][prediction].
    pub counts: Vec<u64>,
}

impl Confusion {
    pub fn new(classes: usize) -> Confusion {
        Confusion {
            classes,
            counts: vec![0; classes * classes],
        }
    }

    /// Adds predictions and labels of the same shape (i64, any device).
    pub fn add(&mut self, pred: &Tensor, labels: &Tensor) -> Result<()> {
        let k = self.classes as i64;
        let l = labels.flatten(0, -1).to_device(tch::Device::Cpu);
        let p = pred.flatten(0, -1).to_device(tch::Device::Cpu);
        let keep = l.ne(IGNORE as i64);
        let (l, p) = (l.masked_select(&keep), p.masked_select(&keep));
        if l.numel() == 0 {
            return Ok(());
        }
        let bad = l.ge(k).logical_or(&l.lt(0)).any().int64_value(&[]) != 0;
        if bad {
            return Err(Error::InvalidArgument(format!(
                "a label is outside 0..{k} and is not the ignore label {IGNORE}"
            )));
        }
        let idx = l * k + p;
        let counts = idx.bincount::<Tensor>(None, k * k);
        let v = Vec::<i64>::try_from(&counts)?;
        for (c, n) in self.counts.iter_mut().zip(v) {
            *c += n as u64;
        }
        Ok(())
    }

    /// Adds one (label, prediction) pixel.
    pub fn add_pixel(&mut self, label: usize, pred: usize) {
        self.counts[label * self.classes + pred] += 1;
    }

    /// IoU per class: TP / (TP + FP + FN); `None` for a class absent from both the labels
    /// and the predictions (mmseg's NaN, left out of the mean).
    pub fn iou(&self) -> Vec<Option<f64>> {
        let k = self.classes;
        (0..k)
            .map(|c| {
                let tp = self.counts[c * k + c];
                let label: u64 = self.counts[c * k..(c + 1) * k].iter().sum();
                let pred: u64 = (0..k).map(|r| self.counts[r * k + c]).sum();
                let union = label + pred - tp;
                (union > 0).then(|| tp as f64 / union as f64)
            })
            .collect()
    }

    /// Mean of the defined IoUs (0 when none is defined).
    pub fn miou(&self) -> f64 {
        let v: Vec<f64> = self.iou().into_iter().flatten().collect();
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    }

    /// Labelled pixels.
    pub fn pixels(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Correct pixels over labelled pixels (0 when there are none).
    pub fn pixel_accuracy(&self) -> f64 {
        let k = self.classes;
        let tp: u64 = (0..k).map(|c| self.counts[c * k + c]).sum();
        tp as f64 / self.pixels().max(1) as f64
    }

    pub fn metrics(&self) -> SegMetrics {
        SegMetrics {
            miou: self.miou(),
            pixel_accuracy: self.pixel_accuracy(),
            per_class_iou: self.iou(),
            pixels: self.pixels(),
        }
    }
}

/// Evaluation settings of a segmentation run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SegEval {
    pub inference: Inference,
    /// [H, W] of a window (the configured input).
    pub crop: [usize; 2],
    /// [H, W] stride of the windows.
    pub stride: [usize; 2],
    /// Images decoded at once; windows per forward pass.
    pub batch: usize,
}

impl SegEval {
    /// The settings a segmentation set was loaded with, `batch` images / windows at once.
    pub fn of(t: &crate::data::seg::SegTransforms, batch: usize) -> SegEval {
        SegEval {
            inference: t.inference,
            crop: t.crop,
            stride: t.stride,
            batch,
        }
    }
}

/// Window origins along one axis (mmseg: the last window ends at the border).
fn windows(len: usize, crop: usize, stride: usize) -> Vec<(usize, usize)> {
    let n = len.saturating_sub(crop).div_ceil(stride) + 1;
    (0..n)
        .map(|i| {
            let end = (i * stride + crop).min(len);
            (end.saturating_sub(crop), end)
        })
        .collect()
}

/// Logits [1, K, h, w] at the size of the normalised image `x` [1, 3, h, w].
pub fn infer(model: &Model, x: &Tensor, e: &SegEval) -> Tensor {
    let s = x.size();
    let (h, w) = (s[2], s[3]);
    match e.inference {
        Inference::Whole => resize_logits(&model.forward_t(x, false), h, w),
        Inference::Slide => {
            let [ch, cw] = e.crop.map(|v| v as i64);
            let mut wins = Vec::new();
            for &(y0, y1) in &windows(h as usize, ch as usize, e.stride[0]) {
                for &(x0, x1) in &windows(w as usize, cw as usize, e.stride[1]) {
                    wins.push((y0 as i64, y1 as i64, x0 as i64, x1 as i64));
                }
            }
            let mut sum: Option<Tensor> = None;
            let count = Tensor::zeros([1, 1, h, w], (Kind::Float, x.device()));
            for chunk in wins.chunks(e.batch.max(1)) {
                // A window larger than the image is zero-padded (the mean after
                // normalisation) so the network always sees the input size.
                let crops: Vec<Tensor> = chunk
                    .iter()
                    .map(|&(y0, y1, x0, x1)| {
                        x.narrow(2, y0, y1 - y0)
                            .narrow(3, x0, x1 - x0)
                            .constant_pad_nd([0, cw - (x1 - x0), 0, ch - (y1 - y0)])
                    })
                    .collect();
                let out = resize_logits(&model.forward_t(&Tensor::cat(&crops, 0), false), ch, cw);
                let acc = sum.get_or_insert_with(|| {
                    Tensor::zeros([1, out.size()[1], h, w], (Kind::Float, x.device()))
                });
                for (i, &(y0, y1, x0, x1)) in chunk.iter().enumerate() {
                    let part = out
                        .get(i as i64)
                        .narrow(1, 0, y1 - y0)
                        .narrow(2, 0, x1 - x0);
                    let mut dst = acc.get(0).narrow(1, y0, y1 - y0).narrow(2, x0, x1 - x0);
                    dst += part;
                    let mut c = count.get(0).narrow(1, y0, y1 - y0).narrow(2, x0, x1 - x0);
                    c += 1.0;
                }
            }
            match sum {
                Some(s) => s / count,
                None => Tensor::zeros([1, 1, h, w], (Kind::Float, x.device())),
            }
        }
    }
}

/// mIoU, per-class IoU, pixel accuracy (also `top1`), pixel top-5 and the mean per-pixel
/// cross-entropy of `model` on a segmentation set, at the original label resolution.
pub fn evaluate(
    model: &Model,
    data: &Dataset,
    normalize: &Normalize,
    e: &SegEval,
) -> Result<EvalResult> {
    let n = data.len();
    Ok(evaluate_part(model, data, normalize, e, 0..n)?.finish(n))
}

/// The sums a segmentation evaluation adds up over images; parts of a split add.
#[derive(Clone, Debug, PartialEq)]
pub struct SegSums {
    pub conf: Confusion,
    /// Summed per-pixel cross-entropy.
    pub loss: f64,
    pub top5: i64,
}

impl SegSums {
    /// As one f64 vector (exact for counts below 2^53), for an all-reduce.
    pub fn to_vec(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.conf.counts.iter().map(|&c| c as f64).collect();
        v.extend([self.loss, self.top5 as f64]);
        v
    }

    pub fn from_vec(classes: usize, v: &[f64]) -> SegSums {
        let k2 = classes * classes;
        SegSums {
            conf: Confusion {
                classes,
                counts: v[..k2].iter().map(|&c| c as u64).collect(),
            },
            loss: v[k2],
            top5: v[k2 + 1] as i64,
        }
    }

    /// The figures of a split of `images` images.
    pub fn finish(&self, images: usize) -> EvalResult {
        let m = self.conf.metrics();
        let px = m.pixels.max(1) as f64;
        EvalResult {
            top1: m.pixel_accuracy,
            top5: self.top5 as f64 / px,
            loss: self.loss / px,
            images,
            segmentation: Some(m),
        }
    }
}

/// The sums of images `range` of a segmentation set.
pub fn evaluate_part(
    model: &Model,
    data: &Dataset,
    normalize: &Normalize,
    e: &SegEval,
    range: std::ops::Range<usize>,
) -> Result<SegSums> {
    let Some(set) = &data.seg else {
        return Err(Error::InvalidArgument(
            "segmentation evaluation needs a segmentation data set".into(),
        ));
    };
    let _g = tch::no_grad_guard();
    let dev = model.device();
    let k = data.num_classes;
    let mut conf = Confusion::new(k);
    let (mut loss, mut top5) = (0f64, 0i64);
    let order: Vec<i64> = range.map(|i| i as i64).collect();
    for ids in order.chunks(e.batch.max(1)) {
        let pairs = set.decode_many(ids, &vec![Transform::Eval; ids.len()])?;
        for p in pairs {
            let x = Tensor::from_slice(&p.image).view([1, 3, p.height as i64, p.width as i64]);
            let x = normalize.apply(&x.to_device(dev));
            let (mh, mw) = (p.mask.height as i64, p.mask.width as i64);
            let y = Tensor::from_slice(&p.mask.labels)
                .view([1, mh, mw])
                .to_kind(Kind::Int64)
                .to_device(dev);
            let logits = resize_logits(&infer(model, &x, e), mh, mw);
            if logits.size()[1] != k as i64 {
                return Err(Error::InvalidArgument(format!(
                    "{} puts out {} channels, the data set has {k} classes",
                    model.name(),
                    logits.size()[1]
                )));
            }
            let (l, valid, _) = seg_loss(&logits, &y);
            loss += l.double_value(&[]) * valid.int64_value(&[]) as f64;
            conf.add(&logits.argmax(1, false), &y)?;
            let (_, top) = logits.topk(5.min(k as i64), 1, true, true);
            let hit = top
                .eq_tensor(&y.unsqueeze(1))
                .any_dim(1, false)
                .logical_and(&y.ne(IGNORE as i64));
            top5 += hit.sum(Kind::Int64).int64_value(&[]);
        }
    }
    Ok(SegSums { conf, loss, top5 })
}
