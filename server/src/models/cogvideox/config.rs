//! `transformer/config.json` of a diffusers `CogVideoXTransformer3DModel`.
use std::path::Path;

use serde::Deserialize;

use crate::models::weights::read_json;
use crate::models::{ModelError, Result};

/// The diffusers class this config must name.
pub const TRANSFORMER_CLASS: &str = "CogVideoXTransformer3DModel";

/// The architecture, with diffusers' field names and `CogVideoXTransformer3DModel.__init__`'s
/// defaults for absent keys (those of CogVideoX-2b).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CogVideoXTransformerConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "d::num_attention_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "d::attention_head_dim")]
    pub attention_head_dim: i64,
    #[serde(default = "d::channels")]
    pub in_channels: i64,
    /// `None` (or `null`) means 16, as diffusers' default.
    #[serde(default)]
    pub out_channels: Option<i64>,
    #[serde(default = "d::yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: i64,
    /// Width of the timestep embedding every AdaLN is conditioned on.
    #[serde(default = "d::time_embed_dim")]
    pub time_embed_dim: i64,
    /// CogVideoX1.5 image-to-video's extra "ofs" embedding (not served).
    #[serde(default)]
    pub ofs_embed_dim: Option<i64>,
    /// Width of the T5 embeddings.
    #[serde(default = "d::text_embed_dim")]
    pub text_embed_dim: i64,
    #[serde(default = "d::num_layers")]
    pub num_layers: usize,
    /// Bias on the attention q/k/v projections.
    #[serde(default = "d::yes")]
    pub attention_bias: bool,
    /// Latent width and height the positional tables are built for.
    #[serde(default = "d::sample_width")]
    pub sample_width: i64,
    #[serde(default = "d::sample_height")]
    pub sample_height: i64,
    /// Pixel frames: `(latent frames - 1) · temporal_compression_ratio + 1`.
    #[serde(default = "d::sample_frames")]
    pub sample_frames: i64,
    #[serde(default = "d::patch_size")]
    pub patch_size: i64,
    /// CogVideoX1.5: latent frames patched in pairs (a linear patch embedding).
    #[serde(default)]
    pub patch_size_t: Option<i64>,
    #[serde(default = "d::temporal_compression_ratio")]
    pub temporal_compression_ratio: i64,
    /// The text length the sin-cos table is laid out for.
    #[serde(default = "d::max_text_seq_length")]
    pub max_text_seq_length: i64,
    #[serde(default = "d::gelu_tanh")]
    pub activation_fn: String,
    #[serde(default = "d::silu")]
    pub timestep_activation_fn: String,
    #[serde(default = "d::yes")]
    pub norm_elementwise_affine: bool,
    #[serde(default = "d::norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "d::spatial_interpolation_scale")]
    pub spatial_interpolation_scale: f64,
    #[serde(default = "d::one")]
    pub temporal_interpolation_scale: f64,
    /// 5b-style 3D RoPE on the video tokens instead of the 2b's sin-cos table.
    #[serde(default)]
    pub use_rotary_positional_embeddings: bool,
    /// Image-to-video checkpoints' learned table (not served).
    #[serde(default)]
    pub use_learned_positional_embeddings: bool,
    /// Bias of the 1.0 Conv2d patch embedding.
    #[serde(default = "d::yes")]
    pub patch_bias: bool,
}

/// diffusers' defaults.
mod d {
    pub fn num_attention_heads() -> i64 {
        30
    }
    pub fn attention_head_dim() -> i64 {
        64
    }
    pub fn channels() -> i64 {
        16
    }
    pub fn yes() -> bool {
        true
    }
    pub fn time_embed_dim() -> i64 {
        512
    }
    pub fn text_embed_dim() -> i64 {
        4096
    }
    pub fn num_layers() -> usize {
        30
    }
    pub fn sample_width() -> i64 {
        90
    }
    pub fn sample_height() -> i64 {
        60
    }
    pub fn sample_frames() -> i64 {
        49
    }
    pub fn patch_size() -> i64 {
        2
    }
    pub fn temporal_compression_ratio() -> i64 {
        4
    }
    pub fn max_text_seq_length() -> i64 {
        226
    }
    pub fn gelu_tanh() -> String {
        "gelu-approximate".into()
    }
    pub fn silu() -> String {
        "silu".into()
    }
    pub fn norm_eps() -> f64 {
        1e-5
    }
    pub fn spatial_interpolation_scale() -> f64 {
        1.875
    }
    pub fn one() -> f64 {
        1.0
    }
}

