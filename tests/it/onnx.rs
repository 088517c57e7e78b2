//! ONNX interop: import of networks PyTorch exported (fixtures written by
//! scripts/onnx_fixtures.py) and export checked with tract.
use brelu::models::{self, Model};
use std::path::PathBuf;
use tch::{Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/onnx")
        .join(name)
}

fn model_name(name: &str) -> String {
    format!("onnx:{}", fixture(&format!("{name}.onnx")).display())
}

/// Max |a - b| and max |b| over two tensors.
fn max_err(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let d = (a - b).abs().max().double_value(&[]);
    (d, b.abs().max().double_value(&[]))
}

/// What the fixture script recorded about a network (calls of ReLU modules, ReLUs per image).
fn recorded(name: &str) -> serde_json::Value {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("fixtures.json")).unwrap()).unwrap();
    meta[name].clone()
}

/// The fixture's batch through brelu's import, against PyTorch's logits; one site per call of
/// a ReLU module, with as many ReLUs per image as PyTorch's hooks counted.
fn imported_matches_pytorch(name: &str) {
    let model = Model::by_name(&model_name(name), Device::Cpu).unwrap();
    let meta = recorded(name);
    assert_eq!(
        model.sites().len() as u64,
        meta["relu_calls"].as_u64().unwrap(),
        "{name}"
    );
    let relus: usize = model
        .sites()
        .iter()
        .map(|s| s.channels * s.height * s.width)
        .sum();
    assert_eq!(
        relus as u64,
        meta["relus_per_image"].as_u64().unwrap(),
        "{name}"
    );
    let x = Tensor::read_npy(fixture(&format!("{name}.input.npy"))).unwrap();
    let want = Tensor::read_npy(fixture(&format!("{name}.logits.npy"))).unwrap();
    let got = tch::no_grad(|| model.forward_t(&x, false));
    assert_eq!(got.size(), want.size(), "{name}: logits shape");
    let (err, scale) = max_err(&got, &want);
    // Float32 with other kernels and summation orders (PyTorch ran on one CPU, this test may
    // run on another): 1e-4 of the largest logit. Measured on AVX-512: at most 4.5e-8.
    assert!(
        err <= 1e-4 * scale,
        "{name}: max abs error {err} (logits up to {scale})"
    );
}

#[test]
fn resnet18_import_matches_pytorch() {
    imported_matches_pytorch("resnet18-w16");
}

#[test]
fn mobilenet_v2_import_matches_pytorch() {
    imported_matches_pytorch("mobilenet_v2-w025");
}

#[test]
fn deeplab_import_matches_pytorch() {
    imported_matches_pytorch("deeplabv3-tiny");
}

#[test]
fn module_paths_follow_pytorch_scopes() {
    for (node, path) in [
        ("/layer1/layer1.0/relu/Relu", "layer1.0.relu"),
        ("/layer1/layer1.0/relu_1/Relu", "layer1.0.relu_1"),
        (
            "/features/features.1/conv/conv.0/conv.0.0/Conv",
            "features.1.conv.0.0",
        ),
        ("/aspp/convs.0/convs.0.2/Relu", "aspp.convs.0.2"),
        ("/relu/Relu", "relu"),
        ("/Mul", ""),
        ("", ""),
    ] {
        assert_eq!(models::onnx::module_path(node), path, "{node}");
    }
}

/// Runs an ONNX file with tract (a pure-Rust runtime) on `x` [N, C, H, W].
fn run_tract(path: &std::path::Path, x: &Tensor) -> Tensor {
    let dims: Vec<usize> = x.size().iter().map(|&d| d as usize).collect();
    let data = Vec::<f32>::try_from(x.flatten(0, -1)).unwrap();
    let (shape, values) = {
        use tract_onnx::prelude::*;
        let mut m = tract_onnx::onnx().model_for_path(path).unwrap();
        m.set_input_fact(0, f32::fact(&dims).into()).unwrap();
        let plan = m.into_optimized().unwrap().into_runnable().unwrap();
        let input = tract_ndarray::ArrayD::from_shape_vec(dims, data).unwrap();
        let out = plan.run(tvec!(Tensor::from(input).into())).unwrap();
        let view = out[0].to_plain_array_view::<f32>().unwrap();
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        (shape, view.iter().copied().collect::<Vec<f32>>())
    };
    Tensor::from_slice(&values).view(shape.as_slice())
}

