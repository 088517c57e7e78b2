//! Segmentation data on generated ADE20K and VOC trees (PNG/JPEG written with the `image` and
//! `png` crates): label protocols, transforms keeping image and mask aligned, clear errors on
//! unknown labels, missing annotations and corrupt files; batching and mid-epoch skipping;
//! mIoU against a hand-computed confusion example; the poly schedule and the segmentation
//! configuration checks.
use brelu::data::normalization;
use brelu::data::seg::{self, Inference, Layout, SegTransforms, Transform, IGNORE};
use brelu::data::{self, BatchIter, DatasetKind, Split};
use brelu::train::segment::Confusion;
use brelu::train::{lr_at_iteration, Config};
use std::path::Path;
use tch::Tensor;

/// An RGB image whose red channel is 10 x the pixel's label (so alignment can be checked)
/// and a label map in 4x4 blocks.
fn labels_for(h: usize, w: usize, classes: u8, salt: usize) -> Vec<u8> {
    (0..h * w)
        .map(|i| (((i / w) / 4 * 7 + (i % w) / 4 * 3 + salt) % classes as usize) as u8)
        .collect()
}

fn write_rgb(path: &Path, h: usize, w: usize, red: &[u8]) {
    let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let r = red[y as usize * w + x as usize];
        image::Rgb([r, 100, (x * 5) as u8])
    });
    img.save(path).unwrap();
}

fn write_gray(path: &Path, h: usize, w: usize, v: &[u8]) {
    image::GrayImage::from_raw(w as u32, h as u32, v.to_vec())
        .unwrap()
        .save(path)
        .unwrap();
}

/// A palette PNG (VOC's SegmentationClass format) holding indices `v`.
fn write_palette(path: &Path, h: usize, w: usize, v: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut e = png::Encoder::new(std::io::BufWriter::new(f), w as u32, h as u32);
    e.set_color(png::ColorType::Indexed);
    e.set_depth(png::BitDepth::Eight);
    let palette: Vec<u8> = (0..256u32)
        .flat_map(|i| [(i * 7) as u8, (i * 3) as u8, i as u8])
        .collect();
    e.set_palette(palette);
    let mut wr = e.write_header().unwrap();
    wr.write_image_data(v).unwrap();
}

/// ADE20K tree: raw mask values 0..=150 (0 = other), images as PNG (lossless, so red = 10 x
/// label can be checked exactly; the reader takes .jpg, .jpeg and .png).
fn ade_tree(root: &Path, n_train: usize, n_val: usize) {
    for (split, n) in [("training", n_train), ("validation", n_val)] {
        std::fs::create_dir_all(root.join("images").join(split)).unwrap();
        std::fs::create_dir_all(root.join("annotations").join(split)).unwrap();
        for i in 0..n {
            let (h, w) = (20 + 4 * i, 28 - 2 * i);
            let raw = labels_for(h, w, 25, i); // 0..24 raw: 0 is ignored
            let red: Vec<u8> = raw.iter().map(|&v| v * 10).collect();
            let stem = format!("ADE_{split}_{i:08}");
            write_rgb(
                &root.join("images").join(split).join(format!("{stem}.png")),
                h,
                w,
                &red,
            );
            write_gray(
                &root
                    .join("annotations")
                    .join(split)
                    .join(format!("{stem}.png")),
                h,
                w,
                &raw,
            );
        }
    }
}

