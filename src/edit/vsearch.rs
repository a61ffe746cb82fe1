//! The value search shared by ROME and MEMIT (Meng et al. 2022, section 3.1 step 2, "v*";
//! Meng et al. 2023, section 4.3, "z_i"; reference `rome/compute_v.py`, `memit/compute_z.py`):
//! find, by gradient descent, the vector that, added to a hidden state at the subject's last
//! token, makes the model say the new object.
//!
//! - ROME adds it to layer L's MLP output ([`Where::MlpOut`]) and writes v* = W k* + delta.
//! - MEMIT adds it to the residual stream after its last edited layer ([`Where::ResidPost`])
//!   and spreads z = h + delta over its layers.
//!
//! The loss, per request: the target's NLL over the prompt and its prefixed variants, plus
//! `kl_factor` x KL(new || old) of the next token after "{subject} is a", plus
//! `weight_decay` x |delta| / |h|^2; after each Adam step |delta| is clamped to
//! `clamp_norm_factor` x |h|, where h is the hooked state at the bare prompt's subject token.
//!
//! Departures from the references, all for speed, none changing the numbers of one request:
//! - layers below L never change, so their output is computed once, not at every step (and
//!   for MEMIT, whose delta is added after layer L, layer L's output too);
//! - rows are left-padded so every subject's last token sits in one column P; positions before
//!   P never change, so their keys and values are cached once and only positions P.. are
//!   recomputed at each step; above layer L, the clean pass runs only the positions up to P;
//! - the output head runs only at the positions the loss reads;
//! - several requests are searched together (MEMIT): each has its own row of the trainable
//!   `[requests, d_model]` matrix, added only to its own prompts; the summed loss gives each
//!   row exactly its own request's gradient, and Adam is per coordinate, so the result equals
//!   searching each alone. A request that reaches `stop_prob` is frozen while the others go on;
//! - requests are sorted by the length of their rows after the subject before they are cut
//!   into chunks, so a chunk pads little;
//! - the KL prompt ends at the subject's last token, the only position the KL term reads, and
//!   the KL rows run as a batch of their own, one position long;
//! - when the bare prompt starts with the subject (80% of CounterFact), the cut KL prompt is
//!   the bare prompt's first tokens, so its output is read from the bare row's lookup and no
//!   KL row runs; requests are grouped so that whole chunks run without a KL batch (whose
//!   few rows cost about 7% of a step: every weight is read for a handful of positions).

use crate::error::{Error, Result};
use crate::model::{Batch, HookPoint, KvCache, Model, Op, Positions, Trace};
use candle_core::{DType, IndexOp, Tensor, Var, D};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};

/// Where the searched vector is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Where {
    /// Layer L's MLP output (ROME's v*).
    MlpOut,
    /// The residual stream after layer L (MEMIT's z).
    ResidPost,
}

/// The search's hyper-parameters (each method documents its defaults and their sources).
#[derive(Debug, Clone)]
pub struct SearchParams {
    pub steps: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub clamp_norm_factor: f64,
    pub kl_factor: f64,
    pub stop_prob: f64,
}

/// One requested rewrite.
#[derive(Debug, Clone)]
pub struct SearchRequest<'a> {
    /// The prompt, containing the subject (e.g. "The Eiffel Tower is located in the city of").
    pub prompt: &'a str,
    pub subject: &'a str,
    /// The new object, as a continuation (leading space included: " Rome").
    pub target: &'a str,
}

impl<'a> SearchRequest<'a> {
    /// A rewrite as a request for `target` (usually [`crate::fact::continuation`]`(&r.target_new)`,
    /// which the caller keeps alive).
    pub fn of(r: &'a crate::fact::Rewrite, target: &'a str) -> SearchRequest<'a> {
        SearchRequest {
            prompt: &r.prompt,
            subject: &r.subject,
            target,
        }
    }
}

/// What the search did for one request, for reports.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SearchTrace {
    pub layer: usize,
    pub steps: usize,
    /// Mean target probability over the prompts at the last step.
    pub target_prob: f64,
    pub nll: f64,
    pub kl: f64,
    pub delta_norm: f64,
    pub n_prompts: usize,
    /// Wall time of the search, from its clean pass to its last step (requests searched
    /// together share it).
    #[serde(default)]
    pub seconds: f64,
}

