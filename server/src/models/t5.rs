//! T5 encoder (transformers `T5EncoderModel`), FLUX's `text_encoder_2`: pre-RMSNorm transformer
//! with a learned relative position bias (computed once, from block 0's table, and shared by all
//! blocks) and unscaled attention. FLUX passes no attention mask, so padding is attended to.
use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::error::{ModelError, Result};
use super::weights::{read_json, Weights};

/// Model classes whose checkpoints hold the encoder as `shared.weight` + `encoder.*`.
const ENCODER_CLASSES: [&str; 3] = ["T5EncoderModel", "T5ForConditionalGeneration", "T5Model"];

/// The `config.json` keys the encoder needs; defaults are transformers' `T5Config`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct T5Config {
    architectures: Option<Vec<String>>,
    vocab_size: i64,
    d_model: i64,
    d_kv: i64,
    d_ff: i64,
    num_layers: i64,
    num_heads: i64,
    relative_attention_num_buckets: i64,
    relative_attention_max_distance: i64,
    layer_norm_epsilon: f64,
    feed_forward_proj: String,
}

impl Default for T5Config {
    fn default() -> Self {
        Self {
            architectures: None,
            vocab_size: 32128,
            d_model: 512,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 6,
            num_heads: 8,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "relu".into(),
        }
    }
}

impl T5Config {
    fn validate(&self, path: &Path) -> Result<()> {
        if let Some(classes) = &self.architectures {
            if !classes
                .iter()
                .any(|c| ENCODER_CLASSES.contains(&c.as_str()))
            {
                return Err(ModelError::UnknownClass {
                    path: path.to_path_buf(),
                    class: classes.join(", "),
                    expected: ENCODER_CLASSES.join(" or "),
                });
            }
        }
        for (key, value) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            (
                "relative_attention_max_distance",
                self.relative_attention_max_distance,
            ),
        ] {
            if value <= 0 {
                return Err(ModelError::config(
                    path,
                    key,
                    format!("must be positive, got {value}"),
                ));
            }
        }
        // Bidirectional bucketing halves the buckets, then spends half of those on exact offsets;
        // fewer than 4 leaves no exact bucket and the log formula divides by zero.
        if self.relative_attention_num_buckets < 4 {
            return Err(ModelError::config(
                path,
                "relative_attention_num_buckets",
                format!(
                    "must be at least 4, got {}",
                    self.relative_attention_num_buckets
                ),
            ));
        }
        if self.layer_norm_epsilon.is_nan() || self.layer_norm_epsilon <= 0.0 {
            return Err(ModelError::config(
                path,
                "layer_norm_epsilon",
                "must be positive",
            ));
        }
        Ok(())
    }
}

/// Feed-forward activation, from `feed_forward_proj` as transformers reads it: `"gated-<act>"` or
/// `"<act>"`, where `gated-gelu` means the tanh approximation (`gelu_new`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Activation {
    Relu,
    Gelu,
    GeluTanh,
    Silu,
}

impl Activation {
    /// (activation, gated).
    fn parse(feed_forward_proj: &str, path: &Path) -> Result<(Self, bool)> {
        let (gated, act) = match feed_forward_proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, feed_forward_proj),
            // transformers accepts only `gated-` as a prefix.
            Some(_) => (false, ""),
        };
        let act = match (act, gated) {
            ("gelu", true) | ("gelu_new", _) | ("gelu_pytorch_tanh", _) => Self::GeluTanh,
            ("gelu", false) => Self::Gelu,
            ("relu", _) => Self::Relu,
            ("silu", _) | ("swish", _) => Self::Silu,
            _ => {
                return Err(ModelError::config(
                    path,
                    "feed_forward_proj",
                    format!("unsupported `{feed_forward_proj}` (relu, gelu, silu, gated-gelu, gated-silu, ...)"),
                ))
            }
        };
        Ok((act, gated))
    }

    fn forward(self, xs: &Tensor) -> Tensor {
        match self {
            Self::Relu => xs.relu(),
            Self::Gelu => xs.gelu("none"),
            Self::GeluTanh => xs.gelu("tanh"),
            Self::Silu => xs.silu(),
        }
    }
}

