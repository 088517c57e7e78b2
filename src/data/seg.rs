//! Semantic segmentation sets: ADE20K (`images/{training,validation}/*.jpg` with
//! `annotations/{training,validation}/*.png`) and Pascal VOC 2012 with the augmented set
//! (`JPEGImages/<id>.jpg`, `SegmentationClass[Aug]/<id>.png`, ids from
//! `ImageSets/Segmentation/{train_aug,train,val}.txt`). Only the file pairs stay in memory;
//! images and masks are decoded per batch on rayon worker threads.
//!
//! Labels follow the standard protocols: ADE20K masks hold 0..=150 with 0 = "other", which
//! becomes the ignore label 255 while 1..=150 become classes 0..=149 (mmseg
//! `reduce_zero_label`); VOC masks hold 0..=20 plus 255 for the ignored object boundaries. Any
//! other value is an error naming the file and the value.
//!
//! Transforms (mmseg's published pipelines): training rescales the image to fit the test scale
//! times a random ratio in `scale_range`, takes a random crop of the input size (padding the
//! image with 0 and the mask with 255 where the rescaled image is smaller), flips with
//! probability 1/2 and applies photometric jitter (brightness, contrast, saturation; no hue
//! shift). Evaluation rescales the image to fit the test scale keeping its aspect ratio and
//! keeps the mask at its original size (predictions are resized back to it). The fixed
//! transform (distortion samples, secure inference) resizes the short side to the input and
//! takes a center crop, so every image has the configured input size.
use super::{Rng, Split};
use crate::error::{Error, Result};
use image::imageops::FilterType;
use image::RgbImage;
use std::path::{Path, PathBuf};

/// The label of pixels that count neither in the loss nor in the metrics.
pub const IGNORE: u8 = 255;

/// Which directory layout and label protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Ade20k,
    Voc,
}

impl Layout {
    pub fn num_classes(self) -> usize {
        match self {
            Layout::Ade20k => 150,
            Layout::Voc => 21,
        }
    }

    /// Maps a raw mask value to a training label (0..classes or [`IGNORE`]); `None` for a value
    /// the protocol does not know.
    pub fn map_label(self, v: u8) -> Option<u8> {
        match self {
            Layout::Ade20k => match v {
                0 => Some(IGNORE),
                1..=150 => Some(v - 1),
                _ => None,
            },
            Layout::Voc => match v {
                0..=20 | IGNORE => Some(v),
                _ => None,
            },
        }
    }
}

/// How to run the network on an evaluation image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Inference {
    /// The whole (rescaled) image in one forward pass.
    Whole,
    /// Windows of the input size at a stride; overlapping logits are averaged (mmseg's
    /// slide_inference).
    Slide,
}

/// Settings of the transforms and of evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct SegTransforms {
    /// [H, W] of the training crop and of the fixed transform (the configured input).
    pub crop: [usize; 2],
    /// (long, short) side bounds the image is rescaled to fit (mmseg's (2048, 512)).
    pub test_scale: [usize; 2],
    /// Training rescale ratio range relative to `test_scale`.
    pub scale_range: [f64; 2],
    pub flip: bool,
    pub photometric: bool,
    /// Evaluation: whole image or sliding windows of the crop size at `stride` ([H, W]).
    pub inference: Inference,
    pub stride: [usize; 2],
    /// Training crop: up to [`CROP_TRIES`] random crops are drawn until the most frequent class
    /// (ignored pixels aside) covers less than this fraction of the labelled pixels (mmseg's
    /// `RandomCrop(cat_max_ratio)`); 1 takes the first crop.
    pub cat_max_ratio: f64,
}

/// Crops mmseg's `RandomCrop` draws at most for `cat_max_ratio`.
pub const CROP_TRIES: usize = 10;

