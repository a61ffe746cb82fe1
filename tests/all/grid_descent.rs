//! Greedy grid descent (`optimizer: grid`): each step moves a budget of entries by exactly one
//! step of their quantization grid, never a block's extremes, so the file written holds
//! exactly the model trained.

use crate::common::real;
use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use engram::model::quant::{fake_quant, DeployType};
use engram::unlearn::grid_descent::GridDescent;
use engram::unlearn::{answer_logp, sample_texts, token_nll, tokenize, Example, Trainable};

fn nll(tr: &Trainable, toks: &engram::unlearn::Tokenized) -> Tensor {
    let (s, c) = answer_logp(&tr.model, tr.lowest, toks)
        .unwrap()
        .sums()
        .unwrap();
    token_nll(&s, &c).unwrap()
}

/// The Eiffel Tower example, answer " Rome".
fn eiffel_rome(m: &engram::model::Model) -> engram::unlearn::Tokenized {
    tokenize(
        m,
        &[Example {
            prompt: "The Eiffel Tower is located in the city of".into(),
            answer: " Rome".into(),
        }],
        64,
    )
    .unwrap()
}

fn dense(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn a_step_moves_its_budget_by_one_grid_step_and_stays_on_the_grid() {
    let m = real();
    let mut tr = Trainable::new(m, &[5])
        .unwrap()
        .with_grid(Some(DeployType::Input))
        .unwrap();
    let gd = GridDescent::new(&mut tr, 300, 1e-3).unwrap();
    let before: Vec<Vec<f32>> = tr.vars.iter().map(|(_, v)| dense(v.as_tensor())).collect();
    let toks = eiffel_rome(m);
    let loss0 = nll(&tr, &toks);
    let grads = loss0.backward().unwrap();
    let moved = gd.step(&mut tr, &grads).unwrap();
    tr.sync().unwrap();
    // The budget is met through a sampled threshold and one entry per row: roughly, never
    // wildly over.
    assert!((50..=600).contains(&moved), "{moved} entries moved");
    let mut changed = 0usize;
    for ((name, v), old) in tr.vars.iter().zip(&before) {
        assert_eq!(tr.grid[name], GgmlDType::Q4_1, "{name}");
        let now = dense(v.as_tensor());
        // Still exactly on the grid: what a Q4_1 file written now holds.
        let q = dense(&fake_quant(v.as_tensor(), GgmlDType::Q4_1).unwrap());
        assert_eq!(q, now, "{name} left its grid");
        for (blk_old, blk_new) in old.chunks(32).zip(now.chunks(32)) {
            let hi = blk_old.iter().cloned().fold(f32::MIN, f32::max);
            let lo = blk_old.iter().cloned().fold(f32::MAX, f32::min);
            let d = (hi - lo) / 15.0;
            for (a, b) in blk_old.iter().zip(blk_new) {
                if a != b {
                    changed += 1;
                    assert!(*a != hi && *a != lo, "{name}: a block extreme moved");
                    assert!(
                        ((a - b).abs() - d).abs() <= 1e-3 * d.max(1e-6),
                        "{name}: moved {} where the step is {d}",
                        (a - b).abs()
                    );
                }
            }
        }
    }
    assert_eq!(changed, moved);
    // The moves go against the gradient: the loss they were chosen on falls.
    let loss1 = nll(&tr, &toks);
    let (l0, l1) = (
        loss0.to_scalar::<f32>().unwrap(),
        loss1.to_scalar::<f32>().unwrap(),
    );
    assert!(l1 < l0, "loss {l0} -> {l1}");
}

#[test]
fn the_fisher_cost_steers_moves_away_from_what_the_anchor_uses() {
    let m = real();
    let toks = eiffel_rome(m);
    let texts = sample_texts(m, 4, 24, 0).unwrap();
    let run = |fisher: bool| {
        let mut tr = Trainable::new(m, &[5])
            .unwrap()
            .with_grid(Some(DeployType::Input))
            .unwrap();
        let mut gd = GridDescent::new(&mut tr, 300, 1e-3).unwrap();
        if fisher {
            gd = gd.with_fisher(&tr, &texts, 4.0).unwrap();
        }
        // The anchor texts' NLL before and after one step.
        let a0 = nll(&tr, &texts).to_scalar::<f32>().unwrap();
        let grads = nll(&tr, &toks).backward().unwrap();
        gd.step(&mut tr, &grads).unwrap();
        tr.sync().unwrap();
        nll(&tr, &texts).to_scalar::<f32>().unwrap() - a0
    };
    let plain = run(false);
    let costed = run(true);
    assert!(
        costed.abs() < plain.abs(),
        "anchor NLL change with the cost {costed}, without {plain}"
    );
}