/// brelu -> ONNX -> tract equals brelu's own forward, with the model's active options.
fn export_round_trip(model: &Model, x: &Tensor, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    models::onnx::export::write(model, &Default::default(), &path).unwrap();
    let want = tch::no_grad(|| model.forward_t(x, false));
    let got = run_tract(&path, x);
    assert_eq!(got.size(), want.size(), "{what}: output shape");
    let (err, scale) = max_err(&got, &want);
    assert!(
        err <= 1e-4 * scale.max(1.0),
        "{what}: max abs error {err} (outputs up to {scale})"
    );
}

/// Random weights and batch-norm statistics, so every parameter shows in the output.
fn randomise(model: &mut Model) {
    let _g = tch::no_grad_guard();
    for (name, mut t) in model.named_tensors() {
        let r = if name.ends_with("running_var") || name.ends_with(".weight") && t.dim() == 1 {
            Tensor::rand_like(&t) + 0.5
        } else {
            Tensor::randn_like(&t) * 0.1
        };
        t.copy_(&r);
    }
}

#[test]
fn export_round_trip_with_and_without_spec() {
    let _rng = crate::common::torch_rng();
    tch::manual_seed(7);
    let mut model = Model::by_name("resnet18-cifar-light", Device::Cpu).unwrap();
    randomise(&mut model);
    let [c, h, w] = model.config().input;
    let x = Tensor::randn(
        [2, c as i64, h as i64, w as i64],
        (tch::Kind::Float, Device::Cpu),
    );
    export_round_trip(&model, &x, "resnet18-cifar-light");
    let plain = tch::no_grad(|| model.forward_t(&x, false));
    crate::common::mixed_spec(&mut model);
    let blocked = tch::no_grad(|| model.forward_t(&x, false));
    // The spec changes the output, so the round trip below checks the block ReLUs too.
    assert!(max_err(&blocked, &plain).0 > 1e-2);
    export_round_trip(&model, &x, "resnet18-cifar-light with a mixed spec");
    // An imported segmenter: resizes both ways, padding-counting average pool, concat.
    let mut seg = Model::by_name(&model_name("deeplabv3-tiny"), Device::Cpu).unwrap();
    let x = Tensor::read_npy(fixture("deeplabv3-tiny.input.npy")).unwrap();
    export_round_trip(&seg, &x, "deeplabv3-tiny");
    crate::common::mixed_spec(&mut seg);
    export_round_trip(&seg, &x, "deeplabv3-tiny with a mixed spec");
}

/// The imported ResNet18 through the whole method: its weights from `brelu import onnx`,
/// distortion, knapsack at 10%, a one-epoch fine-tune, evaluation and a secure run that
/// agrees with plaintext.
#[test]
fn imported_model_runs_the_pipeline() {
    let _rng = crate::common::torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    crate::common::tiny_cifar10(dir);
    let weights = dir.join("imported.safetensors");
    let onnx = fixture("resnet18-w16.onnx");
    let (ok, out, err) = crate::common::brelu(&[
        "import",
        "onnx",
        onnx.to_str().unwrap(),
        "-o",
        weights.to_str().unwrap(),
    ]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("17 ReLU sites"), "{out}");
    let train = format!(
        "model = \"{}\"\nnum_classes = 10\ninput = [3, 32, 32]\nepochs = 1\nbatch_size = 8\n\
         seed = 3\n[dataset]\nkind = \"cifar10\"\npath = \"{}\"\n[optimizer]\nlr = 0.01\n\
         momentum = 0.9\nweight_decay = 1e-4\n[schedule]\nkind = \"cosine\"\n",
        model_name("resnet18-w16"),
        dir.display()
    );
    std::fs::write(dir.join("train.toml"), &train).unwrap();
    std::fs::write(dir.join("ft.toml"), &train).unwrap();
    let p = dir.join("pipeline.toml");
    std::fs::write(
        &p,
        "train = \"train.toml\"\nfinetune = \"ft.toml\"\nweights = \"imported.safetensors\"\n\
         ratios = [0.1]\nbaselines = false\n[distortion]\nsamples = 4\nbatch = 4\n\
         [secure]\nimages = 1\n",
    )
    .unwrap();
    let cfg = brelu::pipeline::PipelineConfig::load(&p).unwrap();
    let out = brelu::pipeline::run(&cfg, &dir.join("run"), None, &|_: &str| {}).unwrap();
    assert!(
        out.ran.contains(&"finetune-knapsack-10.00pct".to_string()),
        "{:?}",
        out.ran
    );
    assert_eq!(out.rows.len(), 2, "baseline and the knapsack spec");
    let relus = out.rows[0].drelus;
    let row = &out.rows[1];
    let spec = row.spec.as_ref().unwrap();
    assert!(row.drelus <= spec.budget && spec.budget == (relus as f64 * 0.1).floor() as u64);
    let s = row.secure.as_ref().unwrap();
    assert_eq!((s.images, s.agree_plaintext), (1, 1));
    assert_eq!(row.eval.images, 16);
}

