//! Spec files: round trip, validation against a model, every bad-spec case, and the CLI's
//! behaviour on them (non-zero exit, nothing written).
use brelu::models::{find, sites};
use brelu::spec::{spec_cost, PatchOption, SiteInfo, Spec};
use std::path::Path;
use std::process::Command;

fn r18() -> Vec<SiteInfo> {
    sites(find("resnet18-cifar").unwrap(), [3, 32, 32]).unwrap()
}

fn mixed_spec() -> Spec {
    let s = r18();
    let mut spec = Spec::uniform("resnet18-cifar", [3, 32, 32], &s, PatchOption::RELU);
    let opts = [
        PatchOption::patch(2, 3),
        PatchOption::Identity,
        PatchOption::Zero,
        PatchOption::patch(4, 4),
        PatchOption::RELU,
    ];
    for (i, (_, v)) in spec.sites.iter_mut().enumerate() {
        for (c, o) in v.iter_mut().enumerate() {
            *o = opts[(i + c) % opts.len()];
        }
    }
    spec
}

#[test]
fn round_trip_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("spec.json");
    let spec = mixed_spec();
    spec.write(&p).unwrap();
    let back = Spec::load(&p, "resnet18-cifar", [3, 32, 32], &r18()).unwrap();
    assert_eq!(back, spec);
    // Site order is the model's.
    assert_eq!(back.sites.keys().next().map(String::as_str), Some("stem"));
    // The file is plain JSON other tools read.
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    assert_eq!(v["sites"]["stem"][1], serde_json::json!("identity"));
    assert_eq!(v["sites"]["stem"][0], serde_json::json!([2, 3]));
}

#[test]
fn drelu_counts_against_brute_force() {
    let s = r18();
    let spec = mixed_spec();
    let cost = spec_cost(&spec, &s);
    let mut brute = 0usize;
    for site in &s {
        for o in &spec.sites[&site.name] {
            if let PatchOption::Patch { bh, bw } = *o {
                // Count patches by walking the top-left corners.
                let mut n = 0;
                let mut y = 0;
                while y < site.height {
                    let mut x = 0;
                    while x < site.width {
                        n += 1;
                        x += bw as usize;
                    }
                    y += bh as usize;
                }
                brute += n;
            }
        }
    }
    assert_eq!(cost.drelus, brute);
    assert_eq!(cost.relus, 557_056);
    let all = Spec::uniform("resnet18-cifar", [3, 32, 32], &s, PatchOption::RELU);
    let c = spec_cost(&all, &s);
    assert_eq!(c.drelus, c.relus);
    assert_eq!(c.bytes_porthos, c.original_bytes_porthos);
    // 2x2 everywhere: a quarter of the DReLUs (all maps have even sides).
    let q = spec_cost(
        &Spec::uniform("resnet18-cifar", [3, 32, 32], &s, PatchOption::patch(2, 2)),
        &s,
    );
    assert_eq!(q.drelus * 4, q.relus);
}

fn check_bad(text: &str, expect: &str) {
    let s = r18();
    let err = Spec::from_json_str(text, Some(Path::new("bad.json")))
        .and_then(|spec| spec.validate("resnet18-cifar", [3, 32, 32], &s))
        .expect_err(expect);
    let msg = err.to_string();
    assert!(msg.contains(expect), "expected '{expect}' in: {msg}");
    assert!(msg.contains("bad.json"), "error must name the file: {msg}");
}

fn with_site(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&mixed_spec().to_json_string()).unwrap();
    edit(&mut v);
    v.to_string()
}

#[test]
fn bad_specs_name_the_first_problem() {
    check_bad("{\"model\": \"resnet18-cifar\", ", "malformed JSON");
    check_bad("[1, 2]", "expected a JSON object");
    check_bad(
        &with_site(|v| v["model"] = "resnet50".into()),
        "not 'resnet18-cifar'",
    );
    check_bad(
        &with_site(|v| v["input"] = serde_json::json!([3, 32])),
        "field 'input'",
    );
    check_bad(
        &with_site(|v| v["input"] = serde_json::json!([3, 64, 64])),
        "input [3, 64, 64]",
    );
    check_bad(
        &with_site(|v| v["sites"] = serde_json::json!(3)),
        "field 'sites'",
    );
    check_bad(
        &with_site(|v| v["sites"]["layer9_0_1"] = serde_json::json!([[1, 1]])),
        "unknown site 'layer9_0_1'",
    );
    check_bad(
        &with_site(|v| {
            v["sites"]["stem"].as_array_mut().unwrap().pop();
        }),
        "site 'stem': 63 options, the site has 64 channels",
    );
    check_bad(
        &with_site(|v| v["sites"]["layer4_1_2"][5] = serde_json::json!([5, 1])),
        "site 'layer4_1_2' channel 5: patch 5x1 is larger than the 4x4 map",
    );
    check_bad(
        &with_site(|v| v["sites"]["stem"][7] = serde_json::json!([0, 2])),
        "sites.stem[7]",
    );
    check_bad(
        &with_site(|v| v["sites"]["stem"][7] = serde_json::json!("relu6")),
        "sites.stem[7]",
    );
    check_bad(
        &with_site(|v| {
            v["sites"]
                .as_object_mut()
                .unwrap()
                .shift_remove("layer2_1_1");
        }),
        "site 'layer2_1_1' is missing",
    );
}

fn brelu() -> Command {
    Command::new(crate::common::brelu_exe())
}

#[test]
fn cli_rejects_bad_spec_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        with_site(|v| v["sites"]["stem"][0] = serde_json::json!([40, 40])),
    )
    .unwrap();
    let out = brelu()
        .args(["spec", "stats", "--model", "resnet18-cifar", "--spec"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.json") && err.contains("patch 40x40 is larger"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    // A uniform spec with a bad option writes no file.
    let target = dir.path().join("u.json");
    let out = brelu()
        .args([
            "spec",
            "uniform",
            "--model",
            "resnet18-cifar",
            "--patch",
            "2y2",
            "-o",
        ])
        .arg(&target)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!target.exists());
    let out = brelu()
        .args([
            "spec",
            "uniform",
            "--model",
            "nosuchnet",
            "--patch",
            "2x2",
            "-o",
        ])
        .arg(&target)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown model 'nosuchnet'"));
    assert!(!target.exists());
}

#[test]
fn cli_uniform_then_stats_json() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("u.json");
    let out = brelu()
        .args([
            "spec",
            "uniform",
            "--model",
            "resnet18-cifar",
            "--patch",
            "2x2",
            "-o",
        ])
        .arg(&target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = brelu()
        .args([
            "spec",
            "stats",
            "--model",
            "resnet18-cifar",
            "--json",
            "--spec",
        ])
        .arg(&target)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["relus"], 557_056);
    assert_eq!(v["drelus"], 557_056 / 4);
    let out = brelu()
        .args(["sites", "--model", "resnet50", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["total_relus"], 9_608_704);
    assert_eq!(v["total_sites"], 49);
}
