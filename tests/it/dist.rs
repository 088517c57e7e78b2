//! Data-parallel runs on c10d (Gloo over 127.0.0.1): the collectives between two processes, two
//! ranks training exactly like one process, a killed rank stopping the other, and a 2-rank run
//! resumed in one process.
//!
//! The model is the imported torchvision ResNet18 fixture (width 16), whose batch norms the
//! exporter folded into the convolutions: without batch-norm statistics, and with the
//! augmentation off and 40 images (a multiple of the batch, so no padding), the mean of the two
//! ranks' gradients is in theory the gradient of the mean loss over both ranks' images, which is
//! what one process computes on the whole batch. Only the order of float sums differs, hence the
//! tolerance of 1e-4 relative.
use crate::common;
use brelu::dist::{Ddp, GradCompress, Group, Launch, Timeouts};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// Set in the test binary's own children that play one rank.
const CHILD: &str = "BRELU_TEST_DIST_CHILD";

/// Waits for `c` up to `limit`; kills it and fails after.
fn wait(c: &mut Child, limit: Duration, what: &str) -> (bool, String) {
    let t0 = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = c.stderr.take() {
                use std::io::Read;
                e.read_to_string(&mut err).unwrap();
            }
            return (s.success(), err);
        }
        if t0.elapsed() > limit {
            let _ = c.kill();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn collectives_between_two_processes() {
    if std::env::var_os(CHILD).is_some() {
        return collectives_rank();
    }
    let port = common::free_port();
    let mut kids: Vec<Child> = (0..2)
        .map(|r| {
            let mut c = Command::new(std::env::current_exe().unwrap());
            c.args([
                "--exact",
                "dist::collectives_between_two_processes",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .stderr(Stdio::piped())
            .stdout(Stdio::null());
            common::rank_env(&mut c, r, 2, port);
            c.spawn().unwrap()
        })
        .collect();
    for (r, k) in kids.iter_mut().enumerate() {
        let (ok, err) = wait(k, Duration::from_secs(120), &format!("rank {r}"));
        assert!(ok, "rank {r} failed:\n{err}");
    }
}

/// One rank of [`collectives_between_two_processes`]; a failed assertion fails the process.
fn collectives_rank() {
    let l = Launch::from_env().unwrap().expect("launcher variables");
    let t = Timeouts {
        init: Duration::from_secs(60),
        collective: Duration::from_secs(60),
    };
    let g = Group::join(&l, tch::Device::Cpu, t).unwrap();
    let r = g.rank as f32;
    assert_eq!((g.world, g.is_leader()), (2, g.rank == 0));

    let t = Tensor::from_slice(&[r + 1.0, 10.0 * (r + 1.0)]);
    g.all_reduce_sum(&t).unwrap();
    assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [3.0, 30.0]);

    let t = Tensor::from_slice(&[r, r, r]);
    g.broadcast(&t, 1).unwrap();
    assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [1.0; 3]);

    let g = std::rc::Rc::new(g);
    for micro in [1, 3] {
        reducer_matches_all_reduce_after_backward(&g, micro, GradCompress::None, 1e-6);
    }
    reducer_matches_all_reduce_after_backward(&g, 2, GradCompress::Fp16, 2e-3);
    reducer_matches_all_reduce_after_backward(&g, 2, GradCompress::Bf16, 2e-2);

    // Variables of two dtypes become rank 0's; then they agree, and a difference is caught
    // on the rank that differs.
    let vars = [
        Tensor::full([2, 2], (r + 5.0) as f64, (Kind::Float, tch::Device::Cpu)),
        Tensor::full([3], g.rank as i64 * 7, (Kind::Int64, tch::Device::Cpu)),
    ];
    g.broadcast_vars(&vars).unwrap();
    assert_eq!(Vec::<f32>::try_from(vars[0].view([-1])).unwrap(), [5.0; 4]);
    assert_eq!(Vec::<i64>::try_from(&vars[1]).unwrap(), [0; 3]);
    g.check_same(&vars, "variables").unwrap();
    if g.rank == 1 {
        let _ = vars[0].shallow_clone().get(0).get(1).fill_(5.5);
    }
    let e = g.check_same(&vars, "variables");
    assert_eq!(e.is_err(), g.rank == 1, "{e:?}");
    if let Err(e) = e {
        assert!(e.to_string().contains("differ from rank 0's"), "{e}");
    }
    sync_batch_norm_matches_the_whole_batch(&g);
    g.barrier().unwrap();
}

/// A small convolutional net's parameters (seeded alike on every rank), as fresh leaves.
fn tiny_net_params() -> Vec<Tensor> {
    let opts = (Kind::Float, tch::Device::Cpu);
    tch::manual_seed(3);
    [
        vec![8, 3, 3, 3],
        vec![8],
        vec![16, 8, 3, 3],
        vec![16],
        vec![10, 16],
        vec![10],
    ]
    .iter()
    .map(|s| (Tensor::randn(s.as_slice(), opts) * 0.3).set_requires_grad(true))
    .collect()
}

/// The net's mean cross-entropy on this rank's micro-batch `k` of step `step`, times `scale`.
fn tiny_net_loss(p: &[Tensor], rank: usize, step: usize, k: usize, scale: f64) -> Tensor {
    let opts = (Kind::Float, tch::Device::Cpu);
    tch::manual_seed((1000 * rank + 10 * step + k) as i64);
    let x = Tensor::randn([4, 3, 8, 8], opts);
    let y = Tensor::randint(10, [4], (Kind::Int64, tch::Device::Cpu));
    let h = x.conv2d(&p[0], Some(&p[1]), 1, 1, 1, 1).relu();
    let h = h.conv2d(&p[2], Some(&p[3]), 2, 1, 1, 1).relu();
    let h = h.mean_dim(&[2i64, 3][..], false, Kind::Float);
    h.linear(&p[4], Some(&p[5])).cross_entropy_for_logits(&y) * scale
}

/// DDP's Reducer (buckets of 512 bytes, so several, all-reduced during the backward pass of
/// the last of `micro` micro-batches) against today's reference: accumulate, then all-reduce
/// every gradient and divide by the world size. Two steps, the second after the Reducer has
/// re-bucketed in gradient order; gradients equal to `tol` relative (compressed: rounded).
fn reducer_matches_all_reduce_after_backward(
    g: &std::rc::Rc<Group>,
    micro: usize,
    compress: GradCompress,
    tol: f64,
) {
    let (reference, ddp_params) = (tiny_net_params(), tiny_net_params());
    let ddp = Ddp::new(g.clone(), &ddp_params, 512, compress).unwrap();
    for step in 0..2 {
        for p in reference.iter().chain(&ddp_params) {
            let mut gr = p.grad();
            if gr.defined() {
                let _ = gr.zero_();
            }
        }
        for k in 0..micro {
            let scale = 1.0 / micro as f64;
            tiny_net_loss(&reference, g.rank, step, k, scale).backward();
            let last = k + 1 == micro;
            if last {
                ddp.arm().unwrap();
            }
            tiny_net_loss(&ddp_params, g.rank, step, k, scale).backward();
        }
        for (i, (a, b)) in reference.iter().zip(&ddp_params).enumerate() {
            let want = a.grad().copy();
            g.all_reduce_sum(&want).unwrap();
            let want = want / g.world as f64;
            let got = b.grad();
            let d = (&got - &want).abs().max().double_value(&[]);
            let scale = want.abs().max().double_value(&[]);
            assert!(
                d <= tol * scale,
                "{compress:?}, {micro} micro-batch(es), step {step}, parameter {i}: the \
                 Reducer's gradient is off by {d} (scale {scale})"
            );
            // Each rank's own gradient differs: the comparison is not trivially true.
            assert!((a.grad() - &want).abs().max().double_value(&[]) > 1e-4);
        }
    }
}

/// Synchronised batch norm on each rank's half of a batch against ordinary batch norm on the
/// whole batch in one process: outputs, input gradients (under a random upstream gradient),
/// weight and bias gradients summed over the ranks, and the running statistics.
fn sync_batch_norm_matches_the_whole_batch(g: &Group) {
    let opts = (Kind::Float, tch::Device::Cpu);
    tch::manual_seed(17);
    let x_full = (Tensor::randn([4, 3, 5, 5], opts) * 2.0 + 0.5).set_requires_grad(true);
    let up_full = Tensor::randn([4, 3, 5, 5], opts);
    let w = Tensor::randn([3], opts).set_requires_grad(true);
    let b = Tensor::randn([3], opts).set_requires_grad(true);
    let (rm, rv) = (Tensor::zeros([3], opts), Tensor::ones([3], opts));
    let y_ref = Tensor::batch_norm(
        &x_full,
        Some(&w),
        Some(&b),
        Some(&rm),
        Some(&rv),
        true,
        0.1,
        1e-5,
        false,
    );
    (&y_ref * &up_full).sum(Kind::Float).backward();
    let (gw_ref, gb_ref) = (w.grad().copy(), b.grad().copy());
    let _ = w.grad().zero_();
    let _ = b.grad().zero_();

    let rows = |t: &Tensor| t.narrow(0, 2 * g.rank as i64, 2);
    let x = rows(&x_full.detach()).copy().set_requires_grad(true);
    let (rm2, rv2) = (Tensor::zeros([3], opts), Tensor::ones([3], opts));
    let y = g
        .sync_batch_norm(&x, [&w, &b, &rm2, &rv2], 0.1, 1e-5)
        .unwrap();
    (&y * rows(&up_full)).sum(Kind::Float).backward();
    let close = |a: &Tensor, b: &Tensor, what: &str| {
        let d = (a - b).abs().max().double_value(&[]);
        assert!(
            d <= 1e-5 * (1.0 + b.abs().max().double_value(&[])),
            "{what}: off by {d}"
        );
    };
    close(&y, &rows(&y_ref), "output");
    close(&x.grad(), &rows(&x_full.grad()), "input gradient");
    let (gw, gb) = (w.grad().copy(), b.grad().copy());
    g.all_reduce_sum(&gw).unwrap();
    g.all_reduce_sum(&gb).unwrap();
    close(&gw, &gw_ref, "weight gradient summed over the ranks");
    close(&gb, &gb_ref, "bias gradient summed over the ranks");
    close(&rm2, &rm, "running mean");
    close(&rv2, &rv, "running variance");
}

/// The BN-free ResNet18 on a tiny CIFAR-10 without augmentation; `run` is "iterations = 4\n
/// checkpoint_every = 1" or "epochs = N".
fn setup(dir: &Path, run: &str) -> PathBuf {
    common::tiny_cifar10(dir);
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/resnet18-w16.onnx");
    let cfg = dir.join("ddp.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = \"onnx:{}\"\nnum_classes = 10\ninput = [3, 32, 32]\n{run}\nbatch_size = 8\n\
             seed = 5\n[dataset]\nkind = \"cifar10\"\npath = \"{}\"\naugment = {{ pad = 0, flip = false }}\n\
             [optimizer]\nlr = 0.02\nmomentum = 0.9\nweight_decay = 1e-4\n[schedule]\nkind = \"cosine\"\n",
            model.display(),
            dir.display()
        ),
    )
    .unwrap();
    cfg
}

