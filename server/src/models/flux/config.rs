//! `transformer/config.json` of a diffusers `FluxTransformer2DModel`.
use std::path::Path;

use serde::Deserialize;

use crate::models::weights::read_json;
use crate::models::{ModelError, Result};

/// The diffusers class this config must name.
pub const FLUX_TRANSFORMER_CLASS: &str = "FluxTransformer2DModel";

/// The architecture of a FLUX transformer, with diffusers' field names and defaults (a key missing
/// from the file takes the default of `FluxTransformer2DModel.__init__`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FluxTransformerConfig {
    /// Must be `FluxTransformer2DModel`.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Side of the square patch `proj_out` predicts per token (1 in FLUX.1).
    #[serde(default = "default_patch_size")]
    pub patch_size: i64,
    /// Channels per input token: 4 × VAE latent channels (2×2 packed latents).
    #[serde(default = "default_in_channels")]
    pub in_channels: i64,
    /// `None` (or `null`) means `in_channels`.
    #[serde(default)]
    pub out_channels: Option<i64>,
    /// Dual-stream (`transformer_blocks`) count.
    #[serde(default = "default_num_layers")]
    pub num_layers: usize,
    /// Single-stream (`single_transformer_blocks`) count.
    #[serde(default = "default_num_single_layers")]
    pub num_single_layers: usize,
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: i64,
    /// Heads; the model width is heads × head dim.
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: i64,
    /// Width of the T5 embeddings fed to `context_embedder`.
    #[serde(default = "default_joint_attention_dim")]
    pub joint_attention_dim: i64,
    /// Width of the pooled CLIP embedding fed to `time_text_embed.text_embedder`.
    #[serde(default = "default_pooled_projection_dim")]
    pub pooled_projection_dim: i64,
    /// True for guidance-distilled models (FLUX.1-dev): the guidance scale is an input.
    #[serde(default)]
    pub guidance_embeds: bool,
    /// RoPE dimensions per position axis (text/frame, row, column); they sum to the head dim.
    #[serde(default = "default_axes_dims_rope")]
    pub axes_dims_rope: Vec<i64>,
}

fn default_patch_size() -> i64 {
    1
}
fn default_in_channels() -> i64 {
    64
}
fn default_num_layers() -> usize {
    19
}
fn default_num_single_layers() -> usize {
    38
}
fn default_attention_head_dim() -> i64 {
    128
}
fn default_num_attention_heads() -> i64 {
    24
}
fn default_joint_attention_dim() -> i64 {
    4096
}
fn default_pooled_projection_dim() -> i64 {
    768
}
fn default_axes_dims_rope() -> Vec<i64> {
    vec![16, 56, 56]
}

impl FluxTransformerConfig {
    /// Reads and validates `path` (a `transformer/config.json`).
    pub fn load(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        config.validate(path)?;
        Ok(config)
    }

    /// Checks the class name and that the sizes are consistent; errors name `path` and the key.
    pub fn validate(&self, path: &Path) -> Result<()> {
        match self.class_name.as_deref() {
            Some(FLUX_TRANSFORMER_CLASS) => {}
            Some(other) => {
                return Err(ModelError::UnknownClass {
                    path: path.to_path_buf(),
                    class: other.to_owned(),
                    expected: FLUX_TRANSFORMER_CLASS.to_owned(),
                })
            }
            None => return Err(ModelError::config(path, "_class_name", "missing")),
        }
        let positive = [
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels.unwrap_or(1)),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
        ];
        for (key, value) in positive {
            if value <= 0 {
                return Err(ModelError::config(
                    path,
                    key,
                    format!("must be positive, got {value}"),
                ));
            }
        }
        // FluxPosEmbed reads one RoPE axis per id column, and FLUX ids have three columns.
        if self.axes_dims_rope.len() != 3 {
            return Err(ModelError::config(
                path,
                "axes_dims_rope",
                format!("expected 3 axes, got {:?}", self.axes_dims_rope),
            ));
        }
        if let Some(d) = self.axes_dims_rope.iter().find(|&&d| d <= 0 || d % 2 != 0) {
            return Err(ModelError::config(
                path,
                "axes_dims_rope",
                format!(
                    "every axis needs a positive even size, got {d} in {:?}",
                    self.axes_dims_rope
                ),
            ));
        }
        let sum: i64 = self.axes_dims_rope.iter().sum();
        if sum != self.attention_head_dim {
            return Err(ModelError::config(
                path,
                "axes_dims_rope",
                format!(
                    "sizes {:?} sum to {sum}, but attention_head_dim is {}",
                    self.axes_dims_rope, self.attention_head_dim
                ),
            ));
        }
        Ok(())
    }

    /// Model width: heads × head dim.
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Channels per output token (`out_channels`, defaulting to `in_channels`).
    pub fn out_channels(&self) -> i64 {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Width of `proj_out`'s output: `patch_size² × out_channels`.
    pub fn output_dim(&self) -> i64 {
        self.patch_size * self.patch_size * self.out_channels()
    }

    /// Dual-stream blocks followed by single-stream blocks.
    pub fn num_blocks(&self) -> usize {
        self.num_layers + self.num_single_layers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<FluxTransformerConfig> {
        let config: FluxTransformerConfig = serde_json::from_str(json).unwrap();
        config.validate(Path::new("transformer/config.json"))?;
        Ok(config)
    }

    #[test]
    fn defaults_are_flux_dev_sized() {
        let c =
            parse(r#"{"_class_name": "FluxTransformer2DModel", "guidance_embeds": true}"#).unwrap();
        assert_eq!(
            (c.inner_dim(), c.num_blocks(), c.output_dim()),
            (3072, 57, 64)
        );
        assert!(c.guidance_embeds);
    }

    #[test]
    fn rejects_bad_values_naming_the_key() {
        let err =
            parse(r#"{"_class_name": "FluxTransformer2DModel", "axes_dims_rope": [16, 56, 48]}"#)
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("transformer/config.json") && err.contains("`axes_dims_rope`"),
            "{err}"
        );
        let err = parse(r#"{"_class_name": "FluxTransformer2DModel", "num_attention_heads": 0}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`num_attention_heads`"), "{err}");
        let err = parse(r#"{"_class_name": "SD3Transformer2DModel"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("SD3Transformer2DModel"), "{err}");
        let err = parse(r#"{"num_layers": 1}"#).unwrap_err().to_string();
        assert!(err.contains("`_class_name`"), "{err}");
    }
}
