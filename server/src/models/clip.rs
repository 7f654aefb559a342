//! CLIP text encoder (transformers `CLIPTextModel`), FLUX's `text_encoder`: pre-LayerNorm
//! transformer with a causal mask; FLUX uses its pooled output (the hidden state at the eos token).
use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::error::{ModelError, Result};
use super::nn::{LayerNorm, Linear};
use super::weights::{read_json, Weights};

/// Model classes whose `config.json` describes a CLIP text tower with `text_model.*` weights.
const TEXT_MODEL_CLASSES: [&str; 2] = ["CLIPTextModel", "CLIPTextModelWithProjection"];

/// The `config.json` keys the text model needs; defaults are transformers' `CLIPTextConfig`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct ClipTextConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    max_position_embeddings: i64,
    hidden_act: String,
    layer_norm_eps: f64,
    eos_token_id: i64,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            architectures: None,
            model_type: None,
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }
}

impl ClipTextConfig {
    fn validate(&self, path: &Path) -> Result<()> {
        match &self.architectures {
            Some(classes)
                if !classes
                    .iter()
                    .any(|c| TEXT_MODEL_CLASSES.contains(&c.as_str())) =>
            {
                return Err(ModelError::UnknownClass {
                    path: path.to_path_buf(),
                    class: classes.join(", "),
                    expected: TEXT_MODEL_CLASSES.join(" or "),
                })
            }
            // Without `architectures`, at least the model type must be a text tower (not a full
            // CLIPModel config, whose sizes sit under `text_config`).
            None if self.model_type.as_deref() != Some("clip_text_model") => {
                return Err(ModelError::config(
                    path,
                    "architectures",
                    "missing, and `model_type` is not `clip_text_model`",
                ))
            }
            _ => {}
        }
        for (key, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value <= 0 {
                return Err(ModelError::config(
                    path,
                    key,
                    format!("must be positive, got {value}"),
                ));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(ModelError::config(
                path,
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err(ModelError::config(
                path,
                "layer_norm_eps",
                "must be positive",
            ));
        }
        Ok(())
    }
}

/// The MLP activations CLIP checkpoints use (`hidden_act`).
#[derive(Debug, Clone, Copy)]
enum Activation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// Exact erf GELU.
    Gelu,
    /// Tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    fn parse(name: &str, path: &Path) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            other => Err(ModelError::config(
                path,
                "hidden_act",
                format!("unsupported activation `{other}` (quick_gelu, gelu, gelu_new, gelu_pytorch_tanh)"),
            )),
        }
    }

    fn forward(self, xs: &Tensor) -> Tensor {
        match self {
            Self::QuickGelu => xs * (xs * 1.702).sigmoid(),
            Self::Gelu => xs.gelu("none"),
            Self::GeluTanh => xs.gelu("tanh"),
        }
    }
}

/// Causal multi-head self-attention, scale `head_dim^-0.5`.
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: i64,
}

impl ClipAttention {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let (b, l, d) = xs.size3().expect("CLIP attention input must be [B, L, D]");
        // [B, L, D] -> [B, heads, L, head_dim]
        let split = |t: Tensor| t.view([b, l, self.heads, d / self.heads]).transpose(1, 2);
        let q = split(self.q_proj.forward(xs));
        let k = split(self.k_proj.forward(xs));
        let v = split(self.v_proj.forward(xs));
        let attn = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            true,
            None,
            false,
        );
        self.out_proj
            .forward(&attn.transpose(1, 2).reshape([b, l, d]))
    }
}

/// `x + attn(ln1(x))`, then `x + fc2(act(fc1(ln2(x))))`.
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl ClipEncoderLayer {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let xs = xs + self.self_attn.forward(&self.layer_norm1.forward(xs));
        let mlp = self.fc2.forward(
            &self
                .act
                .forward(&self.fc1.forward(&self.layer_norm2.forward(&xs))),
        );
        xs + mlp
    }
}

/// CLIP text transformer: token + position embeddings, causal encoder layers, final LayerNorm.
pub struct ClipTextModel {
    token_embedding: Tensor,    // [vocab, D]
    position_embedding: Tensor, // [max_positions, D]
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    eos_token_id: i64,
}