/// VOC tree: train_aug ids with grayscale masks in SegmentationClassAug, val ids with palette
/// masks in SegmentationClass; labels 0..=20 and 255 on a border.
fn voc_tree(root: &Path, n_train: usize, n_val: usize) {
    for d in [
        "JPEGImages",
        "SegmentationClass",
        "SegmentationClassAug",
        "ImageSets/Segmentation",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let mut train = String::new();
    let mut val = String::new();
    for i in 0..n_train + n_val {
        let id = format!("2007_{i:06}");
        let (h, w) = (24, 32 + 4 * i);
        let mut lab = labels_for(h, w, 21, i);
        for x in 0..w {
            lab[x] = IGNORE; // boundary row
        }
        let red: Vec<u8> = lab.iter().map(|&v| v.wrapping_mul(10)).collect();
        // JPEG is lossy: VOC tests only look at masks and sizes.
        write_rgb(
            &root.join("JPEGImages").join(format!("{id}.jpg")),
            h,
            w,
            &red,
        );
        if i < n_train {
            write_gray(
                &root.join("SegmentationClassAug").join(format!("{id}.png")),
                h,
                w,
                &lab,
            );
            train.push_str(&format!("{id}\n"));
        } else {
            write_palette(
                &root.join("SegmentationClass").join(format!("{id}.png")),
                h,
                w,
                &lab,
            );
            val.push_str(&format!("{id}\n"));
        }
    }
    std::fs::write(root.join("ImageSets/Segmentation/train_aug.txt"), train).unwrap();
    std::fs::write(root.join("ImageSets/Segmentation/val.txt"), val).unwrap();
}

fn transforms(crop: [usize; 2]) -> SegTransforms {
    SegTransforms {
        crop,
        test_scale: [64, 32],
        scale_range: [0.5, 2.0],
        flip: true,
        photometric: false,
        inference: Inference::Whole,
        stride: [crop[0] * 2 / 3, crop[1] * 2 / 3],
        cat_max_ratio: 1.0,
    }
}

#[test]
fn ade20k_labels_shift_and_zero_is_ignored() {
    let d = tempfile::tempdir().unwrap();
    ade_tree(d.path(), 3, 2);
    let tr = seg::open(Layout::Ade20k, d.path(), Split::Train, transforms([16, 16])).unwrap();
    let va = seg::open(Layout::Ade20k, d.path(), Split::Test, transforms([16, 16])).unwrap();
    assert_eq!((tr.len(), va.len()), (3, 2));
    for i in 0..3 {
        let raw = seg::read_mask_raw(&tr.masks[i]).unwrap().2;
        let m = seg::read_mask(Layout::Ade20k, &tr.masks[i]).unwrap();
        assert_eq!(m.labels.len(), raw.len());
        for (&r, &l) in raw.iter().zip(&m.labels) {
            let want = if r == 0 { IGNORE } else { r - 1 };
            assert_eq!(l, want);
        }
        assert!(raw.contains(&0), "the fixture has 'other' pixels");
    }
    // Extremes of the protocol.
    assert_eq!(Layout::Ade20k.map_label(150), Some(149));
    assert_eq!(Layout::Ade20k.map_label(151), None);
    assert_eq!(Layout::Voc.map_label(20), Some(20));
    assert_eq!(Layout::Voc.map_label(255), Some(255));
    assert_eq!(Layout::Voc.map_label(21), None);
}

#[test]
fn voc_reads_train_aug_grayscale_and_val_palette_masks() {
    let d = tempfile::tempdir().unwrap();
    voc_tree(d.path(), 3, 2);
    let tr = seg::open(Layout::Voc, d.path(), Split::Train, transforms([16, 16])).unwrap();
    let va = seg::open(Layout::Voc, d.path(), Split::Test, transforms([16, 16])).unwrap();
    assert_eq!((tr.len(), va.len()), (3, 2));
    assert!(tr.masks[0]
        .to_string_lossy()
        .contains("SegmentationClassAug"));
    assert!(va.masks[0].parent().unwrap().ends_with("SegmentationClass"));
    // The palette indices are the labels (not the palette's RGB colours).
    for (k, i) in [(0usize, 3usize), (1, 4)] {
        let m = seg::read_mask(Layout::Voc, &va.masks[k]).unwrap();
        let (h, w) = (24, 32 + 4 * i);
        let mut want = labels_for(h, w, 21, i);
        want[..w].fill(IGNORE);
        assert_eq!((m.height, m.width), (h, w));
        assert_eq!(m.labels, want);
    }
    // Evaluation keeps the mask at full size and rescales the image to fit 64x32.
    let p = va.decode(1, Transform::Eval).unwrap();
    assert_eq!((p.mask.height, p.mask.width), (24, 48));
    assert_eq!(seg::fit_scale(24, 48, 64.0, 32.0), (32, 64));
    assert_eq!((p.height, p.width), (32, 64));
    assert_eq!(p.image.len(), 3 * 32 * 64);
    // Published setting: 2048x512 bounds, e.g. 500x375 -> 683x512.
    assert_eq!(seg::fit_scale(375, 500, 2048.0, 512.0), (512, 683));
    assert_eq!(seg::fit_scale(512, 4000, 2048.0, 512.0), (262, 2048));
}

#[test]
fn train_transform_keeps_image_and_mask_aligned_and_pads_with_ignore() {
    let d = tempfile::tempdir().unwrap();
    ade_tree(d.path(), 3, 1);
    // No rescale (ratio 1 and a test scale equal to the image) so red == 10 x raw label
    // holds exactly; crops larger than the image exercise the padding.
    for (crop, pad_expected) in [([12, 12], false), ([40, 40], true)] {
        let mut t = transforms(crop);
        t.scale_range = [1.0, 1.0];
        let set = seg::open(Layout::Ade20k, d.path(), Split::Train, t).unwrap();
        let mut flipped_seen = false;
        for i in 0..set.len() {
            let (h, w) = (20 + 4 * i, 28 - 2 * i);
            let mut s = set.clone();
            s.transforms.test_scale = [h.max(w), h.min(w)];
            let n = crop[0] * crop[1];
            for seed in 0..6u64 {
                let p = s.decode(i, Transform::Train(seed)).unwrap();
                assert_eq!((p.height, p.width), (crop[0], crop[1]));
                assert_eq!(p.mask.labels.len(), n);
                let mut padded = 0;
                for k in 0..n {
                    let (y, x) = (k / crop[1], k % crop[1]);
                    let (r, g) = (p.image[k], p.image[n + k]);
                    let l = p.mask.labels[k];
                    if y >= h || x >= w {
                        // Outside the image: zero pixels, ignore label.
                        assert_eq!((r, g, l), (0, 0, IGNORE));
                        padded += 1;
                        continue;
                    }
                    let raw = if l == IGNORE { 0 } else { l + 1 };
                    assert_eq!(r, raw * 10, "image {i} seed {seed} pixel ({y}, {x})");
                    assert_eq!(g, 100);
                }
                assert_eq!(padded > 0, pad_expected);
                // Blue = 5 x the source column: decreasing along a row means flipped.
                if p.image[2 * n] > p.image[2 * n + 1] {
                    flipped_seen = true;
                }
            }
        }
        assert!(flipped_seen, "some of the draws flip");
    }
}

#[test]
fn fixed_transform_gives_the_input_size_and_batches_stream() {
    let d = tempfile::tempdir().unwrap();
    voc_tree(d.path(), 5, 2);
    let ds = data::load_sized(DatasetKind::Voc, d.path(), Split::Train, [3, 16, 16], 21).unwrap();
    assert_eq!(ds.len(), 5);
    assert_eq!(ds.image_shape(), [3, 16, 16]);
    let x = ds.select(&[0, 4]).unwrap();
    assert_eq!(x.size(), [2, 3, 16, 16]);
    let s = ds.seg.as_ref().unwrap();
    let p = s.decode(4, Transform::Fixed).unwrap();
    assert_eq!((p.mask.height, p.mask.width), (16, 16));
    // 24x48 -> short side 16 -> 16x32, center crop columns 8..24: the border row stays.
    assert!(p.mask.labels[..16].iter().all(|&l| l == IGNORE));

    // Training batches: [B, 3, H, W] images and [B, H, W] masks; skipping batches replays
    // exactly what iterating would have produced.
    let norm = normalization(DatasetKind::Voc);
    let all: Vec<(Tensor, Tensor)> =
        BatchIter::train(&ds, 2, 9, 1, None, norm.clone(), tch::Device::Cpu)
            .map(|b| b.unwrap())
            .collect();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].0.size(), [2, 3, 16, 16]);
    assert_eq!(all[0].1.size(), [2, 16, 16]);
    assert_eq!(all[2].1.size(), [1, 16, 16]);
    let mut it = BatchIter::train(&ds, 2, 9, 1, None, norm, tch::Device::Cpu);
    it.skip_batches(2);
    let (x, y) = it.next().unwrap().unwrap();
    assert!(x.equal(&all[2].0) && y.equal(&all[2].1));
    assert!(it.next().is_none());
    let labels = Vec::<i64>::try_from(all[0].1.flatten(0, -1)).unwrap();
    assert!(labels.iter().all(|&l| (0..21).contains(&l) || l == 255));
}