fn train_cmd(cfg: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(common::brelu_exe());
    c.args(["train", "-c"])
        .arg(cfg)
        .arg("-o")
        .arg(out)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Runs `train` in `world` ranks (1: a plain process) and waits for all.
fn train(world: usize, cfg: &Path, out: &Path, extra: &[&str]) {
    let port = common::free_port();
    let mut kids: Vec<Child> = (0..world)
        .map(|r| {
            let mut c = train_cmd(cfg, out, extra);
            if world > 1 {
                common::rank_env(&mut c, r, world, port);
            }
            c.spawn().unwrap()
        })
        .collect();
    for (r, k) in kids.iter_mut().enumerate() {
        let (ok, err) = wait(k, Duration::from_secs(300), &format!("rank {r}"));
        assert!(ok, "rank {r} of {world} failed:\n{err}");
    }
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join(brelu::train::METRICS))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Largest |a - b| over all tensors, relative to the largest |a|.
fn weights_gap(a: &Path, b: &Path) -> f64 {
    let load = |p: &Path| {
        let mut v = Tensor::read_safetensors(p.join(brelu::train::CHECKPOINT_WEIGHTS)).unwrap();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    let (wa, wb) = (load(a), load(b));
    assert_eq!(wa.len(), wb.len());
    let (mut gap, mut scale) = (0f64, 0f64);
    for ((na, ta), (nb, tb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        let ta = ta.to_kind(Kind::Double);
        gap = gap.max(
            (&ta - tb.to_kind(Kind::Double))
                .abs()
                .max()
                .double_value(&[]),
        );
        scale = scale.max(ta.abs().max().double_value(&[]));
    }
    gap / scale
}

fn assert_close(a: f64, b: f64, what: &str) {
    assert!(
        (a - b).abs() <= 1e-4 * a.abs().max(b.abs()).max(1e-3),
        "{what}: {a} vs {b}"
    );
}

/// Two ranks with batch 4 each step like one process with batch 8: the same loss at every
/// step, and the same weights at the end. The ranks' weights are compared after every step
/// by the run itself (a checkpoint every iteration checks them bit for bit, and a difference
/// fails the run, as `collectives_between_two_processes` shows).
#[test]
fn two_ranks_train_like_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path(), "iterations = 4\ncheckpoint_every = 1");
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    train(1, &cfg, &one, &[]);
    train(2, &cfg, &two, &[]);
    let (m1, m2) = (metrics(&one), metrics(&two));
    assert_eq!((m1.len(), m2.len()), (4, 4));
    for (a, b) in m1.iter().zip(&m2) {
        assert_eq!(a["iteration"], b["iteration"]);
        let it = a["iteration"].as_u64().unwrap();
        assert_close(
            a["train_loss"].as_f64().unwrap(),
            b["train_loss"].as_f64().unwrap(),
            &format!("training loss at iteration {it}"),
        );
        assert_close(
            a["test"]["loss"].as_f64().unwrap(),
            b["test"]["loss"].as_f64().unwrap(),
            &format!("test loss after iteration {it}"),
        );
    }
    let gap = weights_gap(&one, &two);
    assert!(gap <= 1e-4, "weights differ by {gap} of their scale");
}

#[test]
fn a_killed_rank_stops_the_other() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path(), "iterations = 100000\ncheckpoint_every = 2");
    let out = tmp.path().join("run");
    let port = common::free_port();
    let mut kids: Vec<Child> = (0..2)
        .map(|r| {
            let mut c = train_cmd(&cfg, &out, &[]);
            common::rank_env(&mut c, r, 2, port);
            c.spawn().unwrap()
        })
        .collect();
    // Mid-run: once rank 0 has written its first checkpoint.
    let t0 = Instant::now();
    while !out.join(brelu::train::METRICS).exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(50));
    }
    kids[1].kill().unwrap();
    let _ = kids[1].wait();
    let killed = Instant::now();
    let (ok, err) = wait(&mut kids[0], Duration::from_secs(60), "rank 0");
    assert!(!ok, "rank 0 succeeded although rank 1 was killed");
    assert!(err.contains("distributed"), "{err}");
    assert!(
        killed.elapsed() < Duration::from_secs(60),
        "rank 0 took {:?}",
        killed.elapsed()
    );
}

