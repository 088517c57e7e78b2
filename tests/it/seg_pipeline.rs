//! Segmentation end to end with DeepLabV3 on generated ADE20K data: evaluation (whole image
//! and sliding windows) against an independent per-pixel count, a short iteration-based
//! training run, `brelu eval` on the command line, and the whole pipeline (baseline ->
//! first-order distortion on decoder logits -> knapsack at 2 budgets -> fine-tune -> mIoU ->
//! secure inference on 1 image -> report).
use crate::common;
use brelu::data::normalization;
use brelu::data::seg::{Inference, SegTransforms, Transform};
use brelu::data::{self, DatasetKind, Split};
use brelu::models::{find, ArchConfig, Model};
use brelu::pipeline::{self, PipelineConfig};
use brelu::train;
use brelu::train::segment::{self, Confusion, SegEval};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// ADE20K tree with smooth images whose colour follows the label (so a network can learn a
/// little), raw labels 0..=5 (0 = ignored "other").
fn ade_tree(root: &Path, n_train: usize, n_val: usize) {
    for (split, n) in [("training", n_train), ("validation", n_val)] {
        std::fs::create_dir_all(root.join("images").join(split)).unwrap();
        std::fs::create_dir_all(root.join("annotations").join(split)).unwrap();
        for i in 0..n {
            let (h, w) = (36 + 4 * (i % 3), 44 - 4 * (i % 2));
            let label = |x: u32, y: u32| ((x as usize / 9 + y as usize / 11 + i) % 6) as u8;
            let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let l = label(x, y) as u32;
                image::Rgb([(l * 40) as u8, (200 - l * 30) as u8, ((x + y) % 50) as u8])
            });
            let mask =
                image::GrayImage::from_fn(w as u32, h as u32, |x, y| image::Luma([label(x, y)]));
            let stem = format!("ADE_{split}_{i:08}");
            img.save(root.join("images").join(split).join(format!("{stem}.jpg")))
                .unwrap();
            mask.save(
                root.join("annotations")
                    .join(split)
                    .join(format!("{stem}.png")),
            )
            .unwrap();
        }
    }
}

/// VOC tree: labels 0..=5 of 21 with a 255 boundary row, grayscale masks in
/// SegmentationClassAug (train_aug) and SegmentationClass (val).
pub(crate) fn voc_tree(root: &Path, n_train: usize, n_val: usize) {
    for d in [
        "JPEGImages",
        "SegmentationClass",
        "SegmentationClassAug",
        "ImageSets/Segmentation",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let (mut train, mut val) = (String::new(), String::new());
    for i in 0..n_train + n_val {
        let id = format!("2008_{i:06}");
        let (h, w) = (32 + 4 * (i % 2), 36 - 4 * (i % 2));
        let label = |x: u32, y: u32| {
            if y == 0 {
                255
            } else {
                ((x as usize / 9 + y as usize / 11 + i) % 6) as u8
            }
        };
        let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let l = (label(x, y) % 6) as u32;
            image::Rgb([(l * 40) as u8, (200 - l * 30) as u8, ((x + y) % 50) as u8])
        });
        img.save(root.join("JPEGImages").join(format!("{id}.jpg")))
            .unwrap();
        let mask = image::GrayImage::from_fn(w as u32, h as u32, |x, y| image::Luma([label(x, y)]));
        let (dir, list) = if i < n_train {
            ("SegmentationClassAug", &mut train)
        } else {
            ("SegmentationClass", &mut val)
        };
        mask.save(root.join(dir).join(format!("{id}.png"))).unwrap();
        list.push_str(&format!("{id}\n"));
    }
    std::fs::write(root.join("ImageSets/Segmentation/train_aug.txt"), train).unwrap();
    std::fs::write(root.join("ImageSets/Segmentation/val.txt"), val).unwrap();
}

fn tiny_model(seed: i64) -> Model {
    tch::manual_seed(seed);
    Model::new(
        find("deeplabv3-mobilenetv2").unwrap(),
        ArchConfig {
            input: [3, 32, 32],
            num_classes: 150,
        },
        Device::Cpu,
    )
    .unwrap()
}

