//! Constants during ONNX import: initializer and `Constant` values, node attributes, and the
//! shape arithmetic PyTorch's exporter writes (evaluated once, at the file's input size).
use super::proto::{attr_type, data_type, AttributeProto, NodeProto, TensorProto};

/// Errors are messages; the importer adds the file and the node.
type Res<T> = std::result::Result<T, String>;

/// A constant tensor (an initializer, a `Constant` or the result of shape arithmetic).
#[derive(Clone, Debug, PartialEq)]
pub struct Const {
    pub dims: Vec<usize>,
    pub data: Data,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F(Vec<f32>),
    I(Vec<i64>),
}

impl Const {
    pub fn ints(v: Vec<i64>) -> Const {
        Const {
            dims: vec![v.len()],
            data: Data::I(v),
        }
    }

    pub fn len(&self) -> usize {
        match &self.data {
            Data::F(v) => v.len(),
            Data::I(v) => v.len(),
        }
    }

    pub fn as_f32(&self) -> Vec<f32> {
        match &self.data {
            Data::F(v) => v.clone(),
            Data::I(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    pub fn as_i64(&self) -> Vec<i64> {
        match &self.data {
            Data::F(v) => v.iter().map(|&x| x as i64).collect(),
            Data::I(v) => v.clone(),
        }
    }

    /// Picks elements by flat index (gathers, slices, transposes).
    pub fn pick(&self, dims: Vec<usize>, idx: impl Iterator<Item = usize>) -> Const {
        let data = match &self.data {
            Data::F(v) => Data::F(idx.map(|i| v[i]).collect()),
            Data::I(v) => Data::I(idx.map(|i| v[i]).collect()),
        };
        Const { dims, data }
    }
}

pub fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

pub fn attr_i(node: &NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name)
        .filter(|a| a.r#type == attr_type::INT)
        .map_or(default, |a| a.i)
}

pub fn attr_f(node: &NodeProto, name: &str, default: f32) -> f32 {
    attr(node, name)
        .filter(|a| a.r#type == attr_type::FLOAT)
        .map_or(default, |a| a.f)
}

pub fn attr_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name)
        .filter(|a| a.r#type == attr_type::INTS)
        .map(|a| a.ints.clone())
}

pub fn attr_s(node: &NodeProto, name: &str, default: &str) -> String {
    attr(node, name)
        .filter(|a| a.r#type == attr_type::STRING)
        .map_or(default.to_string(), |a| {
            String::from_utf8_lossy(&a.s).into_owned()
        })
}

/// Little-endian values of `N` bytes each, converted by `f`.
fn le<const N: usize, T>(
    chunks: std::slice::ChunksExact<'_, u8>,
    f: impl Fn([u8; N]) -> T,
) -> Vec<T> {
    chunks
        .map(|c| f(c.try_into().expect("chunks of N bytes")))
        .collect()
}

/// A tensor's values (ONNX stores them in a typed field or as little-endian raw bytes).
pub fn tensor_const(t: &TensorProto) -> std::result::Result<Const, String> {
    if t.data_location == 1 || !t.external_data.is_empty() {
        return Err(format!(
            "tensor '{}' keeps its data in an external file, which brelu does not read (save \
             the model without external data)",
            t.name
        ));
    }
    let dims: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("tensor '{}': dim {d}", t.name)))
        .collect::<std::result::Result<_, _>>()?;
    let n = numel(&dims, usize::MAX)?;
    let raw = &t.raw_data;
    let chunks = |k: usize| -> std::result::Result<std::slice::ChunksExact<'_, u8>, String> {
        if raw.len() != n * k {
            return Err(format!(
                "tensor '{}': {} raw bytes for {n} elements of {k} bytes",
                t.name,
                raw.len()
            ));
        }
        Ok(raw.chunks_exact(k))
    };
    let data = match t.data_type {
        data_type::FLOAT if raw.is_empty() => Data::F(t.float_data.clone()),
        data_type::FLOAT => Data::F(le(chunks(4)?, f32::from_le_bytes)),
        data_type::DOUBLE if raw.is_empty() => {
            Data::F(t.double_data.iter().map(|&v| v as f32).collect())
        }
        data_type::DOUBLE => Data::F(le(chunks(8)?, |b| f64::from_le_bytes(b) as f32)),
        data_type::INT64 if raw.is_empty() => Data::I(t.int64_data.clone()),
        data_type::INT64 => Data::I(le(chunks(8)?, i64::from_le_bytes)),
        data_type::INT32 if raw.is_empty() => {
            Data::I(t.int32_data.iter().map(|&v| v as i64).collect())
        }
        data_type::INT32 => Data::I(le(chunks(4)?, |b| i32::from_le_bytes(b) as i64)),
        data_type::BOOL if raw.is_empty() => {
            Data::I(t.int32_data.iter().map(|&v| v as i64).collect())
        }
        data_type::BOOL => Data::I(chunks(1)?.map(|c| c[0] as i64).collect()),
        other => {
            return Err(format!(
                "tensor '{}' has ONNX data type {other}; brelu reads float, double, int32, \
                 int64 and bool tensors",
                t.name
            ))
        }
    };
    let c = Const { dims, data };
    if c.len() != n {
        return Err(format!(
            "tensor '{}': {} values for shape {:?}",
            t.name,
            c.len(),
            c.dims
        ));
    }
    Ok(c)
}

/// The element count of `dims`, refused when it overflows or exceeds `limit`.
fn numel(dims: &[usize], limit: usize) -> Res<usize> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= limit)
        .ok_or_else(|| format!("shape {dims:?} has too many elements"))
}

