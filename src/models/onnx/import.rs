//! ONNX graph -> brelu graph. The network part of the file (convolutions, batch norms, ReLUs,
//! pools, ...) becomes [`Op`]s; the shape arithmetic PyTorch's exporter writes around resizes and
//! paddings (`Shape`, `Gather`, `Slice`, `Concat`, ...) is evaluated here, once, at the file's
//! static input size.
use super::proto::{attr_type, data_type, AttributeProto, ModelProto, NodeProto, TensorProto};
use super::Param;
use crate::error::{Error, Result};
use crate::models::graph::{Graph, GraphBuilder, Op, ResizeTo, Shape, Slot};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// A network read from an ONNX file.
#[derive(Debug)]
pub struct Imported {
    pub graph: Graph,
    pub input: [usize; 3],
    pub classes: usize,
    pub params: Vec<Param>,
    /// Clip(0, 6) nodes imported as ReLU sites.
    pub relu6: usize,
}

/// A constant tensor (an initializer, a `Constant` or the result of shape arithmetic).
#[derive(Clone, Debug, PartialEq)]
struct Const {
    dims: Vec<usize>,
    data: Data,
}

#[derive(Clone, Debug, PartialEq)]
enum Data {
    F(Vec<f32>),
    I(Vec<i64>),
}

impl Const {
    fn ints(v: Vec<i64>) -> Const {
        Const {
            dims: vec![v.len()],
            data: Data::I(v),
        }
    }

    fn len(&self) -> usize {
        match &self.data {
            Data::F(v) => v.len(),
            Data::I(v) => v.len(),
        }
    }