/// mIoU of `evaluate` equals a per-pixel count of argmax(resize(forward(image))) against the
/// shifted labels; sliding windows that tile the image exactly agree with per-tile forwards.
#[test]
fn seg_evaluation_matches_an_independent_count() {
    let _s = common::torch_rng();
    let d = tempfile::tempdir().unwrap();
    ade_tree(d.path(), 1, 2);
    let model = tiny_model(1);
    let norm = normalization(DatasetKind::Ade20k);
    for inference in [Inference::Whole, Inference::Slide] {
        let t = SegTransforms {
            crop: [32, 32],
            test_scale: [48, 32],
            scale_range: [0.5, 2.0],
            flip: true,
            photometric: true,
            inference,
            stride: [16, 16],
            cat_max_ratio: 1.0,
        };
        let ds = data::load_with(
            DatasetKind::Ade20k,
            d.path(),
            Split::Test,
            [3, 32, 32],
            150,
            t,
        )
        .unwrap();
        let e = SegEval::of(&ds.seg.as_ref().unwrap().transforms, 2);
        let r = train::evaluate(&model, &ds, &norm, 2).unwrap();
        let m = r.segmentation.clone().unwrap();

        let set = ds.seg.as_ref().unwrap();
        let mut brute = Confusion::new(150);
        let _g = tch::no_grad_guard();
        for i in 0..set.len() {
            let p = set.decode(i, Transform::Eval).unwrap();
            let x = norm.apply(&Tensor::from_slice(&p.image).view([
                1,
                3,
                p.height as i64,
                p.width as i64,
            ]));
            let logits = segment::infer(&model, &x, &e);
            assert_eq!(logits.size(), [1, 150, p.height as i64, p.width as i64]);
            let up = logits.upsample_bilinear2d(
                [p.mask.height as i64, p.mask.width as i64],
                false,
                None,
                None,
            );
            let pred = Vec::<i64>::try_from(up.argmax(1, false).flatten(0, -1)).unwrap();
            let raw = brelu::data::seg::read_mask_raw(&set.masks[i]).unwrap().2;
            for (&pr, &rv) in pred.iter().zip(&raw) {
                if rv != 0 {
                    brute.add_pixel(rv as usize - 1, pr as usize);
                }
            }
        }
        assert_eq!(m.pixels, brute.pixels());
        assert_eq!(m.per_class_iou, brute.iou());
        assert!((m.miou - brute.miou()).abs() < 1e-12);
        assert!((r.top1 - brute.pixel_accuracy()).abs() < 1e-12);
        assert!(r.top5 >= r.top1 && r.loss.is_finite());
        assert_eq!(r.images, 2);
    }

    // Sliding windows that tile a 32x64 image exactly: two independent forwards side by side.
    let e = SegEval {
        inference: Inference::Slide,
        crop: [32, 32],
        stride: [32, 32],
        batch: 1,
    };
    let x = Tensor::randn([1, 3, 32, 64], (Kind::Float, Device::Cpu));
    let _g = tch::no_grad_guard();
    let got = segment::infer(&model, &x, &e);
    let tile = |x0| segment::resize_logits(&model.forward_t(&x.narrow(3, x0, 32), false), 32, 32);
    let want = Tensor::cat(&[tile(0), tile(32)], 3);
    assert!(got.allclose(&want, 1e-5, 1e-5, false));
    // A window larger than the image: the image is padded, the logits cropped back.
    let small = x.narrow(2, 0, 20).narrow(3, 0, 24);
    let got = segment::infer(&model, &small, &e);
    assert_eq!(got.size(), [1, 150, 20, 24]);
    let padded = small.constant_pad_nd([0, 8, 0, 12]);
    let want = segment::resize_logits(&model.forward_t(&padded, false), 32, 32)
        .narrow(2, 0, 20)
        .narrow(3, 0, 24);
    assert!(got.allclose(&want, 1e-5, 1e-5, false));
}

/// VOC (21 classes: 21 first-order probes) at 32x32 with the fewest iterations, images and
/// samples that still exercise every stage.
fn write_configs(dir: &Path) -> PathBuf {
    voc_tree(&dir.join("voc"), 4, 2);
    let base = format!(
        "model = \"deeplabv3-mobilenetv2\"\nnum_classes = 21\ninput = [3, 32, 32]\n\
         iterations = 2\ncheckpoint_every = 1\nbatch_size = 2\neval_batch_size = 2\nseed = 1\n\
         [dataset]\nkind = \"voc\"\npath = \"{}\"\ntest_scale = [36, 32]\n\
         [optimizer]\nlr = 0.01\nmomentum = 0.9\nweight_decay = 5e-4\n\
         [schedule]\nkind = \"poly\"\nmin_lr = 1e-4\n",
        dir.join("voc").display()
    );
    std::fs::write(dir.join("seg.toml"), &base).unwrap();
    let ft = base
        .replace("iterations = 2\ncheckpoint_every = 1", "iterations = 1")
        .replace("lr = 0.01", "lr = 5e-4")
        .replace("min_lr = 1e-4", "min_lr = 1e-4\nwarmup_iterations = 1");
    std::fs::write(dir.join("seg-ft.toml"), ft).unwrap();
    let p = dir.join("pipeline.toml");
    std::fs::write(
        &p,
        "train = \"seg.toml\"\nfinetune = \"seg-ft.toml\"\nratios = [0.06, 0.12]\n\
         baselines = false\n[distortion]\nsamples = 2\nbatch = 2\n[secure]\nimages = 1\n",
    )
    .unwrap();
    p
}

