//! Distortion: how much each (site, channel, option) changes the network's output
//! (docs/method.md section 5), and the tables that carry it to the knapsack.
pub mod extract;
pub mod settings;
pub mod tables;

pub use extract::{collect, Estimator, Job, PlanOptions, Samples, Shard};
pub use settings::Settings;
pub use tables::{DistortionTables, SiteTable};
