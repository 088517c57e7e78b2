//! DReLU counts and the byte cost model of docs/method.md 8.6, used by reports and the knapsack.
//!
//! Bytes for one channel of n pixels with N DReLUs (patches): N DReLUs at a fixed cost each
//! (brelu's own engine: 221 bytes with its default exact DReLU; the published estimates:
//! Porthos-style 8*(6*8+14) = 496 bytes, SecureNN-style 8*(8*8+19) = 664 bytes) plus the
//! block-ReLU multiply, 8*(3n + 2N) bytes. Identity and zero channels cost nothing.
use super::{PatchOption, SiteInfo, Spec};
use serde::Serialize;

/// Bytes per DReLU, Porthos-style (6 bit-vectors of 8 bytes + 14 ring elements, 8 bytes each).
pub const PORTHOS_BYTES_PER_DRELU: u64 = 8 * (6 * 8 + 14);
/// Bytes per DReLU, SecureNN-style.
pub const SECURENN_BYTES_PER_DRELU: u64 = 8 * (8 * 8 + 19);

/// Payload bytes per DReLU of brelu's secure engine (docs/method.md 8.4) with a `bits`-bit
/// comparison: the MSB protocol (`msb`, the default) sends 3w + 3(k-1) + 8, ShareConvert +
/// ComputeMSB 6k + 8w + 8, with w = ceil(k/8). `tests/it/secure.rs` measures both on the wire.
pub fn engine_bytes_per_drelu(msb: bool, bits: u32) -> u64 {
    let (k, w) = (bits as u64, bits.div_ceil(8) as u64);
    if msb {
        3 * w + 3 * (k - 1) + 8
    } else {
        6 * k + 8 * w + 8
    }
}

/// Messages of an activation layer with DReLUs in brelu's engine (default DReLU protocol): the
/// DReLU's six (the dealer's offline share, the opening both ways, the two compare vectors,
/// the dealer's result share) and the patch multiply's three.
pub const ENGINE_ACT_MESSAGES: u64 = 9;
/// Framing of one message on an engine link ([`super::framing`]): a frame header, and per
/// encrypted record of at most `MAX_PLAIN` plaintext bytes a length prefix and a tag.
const FRAME_HEADER: u64 = super::framing::FRAME_HEADER_LEN as u64;
const RECORD_OVERHEAD: u64 = super::framing::RECORD_OVERHEAD as u64;
const RECORD_PLAIN: u64 = super::framing::MAX_PLAIN as u64;

/// An upper bound on the bytes the engine's framing adds to `payload` bytes of ReLU layers
/// spread over `sites` activation layers: what a budget in bytes sets aside so that the bytes
/// counted on the wire stay within it (the cost model counts payload only).
pub fn engine_framing_bound(sites: usize, payload: u64) -> u64 {
    let m = sites as u64 * ENGINE_ACT_MESSAGES;
    m * (FRAME_HEADER + RECORD_OVERHEAD)
        + (RECORD_OVERHEAD * (m * FRAME_HEADER + payload)).div_ceil(RECORD_PLAIN)
}

/// Which DReLU protocol the byte estimate assumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum CostModel {
    /// brelu's engine with its default exact DReLU (64-bit MSB protocol).
    Engine,
    Porthos,
    SecureNn,
}

impl CostModel {
    pub fn bytes_per_drelu(self) -> u64 {
        match self {
            CostModel::Engine => engine_bytes_per_drelu(true, 64),
            CostModel::Porthos => PORTHOS_BYTES_PER_DRELU,
            CostModel::SecureNn => SECURENN_BYTES_PER_DRELU,
        }
    }

    /// Predicted bytes of one channel of an `h x w` map under `option`.
    pub fn channel_bytes(self, option: PatchOption, h: usize, w: usize) -> u64 {
        match option {
            PatchOption::Patch { .. } => {
                let n = (h * w) as u64;
                let d = option.drelus(h, w) as u64;
                d * self.bytes_per_drelu() + 8 * (3 * n + 2 * d)
            }
            PatchOption::Identity | PatchOption::Zero => 0,
        }
    }
}