    fn as_f32(&self) -> Vec<f32> {
        match &self.data {
            Data::F(v) => v.clone(),
            Data::I(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    fn as_i64(&self) -> Vec<i64> {
        match &self.data {
            Data::F(v) => v.iter().map(|&x| x as i64).collect(),
            Data::I(v) => v.clone(),
        }
    }

    /// Picks elements by flat index (gathers, slices, transposes).
    fn pick(&self, dims: Vec<usize>, idx: impl Iterator<Item = usize>) -> Const {
        let data = match &self.data {
            Data::F(v) => Data::F(idx.map(|i| v[i]).collect()),
            Data::I(v) => Data::I(idx.map(|i| v[i]).collect()),
        };
        Const { dims, data }
    }
}

/// A value during import.
#[derive(Clone, Debug)]
enum Val {
    /// A network tensor (per-sample shape from the dry run).
    Net(Slot),
    /// A network tensor with a zero padding still to apply [top, left, bottom, right]; only a
    /// convolution can take it (it adds the padding to its own).
    Padded(Slot, [usize; 4]),
    Const(Const),
}

/// Reads `path` and imports its network.
pub fn import_file(path: &Path) -> Result<Imported> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let model = <ModelProto as prost::Message>::decode(bytes.as_slice())
        .map_err(|e| Error::parse(path, format!("not an ONNX model (protobuf: {e})")))?;
    Importer::new(path).run(&model)
}

struct Importer {
    path: PathBuf,
    vals: HashMap<String, Val>,
    g: GraphBuilder,
    input: [usize; 3],
    batch: usize,
    params: Vec<Param>,
    names: HashSet<String>,
    sites: HashSet<String>,
    /// Linear ops (by output slot) whose bias an `Add` of a constant may still fill: the bias
    /// parameter's index in `params`.
    open_bias: HashMap<Slot, usize>,
    relu6: usize,
}

/// The error for node `node`.
fn bad(path: &Path, node: &NodeProto, msg: impl Into<String>) -> Error {
    Error::Onnx {
        path: path.to_path_buf(),
        node: if node.name.is_empty() {
            format!("<{}>", node.op_type)
        } else {
            node.name.clone()
        },
        msg: msg.into(),
    }
}

/// The PyTorch module path of a node from the scope name `torch.onnx.export` gives it:
/// `/layer1/layer1.0/relu_1/Relu` -> `layer1.0.relu_1`,
/// `/features/features.1/conv/conv.0/conv.0.0/Conv` -> `features.1.conv.0.0`. Each scope part
/// is named relative to the module of the part before it, unless it repeats that part's name
/// with a suffix (children of a `Sequential`), which then stands for that part.
pub fn module_path(node_name: &str) -> String {
    let parts: Vec<&str> = node_name.trim_start_matches('/').split('/').collect();
    let scopes = &parts[..parts.len().saturating_sub(1)];
    let (mut base, mut full, mut prev) = (String::new(), String::new(), "");
    for part in scopes.iter().filter(|p| !p.is_empty()) {
        if prev.is_empty() || !part.starts_with(&format!("{prev}.")) {
            base = full.clone();
        }
        full = if base.is_empty() {
            part.to_string()
        } else {
            format!("{base}.{part}")
        };
        prev = part;
    }
    full.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .split('.')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(".")
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn attr_i(node: &NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name)
        .filter(|a| a.r#type == attr_type::INT)
        .map_or(default, |a| a.i)
}

fn attr_f(node: &NodeProto, name: &str, default: f32) -> f32 {
    attr(node, name)
        .filter(|a| a.r#type == attr_type::FLOAT)
        .map_or(default, |a| a.f)
}

fn attr_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name)
        .filter(|a| a.r#type == attr_type::INTS)
        .map(|a| a.ints.clone())
}

fn attr_s(node: &NodeProto, name: &str, default: &str) -> String {
    attr(node, name)
        .filter(|a| a.r#type == attr_type::STRING)
        .map_or(default.to_string(), |a| {
            String::from_utf8_lossy(&a.s).into_owned()
        })
}

/// A tensor's values (ONNX stores them in a typed field or as little-endian raw bytes).
fn tensor_const(t: &TensorProto) -> std::result::Result<Const, String> {
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
    let n: usize = dims.iter().product();
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
        data_type::FLOAT => Data::F(
            chunks(4)?
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        ),
        data_type::DOUBLE if raw.is_empty() => {
            Data::F(t.double_data.iter().map(|&v| v as f32).collect())
        }
        data_type::DOUBLE => Data::F(
            chunks(8)?
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
        ),
        data_type::INT64 if raw.is_empty() => Data::I(t.int64_data.clone()),
        data_type::INT64 => Data::I(
            chunks(8)?
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        ),
        data_type::INT32 if raw.is_empty() => {
            Data::I(t.int32_data.iter().map(|&v| v as i64).collect())
        }
        data_type::INT32 => Data::I(
            chunks(4)?
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                .collect(),
        ),
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

/// Strides of a row-major shape.
fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// An axis attribute (negative counts from the end) as an index below `rank`.
fn axis(a: i64, rank: usize) -> Option<usize> {
    let a = if a < 0 { a + rank as i64 } else { a };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

impl Importer {
    fn new(path: &Path) -> Importer {
        Importer {
            path: path.to_path_buf(),
            vals: HashMap::new(),
            g: GraphBuilder::new(),
            input: [0; 3],
            batch: 1,
            params: Vec::new(),
            names: HashSet::new(),
            sites: HashSet::new(),
            open_bias: HashMap::new(),
            relu6: 0,
        }
    }

    fn file_err(&self, msg: impl Into<String>) -> Error {
        Error::parse(&self.path, msg)
    }

    fn run(mut self, model: &ModelProto) -> Result<Imported> {
        if let Some(op) = model
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        {
            if op.version < 11 {
                return Err(self.file_err(format!(
                    "opset {} is older than 11, the oldest brelu reads (export with \
                     opset_version >= 11)",
                    op.version
                )));
            }
        }
        let graph = model
            .graph
            .as_ref()
            .ok_or_else(|| self.file_err("the model has no graph"))?;
        for t in &graph.initializer {
            let c = tensor_const(t).map_err(|m| self.file_err(m))?;
            self.vals.insert(t.name.clone(), Val::Const(c));
        }
        let inputs: Vec<_> = graph
            .input
            .iter()
            .filter(|i| !self.vals.contains_key(&i.name))
            .collect();
        let [input] = inputs.as_slice() else {
            return Err(self.file_err(format!(
                "brelu imports networks with one image input, this one has {}",
                inputs.len()
            )));
        };
        let dims: Vec<Option<i64>> = input
            .r#type
            .as_ref()
            .and_then(|t| t.tensor_type.as_ref())
            .and_then(|t| t.shape.as_ref())
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| d.dim_value.filter(|&v| v > 0))
                    .collect()
            })
            .unwrap_or_default();
        match dims.as_slice() {
            [n, Some(c), Some(h), Some(w)] => {
                self.input = [*c as usize, *h as usize, *w as usize];
                self.batch = n.map_or(1, |n| n as usize);
            }
            _ => {
                return Err(self.file_err(format!(
                    "input '{}' must be [N, C, H, W] with fixed C, H and W, got {dims:?} \
                     (export with a fixed example input)",
                    input.name
                )))
            }
        }
        self.vals
            .insert(input.name.clone(), Val::Net(self.g.input()));
        for node in &graph.node {
            self.node(node)?;
        }
        let out = graph
            .output
            .first()
            .ok_or_else(|| self.file_err("the graph has no output"))?;
        let slot = match self.vals.get(&out.name) {
            Some(Val::Net(s)) => *s,
            _ => {
                return Err(self.file_err(format!(
                    "output '{}' is not computed from the input",
                    out.name
                )))
            }
        };
        let graph = self.g.finish(slot);
        let shapes = graph.infer_shapes(self.input)?;
        let classes = shapes[slot].first().copied().unwrap_or(0);
        if !matches!(shapes[slot].len(), 1 | 3) || graph.sites.is_empty() {
            return Err(Error::parse(
                &self.path,
                format!(
                    "expected a classifier ([N, classes]) or segmenter ([N, classes, H, W]) with \
                 ReLUs, got output {:?} and {} ReLUs",
                    shapes[slot],
                    graph.sites.len()
                ),
            ));
        }
        Ok(Imported {
            graph,
            input: self.input,
            classes,
            params: self.params,
            relu6: self.relu6,
        })
    }

    fn shape(&self, s: Slot) -> Result<Shape> {
        // The dry run of the graph so far; imported networks are small enough to redo it per
        // op.
        Ok(self.g.graph().infer_shapes(self.input)?[s].clone())
    }

    /// The value an input names (`None` for an omitted optional input).
    fn get(&self, node: &NodeProto, i: usize) -> Result<Option<Val>> {
        match node.input.get(i) {
            None => Ok(None),
            Some(n) if n.is_empty() => Ok(None),
            Some(n) => self
                .vals
                .get(n)
                .cloned()
                .map(Some)
                .ok_or_else(|| bad(&self.path, node, format!("input '{n}' is not defined"))),
        }
    }

    fn net(&self, node: &NodeProto, i: usize) -> Result<Slot> {
        match self.get(node, i)? {
            Some(Val::Net(s)) => Ok(s),
            Some(Val::Padded(..)) => Err(bad(
                &self.path,
                node,
                "a Pad output can only feed a Conv in brelu",
            )),
            _ => Err(bad(
                &self.path,
                node,
                format!("input {i} must be a tensor computed from the image"),
            )),
        }
    }

    fn konst(&self, node: &NodeProto, i: usize) -> Result<Const> {
        match self.get(node, i)? {
            Some(Val::Const(c)) => Ok(c),
            _ => Err(bad(
                &self.path,
                node,
                format!("input {i} must be a constant (an initializer or shape arithmetic)"),
            )),
        }
    }

    fn opt_konst(&self, node: &NodeProto, i: usize) -> Result<Option<Const>> {
        match self.get(node, i)? {
            None => Ok(None),
            Some(_) => self.konst(node, i).map(Some),
        }
    }

    fn set(&mut self, node: &NodeProto, v: Val) {
        if let Some(o) = node.output.first() {
            self.vals.insert(o.clone(), v);
        }
    }

    /// A unique parameter name for a node (its module path; `mul`, `mul_1`, ... without one).
    fn param_name(&mut self, node: &NodeProto) -> String {
        let mut base = module_path(&node.name);
        if base.is_empty() {
            base = node.op_type.to_ascii_lowercase();
        }
        unique(&mut self.names, base)
    }

    fn add_param(&mut self, name: String, dims: Vec<usize>, data: Vec<f32>) -> usize {
        self.params.push(Param { name, dims, data });
        self.params.len() - 1
    }

    fn node(&mut self, node: &NodeProto) -> Result<()> {
        if !(node.domain.is_empty() || node.domain == "ai.onnx") {
            return Err(bad(
                &self.path,
                node,
                format!(
                    "operator {}::{} is not standard ONNX",
                    node.domain, node.op_type
                ),
            ));
        }
        let path = self.path.clone();
        let err = move |m: String| bad(&path, node, m);
        let op = node.op_type.as_str();
        // Shape arithmetic on constants first.
        if let Some(c) = self.const_op(node)? {
            self.set(node, Val::Const(c));
            return Ok(());
        }
        let v = match op {
            "Identity" | "Dropout" => self
                .get(node, 0)?
                .ok_or_else(|| err("has no input".into()))?,
            "Conv" => Val::Net(self.conv(node)?),
            "BatchNormalization" => {
                let x = self.net(node, 0)?;
                if attr_i(node, "training_mode", 0) != 0 || node.output.len() > 1 {
                    return Err(err(
                        "batch norm in training mode (export in eval mode)".into()
                    ));
                }
                let c = self.shape(x)?.first().copied().unwrap_or(0);
                let name = self.param_name(node);
                for (i, field) in ["weight", "bias", "running_mean", "running_var"]
                    .iter()
                    .enumerate()
                {
                    let t = self.konst(node, i + 1)?;
                    if t.len() != c {
                        return Err(err(format!(
                            "{field} has {} values for {c} channels",
                            t.len()
                        )));
                    }
                    self.add_param(format!("{name}.{field}"), vec![c], t.as_f32());
                }
                let eps = attr_f(node, "epsilon", 1e-5) as f64;
                Val::Net(self.g.op(|y| Op::BatchNorm {
                    x,
                    y,
                    name,
                    channels: c,
                    eps,
                }))
            }
            "Relu" => Val::Net(self.site(node)?),
            "Clip" => {
                // Opset 11+ (the oldest brelu reads) gives the bounds as inputs 1 and 2.
                let lo = self.opt_konst(node, 1)?.map(|c| c.as_f32());
                let hi = self.opt_konst(node, 2)?.map(|c| c.as_f32());
                let lo = lo.and_then(|v| v.first().copied());
                let hi = hi.and_then(|v| v.first().copied());
                if lo != Some(0.0) || !hi.is_none_or(|h| h == 6.0) {
                    return Err(err(format!(
                        "Clip({lo:?}, {hi:?}): brelu imports Clip(0) and Clip(0, 6) (ReLU6, \
                         which becomes a ReLU site)"
                    )));
                }
                if hi.is_some() {
                    self.relu6 += 1;
                }
                Val::Net(self.site(node)?)
            }
            "Add" | "Sub" | "Mul" | "Div" => self.arith(node)?,
            "MaxPool" | "AveragePool" => Val::Net(self.pool(node)?),
            "GlobalAveragePool" => {
                let x = self.net(node, 0)?;
                Val::Net(self.g.global_avg_pool_keepdim(x))
            }
            "Flatten" => {
                let x = self.net(node, 0)?;
                if attr_i(node, "axis", 1) != 1 {
                    return Err(err("Flatten with axis other than 1".into()));
                }
                Val::Net(self.g.op(|y| Op::Flatten { x, y }))
            }
            "Reshape" => {
                let x = self.net(node, 0)?;
                let target = self.konst(node, 1)?.as_i64();
                let s = self.shape(x)?;
                let numel: usize = s.iter().product();
                let same = target.len() == s.len() + 1
                    && target[1..]
                        .iter()
                        .zip(&s)
                        .all(|(&t, &d)| t == d as i64 || t == 0);
                let flat = target.len() == 2 && (target[1] == -1 || target[1] == numel as i64);
                if same {
                    Val::Net(x)
                } else if flat {
                    Val::Net(self.g.op(|y| Op::Flatten { x, y }))
                } else {
                    return Err(err(format!(
                        "Reshape of a {s:?} map to {target:?}: brelu reshapes only to \
                         [N, -1] (flatten)"
                    )));
                }
            }
            "Gemm" => {
                let x = self.net(node, 0)?;
                let w = self.konst(node, 1)?;
                let b = self.opt_konst(node, 2)?;
                if attr_f(node, "alpha", 1.0) != 1.0
                    || attr_f(node, "beta", 1.0) != 1.0
                    || attr_i(node, "transA", 0) != 0
                {
                    return Err(err("Gemm with alpha, beta or transA set".into()));
                }
                let trans_b = attr_i(node, "transB", 0) != 0;
                Val::Net(self.linear(node, x, &w, trans_b, b)?)
            }
            "MatMul" => {
                let x = self.net(node, 0)?;
                let w = self.konst(node, 1)?;
                Val::Net(self.linear(node, x, &w, false, None)?)
            }
            "Concat" => {
                let rank = self.shape(self.net(node, 0)?)?.len() + 1;
                if axis(attr_i(node, "axis", 1), rank) != Some(1) || rank != 4 {
                    return Err(err(
                        "Concat of maps along an axis other than channels".into()
                    ));
                }
                let xs = (0..node.input.len())
                    .map(|i| self.net(node, i))
                    .collect::<Result<Vec<_>>>()?;
                Val::Net(self.g.concat(&xs))
            }
            "Resize" | "Upsample" => Val::Net(self.resize(node)?),
            "Pad" => {
                let x = self.net(node, 0)?;
                let mode = attr_s(node, "mode", "constant");
                let pads = match self.opt_konst(node, 1)? {
                    Some(p) => p.as_i64(),
                    None => attr_ints(node, "pads").unwrap_or_default(),
                };
                let value = self.opt_konst(node, 2)?.map(|c| c.as_f32());
                if mode != "constant" || value.is_some_and(|v| v.iter().any(|&x| x != 0.0)) {
                    return Err(err(format!("Pad mode {mode}: brelu pads with zeros only")));
                }
                match pads.as_slice() {
                    [0, 0, t, l, 0, 0, b, r] if [t, l, b, r].iter().all(|&&p| p >= 0) => {
                        Val::Padded(x, [*t as usize, *l as usize, *b as usize, *r as usize])
                    }
                    _ => {
                        return Err(err(format!(
                            "pads {pads:?}: brelu pads height and width only, by >= 0"
                        )))
                    }
                }
            }
            other => {
                return Err(err(format!(
                    "operator {other} is not supported (brelu imports Conv, BatchNormalization, \
                     Relu, Clip, Add, Sub, Mul, Div, MaxPool, AveragePool, GlobalAveragePool, \
                     Flatten, Reshape, Gemm, MatMul, Concat, Resize, Pad, Identity, Dropout, \
                     Constant and shape arithmetic on constants)"
                )))
            }
        };
        self.set(node, v);
        Ok(())
    }

    /// A ReLU site named after the node's module path, unique.
    fn site(&mut self, node: &NodeProto) -> Result<Slot> {
        let x = self.net(node, 0)?;
        let mut name = module_path(&node.name);
        if name.is_empty() {
            name = format!("relu{}", self.sites.len());
        }
        let name = unique(&mut self.sites, name);
        Ok(self.g.act(x, &name))
    }

    fn conv(&mut self, node: &NodeProto) -> Result<Slot> {
        let path = self.path.clone();
        let err = move |m: String| bad(&path, node, m);
        let (x, extra) = match self.get(node, 0)? {
            Some(Val::Padded(x, p)) => (x, p),
            _ => (self.net(node, 0)?, [0; 4]),
        };
        let w = self.konst(node, 1)?;
        let b = self.opt_konst(node, 2)?;
        let s = self.shape(x)?;
        let [cout, cin_g, kh, kw] = w.dims[..] else {
            return Err(err(format!("weight of shape {:?}, expected 4-D", w.dims)));
        };
        let groups = attr_i(node, "group", 1).max(1) as usize;
        let pair = |name: &str, default: usize| -> Result<[usize; 2]> {
            match attr_ints(node, name).as_deref() {
                None => Ok([default; 2]),
                Some([a, b]) if *a >= 1 && *b >= 1 => Ok([*a as usize, *b as usize]),
                Some(v) => Err(err(format!("{name} {v:?}: expected two values >= 1"))),
            }
        };
        let stride = pair("strides", 1)?;
        let dilation = pair("dilations", 1)?;
        if attr_s(node, "auto_pad", "NOTSET") != "NOTSET" {
            return Err(err(
                "auto_pad is not supported (export with explicit pads)".into()
            ));
        }
        let p = attr_ints(node, "pads").unwrap_or_else(|| vec![0; 4]);
        let p: Vec<usize> = match p.as_slice() {
            [t, l, b, r] if [t, l, b, r].iter().all(|&&v| v >= 0) => {
                vec![*t as usize, *l as usize, *b as usize, *r as usize]
            }
            _ => return Err(err(format!("pads {p:?}: expected four values >= 0"))),
        };
        let pads: Vec<usize> = p.iter().zip(extra).map(|(a, b)| a + b).collect();
        if pads[0] != pads[2] || pads[1] != pads[3] {
            return Err(err(format!(
                "asymmetric padding {pads:?} (top, left, bottom, right): brelu pads both sides \
                 alike"
            )));
        }
        if s.len() != 3 || cin_g * groups != s[0] || cout % groups != 0 {
            return Err(err(format!(
                "weight {:?} with {groups} groups does not fit input {s:?}",
                w.dims
            )));
        }
        let name = self.param_name(node);
        self.add_param(format!("{name}.weight"), w.dims.clone(), w.as_f32());
        if let Some(b) = &b {
            if b.len() != cout {
                return Err(err(format!(
                    "bias has {} values for {cout} outputs",
                    b.len()
                )));
            }
            self.add_param(format!("{name}.bias"), vec![cout], b.as_f32());
        }
        let cin = s[0];
        Ok(self.g.op(|y| Op::Conv {
            x,
            y,
            name,
            cin,
            cout,
            kernel: [kh, kw],
            stride,
            pad: [pads[0], pads[1]],
            dilation,
            groups,
            bias: b.is_some(),
        }))
    }

    fn linear(
        &mut self,
        node: &NodeProto,
        x: Slot,
        w: &Const,
        trans: bool,
        b: Option<Const>,
    ) -> Result<Slot> {
        let path = self.path.clone();
        let err = move |m: String| bad(&path, node, m);
        let s = self.shape(x)?;
        let [r, c] = w.dims[..] else {
            return Err(err(format!("weight of shape {:?}, expected 2-D", w.dims)));
        };
        // brelu keeps [out, in] (PyTorch's layout); ONNX's B is [in, out] unless transposed.
        let (cout, cin) = if trans { (r, c) } else { (c, r) };
        if s != [cin] {
            return Err(err(format!(
                "a [{cin}] input expected (flatten first), got {s:?}"
            )));
        }
        let weight = if trans {
            w.as_f32()
        } else {
            let v = w.as_f32();
            (0..cout)
                .flat_map(|o| (0..cin).map(move |i| (o, i)))
                .map(|(o, i)| v[i * cout + o])
                .collect()
        };
        let bias = match &b {
            Some(b) if b.len() == cout => b.as_f32(),
            Some(b) if b.len() == 1 => vec![b.as_f32()[0]; cout],
            Some(b) => return Err(err(format!("bias has {} values for {cout}", b.len()))),
            None => vec![0.0; cout],
        };
        let name = self.param_name(node);
        self.add_param(format!("{name}.weight"), vec![cout, cin], weight);
        let bi = self.add_param(format!("{name}.bias"), vec![cout], bias);
        let y = self.g.linear(x, &name, cin, cout);
        if b.is_none() {
            self.open_bias.insert(y, bi);
        }
        Ok(y)
    }

    /// Add, Sub, Mul and Div: of two network tensors (Add only), or of one with a constant
    /// per channel or scalar, which becomes a depthwise 1x1 convolution (a bias for Add and
    /// Sub, a scale for Mul and Div) that both training and secure inference run as it is.
    fn arith(&mut self, node: &NodeProto) -> Result<Val> {
        let path = self.path.clone();
        let err = move |m: String| bad(&path, node, m);
        let op = node.op_type.as_str();
        let (a, b) = (self.get(node, 0)?, self.get(node, 1)?);
        let (x, c, const_first) = match (a, b) {
            (Some(Val::Net(a)), Some(Val::Net(b))) if op == "Add" => {
                let (sa, sb) = (self.shape(a)?, self.shape(b)?);
                if sa != sb {
                    return Err(err(format!("Add of {sa:?} and {sb:?} (no broadcasting)")));
                }
                return Ok(Val::Net(self.g.add(a, b)));
            }
            (Some(Val::Net(x)), Some(Val::Const(c))) => (x, c, false),
            (Some(Val::Const(c)), Some(Val::Net(x))) => (x, c, true),
            _ => {
                return Err(err(format!(
                    "{op} of two network tensors: brelu supports Add of two tensors and \
                     {op} with a constant"
                )))
            }
        };
        if const_first && matches!(op, "Sub" | "Div") {
            return Err(err(format!("{op} with the constant first")));
        }
        let s = self.shape(x)?;
        let ch = s.first().copied().unwrap_or(0);
        let v = c.as_f32();
        // Which element of `c` channel k uses: scalar, or one per channel laid out as [C],
        // [C, 1, 1] or [1, C, 1, 1].
        let per_channel = v.len() == ch && c.dims.iter().filter(|&&d| d != 1).count() <= 1 && {
            let rank = c.dims.len();
            (s.len() == 3 && rank >= 3 && c.dims[rank - 3] == ch)
                || (s.len() == 1 && rank >= 1 && c.dims[rank - 1] == ch)
                || ch == 1
        };
        let vals: Vec<f32> = match v.len() {
            1 => vec![v[0]; ch],
            _ if per_channel => v,
            _ => {
                return Err(err(format!(
                    "{op} with a constant of shape {:?} on a {s:?} tensor: brelu supports \
                     scalars and one value per channel",
                    c.dims
                )))
            }
        };
        // Add of a constant right after a MatMul is that layer's bias.
        if matches!(op, "Add" | "Sub") && s.len() == 1 {
            if let Some(bi) = self.open_bias.remove(&x) {
                let sign = if op == "Sub" { -1.0 } else { 1.0 };
                for (dst, v) in self.params[bi].data.iter_mut().zip(&vals) {
                    *dst += sign * v;
                }
                return Ok(Val::Net(x));
            }
        }
        if s.len() != 3 {
            return Err(err(format!(
                "{op} with a constant on a {s:?} vector (brelu supports it on [C, H, W] maps)"
            )));
        }
        let (weight, bias) = match op {
            "Add" => (vec![1.0; ch], Some(vals)),
            "Sub" => (vec![1.0; ch], Some(vals.iter().map(|v| -v).collect())),
            "Mul" => (vals, None),
            _ => {
                if vals.contains(&0.0) {
                    return Err(err("Div by zero".into()));
                }
                (vals.iter().map(|v| 1.0 / v).collect(), None)
            }
        };
        let name = self.param_name(node);
        self.add_param(format!("{name}.weight"), vec![ch, 1, 1, 1], weight);
        let has_bias = bias.is_some();
        if let Some(b) = bias {
            self.add_param(format!("{name}.bias"), vec![ch], b);
        }
        Ok(Val::Net(self.g.op(|y| Op::Conv {
            x,
            y,
            name,
            cin: ch,
            cout: ch,
            kernel: [1, 1],
            stride: [1, 1],
            pad: [0, 0],
            dilation: [1, 1],
            groups: ch,
            bias: has_bias,
        })))
    }

    fn pool(&mut self, node: &NodeProto) -> Result<Slot> {
        let path = self.path.clone();
        let err = move |m: String| bad(&path, node, m);
        let x = self.net(node, 0)?;
        let square = |name: &str, default: i64| -> Result<usize> {
            let v = attr_ints(node, name).unwrap_or_else(|| vec![default; 2]);
            match v.as_slice() {
                [a, b] if a == b && *a >= 0 => Ok(*a as usize),
                [a, b, c, d] if a == b && b == c && c == d && *a >= 0 => Ok(*a as usize),
                _ => Err(err(format!(
                    "{name} {v:?}: brelu pools with square windows, strides and pads"
                ))),
            }
        };
        let kernel = square("kernel_shape", 0)?;
        let stride = square("strides", 1)?;
        let pad = square("pads", 0)?;
        if kernel == 0 || attr_i(node, "ceil_mode", 0) != 0 {
            return Err(err("needs a kernel_shape and ceil_mode 0".into()));
        }
        if attr_s(node, "auto_pad", "NOTSET") != "NOTSET" {
            return Err(err(
                "auto_pad is not supported (export with explicit pads)".into()
            ));
        }
        if node.op_type == "MaxPool" {
            if square("dilations", 1)? != 1 || node.output.len() > 1 {
                return Err(err("MaxPool with dilation or indices".into()));
            }
            Ok(self.g.max_pool(x, kernel, stride, pad))
        } else {
            let count_pad = attr_i(node, "count_include_pad", 0) != 0;
            Ok(self.g.op(|y| Op::AvgPool {
                x,
                y,
                kernel,
                stride,
                pad,
                count_pad,
            }))
        }
    }

    fn resize(&mut self, node: &NodeProto) -> Result<Slot> {
        let path = self.path.clone();
        let err = move |m: String| bad(&path, node, m);
        let x = self.net(node, 0)?;
        let s = self.shape(x)?;
        if s.len() != 3 {
            return Err(err(format!("resizes a [C, H, W] map, got {s:?}")));
        }
        let mode = attr_s(node, "mode", "nearest");
        let ctm = attr_s(node, "coordinate_transformation_mode", "half_pixel");
        let align_corners = match (mode.as_str(), ctm.as_str()) {
            ("linear" | "bilinear", "half_pixel" | "pytorch_half_pixel") => false,
            ("linear" | "bilinear", "align_corners") => true,
            _ => {
                return Err(err(format!(
                    "mode {mode} with coordinate_transformation_mode {ctm}: brelu resizes \
                     bilinearly (PyTorch's interpolate, align_corners either way)"
                )))
            }
        };
        // Upsample (opset < 10) and Resize-10 take scales as input 1; Resize-11+ has roi,
        // scales, sizes.
        let (scales, sizes) = if node.op_type == "Upsample" || node.input.len() == 2 {
            (self.opt_konst(node, 1)?, None)
        } else {
            (self.opt_konst(node, 2)?, self.opt_konst(node, 3)?)
        };
        let hw = match (sizes, scales) {
            (Some(z), _) if z.len() == 4 => {
                let z = z.as_i64();
                [z[2], z[3]]
            }
            (_, Some(c)) if c.len() == 4 => {
                let c = c.as_f32();
                if c[0] != 1.0 || c[1] != 1.0 {
                    return Err(err(format!("scales {c:?} change batch or channels")));
                }
                [
                    (s[1] as f32 * c[2]).floor() as i64,
                    (s[2] as f32 * c[3]).floor() as i64,
                ]
            }
            _ => return Err(err("needs constant 4-element scales or sizes".into())),
        };
        if hw.iter().any(|&v| v <= 0) {
            return Err(err(format!("output size {hw:?}")));
        }
        let to = ResizeTo::Size([hw[0] as usize, hw[1] as usize]);
        Ok(self.g.op(|y| Op::Resize {
            x,
            to,
            align_corners,
            y,
        }))
    }

    /// Evaluates a node whose inputs are all constants (or the shape of a network tensor).
    fn const_op(&self, node: &NodeProto) -> Result<Option<Const>> {
        let path = self.path.clone();
        let err = move |m: String| bad(&path, node, m);
        let op = node.op_type.as_str();
        if op == "Constant" {
            let a = node
                .attribute
                .first()
                .ok_or_else(|| err("Constant without a value".into()))?;
            return Ok(Some(match a.r#type {
                attr_type::TENSOR => {
                    tensor_const(a.t.as_ref().ok_or_else(|| err("empty tensor".into()))?)
                        .map_err(err)?
                }
                attr_type::FLOAT => Const {
                    dims: vec![],
                    data: Data::F(vec![a.f]),
                },
                attr_type::INT => Const {
                    dims: vec![],
                    data: Data::I(vec![a.i]),
                },
                attr_type::FLOATS => Const {
                    dims: vec![a.floats.len()],
                    data: Data::F(a.floats.clone()),
                },
                attr_type::INTS => Const::ints(a.ints.clone()),
                _ => return Err(err(format!("Constant attribute '{}'", a.name))),
            }));
        }
        if op == "Shape" {
            let dims: Vec<i64> = match self.get(node, 0)? {
                Some(Val::Net(s)) => std::iter::once(self.batch)
                    .chain(self.shape(s)?)
                    .map(|d| d as i64)
                    .collect(),
                Some(Val::Const(c)) => c.dims.iter().map(|&d| d as i64).collect(),
                _ => return Err(err("Shape of a padded tensor".into())),
            };
            let r = dims.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let start = clamp(attr_i(node, "start", 0));
            let end = clamp(attr_i(node, "end", r)).max(start);
            return Ok(Some(Const::ints(dims[start..end].to_vec())));
        }
        let mut ins = Vec::new();
        for i in 0..node.input.len() {
            match self.get(node, i)? {
                Some(Val::Const(c)) => ins.push(Some(c)),
                None => ins.push(None),
                Some(_) => return Ok(None),
            }
        }
        let Some(Some(x)) = ins.first().cloned() else {
            return Ok(None);
        };
        let input =
            |i: usize| -> Option<Vec<i64>> { ins.get(i).cloned().flatten().map(|c| c.as_i64()) };
        let c = match op {
            "Identity" => x,
            "Cast" => {
                let to = attr_i(node, "to", 0) as i32;
                match to {
                    data_type::FLOAT | data_type::DOUBLE => Const {
                        dims: x.dims.clone(),
                        data: Data::F(x.as_f32()),
                    },
                    _ => Const {
                        dims: x.dims.clone(),
                        data: Data::I(x.as_i64()),
                    },
                }
            }
            "Gather" => {
                let idx = ins
                    .get(1)
                    .cloned()
                    .flatten()
                    .ok_or_else(|| err("Gather without indices".into()))?;
                let rank = x.dims.len();
                let ax = axis(attr_i(node, "axis", 0), rank)
                    .ok_or_else(|| err("Gather axis out of range".into()))?;
                let (outer, n) = (x.dims[..ax].iter().product::<usize>(), x.dims[ax]);
                let inner: usize = x.dims[ax + 1..].iter().product();
                let mut picks = Vec::new();
                for &i in &idx.as_i64() {
                    let i = if i < 0 { i + n as i64 } else { i };
                    if !(0..n as i64).contains(&i) {
                        return Err(err(format!("Gather index {i} out of 0..{n}")));
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
                x.pick(dims, order.into_iter())
            }
            "Unsqueeze" | "Squeeze" => {
                let axes = input(1)
                    .or_else(|| attr_ints(node, "axes"))
                    .unwrap_or_default();
                let mut dims = x.dims.clone();
                if op == "Unsqueeze" {
                    let rank = dims.len() + axes.len();
                    let mut ax: Vec<usize> = axes
                        .iter()
                        .map(|&a| axis(a, rank).ok_or_else(|| err("bad axis".into())))
                        .collect::<Result<_>>()?;
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
                        .map(|&a| axis(a, rank).ok_or_else(|| err("bad axis".into())))
                        .collect::<Result<_>>()?;
                    dims = dims
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !ax.contains(i))
                        .map(|(_, &d)| d)
                        .collect();
                }
                Const { dims, data: x.data }
            }
            "Concat" => {
                let parts: Vec<Const> = ins.iter().flatten().cloned().collect();
                let rank = x.dims.len().max(1);
                if axis(attr_i(node, "axis", 0), rank) != Some(0) || rank != 1 {
                    return Err(err("Concat of constants other than 1-D".into()));
                }
                let float = parts.iter().any(|p| matches!(p.data, Data::F(_)));
                let n: usize = parts.iter().map(|p| p.len()).sum();
                Const {
                    dims: vec![n],
                    data: if float {
                        Data::F(parts.iter().flat_map(|p| p.as_f32()).collect())
                    } else {
                        Data::I(parts.iter().flat_map(|p| p.as_i64()).collect())
                    },
                }
            }
            "Reshape" => {
                let t = input(1).ok_or_else(|| err("Reshape without a shape".into()))?;
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
                if dims.iter().product::<usize>() != n {
                    return Err(err(format!("Reshape of {:?} to {t:?}", x.dims)));
                }
                Const { dims, data: x.data }
            }
            "Transpose" => {
                let rank = x.dims.len();
                let perm: Vec<usize> = attr_ints(node, "perm")
                    .map(|p| p.iter().map(|&a| a as usize).collect())
                    .unwrap_or_else(|| (0..rank).rev().collect());
                if perm.len() != rank || perm.iter().any(|&a| a >= rank) {
                    return Err(err(format!("perm {perm:?} for rank {rank}")));
                }
                let dims: Vec<usize> = perm.iter().map(|&a| x.dims[a]).collect();
                let (src, dst) = (strides(&x.dims), strides(&dims));
                let order = (0..x.len()).map(|flat| {
                    perm.iter()
                        .enumerate()
                        .map(|(j, &a)| (flat / dst[j]) % dims[j] * src[a])
                        .sum()
                });
                x.pick(dims.clone(), order.collect::<Vec<_>>().into_iter())
            }
            "Slice" => {
                let starts = input(1).ok_or_else(|| err("Slice without starts".into()))?;
                let ends = input(2).ok_or_else(|| err("Slice without ends".into()))?;
                let rank = x.dims.len();
                let axes = input(3).unwrap_or_else(|| (0..starts.len() as i64).collect());
                let steps = input(4).unwrap_or_else(|| vec![1; starts.len()]);
                if ends.len() != starts.len() || axes.len() != starts.len() {
                    return Err(err("Slice with inputs of different lengths".into()));
                }
                // Per axis, the indices kept (ONNX's clamping, negative steps included).
                let mut keep: Vec<Vec<usize>> = x.dims.iter().map(|&d| (0..d).collect()).collect();
                for k in 0..starts.len() {
                    let a = axis(axes[k], rank).ok_or_else(|| err("Slice axis".into()))?;
                    let (d, step) = (x.dims[a] as i64, steps.get(k).copied().unwrap_or(1));
                    let wrap = |v: i64| if v < 0 { v + d } else { v };
                    keep[a] = match step {
                        0 => return Err(err("Slice with step 0".into())),
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
                x.pick(dims, order.into_iter())
            }
            "ConstantOfShape" => {
                let dims: Vec<usize> = x.as_i64().iter().map(|&d| d.max(0) as usize).collect();
                let n: usize = dims.iter().product();
                let fill = attr(node, "value")
                    .and_then(|a| a.t.as_ref())
                    .map(tensor_const)
                    .transpose()
                    .map_err(err)?
                    .unwrap_or(Const {
                        dims: vec![1],
                        data: Data::F(vec![0.0]),
                    });
                Const {
                    dims,
                    data: match fill.data {
                        Data::F(v) => Data::F(vec![v.first().copied().unwrap_or(0.0); n]),
                        Data::I(v) => Data::I(vec![v.first().copied().unwrap_or(0); n]),
                    },
                }
            }
            "Add" | "Sub" | "Mul" | "Div" => {
                let y = ins
                    .get(1)
                    .cloned()
                    .flatten()
                    .ok_or_else(|| err(format!("{op} without a second input")))?;
                let (big, n) = if x.len() >= y.len() {
                    (&x, x.len())
                } else {
                    (&y, y.len())
                };
                if x.len() != n && x.len() != 1 || y.len() != n && y.len() != 1 {
                    return Err(err(format!(
                        "{op} of constants {:?} and {:?}",
                        x.dims, y.dims
                    )));
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
                Const {
                    dims: big.dims.clone(),
                    data,
                }
            }
            "Floor" | "Ceil" => {
                let f = x.as_f32();
                Const {
                    dims: x.dims.clone(),
                    data: Data::F(
                        f.iter()
                            .map(|v| if op == "Floor" { v.floor() } else { v.ceil() })
                            .collect(),
                    ),
                }
            }
            _ => return Ok(None),
        };
        Ok(Some(c))
    }
}

/// `base`, or `base_1`, `base_2`, ... whichever is not in `taken` yet (then taken).
fn unique(taken: &mut HashSet<String>, base: String) -> String {
    let mut name = base.clone();
    let mut k = 1;
    while taken.contains(&name) {
        name = format!("{base}_{k}");
        k += 1;
    }
    taken.insert(name.clone());
    name
}
