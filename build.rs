//! Build script: makes the binaries find libtorch without LD_LIBRARY_PATH (rpath), compiles the
//! c10d shim (src/dist/shim.cpp) against libtorch's headers, and with the `cuda` feature
//! compiles kernels/*.cu to PTX with nvcc and the shim with NCCL.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let libtorch = env::var("LIBTORCH")
        .map(PathBuf::from)
        .unwrap_or_else(|_| manifest.join(".libtorch/py/torch"));
    let torch_lib = libtorch.join("lib");
    // The wheel keeps the CUDA runtime (needed by libtorch_cpu) beside torch/, under nvidia/.
    let cuda_lib = libtorch.join("../nvidia/cu13/lib");
    for dir in [&torch_lib, &cuda_lib] {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
        println!("cargo:rustc-link-arg=-Wl,-rpath-link,{}", dir.display());
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        // tch links libtorch_cuda only as-needed; nothing references it directly, so without
        // this the binary silently reports no CUDA device.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{}", torch_lib.display());
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
        compile_kernels(&manifest);
    }
    compile_shim(&manifest, &libtorch);
}

/// The C++ shim over PyTorch's c10d (TCPStore, ProcessGroupGloo, with `cuda` also
/// ProcessGroupNCCL), built with the `cc` crate like tch's own C++ layer. Its headers: libtorch's
/// include/, the gloo headers `scripts/setup.sh` pins (or GLOO_INCLUDE), and with `cuda` the
/// CUDA headers beside nvcc and NCCL's from PyPI (or NCCL_INCLUDE).
fn compile_shim(manifest: &Path, libtorch: &Path) {
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE");
    println!("cargo:rerun-if-env-changed=NCCL_INCLUDE");
    let src = manifest.join("src/dist/shim.cpp");
    let precision = manifest.join("src/train/precision.cpp");
    for f in [&src, &precision] {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let gloo = env::var("GLOO_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| manifest.join(".gloo/include"));
    if !gloo.join("gloo/config.h").is_file() {
        panic!(
            "the gloo headers are missing from {}: run `scripts/setup.sh` (or `make setup`), \
             or set GLOO_INCLUDE to a directory containing gloo/config.h",
            gloo.display()
        );
    }
    let inc = libtorch.join("include");
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .file(&src)
        .file(&precision)
        .include(&inc)
        .include(inc.join("torch/csrc/api/include"))
        .include(&gloo)
        .define("USE_C10D_GLOO", None)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        // libtorch's headers warn a lot under -Wall; the shim itself is small.
        .warnings(false)
        .flag_if_supported("-w")
        // Glue over libtorch: debug info of libtorch's headers would double the compile time,
        // and nobody steps through them.
        .debug(false);
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
        let cuda_inc = Path::new(&nvcc)
            .parent()
            .map(|bin| bin.join("../include"))
            .filter(|d| d.join("cuda_runtime.h").is_file())
            .unwrap_or_else(|| PathBuf::from("/usr/local/cuda/include"));
        // NCCL and the CUDA library headers (cuBLAS, cuSPARSE, cuSOLVER, CCCL) that libtorch's
        // ATen/cuda headers include.
        let nccl = env::var("NCCL_INCLUDE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| manifest.join(".cuda-headers/include"));
        if !nccl.join("nccl.h").is_file() {
            panic!(
                "the `cuda` feature builds the NCCL process group, but {} has no nccl.h: run \
                 `scripts/setup.sh nvcc` (or `make cuda-setup`), or set NCCL_INCLUDE",
                nccl.display()
            );
        }
        b.include(cuda_inc)
            .include(nccl)
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .define("BRELU_NCCL", None);
    }
    b.compile("brelu_c10d");
    println!(
        "cargo:rustc-link-search=native={}",
        libtorch.join("lib").display()
    );
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

fn compile_kernels(manifest: &Path) {
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=BRELU_CUDA_ARCH");
    let kernels = manifest.join("kernels");
    println!("cargo:rerun-if-changed={}", kernels.display());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let arch = env::var("BRELU_CUDA_ARCH").unwrap_or_else(|_| "sm_90".to_string());
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernels)
        .expect("kernels/ directory is missing")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .filter(|p| p.file_stem().is_some_and(|s| s != "host_check"))
        .collect();
    sources.sort();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let ptx = out.join(src.file_stem().unwrap()).with_extension("ptx");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
            .arg(format!("-arch={arch}"))
            .arg("-I")
            .arg(&kernels)
            .arg("-o")
            .arg(&ptx)
            .arg(src)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("nvcc failed ({s}) compiling {}", src.display()),
            Err(e) => panic!(
                "the `cuda` feature needs nvcc, but running `{nvcc}` failed: {e}. \
                 Put nvcc on PATH or set NVCC=/path/to/nvcc (`make cuda-setup` installs it from PyPI \
                 into .nvcc/)."
            ),
        }
    }
    compile_host_check(&nvcc, &kernels, &out);
}

/// Builds kernels/host_check.cu into a host executable (no GPU needed) with the same nvcc,
/// and tells the tests where it is through BRELU_HOST_CHECK.
fn compile_host_check(nvcc: &str, kernels: &Path, out: &Path) {
    let src = kernels.join("host_check.cu");
    println!("cargo:rerun-if-changed={}", src.display());
    let exe = out.join("host_check");
    let mut cmd = Command::new(nvcc);
    cmd.args(["-x", "cu", "-O2", "-std=c++17"])
        .arg("-I")
        .arg(kernels);
    // nvcc links the static CUDA runtime; nvcc from PyPI keeps it in ../lib beside bin/.
    if let Some(lib) = Path::new(nvcc)
        .parent()
        .map(|b| b.join("../lib"))
        .filter(|l| l.is_dir())
    {
        cmd.arg("-L").arg(lib);
    }
    let status = cmd.arg("-o").arg(&exe).arg(&src).status();
    match status {
        Ok(s) if s.success() => println!("cargo:rustc-env=BRELU_HOST_CHECK={}", exe.display()),
        Ok(s) => panic!(
            "nvcc failed ({s}) building the host harness {}",
            src.display()
        ),
        Err(e) => panic!("running `{nvcc}` for {} failed: {e}", src.display()),
    }
}
