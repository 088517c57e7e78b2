//! `PatchOption`: what one channel of a ReLU site does (docs/method.md section 2).
use serde::{Deserialize, Serialize};
use std::fmt;

/// The option of one channel of a ReLU site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PatchOption {
    /// One DReLU per `bh x bw` patch (ceil tiling from the top-left corner); (1,1) is ReLU.
    Patch { bh: u32, bw: u32 },
    /// The ReLU is removed: output = input. Costs no DReLU.
    Identity,
    /// The channel is zeroed. Costs no DReLU.
    Zero,
}

impl PatchOption {
    /// The ordinary ReLU.
    pub const RELU: PatchOption = PatchOption::Patch { bh: 1, bw: 1 };

    pub fn patch(bh: u32, bw: u32) -> Self {
        PatchOption::Patch { bh, bw }
    }

    /// DReLUs this option costs on one `h x w` channel: ceil(h/bh) * ceil(w/bw).
    pub fn drelus(&self, h: usize, w: usize) -> usize {
        match *self {
            PatchOption::Patch { bh, bw } => h.div_ceil(bh as usize) * w.div_ceil(bw as usize),
            PatchOption::Identity | PatchOption::Zero => 0,
        }
    }

    /// True when the patch fits inside an `h x w` map (identity and zero always fit).
    pub fn fits(&self, h: usize, w: usize) -> bool {
        match *self {
            PatchOption::Patch { bh, bw } => {
                bh >= 1 && bw >= 1 && bh as usize <= h && bw as usize <= w
            }
            _ => true,
        }
    }

    /// The same option with the patch clipped to an `h x w` map.
    pub fn clipped(&self, h: usize, w: usize) -> Self {
        match *self {
            PatchOption::Patch { bh, bw } => PatchOption::Patch {
                bh: bh.min(h.max(1) as u32),
                bw: bw.min(w.max(1) as u32),
            },
            o => o,
        }
    }

    /// Parses `2x2`, `2,3`, `relu`, `identity` or `zero`.
    pub fn parse(s: &str) -> Option<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "identity" | "id" => return Some(PatchOption::Identity),
            "zero" => return Some(PatchOption::Zero),
            "relu" => return Some(PatchOption::RELU),
            _ => {}
        }
        let (a, b) = t.split_once(['x', ',', '*'])?;
        let bh: u32 = a.trim().parse().ok()?;
        let bw: u32 = b.trim().parse().ok()?;
        (bh >= 1 && bw >= 1).then_some(PatchOption::Patch { bh, bw })
    }

    /// Reads the JSON form: `[bh, bw]`, `"identity"` or `"zero"`.
    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        match v {
            serde_json::Value::String(s) => match s.as_str() {
                "identity" => Some(PatchOption::Identity),
                "zero" => Some(PatchOption::Zero),
                _ => None,
            },
            serde_json::Value::Array(a) if a.len() == 2 => {
                let bh = a[0].as_u64().filter(|&x| x >= 1 && x <= u32::MAX as u64)?;
                let bw = a[1].as_u64().filter(|&x| x >= 1 && x <= u32::MAX as u64)?;
                Some(PatchOption::Patch {
                    bh: bh as u32,
                    bw: bw as u32,
                })
            }
            _ => None,
        }
    }

    /// The JSON form written to spec and manifest files.
    pub fn to_json(&self) -> serde_json::Value {
        match *self {
            PatchOption::Patch { bh, bw } => serde_json::json!([bh, bw]),
            PatchOption::Identity => serde_json::json!("identity"),
            PatchOption::Zero => serde_json::json!("zero"),
        }
    }
}

impl fmt::Display for PatchOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PatchOption::Patch { bh, bw } => write!(f, "{bh}x{bw}"),
            PatchOption::Identity => f.write_str("identity"),
            PatchOption::Zero => f.write_str("zero"),
        }
    }
}

impl Serialize for PatchOption {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for PatchOption {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        PatchOption::from_json(&v).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "expected [bh, bw] with bh, bw >= 1, \"identity\" or \"zero\", got {v}"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_use_ceil_tiling() {
        assert_eq!(PatchOption::RELU.drelus(7, 5), 35);
        assert_eq!(PatchOption::patch(2, 2).drelus(7, 5), 4 * 3);
        assert_eq!(PatchOption::patch(7, 7).drelus(7, 7), 1);
        assert_eq!(PatchOption::patch(3, 1).drelus(1, 1), 1);
        assert_eq!(PatchOption::Identity.drelus(7, 7), 0);
        assert_eq!(PatchOption::Zero.drelus(7, 7), 0);
    }

    #[test]
    fn parse_and_json_round_trip() {
        for o in [
            PatchOption::RELU,
            PatchOption::patch(3, 5),
            PatchOption::Identity,
            PatchOption::Zero,
        ] {
            assert_eq!(PatchOption::parse(&o.to_string()), Some(o));
            assert_eq!(PatchOption::from_json(&o.to_json()), Some(o));
        }
        assert_eq!(PatchOption::parse("0x2"), None);
        assert_eq!(PatchOption::parse("2x"), None);
        assert_eq!(PatchOption::from_json(&serde_json::json!([0, 1])), None);
        assert_eq!(PatchOption::from_json(&serde_json::json!([1, 2, 3])), None);
        assert_eq!(PatchOption::from_json(&serde_json::json!("relu6")), None);
    }
}
