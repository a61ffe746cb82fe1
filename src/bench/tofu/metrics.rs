//! TOFU's metrics as open-unlearning defines them (locuslab/open-unlearning at d3d7cf9):
//! pure functions of per-question numbers, so each can be checked by hand.
//!
//! - Truth ratio (`src/evals/metrics/memorization.py`, `truth_ratio`): with `p = exp(-mean token
//!   NLL)`, `tr = p(wrong) / (p(correct) + 1e-10)`, where `p(wrong)` is `exp(-mean over the
//!   perturbed answers of their mean token NLL)`. Forget sets aggregate as
//!   `mean(min(tr, 1 / (tr + 1e-10)))` ("closer_to_1_better"), the others as
//!   `mean(max(0, 1 - tr))` ("true_better").
//! - Forget quality (`privacy.py`, `ks_test`): the two-sided two-sample Kolmogorov-Smirnov
//!   p-value between the per-question forget truth ratios of a model and of the retain model,
//!   as `scipy.stats.ks_2samp` computes it (exact for samples of up to 10,000, as scipy's
//!   `method="auto"`).
//! - Model utility (`utility.py`, `hm_aggregate`): the harmonic mean of the sub-metrics.
//! - Normalised probability (`memorization.py`, `probability_w_options`):
//!   `p(correct) / (p(correct) + sum p(wrong) + 1e-10)`.
//! - Extraction strength (`memorization.py`, `extraction_strength`): `1 - k / T`, `k` the
//!   first position from which every teacher-forced greedy token matches the answer.
//! - MIA scores (`mia/*.py`), higher = less likely a member: LOSS (mean token NLL), ZLib
//!   (NLL / zlib-compressed length of the text), Min-K% (minus the mean of the lowest
//!   `max(1, floor(k T))` token log-probs), Min-K%++ (the same over `(log p - mu) / sigma`
//!   with `mu`, `sigma^2` the mean and variance of `log p` under the model's own next-token
//!   distribution, `sigma^2` clamped at 1e-6).
//! - MIA AUC (`mia/utils.py`): ROC AUC with forget = 0 and holdout = 1, so 1 means the forget
//!   answers look far more familiar than the holdout ones; ties count half (sklearn).
//! - privleak (`privacy.py`, `privleak`): with `s = 1 - AUC`,
//!   `(s - s_retain) / (s_retain + 1e-10) x 100`. 0 is the retain model; a model that
//!   still knows the forget set has AUC near 1 and privleak near -100.

/// Per-question truth ratio: `p(wrong) / p(correct)`, from mean token NLLs.
pub fn truth_ratio(correct_nll: f64, wrong_nlls: &[f64]) -> f64 {
    let wrong = wrong_nlls.iter().sum::<f64>() / wrong_nlls.len().max(1) as f64;
    (-wrong).exp() / ((-correct_nll).exp() + 1e-10)
}

/// Forget-set aggregate: `mean(min(tr, 1/tr))`; 1 when true and false answers are equally
/// likely.
pub fn truth_ratio_forget(trs: &[f64]) -> f64 {
    mean(trs.iter().map(|&t| t.min(1.0 / (t + 1e-10))))
}

/// Retain / real-author / world-fact aggregate: `mean(max(0, 1 - tr))`; 1 when the true
/// answer is far more likely than the false ones.
pub fn truth_ratio_true_better(trs: &[f64]) -> f64 {
    mean(trs.iter().map(|&t| (1.0 - t).max(0.0)))
}

/// `p(correct) / (p(correct) + sum p(wrong))`, probabilities as `exp(-mean token NLL)`.
pub fn normalised_prob(correct_nll: f64, wrong_nlls: &[f64]) -> f64 {
    let c = (-correct_nll).exp();
    let w: f64 = wrong_nlls.iter().map(|n| (-n).exp()).sum();
    c / (c + w + 1e-10)
}

/// Mean of an iterator; NaN when empty.
pub fn mean(xs: impl IntoIterator<Item = f64>) -> f64 {
    let (mut s, mut n) = (0.0, 0usize);
    for x in xs {
        s += x;
        n += 1;
    }
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

/// Harmonic mean (scipy's `hmean`): 0 if any value is 0. Values must be ≥ 0.
pub fn harmonic_mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    if xs.contains(&0.0) {
        return 0.0;
    }
    xs.len() as f64 / xs.iter().map(|x| 1.0 / x).sum::<f64>()
}

