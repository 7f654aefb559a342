//! diffusers `AutoencoderKL` (FLUX's `vae/`): convolutional encoder and decoder of ResNet blocks
//! with one self-attention block in the middle. FLUX checkpoints have no quant convs and a
//! `shift_factor`; the pipeline unscales latents (`z / scaling_factor + shift_factor`) before
//! [`AutoencoderKL::decode`].
use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::error::{ModelError, Result};
use super::weights::{read_json, Weights};

/// diffusers' GroupNorm epsilon in every VAE block.
const EPS: f64 = 1e-6;

/// `vae/config.json`; missing keys take diffusers' `AutoencoderKL` defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    /// Must be `AutoencoderKL`.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Image channels in.
    pub in_channels: i64,
    /// Image channels out.
    pub out_channels: i64,
    /// Channels of each resolution level, highest resolution first; `len - 1` 2x down/up-samplings.
    pub block_out_channels: Vec<i64>,
    /// ResNet blocks per encoder level (the decoder has one more).
    pub layers_per_block: i64,
    /// Channels of the latent (half of the encoder's output moments).
    pub latent_channels: i64,
    /// GroupNorm groups everywhere.
    pub norm_num_groups: i64,
    /// Latents are `(z - shift) * scaling_factor` for the transformer.
    pub scaling_factor: f64,
    /// Latent shift (FLUX), absent for SD-style VAEs.
    pub shift_factor: Option<f64>,
    /// 1x1 conv after the encoder.
    pub use_quant_conv: bool,
    /// 1x1 conv before the decoder.
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have their self-attention.
    pub mid_block_add_attention: bool,
    /// The checkpoint asks to run the VAE in f32 even when the rest runs in half precision.
    pub force_upcast: bool,
    /// Encoder block types (all `DownEncoderBlock2D`).
    pub down_block_types: Vec<String>,
    /// Decoder block types (all `UpDecoderBlock2D`).
    pub up_block_types: Vec<String>,
    /// Block activation (only `silu`).
    pub act_fn: String,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            class_name: None,
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![64],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            force_upcast: true,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            act_fn: "silu".into(),
        }
    }
}

impl VaeConfig {
    /// Reads and validates `path` (a `vae/config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let err = |key: &str, message: String| Err(ModelError::config(path, key, message));
        if self.class_name.as_deref() != Some("AutoencoderKL") {
            return Err(ModelError::UnknownClass {
                path: path.to_path_buf(),
                class: self
                    .class_name
                    .clone()
                    .unwrap_or_else(|| "<missing>".into()),
                expected: "AutoencoderKL".into(),
            });
        }
        for (key, value) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("layers_per_block", self.layers_per_block),
            ("latent_channels", self.latent_channels),
            ("norm_num_groups", self.norm_num_groups),
        ] {
            if value <= 0 {
                return err(key, format!("must be positive, got {value}"));
            }
        }
        check_block_layout(
            path,
            &self.block_out_channels,
            self.norm_num_groups,
            [
                (
                    "down_block_types",
                    &self.down_block_types,
                    "DownEncoderBlock2D",
                ),
                ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
            ],
        )?;
        if self.act_fn != "silu" {
            return err(
                "act_fn",
                format!("unsupported `{}` (only silu)", self.act_fn),
            );
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return err(
                "scaling_factor",
                format!("must be finite and non-zero, got {}", self.scaling_factor),
            );
        }
        if self.shift_factor.is_some_and(|s| !s.is_finite()) {
            return err("shift_factor", "must be finite".into());
        }
        Ok(())
    }
}

struct Conv2d {
    weight: Tensor, // [out, in, k, k]
    bias: Tensor,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    fn load(
        w: &Weights,
        name: &str,
        in_ch: i64,
        out_ch: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    ) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{name}.weight"), &[out_ch, in_ch, kernel, kernel])?,
            bias: w.get(&format!("{name}.bias"), &[out_ch])?,
            stride,
            padding,
        })
    }

    /// The 3x3, stride 1, "same" convolution used almost everywhere.
    fn load3(w: &Weights, name: &str, in_ch: i64, out_ch: i64) -> Result<Self> {
        Self::load(w, name, in_ch, out_ch, 3, 1, 1)
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.conv2d(
            &self.weight,
            Some(&self.bias),
            [self.stride],
            [self.padding],
            [1],
            1,
        )
    }
}

struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: i64,
}

