//! The sample images an extraction measures on.
use crate::data::{Rng, Source, Split};
use crate::error::{Error, Result};
use crate::hash::fnv_hex;
use tch::{Device, Kind, Tensor};

/// The sample images of an extraction: float32 [N, C, H, W] on the CPU, evaluation transform
/// applied. Kept as plain data so every worker can put them on its own device.
#[derive(Clone, Debug)]
pub struct Samples {
    pub shape: [usize; 4],
    pub data: Vec<f32>,
}

impl Samples {
    pub fn from_tensor(x: &Tensor) -> Result<Samples> {
        let s = x.size();
        if s.len() != 4 {
            return Err(Error::InvalidArgument(format!(
                "samples must be [N, C, H, W], got {s:?}"
            )));
        }
        let data =
            Vec::<f32>::try_from(x.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1))?;
        Ok(Samples {
            shape: [s[0] as usize, s[1] as usize, s[2] as usize, s[3] as usize],
            data,
        })
    }

    pub fn len(&self) -> usize {
        self.shape[0]
    }

    pub fn is_empty(&self) -> bool {
        self.shape[0] == 0
    }

    pub fn hash(&self) -> String {
        fnv_hex(self.data.iter().flat_map(|v| v.to_le_bytes()))
    }

    /// Samples `lo..hi` as a tensor on `device`.
    pub fn batch(&self, lo: usize, hi: usize, device: Device) -> Tensor {
        let per = self.shape[1] * self.shape[2] * self.shape[3];
        Tensor::from_slice(&self.data[lo * per..hi * per])
            .view([
                (hi - lo) as i64,
                self.shape[1] as i64,
                self.shape[2] as i64,
                self.shape[3] as i64,
            ])
            .to_device(device)
    }
}

/// The samples of docs/method.md section 5: a seeded subset of the training split of `source`, in a
/// seeded order, with the evaluation transform (normalisation only).
pub fn training_samples(source: Source<'_>, n: usize, seed: u64) -> Result<Samples> {
    samples_after(source, n, seed, 0)
}

/// `n` training samples none of which the tables' extraction measured on: the same seeded
/// order as theirs, after their `tables_samples` (what local search judges its moves on).
pub fn held_out_samples(
    source: Source<'_>,
    n: usize,
    tables_seed: u64,
    tables_samples: usize,
) -> Result<Samples> {
    samples_after(source, n, tables_seed, tables_samples)
}

fn samples_after(source: Source<'_>, n: usize, seed: u64, skip: usize) -> Result<Samples> {
    let data = source.load_split(Split::Train)?;
    let room = data.len().saturating_sub(skip);
    if n == 0 || n > room {
        return Err(Error::InvalidArgument(format!(
            "{n} samples requested: the training split has {} images{} (need 1..={room})",
            data.len(),
            if skip > 0 {
                format!(", {skip} of them the tables' own")
            } else {
                String::new()
            }
        )));
    }
    let mut order: Vec<i64> = (0..data.len() as i64).collect();
    Rng::for_epoch(seed, 0, 7).shuffle(&mut order);
    order.drain(..skip);
    order.truncate(n);
    let x = data.select(&order)?;
    Samples::from_tensor(&source.normalization().apply(&x))
}
