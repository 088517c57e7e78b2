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

// ---------------------------------------------------------------------------------------------
// Specs in the published code's format (scripts/published_spec_fixture.py made the fixtures)
// ---------------------------------------------------------------------------------------------

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/published")
        .join(name)
}

/// The published pickle (numpy int32 arrays, pickle protocol 4, and the protocol-2 form whose
/// array bytes go through `_codecs`) imports to the spec the fixture script wrote in brelu's
/// format; through the CLI too.
#[test]
fn published_pickles_import_to_the_same_spec() {
    let want = Spec::read(&fixture("resnet18-cifar.json")).unwrap();
    let sites = r18();
    for f in ["resnet18-cifar.pickle", "resnet18-cifar.p2.pickle"] {
        let got = brelu::spec::import_published(&fixture(f), "resnet18-cifar", [3, 32, 32], &sites)
            .unwrap();
        assert_eq!(got, want, "{f}");
    }
    // Identity and zero channels and non-square patches are all in the fixture.
    let all: Vec<PatchOption> = want.sites.values().flatten().copied().collect();
    assert!(all.contains(&PatchOption::Identity) && all.contains(&PatchOption::Zero));
    assert!(all.contains(&PatchOption::patch(1, 3)));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("spec.json");
    let st = brelu()
        .args(["spec", "import-published"])
        .arg(fixture("resnet18-cifar.pickle"))
        .args(["--model", "resnet18-cifar", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert_eq!(Spec::read(&out).unwrap(), want);
}

/// A pickle of a dict of layer name -> list of [h, w] lists (protocol 2), written here.
fn list_pickle(entries: &[(&str, Vec<[u8; 2]>)]) -> Vec<u8> {
    let mut b = vec![0x80, 2, b'}', b'('];
    for (name, rows) in entries {
        b.push(b'X');
        b.extend((name.len() as u32).to_le_bytes());
        b.extend(name.as_bytes());
        b.extend([b']', b'(']);
        for r in rows {
            b.extend([b'K', r[0], b'K', r[1], 0x86]);
        }
        b.push(b'e');
    }
    b.extend([b'u', b'.']);
    b
}

/// Every layer name, channel count and option is checked; the error names the file and the
/// first mismatch, and nothing is written.
#[test]
fn published_pickles_with_mismatches_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let model = find("resnet18-cifar-light").unwrap();
    let input = model.default_input();
    let sites = sites(model, input).unwrap();
    let good: Vec<(&str, Vec<[u8; 2]>)> = sites
        .iter()
        .map(|s| (s.name.as_str(), vec![[2, 2]; s.channels]))
        .collect();
    let import = |entries: &[(&str, Vec<[u8; 2]>)]| {
        let p = dir.path().join("x.pickle");
        std::fs::write(&p, list_pickle(entries)).unwrap();
        brelu::spec::import_published(&p, model.name(), input, &sites).map_err(|e| e.to_string())
    };
    let spec = import(&good).unwrap();
    assert!(spec
        .sites
        .values()
        .flatten()
        .all(|o| *o == PatchOption::patch(2, 2)));
    let mut bad_option = good.clone();
    bad_option[1].1[3] = [0, 0];
    let e = import(&bad_option).unwrap_err();
    let second = &sites[1].name;
    assert!(
        e.contains("x.pickle") && e.contains(&format!("'{second}' channel 3: [0, 0]")),
        "{e}"
    );
    let mut unknown = good.clone();
    unknown[0].0 = "layer9_0_1";
    assert!(import(&unknown)
        .unwrap_err()
        .contains("'layer9_0_1' is not a ReLU site"));
    let mut short = good.clone();
    short[2].1.pop();
    let e = import(&short).unwrap_err();
    assert!(e.contains(&sites[2].name) && e.contains("channels"), "{e}");
    let e = import(&good[1..]).unwrap_err();
    assert!(
        e.contains(&format!("no entry for layer '{}'", sites[0].name)),
        "{e}"
    );
    // The published resnet18-cifar file is not a spec of the light model.
    let e = brelu::spec::import_published(
        &fixture("resnet18-cifar.pickle"),
        model.name(),
        input,
        &sites,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("'stem'") && e.contains("channels"), "{e}");
    // Not a pickle at all.
    let p = dir.path().join("junk.pickle");
    std::fs::write(&p, b"{\"json\": true}").unwrap();
    let e = brelu::spec::import_published(&p, model.name(), input, &sites)
        .unwrap_err()
        .to_string();
    assert!(e.contains("junk.pickle") && e.contains("pickle"), "{e}");
}