/// The imported segmenter under secure inference with a mixed spec: its resizes (both
/// align-corners modes), padding-counting average pool and concatenations in the ring agree
/// with the float network and with the plaintext fixed-point pass.
#[test]
fn imported_segmenter_runs_securely() {
    use brelu::secure::plan::Settings;
    use brelu::secure::ring::Fixed;
    use brelu::secure::{run_compare, LinkConfig};
    let mut m = Model::by_name(&model_name("deeplabv3-tiny"), Device::Cpu).unwrap();
    crate::common::mixed_spec(&mut m);
    // Logits of order 10 (the fixture's are below 1), so the tolerances below are strict.
    for (name, mut t) in m.named_tensors() {
        if name.starts_with("head.3.") {
            let _ = tch::no_grad(|| t.g_mul_scalar_(40.0));
        }
    }
    let x = Tensor::read_npy(fixture("deeplabv3-tiny.input.npy")).unwrap();
    let img = Vec::<f32>::try_from(x.get(0).flatten(0, -1)).unwrap();
    let settings = Settings {
        fixed: Fixed { frac: 16 },
        ..Settings::default()
    };
    let r = run_compare(&m, &[img], None, settings, LinkConfig::default()).unwrap();
    let im = &r.images[0];
    let big = im
        .plaintext_logits
        .iter()
        .fold(0.0f64, |a, v| a.max(v.abs()));
    let (fixed_err, float_err) = (im.max_logit_error.unwrap(), im.max_float_error.unwrap());
    assert!(big > 0.5, "degenerate logits (max {big})");
    assert!(
        fixed_err < 0.01 && float_err < 0.05,
        "{fixed_err} {float_err} (logits to {big})"
    );
    assert!(im.pixel_agreement.unwrap() > 0.99);
}

