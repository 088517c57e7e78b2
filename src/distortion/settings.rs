//! How distortion is measured: the one settings type of `brelu distortion extract`,
//! `brelu iterate` and the pipeline's `[distortion]` table, with one set of defaults.
use super::{Estimator, PlanOptions};
use crate::data::Task;
use crate::train::Config;
use serde::{Deserialize, Serialize};

/// The estimator, the samples and how the work is cut. The field order is the pipeline's
/// stage hash (a run directory keeps its finished extraction).
#[derive(clap::Args, Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// exact (network output), snr (block output over its power) or first-order (gradient
    /// probes; about 100x faster and, for classification up to 128 classes, exact to first
    /// order: the estimator study in BENCHMARKS.md chose it).
    #[arg(long, default_value_t = Estimator::FirstOrder)]
    #[serde(default = "first_order")]
    pub estimator: Estimator,
    /// Number of samples (a seeded subset of the training split, evaluation transform).
    #[arg(long, default_value_t = SAMPLES)]
    #[serde(default = "samples")]
    pub samples: usize,
    /// Samples per unit of work (and per forward pass).
    #[arg(long, default_value_t = BATCH)]
    #[serde(default = "batch")]
    pub batch: usize,
    /// Perturbed copies stacked on the batch axis per forward pass (exact and snr; 1 = one
    /// perturbation per forward).
    #[arg(long, default_value_t = STACK)]
    #[serde(default = "stack")]
    pub stack: usize,
    /// Channels per unit of work (exact and snr).
    #[arg(long, default_value_t = BATCH)]
    #[serde(default = "batch")]
    pub chunk: usize,
    /// Seed of the sample choice (and of the first-order probes).
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub seed: u64,
    /// Probe vectors for first-order (default: one per logit for classification up to 128
    /// classes, which makes the first-order term exact; else 64 random probes).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<usize>,
}

/// First-order probes when none are given (BENCHMARKS.md, "Estimators against exact"): the
/// full basis (one probe per logit, which makes the first-order term exact) for
/// classification up to 128 classes, since 3 random probes of 10 cost 12-14% in the knapsack
/// objective judged by exact tables; 64 random probes where the outputs are more (ImageNet,
/// segmentation maps).
pub fn default_probes(cfg: &Config) -> usize {
    match cfg.task() {
        Task::Classification if cfg.num_classes <= 128 => cfg.num_classes,
        _ => 64,
    }
}

const SAMPLES: usize = 256;
const BATCH: usize = 32;
const STACK: usize = 8;

fn first_order() -> Estimator {
    Estimator::FirstOrder
}
fn samples() -> usize {
    SAMPLES
}
fn batch() -> usize {
    BATCH
}
fn stack() -> usize {
    STACK
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            estimator: first_order(),
            samples: SAMPLES,
            batch: BATCH,
            stack: STACK,
            chunk: BATCH,
            seed: 0,
            probes: None,
        }
    }
}

impl Settings {
    /// The first count that is 0 (each must be at least 1), named as in the file.
    pub fn zero_field(&self) -> Option<&'static str> {
        [
            ("samples", self.samples),
            ("batch", self.batch),
            ("stack", self.stack),
            ("chunk", self.chunk),
            ("probes", self.probes.unwrap_or(1)),
        ]
        .into_iter()
        .find_map(|(k, v)| (v == 0).then_some(k))
    }

    /// The plan around the all-ReLU network of `cfg`'s task, every site, unchanged rows
    /// skipped.
    pub fn plan_options(&self, cfg: &Config) -> PlanOptions {
        PlanOptions {
            estimator: self.estimator,
            seed: self.seed,
            batch: self.batch,
            stack: self.stack,
            chunk: self.chunk,
            probes: self.probes.unwrap_or_else(|| default_probes(cfg)),
            sites: None,
            zero: false,
            skip_unchanged: true,
            baseline: None,
            against_relu: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pipeline hashes the settings as JSON: the estimator stays its name and the
    /// field order stays what finished run directories were hashed with.
    #[test]
    fn settings_keep_their_json() {
        let s = Settings::default();
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"estimator":"first-order","samples":256,"batch":32,"stack":8,"chunk":32,"seed":0}"#
        );
        let t: Settings = toml::from_str("estimator = \"exact\"\nprobes = 3").unwrap();
        assert_eq!(
            (t.estimator, t.probes, t.samples),
            (Estimator::Exact, Some(3), 256)
        );
        let e = toml::from_str::<Settings>("estimator = \"fast\"").unwrap_err();
        assert!(
            e.to_string().contains("expected exact, snr or first-order"),
            "{e}"
        );
        assert_eq!(
            Settings {
                stack: 0,
                ..s.clone()
            }
            .zero_field(),
            Some("stack")
        );
        assert_eq!(s.zero_field(), None);
    }
}