/// T5's RMS norm: no mean subtraction, no bias; the variance is taken in f32 and the result cast
/// back to the weight's dtype when that is a half type.
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn load(w: &Weights, name: &str, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{name}.weight"), &[dim])?,
            eps,
        })
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let variance = xs
            .to_kind(Kind::Float)
            .pow_tensor_scalar(2)
            .mean_dim(-1, true, None);
        let mut normed = xs * (variance + self.eps).rsqrt();
        if matches!(self.weight.kind(), Kind::Half | Kind::BFloat16) {
            normed = normed.to_kind(self.weight.kind());
        }
        &self.weight * normed
    }
}

/// Multi-head self-attention without the `1/sqrt(d)` scaling; `position_bias` is added to the
/// scores.
struct T5Attention {
    q: Tensor, // [heads * d_kv, d_model]
    k: Tensor,
    v: Tensor,
    o: Tensor, // [d_model, heads * d_kv]
    heads: i64,
    d_kv: i64,
}

impl T5Attention {
    fn forward(&self, xs: &Tensor, position_bias: &Tensor) -> Tensor {
        let (b, l, _) = xs.size3().expect("T5 attention input must be [B, L, D]");
        // [B, L, heads * d_kv] -> [B, heads, L, d_kv]
        let split = |w: &Tensor| {
            xs.linear(w, None::<Tensor>)
                .view([b, l, self.heads, self.d_kv])
                .transpose(1, 2)
        };
        let (q, k, v) = (split(&self.q), split(&self.k), split(&self.v));
        let attn = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(position_bias),
            0.0,
            false,
            1.0,
            false,
        );
        attn.transpose(1, 2)
            .reshape([b, l, self.heads * self.d_kv])
            .linear(&self.o, None::<Tensor>)
    }
}

/// `wo(act(wi(x)))`, or gated `wo(act(wi_0(x)) * wi_1(x))`.
struct T5FeedForward {
    /// `[wi]` or `[wi_0, wi_1]`, each [d_ff, d_model].
    wi: Vec<Tensor>,
    /// [d_model, d_ff]; f32 when running in f16, as transformers keeps `wo` (`_keep_in_fp32_modules`).
    wo: Tensor,
    act: Activation,
}

impl T5FeedForward {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let activated = self.act.forward(&xs.linear(&self.wi[0], None::<Tensor>));
        let hidden = match self.wi.get(1) {
            Some(wi_1) => activated * xs.linear(wi_1, None::<Tensor>),
            None => activated,
        };
        hidden
            .to_kind(self.wo.kind())
            .linear(&self.wo, None::<Tensor>)
    }
}

struct T5Block {
    attention_norm: T5LayerNorm,
    attention: T5Attention,
    ff_norm: T5LayerNorm,
    ff: T5FeedForward,
}

impl T5Block {
    fn forward(&self, xs: &Tensor, position_bias: &Tensor) -> Tensor {
        let xs = clamp_f16(
            xs + self
                .attention
                .forward(&self.attention_norm.forward(xs), position_bias),
        );
        clamp_f16(&xs + self.ff.forward(&self.ff_norm.forward(&xs)))
    }
}

/// transformers keeps f16 activations finite: clamp to the f16 range (1000 below it if anything
/// already overflowed). Other dtypes pass through.
fn clamp_f16(xs: Tensor) -> Tensor {
    if xs.kind() != Kind::Half {
        return xs;
    }
    let max = f64::from(half::f16::MAX);
    let limit = if xs.isinf().any().int64_value(&[]) != 0 {
        max - 1000.0
    } else {
        max
    };
    xs.clamp(-limit, limit)
}

