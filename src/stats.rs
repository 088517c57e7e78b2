//! Statistics for comparing methods: the paired difference of two methods measured on the same
//! seeds, with its Student-t confidence interval (issue 31: a difference is claimed only when
//! the interval excludes 0).
use serde::{Deserialize, Serialize};

/// Mean of `b - a` over paired runs and its two-sided 95% interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairedDiff {
    pub n: usize,
    pub mean: f64,
    /// Sample standard deviation of the differences (0 for one pair).
    pub sd: f64,
    pub lo: f64,
    pub hi: f64,
}

impl PairedDiff {
    /// Whether the interval excludes 0 (a difference outside the noise).
    pub fn significant(&self) -> bool {
        self.n > 1 && (self.lo > 0.0 || self.hi < 0.0)
    }
}

/// t quantiles at 0.975 for 1..=30 degrees of freedom.
const T975: [f64; 30] = [
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
    2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
    2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
    2.048407, 2.045230, 2.042272,
];

/// The 0.975 quantile of Student's t with `df` degrees of freedom (a table to 30, then the
/// Cornish-Fisher expansion around the normal quantile, within 1e-4 beyond).
pub fn t975(df: usize) -> f64 {
    match df {
        0 => f64::INFINITY,
        1..=30 => T975[df - 1],
        _ => t975_expansion(df),
    }
}

/// Cornish-Fisher: the normal quantile corrected to second order in 1/df.
fn t975_expansion(df: usize) -> f64 {
    let (z, d) = (1.959964f64, df as f64);
    z + (z.powi(3) + z) / (4.0 * d)
        + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * d * d)
}

/// The paired difference `b[i] - a[i]`; `None` when the lengths differ or there are none.
pub fn paired_diff(a: &[f64], b: &[f64]) -> Option<PairedDiff> {
    if a.len() != b.len() || a.is_empty() {
        return None;
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
    let n = d.len();
    let mean = d.iter().sum::<f64>() / n as f64;
    let sd = if n > 1 {
        (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    let half = if n > 1 {
        t975(n - 1) * sd / (n as f64).sqrt()
    } else {
        f64::INFINITY
    };
    Some(PairedDiff {
        n,
        mean,
        sd,
        lo: mean - half,
        hi: mean + half,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the interval written out by hand for three seeds, and the expansion against
    /// the table where both apply.
    #[test]
    fn paired_interval_matches_a_direct_computation() {
        let a = [80.1, 81.3, 79.8];
        let b = [81.4, 82.4, 81.3];
        let p = paired_diff(&a, &b).unwrap();
        // d = 1.3, 1.1, 1.5: mean 1.3, sd 0.2, half 4.302653 * 0.2 / sqrt(3) = 0.496828.
        assert!((p.mean - 1.3).abs() < 1e-9, "{p:?}");
        assert!((p.sd - 0.2).abs() < 1e-9, "{p:?}");
        assert!(
            (p.lo - 0.803172).abs() < 1e-5 && (p.hi - 1.796828).abs() < 1e-5,
            "{p:?}"
        );
        assert!(p.significant(), "{p:?}");
        let q = paired_diff(&[1.0, 2.0, 3.0], &[1.5, 1.5, 3.6]).unwrap();
        assert!(!q.significant(), "{q:?}");
        assert!(paired_diff(&[1.0], &[1.0, 2.0]).is_none());
        assert!(!paired_diff(&[1.0], &[5.0]).unwrap().significant());
        for df in [20, 25, 30] {
            let cf = t975_expansion(df);
            assert!(
                (cf - t975(df)).abs() < 5e-4,
                "df {df}: {cf} vs {}",
                t975(df)
            );
        }
        assert!((t975(1000) - 1.962339).abs() < 1e-4);
    }
}