/// Two-sided two-sample Kolmogorov-Smirnov test: `(D, p-value)`.
///
/// `D = max |F_a - F_b|` over the pooled values. The p-value is exact (the share of the
/// `C(m+n, m)` orderings whose statistic is at least `D`, by dynamic programming over the
/// lattice path, in probabilities so large samples do not overflow) when both samples have at
/// most 10,000 values, as scipy's `method="auto"`; past that, the asymptotic Kolmogorov
/// distribution. Ties between the samples are handled in `D` (steps at the same value move
/// together), not in the p-value, as scipy.
pub fn ks_2samp(a: &[f64], b: &[f64]) -> (f64, f64) {
    let (m, n) = (a.len(), b.len());
    if m == 0 || n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut xa = a.to_vec();
    let mut xb = b.to_vec();
    xa.sort_by(f64::total_cmp);
    xb.sort_by(f64::total_cmp);
    // D in integer units of 1 / (m n): |i n - j m| after each distinct value.
    let (mut i, mut j, mut dmax) = (0usize, 0usize, 0i128);
    while i < m || j < n {
        let v = match (xa.get(i), xb.get(j)) {
            (Some(&x), Some(&y)) => x.min(y),
            (Some(&x), None) => x,
            (None, Some(&y)) => y,
            (None, None) => break,
        };
        while i < m && xa[i] <= v {
            i += 1;
        }
        while j < n && xb[j] <= v {
            j += 1;
        }
        dmax = dmax.max((i as i128 * n as i128 - j as i128 * m as i128).abs());
    }
    let d = dmax as f64 / (m as f64 * n as f64);
    if dmax == 0 {
        return (0.0, 1.0);
    }
    if m.max(n) > 10_000 {
        let en = (m * n) as f64 / (m + n) as f64;
        return (d, kolmogorov_sf(en.sqrt() * d));
    }
    // A uniformly random ordering of the pooled values is a lattice path from (0, 0) to
    // (m, n); from (i, j) the next value comes from `a` with probability (m-i) / (m-i+n-j).
    // The p-value is the probability that the path reaches a point with |i n - j m| >= dmax.
    // It is summed over first exits (probability of standing at an inside point times the
    // step out), not taken as 1 - P(inside): the finetuned model's p-values are near 1e-20,
    // which 1 - P(inside) would round to 0.
    let outside =
        |i: usize, j: usize| (i as i128 * n as i128 - j as i128 * m as i128).abs() >= dmax;
    let mut row = vec![0f64; n + 1]; // row[j] = P(standing at (i, j), inside so far)
    row[0] = 1.0;
    let mut p_out = 0.0;
    for i in 0..=m {
        let mut next = vec![0f64; n + 1];
        for j in 0..=n {
            let here = row[j];
            if here == 0.0 || (i, j) == (m, n) {
                continue;
            }
            let left = (m - i + n - j) as f64;
            if i < m {
                let q = here * (m - i) as f64 / left;
                if outside(i + 1, j) {
                    p_out += q;
                } else {
                    next[j] += q;
                }
            }
            if j < n {
                let q = here * (n - j) as f64 / left;
                if outside(i, j + 1) {
                    p_out += q;
                } else {
                    row[j + 1] += q;
                }
            }
        }
        row = next;
    }
    (d, p_out.clamp(0.0, 1.0))
}

/// Survival function of the Kolmogorov distribution, `2 sum (-1)^(k-1) exp(-2 k^2 x^2)`.
fn kolmogorov_sf(x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let mut s = 0.0;
    for k in 1..=100 {
        let k = k as f64;
        let t = (-2.0 * k * k * x * x).exp();
        s += if k as i64 % 2 == 1 { t } else { -t };
        if t < 1e-16 {
            break;
        }
    }
    (2.0 * s).clamp(0.0, 1.0)
}