#[test]
fn unknown_labels_missing_and_corrupt_files_are_clear_errors() {
    // VOC: a 200 in a mask.
    let d = tempfile::tempdir().unwrap();
    voc_tree(d.path(), 2, 1);
    let bad = d.path().join("SegmentationClassAug/2007_000001.png");
    let mut v = labels_for(24, 36, 21, 1);
    v[40] = 200;
    write_gray(&bad, 24, 36, &v);
    let ds = data::load_sized(DatasetKind::Voc, d.path(), Split::Train, [3, 16, 16], 21).unwrap();
    let e = ds.select(&[0, 1]).unwrap_err().to_string();
    assert!(e.contains("2007_000001.png") && e.contains("200"), "{e}");
    assert!(e.contains("row 1, column 4"), "{e}");
    // An RGB mask is refused with what was expected.
    write_rgb(&bad, 24, 36, &v);
    let e = seg::read_mask(Layout::Voc, &bad).unwrap_err().to_string();
    assert!(e.contains("8-bit grayscale or palette"), "{e}");
    // A listed image without annotation.
    std::fs::remove_file(&bad).unwrap();
    let e = data::load_sized(DatasetKind::Voc, d.path(), Split::Train, [3, 16, 16], 21)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("2007_000001.png") && e.contains("missing annotation"),
        "{e}"
    );
    // No list file.
    std::fs::remove_file(d.path().join("ImageSets/Segmentation/val.txt")).unwrap();
    let e = data::load_sized(DatasetKind::Voc, d.path(), Split::Test, [3, 16, 16], 21)
        .unwrap_err()
        .to_string();
    assert!(e.contains("val.txt"), "{e}");

    // ADE20K: 151 is out of the protocol; missing annotation; corrupt image; wrong size.
    let d = tempfile::tempdir().unwrap();
    ade_tree(d.path(), 2, 1);
    let ann = d
        .path()
        .join("annotations/training/ADE_training_00000001.png");
    let mut v = labels_for(24, 26, 25, 1);
    v[0] = 151;
    write_gray(&ann, 24, 26, &v);
    let ds = data::load_sized(
        DatasetKind::Ade20k,
        d.path(),
        Split::Train,
        [3, 16, 16],
        150,
    )
    .unwrap();
    let e = ds.select(&[1]).unwrap_err().to_string();
    assert!(
        e.contains("ADE_training_00000001.png") && e.contains("151"),
        "{e}"
    );
    write_gray(&ann, 10, 10, &[1; 100]);
    let e = ds.select(&[1]).unwrap_err().to_string();
    assert!(e.contains("mask is 10x10") && e.contains("24x26"), "{e}");
    let img = d.path().join("images/training/ADE_training_00000000.png");
    std::fs::write(&img, b"not a png").unwrap();
    let e = ds.select(&[0]).unwrap_err().to_string();
    assert!(
        e.contains("ADE_training_00000000.png") && e.contains("decode"),
        "{e}"
    );
    std::fs::remove_file(&ann).unwrap();
    let e = data::load_sized(
        DatasetKind::Ade20k,
        d.path(),
        Split::Train,
        [3, 16, 16],
        150,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("ADE_training_00000001.png") && e.contains("missing annotation"),
        "{e}"
    );
    std::fs::remove_dir_all(d.path().join("annotations")).unwrap();
    let e = data::load_sized(
        DatasetKind::Ade20k,
        d.path(),
        Split::Train,
        [3, 16, 16],
        150,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("annotations") && e.contains("missing"), "{e}");
}