/// The top-left corner of a `kh x kw` training crop of `m`: random, and with `ratio < 1`
/// redrawn (at most [`CROP_TRIES`] times in all) while one class covers `ratio` or more of the
/// crop's labelled pixels or the crop has fewer than two classes; the last draw is kept.
pub fn choose_crop(m: &Mask, kh: usize, kw: usize, ratio: f64, rng: &mut Rng) -> (usize, usize) {
    let mut draw = || {
        let y0 = rng.below((m.height - kh + 1) as u64) as usize;
        let x0 = rng.below((m.width - kw + 1) as u64) as usize;
        (y0, x0)
    };
    let mut corner = draw();
    if ratio >= 1.0 {
        return corner;
    }
    for _ in 1..CROP_TRIES {
        let mut counts = [0u64; 256];
        for y in corner.0..corner.0 + kh {
            let row = &m.labels[y * m.width + corner.1..y * m.width + corner.1 + kw];
            for &l in row {
                counts[l as usize] += 1;
            }
        }
        counts[IGNORE as usize] = 0;
        let total: u64 = counts.iter().sum();
        let classes = counts.iter().filter(|&&c| c > 0).count();
        let top = counts.iter().copied().max().unwrap_or(0);
        if classes > 1 && (top as f64) < ratio * total as f64 {
            break;
        }
        corner = draw();
    }
    corner
}

/// One split: image and mask files in the same order.
#[derive(Clone, Debug)]
pub struct SegSet {
    pub layout: Layout,
    pub images: Vec<PathBuf>,
    pub masks: Vec<PathBuf>,
    pub transforms: SegTransforms,
}

/// Lists one split of a set under `root`. A missing directory, list file, image or annotation
/// is an error naming the path that was expected.
pub fn open(layout: Layout, root: &Path, split: Split, t: SegTransforms) -> Result<SegSet> {
    let (images, masks) = match layout {
        Layout::Ade20k => open_ade(root, split)?,
        Layout::Voc => open_voc(root, split)?,
    };
    if images.is_empty() {
        return Err(Error::data(root, "no images in this split"));
    }
    Ok(SegSet {
        layout,
        images,
        masks,
        transforms: t,
    })
}

fn open_ade(root: &Path, split: Split) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let name = match split {
        Split::Train => "training",
        Split::Test => "validation",
    };
    let idir = root.join("images").join(name);
    let adir = root.join("annotations").join(name);
    for d in [&idir, &adir] {
        if !d.is_dir() {
            return Err(Error::data(
                d,
                "missing: expected the ADE20K layout images/{training,validation}/*.jpg and \
                 annotations/{training,validation}/*.png",
            ));
        }
    }
    let images = super::folder::files_with_extension(&idir, &["jpg", "jpeg", "png"])?;
    let mut masks = Vec::with_capacity(images.len());
    for img in &images {
        let stem = img.file_stem().unwrap_or_default();
        let m = adir.join(stem).with_extension("png");
        if !m.is_file() {
            return Err(Error::data(
                &m,
                format!("missing annotation for image {}", img.display()),
            ));
        }
        masks.push(m);
    }
    Ok((images, masks))
}

fn open_voc(root: &Path, split: Split) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let sets = root.join("ImageSets").join("Segmentation");
    // Training uses the augmented list (SBD masks in SegmentationClassAug) when present;
    // validation the official list with the original masks.
    let (list, mask_dirs) = match split {
        Split::Train if sets.join("train_aug.txt").is_file() => (
            sets.join("train_aug.txt"),
            ["SegmentationClassAug", "SegmentationClass"],
        ),
        Split::Train => (
            sets.join("train.txt"),
            ["SegmentationClass", "SegmentationClassAug"],
        ),
        Split::Test => (
            sets.join("val.txt"),
            ["SegmentationClass", "SegmentationClassAug"],
        ),
    };
    let text = std::fs::read_to_string(&list).map_err(|e| {
        Error::data(
            &list,
            format!("cannot read the VOC image list ({e}); expected ImageSets/Segmentation/*.txt"),
        )
    })?;
    let (mut images, mut masks) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        // train_aug lists may hold "JPEGImages/x.jpg SegmentationClassAug/x.png" pairs.
        let Some(first) = line.split_whitespace().next() else {
            continue;
        };
        let id = Path::new(first)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if id.is_empty() {
            return Err(Error::data(&list, format!("line {}: no image id", n + 1)));
        }
        let img = root.join("JPEGImages").join(format!("{id}.jpg"));
        if !img.is_file() {
            return Err(Error::data(
                &img,
                format!(
                    "missing image (listed on line {} of {})",
                    n + 1,
                    list.display()
                ),
            ));
        }
        let Some(m) = mask_dirs
            .iter()
            .map(|d| root.join(d).join(format!("{id}.png")))
            .find(|p| p.is_file())
        else {
            return Err(Error::data(
                root.join(mask_dirs[0]).join(format!("{id}.png")),
                format!(
                    "missing annotation for image {} (looked in {} and {})",
                    img.display(),
                    mask_dirs[0],
                    mask_dirs[1]
                ),
            ));
        };
        images.push(img);
        masks.push(m);
    }
    Ok((images, masks))
}

