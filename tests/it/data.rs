//! Data readers on small generated files (idx plain and gz, CIFAR-10/100 layouts), their
//! errors on missing, truncated and wrong-magic files, augmentation and batch iteration.
use brelu::data::normalization;
use brelu::data::{self, cifar, idx, Augment, BatchIter, DatasetKind, Rng, Split};
use std::io::Write;
use std::path::Path;
use tch::Kind;

fn idx_bytes(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Writes an MNIST-layout split with `n` 4x5 images; pixel = (i + y*5 + x) % 256, label i%10.
fn write_mnist(dir: &Path, prefix: &str, n: usize, compress: bool) {
    let pixels: Vec<u8> = (0..n * 20).map(|k| ((k / 20) + k % 20) as u8).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    let imgs = idx_bytes(0x803, &[n as u32, 4, 5], &pixels);
    let labs = idx_bytes(0x801, &[n as u32], &labels);
    let (imgs, labs, ext) = if compress {
        (gz(&imgs), gz(&labs), ".gz")
    } else {
        (imgs, labs, "")
    };
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte{ext}")), imgs).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte{ext}")), labs).unwrap();
}

#[test]
fn idx_plain_and_gz_read_the_same() {
    for compress in [false, true] {
        let d = tempfile::tempdir().unwrap();
        write_mnist(d.path(), "train", 7, compress);
        write_mnist(d.path(), "t10k", 3, compress);
        let tr = data::load(DatasetKind::FashionMnist, d.path(), Split::Train).unwrap();
        let te = data::load(DatasetKind::Mnist, d.path(), Split::Test).unwrap();
        assert_eq!(tr.len(), 7);
        assert_eq!(te.len(), 3);
        assert_eq!(tr.images.size(), [7, 1, 4, 5]);
        assert_eq!(tr.images.kind(), Kind::Uint8);
        assert_eq!(tr.images.int64_value(&[2, 0, 1, 3]), (2 + 8) as i64);
        assert_eq!(tr.labels.int64_value(&[6]), 6);
    }
}

#[test]
fn idx_errors_name_file_and_expectation() {
    let d = tempfile::tempdir().unwrap();
    // Missing.
    let e = data::load(DatasetKind::Mnist, d.path(), Split::Train).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("train-images-idx3-ubyte"), "{msg}");
    assert!(msg.contains("missing"), "{msg}");
    // Wrong magic.
    let p = d.path().join("bad");
    std::fs::write(&p, idx_bytes(0x802, &[2, 2, 2], &[0; 8])).unwrap();
    let msg = idx::read_idx(&p, 3).unwrap_err().to_string();
    assert!(
        msg.contains("bad") && msg.contains("magic") && msg.contains("0x00000803"),
        "{msg}"
    );
    // Truncated data.
    std::fs::write(&p, idx_bytes(0x803, &[2, 2, 2], &[0; 7])).unwrap();
    let msg = idx::read_idx(&p, 3).unwrap_err().to_string();
    assert!(
        msg.contains("truncated") && msg.contains("8 bytes"),
        "{msg}"
    );
    // Truncated header.
    std::fs::write(&p, &idx_bytes(0x803, &[2, 2, 2], &[])[..9]).unwrap();
    let msg = idx::read_idx(&p, 3).unwrap_err().to_string();
    assert!(msg.contains("truncated header"), "{msg}");
    // Truncated gzip stream.
    let g = gz(&idx_bytes(0x803, &[2, 2, 2], &[1; 8]));
    std::fs::write(&p, &g[..g.len() - 6]).unwrap();
    let msg = idx::read_idx(&p, 3).unwrap_err().to_string();
    assert!(msg.contains("gzip"), "{msg}");
    // Label count mismatch.
    write_mnist(d.path(), "train", 4, false);
    std::fs::write(
        d.path().join("train-labels-idx1-ubyte"),
        idx_bytes(0x801, &[3], &[0, 1, 2]),
    )
    .unwrap();
    let msg = data::load(DatasetKind::Mnist, d.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("3 labels") && msg.contains("4 images"),
        "{msg}"
    );
}

fn cifar_record(label_bytes: &[u8], fill: u8) -> Vec<u8> {
    let mut r = label_bytes.to_vec();
    r.extend((0..3072).map(|k| fill.wrapping_add((k / 1024) as u8)));
    r
}

