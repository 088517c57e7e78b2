//! What a multi-rank run on real data meets (issue "large runs"): every kind of image ImageNet
//! holds, undecodable files under `--bad-images`, ranks launched differently, an unreachable
//! master or a port in use, validation sharded over 4 ranks, and the pipeline under 2 ranks.
//! Every rank is a real process on 127.0.0.1 (Gloo); fixtures are generated here.
use crate::common;
use brelu::data::{self, image_file, DatasetKind, Split};
use brelu::dist::{Group, Launch, Timeouts};
use brelu::train;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Set in the test binary's own children that play one rank.
const CHILD: &str = "BRELU_TEST_LARGE_CHILD";
/// The fixture directory the children read.
const FIXTURES: &str = "BRELU_TEST_LARGE_DIR";

/// Waits for every child (up to `limit` in all); returns (success, stderr) per child and the
/// time the last one took.
fn wait_all(kids: Vec<Child>, limit: Duration) -> (Vec<(bool, String)>, Duration) {
    let t0 = Instant::now();
    let mut out = Vec::new();
    for mut c in kids {
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = c.stderr.take() {
                    use std::io::Read;
                    e.read_to_string(&mut err).unwrap();
                }
                out.push((s.success(), err));
                break;
            }
            if t0.elapsed() > limit {
                let _ = c.kill();
                panic!("a rank did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    (out, t0.elapsed())
}

fn brelu_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(common::brelu_exe());
    c.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

// ---------------------------------------------------------------------------------------
// Images

fn jpeg_rgb(w: u32, h: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            seed.wrapping_mul(40),
            (x * 255 / w) as u8,
            (y * 255 / h) as u8,
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

/// A class folder of every kind of file the ImageNet training set holds, plus one truncated
/// JPEG: a PNG named `.JPEG`, CMYK and YCCK JPEGs, a grayscale JPEG, a 16-bit PNG and a
/// palette PNG. Returns the truncated file's path.
fn odd_images(root: &Path) -> PathBuf {
    let a = root.join("train/n01");
    let b = root.join("train/n02");
    for d in [&a, &b, &root.join("val/n01"), &root.join("val/n02")] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(a.join("rgb.JPEG"), jpeg_rgb(40, 30, 1)).unwrap();
    // A PNG named .JPEG (as n02105855_2933.JPEG).
    crate::data::write_image(&a.join("png.png"), 24, 20, 1);
    std::fs::rename(a.join("png.png"), a.join("png_named.JPEG")).unwrap();
    // CMYK and YCCK (Adobe) JPEGs.
    let cmyk: Vec<u8> = (0..24 * 24)
        .flat_map(|i| [(i % 200) as u8, 30, 200, 10])
        .collect();
    for (name, t) in [
        ("cmyk.JPEG", jpeg_encoder::ColorType::Cmyk),
        ("ycck.JPEG", jpeg_encoder::ColorType::CmykAsYcck),
    ] {
        let e = jpeg_encoder::Encoder::new_file(a.join(name), 90).unwrap();
        e.encode(&cmyk, 24, 24, t).unwrap();
    }
    // Grayscale JPEG, 16-bit PNG, palette PNG (named .JPEG too).
    let gray = image::GrayImage::from_fn(30, 30, |x, y| image::Luma([(x * 8 + y) as u8]));
    gray.save(b.join("gray.jpg")).unwrap();
    std::fs::rename(b.join("gray.jpg"), b.join("gray.JPEG")).unwrap();
    let deep = image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(20, 20, |x, y| {
        image::Rgb([x as u16 * 3000, y as u16 * 3000, 40000])
    });
    deep.save(b.join("deep.png")).unwrap();
    {
        let f = std::fs::File::create(b.join("palette.png")).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(f), 16, 16);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(vec![255, 0, 0, 0, 255, 0, 0, 0, 255]);
        let px: Vec<u8> = (0..256).map(|i| (i % 3) as u8).collect();
        enc.write_header().unwrap().write_image_data(&px).unwrap();
    }
    std::fs::write(b.join("rgb2.JPEG"), jpeg_rgb(32, 48, 2)).unwrap();
    // Truncated: the first half of a valid JPEG.
    let whole = jpeg_rgb(64, 64, 3);
    let cut = a.join("truncated.JPEG");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    std::fs::write(root.join("val/n01/v1.JPEG"), jpeg_rgb(30, 30, 1)).unwrap();
    std::fs::write(root.join("val/n02/v2.JPEG"), jpeg_rgb(30, 30, 2)).unwrap();
    cut
}

/// Decoding by content: each odd file decodes to RGB of its size, the CMYK and YCCK colours
/// come out as RGB (white where nothing is printed), a truncated JPEG is refused while its
/// whole version passes, and a JPEG with an EXIF thumbnail is judged by its own end.
#[test]
fn every_kind_of_image_decodes_by_content() {
    let tmp = tempfile::tempdir().unwrap();
    let cut = odd_images(tmp.path());
    let a = tmp.path().join("train/n01");
    let b = tmp.path().join("train/n02");
    for (p, size) in [
        (a.join("png_named.JPEG"), (24, 20)),
        (a.join("cmyk.JPEG"), (24, 24)),
        (a.join("ycck.JPEG"), (24, 24)),
        (b.join("gray.JPEG"), (30, 30)),
        (b.join("deep.png"), (20, 20)),
        (b.join("palette.png"), (16, 16)),
    ] {
        let img = image_file::open_rgb(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(img.dimensions(), size, "{}", p.display());
    }
    // Palette entries expand to their colours; grayscale is replicated.
    let pal = image_file::open_rgb(&b.join("palette.png")).unwrap();
    assert_eq!(pal.get_pixel(0, 0).0, [255, 0, 0]);
    assert_eq!(pal.get_pixel(1, 0).0, [0, 255, 0]);
    let g = image_file::open_rgb(&b.join("gray.JPEG")).unwrap();
    let p = g.get_pixel(10, 10).0;
    assert!(p[0] == p[1] && p[1] == p[2], "{p:?}");
    // 16-bit: 40000 / 65535 of full scale.
    let d = image_file::open_rgb(&b.join("deep.png")).unwrap();
    assert!((d.get_pixel(0, 0).0[2] as i32 - 156).abs() <= 1);
    // CMYK (c, 30, 200, 10): yellow-heavy, so blue is the lowest channel.
    for f in ["cmyk.JPEG", "ycck.JPEG"] {
        let c = image_file::open_rgb(&a.join(f)).unwrap();
        let p = c.get_pixel(5, 5).0;
        assert!(p[2] < p[1] && p[2] < p[0], "{f}: {p:?}");
    }
    let e = image_file::open_rgb(&cut).unwrap_err().to_string();
    assert!(
        e.contains("truncated") && e.contains("truncated.JPEG"),
        "{e}"
    );
    let whole = jpeg_rgb(64, 64, 3);
    assert!(image_file::jpeg_complete(&whole).is_ok());
    for n in [2, 100, whole.len() / 2, whole.len() - 2] {
        assert!(
            image_file::jpeg_complete(&whole[..n]).is_err(),
            "cut at {n}"
        );
    }
    // An APP1 segment holding a complete thumbnail (SOI ... EOI) before the image's own
    // truncated data: the thumbnail's end marker does not make the file whole.
    let thumb = jpeg_rgb(8, 8, 4);
    let mut app1 = vec![0xFF, 0xE1];
    app1.extend_from_slice(&((thumb.len() + 2) as u16).to_be_bytes());
    app1.extend_from_slice(&thumb);
    let mut with = whole[..2].to_vec();
    with.extend_from_slice(&app1);
    with.extend_from_slice(&whole[2..]);
    assert!(image_file::jpeg_complete(&with).is_ok());
    let cut_at = with.len() - 300;
    assert!(image_file::jpeg_complete(&with[..cut_at]).is_err());
    // Stray bytes between two segments (libjpeg: "extraneous bytes before marker") are
    // skipped, not refused.
    let mut stray = whole[..2].to_vec();
    stray.extend_from_slice(&[0x00, 0x12, 0x34]);
    stray.extend_from_slice(&whole[2..]);
    assert!(image_file::jpeg_complete(&stray).is_ok());
    assert!(image_file::jpeg_complete(&stray[..stray.len() - 2]).is_err());
}

fn folder_config(dir: &Path, data: &Path) -> PathBuf {
    let p = dir.join("folder.toml");
    std::fs::write(
        &p,
        format!(
            "model = \"resnet18-cifar-light\"\nnum_classes = 1000\ninput = [3, 16, 16]\nepochs = 1\n\
             batch_size = 4\nseed = 1\n[dataset]\nkind = \"imagenet\"\npath = \"{}\"\n\
             [optimizer]\nlr = 0.01\nmomentum = 0.9\nweight_decay = 1e-4\n\
             [schedule]\nkind = \"cosine\"\n",
            data.display()
        ),
    )
    .unwrap();
    p
}

/// One epoch over the odd class folder: `--bad-images substitute` trains, replacing the one
/// truncated file (counted once in metrics.jsonl and named in the log); the default stops,
/// naming it. The folder index is written to the run directory and reused.
#[test]
fn a_truncated_image_is_substituted_or_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("imagenet");
    let cut = odd_images(&data);
    let cfg = folder_config(tmp.path(), &data);
    let c = cfg.to_str().unwrap();
    let run = tmp.path().join("sub");
    let (ok, _, err) = common::brelu(&[
        "train",
        "-c",
        c,
        "-o",
        run.to_str().unwrap(),
        "--bad-images",
        "substitute",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("truncated.JPEG") && err.contains("substituted"),
        "{err}"
    );
    let m: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(run.join(train::METRICS))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(m["substituted_images"], 1, "{m}");
    let index = data::folder::index_file(&run, Split::Train);
    let text = std::fs::read_to_string(&index).unwrap();
    assert_eq!(text.lines().count(), 1 + 9, "{text}");

    let (ok, _, err) = common::brelu(&[
        "train",
        "-c",
        c,
        "-o",
        tmp.path().join("err").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains(&cut.display().to_string()) && err.contains("truncated"),
        "{err}"
    );
}

/// The index lists what a walk lists, is reused while the folders are unchanged (a stale
/// entry in it would show), and is redone when a class folder changes.
#[test]
fn the_folder_index_is_reused_until_a_folder_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    for i in 0..6u32 {
        let class = ["a", "b"][i as usize % 2];
        crate::data::write_image(&root.join(format!("train/{class}/{i}.jpg")), 20, 20, 0);
    }
    let idx = tmp.path().join("run");
    let walk = data::folder::open(&root, Split::Train, 16).unwrap();
    let first = data::folder::open_indexed(&root, Split::Train, 16, Some(&idx)).unwrap();
    assert_eq!(first.paths, walk.paths);
    assert_eq!(first.labels, walk.labels);
    // Read back from the index: edit an entry to see that it is used.
    let f = data::folder::index_file(&idx, Split::Train);
    let text = std::fs::read_to_string(&f).unwrap();
    std::fs::write(&f, text.replace("\t0.jpg", "\tzero.jpg")).unwrap();
    let cached = data::folder::open_indexed(&root, Split::Train, 16, Some(&idx)).unwrap();
    assert!(
        cached.paths[0].ends_with("a/zero.jpg"),
        "{:?}",
        cached.paths
    );
    // A new file changes its folder's modification time: listed again.
    std::thread::sleep(Duration::from_millis(20));
    crate::data::write_image(&root.join("train/b/9.jpg"), 20, 20, 0);
    let again = data::folder::open_indexed(&root, Split::Train, 16, Some(&idx)).unwrap();
    let walk = data::folder::open(&root, Split::Train, 16).unwrap();
    assert_eq!(again.paths, walk.paths);
    assert_eq!(again.paths.len(), 7);
}

// ---------------------------------------------------------------------------------------
// Ranks

/// Writes MNIST-layout files of `n` training images into `dir` (the tiny set's first `n`).
fn tiny_mnist(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    common::tiny_dataset(dir);
    for (name, header, per) in [
        ("train-images-idx3-ubyte", 16, 64),
        ("train-labels-idx1-ubyte", 8, 1),
    ] {
        let p = dir.join(name);
        let mut b = std::fs::read(&p).unwrap();
        b.truncate(header + n * per);
        b[4..8].copy_from_slice(&(n as u32).to_be_bytes());
        std::fs::write(&p, b).unwrap();
    }
}

#[test]
fn ranks_that_did_not_start_alike_stop_together_naming_rank_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // The data set path is relative, so each rank reads the set under its own directory.
    let (a, b) = (t.join("a"), t.join("b"));
    tiny_mnist(&a.join("data"), 40);
    tiny_mnist(&b.join("data"), 32);
    let text = std::fs::read_to_string(a.join("data/tiny.toml"))
        .unwrap()
        .replace(&format!("\"{}\"", a.join("data").display()), "\"data\"");
    let cfg = t.join("rel.toml");
    std::fs::write(&cfg, text).unwrap();
    let c = cfg.to_str().unwrap();
    let out = t.join("run");
    let o = out.to_str().unwrap();

    // Starting weights and two specs for the fine-tune.
    let w = t.join("w");
    let mut one = brelu_cmd(&["train", "-c", c, "-o", w.to_str().unwrap()]);
    one.current_dir(&a);
    let (res, _) = wait_all(vec![one.spawn().unwrap()], Duration::from_secs(120));
    assert!(res[0].0, "{}", res[0].1);
    let wf = w.join(train::CHECKPOINT_WEIGHTS);
    let mut specs = Vec::new();
    for patch in ["2x2", "1x2"] {
        let p = t.join(format!("spec-{patch}.json"));
        let (ok, _, err) = common::brelu(&[
            "spec",
            "uniform",
            "--model",
            "resnet18-cifar-light",
            "--input",
            "1,8,8",
            "--patch",
            patch,
            "-o",
            p.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        specs.push(p.to_str().unwrap().to_string());
    }

    // Rank 0 works in `a`; rank 1 in `a` too, or in `b` (8 training images fewer).
    let train = ["train", "-c", c, "-o", o];
    let lr = ["train", "-c", c, "-o", o, "--lr", "0.02"];
    disagreeing_ranks([&train, &lr], [&a, &a], "configuration key `optimizer`");
    disagreeing_ranks([&train, &train], [&a, &b], "training set length");
    let w = wf.to_str().unwrap();
    let ft0 = ["finetune", "-c", c, "-o", o, "-w", w, "--spec", &specs[0]];
    let ft1 = ["finetune", "-c", c, "-o", o, "-w", w, "--spec", &specs[1]];
    disagreeing_ranks([&ft0, &ft1], [&a, &a], "spec");
}

/// Two ranks, rank r running `args[r]` in `cwd[r]`: both end with an error within 30 s that
/// names rank 1 and `field`.
fn disagreeing_ranks(args: [&[&str]; 2], cwd: [&Path; 2], field: &str) {
    let port = common::free_port();
    let kids: Vec<Child> = (0..2)
        .map(|r| {
            let mut c = brelu_cmd(args[r]);
            common::rank_env(&mut c, r, 2, port);
            c.current_dir(cwd[r]);
            c.spawn().unwrap()
        })
        .collect();
    let (res, took) = wait_all(kids, Duration::from_secs(120));
    assert!(
        took < Duration::from_secs(30),
        "the ranks took {took:?} to stop"
    );
    for (r, (ok, err)) in res.iter().enumerate() {
        assert!(!ok, "rank {r} succeeded");
        assert!(
            err.contains("rank 1 has another") && err.contains(field),
            "rank {r} does not name rank 1 and {field}:\n{err}"
        );
    }
}

/// A rank whose master never answers fails within the rendezvous timeout, saying where it
/// waited; rank 0 on a port another process holds says the port is in use.
#[test]
fn an_unreachable_master_and_a_port_in_use_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = common::tiny_dataset(tmp.path());
    let c = cfg.to_str().unwrap();
    let o = tmp.path().join("run");
    let port = common::free_port();
    let mut k = brelu_cmd(&["train", "-c", c, "-o", o.to_str().unwrap()]);
    common::rank_env(&mut k, 1, 2, port);
    k.env("BRELU_DIST_INIT_TIMEOUT", "2");
    let (res, took) = wait_all(vec![k.spawn().unwrap()], Duration::from_secs(60));
    assert!(!res[0].0);
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let err = &res[0].1;
    assert!(
        err.contains("BRELU_DIST_INIT_TIMEOUT") && err.contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );

    let held = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let mut k = brelu_cmd(&["train", "-c", c, "-o", o.to_str().unwrap()]);
    common::rank_env(&mut k, 0, 2, port);
    k.env("BRELU_DIST_INIT_TIMEOUT", "5");
    let (res, took) = wait_all(vec![k.spawn().unwrap()], Duration::from_secs(60));
    assert!(!res[0].0);
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(
        res[0].1.contains("in use") && res[0].1.contains("MASTER_PORT"),
        "{}",
        res[0].1
    );
    drop(held);
}

// ---------------------------------------------------------------------------------------
// Sharded validation

/// Four ranks evaluate their shares of a classification split (10 images: shares of 2 and 3,
/// batches of 3) and of a segmentation split (5 images); the reduced figures equal one
/// process's: counts exactly, loss to rounding.
#[test]
fn sharded_evaluation_over_four_ranks_equals_one_process() {
    if std::env::var_os(CHILD).is_some() {
        return sharded_evaluation_rank();
    }
    let tmp = tempfile::tempdir().unwrap();
    common::tiny_dataset(tmp.path());
    crate::seg_pipeline::voc_tree(&tmp.path().join("voc"), 1, 5);
    let port = common::free_port();
    let kids: Vec<Child> = (0..4)
        .map(|r| {
            let mut c = Command::new(std::env::current_exe().unwrap());
            c.args([
                "--exact",
                "large_runs::sharded_evaluation_over_four_ranks_equals_one_process",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .env(FIXTURES, tmp.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
            common::rank_env(&mut c, r, 4, port);
            c.spawn().unwrap()
        })
        .collect();
    let (res, _) = wait_all(kids, Duration::from_secs(300));
    for (r, (ok, err)) in res.iter().enumerate() {
        assert!(ok, "rank {r} failed:\n{err}");
    }
}

fn sharded_evaluation_rank() {
    let dir = PathBuf::from(std::env::var_os(FIXTURES).unwrap());
    let l = Launch::from_env().unwrap().expect("launcher variables");
    let g = Group::join(&l, tch::Device::Cpu, Timeouts::from_env().unwrap()).unwrap();
    let cfg = train::Config::load(&dir.join("tiny.toml")).unwrap();
    let model = train::build_model(&cfg, tch::Device::Cpu).unwrap();
    let test = train::load_split(&cfg, Split::Test).unwrap();
    let norm = cfg.dataset.normalization();
    let one = train::evaluate(&model, &test, &norm, 3).unwrap();
    let all = train::evaluate_sharded(&model, &test, &norm, 3, Some(&g)).unwrap();
    assert_eq!(
        (one.top1, one.top5, one.images),
        (all.top1, all.top5, all.images)
    );
    assert!(
        (one.loss - all.loss).abs() <= 1e-6 * one.loss.abs(),
        "{one:?} {all:?}"
    );

    let seg_model = {
        tch::manual_seed(2);
        brelu::models::Model::new(
            brelu::models::find("deeplabv3-mobilenetv2").unwrap(),
            brelu::models::ArchConfig {
                input: [3, 32, 32],
                num_classes: 21,
            },
            tch::Device::Cpu,
        )
        .unwrap()
    };
    let t = data::seg::SegTransforms {
        crop: [32, 32],
        test_scale: [48, 32],
        scale_range: [0.5, 2.0],
        flip: true,
        photometric: true,
        inference: data::seg::Inference::Whole,
        stride: [16, 16],
        cat_max_ratio: 1.0,
    };
    let voc = data::load_with(
        DatasetKind::Voc,
        &dir.join("voc"),
        Split::Test,
        [3, 32, 32],
        21,
        t,
    )
    .unwrap();
    let vnorm = data::normalization(DatasetKind::Voc);
    let one = train::evaluate(&seg_model, &voc, &vnorm, 2).unwrap();
    let all = train::evaluate_sharded(&seg_model, &voc, &vnorm, 2, Some(&g)).unwrap();
    let (s1, sa) = (one.segmentation.unwrap(), all.segmentation.unwrap());
    assert_eq!(s1, sa, "segmentation counts differ");
    assert_eq!((one.top5, one.images), (all.top5, all.images));
    assert!((one.loss - all.loss).abs() <= 1e-6 * one.loss.abs());
    g.barrier().unwrap();
}

// ---------------------------------------------------------------------------------------
// The pipeline under a launcher

/// The tiny pipeline under 2 ranks completes and writes one report; its distortion tables (an
/// extraction sharded over the ranks, then collected) and its knapsack specs are the bytes a
/// single process computes from the same baseline weights, and its sharded evaluation of the
/// baseline gives the same counts.
#[test]
fn the_pipeline_under_two_ranks_matches_one_process_on_its_baseline() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    common::tiny_dataset(t);
    let ft = std::fs::read_to_string(t.join("tiny.toml"))
        .unwrap()
        .replace("lr = 0.05", "lr = 0.01");
    std::fs::write(t.join("tiny-ft.toml"), ft).unwrap();
    let body = "ratios = [0.4]\nbaselines = false\n[distortion]\nsamples = 8\nbatch = 4\n\
                [secure]\nimages = 1\n";
    std::fs::write(
        t.join("two.toml"),
        format!("train = \"tiny.toml\"\nfinetune = \"tiny-ft.toml\"\n{body}"),
    )
    .unwrap();
    let two = t.join("two");
    let port = common::free_port();
    let kids: Vec<Child> = (0..2)
        .map(|r| {
            let mut c = Command::new(common::brelu_exe());
            c.args(["pipeline", "-c"])
                .arg(t.join("two.toml"))
                .arg("-o")
                .arg(&two)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            common::rank_env(&mut c, r, 2, port);
            c.spawn().unwrap()
        })
        .collect();
    let (res, _) = wait_all(kids, Duration::from_secs(600));
    for (r, (ok, err)) in res.iter().enumerate() {
        assert!(ok, "rank {r} failed:\n{err}");
    }
    assert!(res[0].1.contains("[done] distortion in"), "{}", res[0].1);
    assert!(
        !res[1].1.contains("[run ]"),
        "rank 1 logs stages:\n{}",
        res[1].1
    );
    assert!(two.join("report.md").exists() && two.join("results.json").exists());

    // One process from the 2-rank baseline's weights.
    let base = two.join("baseline").join(train::CHECKPOINT_WEIGHTS);
    std::fs::write(
        t.join("one.toml"),
        format!(
            "train = \"tiny.toml\"\nfinetune = \"tiny-ft.toml\"\nweights = \"{}\"\n{body}",
            base.display()
        ),
    )
    .unwrap();
    let one = t.join("one");
    // One thread, as each rank had: only the sharding differs, not libtorch's reductions.
    let out = Command::new(common::brelu_exe())
        .args(["pipeline", "-c"])
        .arg(t.join("one.toml"))
        .arg("-o")
        .arg(&one)
        .args(["--device", "cpu"])
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut tables = 0;
    for e in std::fs::read_dir(two.join("distortion")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "npy") {
            let name = p.file_name().unwrap();
            let other = std::fs::read(one.join("distortion").join(name)).unwrap();
            assert!(std::fs::read(&p).unwrap() == other, "{name:?} differs");
            tables += 1;
        }
    }
    assert!(tables > 0);
    let spec = "specs/knapsack-40.00pct.json";
    assert_eq!(
        std::fs::read(two.join(spec)).unwrap(),
        std::fs::read(one.join(spec)).unwrap()
    );
    let ev = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("eval/baseline.json")).unwrap())
            .unwrap()
    };
    let (e2, e1) = (ev(&two), ev(&one));
    assert_eq!(
        (&e2["top1"], &e2["top5"], &e2["images"]),
        (&e1["top1"], &e1["top5"], &e1["images"])
    );
    let (l2, l1) = (e2["loss"].as_f64().unwrap(), e1["loss"].as_f64().unwrap());
    assert!((l2 - l1).abs() <= 1e-6 * l1.abs(), "{l2} vs {l1}");
}

/// The launcher's variables: torchrun's agent store and restart attempt, Slurm's node list.
#[test]
fn launcher_variables_name_the_store_and_the_attempt() {
    let from = |pairs: &[(&str, &str)]| {
        let m: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::from_vars(&|k| m.get(k).cloned())
    };
    let torchrun = [
        ("RANK", "3"),
        ("WORLD_SIZE", "16"),
        ("LOCAL_RANK", "3"),
        ("MASTER_ADDR", "node-a"),
        ("MASTER_PORT", "29400"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ("TORCHELASTIC_RESTART_COUNT", "2"),
    ];
    let l = from(&torchrun).unwrap().unwrap();
    assert_eq!((l.rank, l.world, l.local_rank), (3, 16, 3));
    assert_eq!((l.master_addr.as_str(), l.master_port), ("node-a", 29400));
    assert!(l.agent_store);
    assert_eq!(l.store_prefix(), "/worker/attempt_2");
    let l = from(&torchrun[..5]).unwrap().unwrap();
    assert!(!l.agent_store);
    assert_eq!(l.store_prefix(), "/worker/attempt_0");
    let slurm = [
        ("SLURM_PROCID", "9"),
        ("SLURM_NTASKS", "16"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_JOB_NODELIST", "gpu[03-04]"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
    ];
    let l = from(&slurm).unwrap().unwrap();
    assert_eq!(
        (l.rank, l.local_rank, l.master_addr.as_str()),
        (9, 1, "gpu03")
    );
    assert!(!l.agent_store, "only torchrun has an agent store");
    assert_eq!(
        l.device(brelu::ops::DeviceChoice::Cpu).unwrap(),
        tch::Device::Cpu
    );
    assert!(from(&[("RANK", "0"), ("WORLD_SIZE", "1")])
        .unwrap()
        .is_none());
    let e = from(&[("RANK", "4"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "a")]).unwrap_err();
    assert!(e.to_string().contains("rank 4"), "{e}");
}

/// Set in the child that plays torchrun's agent: the port to serve the store on.
const AGENT: &str = "BRELU_TEST_AGENT_PORT";

/// Under torchrun the agent serves the store and every rank joins it as a client, with keys
/// under the restart attempt's prefix: two ranks of `brelu train` rendezvous through a store
/// that a third process (playing the agent) serves, and train.
#[test]
fn ranks_join_the_store_of_a_torchrun_agent() {
    if let Some(port) = std::env::var_os(AGENT) {
        let port: u16 = port.to_str().unwrap().parse().unwrap();
        let _store = brelu::dist::AgentStore::serve(port, Duration::from_secs(60)).unwrap();
        // Served until the test kills this process.
        std::thread::sleep(Duration::from_secs(300));
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cfg = common::tiny_dataset(tmp.path());
    let port = common::free_port();
    let mut agent = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "large_runs::ranks_join_the_store_of_a_torchrun_agent",
            "--nocapture",
        ])
        .env(AGENT, port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the agent's store never came up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = tmp.path().join("run");
    let kids: Vec<Child> = (0..2)
        .map(|r| {
            let mut c = brelu_cmd(&[
                "train",
                "-c",
                cfg.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ]);
            common::rank_env(&mut c, r, 2, port);
            c.env("TORCHELASTIC_USE_AGENT_STORE", "True")
                .env("TORCHELASTIC_RESTART_COUNT", "3")
                .env("BRELU_DIST_INIT_TIMEOUT", "30");
            c.spawn().unwrap()
        })
        .collect();
    let (res, _) = wait_all(kids, Duration::from_secs(180));
    let _ = agent.kill();
    let _ = agent.wait();
    for (r, (ok, err)) in res.iter().enumerate() {
        assert!(ok, "rank {r} failed:\n{err}");
    }
    assert!(res[0].1.contains("torchrun's store"), "{}", res[0].1);
    assert!(out.join(train::METRICS).exists());
}
