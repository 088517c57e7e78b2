//! Image classification data sets: readers for the MNIST/Fashion-MNIST idx format ([`idx`])
//! and the CIFAR binary layout ([`cifar`]), held in memory (at most ~180 MB, one u8 tensor
//! [N, C, H, W]); ImageNet-style class folders ([`folder`]), of which only the file list is held
//! and images are decoded per batch; per-channel normalisation, seeded augmentation and batch
//! iteration ([`batch`]), decoded ahead on worker threads ([`loader`]); semantic segmentation sets (ADE20K, Pascal VOC) streamed per batch
//! ([`seg`]); the `[dataset]` configuration, split loading and normalisation ([`config`]).
pub mod batch;
pub mod cifar;
pub mod config;
pub mod folder;
pub mod idx;
pub mod image_file;
pub mod loader;
pub mod seg;

pub use batch::{Augment, BatchIter, Rng};
pub use config::{normalization, DatasetConfig, Source};
pub use image_file::BadImages;
pub use loader::{LoaderOptions, Prefetched};

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Which data set a configuration names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    #[serde(rename = "fashion-mnist")]
    FashionMnist,
    Mnist,
    Cifar10,
    Cifar100,
    /// ImageNet-style class folders (`train/<class>/*`, `val/<class>/*`), decoded per batch.
    Imagenet,
    /// ADE20K scene parsing (150 classes), decoded per batch.
    Ade20k,
    /// Pascal VOC 2012 segmentation with the augmented set (21 classes), decoded per batch.
    Voc,
}

/// What a data set's labels are, which decides the loss and the metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// One class per image; metric: top-1 accuracy.
    Classification,
    /// One class per pixel; metric: mIoU.
    Segmentation,
}

impl Task {
    /// The name of the task's headline metric.
    pub fn metric_name(self) -> &'static str {
        match self {
            Task::Classification => "top-1",
            Task::Segmentation => "mIoU",
        }
    }
}

impl DatasetKind {
    /// The default directory of the data set (the Debian `dataset-fashion-mnist` location for
    /// Fashion-MNIST).
    pub fn default_path(self) -> PathBuf {
        PathBuf::from(match self {
            DatasetKind::FashionMnist => "/usr/share/datasets/fashion-mnist",
            DatasetKind::Mnist => "/usr/share/datasets/mnist",
            DatasetKind::Cifar10 => "data/cifar-10-batches-bin",
            DatasetKind::Cifar100 => "data/cifar-100-binary",
            DatasetKind::Imagenet => "data/imagenet",
            DatasetKind::Ade20k => "data/ade/ADEChallengeData2016",
            DatasetKind::Voc => "data/VOCdevkit/VOC2012",
        })
    }

    pub fn task(self) -> Task {
        match self {
            DatasetKind::Ade20k | DatasetKind::Voc => Task::Segmentation,
            _ => Task::Classification,
        }
    }

    /// The segmentation layout, if this is a segmentation set.
    pub fn seg_layout(self) -> Option<seg::Layout> {
        match self {
            DatasetKind::Ade20k => Some(seg::Layout::Ade20k),
            DatasetKind::Voc => Some(seg::Layout::Voc),
            _ => None,
        }
    }

    /// [C, H, W] of one image.
    pub fn image_shape(self) -> [usize; 3] {
        match self {
            DatasetKind::FashionMnist | DatasetKind::Mnist => [1, 28, 28],
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => [3, 32, 32],
            DatasetKind::Imagenet => [3, 224, 224],
            DatasetKind::Ade20k | DatasetKind::Voc => [3, 512, 512],
        }
    }

    pub fn num_classes(self) -> usize {
        match self {
            DatasetKind::Cifar100 => 100,
            DatasetKind::Imagenet => 1000,
            DatasetKind::Ade20k => 150,
            DatasetKind::Voc => 21,
            _ => 10,
        }
    }

