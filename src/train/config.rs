//! Training configuration: a TOML file parsed into [`Config`] and validated. Unknown keys and
//! bad values are errors naming the file and the field.
use crate::data::{DatasetConfig, Source, Task};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

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
    /// Training length in passes over the training split (give this or `iterations`).
    #[serde(default)]
    pub epochs: usize,
    /// Training length in optimizer steps (segmentation recipes); the schedule then runs per
    /// iteration (milestones and warm-up in iterations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iterations: Option<usize>,
    /// With `iterations`: checkpoint (and evaluate) every N iterations (default 1000) and at
    /// the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<usize>,
    /// See `accumulate`.
    pub batch_size: usize,
    /// Images per optimizer step over all ranks (the published global batch, e.g. 256 for
    /// 4 GPUs x 64); each rank's micro-batch is `batch_size / (ranks * accumulate)`.
    /// Gradient accumulation: micro-batches per optimizer step on each rank (default 1), so a
    /// step of `batch_size` images fits where one device cannot hold its share at once.
    /// Schedules count optimizer steps.
    #[serde(default = "one_step", skip_serializing_if = "is_one_step")]
    pub accumulate: usize,
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
    /// Knowledge distillation from a teacher network (docs/method.md section 7).
    #[serde(default)]
    pub distill: Option<DistillConfig>,
    /// Segmentation: train the network's auxiliary head (mmseg's `auxiliary_head`, an FCN
    /// head on an intermediate stage; never run at inference) beside the decode head, its
    /// per-pixel cross-entropy added with this weight (published: 0.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aux_loss_weight: Option<f64>,
    /// Before the first step of a fresh run: re-estimate every batch norm's running
    /// statistics on this many shuffled training batches in train mode, weights untouched
    /// (`train::recalibrate_bn`; for block-ReLU fine-tunes, whose spec changes what each layer
    /// sees).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recalibrate_bn: Option<usize>,
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
    /// `min_lr + (lr - min_lr) * (1 - t / T)^power` (mmseg's poly).
    Poly,
    /// `lr` after the warm-up (`min_lr` is not used).
    Constant,
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
    /// Linear warm-up length in iterations (iteration-based runs; 0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub warmup_iterations: usize,
    /// Poly: the exponent (default 0.9).
    #[serde(default = "poly_power", skip_serializing_if = "is_poly_default")]
    pub power: f64,
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

fn one_step() -> usize {
    1
}

fn is_one_step(v: &usize) -> bool {
    *v == 1
}

fn poly_power() -> f64 {
    0.9
}

// Fields added later are left out of the canonical JSON at their defaults, so the hashes of
// older configurations (and the checkpoints and pipeline stages keyed by them) do not change.
fn is_zero(v: &usize) -> bool {
    *v == 0
}

