//! Methods beyond the one-shot knapsack: the iterative knapsack (`knapsack::iterative`,
//! `brelu iterate`) and the tables it solves on (distortion measured on top of a spec against
//! the all-ReLU network), and the knapsack on bytes checked by the secure engine's own count.
use crate::common;
use crate::distortion::{extract_all, load, opts, rel_close, samples, tiny_model, INPUT};

use brelu::distortion::{Estimator, PlanOptions, Samples, Shard};
use brelu::knapsack::additivity::measure;
use brelu::knapsack::iterative::{iterate, IterOptions};
use brelu::knapsack::{solve, BuildOptions, Problem, Solver};
use brelu::models::Model;
use brelu::spec::{spec_cost, PatchOption, Spec};
use tch::{Device, Kind, Tensor};

/// mean over samples and outputs of (f_spec - f_relu)^2, by whole forward passes.
fn joint(m: &mut Model, s: &Samples, spec: Option<&Spec>) -> f64 {
    let _g = tch::no_grad_guard();
    let x = Tensor::from_slice(&s.data).view([s.shape[0] as i64, 1, 8, 8]);
    m.clear_spec();
    let f = m.forward_t(&x, false).to_kind(Kind::Double);
    if let Some(sp) = spec {
        m.apply_spec(sp).unwrap();
    }
    let g = m.forward_t(&x, false).to_kind(Kind::Double);
    m.clear_spec();
    (g - f).square().mean(Kind::Double).double_value(&[])
}

fn against(estimator: Estimator, sites: &[&str], baseline: &Spec) -> PlanOptions {
    PlanOptions {
        baseline: Some(brelu::hash::fnv_hex(baseline.to_json_string().bytes())),
        against_relu: true,
        zero: false,
        ..opts(estimator, sites)
    }
}

/// On top of a spec S, an entry is the change of the whole spec's distortion against the
/// all-ReLU network when that one channel changes: brute force by whole forward passes. At
/// the last site the rest of the network is linear, so the first-order entries equal the
/// exact ones there.
#[test]
fn against_relu_entries_are_the_change_of_the_whole_spec() {
    let _rng = common::torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    let w = tiny_model(tmp.path());
    let s = samples(5);
    let mut m = load(&w, None);
    let infos = m.sites().to_vec();
    let spec = Spec::uniform(m.name(), INPUT, &infos, PatchOption::patch(2, 2));
    let sites = ["layer2_0_2", "layer4_1_2"];
    let dir = tmp.path().join("exact");
    let t = extract_all(
        &w,
        Some(&spec),
        &s,
        &against(Estimator::Exact, &sites, &spec),
        &dir,
        &[Shard::ALL],
    );
    let j0 = joint(&mut m, &s, Some(&spec));
    assert!(j0 > 0.0);
    let mut negative = 0;
    for site in sites {
        let tab = &t.sites[site];
        for c in [0, 3, tab.channels() - 1] {
            for (k, o) in tab.options.iter().enumerate() {
                let mut one = spec.clone();
                one.sites.get_mut(site).unwrap()[c] = *o;
                let want = joint(&mut m, &s, Some(&one)) - j0;
                let got = tab.get(c, k);
                if *o == PatchOption::patch(2, 2) {
                    assert_eq!(got, 0.0, "{site} {c} {o}");
                    continue;
                }
                negative += usize::from(got < 0.0);
                assert!(
                    (got - want).abs() <= 1e-3 * want.abs() + 1e-6 * j0,
                    "{site} channel {c} {o}: table {got}, brute force {want}"
                );
            }
        }
    }
    assert!(negative > 0, "no change improved the spec: a weak test");

    let fo = extract_all(
        &w,
        Some(&spec),
        &s,
        &against(Estimator::FirstOrder, &["layer4_1_2"], &spec),
        &tmp.path().join("fo"),
        &[Shard::ALL],
    );
    let (a, b) = (&fo.sites["layer4_1_2"], &t.sites["layer4_1_2"]);
    for (x, y) in a.values.iter().zip(&b.values) {
        assert!((x - y).abs() <= 1e-4 * y.abs() + 1e-7 * j0, "{x} vs {y}");
    }
    // SNR has no network output to compare with.
    let m2 = load(&w, Some(&spec));
    let bad = brelu::distortion::extract::plan(
        &m2,
        &brelu::spec::Catalog::builtin(),
        &s,
        &against(Estimator::Snr, &sites, &spec),
    );
    assert!(bad.unwrap_err().to_string().contains("SNR"));
}