    /// The augmentation used for training by default: crop with 4 pixels of padding plus
    /// horizontal flip for CIFAR, random-resized-crop + flip for class folders, none for the
    /// MNIST-style sets.
    pub fn default_augment(self) -> Option<Augment> {
        match self {
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => Some(Augment { pad: 4, flip: true }),
            // Class folders: any augmentation means random-resized-crop + flip (see folder);
            // segmentation sets: random rescale + crop, with `flip` (see seg).
            DatasetKind::Imagenet | DatasetKind::Ade20k | DatasetKind::Voc => {
                Some(Augment { pad: 0, flip: true })
            }
            _ => None,
        }
    }
}

/// Training or test split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// One split of a data set.
#[derive(Debug)]
pub struct Dataset {
    /// u8 [N, C, H, W] on the CPU (empty for a folder set: use [`Dataset::select`]).
    pub images: Tensor,
    /// i64 [N] class indices.
    pub labels: Tensor,
    pub num_classes: usize,
    /// The files of a class-folder set, decoded on demand.
    pub folder: Option<std::sync::Arc<folder::FolderSet>>,
    /// The file pairs of a segmentation set, decoded on demand (`labels` is then empty).
    pub seg: Option<std::sync::Arc<seg::SegSet>>,
    /// Images replaced under `--bad-images substitute` so far (see [`BadImages`]).
    pub substituted: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Dataset {
    /// Builds a data set from raw pixels (channel-major per image) and labels, checking sizes.
    pub fn from_raw(
        pixels: Vec<u8>,
        labels: Vec<u8>,
        shape: [usize; 3],
        num_classes: usize,
        source: &Path,
    ) -> Result<Dataset> {
        let per = shape.iter().product::<usize>();
        let n = labels.len();
        if pixels.len() != n * per {
            return Err(Error::data(
                source,
                format!(
                    "{} labels but {} bytes of pixels (expected {} = {n} x {per})",
                    n,
                    pixels.len(),
                    n * per
                ),
            ));
        }
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= num_classes) {
            return Err(Error::data(
                source,
                format!("label {bad} out of range for {num_classes} classes"),
            ));
        }
        let images = Tensor::from_slice(&pixels).view([
            n as i64,
            shape[0] as i64,
            shape[1] as i64,
            shape[2] as i64,
        ]);
        let labels = Tensor::from_slice(&labels).to_kind(Kind::Int64);
        Ok(Dataset {
            images,
            labels,
            num_classes,
            folder: None,
            seg: None,
            substituted: Default::default(),
        })
    }

    /// A class-folder set (see [`folder::open`]).
    pub fn from_folder(set: folder::FolderSet, num_classes: usize) -> Result<Dataset> {
        if set.classes.len() > num_classes {
            return Err(Error::data(
                set.paths
                    .first()
                    .map(|p| p.as_path())
                    .unwrap_or(Path::new("?")),
                format!(
                    "{} class folders but the configuration has {num_classes} classes",
                    set.classes.len()
                ),
            ));
        }
        Ok(Dataset {
            images: Tensor::zeros([0], (Kind::Uint8, tch::Device::Cpu)),
            labels: Tensor::from_slice(&set.labels),
            num_classes,
            folder: Some(std::sync::Arc::new(set)),
            seg: None,
            substituted: Default::default(),
        })
    }

    /// A segmentation set (see [`seg::open`]).
    pub fn from_seg(set: seg::SegSet) -> Dataset {
        Dataset {
            images: Tensor::zeros([0], (Kind::Uint8, tch::Device::Cpu)),
            labels: Tensor::zeros([0], (Kind::Int64, tch::Device::Cpu)),
            num_classes: set.layout.num_classes(),
            folder: None,
            seg: Some(std::sync::Arc::new(set)),
            substituted: Default::default(),
        }
    }

    pub fn task(&self) -> Task {
        if self.seg.is_some() {
            Task::Segmentation
        } else {
            Task::Classification
        }
    }