fn is_poly_default(v: &f64) -> bool {
    *v == poly_power()
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
        let bad = |field: &str, msg: String| -> Result<()> {
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
        self.check_shape_and_length(&bad)?;
        self.check_dataset(&bad)?;
        self.check_batches_and_distillation(&bad)?;
        self.check_optimizer_and_schedule(&bad)
    }

    /// Classes, input, and the run length in epochs or iterations.
    fn check_shape_and_length(&self, bad: &dyn Fn(&str, String) -> Result<()>) -> Result<()> {
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
        match (self.epochs, self.iterations) {
            (0, None) => return bad("epochs", "give epochs or iterations (at least 1)".into()),
            (e, Some(_)) if e > 0 => {
                return bad(
                    "iterations",
                    "give either epochs or iterations, not both".into(),
                )
            }
            (_, Some(0)) => return bad("iterations", "must be at least 1".into()),
            _ => {}
        }
        if self.checkpoint_every == Some(0) {
            return bad("checkpoint_every", "must be at least 1".into());
        }
        if self.checkpoint_every.is_some() && self.iterations.is_none() {
            return bad(
                "checkpoint_every",
                "only used with iterations (epoch runs checkpoint every epoch)".into(),
            );
        }
        if self.iterations.is_some() && self.schedule.warmup_epochs > 0 {
            return bad(
                "schedule.warmup_epochs",
                "an iteration-based run warms up in iterations: use warmup_iterations".into(),
            );
        }
        if self.iterations.is_some() && self.schedule.per_iteration {
            return bad(
                "schedule.per_iteration",
                "an iteration-based run already updates the rate every iteration".into(),
            );
        }
        if self.iterations.is_none() && self.schedule.warmup_iterations > 0 {
            return bad(
                "schedule.warmup_iterations",
                "only used with iterations (use warmup_epochs)".into(),
            );
        }
        Ok(())
    }

    /// The segmentation-only `[dataset]` fields.
    fn check_dataset(&self, bad: &dyn Fn(&str, String) -> Result<()>) -> Result<()> {
        let d = &self.dataset;
        if let Err((field, msg)) = d.check_normalization(self.input[0]) {
            return bad(&field, msg);
        }
        let seg = d.kind.task() == Task::Segmentation;
        for (field, given) in [
            ("dataset.test_scale", d.test_scale.is_some()),
            ("dataset.scale_range", d.scale_range.is_some()),
            ("dataset.photometric", d.photometric.is_some()),
            ("dataset.inference", d.inference.is_some()),
            ("dataset.slide_stride", d.slide_stride.is_some()),
            ("dataset.cat_max_ratio", d.cat_max_ratio.is_some()),
        ] {
            if given && !seg {
                return bad(
                    field,
                    "only used by segmentation data sets (ade20k, voc)".into(),
                );
            }
        }
        if seg {
            if d.augment.is_some_and(|a| a.pad > 0) {
                return bad(
                    "dataset.augment.pad",
                    "segmentation sets crop with padding to the ignore label; use pad = 0".into(),
                );
            }
            if let Some(s) = d.test_scale {
                if s[0] == 0 || s[1] == 0 || s[0] < s[1] {
                    return bad(
                        "dataset.test_scale",
                        format!("{s:?} must be [long, short] with long >= short > 0"),
                    );
                }
            }
            if let Some([lo, hi]) = d.scale_range {
                if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi) {
                    return bad(
                        "dataset.scale_range",
                        format!("[{lo}, {hi}] must satisfy 0 < low <= high"),
                    );
                }
            }
            if let Some(r) = d.cat_max_ratio {
                if !(r > 0.0 && r <= 1.0) {
                    return bad(
                        "dataset.cat_max_ratio",
                        format!("{r} must be a fraction in (0, 1]"),
                    );
                }
            }
            if let Some(s) = d.slide_stride {
                if s.contains(&0) || s[0] > self.input[1] || s[1] > self.input[2] {
                    return bad(
                        "dataset.slide_stride",
                        format!(
                            "{s:?} must be positive and at most the window (input) {:?}",
                            &self.input[1..]
                        ),
                    );
                }
            }
        }
        if self.recalibrate_bn == Some(0) {
            return bad(
                "recalibrate_bn",
                "the number of batches must be at least 1 (leave it out for none)".into(),
            );
        }
        if let Some(w) = self.aux_loss_weight {
            if !seg {
                return bad(
                    "aux_loss_weight",
                    "the auxiliary loss is per pixel: only segmentation data sets (ade20k, voc)"
                        .into(),
                );
            }
            if !(w.is_finite() && w > 0.0) {
                return bad("aux_loss_weight", format!("{w} must be a number > 0"));
            }
            let arch = crate::models::find(&self.model)?;
            let cfg = crate::models::ArchConfig {
                input: self.input,
                num_classes: self.num_classes,
            };
            if crate::models::build_graph(arch, &cfg)?.aux.is_none() {
                return bad(
                    "aux_loss_weight",
                    format!("{} has no auxiliary head", self.model),
                );
            }
        }
        Ok(())
    }

    /// Batch sizes, distillation and the split caps.
    fn check_batches_and_distillation(
        &self,
        bad: &dyn Fn(&str, String) -> Result<()>,
    ) -> Result<()> {
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1".into());
        }
        if self.accumulate == 0 {
            return bad(
                "accumulate",
                "must be at least 1 (micro-batches per step)".into(),
            );
        }
        if !self.batch_size.is_multiple_of(self.accumulate) {
            return bad(
                "batch_size",
                format!(
                    "{} is one optimizer step's images and must be a multiple of accumulate \
                     ({}), the micro-batches it is split into",
                    self.batch_size, self.accumulate
                ),
            );
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
        Ok(())
    }

    /// The learning rate and its schedule.
    fn check_optimizer_and_schedule(&self, bad: &dyn Fn(&str, String) -> Result<()>) -> Result<()> {
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
        if s.kind != ScheduleKind::Step && !s.milestones.is_empty() {
            return bad("schedule.milestones", "only used by kind = \"step\"".into());
        }
        if !(s.power.is_finite() && s.power > 0.0) {
            return bad("schedule.power", format!("{} must be positive", s.power));
        }
        Ok(())
    }

    /// The data set at this configuration's input, class count and split caps.
    pub fn source(&self) -> Source<'_> {
        Source {
            dataset: &self.dataset,
            input: self.input,
            num_classes: self.num_classes,
            train_limit: self.train_limit,
            test_limit: self.test_limit,
        }
    }

    /// The task implied by the data set.
    pub fn task(&self) -> Task {
        self.dataset.kind.task()
    }

    /// A hash of everything that shapes the run except `epochs` (so a finished run can be
    /// extended; likewise the count of `iterations`), as 16 hex digits (FNV-1a 64 over the
    /// canonical JSON).
    pub fn hash(&self) -> String {
        let mut c = self.clone();
        c.epochs = 0;
        c.iterations = c.iterations.map(|_| 0);
        crate::hash::of_json(&c)
    }
}
