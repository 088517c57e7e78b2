//! `SiteInfo`: a ReLU site's name and activation shape, as found by a model's dry run.
use serde::{Deserialize, Serialize};

/// One ReLU site and the shape of its activation map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteInfo {
    pub name: String,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl SiteInfo {
    /// ReLUs (= DReLUs of the original network) at this site.
    pub fn relus(&self) -> usize {
        self.channels * self.height * self.width
    }
}