impl ClipTextModel {
    /// Loads `dir/config.json` and the safetensors in `dir` (weights named `text_model.*` as in
    /// diffusers checkpoints, or without that prefix as transformers 5 saves a `CLIPTextModel`).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config_path = dir.join("config.json");
        let cfg: ClipTextConfig = read_json(&config_path)?;
        cfg.validate(&config_path)?;
        let act = Activation::parse(&cfg.hidden_act, &config_path)?;
        let w = Weights::from_dir(dir, device, kind)?;
        let prefix = if w.contains("text_model.embeddings.token_embedding.weight") {
            "text_model."
        } else {
            ""
        };
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("{prefix}encoder.layers.{i}");
                let linear = |name: &str| Linear::load(&w, &format!("{p}.self_attn.{name}"), d, d);
                Ok(ClipEncoderLayer {
                    layer_norm1: LayerNorm::load(&w, &format!("{p}.layer_norm1"), d, eps)?,
                    self_attn: ClipAttention {
                        q_proj: linear("q_proj")?,
                        k_proj: linear("k_proj")?,
                        v_proj: linear("v_proj")?,
                        out_proj: linear("out_proj")?,
                        heads: cfg.num_attention_heads,
                    },
                    layer_norm2: LayerNorm::load(&w, &format!("{p}.layer_norm2"), d, eps)?,
                    fc1: Linear::load(&w, &format!("{p}.mlp.fc1"), d, cfg.intermediate_size)?,
                    fc2: Linear::load(&w, &format!("{p}.mlp.fc2"), cfg.intermediate_size, d)?,
                    act,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: w.get(
                &format!("{prefix}embeddings.token_embedding.weight"),
                &[cfg.vocab_size, d],
            )?,
            position_embedding: w.get(
                &format!("{prefix}embeddings.position_embedding.weight"),
                &[cfg.max_position_embeddings, d],
            )?,
            layers,
            final_layer_norm: LayerNorm::load(&w, &format!("{prefix}final_layer_norm"), d, eps)?,
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// `input_ids` [B, L] int64 -> (last hidden state [B, L, D], pooled output [B, D]).
    ///
    /// The pooled output is the final hidden state at the eos token, found as transformers does:
    /// configs with the pre-2023 `eos_token_id == 2` take the position of the largest id (the eos
    /// token has the largest id in CLIP's vocabulary), others the first position of `eos_token_id`.
    pub fn forward(&self, input_ids: &Tensor) -> (Tensor, Tensor) {
        let (b, l) = input_ids.size2().expect("CLIP input_ids must be [B, L]");
        let max_positions = self.position_embedding.size()[0];
        assert!(
            l <= max_positions,
            "CLIP sequence length {l} exceeds max_position_embeddings {max_positions}"
        );
        let positions = Tensor::arange(l, (Kind::Int64, input_ids.device()));
        let mut xs = Tensor::embedding(&self.token_embedding, input_ids, -1, false, false)
            + self.position_embedding.index_select(0, &positions);
        for layer in &self.layers {
            xs = layer.forward(&xs);
        }
        let last_hidden = self.final_layer_norm.forward(&xs);

        let eos_position = if self.eos_token_id == 2 {
            input_ids.to_kind(Kind::Int).argmax(-1, false)
        } else {
            input_ids
                .eq(self.eos_token_id)
                .to_kind(Kind::Int)
                .argmax(-1, false)
        };
        let d = last_hidden.size()[2];
        let index = eos_position.view([b, 1, 1]).expand([b, 1, d], false);
        let pooled = last_hidden.gather(1, &index, false).squeeze_dim(1);
        (last_hidden, pooled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> ClipTextConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn config_errors_name_the_key() {
        let path = Path::new("text_encoder/config.json");
        let err = config(
            r#"{"architectures": ["CLIPTextModel"], "hidden_size": 30, "num_attention_heads": 4}"#,
        )
        .validate(path)
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("text_encoder/config.json") && err.contains("`num_attention_heads`"),
            "{err}"
        );
        let err = config(r#"{"architectures": ["CLIPVisionModel"]}"#)
            .validate(path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("CLIPVisionModel"), "{err}");
        let err = config(r#"{"model_type": "clip_text_model", "num_hidden_layers": 0}"#)
            .validate(path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`num_hidden_layers`"), "{err}");
        let err = Activation::parse("swish", path).unwrap_err().to_string();
        assert!(err.contains("`hidden_act`"), "{err}");
    }
}
