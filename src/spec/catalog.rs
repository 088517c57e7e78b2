//! Patch-size catalogs (docs/method.md section 3): which options the knapsack may pick at a site.
//!
//! The default catalog is `configs/block_sizes.json` (embedded in the binary), keyed by the
//! side of a square map. Other maps use the fallback rule. Every catalog gets `identity`;
//! `zero` only when asked for. A config can override the list for individual sites.
use super::{PatchOption, SiteInfo};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

const BUILTIN: &str = include_str!("../../configs/block_sizes.json");

/// Candidate options per site.
#[derive(Clone, Debug)]
pub struct Catalog {
    by_side: BTreeMap<usize, Vec<PatchOption>>,
    overrides: BTreeMap<String, Vec<PatchOption>>,
    /// Offer the zero option too (off by default, as in docs/method.md section 3).
    pub include_zero: bool,
}

impl Catalog {
    /// The default catalog shipped in `configs/block_sizes.json`.
    pub fn builtin() -> Catalog {
        Self::from_json_str(BUILTIN, Path::new("configs/block_sizes.json"))
            .expect("the embedded catalog is valid")
    }

    /// A catalog file in the format of `configs/block_sizes.json`.
    pub fn from_file(path: &Path) -> Result<Catalog> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    fn from_json_str(text: &str, path: &Path) -> Result<Catalog> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::parse(path, format!("malformed JSON: {e}")))?;
        let cats = v
            .get("catalogs")
            .and_then(|c| c.as_object())
            .ok_or_else(|| Error::parse(path, "missing object field 'catalogs'"))?;
        let mut by_side = BTreeMap::new();
        for (side, list) in cats {
            let s: usize = side.parse().ok().filter(|&s| s > 0).ok_or_else(|| {
                Error::parse(
                    path,
                    format!("catalogs.{side}: key must be a positive integer side"),
                )
            })?;
            let opts =
                parse_list(list).map_err(|m| Error::parse(path, format!("catalogs.{side}{m}")))?;
            by_side.insert(s, opts);
        }
        Ok(Catalog {
            by_side,
            overrides: BTreeMap::new(),
            include_zero: false,
        })
    }

    /// Replaces the catalog of one site.
    pub fn set_override(&mut self, site: &str, options: Vec<PatchOption>) {
        self.overrides.insert(site.to_string(), options);
    }

    /// Reads a config's `[catalog]` table: `file` (a catalog JSON, relative to the config),
    /// `zero` (bool) and `[catalog.sites]` (site = list of `"2x2"`, `[2, 2]`, `"identity"`).
    pub fn from_config(table: Option<&toml::Table>, config_path: &Path) -> Result<Catalog> {
        let Some(t) = table else {
            return Ok(Catalog::builtin());
        };
        let perr = |m: String| Error::parse(config_path, m);
        let mut cat = match t.get("file") {
            None => Catalog::builtin(),
            Some(toml::Value::String(f)) => {
                let base = config_path.parent().unwrap_or(Path::new("."));
                Catalog::from_file(&base.join(f))?
            }
            Some(v) => {
                return Err(perr(format!(
                    "catalog.file: expected a path string, got {v}"
                )))
            }
        };
        match t.get("zero") {
            None => {}
            Some(toml::Value::Boolean(b)) => cat.include_zero = *b,
            Some(v) => {
                return Err(perr(format!(
                    "catalog.zero: expected true or false, got {v}"
                )))
            }
        }
        if let Some(sites) = t.get("sites") {
            let sites = sites.as_table().ok_or_else(|| {
                perr("catalog.sites: expected a table of site = [options]".into())
            })?;
            for (site, list) in sites {
                let json = serde_json::to_value(list).map_err(|e| perr(e.to_string()))?;
                let opts =
                    parse_list(&json).map_err(|m| perr(format!("catalog.sites.{site}{m}")))?;
                cat.set_override(site, opts);
            }
        }
        Ok(cat)
    }

    /// Names of sites with an override that are not in `sites` (likely typos).
    pub fn unknown_overrides(&self, sites: &[SiteInfo]) -> Vec<String> {
        self.overrides
            .keys()
            .filter(|k| !sites.iter().any(|s| &s.name == *k))
            .cloned()
            .collect()
    }

    /// The options of a site: its override, else the entry for its side (square maps), else
    /// the fallback; clipped to the map, duplicates removed, then identity (and zero).
    pub fn options(&self, site: &SiteInfo) -> Vec<PatchOption> {
        let (h, w) = (site.height, site.width);
        let base = match self.overrides.get(&site.name) {
            Some(o) => o.clone(),
            None => match (h == w).then(|| self.by_side.get(&h)).flatten() {
                Some(o) => o.clone(),
                None => fallback(h, w),
            },
        };
        let mut out: Vec<PatchOption> = Vec::with_capacity(base.len() + 2);
        let extra = [
            Some(PatchOption::Identity),
            self.include_zero.then_some(PatchOption::Zero),
        ];
        for o in base
            .iter()
            .map(|o| o.clipped(h, w))
            .chain(extra.into_iter().flatten())
        {
            if !out.contains(&o) {
                out.push(o);
            }
        }
        out
    }
}