/// A 2-rank run stopped after epoch 1 and resumed in one process continues at epoch 2 from the
/// 2-rank weights, and ends where a 1-process run of 2 epochs ends.
#[test]
fn two_rank_run_resumes_in_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path(), "epochs = 2");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    train(2, &cfg, &a, &["--epochs", "1"]);
    let first = metrics(&a);
    assert_eq!(first.len(), 1);
    train(1, &cfg, &a, &["--epochs", "2", "--resume"]);
    let resumed = metrics(&a);
    assert_eq!(resumed.len(), 2);
    assert_eq!(resumed[0], first[0], "the 2-rank epoch's line is kept");
    assert_eq!(resumed[1]["epoch"], 2);
    train(1, &cfg, &b, &["--epochs", "2"]);
    let direct = metrics(&b);
    assert_close(
        resumed[1]["train_loss"].as_f64().unwrap(),
        direct[1]["train_loss"].as_f64().unwrap(),
        "epoch 2 training loss",
    );
    let gap = weights_gap(&a, &b);
    assert!(gap <= 1e-4, "weights differ by {gap} of their scale");
}

/// With batch norm in training mode: two ranks with `--sync-bn` step like one process on the
/// whole batch (the statistics of both ranks' images together, forward and backward), while
/// without it each rank normalises its own half and the losses drift apart.
#[test]
fn synchronised_batch_norm_trains_like_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = common::tiny_dataset(tmp.path());
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("epochs = 1\n", "iterations = 4\ncheckpoint_every = 1\n")
        .replace("lr = 0.05", "lr = 0.02");
    std::fs::write(&cfg, text).unwrap();
    let (one, sync, plain) = (
        tmp.path().join("one"),
        tmp.path().join("sync"),
        tmp.path().join("plain"),
    );
    train(1, &cfg, &one, &[]);
    train(2, &cfg, &sync, &["--sync-bn"]);
    train(2, &cfg, &plain, &[]);
    let (m1, ms, mp) = (metrics(&one), metrics(&sync), metrics(&plain));
    assert_eq!((m1.len(), ms.len(), mp.len()), (4, 4, 4));
    // The first step sees identical weights, so synchronised statistics give one process's
    // loss to rounding, and after its update (running statistics included) one process's test
    // loss; so does the second step. Later steps amplify rounding through 8x8 batch-norm layers (each rank's statistics
    // are rounded to f32 before they are combined: 1e-6 after step 2, 3e-3 after step 4), so
    // those are compared with the per-rank run instead: synchronised must be far closer.
    let loss = |m: &serde_json::Value| m["train_loss"].as_f64().unwrap();
    let test = |m: &serde_json::Value| m["test"]["loss"].as_f64().unwrap();
    assert_close(
        loss(&m1[0]),
        loss(&ms[0]),
        "sync-bn training loss at step 1",
    );
    for (i, (a, b)) in m1.iter().zip(&ms).take(2).enumerate() {
        assert_close(
            test(a),
            test(b),
            &format!("sync-bn test loss after step {}", i + 1),
        );
    }
    let deviation = |other: &[serde_json::Value]| {
        m1.iter()
            .zip(other)
            .flat_map(|(a, b)| {
                [
                    (loss(a) - loss(b)).abs() / loss(a),
                    (test(a) - test(b)).abs() / test(a),
                ]
            })
            .fold(0.0, f64::max)
    };
    let (synced, per_rank) = (deviation(&ms), deviation(&mp));
    assert!(
        synced < 1e-2,
        "sync-bn losses drift from one process by {synced}"
    );
    assert!(
        per_rank > 10.0 * synced,
        "per-rank batch norm ({per_rank}) should drift far more than sync-bn ({synced})"
    );
    let (gap_sync, gap_plain) = (weights_gap(&one, &sync), weights_gap(&one, &plain));
    assert!(
        gap_sync < 5e-2 && gap_plain > 100.0 * gap_sync,
        "weights (running statistics included) differ by {gap_sync} with sync-bn, {gap_plain} without"
    );
}
