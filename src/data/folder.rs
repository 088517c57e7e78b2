//! ImageNet-style class folders: `ROOT/train/<class>/*.JPEG` and `ROOT/val/<class>/*`. Only the
//! file list stays in memory; images are decoded per batch on rayon worker threads (memory is
//! bounded by one batch), with the standard transforms: random-resized-crop (scale 0.08-1,
//! aspect 3/4-4/3) plus horizontal flip for training, resize of the short side to 256/224 of
//! the output and a center crop for evaluation.
use super::{Rng, Split};
use crate::error::{Error, Result};
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

/// Whether a directory entry is a folder (`dir`) or a file: from the type `readdir` reports,
/// with a `stat` only for links and file systems that report no type.
fn entry_is(e: &std::fs::DirEntry, dir: bool) -> bool {
    match e.file_type() {
        Ok(t) if !t.is_symlink() => {
            if dir {
                t.is_dir()
            } else {
                t.is_file()
            }
        }
        _ => std::fs::metadata(e.path()).is_ok_and(|m| if dir { m.is_dir() } else { m.is_file() }),
    }
}

fn subdirs(dir: &Path) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| entry_is(e, true))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    Ok(v)
}

/// The names of the files directly in `dir` whose extension (any case) is one of `exts`,
/// sorted: one `readdir`, no `stat` per file.
fn names_with_extension(dir: &Path, exts: &[&str]) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| {
            Path::new(&e.file_name())
                .extension()
                .map(|x| x.to_string_lossy().to_ascii_lowercase())
                .is_some_and(|x| exts.contains(&x.as_str()))
                && entry_is(e, false)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    Ok(v)
}

/// The files directly in `dir` whose extension (any case) is one of `exts`, sorted.
pub(crate) fn files_with_extension(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>> {
    Ok(names_with_extension(dir, exts)?
        .into_iter()
        .map(|n| dir.join(n))
        .collect())
}

/// Lists `root/train` or `root/val`. The classes are the sorted sub-folder names of
/// `root/train` (so both splits agree on indices); a validation class that training lacks,
/// or a class folder without images, is an error naming it.
pub fn open(root: &Path, split: Split, side: usize) -> Result<FolderSet> {
    open_indexed(root, split, side, None)
}

/// The folder of a split and the class names (from `root/train`).
fn split_dirs(root: &Path, split: Split) -> Result<(PathBuf, Vec<String>)> {
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
    Ok((dir, classes))
}

/// The key of an index: the split folder, its classes and every class folder's modification
/// time (adding, removing or renaming a file changes its folder's), without reading the
/// folders themselves.
fn index_key(dir: &Path, classes: &[String], present: &[String]) -> Result<String> {
    let mut h = crate::hash::Fnv::default();
    h.write(dir.to_string_lossy().as_bytes());
    for c in classes {
        h.write(c.as_bytes());
        h.write(&[0]);
    }
    for c in present {
        let p = dir.join(c);
        let m = std::fs::metadata(&p)
            .and_then(|m| m.modified())
            .map_err(|e| Error::io(&p, e))?;
        let ns = m
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        h.write(c.as_bytes());
        h.write(&ns.to_le_bytes());
    }
    Ok(format!("{:016x}", h.value()))
}

const INDEX_MAGIC: &str = "brelu-folder-index 1";

/// The name of a split's index file in a run directory.
pub fn index_file(index_dir: &Path, split: Split) -> PathBuf {
    index_dir.join(match split {
        Split::Train => "folder-index-train.tsv",
        Split::Test => "folder-index-val.tsv",
    })
}

/// Reads an index written for `key`: per class (in `present` order), its image names.
fn read_index(path: &Path, key: &str, present: &[String]) -> Option<Vec<Vec<String>>> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    if lines.next()? != format!("{INDEX_MAGIC} {key}") {
        return None;
    }
    let mut out = vec![Vec::new(); present.len()];
    for l in lines {
        let (k, name) = l.split_once('\t')?;
        out.get_mut(k.parse::<usize>().ok()?)?
            .push(name.to_string());
    }
    Some(out)
}

fn write_index(path: &Path, key: &str, files: &[Vec<String>]) -> Result<()> {
    let mut text = format!("{INDEX_MAGIC} {key}\n");
    for (k, names) in files.iter().enumerate() {
        for n in names {
            text.push_str(&format!("{k}\t{n}\n"));
        }
    }
    crate::fs::write_atomic(path, text.as_bytes())
}

/// [`open`], with the file list cached in `index_dir` (a run directory) when given: a later
/// open of an unchanged split reads the index instead of walking the folders (keyed by the
/// class folders' modification times, see `index_key`). File names holding a tab or a line
/// break are listed, not cached.
pub fn open_indexed(
    root: &Path,
    split: Split,
    side: usize,
    index_dir: Option<&Path>,
) -> Result<FolderSet> {
    let (dir, classes) = split_dirs(root, split)?;
    let present = subdirs(&dir)?;
    let index = match index_dir {
        Some(d) => Some((index_file(d, split), index_key(&dir, &classes, &present)?)),
        None => None,
    };
    let cached = index
        .as_ref()
        .and_then(|(p, key)| read_index(p, key, &present));
    let hit = cached.is_some();
    let files = match cached {
        Some(f) => f,
        None => present
            .iter()
            .map(|c| names_with_extension(&dir.join(c), &EXTENSIONS))
            .collect::<Result<Vec<_>>>()?,
    };
    let (mut paths, mut labels) = (Vec::new(), Vec::new());
    for (c, names) in present.iter().zip(&files) {
        let Some(k) = classes.iter().position(|x| x == c) else {
            return Err(Error::data(
                dir.join(c),
                format!(
                    "class '{c}' is not among the {} training classes",
                    classes.len()
                ),
            ));
        };
        if names.is_empty() {
            return Err(Error::data(
                dir.join(c),
                "class folder without images (.jpg, .jpeg or .png)",
            ));
        }
        labels.extend(std::iter::repeat_n(k as i64, names.len()));
        paths.extend(names.iter().map(|n| dir.join(c).join(n)));
    }
    if let (false, Some((p, key))) = (hit, &index) {
        let plain = files
            .iter()
            .flatten()
            .all(|n| !n.contains(['\t', '\n', '\r']));
        if plain {
            write_index(p, key, &files)?;
        }
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
    let img = super::image_file::open_rgb(path)?;
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
        Ok(self.decode_labelled(idx, t, None)?.0)
    }

    /// [`FolderSet::decode_batch`] and the labels, with undecodable images replaced from
    /// `subs` (and the batch's position in its order) when given (see
    /// [`super::image_file::decode_or_substitute`]).
    pub fn decode_labelled(
        &self,
        idx: &[i64],
        t: &[Transform],
        subs: Option<(&super::image_file::Substitutes, usize)>,
    ) -> Result<(Vec<u8>, Vec<i64>)> {
        let name = |i: i64| self.paths[i as usize].display().to_string();
        let one = |k: usize, i: i64| {
            let px = decode(&self.paths[i as usize], self.side, t[k])?;
            Ok((px, self.labels[i as usize]))
        };
        let parts = super::image_file::decode_or_substitute(idx, subs, &name, &one)?;
        let mut out = Vec::with_capacity(idx.len() * 3 * self.side * self.side);
        let mut labels = Vec::with_capacity(idx.len());
        for (px, l) in parts {
            out.extend(px);
            labels.push(l);
        }
        Ok((out, labels))
    }
}