/// docs/method.md 3 fallback for maps whose side has no catalog entry: every (bh, bw) with
/// bh, bw <= 8 plus the squares of a quarter, half and the whole side, clipped to the map.
pub fn fallback(h: usize, w: usize) -> Vec<PatchOption> {
    let mut out = Vec::new();
    let mut push = |o: PatchOption| {
        let o = o.clipped(h, w);
        if !out.contains(&o) {
            out.push(o);
        }
    };
    for bh in 1..=h.min(8) {
        for bw in 1..=w.min(8) {
            push(PatchOption::patch(bh as u32, bw as u32));
        }
    }
    for s in [h, w] {
        for d in [4, 2, 1] {
            if s % d == 0 && s / d > 0 {
                push(PatchOption::patch((s / d) as u32, (s / d) as u32));
            }
        }
    }
    out.sort_by_key(|o| match o {
        PatchOption::Patch { bh, bw } => (bh * bw, *bh, *bw),
        _ => (u32::MAX, 0, 0),
    });
    out
}

/// Parses a JSON list of options; the error is a suffix like `[3]: expected ...`.
fn parse_list(v: &serde_json::Value) -> std::result::Result<Vec<PatchOption>, String> {
    let arr = v
        .as_array()
        .ok_or_else(|| format!(": expected a list of options, got {v}"))?;
    arr.iter()
        .enumerate()
        .map(|(i, o)| {
            let parsed = match o {
                serde_json::Value::String(s) => PatchOption::parse(s),
                _ => PatchOption::from_json(o),
            };
            parsed.ok_or_else(|| {
                format!("[{i}]: expected [bh, bw] with bh, bw >= 1, \"BHxBW\", \"identity\" or \"zero\", got {o}")
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(h: usize, w: usize) -> SiteInfo {
        SiteInfo {
            name: "s".into(),
            channels: 1,
            height: h,
            width: w,
        }
    }

    #[test]
    fn builtin_sides_and_identity() {
        let c = Catalog::builtin();
        let o = c.options(&site(2, 2));
        assert_eq!(o.len(), 5);
        assert_eq!(o.last(), Some(&PatchOption::Identity));
        // The 14 catalog lists (4, 15): clipped to (4, 14), which is also listed, so once.
        let o14 = c.options(&site(14, 14));
        assert!(o14.iter().all(|o| o.fits(14, 14)));
        assert_eq!(
            o14.iter()
                .filter(|o| **o == PatchOption::patch(4, 14))
                .count(),
            1
        );
    }

    #[test]
    fn fallback_rule() {
        // 12 is not in the file: bh, bw <= 8 (3x3 and 6x6 among them), 12x12, identity.
        let o = Catalog::builtin().options(&site(12, 12));
        assert_eq!(o.len(), 64 + 1 + 1);
        assert!(o.contains(&PatchOption::patch(12, 12)));
        assert!(o.contains(&PatchOption::patch(6, 6)));
        // Non-square map: everything fits.
        let o = Catalog::builtin().options(&site(3, 10));
        assert!(o.iter().all(|o| o.fits(3, 10)));
        assert!(o.contains(&PatchOption::patch(3, 8)));
    }

    #[test]
    fn overrides_from_config() {
        let t: toml::Table =
            toml::from_str("zero = true\n[sites]\ns = [\"2x2\", [1, 3], \"identity\"]\n").unwrap();
        let c = Catalog::from_config(Some(&t), Path::new("x.toml")).unwrap();
        let o = c.options(&site(4, 4));
        assert_eq!(
            o,
            vec![
                PatchOption::patch(2, 2),
                PatchOption::patch(1, 3),
                PatchOption::Identity,
                PatchOption::Zero
            ]
        );
        let bad: toml::Table = toml::from_str("[sites]\ns = [\"2y2\"]\n").unwrap();
        let e = Catalog::from_config(Some(&bad), Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("catalog.sites.s[0]"), "{e}");
    }
}
