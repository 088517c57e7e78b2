//! The `[dataset]` table of a configuration, and [`Source`]: what loading a split needs
//! besides it (the network's input size and class count, the split caps).
use super::seg::{Inference, SegTransforms};
use super::{Augment, Dataset, DatasetKind, Normalize, Split};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    pub kind: DatasetKind,
    /// Directory of the data files (default: the kind's usual location).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Training augmentation (default: crop with padding 4 + flip for CIFAR, none otherwise;
    /// segmentation sets use only `flip`).
    #[serde(default)]
    pub augment: Option<Augment>,
    /// Segmentation: (long, short) bounds the images are rescaled to fit, keeping their aspect
    /// ratio (default [2048, 512], the published test scale of ADE20K and VOC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_scale: Option<[usize; 2]>,
    /// Segmentation: training rescale ratio range relative to `test_scale` (default
    /// [0.5, 2.0]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_range: Option<[f64; 2]>,
    /// Segmentation: photometric jitter in training (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub photometric: Option<bool>,
    /// Segmentation: "whole" (default) or "slide" inference in evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference: Option<Inference>,
    /// Segmentation: [H, W] stride of the sliding windows (default 2/3 of the input, 341 for
    /// 512).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slide_stride: Option<[usize; 2]>,
    /// Segmentation: redraw a training crop (up to 10 draws) while one class covers this
    /// fraction or more of its labelled pixels (mmseg's `cat_max_ratio`; default 1: no redraw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cat_max_ratio: Option<f64>,
    /// Per-channel mean subtracted from the [0, 1] pixels (default: the kind's published
    /// training-set statistics); one value per input channel, or one for all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<Vec<f64>>,
    /// Per-channel standard deviation the pixels are divided by (default: the kind's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std: Option<Vec<f64>>,
}

impl DatasetConfig {
    pub fn dir(&self) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| self.kind.default_path())
    }

    /// The segmentation transforms for an input of `[C, H, W]`.
    pub fn seg_transforms(&self, input: [usize; 3]) -> SegTransforms {
        SegTransforms {
            crop: [input[1], input[2]],
            test_scale: self.test_scale.unwrap_or([2048, 512]),
            scale_range: self.scale_range.unwrap_or([0.5, 2.0]),
            flip: self
                .augment
                .or(self.kind.default_augment())
                .is_some_and(|a| a.flip),
            photometric: self.photometric.unwrap_or(true),
            inference: self.inference.unwrap_or(Inference::Whole),
            stride: self
                .slide_stride
                .unwrap_or([(input[1] * 2 / 3).max(1), (input[2] * 2 / 3).max(1)]),
            cat_max_ratio: self.cat_max_ratio.unwrap_or(1.0),
        }
    }

    /// The normalisation of this data set: `mean` / `std` when configured, else the kind's
    /// published statistics. Training, evaluation, distortion and secure inference all use it.
    pub fn normalization(&self) -> Normalize {
        let d = normalization(self.kind);
        Normalize {
            mean: self.mean.clone().unwrap_or(d.mean),
            std: self.std.clone().unwrap_or(d.std),
        }
    }

    /// Why `mean` / `std` do not fit an input of `channels` channels, with the field's name.
    pub fn check_normalization(
        &self,
        channels: usize,
    ) -> std::result::Result<(), (String, String)> {
        for (field, v, positive) in [("mean", &self.mean, false), ("std", &self.std, true)] {
            let Some(v) = v else { continue };
            let field = format!("dataset.{field}");
            if v.len() != channels && v.len() != 1 {
                return Err((
                    field,
                    format!(
                        "{} values for {channels} input channels (give {channels} or 1)",
                        v.len()
                    ),
                ));
            }
            if let Some(x) = v
                .iter()
                .find(|x| !x.is_finite() || (positive && **x <= 0.0))
            {
                let need = if positive { "positive" } else { "finite" };
                return Err((field, format!("{x} is not {need}")));
            }
        }
        Ok(())
    }

    pub fn augmentation(&self) -> Option<Augment> {
        self.augment
            .or_else(|| self.kind.default_augment())
            .filter(|a| a.pad > 0 || a.flip)
    }
}

/// A data set as a network sees it: the configured set at the network's input size and class
/// count, each split optionally capped. A training configuration holds these fields at its top
/// level (`train::Config::source`); distortion extraction and evaluation need only these.
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    pub dataset: &'a DatasetConfig,
    /// [C, H, W] of the network input.
    pub input: [usize; 3],
    pub num_classes: usize,
    /// Use only the first N training images.
    pub train_limit: Option<usize>,
    /// Use only the first N test images.
    pub test_limit: Option<usize>,
}

impl Source<'_> {
    /// Loads a split of the configured data set, capped by `train_limit` / `test_limit`, and
    /// checks the image size against the configured input.
    pub fn load_split(&self, split: Split) -> Result<Dataset> {
        self.load_split_indexed(split, None)
    }

    /// [`Source::load_split`], class folders listed through an index cached in `index_dir`
    /// (a run directory).
    pub fn load_split_indexed(&self, split: Split, index_dir: Option<&Path>) -> Result<Dataset> {
        let dir = self.dataset.dir();
        let mut d = super::load_indexed(
            self.dataset.kind,
            &dir,
            split,
            self.input,
            self.num_classes,
            self.dataset.seg_transforms(self.input),
            index_dir,
        )?;
        let limit = match split {
            Split::Train => self.train_limit,
            Split::Test => self.test_limit,
        };
        if let Some(n) = limit {
            d.truncate(n);
        }
        if d.image_shape() != self.input {
            return Err(Error::data(
                &dir,
                format!(
                    "images are {:?} but the configuration's input is {:?}",
                    d.image_shape(),
                    self.input
                ),
            ));
        }
        Ok(d)
    }

    /// The normalisation of this data set.
    pub fn normalization(&self) -> Normalize {
        self.dataset.normalization()
    }
}

/// The default normalisation of a data set kind: the published per-channel training-set
/// statistics (so evaluation needs no pass over the training set).
pub fn normalization(kind: DatasetKind) -> Normalize {
    let (mean, std): (&[f64], &[f64]) = match kind {
        DatasetKind::Mnist => (&[0.1307], &[0.3081]),
        DatasetKind::FashionMnist => (&[0.2860], &[0.3530]),
        DatasetKind::Cifar10 => (&[0.4914, 0.4822, 0.4465], &[0.2470, 0.2435, 0.2616]),
        DatasetKind::Cifar100 => (&[0.5071, 0.4865, 0.4409], &[0.2673, 0.2564, 0.2762]),
        // mmseg normalises ADE20K and VOC with the ImageNet statistics as well.
        DatasetKind::Imagenet | DatasetKind::Ade20k | DatasetKind::Voc => {
            (&[0.485, 0.456, 0.406], &[0.229, 0.224, 0.225])
        }
    };
    Normalize {
        mean: mean.to_vec(),
        std: std.to_vec(),
    }
}