/// Costs of one site under a spec.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SiteCost {
    pub site: String,
    pub channels: usize,
    pub shape: [usize; 3],
    /// ReLUs of the original network at this site.
    pub relus: usize,
    /// DReLUs the spec uses here.
    pub drelus: usize,
    pub identity_channels: usize,
    pub zero_channels: usize,
    /// Bytes in brelu's engine (what `brelu secure` sends for these layers, frames aside).
    pub bytes_engine: u64,
    pub bytes_porthos: u64,
    pub bytes_securenn: u64,
}

/// Costs of a whole spec.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SpecCost {
    pub model: String,
    pub input: [usize; 3],
    pub relus: usize,
    pub drelus: usize,
    /// drelus / relus.
    pub ratio: f64,
    pub bytes_engine: u64,
    pub bytes_porthos: u64,
    pub bytes_securenn: u64,
    /// Bytes of the ReLU layers of the original network (every channel ordinary ReLU).
    pub original_bytes_engine: u64,
    pub original_bytes_porthos: u64,
    pub original_bytes_securenn: u64,
    pub sites: Vec<SiteCost>,
}

/// Costs of one site with per-channel `options`.
pub fn site_cost(site: &SiteInfo, options: &[PatchOption]) -> SiteCost {
    let (h, w) = (site.height, site.width);
    let sum = |m: CostModel| options.iter().map(|&o| m.channel_bytes(o, h, w)).sum();
    SiteCost {
        site: site.name.clone(),
        channels: site.channels,
        shape: [site.channels, h, w],
        relus: site.relus(),
        drelus: options.iter().map(|o| o.drelus(h, w)).sum(),
        identity_channels: options
            .iter()
            .filter(|o| **o == PatchOption::Identity)
            .count(),
        zero_channels: options.iter().filter(|o| **o == PatchOption::Zero).count(),
        bytes_engine: sum(CostModel::Engine),
        bytes_porthos: sum(CostModel::Porthos),
        bytes_securenn: sum(CostModel::SecureNn),
    }
}

/// Costs of a spec that has been validated against `sites`.
pub fn spec_cost(spec: &Spec, sites: &[SiteInfo]) -> SpecCost {
    let per_site: Vec<SiteCost> = sites
        .iter()
        .map(|s| site_cost(s, spec.sites.get(&s.name).map(Vec::as_slice).unwrap_or(&[])))
        .collect();
    let original: Vec<SiteCost> = sites
        .iter()
        .map(|s| site_cost(s, &vec![PatchOption::RELU; s.channels]))
        .collect();
    let relus: usize = sites.iter().map(SiteInfo::relus).sum();
    let drelus: usize = per_site.iter().map(|s| s.drelus).sum();
    SpecCost {
        model: spec.model.clone(),
        input: spec.input,
        relus,
        drelus,
        ratio: drelus as f64 / relus.max(1) as f64,
        bytes_engine: per_site.iter().map(|s| s.bytes_engine).sum(),
        bytes_porthos: per_site.iter().map(|s| s.bytes_porthos).sum(),
        bytes_securenn: per_site.iter().map(|s| s.bytes_securenn).sum(),
        original_bytes_engine: original.iter().map(|s| s.bytes_engine).sum(),
        original_bytes_porthos: original.iter().map(|s| s.bytes_porthos).sum(),
        original_bytes_securenn: original.iter().map(|s| s.bytes_securenn).sum(),
        sites: per_site,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_per_drelu_costs() {
        assert_eq!(PORTHOS_BYTES_PER_DRELU, 496);
        assert_eq!(SECURENN_BYTES_PER_DRELU, 664);
        assert_eq!(CostModel::Engine.bytes_per_drelu(), 221);
        // 4x4 channel with 2x2 patches: 4 DReLUs, 16 pixels.
        let b = CostModel::Porthos.channel_bytes(PatchOption::patch(2, 2), 4, 4);
        assert_eq!(b, 4 * 496 + 8 * (3 * 16 + 2 * 4));
        assert_eq!(
            CostModel::SecureNn.channel_bytes(PatchOption::Identity, 4, 4),
            0
        );
    }
}
