//! The pipeline configuration: a TOML file naming the baseline and fine-tune training
//! configurations (paths relative to it), the budget sweep, and the extraction and secure
//! inference settings.
use crate::distortion::{Estimator, Settings};
use crate::error::{Error, Result};
use crate::ops::DeviceChoice;
use crate::train::Config;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Local search from each knapsack spec (`brelu refine`), as the extra method `refine`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RefineSettings {
    /// Moves tried per budget; 0 (the default) leaves the method out.
    #[serde(default)]
    pub steps: usize,
    /// Training samples the moves are judged on (default 256), held out from the tables'
    /// samples (the next ones in their seeded order).
    #[serde(default)]
    pub samples: Option<usize>,
    /// Seed of the proposed moves.
    #[serde(default)]
    pub seed: u64,
}

/// The iterative knapsack (`brelu iterate`) at every budget, as the extra method `iterative`.
/// Its rounds re-measure with the `[distortion]` settings.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IterativeSettings {
    /// Re-extractions per budget; 0 (the default) leaves the method out.
    #[serde(default)]
    pub rounds: usize,
    /// Shrinking schedule: start from the knapsack at this multiple of each budget and lower
    /// it geometrically to the budget over the rounds; 1 (the default) keeps every round at
    /// the budget.
    #[serde(default = "one")]
    pub start: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for IterativeSettings {
    fn default() -> Self {
        IterativeSettings {
            rounds: 0,
            start: one(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SecureSettings {
    /// Test images run under secure inference per spec (0: skip the stage).
    #[serde(default = "two")]
    pub images: usize,
}

fn two() -> usize {
    2
}

impl Default for SecureSettings {
    fn default() -> Self {
        SecureSettings { images: two() }
    }
}

/// The file as written.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct File {
    /// Training configuration of the baseline network (model, data set, recipe).
    train: PathBuf,
    /// Training configuration of the block-ReLU fine-tuning (same model and data set).
    finetune: PathBuf,
    /// Start from these trained weights instead of training the baseline.
    #[serde(default)]
    weights: Option<PathBuf>,
    /// DReLU budgets as fractions of the ReLU count.
    #[serde(default)]
    ratios: Vec<f64>,
    /// DReLU budgets as absolute counts.
    #[serde(default)]
    budgets: Vec<u64>,
    /// Also fine-tune the two uniform baselines at every budget.
    #[serde(default = "yes")]
    baselines: bool,
    #[serde(default)]
    distortion: Settings,
    #[serde(default)]
    refine: RefineSettings,
    #[serde(default)]
    iterative: IterativeSettings,
    /// Add the method `bytes`: at every budget, the knapsack on bytes (each option costs what
    /// brelu's engine sends for it) within the bytes of the DReLU knapsack's spec, so the two
    /// compare at equal ReLU-layer bytes.
    #[serde(default)]
    bytes: bool,
    #[serde(default)]
    secure: SecureSettings,
    /// Where every stage computes: cpu (default), cuda (under a launcher: each rank's GPU)
    /// or cuda:N; `brelu pipeline --device` overrides it. Secure inference stays on the CPU.
    #[serde(default)]
    device: Option<DeviceChoice>,
    /// A training image that cannot be decoded: "error" (default: stop, naming the file) or
    /// "substitute" (replace and count it, `brelu train --bad-images`). Not part of the stage
    /// hashes: a stage that finished under "error" met no bad image, so it is what
    /// "substitute" gives too.
    #[serde(default)]
    bad_images: crate::data::BadImages,
}

fn yes() -> bool {
    true
}

/// A loaded, checked pipeline configuration.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub path: PathBuf,
    pub train_path: PathBuf,
    pub finetune_path: PathBuf,
    pub train_config: Config,
    pub finetune_config: Config,
    pub weights: Option<PathBuf>,
    pub ratios: Vec<f64>,
    pub budgets: Vec<u64>,
    pub baselines: bool,
    pub distortion: Settings,
    pub refine: RefineSettings,
    pub iterative: IterativeSettings,
    /// See `File::bytes`.
    pub bytes: bool,
    pub secure: SecureSettings,
    /// The file's `device` (the CLI resolves it into `device` and `group`).
    pub device_setting: Option<DeviceChoice>,
    /// See `File::bad_images`.
    pub bad_images: crate::data::BadImages,
    /// Show progress (set by the CLI on rank 0; see [`crate::progress`]).
    pub progress: bool,
    /// Where the stages compute (set by the CLI; default the CPU).
    pub device: tch::Device,
    /// Under a launcher, the process group every stage runs over (set by the CLI).
    pub group: Option<std::rc::Rc<crate::dist::Group>>,
}

impl PipelineConfig {
    pub fn load(path: &Path) -> Result<PipelineConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let f: File = toml::from_str(&text).map_err(|e| Error::parse(path, e.to_string()))?;
        let bad = |field: &str, msg: String| Error::Config {
            path: path.to_path_buf(),
            field: field.into(),
            msg,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let (train_path, finetune_path) = (rel(&f.train), rel(&f.finetune));
        let train_config = Config::load(&train_path)?;
        let finetune_config = Config::load(&finetune_path)?;
        if (
            &train_config.model,
            train_config.input,
            &train_config.dataset.kind,
        ) != (
            &finetune_config.model,
            finetune_config.input,
            &finetune_config.dataset.kind,
        ) {
            return Err(bad(
                "finetune",
                format!(
                    "{} must use the same model, input and data set as {}",
                    finetune_path.display(),
                    train_path.display()
                ),
            ));
        }
        if f.ratios.is_empty() && f.budgets.is_empty() {
            return Err(bad(
                "ratios",
                "give at least one budget (ratios or budgets)".into(),
            ));
        }
        if let Some(q) = f
            .ratios
            .iter()
            .find(|q| !(q.is_finite() && **q > 0.0 && **q <= 1.0))
        {
            return Err(bad("ratios", format!("{q} is not a fraction in (0, 1]")));
        }
        if let Some(k) = f.distortion.zero_field() {
            return Err(bad(&format!("distortion.{k}"), "must be at least 1".into()));
        }
        if !(f.iterative.start.is_finite() && f.iterative.start >= 1.0) {
            return Err(bad(
                "iterative.start",
                format!(
                    "{} must be a multiple of the budget, at least 1",
                    f.iterative.start
                ),
            ));
        }
        if f.iterative.rounds > 0 && f.distortion.estimator == Estimator::Snr {
            return Err(bad(
                "iterative.rounds",
                "the iterative knapsack re-measures against the network's output: set \
                 distortion.estimator to exact or first-order"
                    .into(),
            ));
        }
        let weights = f.weights.as_deref().map(rel);
        if let Some(w) = &weights {
            if !w.exists() {
                return Err(bad("weights", format!("{} does not exist", w.display())));
            }
        }
        Ok(PipelineConfig {
            path: path.to_path_buf(),
            train_path,
            finetune_path,
            train_config,
            finetune_config,
            weights,
            ratios: f.ratios,
            budgets: f.budgets,
            baselines: f.baselines,
            distortion: f.distortion,
            refine: f.refine,
            iterative: f.iterative,
            bytes: f.bytes,
            secure: f.secure,
            device_setting: f.device,
            bad_images: f.bad_images,
            progress: false,
            device: tch::Device::Cpu,
            group: None,
        })
    }

    /// Hash of the given starting weights (None when the baseline is trained).
    pub fn weights_hash(&self) -> Result<Option<String>> {
        match &self.weights {
            Some(w) => crate::hash::file_hex(w).map(Some),
            None => Ok(None),
        }
    }
}