#[test]
fn cifar10_and_cifar100_layouts() {
    let d = tempfile::tempdir().unwrap();
    let sub = d.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&sub).unwrap();
    for i in 1..=5u8 {
        let mut f = cifar_record(&[i], 10 * i);
        f.extend(cifar_record(&[9], 0));
        std::fs::write(sub.join(format!("data_batch_{i}.bin")), f).unwrap();
    }
    std::fs::write(sub.join("test_batch.bin"), cifar_record(&[3], 7)).unwrap();
    let tr = data::load(DatasetKind::Cifar10, d.path(), Split::Train).unwrap();
    assert_eq!(tr.images.size(), [10, 3, 32, 32]);
    assert_eq!(tr.labels.int64_value(&[2]), 2);
    assert_eq!(tr.labels.int64_value(&[3]), 9);
    assert_eq!(tr.images.int64_value(&[2, 1, 5, 5]), 21); // fill 20 + channel 1
    let te = data::load(DatasetKind::Cifar10, &sub, Split::Test).unwrap();
    assert_eq!(te.len(), 1);

    let d100 = tempfile::tempdir().unwrap();
    let mut f = cifar_record(&[1, 42], 0);
    f.extend(cifar_record(&[2, 99], 5));
    std::fs::write(d100.path().join("train.bin"), &f).unwrap();
    std::fs::write(d100.path().join("test.bin"), &f).unwrap();
    let tr = data::load(DatasetKind::Cifar100, d100.path(), Split::Train).unwrap();
    assert_eq!(tr.num_classes, 100);
    assert_eq!(tr.labels.int64_value(&[0]), 42);
    assert_eq!(tr.labels.int64_value(&[1]), 99);

    // Truncated record.
    std::fs::write(d100.path().join("test.bin"), &f[..f.len() - 1]).unwrap();
    let msg = data::load(DatasetKind::Cifar100, d100.path(), Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("test.bin") && msg.contains("3074-byte records"),
        "{msg}"
    );
    // Missing file.
    let msg = data::load(
        DatasetKind::Cifar100,
        &d100.path().join("nope"),
        Split::Train,
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("train.bin"), "{msg}");
    // Label out of range.
    let mut pix = Vec::new();
    let mut lab = Vec::new();
    std::fs::write(d100.path().join("x.bin"), cifar_record(&[12], 0)).unwrap();
    cifar::read_cifar_file(&d100.path().join("x.bin"), 1, &mut pix, &mut lab).unwrap();
    let e = data::Dataset::from_raw(pix, lab, [3, 32, 32], 10, Path::new("x.bin")).unwrap_err();
    assert!(e.to_string().contains("label 12"), "{e}");
}

/// Writes a w x h RGB image whose pixels encode (class, x, y), as PNG or JPEG by extension.
pub(crate) fn write_image(path: &Path, w: u32, h: u32, class: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([class * 100, (x * 255 / w) as u8, (y * 255 / h) as u8])
    });
    img.save(path).unwrap();
}

#[test]
fn class_folders_stream_with_transforms_and_clear_errors() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_image(&r.join("train/cat/a.png"), 40, 30, 0);
    write_image(&r.join("train/cat/b.JPEG"), 30, 50, 0);
    write_image(&r.join("train/dog/c.jpg"), 64, 64, 1);
    std::fs::write(r.join("train/dog/notes.txt"), "ignored").unwrap();
    write_image(&r.join("val/dog/d.png"), 20, 20, 1);

    let train = data::load_sized(DatasetKind::Imagenet, r, Split::Train, [3, 16, 16], 2).unwrap();
    assert_eq!(train.len(), 3);
    assert_eq!(train.image_shape(), [3, 16, 16]);
    assert_eq!(Vec::<i64>::try_from(&train.labels).unwrap(), [0, 0, 1]);
    let val = data::load_sized(DatasetKind::Imagenet, r, Split::Test, [3, 16, 16], 2).unwrap();
    assert_eq!(
        Vec::<i64>::try_from(&val.labels).unwrap(),
        [1],
        "val uses the training class indices"
    );

    // Evaluation transform: resize the short side to 16*256/224 = 19, center crop 16.
    let x = val.select(&[0]).unwrap();
    assert_eq!(x.size(), [1, 3, 16, 16]);
    assert_eq!(
        x.int64_value(&[0, 0, 5, 5]),
        100,
        "red channel carries the class"
    );
    let g = x.int64_value(&[0, 1, 8, 3]);
    let g2 = x.int64_value(&[0, 1, 8, 12]);
    assert!(g2 > g, "green grows left to right: {g} {g2}");

    // Training batches: random-resized-crop + flip, reproducible for a seed and epoch.
    let norm = normalization(DatasetKind::Imagenet);
    let aug = Some(Augment { pad: 0, flip: true });
    let dev = tch::Device::Cpu;
    let b1: Vec<_> = BatchIter::train(&train, 2, 4, 0, aug, norm.clone(), dev)
        .map(|b| b.unwrap())
        .collect();
    let b2: Vec<_> = BatchIter::train(&train, 2, 4, 0, aug, norm.clone(), dev)
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(b1.len(), 2);
    assert_eq!(b1[0].0.size(), [2, 3, 16, 16]);
    assert!(b1[0].0.equal(&b2[0].0) && b1[1].0.equal(&b2[1].0));

    // Errors name the file or folder.
    std::fs::write(
        r.join("train/dog/broken.jpg"),
        b"\xff\xd8 not really a jpeg",
    )
    .unwrap();
    let bad = data::load_sized(DatasetKind::Imagenet, r, Split::Train, [3, 16, 16], 2).unwrap();
    let e = bad.select(&[2]).unwrap_err().to_string();
    assert!(e.contains("broken.jpg") && e.contains("decode"), "{e}");
    let e = BatchIter::eval(&bad, 4, norm.clone(), dev)
        .find_map(|b| b.err())
        .unwrap();
    assert!(e.to_string().contains("broken.jpg"), "{e}");
    std::fs::create_dir_all(r.join("val/bird")).unwrap();
    write_image(&r.join("val/bird/e.png"), 8, 8, 2);
    let e = data::load_sized(DatasetKind::Imagenet, r, Split::Test, [3, 16, 16], 2).unwrap_err();
    assert!(
        e.to_string().contains("bird") && e.to_string().contains("training classes"),
        "{e}"
    );
    std::fs::create_dir_all(r.join("train/empty")).unwrap();
    let e = data::load_sized(DatasetKind::Imagenet, r, Split::Train, [3, 16, 16], 3).unwrap_err();
    assert!(
        e.to_string().contains("empty") && e.to_string().contains("without images"),
        "{e}"
    );
    let e = data::load_sized(
        DatasetKind::Imagenet,
        &r.join("nope"),
        Split::Train,
        [3, 16, 16],
        2,
    )
    .unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    let e = data::load_sized(DatasetKind::Imagenet, r, Split::Train, [3, 16, 12], 2).unwrap_err();
    assert!(e.to_string().contains("square"), "{e}");
}

