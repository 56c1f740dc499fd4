//! Online learning: the native learners against River on River's own bundled data set, and
//! learning while serving over real processes (tansu, redis-server, gateway, a worker, the
//! learner): feedback codes, the join's counts, weights swapped into the serving replicas, a
//! drifting stream recovered, and a learner killed under load resuming with nothing counted
//! twice.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use common::*;
use serde_json::Value;
use sluice_common::config::LearnerConfig;
use sluice_learn::Learner;

/// Progressive validation (predict, then learn) on River's Phishing rows, in River's order:
/// every prediction within 1e-9 of River's, so accuracy agrees to the example.
#[test]
fn learners_predict_what_river_predicts_on_phishing() {
    let Some(python) = venv_python(".venv") else {
        return;
    };
    let out = std::process::Command::new(python)
        .arg(root().join("tests/learning/river_phishing.py"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows: Vec<Vec<f64>> = serde_json::from_value(d["rows"].clone()).unwrap();
    let labels: Vec<f64> = serde_json::from_value(d["labels"].clone()).unwrap();
    assert_eq!(rows.len(), 1250);
    for (name, settings) in [
        ("ftrl", "algorithm = \"ftrl\""),
        ("sgd", "algorithm = \"sgd\"\nlearning_rate = 0.1"),
    ] {
        let river: Vec<f64> = serde_json::from_value(d[name].clone()).unwrap();
        let config: LearnerConfig = toml::from_str(settings).unwrap();
        let mut l = Learner::new(&config, rows[0].len());
        let (mut ours_right, mut river_right) = (0, 0);
        for (i, (x, &y)) in rows.iter().zip(&labels).enumerate() {
            let p = l.predict(x);
            assert!(
                (p - river[i]).abs() < 1e-9,
                "{name}: row {i}: Sluice {p}, River {}",
                river[i]
            );
            ours_right += usize::from((p > 0.5) == (y == 1.0));
            river_right += usize::from((river[i] > 0.5) == (y == 1.0));
            l.learn(x, y);
        }
        println!(
            "{name}: progressive accuracy Sluice {:.4}, River {:.4}",
            ours_right as f64 / 1250.0,
            river_right as f64 / 1250.0
        );
        assert_eq!(ours_right, river_right);
    }
}