/// Computed constants are shape arithmetic: small.
const COMPUTED_LIMIT: usize = 1 << 24;

/// Strides of a row-major shape.
pub fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// An axis attribute (negative counts from the end) as an index below `rank`.
pub fn axis(a: i64, rank: usize) -> Option<usize> {
    let a = if a < 0 { a + rank as i64 } else { a };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

/// Evaluates node `node` of constant inputs `ins` (`None`: an omitted optional input); `None`
/// when it is not shape arithmetic brelu evaluates.
pub fn eval(node: &NodeProto, ins: &[Option<Const>]) -> Res<Option<Const>> {
    let Some(Some(x)) = ins.first().cloned() else {
        return Ok(None);
    };
    Ok(Some(match node.op_type.as_str() {
        "Identity" => x,
        "Cast" => cast(node, x, ins)?,
        "Gather" => gather(node, x, ins)?,
        "Unsqueeze" | "Squeeze" => unsqueeze(node, x, ins)?,
        "Concat" => concat(node, x, ins)?,
        "Reshape" => reshape(node, x, ins)?,
        "Transpose" => transpose(node, x, ins)?,
        "Slice" => slice(node, x, ins)?,
        "ConstantOfShape" => constant_of_shape(node, x, ins)?,
        "Add" | "Sub" | "Mul" | "Div" => arith(node, x, ins)?,
        "Floor" | "Ceil" => round(node, x, ins)?,
        _ => return Ok(None),
    }))
}

/// Input `i` as integers, if given.
fn input(ins: &[Option<Const>], i: usize) -> Option<Vec<i64>> {
    ins.get(i).cloned().flatten().map(|c| c.as_i64())
}

fn cast(node: &NodeProto, x: Const, _ins: &[Option<Const>]) -> Res<Const> {
    let to = attr_i(node, "to", 0) as i32;
    Ok(match to {
        data_type::FLOAT | data_type::DOUBLE => Const {
            dims: x.dims.clone(),
            data: Data::F(x.as_f32()),
        },
        _ => Const {
            dims: x.dims.clone(),
            data: Data::I(x.as_i64()),
        },
    })
}

fn gather(node: &NodeProto, x: Const, ins: &[Option<Const>]) -> Res<Const> {
    let idx = ins
        .get(1)
        .cloned()
        .flatten()
        .ok_or_else(|| "Gather without indices".to_string())?;
    let rank = x.dims.len();
    let ax = axis(attr_i(node, "axis", 0), rank)
        .ok_or_else(|| "Gather axis out of range".to_string())?;
    let (outer, n) = (x.dims[..ax].iter().product::<usize>(), x.dims[ax]);
    let inner: usize = x.dims[ax + 1..].iter().product();
    let mut picks = Vec::new();
    for &i in &idx.as_i64() {
        let i = if i < 0 { i + n as i64 } else { i };
        if !(0..n as i64).contains(&i) {
            return Err(format!("Gather index {i} out of 0..{n}"));
        }
        picks.push(i as usize);
    }
    let mut order = Vec::new();
    for o in 0..outer {
        for &i in &picks {
            order.extend((0..inner).map(|k| (o * n + i) * inner + k));
        }
    }
    let mut dims = x.dims[..ax].to_vec();
    dims.extend(&idx.dims);
    dims.extend(&x.dims[ax + 1..]);
    Ok(x.pick(dims, order.into_iter()))
}

fn unsqueeze(node: &NodeProto, x: Const, ins: &[Option<Const>]) -> Res<Const> {
    let op = node.op_type.as_str();
    let axes = input(ins, 1)
        .or_else(|| attr_ints(node, "axes"))
        .unwrap_or_default();
    let mut dims = x.dims.clone();
    if op == "Unsqueeze" {
        let rank = dims.len() + axes.len();
        let mut ax: Vec<usize> = axes
            .iter()
            .map(|&a| axis(a, rank).ok_or_else(|| "bad axis".to_string()))
            .collect::<Res<_>>()?;
        ax.sort_unstable();
        for a in ax {
            dims.insert(a, 1);
        }
    } else if axes.is_empty() {
        dims.retain(|&d| d != 1);
    } else {
        let rank = dims.len();
        let ax: Vec<usize> = axes
            .iter()
            .map(|&a| axis(a, rank).ok_or_else(|| "bad axis".to_string()))
            .collect::<Res<_>>()?;
        dims = dims
            .iter()
            .enumerate()
            .filter(|(i, _)| !ax.contains(i))
            .map(|(_, &d)| d)
            .collect();
    }
    Ok(Const { dims, data: x.data })
}

fn concat(node: &NodeProto, x: Const, ins: &[Option<Const>]) -> Res<Const> {
    let parts: Vec<Const> = ins.iter().flatten().cloned().collect();
    let rank = x.dims.len().max(1);
    if axis(attr_i(node, "axis", 0), rank) != Some(0) || rank != 1 {
        return Err("Concat of constants other than 1-D".into());
    }
    let float = parts.iter().any(|p| matches!(p.data, Data::F(_)));
    let n: usize = parts.iter().map(|p| p.len()).sum();
    Ok(Const {
        dims: vec![n],
        data: if float {
            Data::F(parts.iter().flat_map(|p| p.as_f32()).collect())
        } else {
            Data::I(parts.iter().flat_map(|p| p.as_i64()).collect())
        },
    })
}

fn reshape(_node: &NodeProto, x: Const, ins: &[Option<Const>]) -> Res<Const> {
    let t = input(ins, 1).ok_or_else(|| "Reshape without a shape".to_string())?;
    let n = x.len();
    let known: i64 = t
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            if d == 0 {
                x.dims.get(i).copied().unwrap_or(1) as i64
            } else {
                d
            }
        })
        .filter(|&d| d != -1)
        .product();
    let dims: Vec<usize> = t
        .iter()
        .enumerate()
        .map(|(i, &d)| match d {
            -1 => n / (known.max(1) as usize),
            0 => x.dims.get(i).copied().unwrap_or(1),
            d => d as usize,
        })
        .collect();
    if numel(&dims, usize::MAX).ok() != Some(n) {
        return Err(format!("Reshape of {:?} to {t:?}", x.dims));
    }
    Ok(Const { dims, data: x.data })
}

