//! ONNX graph -> brelu graph. The network part of the file (convolutions, batch norms, ReLUs,
//! pools, ...) becomes [`Op`]s; the shape arithmetic PyTorch's exporter writes around resizes and
//! paddings (`Shape`, `Gather`, `Slice`, `Concat`, ...) is evaluated here, once, at the file's
//! static input size.
use super::consts::{self, attr_i, axis, tensor_const, Const, Data};
use super::proto::{attr_type, ModelProto, NodeProto};
use super::Param;
use crate::error::{Error, Result};
use crate::models::graph::{Graph, GraphBuilder, Op, Shape, Slot};
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

/// A value during import.
#[derive(Clone, Debug)]
pub(super) enum Val {
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

pub(super) struct Importer {
    pub(super) path: PathBuf,
    pub(super) vals: HashMap<String, Val>,
    pub(super) g: GraphBuilder,
    pub(super) input: [usize; 3],
    pub(super) batch: usize,
    pub(super) params: Vec<Param>,
    pub(super) names: HashSet<String>,
    pub(super) sites: HashSet<String>,
    /// Linear ops (by output slot) whose bias an `Add` of a constant may still fill: the bias
    /// parameter's index in `params`.
    pub(super) open_bias: HashMap<Slot, usize>,
    pub(super) relu6: usize,
}

/// The error for node `node`.
pub(super) fn bad(path: &Path, node: &NodeProto, msg: impl Into<String>) -> Error {
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

    /// The error for node `node` of this file.
    pub(super) fn bad(&self, node: &NodeProto, msg: impl Into<String>) -> Error {
        bad(&self.path, node, msg)
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

    pub(super) fn shape(&self, s: Slot) -> Result<Shape> {
        // The dry run of the graph so far; imported networks are small enough to redo it per
        // op.
        Ok(self.g.graph().infer_shapes(self.input)?[s].clone())
    }

    /// The value an input names (`None` for an omitted optional input).
    pub(super) fn get(&self, node: &NodeProto, i: usize) -> Result<Option<Val>> {
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

    pub(super) fn net(&self, node: &NodeProto, i: usize) -> Result<Slot> {
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

    pub(super) fn konst(&self, node: &NodeProto, i: usize) -> Result<Const> {
        match self.get(node, i)? {
            Some(Val::Const(c)) => Ok(c),
            _ => Err(bad(
                &self.path,
                node,
                format!("input {i} must be a constant (an initializer or shape arithmetic)"),
            )),
        }
    }

    pub(super) fn opt_konst(&self, node: &NodeProto, i: usize) -> Result<Option<Const>> {
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
    pub(super) fn param_name(&mut self, node: &NodeProto) -> String {
        let mut base = module_path(&node.name);
        if base.is_empty() {
            base = node.op_type.to_ascii_lowercase();
        }
        unique(&mut self.names, base)
    }

    pub(super) fn add_param(&mut self, name: String, dims: Vec<usize>, data: Vec<f32>) -> usize {
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
            "BatchNormalization" => self.batch_norm(node)?,
            "Relu" => Val::Net(self.site(node)?),
            "Clip" => self.clip(node)?,
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
            "Reshape" => self.reshape(node)?,
            "Gemm" => self.gemm(node)?,
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
            "Pad" => self.pad(node)?,
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
    pub(super) fn site(&mut self, node: &NodeProto) -> Result<Slot> {
        let x = self.net(node, 0)?;
        let mut name = module_path(&node.name);
        if name.is_empty() {
            name = format!("relu{}", self.sites.len());
        }
        let name = unique(&mut self.sites, name);
        Ok(self.g.act(x, &name))
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
        consts::eval(node, &ins).map_err(err)
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
