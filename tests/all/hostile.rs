//! Hostile inputs through the CLI (issue 22): every class gets exit 2, a message naming the
//! file and the field, key, tensor or flag, nothing written, and the input unchanged.

use crate::cli_errors::engram;
use crate::common::fixture;
use std::path::{Path, PathBuf};

/// A GGUF file assembled byte by byte, so that tests can break any part of it.
#[derive(Clone)]
pub struct Gguf {
    /// key, value type, value bytes.
    pub kvs: Vec<(String, u32, Vec<u8>)>,
    /// name, ggml-order dims, ggml type, data.
    pub tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    /// Offsets to write instead of the computed ones (by tensor index).
    pub offsets: Vec<Option<u64>>,
    pub alignment: u64,
}

pub fn gguf_string(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(s.as_bytes());
    b
}

impl Gguf {
    /// tiny-llama as an f32 GGUF (no tokenizer; the Q/K row order does not matter here).
    pub fn tiny() -> Gguf {
        let st = fixture("tiny-llama").join("model.safetensors");
        let t = candle_core::safetensors::load(&st, &candle_core::Device::Cpu).unwrap();
        let u32kv = |k: &str, v: u32| (k.to_string(), 4u32, v.to_le_bytes().to_vec());
        let kvs = vec![
            ("general.architecture".to_string(), 8u32, gguf_string("llama")),
            u32kv("llama.block_count", 2),
            u32kv("llama.embedding_length", 32),
            u32kv("llama.feed_forward_length", 64),
            u32kv("llama.attention.head_count", 4),
            u32kv("llama.attention.head_count_kv", 2),
            u32kv("llama.rope.dimension_count", 8),
            u32kv("llama.context_length", 64),
        ];
        let mut names: Vec<&String> = t.keys().collect();
        names.sort();
        let mut tensors = Vec::new();
        for n in names {
            let g = hf_to_gguf(n);
            let x = &t[n];
            let mut dims: Vec<u64> = x.dims().iter().map(|&d| d as u64).collect();
            dims.reverse();
            let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let data = v.iter().flat_map(|f| f.to_le_bytes()).collect();
            tensors.push((g, dims, 0u32, data));
        }
        let offsets = vec![None; tensors.len()];
        Gguf {
            kvs,
            tensors,
            offsets,
            alignment: 32,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.kvs {
            b.extend_from_slice(&gguf_string(k));
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(v);
        }
        let a = self.alignment.max(1);
        let mut off = 0u64;
        let mut offs = Vec::new();
        for (i, (n, dims, ty, data)) in self.tensors.iter().enumerate() {
            b.extend_from_slice(&gguf_string(n));
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&ty.to_le_bytes());
            let o = self.offsets.get(i).copied().flatten().unwrap_or(off);
            b.extend_from_slice(&o.to_le_bytes());
            offs.push(off);
            off = (off + data.len() as u64).div_ceil(a) * a;
        }
        while b.len() as u64 % a != 0 {
            b.push(0);
        }
        let start = b.len();
        for ((_, _, _, data), o) in self.tensors.iter().zip(offs) {
            b.resize(start + o as usize, 0);
            b.extend_from_slice(data);
        }
        b
    }

    pub fn set_kv(&mut self, key: &str, ty: u32, v: Vec<u8>) {
        match self.kvs.iter_mut().find(|(k, _, _)| k == key) {
            Some(kv) => {
                kv.1 = ty;
                kv.2 = v;
            }
            None => self.kvs.push((key.to_string(), ty, v)),
        }
    }

    pub fn tensor_mut(&mut self, name: &str) -> &mut (String, Vec<u64>, u32, Vec<u8>) {
        self.tensors.iter_mut().find(|t| t.0 == name).unwrap()
    }

    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.bytes()).unwrap();
        p
    }
}

fn hf_to_gguf(n: &str) -> String {
    match n {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = n.strip_prefix("model.layers.").unwrap();
    let (l, rest) = rest.split_once('.').unwrap();
    let (part, kind) = rest.rsplit_once('.').unwrap();
    let g = match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("{other}"),
    };
    format!("blk.{l}.{g}.{kind}")
}