fn transpose(node: &NodeProto, x: Const, _ins: &[Option<Const>]) -> Res<Const> {
    let rank = x.dims.len();
    let perm: Vec<usize> = attr_ints(node, "perm")
        .map(|p| p.iter().map(|&a| a as usize).collect())
        .unwrap_or_else(|| (0..rank).rev().collect());
    let mut sorted = perm.clone();
    sorted.sort_unstable();
    if sorted != (0..rank).collect::<Vec<_>>() {
        return Err(format!("perm {perm:?} for rank {rank}"));
    }
    let dims: Vec<usize> = perm.iter().map(|&a| x.dims[a]).collect();
    let (src, dst) = (strides(&x.dims), strides(&dims));
    let order = (0..x.len()).map(|flat| {
        perm.iter()
            .enumerate()
            .map(|(j, &a)| (flat / dst[j]) % dims[j] * src[a])
            .sum()
    });
    Ok(x.pick(dims.clone(), order.collect::<Vec<_>>().into_iter()))
}

fn slice(_node: &NodeProto, x: Const, ins: &[Option<Const>]) -> Res<Const> {
    let starts = input(ins, 1).ok_or_else(|| "Slice without starts".to_string())?;
    let ends = input(ins, 2).ok_or_else(|| "Slice without ends".to_string())?;
    let rank = x.dims.len();
    let axes = input(ins, 3).unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = input(ins, 4).unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() {
        return Err("Slice with inputs of different lengths".into());
    }
    // Per axis, the indices kept (ONNX's clamping, negative steps included).
    let mut keep: Vec<Vec<usize>> = x.dims.iter().map(|&d| (0..d).collect()).collect();
    for k in 0..starts.len() {
        let a = axis(axes[k], rank).ok_or_else(|| "Slice axis".to_string())?;
        let (d, step) = (x.dims[a] as i64, steps.get(k).copied().unwrap_or(1));
        let wrap = |v: i64| if v < 0 { v + d } else { v };
        keep[a] = match step {
            0 => return Err("Slice with step 0".into()),
            s if s > 0 => {
                let (b, e) = (wrap(starts[k]).clamp(0, d), wrap(ends[k]).clamp(0, d));
                (b..e).step_by(s as usize).map(|i| i as usize).collect()
            }
            s => {
                let b = wrap(starts[k]).clamp(0, d - 1);
                let e = wrap(ends[k]).clamp(-1, d - 1);
                let mut v = Vec::new();
                let mut i = b;
                while i > e {
                    v.push(i as usize);
                    i += s;
                }
                v
            }
        };
    }
    let dims: Vec<usize> = keep.iter().map(|k| k.len()).collect();
    let (src, dst) = (strides(&x.dims), strides(&dims));
    let n: usize = dims.iter().product();
    let order: Vec<usize> = (0..n)
        .map(|flat| {
            (0..rank)
                .map(|j| keep[j][(flat / dst[j]) % dims[j]] * src[j])
                .sum()
        })
        .collect();
    Ok(x.pick(dims, order.into_iter()))
}