impl GroupNorm {
    fn load(w: &Weights, name: &str, channels: i64, groups: i64) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{name}.weight"), &[channels])?,
            bias: w.get(&format!("{name}.bias"), &[channels])?,
            groups,
        })
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.group_norm(self.groups, Some(&self.weight), Some(&self.bias), EPS, true)
    }
}

/// `x + conv2(silu(norm2(conv1(silu(norm1(x))))))`, the skip through a 1x1 conv when the channel
/// count changes.
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn load(w: &Weights, name: &str, in_ch: i64, out_ch: i64, groups: i64) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(w, &format!("{name}.norm1"), in_ch, groups)?,
            conv1: Conv2d::load3(w, &format!("{name}.conv1"), in_ch, out_ch)?,
            norm2: GroupNorm::load(w, &format!("{name}.norm2"), out_ch, groups)?,
            conv2: Conv2d::load3(w, &format!("{name}.conv2"), out_ch, out_ch)?,
            conv_shortcut: if in_ch == out_ch {
                None
            } else {
                Some(Conv2d::load(
                    w,
                    &format!("{name}.conv_shortcut"),
                    in_ch,
                    out_ch,
                    1,
                    1,
                    0,
                )?)
            },
        })
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(xs).silu());
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        match &self.conv_shortcut {
            Some(conv) => conv.forward(xs) + h,
            None => xs + h,
        }
    }
}

/// Single-head self-attention over the pixels, with a residual: `x + out(attn(norm(x)))`.
struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: (Tensor, Tensor), // (weight [C, C], bias [C])
    to_k: (Tensor, Tensor),
    to_v: (Tensor, Tensor),
    to_out: (Tensor, Tensor),
}

impl AttentionBlock {
    fn load(w: &Weights, name: &str, channels: i64, groups: i64) -> Result<Self> {
        let linear = |sub: &str| -> Result<(Tensor, Tensor)> {
            Ok((
                w.get(&format!("{name}.{sub}.weight"), &[channels, channels])?,
                w.get(&format!("{name}.{sub}.bias"), &[channels])?,
            ))
        };
        Ok(Self {
            group_norm: GroupNorm::load(w, &format!("{name}.group_norm"), channels, groups)?,
            to_q: linear("to_q")?,
            to_k: linear("to_k")?,
            to_v: linear("to_v")?,
            to_out: linear("to_out.0")?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let (b, c, h, w) = xs
            .size4()
            .expect("VAE attention input must be [B, C, H, W]");
        // [B, C, H, W] -> [B, 1 head, H*W, C]
        let tokens = self
            .group_norm
            .forward(xs)
            .view([b, c, h * w])
            .transpose(1, 2)
            .unsqueeze(1);
        let project = |(weight, bias): &(Tensor, Tensor)| tokens.linear(weight, Some(bias));
        let attn = Tensor::scaled_dot_product_attention(
            &project(&self.to_q),
            &project(&self.to_k),
            &project(&self.to_v),
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let (weight, bias) = &self.to_out;
        let out = attn.squeeze_dim(1).linear(weight, Some(bias));
        out.transpose(1, 2).reshape([b, c, h, w]) + xs
    }
}

/// resnet, (attention), resnet at the lowest resolution.
struct MidBlock {
    resnet_in: ResnetBlock,
    attention: Option<AttentionBlock>,
    resnet_out: ResnetBlock,
}

impl MidBlock {
    fn load(w: &Weights, name: &str, channels: i64, groups: i64, attention: bool) -> Result<Self> {
        Ok(Self {
            resnet_in: ResnetBlock::load(
                w,
                &format!("{name}.resnets.0"),
                channels,
                channels,
                groups,
            )?,
            attention: if attention {
                Some(AttentionBlock::load(
                    w,
                    &format!("{name}.attentions.0"),
                    channels,
                    groups,
                )?)
            } else {
                None
            },
            resnet_out: ResnetBlock::load(
                w,
                &format!("{name}.resnets.1"),
                channels,
                channels,
                groups,
            )?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut xs = self.resnet_in.forward(xs);
        if let Some(attention) = &self.attention {
            xs = attention.forward(&xs);
        }
        self.resnet_out.forward(&xs)
    }
}

/// Resnets then (except on the last level) a 2x downsampling: zero-pad right/bottom by one, 3x3
/// conv with stride 2 (diffusers' `downsample_padding=0`).
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Conv2d>,
}

impl DownBlock {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut xs = self
            .resnets
            .iter()
            .fold(xs.shallow_clone(), |xs, r| r.forward(&xs));
        if let Some(conv) = &self.downsample {
            xs = conv.forward(&xs.constant_pad_nd([0, 1, 0, 1]));
        }
        xs
    }
}

/// Resnets then (except on the last level) nearest 2x upsampling and a 3x3 conv.
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut xs = self
            .resnets
            .iter()
            .fold(xs.shallow_clone(), |xs, r| r.forward(&xs));
        if let Some(conv) = &self.upsample {
            let (_, _, h, w) = xs.size4().expect("VAE up block input must be [B, C, H, W]");
            xs = conv.forward(&xs.upsample_nearest2d([2 * h, 2 * w], 2.0, 2.0));
        }
        xs
    }
}

/// Shared tail of encoder and decoder: `conv_out(silu(conv_norm_out(x)))`.
struct OutputHead {
    norm: GroupNorm,
    conv: Conv2d,
}

impl OutputHead {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.conv.forward(&self.norm.forward(xs).silu())
    }
}

