//! Image files as real data sets hold them: the format is read from the content, not the
//! extension (ImageNet's training set has a PNG named `.JPEG`, and CMYK JPEGs), every colour
//! type becomes 8-bit RGB (grayscale replicated, palettes expanded, 16-bit scaled, CMYK and
//! YCCK converted), and a truncated JPEG is an error, as in PIL (whose default refuses
//! truncated files) rather than a silently grey lower half. EXIF orientation is ignored, as
//! torchvision's `pil_loader` ignores it.
//!
//! A file that cannot be decoded follows [`BadImages`]: an error naming it, or a deterministic
//! substitute from the same rank's shard ([`decode_or_substitute`]), counted so the log and
//! `metrics.jsonl` show how many were replaced.
use crate::error::{Error, Result};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What a training run does with an image that cannot be decoded.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BadImages {
    /// Stop with an error naming the file.
    #[default]
    Error,
    /// Replace it by the next decodable image of this rank's epoch order (same transform),
    /// warn, and count it; every rank keeps its batch count.
    Substitute,
}

/// Reads and decodes `path` to 8-bit RGB, whatever its extension says.
pub fn open_rgb(path: &Path) -> Result<image::RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: String| Error::data(path, format!("cannot decode the image: {m}"));
    let format = image::guess_format(&bytes).map_err(|e| bad(e.to_string()))?;
    if format == image::ImageFormat::Jpeg {
        jpeg_complete(&bytes).map_err(bad)?;
    }
    let img =
        image::load_from_memory_with_format(&bytes, format).map_err(|e| bad(e.to_string()))?;
    Ok(img.into_rgb8())
}

/// Ok when the JPEG's marker structure runs to its end-of-image marker. Walks the segments
/// (skipping their declared lengths, so an EXIF thumbnail's markers are not mistaken for the
/// image's) and the entropy-coded data after each start of scan, where 0xFF is always
/// followed by 0x00 or a restart marker; any other marker ends the scan. Stray bytes between
/// segments are skipped as libjpeg skips them: only data that ends before the end-of-image
/// marker is refused.
pub fn jpeg_complete(b: &[u8]) -> std::result::Result<(), String> {
    let cut = |at: usize| {
        format!(
            "the JPEG data is truncated: it ends after {} bytes, at offset {at}, before the \
             end-of-image marker",
            b.len()
        )
    };
    if b.len() < 4 || b[0] != 0xFF || b[1] != 0xD8 {
        return Err("not a JPEG (no start-of-image marker)".into());
    }
    let mut i = 2;
    loop {
        if i >= b.len() {
            return Err(cut(i));
        }
        if b[i] != 0xFF {
            // Extraneous bytes before a marker: skipped, as libjpeg does (with a warning).
            match b[i..].iter().position(|&x| x == 0xFF) {
                Some(p) => i += p,
                None => return Err(cut(b.len())),
            }
        }
        // Fill bytes (0xFF runs) may precede a marker.
        while i + 1 < b.len() && b[i + 1] == 0xFF {
            i += 1;
        }
        let Some(&m) = b.get(i + 1) else {
            return Err(cut(i));
        };
        match m {
            0xD9 => return Ok(()),
            0x01 | 0xD0..=0xD7 => {
                i += 2;
                continue;
            }
            _ => {}
        }
        let Some(len) = b
            .get(i + 2..i + 4)
            .map(|l| u16::from_be_bytes([l[0], l[1]]) as usize)
        else {
            return Err(cut(i));
        };
        if len < 2 {
            // A broken length: look for the next marker instead.
            i += 2;
            continue;
        }
        i += 2 + len;
        if m == 0xDA {
            // Entropy-coded data up to the next marker that is not a stuffed byte or restart.
            loop {
                let Some(p) = b.get(i..).and_then(|s| s.iter().position(|&x| x == 0xFF)) else {
                    return Err(cut(b.len()));
                };
                i += p;
                match b.get(i + 1) {
                    None => return Err(cut(b.len())),
                    Some(0x00) | Some(0xD0..=0xD7) | Some(0xFF) => i += 1,
                    Some(_) => break,
                }
            }
        }
    }
}

/// Where the batches of an epoch take substitutes from: this rank's epoch order.
#[derive(Clone, Debug)]
pub struct Substitutes {
    pub order: Arc<Vec<i64>>,
    /// Images substituted so far (shared by every batch of a data set).
    pub count: Arc<AtomicU64>,
}

/// How many following images of the order a failing image may try before the batch fails.
const TRIES: usize = 16;

/// `decode(i)` for every image of `ids` (a batch starting at position `at` of the order in
/// `subs`), in parallel. Without `subs` a failure is the batch's error; with it, a failing image is
/// replaced by the first decodable image after the batch in the order (wrapping), with a
/// warning naming both files, and counted.
pub fn decode_or_substitute<T: Send>(
    ids: &[i64],
    subs: Option<(&Substitutes, usize)>,
    name: &(dyn Fn(i64) -> String + Sync),
    decode: &(dyn Fn(usize, i64) -> Result<T> + Sync),
) -> Result<Vec<T>> {
    use rayon::prelude::*;
    let parts: Vec<Result<T>> = ids
        .par_iter()
        .enumerate()
        .map(|(k, &i)| {
            let e = match decode(k, i) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let Some((s, at)) = subs else { return Err(e) };
            let n = s.order.len();
            for j in 0..TRIES.min(n) {
                let other = s.order[(at + ids.len() + j) % n];
                if other == i {
                    continue;
                }
                if let Ok(v) = decode(k, other) {
                    s.count.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "warning: {e}; substituted by {} (--bad-images substitute)",
                        name(other)
                    );
                    return Ok(v);
                }
            }
            Err(e)
        })
        .collect();
    parts.into_iter().collect()
}