fn constant_of_shape(node: &NodeProto, x: Const, _ins: &[Option<Const>]) -> Res<Const> {
    let dims: Vec<usize> = x.as_i64().iter().map(|&d| d.max(0) as usize).collect();
    let n = numel(&dims, COMPUTED_LIMIT)?;
    let fill = attr(node, "value")
        .and_then(|a| a.t.as_ref())
        .map(tensor_const)
        .transpose()?
        .unwrap_or(Const {
            dims: vec![1],
            data: Data::F(vec![0.0]),
        });
    Ok(Const {
        dims,
        data: match fill.data {
            Data::F(v) => Data::F(vec![v.first().copied().unwrap_or(0.0); n]),
            Data::I(v) => Data::I(vec![v.first().copied().unwrap_or(0); n]),
        },
    })
}

fn arith(node: &NodeProto, x: Const, ins: &[Option<Const>]) -> Res<Const> {
    let op = node.op_type.as_str();
    let y = ins
        .get(1)
        .cloned()
        .flatten()
        .ok_or_else(|| format!("{op} without a second input"))?;
    let (big, n) = if x.len() >= y.len() {
        (&x, x.len())
    } else {
        (&y, y.len())
    };
    if x.len() != n && x.len() != 1 || y.len() != n && y.len() != 1 {
        return Err(format!("{op} of constants {:?} and {:?}", x.dims, y.dims));
    }
    let at = |c: &Const, i: usize| if c.len() == 1 { 0 } else { i };
    let data = match (&x.data, &y.data) {
        (Data::I(a), Data::I(b)) => Data::I(
            (0..n)
                .map(|i| {
                    let (p, q) = (a[at(&x, i)], b[at(&y, i)]);
                    match op {
                        "Add" => p + q,
                        "Sub" => p - q,
                        "Mul" => p * q,
                        _ if q == 0 => 0,
                        _ => p.div_euclid(q),
                    }
                })
                .collect(),
        ),
        _ => {
            let (a, b) = (x.as_f32(), y.as_f32());
            Data::F(
                (0..n)
                    .map(|i| {
                        let (p, q) = (a[at(&x, i)], b[at(&y, i)]);
                        match op {
                            "Add" => p + q,
                            "Sub" => p - q,
                            "Mul" => p * q,
                            _ => p / q,
                        }
                    })
                    .collect(),
            )
        }
    };
    Ok(Const {
        dims: big.dims.clone(),
        data,
    })
}

fn round(node: &NodeProto, x: Const, _ins: &[Option<Const>]) -> Res<Const> {
    let op = node.op_type.as_str();
    let f = x.as_f32();
    Ok(Const {
        dims: x.dims.clone(),
        data: Data::F(
            f.iter()
                .map(|v| if op == "Floor" { v.floor() } else { v.ceil() })
                .collect(),
        ),
    })
}
