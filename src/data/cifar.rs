//! The CIFAR binary layout: fixed-size records of label byte(s) then 3072 pixel bytes (1024
//! red, 1024 green, 1024 blue, row-major 32x32). CIFAR-10 has one label byte and files
//! `data_batch_1..5.bin` / `test_batch.bin`; CIFAR-100 has a coarse and a fine label byte and
//! files `train.bin` / `test.bin` (the fine label is used).
use super::{Dataset, Split};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

const PIXELS: usize = 3 * 32 * 32;

/// Reads one CIFAR binary file with `label_bytes` label bytes per record, appending pixels and
/// the last label byte of each record.
pub fn read_cifar_file(
    path: &Path,
    label_bytes: usize,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u8>,
) -> Result<usize> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let rec = label_bytes + PIXELS;
    if bytes.is_empty() || bytes.len() % rec != 0 {
        return Err(Error::data(
            path,
            format!(
                "{} bytes is not a whole number of {rec}-byte records ({label_bytes} label \
                 byte(s) + {PIXELS} pixels); truncated or not a CIFAR binary file",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / rec;
    pixels.reserve(n * PIXELS);
    for r in bytes.chunks_exact(rec) {
        labels.push(r[label_bytes - 1]);
        pixels.extend_from_slice(&r[label_bytes..]);
    }
    Ok(n)
}

/// The directory holding the files: `dir` itself or its conventional subdirectory.
fn resolve(dir: &Path, sub: &str, probe: &str) -> PathBuf {
    if !dir.join(probe).exists() && dir.join(sub).join(probe).exists() {
        dir.join(sub)
    } else {
        dir.to_path_buf()
    }
}

fn load(files: &[PathBuf], label_bytes: usize, classes: usize) -> Result<Dataset> {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for f in files {
        read_cifar_file(f, label_bytes, &mut pixels, &mut labels)?;
    }
    Dataset::from_raw(pixels, labels, [3, 32, 32], classes, &files[0])
}

/// CIFAR-10 from `dir` (or `dir/cifar-10-batches-bin`).
pub fn load_cifar10(dir: &Path, split: Split) -> Result<Dataset> {
    let d = resolve(dir, "cifar-10-batches-bin", "test_batch.bin");
    let files: Vec<PathBuf> = match split {
        Split::Train => (1..=5)
            .map(|i| d.join(format!("data_batch_{i}.bin")))
            .collect(),
        Split::Test => vec![d.join("test_batch.bin")],
    };
    load(&files, 1, 10)
}

/// CIFAR-100 from `dir` (or `dir/cifar-100-binary`), fine labels.
pub fn load_cifar100(dir: &Path, split: Split) -> Result<Dataset> {
    let d = resolve(dir, "cifar-100-binary", "test.bin");
    let f = match split {
        Split::Train => d.join("train.bin"),
        Split::Test => d.join("test.bin"),
    };
    load(&[f], 2, 100)
}