/// Image [B, in, H, W] -> moments [B, 2 * latent, H / 2^(levels-1), W / 2^(levels-1)].
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    head: OutputHead,
}

impl Encoder {
    fn load(w: &Weights, cfg: &VaeConfig) -> Result<Self> {
        let (channels, groups) = (&cfg.block_out_channels, cfg.norm_num_groups);
        let last = *channels.last().expect("validated non-empty");
        let mut in_ch = channels[0];
        let mut down_blocks = Vec::with_capacity(channels.len());
        for (i, &out_ch) in channels.iter().enumerate() {
            let p = format!("encoder.down_blocks.{i}");
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let block_in = if j == 0 { in_ch } else { out_ch };
                    ResnetBlock::load(w, &format!("{p}.resnets.{j}"), block_in, out_ch, groups)
                })
                .collect::<Result<Vec<_>>>()?;
            let downsample = if i + 1 < channels.len() {
                Some(Conv2d::load(
                    w,
                    &format!("{p}.downsamplers.0.conv"),
                    out_ch,
                    out_ch,
                    3,
                    2,
                    0,
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                downsample,
            });
            in_ch = out_ch;
        }
        Ok(Self {
            conv_in: Conv2d::load3(w, "encoder.conv_in", cfg.in_channels, channels[0])?,
            down_blocks,
            mid_block: MidBlock::load(
                w,
                "encoder.mid_block",
                last,
                groups,
                cfg.mid_block_add_attention,
            )?,
            head: OutputHead {
                norm: GroupNorm::load(w, "encoder.conv_norm_out", last, groups)?,
                conv: Conv2d::load3(w, "encoder.conv_out", last, 2 * cfg.latent_channels)?,
            },
        })
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let xs = self.conv_in.forward(xs);
        let xs = self
            .down_blocks
            .iter()
            .fold(xs, |xs, block| block.forward(&xs));
        self.head.forward(&self.mid_block.forward(&xs))
    }
}

/// Latent [B, latent, h, w] -> image [B, out, h * 2^(levels-1), w * 2^(levels-1)].
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    head: OutputHead,
}