/// T5 encoder stack: shared embedding, blocks, final RMS norm.
pub struct T5EncoderModel {
    embed_tokens: Tensor,            // [vocab, d_model]
    relative_attention_bias: Tensor, // [num_buckets, heads], block 0's table
    num_buckets: i64,
    max_distance: i64,
    blocks: Vec<T5Block>,
    final_layer_norm: T5LayerNorm,
}

impl T5EncoderModel {
    /// Loads `dir/config.json` and the (possibly sharded) safetensors in `dir`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config_path = dir.join("config.json");
        let cfg: T5Config = read_json(&config_path)?;
        cfg.validate(&config_path)?;
        let (act, gated) = Activation::parse(&cfg.feed_forward_proj, &config_path)?;
        let w = Weights::from_dir(dir, device, kind)?;
        let (d, inner, eps) = (
            cfg.d_model,
            cfg.num_heads * cfg.d_kv,
            cfg.layer_norm_epsilon,
        );
        let wo_kind = if kind == Kind::Half {
            Kind::Float
        } else {
            kind
        };

        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let p = format!("encoder.block.{i}.layer");
                let attn = |name: &str, shape: &[i64]| {
                    w.get(&format!("{p}.0.SelfAttention.{name}.weight"), shape)
                };
                let wi_names: &[&str] = if gated { &["wi_0", "wi_1"] } else { &["wi"] };
                let wi = wi_names
                    .iter()
                    .map(|name| {
                        w.get(
                            &format!("{p}.1.DenseReluDense.{name}.weight"),
                            &[cfg.d_ff, d],
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(T5Block {
                    attention_norm: T5LayerNorm::load(&w, &format!("{p}.0.layer_norm"), d, eps)?,
                    attention: T5Attention {
                        q: attn("q", &[inner, d])?,
                        k: attn("k", &[inner, d])?,
                        v: attn("v", &[inner, d])?,
                        o: attn("o", &[d, inner])?,
                        heads: cfg.num_heads,
                        d_kv: cfg.d_kv,
                    },
                    ff_norm: T5LayerNorm::load(&w, &format!("{p}.1.layer_norm"), d, eps)?,
                    ff: T5FeedForward {
                        wi,
                        wo: w.get_as(
                            &format!("{p}.1.DenseReluDense.wo.weight"),
                            &[d, cfg.d_ff],
                            wo_kind,
                        )?,
                        act,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;

        // The embedding is tied: checkpoints store `shared.weight`, `encoder.embed_tokens.weight`
        // or both.
        let embed_name = ["shared.weight", "encoder.embed_tokens.weight"]
            .into_iter()
            .find(|n| w.contains(n))
            .unwrap_or("shared.weight");
        Ok(Self {
            embed_tokens: w.get(embed_name, &[cfg.vocab_size, d])?,
            relative_attention_bias: w.get(
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                &[cfg.relative_attention_num_buckets, cfg.num_heads],
            )?,
            num_buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
            blocks,
            final_layer_norm: T5LayerNorm::load(&w, "encoder.final_layer_norm", d, eps)?,
        })
    }

    /// `input_ids` [B, L] int64 -> last hidden state [B, L, d_model].
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        let (_, l) = input_ids.size2().expect("T5 input_ids must be [B, L]");
        let mut xs = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false);
        let position_bias = self.position_bias(l, input_ids.device());
        for block in &self.blocks {
            xs = block.forward(&xs, &position_bias);
        }
        self.final_layer_norm.forward(&xs)
    }

    /// [1, heads, L, L]: the learned bias for each (query, key) relative-position bucket.
    fn position_bias(&self, len: i64, device: Device) -> Tensor {
        let positions = Tensor::arange(len, (Kind::Int64, device));
        // memory_position - query_position: [L, L]
        let relative = positions.unsqueeze(0) - positions.unsqueeze(1);
        let buckets = relative_position_bucket(&relative, self.num_buckets, self.max_distance);
        Tensor::embedding(&self.relative_attention_bias, &buckets, -1, false, false)
            .permute([2, 0, 1])
            .unsqueeze(0)
    }
}

/// Bidirectional T5 bucketing of `key - query` offsets (int64 tensor, any shape): half of the
/// buckets per direction; in each, offsets below `num_buckets / 4` get their own bucket, larger
/// ones share log-spaced buckets up to `max_distance`, beyond which all share the last one.
/// Computed exactly as transformers does (f32 log, truncation toward zero).
fn relative_position_bucket(relative: &Tensor, num_buckets: i64, max_distance: i64) -> Tensor {
    let num_buckets = num_buckets / 2;
    let direction = relative.gt(0).to_kind(Kind::Int64) * num_buckets;
    let distance = relative.abs();
    let max_exact = num_buckets / 2;
    let is_small = distance.lt(max_exact);
    let log_ratio = (distance.to_kind(Kind::Float) / max_exact as f64).log()
        / (max_distance as f64 / max_exact as f64).ln()
        * (num_buckets - max_exact) as f64;
    let if_large = (log_ratio.to_kind(Kind::Int64) + max_exact).clamp_max(num_buckets - 1);
    direction + distance.where_self(&is_small, &if_large)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_position_buckets_match_transformers() {
        let offsets = [
            -200i64, -128, -127, -50, -9, -8, -7, -1, 0, 1, 7, 8, 9, 50, 127, 128, 200,
        ];
        let relative = Tensor::from_slice(&offsets);
        // transformers `T5Attention._relative_position_bucket(x, True, 32, 128)` for the offsets above.
        let expected_32_128 = [
            15i64, 15, 15, 13, 8, 8, 7, 1, 0, 17, 23, 24, 24, 29, 31, 31, 31,
        ];
        // ... and `(x, True, 8, 20)`.
        let expected_8_20 = [3i64, 3, 3, 3, 3, 3, 3, 1, 0, 5, 7, 7, 7, 7, 7, 7, 7];
        let got = |buckets, max| {
            Vec::<i64>::try_from(relative_position_bucket(&relative, buckets, max)).unwrap()
        };
        assert_eq!(got(32, 128), expected_32_128);
        assert_eq!(got(8, 20), expected_8_20);
    }

    #[test]
    fn feed_forward_proj_is_parsed_like_transformers() {
        let path = Path::new("config.json");
        let parse = |s| Activation::parse(s, path).unwrap();
        assert_eq!(parse("gated-gelu"), (Activation::GeluTanh, true));
        assert_eq!(parse("relu"), (Activation::Relu, false));
        assert_eq!(parse("gelu"), (Activation::Gelu, false));
        assert_eq!(parse("gated-silu"), (Activation::Silu, true));
        let err = Activation::parse("gated-tanh", path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`feed_forward_proj`"), "{err}");
    }

    #[test]
    fn config_errors_name_the_key() {
        let path = Path::new("text_encoder_2/config.json");
        let cfg: T5Config = serde_json::from_str(r#"{"num_heads": 0}"#).unwrap();
        let err = cfg.validate(path).unwrap_err().to_string();
        assert!(
            err.contains("text_encoder_2/config.json") && err.contains("`num_heads`"),
            "{err}"
        );
        let cfg: T5Config =
            serde_json::from_str(r#"{"relative_attention_num_buckets": 2}"#).unwrap();
        let err = cfg.validate(path).unwrap_err().to_string();
        assert!(err.contains("`relative_attention_num_buckets`"), "{err}");
        let cfg: T5Config = serde_json::from_str(r#"{"architectures": ["BertModel"]}"#).unwrap();
        assert!(cfg
            .validate(path)
            .unwrap_err()
            .to_string()
            .contains("BertModel"));
    }
}
