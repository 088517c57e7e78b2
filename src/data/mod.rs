//! Image classification data sets held in memory: readers for the MNIST/Fashion-MNIST idx
//! format ([`idx`]) and the CIFAR binary layout ([`cifar`]), per-channel normalisation, seeded
//! augmentation and batch iteration ([`batch`]). These sets are small (at most ~180 MB), so
//! images stay as one u8 tensor [N, C, H, W] and are converted to float per batch.
pub mod batch;
pub mod cifar;
pub mod idx;

pub use batch::{Augment, BatchIter, Rng};

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
    /// ImageNet-style class folders: accepted in configs, not implemented yet.
    Imagenet,
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
        })
    }

    /// [C, H, W] of one image.
    pub fn image_shape(self) -> [usize; 3] {
        match self {
            DatasetKind::FashionMnist | DatasetKind::Mnist => [1, 28, 28],
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => [3, 32, 32],
            DatasetKind::Imagenet => [3, 224, 224],
        }
    }

    pub fn num_classes(self) -> usize {
        match self {
            DatasetKind::Cifar100 => 100,
            DatasetKind::Imagenet => 1000,
            _ => 10,
        }
    }

    /// The augmentation used for training by default: crop with 4 pixels of padding plus
    /// horizontal flip for CIFAR, none for the MNIST-style sets.
    pub fn default_augment(self) -> Option<Augment> {
        match self {
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => Some(Augment { pad: 4, flip: true }),
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

/// One split of a data set in memory.
#[derive(Debug)]
pub struct Dataset {
    /// u8 [N, C, H, W] on the CPU.
    pub images: Tensor,
    /// i64 [N] class indices.
    pub labels: Tensor,
    pub num_classes: usize,
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
        })
    }

    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// [C, H, W] of one image.
    pub fn image_shape(&self) -> [usize; 3] {
        let s = self.images.size();
        [s[1] as usize, s[2] as usize, s[3] as usize]
    }

    /// Keeps the first `n` images (all when `n` is larger).
    pub fn truncate(&mut self, n: usize) {
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
    /// Converts a u8 batch [N, C, H, W] to normalised float32.
    pub fn apply(&self, x: &Tensor) -> Tensor {
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
}

/// Loads one split of a data set from `dir`.
pub fn load(kind: DatasetKind, dir: &Path, split: Split) -> Result<Dataset> {
    match kind {
        DatasetKind::FashionMnist | DatasetKind::Mnist => idx::load_mnist(dir, split),
        DatasetKind::Cifar10 => cifar::load_cifar10(dir, split),
        DatasetKind::Cifar100 => cifar::load_cifar100(dir, split),
        DatasetKind::Imagenet => Err(Error::NotImplemented(format!(
            "ImageNet class folders ({}): only fashion-mnist, mnist, cifar10 and cifar100 \
             can be loaded so far",
            dir.display()
        ))),
    }
}