/// `engram inspect` on `p`: exit 2 and every string of `want` in the message.
fn refused(p: &Path, want: &[&str]) {
    let before = snapshot(p);
    let (code, err) = engram(&["inspect", "--model", p.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    for w in want {
        assert!(err.contains(w), "`{w}` not in: {err}");
    }
    assert_eq!(snapshot(p), before, "input changed");
}

/// Every file under `p` (or `p` itself) with its bytes, to show nothing changed or appeared.
pub fn snapshot(p: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    if p.is_file() {
        return vec![(p.to_path_buf(), std::fs::read(p).unwrap())];
    }
    let mut v: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        v.extend(snapshot(&e.unwrap().path()));
    }
    v.sort();
    v
}

#[test]
fn tiny_gguf_loads() {
    let d = tempfile::tempdir().unwrap();
    let p = Gguf::tiny().write(d.path(), "ok.gguf");
    let (code, err) = engram(&["inspect", "--model", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn gguf_alignment_zero_or_not_a_power_of_two() {
    let d = tempfile::tempdir().unwrap();
    for a in [0u32, 48] {
        let mut g = Gguf::tiny();
        g.set_kv("general.alignment", 4, a.to_le_bytes().to_vec());
        let p = g.write(d.path(), &format!("a{a}.gguf"));
        refused(&p, &[&format!("a{a}.gguf"), "general.alignment", "power of two"]);
    }
}

#[test]
fn gguf_duplicate_key_and_tensor() {
    let d = tempfile::tempdir().unwrap();
    let mut g = Gguf::tiny();
    g.kvs
        .push(("llama.block_count".into(), 4, 1u32.to_le_bytes().to_vec()));
    let p = g.write(d.path(), "dupkey.gguf");
    refused(&p, &["dupkey.gguf", "llama.block_count", "twice"]);
    let mut g = Gguf::tiny();
    let t = g.tensors[0].clone();
    g.tensors.push(t);
    g.offsets.push(None);
    let p = g.write(d.path(), "duptensor.gguf");
    refused(&p, &["duptensor.gguf", "twice"]);
}

#[test]
fn gguf_dims_that_overflow_or_lie() {
    let d = tempfile::tempdir().unwrap();
    // [2^58 + 32, 32]: the product wraps to 32 * 32 in 64 bits.
    let mut g = Gguf::tiny();
    g.tensor_mut("blk.0.attn_k.weight").1 = vec![32, (1u64 << 58) + 16];
    let p = g.write(d.path(), "wrap.gguf");
    refused(&p, &["wrap.gguf", "blk.0.attn_k.weight", "overflow"]);
    // A 0-dim token embedding and no vocab_size.
    let mut g = Gguf::tiny();
    g.tensor_mut("token_embd.weight").1 = vec![];
    let p = g.write(d.path(), "rank0.gguf");
    refused(&p, &["rank0.gguf", "token_embd.weight", "rank 0"]);
    // head_count that does not fit the Q projection's rows.
    let mut g = Gguf::tiny();
    g.set_kv("llama.attention.head_count", 4, 2u32.to_le_bytes().to_vec());
    let p = g.write(d.path(), "heads.gguf");
    refused(&p, &["heads.gguf", "q_proj", "expected"]);
    // A Q projection of the wrong shape.
    let mut g = Gguf::tiny();
    let t = g.tensor_mut("blk.1.attn_q.weight");
    t.1 = vec![32, 16];
    t.3.truncate(32 * 16 * 4);
    let p = g.write(d.path(), "qshape.gguf");
    refused(&p, &["qshape.gguf", "q_proj", "[16, 32]"]);
}

#[test]
fn gguf_absurd_block_count() {
    let d = tempfile::tempdir().unwrap();
    let mut g = Gguf::tiny();
    g.set_kv("llama.block_count", 4, u32::MAX.to_le_bytes().to_vec());
    let p = g.write(d.path(), "blocks.gguf");
    refused(&p, &["blocks.gguf", "llama.block_count", "4294967295"]);
    let mut g = Gguf::tiny();
    g.set_kv("llama.block_count", 4, 3u32.to_le_bytes().to_vec());
    let p = g.write(d.path(), "blocks3.gguf");
    refused(&p, &["blocks3.gguf", "llama.block_count"]);
}

#[test]
fn gguf_misaligned_or_outside_offsets() {
    let d = tempfile::tempdir().unwrap();
    let mut g = Gguf::tiny();
    g.offsets[1] = Some(4);
    let p = g.write(d.path(), "misaligned.gguf");
    refused(&p, &["misaligned.gguf", "not a multiple of the alignment"]);
    let mut g = Gguf::tiny();
    g.offsets[1] = Some(1 << 40);
    let p = g.write(d.path(), "outside.gguf");
    refused(&p, &["outside.gguf", "past the end"]);
}

#[test]
fn non_finite_weights_are_refused_naming_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    let mut g = Gguf::tiny();
    let t = g.tensor_mut("blk.1.ffn_up.weight");
    t.3[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    let p = g.write(d.path(), "nan.gguf");
    refused(&p, &["nan.gguf", "blk.1.ffn_up.weight", "NaN or Inf"]);
    // safetensors: an Inf in the fixture's data.
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny-llama");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut t =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let w = t["model.norm.weight"].to_vec1::<f32>().unwrap();
    let mut w2 = w.clone();
    w2[3] = f32::INFINITY;
    t.insert(
        "model.norm.weight".into(),
        candle_core::Tensor::new(w2, &candle_core::Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
    refused(dir.path(), &["model.safetensors", "model.norm.weight", "NaN or Inf"]);
}

#[test]
fn safetensors_integer_matrix_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny-llama");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut t =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let up = t["model.layers.0.mlp.up_proj.weight"].clone();
    t.insert(
        "model.layers.0.mlp.up_proj.weight".into(),
        up.to_dtype(candle_core::DType::I64).unwrap(),
    );
    candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
    refused(dir.path(), &["up_proj", "dtype", "allowed"]);
}

#[test]
fn gpt2_conv1d_of_rank_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny-gpt2");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut t =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let key = t
        .keys()
        .find(|k| k.ends_with("h.0.mlp.c_fc.weight"))
        .unwrap()
        .clone();
    let flat = t[&key].flatten_all().unwrap();
    t.insert(key, flat);
    candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
    refused(dir.path(), &["c_fc.weight", "shape"]);
}

#[test]
fn absurd_config_sizes_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny-llama");
    let cfg = std::fs::read_to_string(src.join("config.json"))
        .unwrap()
        .replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1000000000000");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    refused(dir.path(), &["config.json", "num_hidden_layers", "1000000000000"]);
}