/// ROC AUC of `scores` for the positive label `true` (ties count half), as sklearn's
/// `roc_auc_score`: the probability that a positive scores above a negative.
pub fn roc_auc(labels: &[bool], scores: &[f64]) -> f64 {
    let mut pairs = 0.0;
    let mut wins = 0.0;
    for (li, si) in labels.iter().zip(scores) {
        if !li {
            continue;
        }
        for (lj, sj) in labels.iter().zip(scores) {
            if *lj {
                continue;
            }
            pairs += 1.0;
            if si > sj {
                wins += 1.0;
            } else if si == sj {
                wins += 0.5;
            }
        }
    }
    if pairs == 0.0 {
        f64::NAN
    } else {
        wins / pairs
    }
}

/// MIA AUC with forget = negative, holdout = positive (open-unlearning's convention).
pub fn mia_auc(forget_scores: &[f64], holdout_scores: &[f64]) -> f64 {
    let labels: Vec<bool> = forget_scores
        .iter()
        .map(|_| false)
        .chain(holdout_scores.iter().map(|_| true))
        .collect();
    let scores: Vec<f64> = forget_scores
        .iter()
        .chain(holdout_scores)
        .copied()
        .collect();
    roc_auc(&labels, &scores)
}

/// Minus the mean of the lowest `max(1, floor(k T))` values (Shi et al. 2024, Min-K% Prob).
/// Empty input: 0, as open-unlearning.
pub fn min_k(values: &[f64], k: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = ((v.len() as f64 * k) as usize).max(1);
    -v[..n].iter().sum::<f64>() / n as f64
}

/// Min-K%++ (Zhang et al. 2024): Min-K% over `(log p - mu) / sqrt(max(var, 1e-6))`, with
/// `mu` and `var` the mean and variance of `log p` under the model's next-token distribution
/// at each position.
pub fn min_k_pp(token_logp: &[f64], mu: &[f64], var: &[f64], k: f64) -> f64 {
    let z: Vec<f64> = token_logp
        .iter()
        .zip(mu)
        .zip(var)
        .map(|((lp, m), v)| (lp - m) / v.max(1e-6).sqrt())
        .collect();
    min_k(&z, k)
}

/// Bytes of `text` compressed by zlib at level 6 (Python's `zlib.compress` default).
pub fn zlib_len(text: &str) -> usize {
    use std::io::Write;
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
    // Writing to a Vec cannot fail.
    let _ = e.write_all(text.as_bytes());
    e.finish().map(|v| v.len()).unwrap_or(0)
}

/// The ZLib score (Carlini et al. 2021): mean token NLL over the compressed length.
pub fn zlib_score(mean_nll: f64, text: &str) -> f64 {
    mean_nll / zlib_len(text).max(1) as f64
}

/// Extraction strength `1 - k / T`, with `k` the first index from which `preds[k..]` equals
/// `labels[k..]`. As open-unlearning's loop, when no suffix but the last matches (or none
/// does) `k` stops at `T - 1`, so the minimum is `1 / T`. Empty: 0.
pub fn extraction_strength(preds: &[u32], labels: &[u32]) -> f64 {
    let t = labels.len();
    if t == 0 {
        return 0.0;
    }
    let mut k = 0;
    while k < t {
        if preds[k..] == labels[k..] {
            break;
        }
        if k == t - 1 {
            break;
        }
        k += 1;
    }
    1.0 - k as f64 / t as f64
}