/// The result for one request.
#[derive(Debug, Clone)]
pub struct Found {
    /// Mean over the prompts of layer L's MLP key at the subject's last token, `[d_mlp]`
    /// (ROME's k*).
    pub k_star: Tensor,
    /// Layer L's MLP key at the bare prompt's subject token, `[d_mlp]`.
    pub k_bare: Tensor,
    /// Mean over the prompts of the hooked state at the subject's last token, `[d_model]`
    /// (ROME: W k*, since the map is affine).
    pub h_mean: Tensor,
    /// The hooked state at the bare prompt's subject token, `[d_model]` (MEMIT's z - delta).
    pub h_bare: Tensor,
    /// The vector found, `[d_model]`.
    pub delta: Tensor,
    pub trace: SearchTrace,
}

/// Search for each request's vector at `layer`, `chunk` requests at a time (the memory of
/// the backward pass grows with the chunk). `prefixes` are the context prefixes, the first of
/// them the empty one (the bare prompt). The model is not changed.
///
/// # Errors
/// Subject not in a prompt, an empty target, a layer out of range, tensor errors.
pub fn search(
    model: &Model,
    reqs: &[SearchRequest<'_>],
    prefixes: &[String],
    layer: usize,
    at: Where,
    params: &SearchParams,
    chunk: usize,
) -> Result<Vec<Found>> {
    model.config.check_layer(layer)?;
    if prefixes.first().map(|p| !p.is_empty()).unwrap_or(true) {
        return Err(Error::invalid(
            "prefixes",
            "the first context prefix must be the empty one",
        ));
    }
    // Rows are padded to the longest tail of their chunk, so requests with tails of like
    // length are searched together: sort by tail, chunk, then put the results back in order.
    // (On the first 48 CounterFact cases, a third of the tokens were padding before.)
    let rows = build_rows(model, reqs, prefixes)?; // request q's rows at q * per_req..
    let per_req = prefixes.len() + 1;
    let tails: Vec<usize> = rows
        .chunks(per_req)
        .map(|rs| rs.iter().map(|r| r.ids.len() - r.lookup).max().unwrap_or(1))
        .collect();
    // Requests whose KL row must run come last, so the other chunks need no KL batch.
    let own_kl: Vec<bool> = rows
        .chunks(per_req)
        .map(|rs| rs.iter().any(|r| r.kl && !r.shared))
        .collect();
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    order.sort_by_key(|&i| (own_kl[i], tails[i])); // stable: equal keys keep their order
    let mut out: Vec<Option<Found>> = vec![None; reqs.len()];
    for idx in order.chunks(chunk.max(1)) {
        // The chunk's rows, their request numbers made local to the chunk.
        let c: Vec<Row> = idx
            .iter()
            .enumerate()
            .flat_map(|(local, &i)| {
                rows[i * per_req..(i + 1) * per_req]
                    .iter()
                    .map(move |r| Row {
                        req: local,
                        ..r.clone()
                    })
            })
            .collect();
        let found = search_chunk(model, c, idx.len(), prefixes, layer, at, params)?;
        for (&i, f) in idx.iter().zip(found) {
            out[i] = Some(f);
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// One row of the batch: a prefixed prompt followed by the target minus its last token, or a
/// request's KL prompt.
#[derive(Clone)]
struct Row {
    req: usize,
    ids: Vec<u32>,
    lookup: usize,
    prompt_len: usize,
    target: Vec<u32>,
    kl: bool,
    /// A KL row that is the start of its request's bare prompt row: not run, its output is
    /// read from the bare row at the lookup.
    shared: bool,
}

impl Row {
    /// The row's ids and key mask with its lookup at column `p` of `width` columns: padding
    /// on the left (`p - lookup`) and on the right.
    fn aligned(&self, p: usize, width: usize) -> (Vec<u32>, Vec<u8>) {
        let left = p - self.lookup;
        let right = width - left - self.ids.len();
        let mut ids = vec![0u32; left];
        ids.extend_from_slice(&self.ids);
        ids.extend(std::iter::repeat_n(0u32, right));
        let mut mask = vec![0u8; left];
        mask.extend(std::iter::repeat_n(1u8, self.ids.len()));
        mask.extend(std::iter::repeat_n(0u8, right));
        (ids, mask)
    }
}

fn build_rows(model: &Model, reqs: &[SearchRequest<'_>], prefixes: &[String]) -> Result<Vec<Row>> {
    let tok = model.tok()?;
    let mut rows = Vec::new();
    for (q, req) in reqs.iter().enumerate() {
        if req.target.trim().is_empty() {
            return Err(Error::invalid("target_new", "must not be empty"));
        }
        for pre in prefixes {
            let text = format!("{pre}{}", req.prompt);
            let (p, t) = tok.continuation(&text, req.target)?;
            let (_, end) = model
                .tok()?
                .subject_span(&text, req.subject, &p, pre.len())?;
            let mut ids = p.clone();
            ids.extend_from_slice(&t[..t.len() - 1]);
            rows.push(Row {
                req: q,
                ids,
                lookup: end - 1,
                prompt_len: p.len(),
                target: t,
                kl: false,
                shared: false,
            });
        }
        let kl_text = format!("{} is a", req.subject);
        let mut kl_ids = tok.encode(&kl_text)?;
        let (_, kl_end) = model
            .tok()?
            .subject_span(&kl_text, req.subject, &kl_ids, 0)?;
        // The KL term reads the subject's last token; under causal attention the tokens
        // after it cannot change that position, so they are dropped (a tail of one).
        kl_ids.truncate(kl_end);
        // The bare prompt is the first (empty prefix).
        let bare = &rows[rows.len() - prefixes.len()];
        let shared = bare.lookup == kl_end - 1 && bare.ids.get(..kl_end) == Some(&kl_ids[..]);
        rows.push(Row {
            req: q,
            ids: kl_ids,
            lookup: kl_end - 1,
            prompt_len: 0,
            target: vec![],
            kl: true,
            shared,
        });
    }
    Ok(rows)
}

/// One sub-batch of the search's rows: the residual entering the layer at its positions, the
/// cached keys and values before them, the key mask, and each row's request.
struct Rows {
    resid: Tensor,
    cache: KvCache,
    mask: Vec<Vec<u8>>,
    /// Per row, the index of its request's delta.
    req_of_row: Tensor,
    /// Zeros for the positions after the lookup, `[rows, len - 1, d_model]` (len > 1).
    zeros_tail: Option<Tensor>,
}

impl Rows {
    /// Rows `idx` of the chunk, their first `len` tail positions.
    #[allow(clippy::too_many_arguments)]
    fn new(
        all: &[Row],
        idx: &[usize],
        len: usize,
        resid_tail: &Tensor,
        cache: &KvCache,
        mask: &[Vec<u8>],
        d_model: usize,
        dev: &candle_core::Device,
    ) -> Result<Rows> {
        let row_idx: Vec<u32> = idx.iter().map(|&r| r as u32).collect();
        let row_idx = Tensor::new(row_idx.as_slice(), dev)?;
        let req_of_row: Vec<u32> = idx.iter().map(|&r| all[r].req as u32).collect();
        let past = mask.first().map(|m| m.len()).unwrap_or(0) - resid_tail.dim(1)?;
        Ok(Rows {
            resid: resid_tail
                .narrow(1, 0, len)?
                .contiguous()?
                .index_select(&row_idx, 0)?,
            cache: cache.select_rows(&row_idx)?,
            mask: idx
                .iter()
                .map(|&r| mask[r][..past + len].to_vec())
                .collect(),
            req_of_row: Tensor::new(req_of_row.as_slice(), dev)?,
            zeros_tail: if len > 1 {
                Some(Tensor::zeros(
                    (idx.len(), len - 1, d_model),
                    DType::F32,
                    dev,
                )?)
            } else {
                None
            },
        })
    }

    /// Run layers `start..` with each row's request delta added at its lookup (position 0):
    /// at `hook`, or to the input residual when `hook` is `None`. Returns the last block's
    /// output, `[rows, len, d_model]`.
    fn forward(
        &self,
        model: &Model,
        start: usize,
        hook: Option<HookPoint>,
        delta: &Var,
    ) -> Result<Tensor> {
        let per_row = delta
            .as_tensor()
            .index_select(&self.req_of_row, 0)?
            .unsqueeze(1)?;
        let add = match &self.zeros_tail {
            Some(z) => Tensor::cat(&[&per_row, z], 1)?,
            None => per_row,
        };
        let mut tr = Trace::new().differentiable();
        let x = match hook {
            Some(h) => {
                tr.push(h, Positions::All, Op::Add(add));
                self.resid.clone()
            }
            None => (&self.resid + add)?,
        };
        let n = model.config.n_layers;
        if start == n {
            return Ok(x);
        }
        tr.stop_after(HookPoint::ResidPost(n - 1));
        let mut c = self.cache.clone();
        model.forward_from(start, &x, Some(&self.mask), Some(&mut c), &mut tr, false)
    }
}

/// The rows of the requests still searching, and everything indexed by them.
///
/// The prompt rows and the KL rows that must run are two batches: a KL row needs its lookup
/// position only, and padding it to the prompts' tail made about a tenth of every step's
/// positions (`zsearch_bench memit 48`, debug log).
struct Active {
    /// Ids of the requests, ascending.
    reqs: Vec<usize>,
    req_ids: Tensor,
    /// The prompt rows (indices into the chunk's row list) and their batch.
    rows: Vec<usize>,
    prompts: Rows,
    /// The KL rows that run (not shared with a bare prompt), at their lookup only.
    kl: Option<Rows>,
    /// Rows to read from `[prompt rows x tail, then the KL batch's rows]` (flat): the loss
    /// positions (the first `n_loss`), then each active request's KL position in `reqs` order.
    gather: Tensor,
    n_loss: usize,
    /// Per loss position: its target token, weight, and prompt row.
    target_t: Tensor,
    weights: Tensor,
    row_of: Vec<usize>,
    /// Per active request: clean log-probs of the KL prompt and the decay scale.
    kl_base: Tensor,
    wd_scale: Tensor,
}

impl Active {
    #[allow(clippy::too_many_arguments)]
    fn new(
        all: &[Row],
        reqs: &[usize],
        per_req: usize,
        n_prompts: usize,
        tail: usize,
        resid_tail: &Tensor,
        cache: &KvCache,
        mask: &[Vec<u8>],
        kl_base: &Tensor,
        wd_scale: &[f32],
        d_model: usize,
        dev: &candle_core::Device,
    ) -> Result<Active> {
        let (kl_rows, rows): (Vec<usize>, Vec<usize>) = reqs
            .iter()
            .flat_map(|&q| q * per_req..(q + 1) * per_req)
            .partition(|&r| all[r].kl);
        let run_kl: Vec<usize> = kl_rows
            .iter()
            .copied()
            .filter(|&r| !all[r].shared)
            .collect();
        // Loss positions: row r's target token j is predicted at column (prompt_len - 1 + j),
        // i.e. at tail offset (prompt_len - 1 + j - lookup).
        let mut gather = Vec::new();
        let mut target_ids = Vec::new();
        let mut row_of = Vec::new();
        let mut weights = Vec::new();
        for (i, &r) in rows.iter().enumerate() {
            let row = &all[r];
            for (j, &t) in row.target.iter().enumerate() {
                let rel = row.prompt_len - 1 + j - row.lookup;
                gather.push((i * tail + rel) as u32);
                target_ids.push(t);
                row_of.push(i);
                // Mean over each row's tokens, then over the request's rows.
                weights.push(1.0 / (n_prompts as f32 * row.target.len() as f32));
            }
        }
        let n_loss = gather.len();
        // KL positions: a shared one is its bare row's lookup (tail offset 0; request a's
        // prompt rows are rows a * n_prompts.., the bare one first), the others follow the
        // prompt rows in the flat order.
        let mut next = rows.len() * tail;
        for (a, &r) in kl_rows.iter().enumerate() {
            if all[r].shared {
                gather.push((a * n_prompts * tail) as u32);
            } else {
                gather.push(next as u32);
                next += 1;
            }
        }
        let req_ids: Vec<u32> = reqs.iter().map(|&q| q as u32).collect();
        let req_ids = Tensor::new(req_ids.as_slice(), dev)?;
        let wd: Vec<f32> = reqs.iter().map(|&q| wd_scale[q]).collect();
        let batch = |idx: &[usize], len: usize| {
            Rows::new(all, idx, len, resid_tail, cache, mask, d_model, dev)
        };
        Ok(Active {
            reqs: reqs.to_vec(),
            prompts: batch(&rows, tail)?,
            kl: if run_kl.is_empty() {
                None
            } else {
                Some(batch(&run_kl, 1)?)
            },
            gather: Tensor::new(gather.as_slice(), dev)?,
            n_loss,
            target_t: Tensor::new(target_ids.as_slice(), dev)?.unsqueeze(1)?,
            weights: Tensor::new(weights.as_slice(), dev)?,
            row_of,
            kl_base: kl_base.index_select(&req_ids, 0)?,
            wd_scale: Tensor::new(wd.as_slice(), dev)?,
            req_ids,
            rows,
        })
    }
}

fn norms(x: &Tensor) -> Result<Vec<f64>> {
    // x: (n, d) -> |row| per row
    Ok(x.sqr()?
        .sum(1)?
        .sqrt()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect())
}

/// What the clean pass gives the search, rows in the chunk's order.
struct Clean {
    /// Keys and values of the positions before column P, `[rows, n_kv_heads, P, head_dim]`
    /// per layer (left-padded; the search's key mask marks the padding).
    prefix: KvCache,
    /// The residual entering the search's first layer (L, or L + 1 when the delta is added
    /// after L) at the tail positions (P..), `[rows, tail, d_model]`.
    resid_tail: Tensor,
    /// The layer's MLP key and the hooked state at the lookup, `[rows, d_mlp]`, `[rows, d_model]`.
    keys: Tensor,
    hooked: Tensor,
    /// The last block's output at the lookup, `[rows, d_model]`.
    last: Tensor,
}

/// The unedited model over the chunk's rows, with every lookup at column `p_col`.
///
/// Bare prompts' lookups sit about ten tokens before prefixed ones' (the prefix), so padding
/// every row to the longest left part wasted about a third of this pass (first 100
/// CounterFact cases). Rows are run in up to three groups of like lookup, each padded to its
/// own longest, and each group's cache is padded on the left to `p_col` afterwards. Positions
/// count real tokens only (`layers::position_ids`), so a row's keys and values do not depend
/// on how much padding precedes it.
fn clean_pass(
    model: &Model,
    rows: &[Row],
    p_col: usize,
    tail: usize,
    layer: usize,
    hook: HookPoint,
) -> Result<Clean> {
    let cfg = &model.config;
    let dev = &model.device;
    // Up to three groups of consecutive lookups (in sorted order), of at least MIN rows each,
    // chosen to compute the fewest positions: a group of rows costs rows x (its longest
    // lookup + tail) in layers 0..=layer, rows x (its longest lookup + 1) above.
    const MIN: usize = 4;
    let mut by_lookup: Vec<usize> = (0..rows.len()).collect();
    by_lookup.sort_by_key(|&r| rows[r].lookup);
    let n = by_lookup.len();
    let (below, above) = (layer + 1, cfg.n_layers - layer - 1);
    let cost = |a: usize, b: usize| {
        let lk = rows[by_lookup[b - 1]].lookup;
        (b - a) * (below * (lk + tail) + above * (lk + 1))
    };
    let mut best = (cost(0, n), vec![]);
    for i in MIN..=n.saturating_sub(MIN) {
        let c = cost(0, i) + cost(i, n);
        if c < best.0 {
            best = (c, vec![i]);
        }
        for j in i + MIN..=n.saturating_sub(MIN) {
            let c = cost(0, i) + cost(i, j) + cost(j, n);
            if c < best.0 {
                best = (c, vec![i, j]);
            }
        }
    }
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut at = 0;
    for &cut in best.1.iter().chain(std::iter::once(&n)) {
        groups.push(by_lookup[at..cut].to_vec());
        at = cut;
    }
    tracing::debug!(
        "clean pass: {} group(s), {} of {} tokens real (one group: {})",
        groups.len(),
        rows.iter().map(|r| r.ids.len()).sum::<usize>(),
        groups
            .iter()
            .map(|g| g.len() * (g.iter().map(|&r| rows[r].lookup).max().unwrap_or(0) + tail))
            .sum::<usize>(),
        rows.len() * (p_col + tail)
    );
    let take = |tr: &mut Trace, p: HookPoint| {
        tr.take(p)
            .ok_or_else(|| Error::invalid("value search", "a capture is missing"))
    };
    // Per group: prefix cache, residual tail, keys, hooked states, last block's output.
    let (mut caches, mut tails, mut keys, mut hooked, mut lasts) =
        (vec![], vec![], vec![], vec![], vec![]);
    for g in &groups {
        let p_g = g.iter().map(|&r| rows[r].lookup).max().unwrap_or(0);
        let (ids, mask): (Vec<_>, Vec<_>) =
            g.iter().map(|&r| rows[r].aligned(p_g, p_g + tail)).unzip();
        let mut tr = Trace::new();
        tr.capture(HookPoint::ResidPre(layer));
        tr.capture(HookPoint::MlpKey(layer));
        tr.capture(hook);
        tr.stop_after(HookPoint::ResidPost(layer));
        let mut cache = KvCache::new(cfg.n_layers);
        let batch = Batch {
            ids,
            mask: Some(mask.clone()),
        };
        let mid = model.forward_cached(&batch, Some(&mut cache), &mut tr)?; // (g, width, d)

        // Above the layer the search recomputes the tail (columns past p_g) at every step, so
        // the clean pass runs there only the prefix, for its keys and values, and the lookup,
        // for the KL rows' clean output (the head comes later, on the KL rows alone).
        let last = if layer + 1 < cfg.n_layers {
            let keep = p_g + 1;
            let mask: Vec<Vec<u8>> = mask.iter().map(|m| m[..keep].to_vec()).collect();
            let mut up = Trace::new();
            up.stop_after(HookPoint::ResidPost(cfg.n_layers - 1));
            let x = mid.narrow(1, 0, keep)?;
            model.forward_from(layer + 1, &x, Some(&mask), Some(&mut cache), &mut up, false)?
        } else {
            mid
        }; // (g, p_g + 1 or width, d)
        let prefix = if p_col == 0 {
            KvCache::new(cfg.n_layers)
        } else if p_g == 0 {
            let z = Tensor::zeros(
                (g.len(), cfg.n_kv_heads, p_col, cfg.head_dim),
                DType::F32,
                dev,
            )?;
            KvCache {
                layers: vec![Some((z.clone(), z)); cfg.n_layers],
            }
        } else {
            cache.truncate(p_g)?.pad_left(p_col - p_g)?
        };
        caches.push(prefix);
        let hooked_g = take(&mut tr, hook)?;
        // The search's input: the residual entering layer L, or, when the delta is added
        // after layer L, layer L's output (the search then starts at L + 1).
        let input = if hook == HookPoint::ResidPost(layer) {
            hooked_g.clone()
        } else {
            take(&mut tr, HookPoint::ResidPre(layer))?
        };
        tails.push(input.narrow(1, p_g, tail)?);
        keys.push(take(&mut tr, HookPoint::MlpKey(layer))?.i((.., p_g))?);
        hooked.push(hooked_g.i((.., p_g))?);
        lasts.push(last.i((.., p_g))?);
    }
    // Back to the chunk's row order.
    let order: Vec<usize> = groups.concat();
    let mut inv = vec![0u32; order.len()];
    for (j, &r) in order.iter().enumerate() {
        inv[r] = j as u32;
    }
    let inv = Tensor::new(inv.as_slice(), dev)?;
    let cat = |ts: &[Tensor]| -> Result<Tensor> {
        Ok(Tensor::cat(ts, 0)?.contiguous()?.index_select(&inv, 0)?)
    };
    Ok(Clean {
        prefix: KvCache::cat_rows(&caches)?.select_rows(&inv)?,
        resid_tail: cat(&tails)?,
        keys: cat(&keys)?,
        hooked: cat(&hooked)?,
        last: cat(&lasts)?,
    })
}

/// Search the `nq` requests whose rows are `rows` (request q's at q * per_req..).
fn search_chunk(
    model: &Model,
    rows: Vec<Row>,
    nq: usize,
    prefixes: &[String],
    layer: usize,
    at: Where,
    params: &SearchParams,
) -> Result<Vec<Found>> {
    let t0 = std::time::Instant::now();
    let cfg = &model.config;
    let dev = &model.device;
    let per_req = prefixes.len() + 1; // prompt rows, then the KL row
    let n_prompts = prefixes.len();
    let hook = match at {
        Where::MlpOut => HookPoint::MlpOut(layer),
        Where::ResidPost => HookPoint::ResidPost(layer),
    };
    // Where each step starts and adds the delta. MEMIT's delta is added to the residual after
    // layer L, the input of layer L + 1, so steps start there (layer L's output at the tail
    // does not depend on the delta) and add it to the input.
    let (start, hook_at) = match at {
        Where::MlpOut => (layer, Some(hook)),
        Where::ResidPost => (layer + 1, None),
    };

    // Align every lookup at column P (left padding), pad the tails on the right.
    let p_col = rows.iter().map(|r| r.lookup).max().unwrap_or(0);
    let tail = rows
        .iter()
        .map(|r| r.ids.len() - r.lookup)
        .max()
        .unwrap_or(1);
    let width = p_col + tail;
    tracing::debug!(
        "value search chunk: {nq} requests, {} rows, tail {tail} ({} of {} tail tokens are padding)",
        rows.len(),
        rows.len() * tail - rows.iter().map(|r| r.ids.len() - r.lookup).sum::<usize>(),
        rows.len() * tail,
    );
    // The search's key mask: row r's tokens sit in columns P - lookup.. (left padding).
    let mask: Vec<Vec<u8>> = rows.iter().map(|r| r.aligned(p_col, width).1).collect();

    // One clean pass: KV cache, the residual entering L, keys and hooked states at the lookups.
    let clean = clean_pass(model, &rows, p_col, tail, layer, hook)?;
    let kl_rows: Vec<u32> = (0..nq).map(|q| (q * per_req + n_prompts) as u32).collect();
    let kl_rows_t = Tensor::new(kl_rows.as_slice(), dev)?;
    let kl_base_x = clean.last.index_select(&kl_rows_t, 0)?.unsqueeze(1)?; // (nq, 1, d)
    let kl_base =
        candle_nn::ops::log_softmax(&model.head(&kl_base_x, false)?.squeeze(1)?, D::Minus1)?
            .detach(); // (nq, vocab)
    let (keys, hooked) = (&clean.keys, &clean.hooked);
    let mut k_star = Vec::with_capacity(nq);
    let mut k_bare = Vec::with_capacity(nq);
    let mut h_mean = Vec::with_capacity(nq);
    let mut h_bare = Vec::with_capacity(nq);
    for q in 0..nq {
        let r0 = q * per_req;
        k_star.push(keys.narrow(0, r0, n_prompts)?.mean(0)?);
        k_bare.push(keys.i(r0)?);
        h_mean.push(hooked.narrow(0, r0, n_prompts)?.mean(0)?);
        h_bare.push(hooked.i(r0)?);
    }
    let h_norm = norms(&Tensor::stack(&h_bare, 0)?)?; // (nq)

    let wd_scale: Vec<f32> = h_norm
        .iter()
        .map(|h| (params.weight_decay / (h * h)) as f32)
        .collect();
    let resid_tail = clean.resid_tail.detach();
    let prefix_cache = clean.prefix;
    let delta = Var::zeros((nq, cfg.d_model), DType::F32, dev)?;
    let mut opt = AdamW::new(
        vec![delta.clone()],
        ParamsAdamW {
            lr: params.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    let mut traces: Vec<SearchTrace> = (0..nq)
        .map(|_| SearchTrace {
            layer,
            steps: 0,
            target_prob: 0.0,
            nll: 0.0,
            kl: 0.0,
            delta_norm: 0.0,
            n_prompts,
            seconds: 0.0,
        })
        .collect();
    let mut done = vec![false; nq];
    let mut view: Option<Active> = None;
    for step in 0..params.steps {
        // Rows of the requests still searching (rebuilt when one finishes: a finished
        // request's rows cost as much as any other's).
        let active: Vec<usize> = (0..nq).filter(|&q| !done[q]).collect();
        if view.as_ref().map(|v| v.reqs != active).unwrap_or(true) {
            view = Some(Active::new(
                &rows,
                &active,
                per_req,
                n_prompts,
                tail,
                &resid_tail,
                &prefix_cache,
                &mask,
                &kl_base,
                &wd_scale,
                cfg.d_model,
                dev,
            )?);
        }
        let v = view
            .as_ref()
            .ok_or_else(|| Error::invalid("value search", "no rows"))?;
        // Each row gets its request's delta at its lookup (tail column 0).
        let x = v.prompts.forward(model, start, hook_at, &delta)?; // (rows, tail, d)
        let n_rows = v.rows.len();
        let flat = x.reshape((n_rows * tail, cfg.d_model))?;
        let flat = match &v.kl {
            Some(kl) => {
                let kl_x = kl.forward(model, start, hook_at, &delta)?; // (run KL rows, 1, d)
                Tensor::cat(&[&flat, &kl_x.squeeze(1)?], 0)?
            }
            None => flat,
        };
        // One head call for the loss positions and the KL positions: each call reads the
        // head's whole [vocab, d_model] matrix, forward and backward.
        let both = flat.index_select(&v.gather, 0)?.unsqueeze(0)?; // (1, positions, d)
        let (n_pos, na) = (v.n_loss, active.len());
        let lp_all = candle_nn::ops::log_softmax(&model.head(&both, true)?.squeeze(0)?, D::Minus1)?;
        let lp = lp_all.narrow(0, 0, n_pos)?;
        let tok_lp = lp.gather(&v.target_t, 1)?.squeeze(1)?; // (positions)
        let nll_terms = (tok_lp.mul(&v.weights)? * -1.0)?;
        // KL(new || old), as the reference's kl_div(init, new, log_target=True).
        let kl_lp = lp_all.narrow(0, n_pos, na)?; // (na, vocab)
        let kl = kl_lp.exp()?.mul(&(kl_lp.clone() - &v.kl_base)?)?.sum(1)?; // (na)

        // sqrt has an infinite derivative at 0 (the first step); the epsilon keeps the
        // gradient finite where torch.norm uses the subgradient 0.
        let d_act = delta.as_tensor().index_select(&v.req_ids, 0)?;
        let dnorm = (d_act.sqr()?.sum(1)? + 1e-12)?.sqrt()?; // (na)
        let loss = ((nll_terms.sum_all()? + (kl.sum_all()? * params.kl_factor)?)?
            + dnorm.mul(&v.wd_scale)?.sum_all()?)?;

        // Per-request numbers: NLL and mean target probability over its prompts.
        let lps = tok_lp.to_vec1::<f32>()?;
        let nlls = nll_terms.to_vec1::<f32>()?;
        let kls = kl.to_vec1::<f32>()?;
        let mut sum = vec![0f64; n_rows];
        let mut cnt = vec![0usize; n_rows];
        let mut nll_q = vec![0f64; nq];
        for ((&lp, &nl), &r) in lps.iter().zip(&nlls).zip(&v.row_of) {
            sum[r] += lp as f64;
            cnt[r] += 1;
            nll_q[rows[v.rows[r]].req] += nl as f64;
        }
        let mut prob_q = vec![0f64; nq];
        for r in (0..n_rows).filter(|&r| cnt[r] > 0) {
            prob_q[rows[v.rows[r]].req] += (sum[r] / cnt[r] as f64).exp() / n_prompts as f64;
        }
        for (a, &q) in active.iter().enumerate() {
            let t = &mut traces[q];
            t.seconds = t0.elapsed().as_secs_f64();
            t.steps = step + 1;
            t.nll = nll_q[q];
            t.kl = kls[a] as f64;
            t.target_prob = prob_q[q];
            done[q] = prob_q[q] >= params.stop_prob;
        }
        if done.iter().all(|&d| d) {
            break;
        }
        // A copy: `detach` would share the storage that `backward_step` overwrites.
        let before = delta.as_tensor().copy()?;
        opt.backward_step(&loss)?;
        // Finished requests keep their vector (Adam's momentum would still move them); clamp
        // |delta| <= clamp * |h| per request (reference: projection after each step).
        let keep: Vec<f32> = done.iter().map(|&d| d as u8 as f32).collect();
        let keep = Tensor::new(keep.as_slice(), dev)?.unsqueeze(1)?;
        let cur = delta.as_tensor();
        let cur = (before.broadcast_mul(&keep)? + cur.broadcast_mul(&(1.0 - &keep)?)?)?;
        let scale: Vec<f32> = norms(&cur)?
            .iter()
            .zip(&h_norm)
            .map(|(&d, &h)| {
                let max = params.clamp_norm_factor * h;
                if d > max {
                    (max / d) as f32
                } else {
                    1.0
                }
            })
            .collect();
        let scale = Tensor::new(scale.as_slice(), dev)?.unsqueeze(1)?;
        delta.set(&cur.broadcast_mul(&scale)?)?;
    }
    let final_norms = norms(delta.as_tensor())?;
    let mut out = Vec::with_capacity(nq);
    for (q, mut t) in traces.into_iter().enumerate() {
        t.delta_norm = final_norms[q];
        out.push(Found {
            k_star: k_star[q].clone(),
            k_bare: k_bare[q].clone(),
            h_mean: h_mean[q].clone(),
            h_bare: h_bare[q].clone(),
            delta: delta.as_tensor().i(q)?.detach(),
            trace: t,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading a shared KL prompt's output from its bare prompt row gives what running the
    /// KL row gives: the same vectors and KL values, search for search (smollm2-135m).
    #[test]
    fn shared_kl_rows_match_running_them() {
        let a = crate::model::fetch::alias(crate::model::fetch::DEFAULT_MODEL).expect("alias");
        if !crate::model::fetch::cached_path(a).exists() {
            // Library unit tests run without the real model; CI fetches it first.
            eprintln!("skipped: smollm2-135m is not fetched (engram model fetch smollm2-135m)");
            return;
        }
        let m = crate::model::load(None, &candle_core::Device::Cpu).expect("smollm2-135m");
        let reqs = [
            SearchRequest {
                prompt: "Danielle Darrieux's mother tongue is",
                subject: "Danielle Darrieux",
                target: " English",
            },
            SearchRequest {
                prompt: "The mother tongue of Danielle Darrieux is",
                subject: "Danielle Darrieux",
                target: " English",
            },
            SearchRequest {
                prompt: "Toko Yasuda plays the",
                subject: "Toko Yasuda",
                target: " piano",
            },
        ];
        let prefixes = vec![String::new(), "Hello there. ".to_string()];
        let params = SearchParams {
            steps: 4,
            lr: 2.0,
            weight_decay: 0.5,
            clamp_norm_factor: 0.75,
            kl_factor: 0.0625,
            stop_prob: 0.99,
        };
        let rows = build_rows(&m, &reqs, &prefixes).unwrap();
        let shared: Vec<bool> = rows.iter().filter(|r| r.kl).map(|r| r.shared).collect();
        assert_eq!(shared, [true, false, true]);
        let unshared: Vec<Row> = rows
            .iter()
            .map(|r| Row {
                shared: false,
                ..r.clone()
            })
            .collect();
        let run = |rows: Vec<Row>| {
            search_chunk(&m, rows, 3, &prefixes, 6, Where::ResidPost, &params).unwrap()
        };
        let (a, b) = (run(rows), run(unshared));
        for (q, (a, b)) in a.iter().zip(&b).enumerate() {
            assert!(a.trace.kl > 0.0, "request {q}: KL {}", a.trace.kl);
            let dk = (a.trace.kl - b.trace.kl).abs();
            let dd = (&a.delta - &b.delta)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                dk < 1e-4 * b.trace.kl.max(1e-3) && dd < 1e-3,
                "request {q}: KL {} vs {}, delta differs by {dd}",
                a.trace.kl,
                b.trace.kl
            );
        }
    }
}
