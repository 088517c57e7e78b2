//! One description of an experiment: which network (architecture, input, classes), trained on
//! which data set with which normalisation, with which weights and block-ReLU spec, on which
//! device. Every command and pipeline stage builds its model and test images through it, so
//! "build, load weights, apply the spec, place it" is written once.
use crate::data::{Dataset, Normalize, Split};
use crate::error::{Error, Result};
use crate::models::{find, ArchConfig, Model};
pub use crate::ops::DeviceChoice;
use crate::spec::Spec;
use crate::train;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Test images as the secure engine takes them: one flat, normalised vector per image, and
/// the labels of a classification set.
pub struct TestImages {
    pub images: Vec<Vec<f32>>,
    /// `None` for segmentation sets (masks, not one label per image) and random inputs.
    pub labels: Option<Vec<usize>>,
}

/// The network, its data, weights, spec and device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Experiment {
    /// Architecture name (see `brelu models`).
    pub model: String,
    /// [C, H, W] of the network input.
    pub input: [usize; 3],
    pub classes: usize,
    /// Seed of a fresh initialisation (the weights replace it).
    pub seed: u64,
    /// The training configuration naming the data set and its normalisation (absent: a
    /// network without data, e.g. secure inference on random inputs).
    pub data: Option<train::Config>,
    /// Weights (safetensors); absent: the seeded fresh initialisation.
    pub weights: Option<PathBuf>,
    /// Block-ReLU spec applied to the model (absent: ordinary ReLU everywhere).
    pub spec: Option<PathBuf>,
    pub device: DeviceChoice,
}

impl Experiment {
    /// The experiment of a training configuration: its model, input, classes, seed and data.
    pub fn of_config(cfg: &train::Config) -> Experiment {
        Experiment {
            model: cfg.model.clone(),
            input: cfg.input,
            classes: cfg.num_classes,
            seed: cfg.seed,
            data: Some(cfg.clone()),
            weights: None,
            spec: None,
            device: DeviceChoice::Cpu,
        }
    }

    /// An architecture at its own (or the given) input size and class count, without data.
    pub fn of_model(
        name: &str,
        input: Option<[usize; 3]>,
        classes: Option<usize>,
    ) -> Result<Experiment> {
        let arch = find(name)?;
        Ok(Experiment {
            model: arch.name().to_string(),
            input: input.unwrap_or_else(|| arch.default_input()),
            classes: classes.unwrap_or_else(|| arch.default_classes()),
            seed: 0,
            data: None,
            weights: None,
            spec: None,
            device: DeviceChoice::Cpu,
        })
    }

    pub fn with_weights(mut self, weights: Option<&Path>) -> Experiment {
        self.weights = weights.map(Path::to_path_buf);
        self
    }

    pub fn with_spec(mut self, spec: Option<&Path>) -> Experiment {
        self.spec = spec.map(Path::to_path_buf);
        self
    }

    pub fn with_device(mut self, device: DeviceChoice) -> Experiment {
        self.device = device;
        self
    }

    /// The training configuration, or an error naming what needs one.
    pub fn data(&self) -> Result<&train::Config> {
        self.data.as_ref().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: no data configuration given (--data / --config)",
                self.model
            ))
        })
    }

    /// The model on the experiment's device (outside a launcher: [`DeviceChoice::resolve`]).
    pub fn load_model(&self) -> Result<Model> {
        self.model_on(self.device.resolve(None)?)
    }

    /// The model on `device`: seeded initialisation, the weights, then the spec (checked
    /// against the model's sites; the error names the file).
    pub fn model_on(&self, device: Device) -> Result<Model> {
        let mut m = self.model_with(device, None)?;
        if let Some(s) = self.load_spec(&m)? {
            m.apply_spec(&s)?;
        }
        Ok(m)
    }

    /// The model on `device` with the weights and, instead of the experiment's spec file, the
    /// spec given (the pipeline's specs live in memory).
    pub fn model_with(&self, device: Device, spec: Option<&Spec>) -> Result<Model> {
        tch::manual_seed(self.seed as i64);
        let mut m = Model::new(
            find(&self.model)?,
            ArchConfig {
                input: self.input,
                num_classes: self.classes,
            },
            device,
        )?;
        if let Some(w) = &self.weights {
            m.load_weights(w)?;
        }
        if let Some(s) = spec {
            m.apply_spec(s)?;
        }
        Ok(m)
    }

    /// The experiment's spec, read and checked against `model`'s sites.
    pub fn load_spec(&self, model: &Model) -> Result<Option<Spec>> {
        self.spec
            .as_deref()
            .map(|p| Spec::load(p, model.name(), model.config().input, model.sites()))
            .transpose()
    }

    /// The first `n` test images, normalised, one flat vector each, with their labels; without
    /// a data configuration `n` seeded standard-normal inputs.
    pub fn test_images(&self, n: usize) -> Result<TestImages> {
        let Some(cfg) = &self.data else {
            tch::manual_seed(self.seed as i64);
            let [c, h, w] = self.input.map(|d| d as i64);
            let x = Tensor::randn([n as i64, c, h, w], (Kind::Float, Device::Cpu));
            return Ok(TestImages {
                images: flat_images(&x)?,
                labels: None,
            });
        };
        let test = cfg.source().load_split(Split::Test)?;
        TestImages::of(&test, &cfg.dataset.normalization(), n)
    }
}

impl TestImages {
    /// The first `n` images of `test` (all when fewer), normalised. Segmentation images come
    /// at the input size (the fixed transform) and without per-image labels.
    pub fn of(test: &Dataset, norm: &Normalize, n: usize) -> Result<TestImages> {
        let first: Vec<i64> = (0..n.min(test.len()) as i64).collect();
        let x = norm.apply(&test.select(&first)?);
        let labels = match test.seg {
            Some(_) => None,
            None => Some(
                Vec::<i64>::try_from(test.labels.narrow(0, 0, first.len() as i64))?
                    .into_iter()
                    .map(|l| l as usize)
                    .collect(),
            ),
        };
        Ok(TestImages {
            images: flat_images(&x)?,
            labels,
        })
    }
}

/// One flat vector per image of an [N, ...] batch.
pub fn flat_images(x: &Tensor) -> Result<Vec<Vec<f32>>> {
    (0..x.size()[0])
        .map(|i| Ok(Vec::<f32>::try_from(x.get(i).flatten(0, -1))?))
        .collect()
}
