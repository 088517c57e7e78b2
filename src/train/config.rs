//! Training configuration: a TOML file parsed into [`Config`] and validated. Unknown keys and
//! bad values are errors naming the file and the field.
use crate::data::{Augment, DatasetKind};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Architecture name (see `brelu models`).
    pub model: String,
    pub num_classes: usize,
    /// [C, H, W] of the network input.
    pub input: [usize; 3],
    pub dataset: DatasetConfig,
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleConfig,
    pub epochs: usize,
    pub batch_size: usize,
    #[serde(default)]
    pub seed: u64,
    /// Use only the first N training images (quick runs).
    #[serde(default)]
    pub train_limit: Option<usize>,
    /// Use only the first N test images.
    #[serde(default)]
    pub test_limit: Option<usize>,
    /// Evaluation batch size (default: batch_size).
    #[serde(default)]
    pub eval_batch_size: Option<usize>,
    /// Knowledge distillation from a teacher network (SPEC.md section 7).
    #[serde(default)]
    pub distill: Option<DistillConfig>,
}

/// loss = cross-entropy + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)).
/// The teacher's weights come from the command line (`brelu finetune --teacher`, by default
/// the starting weights: the original network).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    #[serde(default = "one")]
    pub alpha: f64,
    #[serde(default = "four")]
    pub temperature: f64,
}

fn four() -> f64 {
    4.0
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    pub kind: DatasetKind,
    /// Directory of the data files (default: the kind's usual location).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Training augmentation (default: crop with padding 4 + flip for CIFAR, none otherwise).
    #[serde(default)]
    pub augment: Option<Augment>,
}

impl DatasetConfig {
    pub fn dir(&self) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| self.kind.default_path())
    }

    pub fn augmentation(&self) -> Option<Augment> {
        self.augment
            .or_else(|| self.kind.default_augment())
            .filter(|a| a.pad > 0 || a.flip)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    pub lr: f64,
    #[serde(default)]
    pub momentum: f64,
    #[serde(default)]
    pub weight_decay: f64,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Step,
    Cosine,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub kind: ScheduleKind,
    /// Step: epochs at which the rate is multiplied by `gamma`.
    #[serde(default)]
    pub milestones: Vec<usize>,
    #[serde(default = "one")]
    pub gamma: f64,
    /// Floor of the decayed rate (not applied during warm-up).
    #[serde(default)]
    pub min_lr: f64,
    /// Linear warm-up length in epochs (0: none).
    #[serde(default)]
    pub warmup_epochs: usize,
    /// Warm-up starts at this fraction of the rate.
    #[serde(default = "warmup_default")]
    pub warmup_start: f64,
    /// Update the rate before every batch (smooth warm-up and cosine) instead of once per
    /// epoch.
    #[serde(default)]
    pub per_iteration: bool,
}

fn one() -> f64 {
    1.0
}

fn warmup_default() -> f64 {
    0.01
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, path)
    }

    /// Parses and validates TOML text; `path` names the source in errors.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Config> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            Error::parse(
                path,
                format!("invalid configuration: {}", e.to_string().trim()),
            )
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks value ranges; errors name `path` and the field.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, msg: String| {
            Err(Error::Config {
                path: path.to_path_buf(),
                field: field.to_string(),
                msg,
            })
        };
        crate::models::find(&self.model).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            field: "model".into(),
            msg: e.to_string(),
        })?;
        if self.num_classes == 0 {
            return bad("num_classes", "must be positive".into());
        }
        if self.num_classes != self.dataset.kind.num_classes() {
            return bad(
                "num_classes",
                format!(
                    "{} but the data set has {} classes",
                    self.num_classes,
                    self.dataset.kind.num_classes()
                ),
            );
        }
        if self.input.contains(&0) {
            return bad("input", format!("{:?} must be positive", self.input));
        }
        if self.input[0] != self.dataset.kind.image_shape()[0] {
            return bad(
                "input",
                format!(
                    "{} channels but the data set's images have {}",
                    self.input[0],
                    self.dataset.kind.image_shape()[0]
                ),
            );
        }
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1".into());
        }
        if let Some(d) = &self.distill {
            if !(d.alpha.is_finite() && d.alpha >= 0.0) {
                return bad(
                    "distill.alpha",
                    format!("{} must be a number >= 0", d.alpha),
                );
            }
            if !(d.temperature.is_finite() && d.temperature > 0.0) {
                return bad(
                    "distill.temperature",
                    format!("{} must be a number > 0", d.temperature),
                );
            }
        }
        if self.eval_batch_size == Some(0) {
            return bad("eval_batch_size", "must be at least 1".into());
        }
        if self.train_limit == Some(0) {
            return bad("train_limit", "must be at least 1".into());
        }
        if self.test_limit == Some(0) {
            return bad("test_limit", "must be at least 1".into());
        }
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return bad("optimizer.lr", format!("{} must be positive", o.lr));
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return bad(
                "optimizer.momentum",
                format!("{} must be in [0, 1)", o.momentum),
            );
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return bad(
                "optimizer.weight_decay",
                format!("{} must be >= 0", o.weight_decay),
            );
        }
        let s = &self.schedule;
        if !(s.gamma > 0.0 && s.gamma <= 1.0) {
            return bad("schedule.gamma", format!("{} must be in (0, 1]", s.gamma));
        }
        if !(s.min_lr >= 0.0 && s.min_lr <= o.lr) {
            return bad(
                "schedule.min_lr",
                format!("{} must be in [0, lr = {}]", s.min_lr, o.lr),
            );
        }
        if !(s.warmup_start > 0.0 && s.warmup_start <= 1.0) {
            return bad(
                "schedule.warmup_start",
                format!("{} must be in (0, 1]", s.warmup_start),
            );
        }
        if s.milestones.windows(2).any(|w| w[0] >= w[1]) {
            return bad(
                "schedule.milestones",
                format!("{:?} must be strictly increasing", s.milestones),
            );
        }
        if s.kind == ScheduleKind::Cosine && !s.milestones.is_empty() {
            return bad("schedule.milestones", "only used by kind = \"step\"".into());
        }
        Ok(())
    }

    /// A hash of everything that shapes the run except `epochs` (so a finished run can be
    /// extended), as 16 hex digits (FNV-1a 64 over the canonical JSON).
    pub fn hash(&self) -> String {
        let mut c = self.clone();
        c.epochs = 0;
        crate::hash::fnv_hex(serde_json::to_vec(&c).expect("config serialises"))
    }
}