/// Hand-computed: 3 classes, labels and predictions of 10 pixels, two of them ignored, class 2
/// never labelled but predicted once, and a 4th class absent from both.
#[test]
fn miou_matches_a_hand_computed_confusion() {
    //            label: 0 0 0 1 1 1 2? no: class 2 is only predicted
    let labels = [0i64, 0, 0, 1, 1, 1, 1, 255, 255, 0];
    let preds = [0i64, 0, 1, 1, 1, 2, 1, 3, 0, 0];
    let mut c = Confusion::new(4);
    c.add(&Tensor::from_slice(&preds), &Tensor::from_slice(&labels))
        .unwrap();
    // Counted pixels: 8. Class 0: TP 3 (idx 0,1,9), FN 1 (idx 2 -> 1), FP 0 -> 3/4.
    // Class 1: TP 3 (idx 3,4,6), FN 1 (idx 5 -> 2), FP 1 (idx 2) -> 3/5.
    // Class 2: TP 0, FP 1 -> 0. Class 3: only predicted on an ignored pixel -> absent.
    let iou = c.iou();
    assert_eq!(iou[0], Some(0.75));
    assert_eq!(iou[1], Some(0.6));
    assert_eq!(iou[2], Some(0.0));
    assert_eq!(iou[3], None);
    assert!((c.miou() - (0.75 + 0.6 + 0.0) / 3.0).abs() < 1e-12);
    assert_eq!(c.pixels(), 8);
    assert!((c.pixel_accuracy() - 6.0 / 8.0).abs() < 1e-12);

    // Random inputs against a per-pixel brute force count.
    let mut rng = brelu::data::Rng::new(5);
    let n = 500;
    let l: Vec<i64> = (0..n)
        .map(|_| match rng.below(7) {
            6 => 255,
            v => v as i64,
        })
        .collect();
    let p: Vec<i64> = (0..n).map(|_| rng.below(6) as i64).collect();
    let mut fast = Confusion::new(6);
    fast.add(&Tensor::from_slice(&p), &Tensor::from_slice(&l))
        .unwrap();
    let mut slow = Confusion::new(6);
    for (&a, &b) in l.iter().zip(&p) {
        if a != 255 {
            slow.add_pixel(a as usize, b as usize);
        }
    }
    assert_eq!(fast, slow);
    // A label outside the classes is an error, not a silent miscount.
    let e = Confusion::new(3)
        .add(&Tensor::from_slice(&[0i64]), &Tensor::from_slice(&[7i64]))
        .unwrap_err();
    assert!(e.to_string().contains("outside 0..3"), "{e}");
}