    /// Images `idx` as u8 [n, C, H, W] (folder sets: decoded with the evaluation transform;
    /// segmentation sets: with the fixed resize + center crop to the input size).
    pub fn select(&self, idx: &[i64]) -> Result<Tensor> {
        if let Some(s) = &self.seg {
            let t = vec![seg::Transform::Fixed; idx.len()];
            return Ok(s.decode_batch(idx, &t)?.0);
        }
        match &self.folder {
            None => Ok(self.images.index_select(0, &Tensor::from_slice(idx))),
            Some(f) => {
                let t = vec![folder::Transform::Eval; idx.len()];
                self.folder_tensor(f, idx, &t)
            }
        }
    }

    fn folder_tensor(
        &self,
        f: &folder::FolderSet,
        idx: &[i64],
        t: &[folder::Transform],
    ) -> Result<Tensor> {
        let bytes = f.decode_batch(idx, t)?;
        let s = f.side as i64;
        Ok(Tensor::from_slice(&bytes).view([idx.len() as i64, 3, s, s]))
    }

    pub fn len(&self) -> usize {
        match &self.seg {
            Some(s) => s.len(),
            None => self.labels.size()[0] as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// [C, H, W] of one image.
    pub fn image_shape(&self) -> [usize; 3] {
        if let Some(f) = &self.folder {
            return [3, f.side, f.side];
        }
        if let Some(s) = &self.seg {
            let [h, w] = s.transforms.crop;
            return [3, h, w];
        }
        let s = self.images.size();
        [s[1] as usize, s[2] as usize, s[3] as usize]
    }

    /// Keeps the first `n` images (all when `n` is larger).
    /// (For a folder set: `n` images evenly spaced over the sorted list, so every class keeps
    /// its share.)
    pub fn truncate(&mut self, n: usize) {
        if let Some(s) = &self.seg {
            let mut g = (**s).clone();
            g.truncate(n);
            self.seg = Some(std::sync::Arc::new(g));
            return;
        }
        if let Some(f) = &self.folder {
            if n < self.len() {
                let len = self.len();
                let keep: Vec<usize> = (0..n).map(|i| i * len / n).collect();
                let mut g = (**f).clone();
                g.paths = keep.iter().map(|&i| f.paths[i].clone()).collect();
                g.labels = keep.iter().map(|&i| f.labels[i]).collect();
                self.labels = Tensor::from_slice(&g.labels);
                self.folder = Some(std::sync::Arc::new(g));
            }
            return;
        }
        if n < self.len() {
            self.images = self.images.narrow(0, 0, n as i64);
            self.labels = self.labels.narrow(0, 0, n as i64);
        }
    }

    /// Per-channel mean and standard deviation of the pixels scaled to [0, 1].
    pub fn channel_stats(&self) -> Normalize {
        let x = self.images.to_kind(Kind::Double) / 255.0;
        let dims: &[i64] = &[0, 2, 3];
        let mean = x.mean_dim(dims, false, Kind::Double);
        let std = x.std_dim(dims, false, false);
        Normalize {
            mean: Vec::<f64>::try_from(&mean).unwrap_or_default(),
            std: Vec::<f64>::try_from(&std)
                .unwrap_or_default()
                .into_iter()
                .map(|s| s.max(1e-6))
                .collect(),
        }
    }
}

/// Per-channel normalisation: `(x / 255 - mean) / std`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalize {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl Normalize {
    /// Converts a u8 batch [N, C, H, W] to normalised float32. On the CPU this is a lookup
    /// table per channel (made by the same tensor arithmetic, so the values are the same bits),
    /// applied in parallel over the image planes: a loader's worker pool then normalises while
    /// it decodes.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        if x.device() == tch::Device::Cpu && x.kind() == Kind::Uint8 && x.dim() == 4 {
            return self.apply_table(x);
        }
        self.arithmetic(x)
    }

    fn arithmetic(&self, x: &Tensor) -> Tensor {
        let c = self.mean.len() as i64;
        let dev = x.device();
        let mean = Tensor::from_slice(&self.mean)
            .to_kind(Kind::Float)
            .view([1, c, 1, 1])
            .to_device(dev);
        let std = Tensor::from_slice(&self.std)
            .to_kind(Kind::Float)
            .view([1, c, 1, 1])
            .to_device(dev);
        (x.to_kind(Kind::Float) / 255.0 - mean) / std
    }

    fn apply_table(&self, x: &Tensor) -> Tensor {
        use rayon::prelude::*;
        let c = self.mean.len();
        let size = x.size();
        if size[1] as usize != c {
            // Let the arithmetic report the broadcast error.
            return self.arithmetic(x);
        }
        let ramp = Tensor::arange(256, (Kind::Uint8, tch::Device::Cpu))
            .view([1, 1, 1, 256])
            .expand([1, c as i64, 1, 256], false)
            .contiguous();
        let table = Vec::<f32>::try_from(self.arithmetic(&ramp).view([-1])).expect("f32 table");
        let src = Vec::<u8>::try_from(x.contiguous().view([-1])).expect("u8 batch");
        let plane = (size[2] * size[3]).max(1) as usize;
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(plane)
            .zip(src.par_chunks(plane))
            .enumerate()
            .for_each(|(i, (o, s))| {
                let t = &table[(i % c) * 256..][..256];
                for (o, &v) in o.iter_mut().zip(s) {
                    *o = t[v as usize];
                }
            });
        Tensor::from_slice(&out).view(size.as_slice())
    }
}

