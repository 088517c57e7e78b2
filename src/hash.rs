//! FNV-1a 64: a tiny, fully specified content hash for fingerprints (configurations, weights,
//! jobs, stage inputs). Not cryptographic; it only has to tell runs apart reproducibly.
#[derive(Clone, Copy, Debug)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn value(&self) -> u64 {
        self.0
    }

    /// The hash as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// FNV-1a 64 of some bytes, as 16 hex digits.
pub fn fnv_hex(bytes: impl IntoIterator<Item = u8>) -> String {
    let mut h = Fnv::default();
    for b in bytes {
        h.write(&[b]);
    }
    h.hex()
}

/// FNV-1a 64 of a file's bytes, as 16 hex digits.
pub fn file_hex(path: &std::path::Path) -> crate::error::Result<String> {
    let b = std::fs::read(path).map_err(|e| crate::error::Error::io(path, e))?;
    let mut h = Fnv::default();
    h.write(&b);
    Ok(h.hex())
}

/// FNV-1a 64 of a value's compact JSON, as 16 hex digits: the fingerprint of configurations,
/// jobs and stage inputs.
pub fn of_json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    fnv_hex(serde_json::to_vec(v).expect("fingerprinted values serialise"))
}