/// Fixed and shrinking schedules: the result stays within the budget and never measures more
/// distortion than the one-shot knapsack's spec on the samples it was judged on (re-measured
/// independently); every round's spec fits its own budget; the model's options are restored.
#[test]
fn iterative_knapsack_stays_in_budget_and_never_measures_worse() {
    let _rng = common::torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    let w = tiny_model(tmp.path());
    let s = samples(6);
    let mut m = load(&w, None);
    let infos = m.sites().to_vec();
    let all: Vec<&str> = infos.iter().map(|i| i.name.as_str()).collect();
    let t = extract_all(
        &w,
        None,
        &s,
        &opts(Estimator::FirstOrder, &all),
        &tmp.path().join("one-shot"),
        &[Shard::ALL],
    );
    let p = Problem::build(&t, &infos, BuildOptions::default()).unwrap();
    let budget = p.relus() / 8;
    let (_, sol) = solve(&p, budget, Solver::Auto, 1 << 30).unwrap();
    let one_shot = p.to_spec(&sol.choice);
    let x = Tensor::from_slice(&s.data).view([6, 1, 8, 8]);
    let before = m.forward_t(&x, false);
    let make = |_: Device| Ok(load(&w, None));
    for (name, start_budget) in [("fixed", None), ("shrinking", Some(budget * 3))] {
        let o = IterOptions {
            rounds: 3,
            start_budget,
            plan: opts(Estimator::FirstOrder, &all),
            batch: 4,
        };
        let dir = tmp.path().join(name);
        let (best, r) = iterate(&mut m, &make, &s, &t, budget, &o, &dir).unwrap();
        assert!(!r.rounds.is_empty());
        for round in &r.rounds {
            assert!(round.drelus <= round.budget, "{name}: {round:?}");
            assert!(round.budget >= budget && round.measured.is_finite());
            assert!(dir
                .join(format!("round-{}/spec.json", round.round))
                .exists());
        }
        if start_budget.is_some() {
            assert_eq!(r.rounds.len(), 3, "the shrinking schedule runs every round");
            assert!(r.rounds[0].budget > r.rounds[1].budget);
            assert_eq!(r.rounds[2].budget, budget);
        }
        let cost = spec_cost(&best, &infos).drelus as u64;
        assert!(
            cost <= budget && cost == r.drelus,
            "{name}: {cost} > {budget}"
        );
        assert!(r.result <= r.start, "{name}: {} > {}", r.result, r.start);
        let specs = [
            ("one-shot".to_string(), one_shot.clone()),
            ("best".to_string(), best),
        ];
        let rows = measure(&mut m, &s, 4, &t, &specs, false).unwrap();
        assert!(rel_close(rows[0].measured, r.start, 1e-9), "{name}");
        assert!(rel_close(rows[1].measured, r.result, 1e-9), "{name}");
        assert!(rows[1].measured <= rows[0].measured);
        assert!(
            before.equal(&m.forward_t(&x, false)),
            "options not restored"
        );
    }
}

/// The knapsack on bytes: its spec's ReLU layers send at most the budget when the secure
/// engine runs it (three parties, bytes counted on the wire per layer, frames included), and
/// the engine's count exceeds the cost model's payload only by framing within the reserve
/// (`engine_framing_bound`) set aside from the budget.
#[test]
fn bytes_budget_spec_stays_within_budget_in_the_secure_engine() {
    use brelu::secure::{link::LinkConfig, plan::Settings, report::run_compare};
    let _rng = common::torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    let w = tiny_model(tmp.path());
    let mut m = load(&w, None);
    let infos = m.sites().to_vec();
    let t = brelu::distortion::DistortionTables::synthetic(
        m.name(),
        INPUT,
        &infos,
        &brelu::spec::Catalog::builtin(),
        9,
    );
    let all_relu = Spec::uniform(m.name(), INPUT, &infos, PatchOption::RELU);
    let full = spec_cost(&all_relu, &infos).bytes_engine;
    let s = samples(1);
    for frac in [0.05, 0.3] {
        let budget = (full as f64 * frac) as u64;
        let (cost, units) = brelu::knapsack::byte_budget(budget, infos.len());
        let opts = BuildOptions {
            cost,
            ..Default::default()
        };
        let p = Problem::build(&t, &infos, opts).unwrap();
        let reserve = brelu::spec::engine_framing_bound(infos.len(), budget);
        let (_, sol) = solve(&p, units, Solver::Exact, 1 << 30).unwrap();
        let spec = p.to_spec(&sol.choice);
        let predicted = spec_cost(&spec, &infos).bytes_engine;
        assert!(predicted <= budget);
        m.apply_spec(&spec).unwrap();
        let rep = run_compare(
            &m,
            std::slice::from_ref(&s.data),
            None,
            Settings::default(),
            LinkConfig::default(),
        )
        .unwrap();
        m.clear_spec();
        let act: u64 = rep
            .layers
            .iter()
            .filter(|l| l.kind == "act")
            .map(|l| l.bytes)
            .sum();
        assert!(act > 0, "the spec at {frac} kept no ReLU: a weak test");
        assert!(
            act <= budget,
            "{frac}: the engine sent {act} bytes (cost model {predicted}), budget {budget}"
        );
        // The engine adds only framing to the cost model's payload, within the reserve.
        assert!(
            act >= predicted && act - predicted <= reserve,
            "{frac}: {act} vs {predicted}"
        );
        assert_eq!(rep.agree_plaintext, 1);
    }
}