/// Reads a mask PNG as raw values: an 8-bit grayscale PNG, or a palette PNG (VOC's
/// SegmentationClass) whose palette indices are the labels.
pub fn read_mask_raw(path: &Path) -> Result<(usize, usize, Vec<u8>)> {
    let bad = |msg: String| Error::data(path, msg);
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(f));
    // No palette expansion: the indices are the class labels.
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec
        .read_info()
        .map_err(|e| bad(format!("cannot decode the mask PNG: {e}")))?;
    let (ct, depth) = reader.output_color_type();
    if depth != png::BitDepth::Eight
        || !matches!(ct, png::ColorType::Grayscale | png::ColorType::Indexed)
    {
        return Err(bad(format!(
            "mask must be an 8-bit grayscale or palette PNG, found {ct:?} {depth:?}"
        )));
    }
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| bad("mask PNG too large".into()))?;
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| bad(format!("cannot decode the mask PNG: {e}")))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let stride = info.line_size;
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h {
        out.extend_from_slice(&buf[y * stride..y * stride + w]);
    }
    Ok((h, w, out))
}

/// A decoded mask with labels mapped by the layout's protocol.
#[derive(Clone, Debug, PartialEq)]
pub struct Mask {
    pub height: usize,
    pub width: usize,
    pub labels: Vec<u8>,
}

/// Reads and maps a mask; an unknown value is an error naming the file and the value.
pub fn read_mask(layout: Layout, path: &Path) -> Result<Mask> {
    let (height, width, raw) = read_mask_raw(path)?;
    let mut lut = [None; 256];
    for (v, l) in lut.iter_mut().enumerate() {
        *l = layout.map_label(v as u8);
    }
    let mut labels = Vec::with_capacity(raw.len());
    for (i, &v) in raw.iter().enumerate() {
        match lut[v as usize] {
            Some(l) => labels.push(l),
            None => {
                return Err(Error::data(
                    path,
                    format!(
                        "unknown label value {v} at pixel (row {}, column {}); {} masks hold {}",
                        i / width.max(1),
                        i % width.max(1),
                        match layout {
                            Layout::Ade20k => "ADE20K",
                            Layout::Voc => "VOC",
                        },
                        match layout {
                            Layout::Ade20k => "0..=150",
                            Layout::Voc => "0..=20 and 255",
                        }
                    ),
                ))
            }
        }
    }
    Ok(Mask {
        height,
        width,
        labels,
    })
}

/// How to turn one (image, mask) pair into tensors' bytes.
#[derive(Clone, Copy, Debug)]
pub enum Transform {
    /// Random rescale + crop + flip + photometric jitter from a per-image seed; the image and
    /// the mask come out at the crop size.
    Train(u64),
    /// Image rescaled to fit the test scale; the mask at its original size.
    Eval,
    /// Short side resized to the input and center-cropped (image and mask at the input size).
    Fixed,
}

/// A decoded pair: image RGB channel-major [3, h, w], mask [mh, mw].
#[derive(Clone, Debug)]
pub struct Pair {
    pub height: usize,
    pub width: usize,
    pub image: Vec<u8>,
    pub mask: Mask,
}

/// The size of `(h, w)` rescaled to fit `(long, short)` keeping the aspect ratio (mmseg's
/// `keep_ratio` rescale: the largest factor with long side <= long and short side <= short).
pub fn fit_scale(h: usize, w: usize, long: f64, short: f64) -> (usize, usize) {
    let (l, s) = (h.max(w) as f64, h.min(w) as f64);
    let f = (long / l).min(short / s);
    (
        ((h as f64 * f + 0.5) as usize).max(1),
        ((w as f64 * f + 0.5) as usize).max(1),
    )
}