#[test]
fn augmentation_keeps_shape_and_is_deterministic() {
    let x = tch::Tensor::arange(2 * 3 * 8 * 8, (Kind::Int64, tch::Device::Cpu))
        .remainder(251)
        .to_kind(Kind::Uint8)
        .view([2, 3, 8, 8]);
    let a = Augment { pad: 2, flip: true };
    let y1 = a.apply(&x, &mut Rng::for_epoch(5, 1, 2));
    let y2 = a.apply(&x, &mut Rng::for_epoch(5, 1, 2));
    let y3 = a.apply(&x, &mut Rng::for_epoch(5, 2, 2));
    assert_eq!(y1.size(), x.size());
    assert_eq!(y1.kind(), Kind::Uint8);
    assert!(y1.equal(&y2));
    assert!(!y1.equal(&y3));
    // Flip only, no crop: every image is the original or its mirror.
    let f = Augment { pad: 0, flip: true }.apply(&x, &mut Rng::new(1));
    for i in 0..2 {
        let (o, g) = (x.get(i), f.get(i));
        assert!(g.equal(&o) || g.equal(&o.flip([2])));
    }
    // Nothing asked: unchanged.
    let same = Augment {
        pad: 0,
        flip: false,
    }
    .apply(&x, &mut Rng::new(1));
    assert!(same.equal(&x));
}

#[test]
fn batches_shuffle_per_epoch_and_evaluate_in_order() {
    let pixels: Vec<u8> = (0..10 * 4).map(|k| k as u8).collect();
    let labels: Vec<u8> = (0..10).map(|i| i as u8).collect();
    let ds = data::Dataset::from_raw(pixels, labels, [1, 2, 2], 10, Path::new("mem")).unwrap();
    let norm = normalization(DatasetKind::Mnist);
    let dev = tch::Device::Cpu;
    let e0 = BatchIter::train(&ds, 3, 7, 0, None, norm.clone(), dev);
    let e0b = BatchIter::train(&ds, 3, 7, 0, None, norm.clone(), dev);
    let e1 = BatchIter::train(&ds, 3, 7, 1, None, norm.clone(), dev);
    assert_eq!(e0.order(), e0b.order());
    assert_ne!(e0.order(), e1.order());
    let mut sorted = e0.order().to_vec();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<i64>>());
    assert_eq!(e0.batches(), 4);
    let ev: Vec<_> = BatchIter::eval(&ds, 4, norm.clone(), dev)
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(ev.len(), 3);
    assert_eq!(ev[2].0.size(), [2, 1, 2, 2]);
    assert_eq!(ev[0].1.int64_value(&[1]), 1);
    let want = (4.0 / 255.0 - norm.mean[0]) / norm.std[0];
    assert!((ev[0].0.double_value(&[1, 0, 0, 0]) - want).abs() < 1e-5);
}

