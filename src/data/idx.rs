//! The idx format of MNIST and Fashion-MNIST, plain or gzip-compressed: a big-endian header
//! (magic `0x0000_08_NN`, NN = number of dimensions; data type 0x08 = unsigned byte), the
//! dimension sizes as u32, then the bytes.
use super::{Dataset, Split};
use crate::error::{Error, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Reads a whole file, gunzipping it when it starts with the gzip magic bytes.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| Error::data(path, format!("corrupt or truncated gzip data: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// An idx file: its dimension sizes and its bytes.
#[derive(Debug)]
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads an unsigned-byte idx file with `ndim` dimensions (1 = labels, 3 = images).
pub fn read_idx(path: &Path, ndim: usize) -> Result<Idx> {
    let bytes = read_maybe_gz(path)?;
    let magic = 0x0800 + ndim as u32;
    if bytes.len() < 4 {
        return Err(Error::data(
            path,
            format!(
                "truncated: {} bytes, expected at least a 4-byte header with magic {magic:#010x}",
                bytes.len()
            ),
        ));
    }
    let got = u32::from_be_bytes(bytes[0..4].try_into().expect("4 bytes"));
    if got != magic {
        return Err(Error::data(
            path,
            format!(
                "wrong magic number {got:#010x}, expected {magic:#010x} (unsigned-byte idx \
                 with {ndim} dimension(s))"
            ),
        ));
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(Error::data(
            path,
            format!("truncated header: {} bytes, expected {header}", bytes.len()),
        ));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize
        })
        .collect();
    let expected = dims.iter().product::<usize>();
    let have = bytes.len() - header;
    if have != expected {
        return Err(Error::data(
            path,
            format!(
                "{} data: dimensions {dims:?} need {expected} bytes after the header, found {have}",
                if have < expected {
                    "truncated"
                } else {
                    "oversized"
                }
            ),
        ));
    }
    Ok(Idx {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// `dir/name.gz` if it exists, else `dir/name` (named in the error when neither does).
fn find(dir: &Path, name: &str) -> Result<PathBuf> {
    let gz = dir.join(format!("{name}.gz"));
    if gz.exists() {
        return Ok(gz);
    }
    let plain = dir.join(name);
    if plain.exists() {
        return Ok(plain);
    }
    Err(Error::data(
        &gz,
        format!("missing idx file (neither {name}.gz nor {name} is in this directory)"),
    ))
}

/// Loads an MNIST-layout split from `dir` (`train-images-idx3-ubyte[.gz]` etc.).
pub fn load_mnist(dir: &Path, split: Split) -> Result<Dataset> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let ipath = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let lpath = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let images = read_idx(&ipath, 3)?;
    let labels = read_idx(&lpath, 1)?;
    if images.dims[0] != labels.dims[0] {
        return Err(Error::data(
            &lpath,
            format!(
                "{} labels but {} has {} images",
                labels.dims[0],
                ipath.display(),
                images.dims[0]
            ),
        ));
    }
    Dataset::from_raw(
        images.data,
        labels.data,
        [1, images.dims[1], images.dims[2]],
        10,
        &ipath,
    )
}