// The slowest test of this file (about 30 s on a quiet 2-core machine, over 2 minutes when the
// cores are shared with builds): DeepLabV3's 512-channel ASPP head is 74 MB of weights even at
// 32x32, and every checkpoint, fine-tune and secure session moves them.
#[test]
fn tiny_deeplabv3_pipeline_end_to_end() {
    let _s = common::torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    let cfgp = write_configs(tmp.path());
    let cfg = PipelineConfig::load(&cfgp).unwrap();
    let run_dir = tmp.path().join("run");
    let quiet = |_: &str| {};
    let out = pipeline::run(&cfg, &run_dir, None, &quiet).unwrap();
    // Baseline + knapsack at each of the 2 budgets.
    assert_eq!(out.rows.len(), 3);
    let relus = out.rows[0].drelus;
    for r in &out.rows {
        let s = r.eval.segmentation.as_ref().expect("segmentation metrics");
        assert!((0.0..=1.0).contains(&s.miou));
        assert_eq!(r.eval.images, 2);
        assert_eq!(s.per_class_iou.len(), 21);
        let sec = r.secure.as_ref().unwrap();
        assert_eq!(sec.images, 1);
        if let Some(e) = &r.spec {
            assert!(r.drelus <= e.budget && r.drelus < relus, "{}", e.name);
        }
    }
    // Iteration-based baseline training: a line per checkpoint.
    let lines = std::fs::read_to_string(run_dir.join("baseline").join(train::METRICS)).unwrap();
    assert_eq!(lines.lines().count(), 2);
    let report = std::fs::read_to_string(out.report.unwrap()).unwrap();
    assert!(report.contains("test mIoU"), "{report}");
    assert!(report.contains("| mIoU % |"), "{report}");
    // The distortion tables cover the decoder's sites.
    let manifest = std::fs::read_to_string(run_dir.join("distortion/manifest.json")).unwrap();
    assert!(manifest.contains("decode_5"), "{manifest}");
    // A second run does nothing.
    let again = pipeline::run(&cfg, &run_dir, None, &quiet).unwrap();
    assert!(again.ran.is_empty(), "{:?}", again.ran);

    // `brelu eval` on the command line: mIoU, pixel accuracy and per-class IoU.
    let bin = common::brelu_exe();
    let o = std::process::Command::new(&bin)
        .args(["eval", "--config"])
        .arg(tmp.path().join("seg.toml"))
        .arg("--weights")
        .arg(run_dir.join("baseline").join(train::CHECKPOINT_WEIGHTS))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        text.contains("mIoU") && text.contains("per-class IoU"),
        "{text}"
    );
    let base = out.rows[0].eval.segmentation.as_ref().unwrap();
    assert!(
        text.contains(&format!("mIoU {:.2}%", 100.0 * base.miou)),
        "{text}"
    );
    // `brelu distortion extract --data` on the segmentation configuration: training images
    // resized and center-cropped to the input, output = decoder logits.
    let ddir = tmp.path().join("dist-cli");
    let o = std::process::Command::new(&bin)
        .args(["distortion", "extract", "--data"])
        .arg(tmp.path().join("seg.toml"))
        .arg("-w")
        .arg(run_dir.join("baseline").join(train::CHECKPOINT_WEIGHTS))
        .args([
            "--samples",
            "2",
            "--estimator",
            "first-order",
            "--sites",
            "decode_5",
            "-o",
        ])
        .arg(&ddir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(ddir.join("decode_5.npy").exists());
    // Unknown label in a validation mask: a clear error naming file and value.
    let bad = tmp.path().join("voc/SegmentationClass/2008_000005.png");
    image::GrayImage::from_pixel(32, 36, image::Luma([200u8]))
        .save(&bad)
        .unwrap();
    let o = std::process::Command::new(&bin)
        .args(["eval", "--config"])
        .arg(tmp.path().join("seg.toml"))
        .arg("--weights")
        .arg(run_dir.join("baseline").join(train::CHECKPOINT_WEIGHTS))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("2008_000005.png") && err.contains("200"),
        "{err}"
    );
}