fn resize_mask(m: &Mask, h: usize, w: usize) -> Mask {
    if (h, w) == (m.height, m.width) {
        return m.clone();
    }
    // Nearest neighbour at pixel centres, so labels are never blended.
    let mut labels = vec![IGNORE; h * w];
    for y in 0..h {
        let sy = (((y as f64 + 0.5) * m.height as f64 / h as f64) as usize).min(m.height - 1);
        for x in 0..w {
            let sx = (((x as f64 + 0.5) * m.width as f64 / w as f64) as usize).min(m.width - 1);
            labels[y * w + x] = m.labels[sy * m.width + sx];
        }
    }
    Mask {
        height: h,
        width: w,
        labels,
    }
}

fn crop_mask(m: &Mask, y0: usize, x0: usize, h: usize, w: usize) -> Mask {
    let mut labels = Vec::with_capacity(h * w);
    for y in y0..y0 + h {
        labels.extend_from_slice(&m.labels[y * m.width + x0..y * m.width + x0 + w]);
    }
    Mask {
        height: h,
        width: w,
        labels,
    }
}

fn chw(img: &RgbImage) -> Vec<u8> {
    let n = (img.width() * img.height()) as usize;
    let mut out = vec![0u8; 3 * n];
    for (i, p) in img.pixels().enumerate() {
        for k in 0..3 {
            out[k * n + i] = p.0[k];
        }
    }
    out
}

/// Photometric jitter in the order of mmseg's PhotoMetricDistortion (brightness, contrast,
/// saturation, each with probability 1/2; the hue shift is left out).
fn photometric(img: &mut RgbImage, rng: &mut Rng) {
    let clamp = |v: f64| v.round().clamp(0.0, 255.0) as u8;
    if rng.next_u64() & 1 == 1 {
        let delta = -32.0 + 64.0 * rng.uniform();
        for p in img.pixels_mut() {
            for c in p.0.iter_mut() {
                *c = clamp(*c as f64 + delta);
            }
        }
    }
    if rng.next_u64() & 1 == 1 {
        let alpha = 0.5 + rng.uniform();
        for p in img.pixels_mut() {
            for c in p.0.iter_mut() {
                *c = clamp(*c as f64 * alpha);
            }
        }
    }
    if rng.next_u64() & 1 == 1 {
        let alpha = 0.5 + rng.uniform();
        for p in img.pixels_mut() {
            let g = 0.299 * p.0[0] as f64 + 0.587 * p.0[1] as f64 + 0.114 * p.0[2] as f64;
            for c in p.0.iter_mut() {
                *c = clamp(g + alpha * (*c as f64 - g));
            }
        }
    }
}

impl SegSet {
    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Keeps `n` pairs evenly spaced over the sorted list.
    pub fn truncate(&mut self, n: usize) {
        let len = self.len();
        if n < len {
            let keep: Vec<usize> = (0..n).map(|i| i * len / n).collect();
            self.images = keep.iter().map(|&i| self.images[i].clone()).collect();
            self.masks = keep.iter().map(|&i| self.masks[i].clone()).collect();
        }
    }

