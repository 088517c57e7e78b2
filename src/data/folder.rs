//! ImageNet-style class folders: `ROOT/train/<class>/*.JPEG` and `ROOT/val/<class>/*`. Only the
//! file list stays in memory; images are decoded per batch on rayon worker threads (memory is
//! bounded by one batch), with the standard transforms: random-resized-crop (scale 0.08-1,
//! aspect 3/4-4/3) plus horizontal flip for training, resize of the short side to 256/224 of
//! the output and a center crop for evaluation.
use super::{Rng, Split};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// The files of one split with their class indices.
#[derive(Debug, Clone)]
pub struct FolderSet {
    pub paths: Vec<PathBuf>,
    pub labels: Vec<i64>,
    pub classes: Vec<String>,
    /// Output side (images are `side` x `side`, RGB).
    pub side: usize,
}

const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

fn subdirs(dir: &Path) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    Ok(v)
}

fn images_in(dir: &Path) -> Result<Vec<PathBuf>> {
    files_with_extension(dir, &EXTENSIONS)
}

/// The files directly in `dir` whose extension (any case) is one of `exts`, sorted.
pub(crate) fn files_with_extension(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .map(|x| x.to_string_lossy().to_ascii_lowercase())
                    .is_some_and(|x| exts.contains(&x.as_str()))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Lists `root/train` or `root/val`. The classes are the sorted sub-folder names of
/// `root/train` (so both splits agree on indices); a validation class that training lacks,
/// or a class folder without images, is an error naming it.
pub fn open(root: &Path, split: Split, side: usize) -> Result<FolderSet> {
    let name = match split {
        Split::Train => "train",
        Split::Test => "val",
    };
    let train_dir = root.join("train");
    let dir = root.join(name);
    if !dir.is_dir() {
        return Err(Error::data(
            &dir,
            "missing: expected an ImageNet-style folder with one sub-folder per class",
        ));
    }
    let classes = subdirs(if train_dir.is_dir() { &train_dir } else { &dir })?;
    if classes.is_empty() {
        return Err(Error::data(&dir, "no class sub-folders"));
    }
    let (mut paths, mut labels) = (Vec::new(), Vec::new());
    for c in subdirs(&dir)? {
        let Some(k) = classes.iter().position(|x| *x == c) else {
            return Err(Error::data(
                dir.join(&c),
                format!(
                    "class '{c}' is not among the {} training classes",
                    classes.len()
                ),
            ));
        };
        let files = images_in(&dir.join(&c))?;
        if files.is_empty() {
            return Err(Error::data(
                dir.join(&c),
                "class folder without images (.jpg, .jpeg or .png)",
            ));
        }
        labels.extend(std::iter::repeat_n(k as i64, files.len()));
        paths.extend(files);
    }
    Ok(FolderSet {
        paths,
        labels,
        classes,
        side,
    })
}

/// How to turn a decoded image into `side` x `side`.
#[derive(Clone, Copy, Debug)]
pub enum Transform {
    /// Resize the short side to side * 256 / 224, center crop.
    Eval,
    /// Random-resized-crop and flip, drawn from a per-image seed.
    Train(u64),
}

/// Decodes one file to RGB u8, channel-major [3, side, side]. Resizing is a bilinear
/// convolution over the crop box (antialiased when shrinking, like PIL's, which torchvision
/// uses), by `fast_image_resize` with the processor's SIMD.
pub fn decode(path: &Path, side: usize, t: Transform) -> Result<Vec<u8>> {
    let img = image::open(path)
        .map_err(|e| Error::data(path, format!("cannot decode the image: {e}")))?
        .into_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (rect, flip) = match t {
        Transform::Eval => {
            // The short side resized to side * 256 / 224, then a centered side x side crop,
            // as a box in source pixels.
            let short = (side * 256).div_ceil(224);
            let (nw, nh) = if w <= h {
                (short, (h * short).div_ceil(w))
            } else {
                ((w * short).div_ceil(h), short)
            };
            let (sx, sy) = (w as f64 / nw as f64, h as f64 / nh as f64);
            let (x0, y0) = ((nw - side) / 2, (nh - side) / 2);
            let r = [
                x0 as f64 * sx,
                y0 as f64 * sy,
                side as f64 * sx,
                side as f64 * sy,
            ];
            (r, false)
        }
        Transform::Train(seed) => {
            let mut rng = Rng::new(seed);
            let (x0, y0, cw, ch) = random_resized_crop(w, h, &mut rng);
            let r = [x0 as f64, y0 as f64, cw as f64, ch as f64];
            (r, rng.next_u64() & 1 == 1)
        }
    };
    let hwc = resize_box(&img, rect, side).map_err(|e| Error::data(path, e))?;
    let mut chw = vec![0u8; 3 * side * side];
    for y in 0..side {
        for x in 0..side {
            let sx = if flip { side - 1 - x } else { x };
            let p = &hwc[(y * side + sx) * 3..][..3];
            for k in 0..3 {
                chw[k * side * side + y * side + x] = p[k];
            }
        }
    }
    Ok(chw)
}

/// torchvision's RandomResizedCrop box (scale 0.08-1, aspect 3/4-4/3, 10 tries, then the
/// centered square): (x0, y0, width, height).
fn random_resized_crop(w: usize, h: usize, rng: &mut Rng) -> (usize, usize, usize, usize) {
    let area = (w * h) as f64;
    for _ in 0..10 {
        let target = area * (0.08 + 0.92 * rng.uniform());
        let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
        let ratio = (lo + (hi - lo) * rng.uniform()).exp();
        let cw = (target * ratio).sqrt().round() as usize;
        let ch = (target / ratio).sqrt().round() as usize;
        if cw >= 1 && ch >= 1 && cw <= w && ch <= h {
            let x0 = rng.below((w - cw + 1) as u64) as usize;
            let y0 = rng.below((h - ch + 1) as u64) as usize;
            return (x0, y0, cw, ch);
        }
    }
    let m = w.min(h);
    ((w - m) / 2, (h - m) / 2, m, m)
}

/// The box [left, top, width, height] (source pixels) of `img` resized to side x side, RGB
/// row-major.
fn resize_box(
    img: &image::RgbImage,
    rect: [f64; 4],
    side: usize,
) -> std::result::Result<Vec<u8>, String> {
    use fast_image_resize as fr;
    thread_local! {
        static RESIZER: std::cell::RefCell<fr::Resizer> = std::cell::RefCell::new(fr::Resizer::new());
    }
    let src =
        fr::images::ImageRef::new(img.width(), img.height(), img.as_raw(), fr::PixelType::U8x3)
            .map_err(|e| format!("cannot resize: {e}"))?;
    let mut dst = fr::images::Image::new(side as u32, side as u32, fr::PixelType::U8x3);
    let o = fr::ResizeOptions::new()
        .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear))
        .crop(rect[0], rect[1], rect[2], rect[3]);
    RESIZER
        .with(|r| r.borrow_mut().resize(&src, &mut dst, &o))
        .map_err(|e| format!("cannot resize: {e}"))?;
    Ok(dst.into_vec())
}

impl FolderSet {
    /// Decodes the images `idx` in parallel: u8 [n, 3, side, side] (row-major bytes).
    pub fn decode_batch(&self, idx: &[i64], t: &[Transform]) -> Result<Vec<u8>> {
        let parts: Vec<Result<Vec<u8>>> = idx
            .par_iter()
            .zip(t.par_iter())
            .map(|(&i, &tr)| decode(&self.paths[i as usize], self.side, tr))
            .collect();
        let mut out = Vec::with_capacity(idx.len() * 3 * self.side * self.side);
        for p in parts {
            out.extend(p?);
        }
        Ok(out)
    }
}
