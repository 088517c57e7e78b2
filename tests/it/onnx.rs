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
    // Float32 with different kernels and summation orders: relative 1e-4 of the logits' scale.
    assert!(
        err <= 1e-4 * scale.max(1.0),
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