    /// Decodes pair `i` with transform `t`.
    pub fn decode(&self, i: usize, t: Transform) -> Result<Pair> {
        let path = &self.images[i];
        let img = super::image_file::open_rgb(path)?;
        let mask = read_mask(self.layout, &self.masks[i])?;
        let (h, w) = (img.height() as usize, img.width() as usize);
        if (mask.height, mask.width) != (h, w) {
            return Err(Error::data(
                &self.masks[i],
                format!(
                    "mask is {}x{} but its image {} is {h}x{w}",
                    mask.height,
                    mask.width,
                    path.display()
                ),
            ));
        }
        let tr = &self.transforms;
        let [long, short] = tr.test_scale.map(|v| v as f64);
        let resize = |img: &RgbImage, nh: usize, nw: usize| {
            image::imageops::resize(img, nw as u32, nh as u32, FilterType::Triangle)
        };
        Ok(match t {
            Transform::Eval => {
                let (nh, nw) = fit_scale(h, w, long, short);
                Pair {
                    height: nh,
                    width: nw,
                    image: chw(&resize(&img, nh, nw)),
                    mask,
                }
            }
            Transform::Fixed => {
                let [ch, cw] = tr.crop;
                let f = (ch as f64 / h as f64).max(cw as f64 / w as f64);
                let nh = ((h as f64 * f).round() as usize).max(ch);
                let nw = ((w as f64 * f).round() as usize).max(cw);
                let (y0, x0) = ((nh - ch) / 2, (nw - cw) / 2);
                let r = resize(&img, nh, nw);
                let c = image::imageops::crop_imm(&r, x0 as u32, y0 as u32, cw as u32, ch as u32)
                    .to_image();
                Pair {
                    height: ch,
                    width: cw,
                    image: chw(&c),
                    mask: crop_mask(&resize_mask(&mask, nh, nw), y0, x0, ch, cw),
                }
            }
            Transform::Train(seed) => {
                let mut rng = Rng::new(seed);
                let [lo, hi] = tr.scale_range;
                let ratio = lo + (hi - lo) * rng.uniform();
                let (nh, nw) = fit_scale(h, w, long * ratio, short * ratio);
                let mut r = resize(&img, nh, nw);
                let m = resize_mask(&mask, nh, nw);
                let [ch, cw] = tr.crop;
                // Random crop of at most the crop size, then padding up to it.
                let (kh, kw) = (ch.min(nh), cw.min(nw));
                let (y0, x0) = choose_crop(&m, kh, kw, tr.cat_max_ratio, &mut rng);
                let mut c =
                    image::imageops::crop_imm(&r, x0 as u32, y0 as u32, kw as u32, kh as u32)
                        .to_image();
                let mut m = crop_mask(&m, y0, x0, kh, kw);
                if tr.flip && rng.next_u64() & 1 == 1 {
                    image::imageops::flip_horizontal_in_place(&mut c);
                    for row in m.labels.chunks_mut(kw) {
                        row.reverse();
                    }
                }
                if tr.photometric {
                    photometric(&mut c, &mut rng);
                }
                r = RgbImage::new(cw as u32, ch as u32);
                image::imageops::replace(&mut r, &c, 0, 0);
                let mut labels = vec![IGNORE; ch * cw];
                for y in 0..kh {
                    labels[y * cw..y * cw + kw].copy_from_slice(&m.labels[y * kw..(y + 1) * kw]);
                }
                Pair {
                    height: ch,
                    width: cw,
                    image: chw(&r),
                    mask: Mask {
                        height: ch,
                        width: cw,
                        labels,
                    },
                }
            }
        })
    }

    /// Decodes pairs `idx` in parallel (the first error in order is returned).
    pub fn decode_many(&self, idx: &[i64], t: &[Transform]) -> Result<Vec<Pair>> {
        self.decode_subs(idx, t, None)
    }

    /// [`SegSet::decode_many`], replacing undecodable pairs from `subs` when given (see
    /// [`super::image_file::decode_or_substitute`]).
    fn decode_subs(
        &self,
        idx: &[i64],
        t: &[Transform],
        subs: Option<(&super::image_file::Substitutes, usize)>,
    ) -> Result<Vec<Pair>> {
        let name = |i: i64| self.images[i as usize].display().to_string();
        let one = |k: usize, i: i64| self.decode(i as usize, t[k]);
        super::image_file::decode_or_substitute(idx, subs, &name, &one)
    }

    /// Decodes pairs of equal size (training or fixed transform) into u8 images
    /// [n, 3, H, W] and i64 masks [n, H, W].
    pub fn decode_batch(&self, idx: &[i64], t: &[Transform]) -> Result<(tch::Tensor, tch::Tensor)> {
        self.decode_batch_subs(idx, t, None)
    }

    /// [`SegSet::decode_batch`] with substitutes for undecodable pairs.
    pub fn decode_batch_subs(
        &self,
        idx: &[i64],
        t: &[Transform],
        subs: Option<(&super::image_file::Substitutes, usize)>,
    ) -> Result<(tch::Tensor, tch::Tensor)> {
        let pairs = self.decode_subs(idx, t, subs)?;
        let [h, w] = self.transforms.crop;
        let n = pairs.len() as i64;
        let (mut img, mut lab) = (Vec::new(), Vec::new());
        for p in &pairs {
            img.extend_from_slice(&p.image);
            lab.extend_from_slice(&p.mask.labels);
        }
        let x = tch::Tensor::from_slice(&img).view([n, 3, h as i64, w as i64]);
        let y = tch::Tensor::from_slice(&lab)
            .view([n, h as i64, w as i64])
            .to_kind(tch::Kind::Int64);
        Ok((x, y))
    }
}
