//! Shared test fixtures.
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// libtorch has one random generator per process, and all tests share the process: a test
/// that seeds it, draws from it (random tensors, weight initialisation, dropout, training) or
/// needs its draws to repeat holds this lock, so each such test sees the same numbers however
/// the harness schedules the others.
pub fn torch_rng() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A tiny MNIST-layout data set (train and test, 8x8) and a configuration pointing at it.
pub fn tiny_dataset(dir: &Path) -> PathBuf {
    for (prefix, n) in [("train", 40usize), ("t10k", 10)] {
        let mut imgs = vec![0, 0, 8, 3];
        imgs.extend_from_slice(&(n as u32).to_be_bytes());
        imgs.extend_from_slice(&8u32.to_be_bytes());
        imgs.extend_from_slice(&8u32.to_be_bytes());
        imgs.extend((0..n * 64).map(|k| ((k * 37) % 251) as u8));
        let mut labs = vec![0, 0, 8, 1];
        labs.extend_from_slice(&(n as u32).to_be_bytes());
        labs.extend((0..n).map(|i| (i % 10) as u8));
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), imgs).unwrap();
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), labs).unwrap();
    }
    let cfg = dir.join("tiny.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = \"resnet18-cifar-light\"\nnum_classes = 10\ninput = [1, 8, 8]\nepochs = 1\n\
             batch_size = 8\nseed = 3\n[dataset]\nkind = \"mnist\"\npath = \"{}\"\n\
             [optimizer]\nlr = 0.05\nmomentum = 0.9\nweight_decay = 1e-4\n\
             [schedule]\nkind = \"cosine\"\n",
            dir.display()
        ),
    )
    .unwrap();
    cfg
}

/// The brelu binary: `BRELU_BIN` when set (a packed test binary on another machine, where the
/// build path does not exist), else the one cargo built.
pub fn brelu_exe() -> std::ffi::OsString {
    std::env::var_os("BRELU_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_brelu").into())
}

/// Runs the brelu binary; returns (success, stdout, stderr).
pub fn brelu(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(brelu_exe())
        .args(args)
        .output()
        .expect("the brelu binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sets a spec cycling through ReLU, patches (clipped to each map), identity and zero.
pub fn mixed_spec(model: &mut brelu::models::Model) {
    use brelu::spec::PatchOption;
    let cycle = [
        PatchOption::RELU,
        PatchOption::patch(2, 2),
        PatchOption::patch(1, 3),
        PatchOption::Identity,
        PatchOption::patch(3, 3),
        PatchOption::Zero,
        PatchOption::patch(2, 1),
    ];
    for (i, s) in model.sites().to_vec().iter().enumerate() {
        let opts = (0..s.channels)
            .map(|c| cycle[(c + i) % cycle.len()].clipped(s.height, s.width))
            .collect();
        model.set_site_options(i, Some(opts)).unwrap();
    }
}

/// A tiny CIFAR-10 in the binary layout (5 train batches of 8 images, 16 test images).
pub fn tiny_cifar10(dir: &Path) {
    let batch = |n: usize, seed: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                let label = ((i + seed) % 10) as u8;
                std::iter::once(label)
                    .chain((0..3072).map(move |k| ((k * 31 + i * 17 + seed * 7) % 251) as u8))
            })
            .collect()
    };
    for b in 1..=5 {
        std::fs::write(dir.join(format!("data_batch_{b}.bin")), batch(8, b)).unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), batch(16, 0)).unwrap();
}

/// A TCP port on 127.0.0.1 that was free a moment ago, for a test's own processes.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The launcher variables of rank `rank` of `world` on 127.0.0.1:`port` (torchrun's names),
/// with one-minute timeouts and one thread per rank (torchrun's default; ranks share 2 cores).
pub fn rank_env(cmd: &mut std::process::Command, rank: usize, world: usize, port: u16) {
    cmd.env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("BRELU_DIST_TIMEOUT", "60")
        .env("BRELU_DIST_INIT_TIMEOUT", "60")
        .env("OMP_NUM_THREADS", "1");
}