/// privleak from MIA AUCs (open-unlearning's `privleak`, MUSE's sign): 0 for the retain
/// model, negative when the forget set looks more familiar than to the retain model.
pub fn privleak(auc: f64, auc_retain: f64) -> f64 {
    let (s, r) = (1.0 - auc, 1.0 - auc_retain);
    (s - r) / (r + 1e-10) * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b}");
    }

    #[test]
    fn ks_two_sample_p_values_match_scipy() {
        // scipy.stats.ks_2samp([1,2,3,4,5], [6,7,8,9,10]): D = 1, p = 2 / C(10, 5).
        let (d, p) = ks_2samp(&[1.0, 2.0, 3.0, 4.0, 5.0], &[6.0, 7.0, 8.0, 9.0, 10.0]);
        close(d, 1.0, 0.0);
        close(p, 2.0 / 252.0, 1e-12);
        // Identical samples: D = 0, p = 1 (the retain model against itself).
        let x = [0.3, 0.1, 0.7, 0.5];
        assert_eq!(ks_2samp(&x, &x), (0.0, 1.0));
        // a = [1, 3], b = [2, 4, 5]: D = 2/3 (after 3, F_a = 1 and F_b = 1/3); scipy 1.17.1
        // gives p = 0.6.
        let (d, p) = ks_2samp(&[1.0, 3.0], &[2.0, 4.0, 5.0]);
        close(d, 2.0 / 3.0, 1e-12);
        close(p, 0.6, 1e-12);
        // Ties across samples: scipy 1.17.1 gives D = 0.5, p = 0.7714285714285716.
        let (d, p) = ks_2samp(&[1.0, 2.0, 2.0, 3.0], &[2.0, 3.0, 4.0, 5.0]);
        close(d, 0.5, 1e-12);
        close(p, 0.7714285714285716, 1e-12);
        // numpy RandomState(0): a = rand(40), b = rand(40) * 0.8 + 0.3, to 4 decimals; scipy
        // 1.17.1 gives D = 0.175, p = 0.5786001416508443.
        let (d, p) = ks_2samp(&RAND_A, &RAND_B);
        close(d, 0.175, 1e-12);
        close(p, 0.5786001416508443, 1e-12);
        // A finetuned-like gap: fully separated samples of 40, p = 2 / C(80, 40); the sum over
        // first exits keeps its digits (1 - P(inside) would give 0).
        let a: Vec<f64> = (1..=40).map(f64::from).collect();
        let b: Vec<f64> = (41..=80).map(f64::from).collect();
        let (_, p) = ks_2samp(&a, &b);
        assert!((p / 1.8603403656036264e-23 - 1.0).abs() < 1e-9, "{p}");
        // Unequal sizes, overlap: scipy gives p = 1.3309190098938814e-12.
        let a: Vec<f64> = (1..=30).chain([100, 101]).map(f64::from).collect();
        let b: Vec<f64> = (25..70).map(f64::from).collect();
        let (d, p) = ks_2samp(&a, &b);
        close(d, 0.8041666666666667, 1e-12);
        assert!((p / 1.3309190098938814e-12 - 1.0).abs() < 1e-9, "{p}");
    }

    const RAND_A: [f64; 40] = [
        0.5488, 0.7152, 0.6028, 0.5449, 0.4237, 0.6459, 0.4376, 0.8918, 0.9637, 0.3834, 0.7917,
        0.5289, 0.568, 0.9256, 0.071, 0.0871, 0.0202, 0.8326, 0.7782, 0.87, 0.9786, 0.7992, 0.4615,
        0.7805, 0.1183, 0.6399, 0.1434, 0.9447, 0.5218, 0.4147, 0.2646, 0.7742, 0.4562, 0.5684,
        0.0188, 0.6176, 0.6121, 0.6169, 0.9437, 0.6818,
    ];
    const RAND_B: [f64; 40] = [
        0.5876, 0.6496, 0.8581, 0.3482, 0.8334, 0.8365, 0.4683, 0.4031, 0.5523, 0.591, 0.7562,
        0.6509, 1.0907, 0.3816, 0.4671, 0.429, 0.8225, 0.5026, 0.673, 0.4955, 0.4272, 0.3883,
        0.8251, 0.4105, 0.4573, 0.595, 0.9568, 0.3777, 0.9704, 0.3769, 1.0812, 0.6749, 1.0814,
        0.7839, 0.8914, 0.3314, 0.5262, 0.3962, 0.5369, 0.395,
    ];

    #[test]
    fn truth_ratio_aggregates_by_hand() {
        // correct NLL 1, wrong NLLs 2 and 4 (mean 3): tr = e^-3 / e^-1 = e^-2.
        let tr = truth_ratio(1.0, &[2.0, 4.0]);
        close(tr, (-2f64).exp(), 1e-9);
        // Forget: min(tr, 1/tr) of [0.5, 2, 1] = [0.5, 0.5, 1] -> 2/3.
        close(truth_ratio_forget(&[0.5, 2.0, 1.0]), 2.0 / 3.0, 1e-9);
        // True-better: max(0, 1 - tr) of [0.25, 2, 1] = [0.75, 0, 0] -> 0.25.
        close(truth_ratio_true_better(&[0.25, 2.0, 1.0]), 0.25, 1e-12);
        // Normalised probability: e^-1 / (e^-1 + e^-2 + e^-4).
        let (a, b, c) = ((-1f64).exp(), (-2f64).exp(), (-4f64).exp());
        close(normalised_prob(1.0, &[2.0, 4.0]), a / (a + b + c), 1e-9);
    }

    #[test]
    fn harmonic_mean_by_hand() {
        close(harmonic_mean(&[1.0, 0.5, 0.25]), 3.0 / 7.0, 1e-12);
        assert_eq!(harmonic_mean(&[0.4, 0.0]), 0.0);
    }

    #[test]
    fn auc_counts_ties_half() {
        // Positives 0.8 and 0.4, negatives 0.4 and 0.1: pairs (0.8>0.4), (0.8>0.1),
        // (0.4=0.4: half), (0.4>0.1) -> 3.5 / 4.
        let labels = [true, true, false, false];
        close(roc_auc(&labels, &[0.8, 0.4, 0.4, 0.1]), 0.875, 1e-12);
        // Forget answers with low loss (familiar), holdout high: AUC 1, privleak vs a retain
        // model at 0.5 is -100; the retain model against itself is 0.
        let auc = mia_auc(&[0.1, 0.2], &[1.0, 2.0]);
        close(auc, 1.0, 0.0);
        close(privleak(auc, 0.5), -100.0, 1e-6);
        close(privleak(0.5, 0.5), 0.0, 1e-9);
    }

    #[test]
    fn min_k_and_min_k_pp_by_hand() {
        // k = 0.4 of 5 tokens: the 2 lowest, -1 and -3 -> 2.
        close(min_k(&[-0.1, -3.0, -0.5, -1.0, -0.2], 0.4), 2.0, 1e-12);
        // Fewer than 1/k tokens: still one token.
        close(min_k(&[-0.5, -2.0], 0.4), 2.0, 1e-12);
        assert_eq!(min_k(&[], 0.4), 0.0);
        // z = (lp - mu) / sigma: (-1 - -0.5)/0.5 = -1, (-2 - -1)/1 = -1... pick distinct:
        // tokens (-1, mu -0.5, var 0.25) -> -1; (-3, mu -1, var 4) -> -1; (0, mu -1, var 1)
        // -> 1. k = 0.4 of 3 -> 1 lowest -> 1.
        close(
            min_k_pp(
                &[-1.0, -3.0, 0.0],
                &[-0.5, -1.0, -1.0],
                &[0.25, 4.0, 1.0],
                0.4,
            ),
            1.0,
            1e-12,
        );
        // A zero variance is clamped at 1e-6: (0 - -1) / 1e-3 = 1000 -> min is -1000 -> 1000.
        close(min_k_pp(&[-1.0], &[0.0], &[0.0], 0.4), 1000.0, 1e-6);
    }

    #[test]
    fn zlib_lengths_match_python() {
        // len(zlib.compress(s.encode())) in CPython's zlib at its default level.
        assert_eq!(zlib_len(""), 8);
        assert_eq!(zlib_len("a"), 9);
        assert_eq!(
            zlib_len("The author in question is Jaime Vasquez, an esteemed LGBTQ+ writer."),
            PY_ZLIB_JAIME
        );
        close(zlib_score(2.0, "a"), 2.0 / 9.0, 1e-12);
    }
    const PY_ZLIB_JAIME: usize = 72;

    #[test]
    fn extraction_strength_by_hand() {
        // Whole answer greedy: k = 0, ES = 1.
        close(extraction_strength(&[1, 2, 3, 4], &[1, 2, 3, 4]), 1.0, 0.0);
        // Suffix from index 2 matches: 1 - 2/4.
        close(extraction_strength(&[9, 9, 3, 4], &[1, 2, 3, 4]), 0.5, 0.0);
        // Nothing matches: k stops at T - 1, ES = 1/T (open-unlearning's loop).
        close(extraction_strength(&[9, 9, 9, 9], &[1, 2, 3, 4]), 0.25, 0.0);
    }
}
