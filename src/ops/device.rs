//! Where tensors live: the `--device` names the commands accept.
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use tch::Device;

/// A `--device` value, parsed once. `cuda` without an index means this rank's GPU under a
/// launcher (`cuda:LOCAL_RANK`, `dist::Launch::device`) and GPU 0 otherwise; whether the device
/// exists is checked by [`DeviceChoice::resolve`], when the run starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda(Option<usize>),
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(None)),
            d => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(Some(n))),
                _ => Err(format!(
                    "unknown device '{d}' (expected cpu, cuda or cuda:N)"
                )),
            },
        }
    }
}

impl TryFrom<String> for DeviceChoice {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<DeviceChoice> for String {
    fn from(d: DeviceChoice) -> String {
        d.to_string()
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(None) => f.write_str("cuda"),
            DeviceChoice::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// The device of this process: under a launcher `cuda` is `cuda:(LOCAL_RANK mod GPUs)`
    /// (Slurm's `--gpus-per-task=1` shows each task one GPU). Fails when CUDA or that GPU is
    /// missing. `local_rank`: this process's index on its node, under a launcher.
    pub fn resolve(self, local_rank: Option<usize>) -> Result<Device> {
        let n = match self {
            DeviceChoice::Cpu => return Ok(Device::Cpu),
            DeviceChoice::Cuda(n) => n,
        };
        if !tch::Cuda::is_available() {
            return Err(Error::InvalidArgument(format!(
                "device {self}: CUDA is not available in this libtorch/machine"
            )));
        }
        let count = tch::Cuda::device_count().max(1) as usize;
        let index = n.unwrap_or(local_rank.unwrap_or(0) % count);
        if index >= count {
            return Err(Error::InvalidArgument(format!(
                "device {self}: only {count} CUDA device(s)"
            )));
        }
        Ok(Device::Cuda(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choices_parse_and_print_back() {
        for s in ["cpu", "cuda", "cuda:0", "cuda:7"] {
            let d: DeviceChoice = s.parse().unwrap();
            assert_eq!(d.to_string(), s);
            let j = serde_json::to_string(&d).unwrap();
            assert_eq!(serde_json::from_str::<DeviceChoice>(&j).unwrap(), d);
        }
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
        assert_eq!(DeviceChoice::Cpu.resolve(None).unwrap(), Device::Cpu);
    }
}