/// Loads one split of a data set from `dir` (class folders at the kind's default size).
pub fn load(kind: DatasetKind, dir: &Path, split: Split) -> Result<Dataset> {
    load_sized(kind, dir, split, kind.image_shape(), kind.num_classes())
}

/// [`load`] with the configured input (the output size of class-folder images) and class
/// count (segmentation sets: default transforms with the input as crop size).
pub fn load_sized(
    kind: DatasetKind,
    dir: &Path,
    split: Split,
    input: [usize; 3],
    num_classes: usize,
) -> Result<Dataset> {
    let t = seg::SegTransforms {
        crop: [input[1], input[2]],
        test_scale: [2048, 512],
        scale_range: [0.5, 2.0],
        flip: true,
        photometric: true,
        inference: seg::Inference::Whole,
        stride: [(input[1] * 2 / 3).max(1), (input[2] * 2 / 3).max(1)],
        cat_max_ratio: 1.0,
    };
    load_with(kind, dir, split, input, num_classes, t)
}

/// [`load_sized`] with explicit segmentation transforms (ignored for classification sets).
pub fn load_with(
    kind: DatasetKind,
    dir: &Path,
    split: Split,
    input: [usize; 3],
    num_classes: usize,
    seg_t: seg::SegTransforms,
) -> Result<Dataset> {
    load_indexed(kind, dir, split, input, num_classes, seg_t, None)
}

/// [`load_with`], class folders listed through an index cached in `index_dir`
/// ([`folder::open_indexed`]).
pub fn load_indexed(
    kind: DatasetKind,
    dir: &Path,
    split: Split,
    input: [usize; 3],
    num_classes: usize,
    seg_t: seg::SegTransforms,
    index_dir: Option<&Path>,
) -> Result<Dataset> {
    match kind {
        DatasetKind::FashionMnist | DatasetKind::Mnist => idx::load_mnist(dir, split),
        DatasetKind::Cifar10 => cifar::load_cifar10(dir, split),
        DatasetKind::Cifar100 => cifar::load_cifar100(dir, split),
        DatasetKind::Imagenet => {
            if input[0] != 3 || input[1] != input[2] {
                return Err(Error::data(
                    dir,
                    format!("class-folder images are RGB squares; the input {input:?} is not"),
                ));
            }
            let set = folder::open_indexed(dir, split, input[1], index_dir)?;
            Dataset::from_folder(set, num_classes)
        }
        DatasetKind::Ade20k | DatasetKind::Voc => {
            if input[0] != 3 {
                return Err(Error::data(
                    dir,
                    format!("segmentation images are RGB; the input {input:?} is not"),
                ));
            }
            let layout = match kind {
                DatasetKind::Ade20k => seg::Layout::Ade20k,
                _ => seg::Layout::Voc,
            };
            Ok(Dataset::from_seg(seg::open(layout, dir, split, seg_t)?))
        }
    }
}