/// `brelu export onnx` with and without a spec; the export without one imports back as the
/// same network (same site and parameter names, same outputs).
#[test]
fn export_cli_writes_onnx_and_spec_and_imports_back() {
    let _rng = crate::common::torch_rng();
    tch::manual_seed(11);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = crate::common::tiny_dataset(dir);
    // The tiny data set's configuration: resnet18-cifar-light at 1x8x8.
    let arch = models::find("resnet18-cifar-light").unwrap();
    let input = models::ArchConfig {
        input: [1, 8, 8],
        num_classes: 10,
    };
    let mut model = Model::new(arch, input, Device::Cpu).unwrap();
    randomise(&mut model);
    let weights = dir.join("w.safetensors");
    model.save_weights(&weights).unwrap();
    let spec = dir.join("spec.json");
    let (ok, out, err) = crate::common::brelu(&[
        "spec",
        "uniform",
        "--model",
        "resnet18-cifar-light",
        "--input",
        "1,8,8",
        "--patch",
        "2x2",
        "-o",
        spec.to_str().unwrap(),
    ]);
    assert!(ok, "{out}{err}");
    let (s, c, w) = (
        spec.to_str().unwrap(),
        cfg.to_str().unwrap(),
        weights.to_str().unwrap(),
    );
    let plain = dir.join("plain.onnx");
    let blocked = dir.join("blocked.onnx");
    let (ok, out, err) = crate::common::brelu(&[
        "export",
        "onnx",
        "-c",
        c,
        "-w",
        w,
        "-o",
        plain.to_str().unwrap(),
    ]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = crate::common::brelu(&[
        "export",
        "onnx",
        "-c",
        c,
        "-w",
        w,
        "-s",
        s,
        "-o",
        blocked.to_str().unwrap(),
    ]);
    assert!(ok, "{out}{err}");
    let beside = std::fs::read_to_string(dir.join("blocked.spec.json")).unwrap();
    assert_eq!(
        brelu::spec::Spec::from_json_str(&beside, None).unwrap(),
        brelu::spec::Spec::read(&spec).unwrap()
    );
    let x = Tensor::randn([3, 1, 8, 8], (tch::Kind::Float, Device::Cpu));
    // With the spec, tract runs the block ReLUs as brelu does.
    let spec_v = brelu::spec::Spec::read(&spec).unwrap();
    model.apply_spec(&spec_v).unwrap();
    let want = tch::no_grad(|| model.forward_t(&x, false));
    let (e, scale) = max_err(&run_tract(&blocked, &x), &want);
    assert!(e <= 1e-4 * scale.max(1.0), "{e}");
    model.clear_spec();
    // Without: brelu imports its own export back.
    let back = Model::by_name(&format!("onnx:{}", plain.display()), Device::Cpu).unwrap();
    let names = |m: &Model| m.sites().iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&back), names(&model));
    let params = |m: &Model| m.named_tensors().into_keys().collect::<Vec<_>>();
    assert_eq!(params(&back), params(&model));
    let want = tch::no_grad(|| model.forward_t(&x, false));
    let got = tch::no_grad(|| back.forward_t(&x, false));
    let (e, scale) = max_err(&got, &want);
    assert!(e <= 1e-5 * scale.max(1.0), "{e}");
}

/// Files brelu cannot import fail with the file, the node and the operator named; nothing
/// panics.
#[test]
fn unsupported_onnx_is_refused_naming_the_node() {
    use brelu::models::onnx::proto::ModelProto;
    use prost::Message;
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("resnet18-w16.onnx")).unwrap();
    let load = |name: &str, bytes: &[u8]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        models::find(&format!("onnx:{}", p.display()))
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let e = load("truncated.onnx", &bytes[..bytes.len() / 2]);
    assert!(
        e.contains("truncated.onnx") && e.contains("not an ONNX model"),
        "{e}"
    );
    let mut m = ModelProto::decode(bytes.as_slice()).unwrap();
    let g = m.graph.as_mut().unwrap();
    g.node[1].op_type = "Softsign".into();
    let e = load("softsign.onnx", &m.encode_to_vec());
    assert!(
        e.contains("/relu/Relu") && e.contains("Softsign is not supported"),
        "{e}"
    );
    let mut m = ModelProto::decode(bytes.as_slice()).unwrap();
    let g = m.graph.as_mut().unwrap();
    g.node[0]
        .attribute
        .iter_mut()
        .find(|a| a.name == "pads")
        .unwrap()
        .ints = vec![1, 1, 0, 0];
    let e = load("asym.onnx", &m.encode_to_vec());
    assert!(
        e.contains("/conv1/Conv") && e.contains("asymmetric padding"),
        "{e}"
    );
    // A pool on a flattened vector is a shape error, not a panic.
    let mut m = ModelProto::decode(bytes.as_slice()).unwrap();
    let g = m.graph.as_mut().unwrap();
    let fc = g.node.iter_mut().find(|n| n.op_type == "Gemm").unwrap();
    fc.op_type = "MaxPool".into();
    fc.input.truncate(1);
    fc.attribute = vec![brelu::models::onnx::proto::AttributeProto {
        name: "kernel_shape".into(),
        r#type: brelu::models::onnx::proto::attr_type::INTS,
        ints: vec![1, 1],
        ..Default::default()
    }];
    let e = load("pool.onnx", &m.encode_to_vec());
    assert!(e.contains("not a [C, H, W] map"), "{e}");
    let e = models::find("onnx:/nonexistent/model.onnx")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/model.onnx"), "{e}");
    // The exported input size is part of the model.
    let arch = models::find(&model_name("resnet18-w16")).unwrap();
    let cfg = models::ArchConfig {
        input: [3, 64, 64],
        num_classes: 10,
    };
    let e = Model::new(arch, cfg, Device::Cpu)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("exported for input [3, 32, 32]"), "{e}");
}