fn seg_config(extra: &str, schedule: &str) -> String {
    format!(
        "model = \"resnet18-cifar\"\nnum_classes = 21\ninput = [3, 32, 32]\n{extra}\n\
         batch_size = 2\n[dataset]\nkind = \"voc\"\npath = \"/nonexistent\"\n\
         [optimizer]\nlr = 0.01\nmomentum = 0.9\nweight_decay = 5e-4\n[schedule]\n{schedule}\n"
    )
}

#[test]
fn poly_schedule_and_iteration_configs() {
    let p = Path::new("seg.toml");
    let c = Config::from_toml_str(
        &seg_config(
            "iterations = 100\ncheckpoint_every = 10",
            "kind = \"poly\"\nmin_lr = 1e-4\nwarmup_iterations = 10",
        ),
        p,
    )
    .unwrap();
    assert_eq!(c.task(), brelu::data::Task::Segmentation);
    let lr = |t| lr_at_iteration(&c.schedule, 0.01, t, 100);
    // Warm-up from 1% of the rate, linearly.
    assert!((lr(0) - 1e-4).abs() < 1e-15);
    assert!((lr(5) - 0.01 * (0.01 + 0.99 * 0.5)).abs() < 1e-15);
    // Poly, power 0.9, counted from iteration 0 (mmseg).
    for t in [10usize, 50, 99, 100] {
        let want = 1e-4 + (0.01 - 1e-4) * (1.0 - t as f64 / 100.0).powf(0.9);
        assert!((lr(t) - want).abs() < 1e-15, "t {t}");
    }
    // Errors name the field.
    for (extra, schedule, field) in [
        (
            "epochs = 2\niterations = 5",
            "kind = \"poly\"",
            "iterations",
        ),
        ("", "kind = \"poly\"", "epochs"),
        (
            "epochs = 2\ncheckpoint_every = 5",
            "kind = \"poly\"",
            "checkpoint_every",
        ),
        (
            "iterations = 5",
            "kind = \"poly\"\nwarmup_epochs = 1",
            "schedule.warmup_epochs",
        ),
        (
            "iterations = 5",
            "kind = \"poly\"\npower = 0",
            "schedule.power",
        ),
        (
            "iterations = 5",
            "kind = \"poly\"\nmilestones = [2]",
            "schedule.milestones",
        ),
    ] {
        let e = Config::from_toml_str(&seg_config(extra, schedule), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("'{field}'")), "{field}: {e}");
    }
    let bad_ds = seg_config("iterations = 5", "kind = \"poly\"").replace(
        "kind = \"voc\"",
        "kind = \"voc\"\naugment = { pad = 4, flip = true }",
    );
    let e = Config::from_toml_str(&bad_ds, p).unwrap_err().to_string();
    assert!(e.contains("dataset.augment.pad"), "{e}");
    let bad_ds = seg_config("iterations = 5", "kind = \"poly\"")
        .replace("kind = \"voc\"", "kind = \"voc\"\nslide_stride = [40, 8]");
    let e = Config::from_toml_str(&bad_ds, p).unwrap_err().to_string();
    assert!(e.contains("dataset.slide_stride"), "{e}");
    let cifar = "model = \"resnet18-cifar\"\nnum_classes = 10\ninput = [3, 32, 32]\nepochs = 1\n\
                 batch_size = 2\n[dataset]\nkind = \"cifar10\"\ntest_scale = [64, 32]\n\
                 [optimizer]\nlr = 0.1\n[schedule]\nkind = \"cosine\"\n";
    let e = Config::from_toml_str(cifar, p).unwrap_err().to_string();
    assert!(
        e.contains("dataset.test_scale") && e.contains("segmentation"),
        "{e}"
    );
    assert_eq!(
        Config::from_toml_str(&cifar.replace("test_scale = [64, 32]\n", ""), p)
            .unwrap()
            .task(),
        brelu::data::Task::Classification
    );
}

