//! Site lists from the dry run: the published ReLU counts (docs/method.md 2 and 4).
use crate::common;
use brelu::models::{architectures, find, sites, Model};
use tch::{Device, Tensor};

fn totals(model: &str, input: [usize; 3]) -> (usize, usize, usize) {
    let s = sites(find(model).unwrap(), input).unwrap();
    (
        s.len(),
        s.iter().map(|x| x.channels).sum(),
        s.iter().map(|x| x.relus()).sum(),
    )
}

#[test]
fn resnet50_at_224() {
    assert_eq!(totals("resnet50", [3, 224, 224]), (49, 22_720, 9_608_704));
    // The avg-pool stem changes no ReLU shape.
    assert_eq!(
        totals("resnet50-avgpool", [3, 224, 224]),
        (49, 22_720, 9_608_704)
    );
}

#[test]
fn resnet18_cifar_at_32() {
    let (n, c, r) = totals("resnet18-cifar", [3, 32, 32]);
    assert_eq!((n, c, r), (17, 3_904, 557_056));
}

#[test]
fn site_names_follow_spec() {
    let s = sites(find("resnet50").unwrap(), [3, 224, 224]).unwrap();
    assert_eq!(s[0].name, "stem");
    assert_eq!(s[1].name, "layer1_0_1");
    assert_eq!(s[3].name, "layer1_0_3");
    assert_eq!(s.last().unwrap().name, "layer4_2_3");
    let m = sites(find("mobilenetv2").unwrap(), [3, 224, 224]).unwrap();
    let names: Vec<&str> = m.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        &names[..4],
        ["conv1", "layer1_0_0", "layer2_0_0", "layer2_0_1"]
    );
    assert_eq!(names.last(), Some(&"conv2"));
    // 1 stem + 1 (stage 1) + 2 per expanded block (16 blocks) + final 1x1 conv.
    assert_eq!(m.len(), 1 + 1 + 2 * 16 + 1);
    let light = sites(find("resnet18-cifar-light").unwrap(), [3, 32, 32]).unwrap();
    assert_eq!((light[0].channels, light[0].height), (32, 16));
}

/// The shape-level dry run agrees with a real forward pass at every site of every model.
#[test]
fn dry_run_matches_forward() {
    let _rng = common::torch_rng();
    tch::manual_seed(0);
    for arch in architectures() {
        let input = if arch.default_input()[1] > 64 {
            [3, 64, 48]
        } else {
            arch.default_input()
        };
        let cfg = brelu::models::ArchConfig {
            input,
            num_classes: 7,
        };
        let model = Model::new(*arch, cfg, Device::Cpu).unwrap();
        let x = Tensor::randn(
            [2, input[0] as i64, input[1] as i64, input[2] as i64],
            tch::kind::FLOAT_CPU,
        );
        let _g = tch::no_grad_guard();
        // One pass records every site's input (a prefix run per site costs minutes for the
        // segmentation models).
        let (_, acts) = model.forward_with_sites(&x);
        assert_eq!(acts.len(), model.sites().len());
        for (site, (pre, _)) in model.sites().iter().zip(&acts) {
            assert_eq!(
                pre.size(),
                [
                    2,
                    site.channels as i64,
                    site.height as i64,
                    site.width as i64
                ],
                "{} {}",
                arch.name(),
                site.name
            );
        }
        // Logits [N, 7] of a classifier, a [N, 7, H', W'] map of a segmentation model.
        let out = &model.graph().infer_shapes(input).unwrap()[model.graph().output];
        assert_eq!(out[0], 7, "{}", arch.name());
        let mut want = vec![2i64];
        want.extend(out.iter().map(|&d| d as i64));
        assert_eq!(model.forward_t(&x, false).size(), want, "{}", arch.name());
    }
}

#[test]
fn empty_input_is_an_error() {
    let e = sites(find("resnet50").unwrap(), [3, 0, 224]).unwrap_err();
    assert!(e.to_string().contains("must be positive"), "{e}");
}
