//! Where tensors live: the `--device` names the commands accept.
use crate::error::{Error, Result};
use tch::Device;

/// Picks the device: `cpu` (default), `cuda` or `cuda:N` (only when CUDA is available).
pub fn parse_device(s: Option<&str>) -> Result<Device> {
    match s.unwrap_or("cpu") {
        "cpu" => Ok(Device::Cpu),
        d if d == "cuda" || d.starts_with("cuda:") => {
            if !tch::Cuda::is_available() {
                return Err(Error::InvalidArgument(format!(
                    "device {d}: CUDA is not available in this libtorch/machine"
                )));
            }
            let n = match d.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| Error::InvalidArgument(format!("device {d}: expected cuda:N")))?,
                None => 0,
            };
            if n >= tch::Cuda::device_count() as usize {
                return Err(Error::InvalidArgument(format!(
                    "device {d}: only {} CUDA device(s)",
                    tch::Cuda::device_count()
                )));
            }
            Ok(Device::Cuda(n))
        }
        d => Err(Error::InvalidArgument(format!(
            "unknown device '{d}' (expected cpu, cuda or cuda:N)"
        ))),
    }
}