#[test]
fn shipped_segmentation_configs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    for (f, iters, model) in [
        (
            "ade20k-deeplabv3-mobilenetv2.toml",
            160_000,
            "deeplabv3-mobilenetv2",
        ),
        (
            "ade20k-deeplabv3-mobilenetv2-brelu.toml",
            40_000,
            "deeplabv3-mobilenetv2",
        ),
        (
            "voc-deeplabv3-resnet50.toml",
            40_000,
            "deeplabv3-resnet50-d8",
        ),
        (
            "voc-deeplabv3-resnet50-brelu.toml",
            20_000,
            "deeplabv3-resnet50-d8",
        ),
    ] {
        let c = Config::load(&dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(c.task(), brelu::data::Task::Segmentation);
        assert_eq!((c.iterations, c.model.as_str()), (Some(iters), model));
        assert_eq!((c.input, c.batch_size), ([3, 512, 512], 16));
        assert_eq!(c.schedule.kind, brelu::train::ScheduleKind::Poly);
        assert_eq!((c.schedule.power, c.schedule.min_lr), (0.9, 1e-4));
        let brelu = f.contains("brelu");
        assert_eq!(c.optimizer.lr, if brelu { 5e-4 } else { 0.01 });
        assert_eq!(c.schedule.warmup_iterations, if brelu { 1000 } else { 0 });
    }
    for f in ["ade20k-pipeline.toml", "voc-pipeline.toml"] {
        brelu::pipeline::PipelineConfig::load(&dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
}

/// Decode throughput of the segmentation training transform (JPEG + PNG mask, rescale, crop,
/// flip, jitter) against the class-folder random-resized-crop on the same JPEGs, one batch of
/// 32 images of 500x375 each: prints figures for BENCHMARKS.md, asserts only the shapes.
/// `cargo test --test it -- --ignored --nocapture seg_data::decode_throughput`
#[test]
#[ignore]
fn decode_throughput() {
    let d = tempfile::tempdir().unwrap();
    let n = 32;
    std::fs::create_dir_all(d.path().join("images/training")).unwrap();
    std::fs::create_dir_all(d.path().join("annotations/training")).unwrap();
    std::fs::create_dir_all(d.path().join("train/c0")).unwrap();
    for i in 0..n {
        let (h, w) = (375, 500);
        let raw = labels_for(h, w, 151, i);
        let red: Vec<u8> = raw.iter().map(|&v| v.wrapping_mul(10)).collect();
        let img = d.path().join(format!("images/training/{i:04}.jpg"));
        write_rgb(&img, h, w, &red);
        std::fs::copy(&img, d.path().join(format!("train/c0/{i:04}.jpg"))).unwrap();
        write_gray(
            &d.path().join(format!("annotations/training/{i:04}.png")),
            h,
            w,
            &raw,
        );
    }
    let mut t = transforms([512, 512]);
    t.test_scale = [2048, 512];
    t.photometric = true;
    let seg = seg::open(Layout::Ade20k, d.path(), Split::Train, t).unwrap();
    let folder = data::folder::open(d.path(), Split::Train, 224).unwrap();
    let idx: Vec<i64> = (0..n as i64).collect();
    let st: Vec<_> = (0..n as u64).map(Transform::Train).collect();
    let ft: Vec<_> = (0..n as u64).map(data::folder::Transform::Train).collect();
    for round in 0..2 {
        let t0 = std::time::Instant::now();
        let (x, y) = seg.decode_batch(&idx, &st).unwrap();
        let ts = t0.elapsed().as_secs_f64();
        let t0 = std::time::Instant::now();
        let f = folder.decode_batch(&idx, &ft).unwrap();
        let tf = t0.elapsed().as_secs_f64();
        assert_eq!(
            (x.size(), y.size()),
            (vec![32, 3, 512, 512], vec![32, 512, 512])
        );
        assert_eq!(f.len(), 32 * 3 * 224 * 224);
        println!(
            "round {round}: segmentation train transform {:.1} img/s (512 crop), class-folder \
             random-resized-crop {:.1} img/s (224), {} rayon threads",
            n as f64 / ts,
            n as f64 / tf,
            rayon::current_num_threads()
        );
    }
}

/// `cat_max_ratio` (mmseg's RandomCrop): replaying the random draws of each seed, the crop is the
/// first of at most 10 draws whose most frequent class covers less than the ratio of its
/// labelled pixels (with two classes or more), else the 10th; with ratio 1 it is the first draw.
#[test]
fn crops_are_redrawn_while_one_class_dominates() {
    use brelu::data::seg::{choose_crop, Mask, CROP_TRIES};
    use brelu::data::Rng;
    // 24 x 24: class 3 everywhere but a 6-column band of class 7 and an ignored corner.
    let (h, w) = (24usize, 24usize);
    let mut labels = vec![3u8; h * w];
    for y in 0..h {
        for x in 15..21 {
            labels[y * w + x] = 7;
        }
    }
    for y in 0..4 {
        for x in 0..4 {
            labels[y * w + x] = 255;
        }
    }
    let m = Mask {
        height: h,
        width: w,
        labels,
    };
    let (kh, kw) = (8, 8);
    let fine = |(y0, x0): (usize, usize), ratio: f64| {
        let mut counts = std::collections::HashMap::new();
        for y in y0..y0 + kh {
            for x in x0..x0 + kw {
                let l = m.labels[y * w + x];
                if l != 255 {
                    *counts.entry(l).or_insert(0u64) += 1;
                }
            }
        }
        let total: u64 = counts.values().sum();
        counts.len() > 1 && (*counts.values().max().unwrap() as f64) < ratio * total as f64
    };
    let (mut good_plain, mut good_ratio) = (0, 0);
    for seed in 0..200u64 {
        let draws: Vec<(usize, usize)> = {
            let mut r = Rng::new(seed);
            (0..CROP_TRIES)
                .map(|_| {
                    let y0 = r.below((h - kh + 1) as u64) as usize;
                    let x0 = r.below((w - kw + 1) as u64) as usize;
                    (y0, x0)
                })
                .collect()
        };
        let plain = choose_crop(&m, kh, kw, 1.0, &mut Rng::new(seed));
        assert_eq!(plain, draws[0]);
        let got = choose_crop(&m, kh, kw, 0.75, &mut Rng::new(seed));
        let want = draws
            .iter()
            .copied()
            .find(|&c| fine(c, 0.75))
            .unwrap_or(draws[CROP_TRIES - 1]);
        assert_eq!(got, want, "seed {seed}");
        good_plain += usize::from(fine(plain, 0.75));
        good_ratio += usize::from(fine(got, 0.75));
    }
    assert!(good_ratio > good_plain + 50, "{good_ratio} vs {good_plain}");
}
