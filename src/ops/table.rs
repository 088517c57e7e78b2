//! The per-channel option table: one `#[repr(C)]` entry per channel, laid out exactly like
//! `ChannelOpt` in `kernels/common.cuh`, so the CPU kernels, the CUDA kernels and the host
//! harness all read the same bytes.
//!
//! Building the table is also where options are validated (bh, bw >= 1), so the kernels can
//! assume a well-formed table and never divide by zero.
use crate::error::{Error, Result};
use crate::spec::PatchOption;
use bytemuck::{Pod, Zeroable};

/// `ChannelOpt::kind` of a patch option (`bh x bw`).
pub const KIND_PATCH: u32 = 0;
/// `ChannelOpt::kind` of the identity option (ReLU removed).
pub const KIND_IDENTITY: u32 = 1;
/// `ChannelOpt::kind` of the zero option (channel zeroed).
pub const KIND_ZERO: u32 = 2;

/// One channel's option as the kernels see it. `bh`/`bw` are 1 for identity and zero so
/// that tiling code stays well defined whatever the kind.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ChannelOpt {
    pub kind: u32,
    pub bh: u32,
    pub bw: u32,
    /// Keeps the entry 16 bytes (one aligned vector load on the GPU).
    pub pad: u32,
}

const _: () = assert!(std::mem::size_of::<ChannelOpt>() == 16);
const _: () = assert!(std::mem::align_of::<ChannelOpt>() == 4);

impl ChannelOpt {
    /// The plain ReLU (1 x 1 patches).
    pub const RELU: ChannelOpt = ChannelOpt {
        kind: KIND_PATCH,
        bh: 1,
        bw: 1,
        pad: 0,
    };

    /// Converts one option; `channel` only names the culprit in the error.
    pub fn from_option(o: PatchOption, channel: usize, op: &'static str) -> Result<Self> {
        Ok(match o {
            PatchOption::Patch { bh, bw } => {
                if bh == 0 || bw == 0 || bh > i32::MAX as u32 || bw > i32::MAX as u32 {
                    return Err(Error::BadOption {
                        op,
                        channel,
                        reason: format!("patch {bh}x{bw} must have 1 <= bh, bw <= 2^31-1"),
                    });
                }
                ChannelOpt {
                    kind: KIND_PATCH,
                    bh,
                    bw,
                    pad: 0,
                }
            }
            PatchOption::Identity => ChannelOpt {
                kind: KIND_IDENTITY,
                bh: 1,
                bw: 1,
                pad: 0,
            },
            PatchOption::Zero => ChannelOpt {
                kind: KIND_ZERO,
                bh: 1,
                bw: 1,
                pad: 0,
            },
        })
    }

    /// Checks an entry that did not come from [`ChannelOpt::from_option`].
    pub fn validate(&self, channel: usize, op: &'static str) -> Result<()> {
        let ok = match self.kind {
            KIND_PATCH => {
                self.bh >= 1
                    && self.bw >= 1
                    && self.bh <= i32::MAX as u32
                    && self.bw <= i32::MAX as u32
            }
            KIND_IDENTITY | KIND_ZERO => true,
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(Error::BadOption {
                op,
                channel,
                reason: format!("malformed table entry {self:?}"),
            })
        }
    }

    /// The option this entry encodes.
    pub fn to_option(&self) -> PatchOption {
        match self.kind {
            KIND_IDENTITY => PatchOption::Identity,
            KIND_ZERO => PatchOption::Zero,
            _ => PatchOption::Patch {
                bh: self.bh,
                bw: self.bw,
            },
        }
    }
}

/// The table of a whole site, one entry per channel.
pub fn build_table(options: &[PatchOption], op: &'static str) -> Result<Vec<ChannelOpt>> {
    options
        .iter()
        .enumerate()
        .map(|(c, &o)| ChannelOpt::from_option(o, c, op))
        .collect()
}

/// One copy of the batched simulation: channel `channel` uses `opt`, every other channel
/// is a plain ReLU. Same layout as `SimEntry` in `kernels/common.cuh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SimEntry {
    pub channel: u32,
    pub kind: u32,
    pub bh: u32,
    pub bw: u32,
}

const _: () = assert!(std::mem::size_of::<SimEntry>() == 16);

impl SimEntry {
    /// The option of the perturbed channel.
    pub fn opt(&self) -> ChannelOpt {
        ChannelOpt {
            kind: self.kind,
            bh: self.bh,
            bw: self.bw,
            pad: 0,
        }
    }
}

/// The perturbation list of a simulation, validated against `channels`.
pub fn build_sim_table(
    perturbations: &[(usize, PatchOption)],
    channels: usize,
    op: &'static str,
) -> Result<Vec<SimEntry>> {
    perturbations
        .iter()
        .map(|&(c, o)| {
            if c >= channels {
                return Err(Error::BadOption {
                    op,
                    channel: c,
                    reason: format!("perturbed channel out of range (C = {channels})"),
                });
            }
            let t = ChannelOpt::from_option(o, c, op)?;
            Ok(SimEntry {
                channel: c as u32,
                kind: t.kind,
                bh: t.bh,
                bw: t.bw,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_empty_patches() {
        for o in [
            PatchOption::RELU,
            PatchOption::patch(3, 5),
            PatchOption::Identity,
            PatchOption::Zero,
        ] {
            assert_eq!(ChannelOpt::from_option(o, 0, "t").unwrap().to_option(), o);
        }
        assert!(ChannelOpt::from_option(PatchOption::patch(0, 2), 4, "t").is_err());
        assert!(ChannelOpt {
            kind: 7,
            bh: 1,
            bw: 1,
            pad: 0
        }
        .validate(0, "t")
        .is_err());
        assert!(build_sim_table(&[(3, PatchOption::RELU)], 3, "t").is_err());
    }
}