#[test]
fn real_fashion_mnist_when_installed() {
    let dir = DatasetKind::FashionMnist.default_path();
    if !dir.exists() {
        eprintln!("skipped: {} not installed", dir.display());
        return;
    }
    let te = data::load(DatasetKind::FashionMnist, &dir, Split::Test).unwrap();
    assert_eq!(te.images.size(), [10000, 1, 28, 28]);
    let s = te.channel_stats();
    assert!(
        (s.mean[0] - 0.286).abs() < 0.01 && (s.std[0] - 0.353).abs() < 0.01,
        "{s:?}"
    );
}

/// The loader (`BatchIter::prefetch`) gives the batches of the plain iterator for 1, 2 and 4
/// decoding threads and any queue depth, on a class-folder set of JPEGs of varied sizes; and
/// two ranks' shards of an epoch, batch by batch, are the single-process batches of twice the
/// size (same images, same random-resized crops and flips).
#[test]
fn loader_batches_do_not_depend_on_workers_and_shards_partition_the_epoch() {
    use brelu::data::LoaderOptions;
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for i in 0..24u32 {
        let class = ["a", "b", "c"][i as usize % 3];
        write_image(
            &r.join(format!("train/{class}/{i}.jpg")),
            40 + 7 * i,
            30 + 5 * (i % 6),
            (i % 3) as u8,
        );
    }
    let train = data::load_sized(DatasetKind::Imagenet, r, Split::Train, [3, 16, 16], 3).unwrap();
    let norm = normalization(DatasetKind::Imagenet);
    let aug = Some(Augment { pad: 0, flip: true });
    let dev = tch::Device::Cpu;
    let it = |bs: usize| BatchIter::train(&train, bs, 11, 2, aug, norm.clone(), dev);
    let plain: Vec<_> = it(4).map(|b| b.unwrap()).collect();
    assert_eq!(plain.len(), 6);
    for (workers, prefetch) in [(1, 1), (2, 2), (4, 3)] {
        let got: Vec<_> = it(4)
            .prefetch(LoaderOptions {
                workers,
                prefetch,
                ..Default::default()
            })
            .unwrap()
            .map(|b| b.unwrap())
            .collect();
        assert_eq!(got.len(), plain.len());
        for (k, ((x, y), (px, py))) in got.iter().zip(&plain).enumerate() {
            assert!(
                x.equal(px) && y.equal(py),
                "batch {k} differs with {workers} workers"
            );
        }
    }
    // Stopping early ends the background thread (the test would hang otherwise).
    let mut early = it(4)
        .prefetch(LoaderOptions {
            workers: 2,
            prefetch: 1,
            ..Default::default()
        })
        .unwrap();
    assert!(early.next().is_some());
    drop(early);

    // Two ranks with batch 2 each: together, batch k is the single process's batch k of 4.
    let ranks: Vec<Vec<_>> = (0..2)
        .map(|rank| {
            it(2)
                .shard(11, 2, rank, 2)
                .prefetch(LoaderOptions::default())
                .unwrap()
                .map(|b| b.unwrap())
                .collect()
        })
        .collect();
    for (k, (px, py)) in plain.iter().enumerate() {
        let (x0, y0) = &ranks[0][k];
        let (x1, y1) = &ranks[1][k];
        // DistributedSampler's interleaving: rank r holds positions r, r + 2, ...
        let x = tch::Tensor::stack(&[x0.get(0), x1.get(0), x0.get(1), x1.get(1)], 0);
        let y = tch::Tensor::stack(&[y0.get(0), y1.get(0), y0.get(1), y1.get(1)], 0);
        assert!(x.equal(px) && y.equal(py), "sharded batch {k} differs");
    }
}

/// The CPU's table normalisation gives the bits of the tensor arithmetic it replaces (the GPU
/// path), for every byte value and channel.
#[test]
fn table_normalisation_equals_the_arithmetic() {
    let n = brelu::data::Normalize {
        mean: vec![0.485, 0.456, 0.406],
        std: vec![0.229, 0.224, 0.225],
    };
    let x = tch::Tensor::arange(256 * 3 * 5, (tch::Kind::Int64, tch::Device::Cpu))
        .remainder(256)
        .to_kind(tch::Kind::Uint8)
        .view([5, 3, 16, 16]);
    let mean = tch::Tensor::from_slice(&[0.485f32, 0.456, 0.406]).view([1, 3, 1, 1]);
    let std = tch::Tensor::from_slice(&[0.229f32, 0.224, 0.225]).view([1, 3, 1, 1]);
    let direct = (x.to_kind(tch::Kind::Float) / 255.0 - mean) / std;
    let table = n.apply(&x);
    assert_eq!(table.size(), [5, 3, 16, 16]);
    assert!(
        table.equal(&direct),
        "max diff {}",
        (&table - &direct).abs().max().double_value(&[])
    );
}