impl CogVideoXTransformerConfig {
    /// Reads and validates `path` (a `transformer/config.json`).
    pub fn load(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        config.validate(path)?;
        Ok(config)
    }

    /// `heads × head_dim`.
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> i64 {
        self.out_channels.unwrap_or(16)
    }

    /// Channels per output token: `p² · out` (`p_t · p² · out` with temporal patches).
    pub fn output_dim(&self) -> i64 {
        self.patch_size * self.patch_size * self.patch_size_t.unwrap_or(1) * self.out_channels()
    }

    /// Checks what this implementation runs; errors name `path` and the key.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |key: &str, message: String| Err(ModelError::config(path, key, message));
        match self.class_name.as_deref() {
            Some(TRANSFORMER_CLASS) => {}
            Some(other) => {
                return Err(ModelError::UnknownClass {
                    path: path.to_path_buf(),
                    class: other.to_owned(),
                    expected: TRANSFORMER_CLASS.to_owned(),
                })
            }
            None => return bad("_class_name", "missing".into()),
        }
        let positive = [
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels()),
            ("time_embed_dim", self.time_embed_dim),
            ("text_embed_dim", self.text_embed_dim),
            ("sample_width", self.sample_width),
            ("sample_height", self.sample_height),
            ("sample_frames", self.sample_frames),
            ("patch_size", self.patch_size),
            ("patch_size_t", self.patch_size_t.unwrap_or(1)),
            (
                "temporal_compression_ratio",
                self.temporal_compression_ratio,
            ),
            ("max_text_seq_length", self.max_text_seq_length),
        ];
        for (key, value) in positive {
            if value <= 0 {
                return bad(key, format!("must be positive, got {value}"));
            }
        }
        if self.activation_fn != "gelu-approximate" {
            return bad(
                "activation_fn",
                format!(
                    "`{}` is not supported (gelu-approximate)",
                    self.activation_fn
                ),
            );
        }
        if self.timestep_activation_fn != "silu" {
            return bad(
                "timestep_activation_fn",
                format!("`{}` is not supported (silu)", self.timestep_activation_fn),
            );
        }
        if !self.flip_sin_to_cos || self.freq_shift != 0 {
            return bad(
                "flip_sin_to_cos",
                "only the released timestep projection (flip_sin_to_cos, freq_shift 0) is supported"
                    .into(),
            );
        }
        if self.ofs_embed_dim.is_some() {
            return bad(
                "ofs_embed_dim",
                "the image-to-video ofs embedding is not supported (text-to-video only)".into(),
            );
        }
        if self.use_learned_positional_embeddings {
            return bad(
                "use_learned_positional_embeddings",
                "image-to-video checkpoints are not supported (text-to-video only)".into(),
            );
        }
        if self.use_rotary_positional_embeddings {
            // get_3d_rotary_pos_embed: a quarter of each head for time, 3/8 each for rows and
            // columns, all in rotation pairs.
            if self.attention_head_dim % 16 != 0 {
                return bad(
                    "attention_head_dim",
                    format!(
                        "{} must be a multiple of 16 for 3D RoPE",
                        self.attention_head_dim
                    ),
                );
            }
        } else if self.inner_dim() % 16 != 0 {
            // get_3d_sincos_pos_embed: 1/4 time, 3/4 space split in two, each in sin/cos halves.
            return bad(
                "num_attention_heads",
                format!(
                    "the width {} must be a multiple of 16 for the 3D sin-cos table",
                    self.inner_dim()
                ),
            );
        }
        if self.patch_size_t.is_some() && !self.use_rotary_positional_embeddings {
            return bad(
                "patch_size_t",
                "temporal patches come with RoPE (CogVideoX1.5)".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> CogVideoXTransformerConfig {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn defaults_are_cogvideox_2b_and_bad_values_name_the_key() {
        let c = parse(serde_json::json!({"_class_name": TRANSFORMER_CLASS}));
        assert_eq!(
            (c.inner_dim(), c.num_layers, c.output_dim()),
            (1920, 30, 64)
        );
        assert!(!c.use_rotary_positional_embeddings);
        c.validate(Path::new("config.json")).unwrap();
        for (key, value) in [
            ("ofs_embed_dim", serde_json::json!(512)),
            ("use_learned_positional_embeddings", serde_json::json!(true)),
            ("activation_fn", serde_json::json!("gelu")),
            ("patch_size", serde_json::json!(0)),
        ] {
            let mut json = serde_json::json!({"_class_name": TRANSFORMER_CLASS});
            json[key] = value;
            let err = parse(json)
                .validate(Path::new("config.json"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }
}