impl Decoder {
    fn load(w: &Weights, cfg: &VaeConfig) -> Result<Self> {
        let (channels, groups) = (&cfg.block_out_channels, cfg.norm_num_groups);
        let last = *channels.last().expect("validated non-empty");
        // Up blocks walk the levels from the lowest resolution (most channels) back up.
        let mut in_ch = last;
        let mut up_blocks = Vec::with_capacity(channels.len());
        for (i, &out_ch) in channels.iter().rev().enumerate() {
            let p = format!("decoder.up_blocks.{i}");
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let block_in = if j == 0 { in_ch } else { out_ch };
                    ResnetBlock::load(w, &format!("{p}.resnets.{j}"), block_in, out_ch, groups)
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < channels.len() {
                Some(Conv2d::load3(
                    w,
                    &format!("{p}.upsamplers.0.conv"),
                    out_ch,
                    out_ch,
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
            in_ch = out_ch;
        }
        Ok(Self {
            conv_in: Conv2d::load3(w, "decoder.conv_in", cfg.latent_channels, last)?,
            mid_block: MidBlock::load(
                w,
                "decoder.mid_block",
                last,
                groups,
                cfg.mid_block_add_attention,
            )?,
            up_blocks,
            head: OutputHead {
                norm: GroupNorm::load(w, "decoder.conv_norm_out", channels[0], groups)?,
                conv: Conv2d::load3(w, "decoder.conv_out", channels[0], cfg.out_channels)?,
            },
        })
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let xs = self.mid_block.forward(&self.conv_in.forward(xs));
        let xs = self
            .up_blocks
            .iter()
            .fold(xs, |xs, block| block.forward(&xs));
        self.head.forward(&xs)
    }
}

/// The VAE: encoder to the latent distribution's mean, decoder back to pixels.
pub struct AutoencoderKL {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    /// 1x1 [2 * latent] conv on the encoder output (absent in FLUX).
    quant_conv: Option<Conv2d>,
    /// 1x1 [latent] conv on the decoder input (absent in FLUX).
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model.safetensors` (the diffusers
    /// `vae/` folder).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let w = Weights::from_dir(dir, device, kind)?;
        let (latent, moments) = (config.latent_channels, 2 * config.latent_channels);
        Ok(Self {
            encoder: Encoder::load(&w, &config)?,
            decoder: Decoder::load(&w, &config)?,
            quant_conv: if config.use_quant_conv {
                Some(Conv2d::load(&w, "quant_conv", moments, moments, 1, 1, 0)?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                Some(Conv2d::load(
                    &w,
                    "post_quant_conv",
                    latent,
                    latent,
                    1,
                    1,
                    0,
                )?)
            } else {
                None
            },
            config,
        })
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Unscaled latents `z` [B, latent_channels, h, w] -> image [B, out_channels, H, W] in about
    /// [-1, 1], with `H = h * 2^(levels - 1)`.
    pub fn decode(&self, z: &Tensor) -> Tensor {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z),
            None => z.shallow_clone(),
        };
        self.decoder.forward(&z)
    }

    /// Image `x` [B, in_channels, H, W] in [-1, 1] -> mean of the latent distribution
    /// [B, latent_channels, h, w] (unscaled; the first half of the moments).
    pub fn encode(&self, x: &Tensor) -> Tensor {
        let moments = self.encoder.forward(x);
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&moments),
            None => moments,
        };
        moments.narrow(1, 0, self.config.latent_channels)
    }
}

/// A VAE config's levels: at least one, every width a positive multiple of the GroupNorm groups, and one down
/// and one up block of the one supported type per level. Errors name `path` and the key.
pub(crate) fn check_block_layout(
    path: &Path,
    block_out_channels: &[i64],
    norm_num_groups: i64,
    block_types: [(&str, &Vec<String>, &str); 2],
) -> Result<()> {
    let err = |key: &str, message: String| Err(ModelError::config(path, key, message));
    if block_out_channels.is_empty() {
        return err("block_out_channels", "must not be empty".into());
    }
    if let Some(c) = block_out_channels
        .iter()
        .find(|&&c| c <= 0 || c % norm_num_groups != 0)
    {
        return err(
            "block_out_channels",
            format!("{c} is not a positive multiple of norm_num_groups {norm_num_groups}"),
        );
    }
    let levels = block_out_channels.len();
    for (key, types, expected) in block_types {
        if types.len() != levels {
            return err(
                key,
                format!("{} entries for {levels} block_out_channels", types.len()),
            );
        }
        if let Some(other) = types.iter().find(|t| *t != expected) {
            return err(
                key,
                format!("unsupported block `{other}` (only {expected})"),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(json: &str) -> String {
        let cfg: VaeConfig = serde_json::from_str(json).unwrap();
        cfg.validate(Path::new("vae/config.json"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn config_errors_name_the_key() {
        let base = r#""_class_name": "AutoencoderKL", "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]"#;
        let err = validate(&format!(
            r#"{{{base}, "block_out_channels": [8, 12], "norm_num_groups": 8}}"#
        ));
        assert!(
            err.contains("vae/config.json") && err.contains("`block_out_channels`"),
            "{err}"
        );
        let err = validate(&format!(
            r#"{{{base}, "block_out_channels": [8], "norm_num_groups": 4}}"#
        ));
        assert!(err.contains("`down_block_types`"), "{err}");
        let err = validate(&format!(
            r#"{{{base}, "block_out_channels": [8, 8], "norm_num_groups": 4, "latent_channels": 0}}"#
        ));
        assert!(err.contains("`latent_channels`"), "{err}");
        let err = validate(r#"{"_class_name": "AutoencoderTiny"}"#);
        assert!(err.contains("AutoencoderTiny"), "{err}");
    }
}
