//! Minimal `.npy` (NumPy format v1/v2/v3) reading and writing for float64 C-order arrays, the
//! format of distortion tables. Reading checks the header fully: dtype, order, shape and the
//! data length, so a truncated or foreign file is an error, never garbage.
use crate::error::{Error, Result};
use crate::fs::write_atomic;
use std::path::Path;

const MAGIC: &[u8] = b"\x93NUMPY";

/// A float64 array with its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyF64 {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

/// Encodes a little-endian float64 C-order array.
pub fn encode_f64(shape: &[usize], data: &[f64]) -> Vec<u8> {
    assert_eq!(
        shape.iter().product::<usize>(),
        data.len(),
        "shape and data length agree"
    );
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': {shape_s}, }}");
    // Pad so that magic + version + length + header is a multiple of 64, ending in '\n'.
    let total = MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 8 * data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes a float64 array atomically.
pub fn write_f64(path: &Path, shape: &[usize], data: &[f64]) -> Result<()> {
    write_atomic(path, &encode_f64(shape, data))
}

/// Reads a float64 (or float32, converted) C-order array.
pub fn read_f64(path: &Path) -> Result<NpyF64> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_f64(&bytes).map_err(|m| Error::parse(path, m))
}

/// Decodes `.npy` bytes; the error says what was expected.
pub fn decode_f64(b: &[u8]) -> std::result::Result<NpyF64, String> {
    if b.len() < 10 || &b[..6] != MAGIC {
        return Err("not a .npy file (bad magic)".into());
    }
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = b
        .get(start..start + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("truncated or non-text .npy header")?;
    let field = |key: &str| -> std::result::Result<&str, String> {
        let k = format!("'{key}':");
        let i = header.find(&k).ok_or(format!("header lacks '{key}'"))? + k.len();
        Ok(header[i..].trim_start())
    };
    let descr = field("descr")?;
    let elem = if descr.starts_with("'<f8'") || descr.starts_with("'float64'") {
        8
    } else if descr.starts_with("'<f4'") {
        4
    } else {
        return Err(format!(
            "dtype {} is not float64 ('<f8') or float32 ('<f4')",
            descr.split(',').next().unwrap_or("")
        ));
    };
    if !field("fortran_order")?.starts_with("False") {
        return Err("Fortran-order arrays are not supported (save with C order)".into());
    }
    let shape_s = field("shape")?;
    let close = shape_s.find(')').ok_or("malformed shape")?;
    let shape: Vec<usize> = shape_s[1..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("malformed shape entry '{s}'"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let n: usize = shape.iter().product();
    let data = &b[start + hlen..];
    if data.len() != n * elem {
        return Err(format!(
            "data is {} bytes, shape {shape:?} needs {} (truncated file?)",
            data.len(),
            n * elem
        ));
    }
    let data = if elem == 8 {
        data.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    } else {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64)
            .collect()
    };
    Ok(NpyF64 { shape, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let data: Vec<f64> = (0..12).map(|i| i as f64 * 0.5 - 1.0).collect();
        let b = encode_f64(&[3, 4], &data);
        assert_eq!((b.len() - data.len() * 8) % 64, 0);
        let back = decode_f64(&b).unwrap();
        assert_eq!(back.shape, vec![3, 4]);
        assert_eq!(back.data, data);
        let e = decode_f64(&b[..b.len() - 3]).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        assert!(decode_f64(b"hello").is_err());
        let one = decode_f64(&encode_f64(&[5], &[1.0; 5])).unwrap();
        assert_eq!(one.shape, vec![5]);
    }
}
