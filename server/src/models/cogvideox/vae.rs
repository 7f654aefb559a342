//! diffusers `AutoencoderKLCogVideoX`: a causal 3D-convolutional VAE, spatial ×2 per level and
//! temporal ×2 on the first `log2(temporal_compression_ratio)` levels, with the first frame kept
//! apart (a video of `1 + 4k` frames has `1 + k` latent frames). The decoder's norms are
//! `SpatialNorm3D`, conditioned on the latent.
//!
//! Video runs through the networks in frame chunks, exactly as diffusers' `_decode` / `_encode`
//! cut it (the GroupNorm statistics are per chunk, so the cut changes the numbers): 2 latent
//! frames per decoder chunk, 8 video frames per encoder chunk, the remainder added to the first
//! chunk. Between chunks every causal conv carries the last `k - 1` frames of its padded input
//! (diffusers' `conv_cache`); the first chunk is padded with copies of its first frame.
//!
//! Tensors are `[B, C, F, H, W]`. The pipeline divides latents by `scaling_factor` before
//! [`AutoencoderKLCogVideoX::decode`]; decode does not.
//!
//! Tiled decoding ([`AutoencoderKLCogVideoX::decode_tiled`], diffusers' `enable_tiling` +
//! `tiled_decode`, off by default there) bounds the decoder's memory by the tile instead of the
//! frame: the latent is cut into overlapping spatial tiles, each decoded on its own (its own frame
//! chunks and conv cache), each tile's top and left edges are linearly cross-faded with the tiles
//! above and to the left, and the tiles are cropped and stitched. The numbers differ from an
//! untiled decode (every GroupNorm sees one tile only). diffusers' defaults ([`Tiling::defaults`])
//! are half the config's `sample_height` x `sample_width`: 240 x 360 px tiles (30 x 45 latent px)
//! for CogVideoX's 480 x 720, overlapping by 1/6 of the height and 1/5 of the width; a latent no
//! larger than one tile is not tiled ([`AutoencoderKLCogVideoX::uses_tiles`]).
//!
//! Not implemented: tiled encoding, quant convs (`use_quant_conv`/`use_post_quant_conv`,
//! rejected), and `CogVideoXSafeConv3d`'s splitting of convs over about 1 G input elements into
//! time chunks (a memory saving that leaves the result unchanged up to the conv algorithm's
//! rounding).
use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::models::vae::check_block_layout;
use crate::models::weights::{read_json, Weights};
use crate::models::{ModelError, Result};

/// Epsilon of every GroupNorm diffusers does not give `norm_eps` (spatial norms, `norm_out`).
const EPS: f64 = 1e-6;
/// `num_latent_frames_batch_size`: latent frames per decoder chunk.
const DECODE_CHUNK_FRAMES: i64 = 2;
/// `num_sample_frames_batch_size`: video frames per encoder chunk.
const ENCODE_CHUNK_FRAMES: i64 = 8;
const CLASS: &str = "AutoencoderKLCogVideoX";

/// `vae/config.json`; missing keys take diffusers' `AutoencoderKLCogVideoX` defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct CogVideoXVaeConfig {
    /// Must be `AutoencoderKLCogVideoX`.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Video channels in.
    pub in_channels: i64,
    /// Video channels out.
    pub out_channels: i64,
    /// All `CogVideoXDownBlock3D`, one per level.
    pub down_block_types: Vec<String>,
    /// All `CogVideoXUpBlock3D`, one per level.
    pub up_block_types: Vec<String>,
    /// Channels of each level, highest resolution first.
    pub block_out_channels: Vec<i64>,
    pub latent_channels: i64,
    /// ResNet blocks per encoder level (the decoder has one more).
    pub layers_per_block: i64,
    /// `silu` (or its alias `swish`).
    pub act_fn: String,
    /// Epsilon of the encoder's ResNet GroupNorms (the decoder's are 1e-6 whatever this says).
    pub norm_eps: f64,
    pub norm_num_groups: i64,
    /// A power of two; its log2 is the number of levels that also halve time.
    pub temporal_compression_ratio: f64,
    /// The video height the checkpoint was made for; only sizes the default tiles.
    pub sample_height: i64,
    /// The video width the checkpoint was made for; only sizes the default tiles.
    pub sample_width: i64,
    /// The pipeline's latents are `z * scaling_factor`.
    pub scaling_factor: f64,
    /// The checkpoint asks to run the VAE in f32 even when the rest runs in half precision.
    pub force_upcast: bool,
    /// Accepted only when false.
    pub use_quant_conv: bool,
    /// Accepted only when false.
    pub use_post_quant_conv: bool,
}

impl Default for CogVideoXVaeConfig {
    fn default() -> Self {
        Self {
            class_name: None,
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["CogVideoXDownBlock3D".into(); 4],
            up_block_types: vec!["CogVideoXUpBlock3D".into(); 4],
            block_out_channels: vec![128, 256, 256, 512],
            latent_channels: 16,
            layers_per_block: 3,
            act_fn: "silu".into(),
            norm_eps: 1e-6,
            norm_num_groups: 32,
            temporal_compression_ratio: 4.0,
            sample_height: 480,
            sample_width: 720,
            scaling_factor: 1.152_584_26,
            force_upcast: true,
            use_quant_conv: false,
            use_post_quant_conv: false,
        }
    }
}

impl CogVideoXVaeConfig {
    /// Reads and validates `path` (a `vae/config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let err = |key: &str, message: String| Err(ModelError::config(path, key, message));
        if self.class_name.as_deref() != Some(CLASS) {
            return Err(ModelError::UnknownClass {
                path: path.to_path_buf(),
                class: self
                    .class_name
                    .clone()
                    .unwrap_or_else(|| "<missing>".into()),
                expected: CLASS.into(),
            });
        }
        for (key, value) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("layers_per_block", self.layers_per_block),
            ("norm_num_groups", self.norm_num_groups),
            ("sample_height", self.sample_height),
            ("sample_width", self.sample_width),
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
                    "CogVideoXDownBlock3D",
                ),
                ("up_block_types", &self.up_block_types, "CogVideoXUpBlock3D"),
            ],
        )?;
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return err(
                "act_fn",
                format!("unsupported `{}` (only silu)", self.act_fn),
            );
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return err(
                "norm_eps",
                format!("must be positive, got {}", self.norm_eps),
            );
        }
        let ratio = self.temporal_compression_ratio;
        if !(ratio >= 1.0 && ratio.fract() == 0.0 && (ratio as u64).is_power_of_two()) {
            return err(
                "temporal_compression_ratio",
                format!("must be a power of two, got {ratio}"),
            );
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return err(
                "scaling_factor",
                format!("must be finite and non-zero, got {}", self.scaling_factor),
            );
        }
        // diffusers sizes these by `out_channels`, not the latent: no real checkpoint has them.
        for (key, on) in [
            ("use_quant_conv", self.use_quant_conv),
            ("use_post_quant_conv", self.use_post_quant_conv),
        ] {
            if on {
                return err(key, "true is not supported (only false)".into());
            }
        }
        Ok(())
    }

    /// Levels whose sampler also halves (encoder) or doubles (decoder) time.
    fn temporal_levels(&self) -> usize {
        self.temporal_compression_ratio.log2() as usize
    }

    /// Video pixels per latent pixel along height and width: `2^(levels - 1)`.
    fn spatial_compression(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// diffusers' tiling parameters: tile sizes in video pixels, and the fraction of a tile that
/// overlaps its neighbour. These are the attributes `enable_tiling` leaves (its arguments when
/// given, where a `None` or 0 argument keeps the current value).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tiling {
    /// Tile height in video pixels.
    pub tile_sample_min_height: i64,
    /// Tile width in video pixels.
    pub tile_sample_min_width: i64,
    /// In `[0, 1)`.
    pub tile_overlap_factor_height: f64,
    /// In `[0, 1)`.
    pub tile_overlap_factor_width: f64,
}

impl Tiling {
    /// What `enable_tiling()` without arguments sets: half the config's sample size (Python `//`),
    /// overlaps 1/6 (height) and 1/5 (width).
    pub fn defaults(config: &CogVideoXVaeConfig) -> Self {
        Self {
            tile_sample_min_height: config.sample_height / 2,
            tile_sample_min_width: config.sample_width / 2,
            tile_overlap_factor_height: 1.0 / 6.0,
            tile_overlap_factor_width: 1.0 / 5.0,
        }
    }

    /// Fails (naming the parameter) on a tiling diffusers could not run for a VAE of this spatial
    /// compression.
    pub fn check(&self, spatial: i64) -> Result<()> {
        self.axes(spatial).map(|_| ())
    }

    /// diffusers' `tile_latent_min_height` / `_width`: `int(tile_sample_min / 2^(levels - 1))`.
    fn latent_min(&self, spatial: i64) -> (i64, i64) {
        let latent = |sample: i64| (sample as f64 / spatial as f64) as i64;
        (
            latent(self.tile_sample_min_height),
            latent(self.tile_sample_min_width),
        )
    }

    /// Both axes of the tile grid (height, width), with diffusers' float-then-truncate rounding.
    /// Sizes diffusers would fail on (a zero stride) or that skip latent pixels are errors.
    fn axes(&self, spatial: i64) -> Result<(TileAxis, TileAxis)> {
        let (latent_h, latent_w) = self.latent_min(spatial);
        Ok((
            TileAxis::new(
                ("tile_sample_min_height", self.tile_sample_min_height),
                (
                    "tile_overlap_factor_height",
                    self.tile_overlap_factor_height,
                ),
                latent_h,
            )?,
            TileAxis::new(
                ("tile_sample_min_width", self.tile_sample_min_width),
                ("tile_overlap_factor_width", self.tile_overlap_factor_width),
                latent_w,
            )?,
        ))
    }
}

/// One direction of `tiled_decode`'s grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TileAxis {
    /// Tile size in latent pixels (`tile_latent_min_*`).
    latent: i64,
    /// Latent pixels from one tile's start to the next (`overlap_*`).
    stride: i64,
    /// Decoded pixels cross-faded with the previous tile (`blend_extent_*`).
    blend: i64,
    /// Decoded pixels kept of each tile (`row_limit_*`).
    limit: i64,
}

impl TileAxis {
    fn new(
        (sample_key, sample): (&str, i64),
        (overlap_key, overlap): (&str, f64),
        latent: i64,
    ) -> Result<Self> {
        if sample <= 0 {
            return Err(ModelError::invalid_input(
                sample_key,
                format!("must be positive, got {sample}"),
            ));
        }
        // Negative overlaps would leave gaps between tiles; 1 and above a zero stride.
        if !(0.0..1.0).contains(&overlap) {
            return Err(ModelError::invalid_input(
                overlap_key,
                format!("must be in [0, 1), got {overlap}"),
            ));
        }
        let stride = (latent as f64 * (1.0 - overlap)) as i64;
        if stride == 0 {
            return Err(ModelError::invalid_input(
                sample_key,
                format!(
                    "tiles of {sample} px are {latent} latent px, which with overlap {overlap} \
                     leaves a tile stride of 0 latent px"
                ),
            ));
        }
        let blend = (sample as f64 * overlap) as i64;
        Ok(Self {
            latent,
            stride,
            blend,
            limit: sample - blend,
        })
    }

    /// Tile starts along an axis of `size` latent pixels: `range(0, size, stride)`, the last tiles
    /// cut short by the edge.
    fn tiles(&self, size: i64) -> impl Iterator<Item = (i64, i64)> + '_ {
        (0..size)
            .step_by(self.stride as usize)
            .map(move |start| (start, self.latent.min(size - start)))
    }
}

/// diffusers' `blend_v` (`dim` 3) / `blend_h` (`dim` 4): `b`'s first `extent` rows (columns)
/// cross-faded from `a`'s last ones, `b`'s weight `y / extent` at row `y`; the rest of `b` as is.
fn blend(a: &Tensor, b: &Tensor, extent: i64, dim: i64) -> Tensor {
    let (a_len, b_len) = (a.size()[dim as usize], b.size()[dim as usize]);
    let extent = extent.min(a_len).min(b_len);
    if extent == 0 {
        return b.shallow_clone();
    }
    // The weights as diffusers' Python floats: computed in f64, rounded once to the tensor's kind.
    let (weight_a, weight_b): (Vec<f64>, Vec<f64>) = (0..extent)
        .map(|y| {
            let t = y as f64 / extent as f64;
            (1.0 - t, t)
        })
        .unzip();
    let mut shape = [1i64; 5];
    shape[dim as usize] = extent;
    let weight = |w: &[f64]| {
        Tensor::from_slice(w)
            .to_kind(b.kind())
            .to_device(b.device())
            .reshape(shape)
    };
    let head = a.narrow(dim, a_len - extent, extent) * weight(&weight_a)
        + b.narrow(dim, 0, extent) * weight(&weight_b);
    Tensor::cat(&[head, b.narrow(dim, extent, b_len - extent)], dim)
}

/// The causal convs' time padding carried from one frame chunk to the next: diffusers' nested
/// `conv_cache` dict, flattened to one slot per time-kernel-3 conv in the order the convs run,
/// which is the same for every chunk.
#[derive(Default)]
struct ConvCache {
    slots: Vec<Tensor>,
    next: usize,
}

impl ConvCache {
    /// Starts a chunk: the convs take their slots from the first again.
    fn rewind(&mut self) {
        self.next = 0;
    }

    /// `x` [B, C, T, H, W] with `time_pad` frames in front: the previous chunk's last padded
    /// frames, or (first chunk) copies of `x`'s first frame. Keeps this call's own last
    /// `time_pad` padded frames for the next chunk.
    fn causal_pad(&mut self, x: &Tensor, time_pad: i64) -> Tensor {
        let slot = self.next;
        self.next += 1;
        let front = match self.slots.get(slot) {
            Some(previous) => previous.shallow_clone(),
            None => x.narrow(2, 0, 1).repeat([1, 1, time_pad, 1, 1]),
        };
        let padded = Tensor::cat(&[front, x.shallow_clone()], 2);
        let frames = padded.size()[2];
        // A copy, so that the chunk's whole padded input is not kept alive with it.
        let tail = padded.narrow(2, frames - time_pad, time_pad).copy();
        if slot < self.slots.len() {
            self.slots[slot] = tail;
        } else {
            self.slots.push(tail);
        }
        padded
    }
}

/// A plain Conv3d: diffusers' `CogVideoXSafeConv3d`, or a `CogVideoXCausalConv3d` of time kernel 1
/// (which pads nothing).
struct Conv3d {
    weight: Tensor, // [out, in, kt, kh, kw]
    bias: Tensor,
    padding: [i64; 3],
}

impl Conv3d {
    fn load(w: &Weights, name: &str, in_ch: i64, out_ch: i64, kernel: i64) -> Result<Self> {
        Ok(Self {
            weight: w.get(
                &format!("{name}.weight"),
                &[out_ch, in_ch, kernel, kernel, kernel],
            )?,
            bias: w.get(&format!("{name}.bias"), &[out_ch])?,
            padding: [0, 0, 0],
        })
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.conv3d(&self.weight, Some(&self.bias), [1], self.padding, [1], 1)
    }
}

/// `CogVideoXCausalConv3d` with kernel 3 and diffusers' `pad_mode="first"`: time padded in front
/// by two frames (see [`ConvCache::causal_pad`]), height and width zero-padded by one.
struct CausalConv3d {
    conv: Conv3d,
}

impl CausalConv3d {
    const TIME_PAD: i64 = 2;

    fn load(w: &Weights, name: &str, in_ch: i64, out_ch: i64) -> Result<Self> {
        let mut conv = Conv3d::load(w, &format!("{name}.conv"), in_ch, out_ch, 3)?;
        conv.padding = [0, 1, 1];
        Ok(Self { conv })
    }

    /// [B, in, T, H, W] -> [B, out, T, H, W]
    fn forward(&self, xs: &Tensor, cache: &mut ConvCache) -> Tensor {
        self.conv.forward(&cache.causal_pad(xs, Self::TIME_PAD))
    }
}

/// A Conv2d applied to every frame: `[B, C, T, H, W]` -> `[B*T, C, H, W]` and back.
struct FrameConv2d {
    weight: Tensor, // [out, in, 3, 3]
    bias: Tensor,
    stride: i64,
    padding: i64,
}

impl FrameConv2d {
    fn load(w: &Weights, name: &str, channels: i64, stride: i64, padding: i64) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{name}.weight"), &[channels, channels, 3, 3])?,
            bias: w.get(&format!("{name}.bias"), &[channels])?,
            stride,
            padding,
        })
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let (b, c, t, h, w) = xs
            .size5()
            .expect("frame conv input must be [B, C, T, H, W]");
        let frames = xs.permute([0, 2, 1, 3, 4]).reshape([b * t, c, h, w]);
        let out = frames.conv2d(
            &self.weight,
            Some(&self.bias),
            [self.stride],
            [self.padding],
            [1],
            1,
        );
        let (_, c, h, w) = out.size4().expect("conv2d output is 4-d");
        out.reshape([b, t, c, h, w]).permute([0, 2, 1, 3, 4])
    }
}

struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: i64,
    eps: f64,
}

impl GroupNorm {
    fn load(w: &Weights, name: &str, channels: i64, groups: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{name}.weight"), &[channels])?,
            bias: w.get(&format!("{name}.bias"), &[channels])?,
            groups,
            eps,
        })
    }

    /// Statistics over each group's channels and all frames and pixels of the chunk.
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.group_norm(
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// `CogVideoXSpatialNorm3D`: `GroupNorm(f)·conv_y(zq) + conv_b(zq)`, with the latent `zq`
/// nearest-resized to `f`'s frames and pixels (its first frame to `f`'s first frame alone when `f`
/// has an odd frame count above 1, matching the decoder's first-frame-apart upsampling).
struct SpatialNorm3D {
    norm: GroupNorm,
    conv_y: Conv3d,
    conv_b: Conv3d,
}

impl SpatialNorm3D {
    fn load(w: &Weights, name: &str, channels: i64, latent: i64, groups: i64) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::load(w, &format!("{name}.norm_layer"), channels, groups, EPS)?,
            conv_y: Conv3d::load(w, &format!("{name}.conv_y.conv"), latent, channels, 1)?,
            conv_b: Conv3d::load(w, &format!("{name}.conv_b.conv"), latent, channels, 1)?,
        })
    }

    fn forward(&self, f: &Tensor, zq: &Tensor) -> Tensor {
        let (_, _, t, h, w) = f
            .size5()
            .expect("spatial norm input must be [B, C, T, H, W]");
        let resize = |z: &Tensor, t: i64| z.upsample_nearest3d([t, h, w], None, None, None);
        let zq = if t > 1 && t % 2 == 1 {
            let z_frames = zq.size()[2];
            Tensor::cat(
                &[
                    resize(&zq.narrow(2, 0, 1), 1),
                    resize(&zq.narrow(2, 1, z_frames - 1), t - 1),
                ],
                2,
            )
        } else {
            resize(zq, t)
        };
        self.norm.forward(f) * self.conv_y.forward(&zq) + self.conv_b.forward(&zq)
    }
}

/// GroupNorm in the encoder, SpatialNorm3D (conditioned on the latent) in the decoder.
enum Norm {
    Group(GroupNorm),
    Spatial(SpatialNorm3D),
}

impl Norm {
    fn forward(&self, xs: &Tensor, zq: Option<&Tensor>) -> Tensor {
        match (self, zq) {
            (Self::Group(norm), _) => norm.forward(xs),
            (Self::Spatial(norm), Some(zq)) => norm.forward(xs, zq),
            (Self::Spatial(_), None) => unreachable!("a decoder norm runs without the latent"),
        }
    }
}

/// `CogVideoXResnetBlock3D` without time embedding:
/// `x' + conv2(silu(norm2(conv1(silu(norm1(x))))))`, `x'` through a 1x1x1 conv when the channel
/// count changes.
struct ResnetBlock3D {
    norm1: Norm,
    conv1: CausalConv3d,
    norm2: Norm,
    conv2: CausalConv3d,
    conv_shortcut: Option<Conv3d>,
}

/// How a VAE half builds the norms of its ResNet blocks.
#[derive(Clone, Copy)]
enum NormKind {
    /// Encoder: GroupNorm with `norm_eps`.
    Group { eps: f64 },
    /// Decoder: SpatialNorm3D on a latent of this many channels.
    Spatial { latent: i64 },
}

impl NormKind {
    fn load(self, w: &Weights, name: &str, channels: i64, groups: i64) -> Result<Norm> {
        Ok(match self {
            Self::Group { eps } => Norm::Group(GroupNorm::load(w, name, channels, groups, eps)?),
            Self::Spatial { latent } => {
                Norm::Spatial(SpatialNorm3D::load(w, name, channels, latent, groups)?)
            }
        })
    }
}

impl ResnetBlock3D {
    fn load(
        w: &Weights,
        name: &str,
        (in_ch, out_ch): (i64, i64),
        groups: i64,
        norm: NormKind,
    ) -> Result<Self> {
        Ok(Self {
            norm1: norm.load(w, &format!("{name}.norm1"), in_ch, groups)?,
            conv1: CausalConv3d::load(w, &format!("{name}.conv1"), in_ch, out_ch)?,
            norm2: norm.load(w, &format!("{name}.norm2"), out_ch, groups)?,
            conv2: CausalConv3d::load(w, &format!("{name}.conv2"), out_ch, out_ch)?,
            conv_shortcut: if in_ch == out_ch {
                None
            } else {
                Some(Conv3d::load(
                    w,
                    &format!("{name}.conv_shortcut"),
                    in_ch,
                    out_ch,
                    1,
                )?)
            },
        })
    }

    /// A stack of `count` blocks `{name}.resnets.{j}`, the first taking `in_ch` channels.
    fn load_stack(
        w: &Weights,
        name: &str,
        count: i64,
        (in_ch, out_ch): (i64, i64),
        groups: i64,
        norm: NormKind,
    ) -> Result<Vec<Self>> {
        (0..count)
            .map(|j| {
                let block_in = if j == 0 { in_ch } else { out_ch };
                Self::load(
                    w,
                    &format!("{name}.resnets.{j}"),
                    (block_in, out_ch),
                    groups,
                    norm,
                )
            })
            .collect()
    }

    fn forward(&self, xs: &Tensor, zq: Option<&Tensor>, cache: &mut ConvCache) -> Tensor {
        let h = self.norm1.forward(xs, zq).silu();
        let h = self.conv1.forward(&h, cache);
        let h = self.norm2.forward(&h, zq).silu();
        let h = self.conv2.forward(&h, cache);
        match &self.conv_shortcut {
            Some(conv) => h + conv.forward(xs),
            None => h + xs,
        }
    }
}

fn forward_stack(
    resnets: &[ResnetBlock3D],
    xs: Tensor,
    zq: Option<&Tensor>,
    cache: &mut ConvCache,
) -> Tensor {
    resnets
        .iter()
        .fold(xs, |xs, resnet| resnet.forward(&xs, zq, cache))
}

/// `CogVideoXUpsample3D`: nearest ×2 in height and width (and in time with `compress_time`,
/// where a chunk's odd first frame stays single: T -> 2T - 1, even T -> 2T, 1 -> 1), then a 3x3
/// conv per frame.
struct Upsample3D {
    conv: FrameConv2d,
    compress_time: bool,
}

impl Upsample3D {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let (_, _, t, h, w) = xs.size5().expect("upsample input must be [B, C, T, H, W]");
        let (h2, w2) = (2 * h, 2 * w);
        let up = if self.compress_time && t > 1 && t % 2 == 1 {
            let first = xs
                .narrow(2, 0, 1)
                .upsample_nearest3d([1, h2, w2], 1.0, 2.0, 2.0);
            let rest =
                xs.narrow(2, 1, t - 1)
                    .upsample_nearest3d([2 * (t - 1), h2, w2], 2.0, 2.0, 2.0);
            Tensor::cat(&[first, rest], 2)
        } else if self.compress_time && t > 1 {
            xs.upsample_nearest3d([2 * t, h2, w2], 2.0, 2.0, 2.0)
        } else {
            // Nearest resizing only copies values: per-frame 2D upsampling, as diffusers does it.
            xs.upsample_nearest3d([t, h2, w2], 1.0, 2.0, 2.0)
        };
        self.conv.forward(&up)
    }
}

/// `CogVideoXDownsample3D`: with `compress_time`, time average-pooled by 2 (an odd chunk's first
/// frame kept as is); then zero-pad right and bottom by one and a 3x3 stride-2 conv per frame.
struct Downsample3D {
    conv: FrameConv2d,
    compress_time: bool,
}

impl Downsample3D {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let xs = if self.compress_time {
            let (b, c, t, h, w) = xs
                .size5()
                .expect("downsample input must be [B, C, T, H, W]");
            // [B, C, T, H, W] -> [B*H*W, C, T], pooled along T as diffusers does.
            let seq = xs.permute([0, 3, 4, 1, 2]).reshape([b * h * w, c, t]);
            let pool = |x: &Tensor| x.avg_pool1d([2], [2], [0], false, true);
            let pooled = if t % 2 == 1 {
                let first = seq.narrow(2, 0, 1);
                if t > 1 {
                    Tensor::cat(&[first, pool(&seq.narrow(2, 1, t - 1))], 2)
                } else {
                    first
                }
            } else {
                pool(&seq)
            };
            let t = pooled.size()[2];
            pooled.reshape([b, h, w, c, t]).permute([0, 3, 4, 1, 2])
        } else {
            xs.shallow_clone()
        };
        self.conv.forward(&xs.constant_pad_nd([0, 1, 0, 1]))
    }
}

/// Video [B, in, F, H, W] -> moments [B, 2·latent, f, H / 2^(levels-1), W / 2^(levels-1)].
struct Encoder3D {
    conv_in: CausalConv3d,
    /// Per level: resnets, then (all but the last level) a downsampler.
    down_blocks: Vec<(Vec<ResnetBlock3D>, Option<Downsample3D>)>,
    mid_block: Vec<ResnetBlock3D>,
    norm_out: GroupNorm,
    conv_out: CausalConv3d,
}

impl Encoder3D {
    fn load(w: &Weights, cfg: &CogVideoXVaeConfig) -> Result<Self> {
        let (channels, groups) = (&cfg.block_out_channels, cfg.norm_num_groups);
        let norm = NormKind::Group { eps: cfg.norm_eps };
        let last = *channels.last().expect("validated non-empty");
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut in_ch = channels[0];
        for (i, &out_ch) in channels.iter().enumerate() {
            let p = format!("encoder.down_blocks.{i}");
            let resnets = ResnetBlock3D::load_stack(
                w,
                &p,
                cfg.layers_per_block,
                (in_ch, out_ch),
                groups,
                norm,
            )?;
            let downsample = if i + 1 < channels.len() {
                Some(Downsample3D {
                    conv: FrameConv2d::load(w, &format!("{p}.downsamplers.0.conv"), out_ch, 2, 0)?,
                    compress_time: i < cfg.temporal_levels(),
                })
            } else {
                None
            };
            down_blocks.push((resnets, downsample));
            in_ch = out_ch;
        }
        Ok(Self {
            conv_in: CausalConv3d::load(w, "encoder.conv_in", cfg.in_channels, channels[0])?,
            down_blocks,
            mid_block: ResnetBlock3D::load_stack(
                w,
                "encoder.mid_block",
                2,
                (last, last),
                groups,
                norm,
            )?,
            norm_out: GroupNorm::load(w, "encoder.norm_out", last, groups, EPS)?,
            conv_out: CausalConv3d::load(w, "encoder.conv_out", last, 2 * cfg.latent_channels)?,
        })
    }

    fn forward(&self, xs: &Tensor, cache: &mut ConvCache) -> Tensor {
        let mut xs = self.conv_in.forward(xs, cache);
        for (resnets, downsample) in &self.down_blocks {
            xs = forward_stack(resnets, xs, None, cache);
            if let Some(downsample) = downsample {
                xs = downsample.forward(&xs);
            }
        }
        let xs = forward_stack(&self.mid_block, xs, None, cache);
        self.conv_out
            .forward(&self.norm_out.forward(&xs).silu(), cache)
    }
}

/// Latent [B, latent, f, h, w] -> video [B, out, F, h·2^(levels-1), w·2^(levels-1)]; every norm
/// conditioned on the latent chunk itself.
struct Decoder3D {
    conv_in: CausalConv3d,
    mid_block: Vec<ResnetBlock3D>,
    /// Per level, lowest resolution first: resnets, then (all but the last) an upsampler.
    up_blocks: Vec<(Vec<ResnetBlock3D>, Option<Upsample3D>)>,
    norm_out: SpatialNorm3D,
    conv_out: CausalConv3d,
}

impl Decoder3D {
    fn load(w: &Weights, cfg: &CogVideoXVaeConfig) -> Result<Self> {
        let (groups, latent) = (cfg.norm_num_groups, cfg.latent_channels);
        let norm = NormKind::Spatial { latent };
        let reversed: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut in_ch = reversed[0];
        for (i, &out_ch) in reversed.iter().enumerate() {
            let p = format!("decoder.up_blocks.{i}");
            let resnets = ResnetBlock3D::load_stack(
                w,
                &p,
                cfg.layers_per_block + 1,
                (in_ch, out_ch),
                groups,
                norm,
            )?;
            let upsample = if i + 1 < reversed.len() {
                Some(Upsample3D {
                    conv: FrameConv2d::load(w, &format!("{p}.upsamplers.0.conv"), out_ch, 1, 1)?,
                    compress_time: i < cfg.temporal_levels(),
                })
            } else {
                None
            };
            up_blocks.push((resnets, upsample));
            in_ch = out_ch;
        }
        let first = *reversed.last().expect("validated non-empty");
        Ok(Self {
            conv_in: CausalConv3d::load(w, "decoder.conv_in", latent, reversed[0])?,
            mid_block: ResnetBlock3D::load_stack(
                w,
                "decoder.mid_block",
                2,
                (reversed[0], reversed[0]),
                groups,
                norm,
            )?,
            up_blocks,
            norm_out: SpatialNorm3D::load(w, "decoder.norm_out", first, latent, groups)?,
            conv_out: CausalConv3d::load(w, "decoder.conv_out", first, cfg.out_channels)?,
        })
    }

    fn forward(&self, z: &Tensor, cache: &mut ConvCache) -> Tensor {
        let xs = self.conv_in.forward(z, cache);
        let mut xs = forward_stack(&self.mid_block, xs, Some(z), cache);
        for (resnets, upsample) in &self.up_blocks {
            xs = forward_stack(resnets, xs, Some(z), cache);
            if let Some(upsample) = upsample {
                xs = upsample.forward(&xs);
            }
        }
        self.conv_out
            .forward(&self.norm_out.forward(&xs, z).silu(), cache)
    }
}

/// diffusers' frame chunks of `_decode` / `_encode`: `max(frames / size, 1)` chunks of `size`
/// frames, the remainder `frames % size` added to the first. Returns (start, length) pairs.
fn frame_chunks(frames: i64, size: i64) -> Vec<(i64, i64)> {
    let remainder = frames % size;
    (0..(frames / size).max(1))
        .map(|i| {
            let start = size * i + if i == 0 { 0 } else { remainder };
            // Python slicing clamps the end (a single latent frame is a chunk of one).
            let end = (size * (i + 1) + remainder).min(frames);
            (start, end - start)
        })
        .collect()
}

/// Runs `network` over the frame chunks of `xs` [B, C, F, H, W] with one carried conv cache, and
/// concatenates the outputs along time.
fn chunked(
    xs: &Tensor,
    chunk_frames: i64,
    mut network: impl FnMut(&Tensor, &mut ConvCache) -> Tensor,
) -> Tensor {
    let frames = xs.size()[2];
    let mut cache = ConvCache::default();
    let outputs: Vec<Tensor> = frame_chunks(frames, chunk_frames)
        .into_iter()
        .map(|(start, len)| {
            cache.rewind();
            network(&xs.narrow(2, start, len), &mut cache)
        })
        .collect();
    Tensor::cat(&outputs, 2)
}

/// The CogVideoX VAE.
pub struct AutoencoderKLCogVideoX {
    config: CogVideoXVaeConfig,
    encoder: Encoder3D,
    decoder: Decoder3D,
}

impl AutoencoderKLCogVideoX {
    /// Loads `dir/config.json` and the safetensors of a diffusers `vae/` folder. A config that
    /// describes fewer levels or ResNet blocks than the weights hold is an error naming the key.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = CogVideoXVaeConfig::from_file(&config_path)?;
        let w = Weights::from_dir(dir, device, kind)?;
        let levels = config.block_out_channels.len();
        let layers = config.layers_per_block;
        for (key, name) in [
            (
                "block_out_channels",
                format!("encoder.down_blocks.{levels}.resnets.0.conv1.conv.weight"),
            ),
            (
                "block_out_channels",
                format!("decoder.up_blocks.{levels}.resnets.0.conv1.conv.weight"),
            ),
            (
                "layers_per_block",
                format!("encoder.down_blocks.0.resnets.{layers}.conv1.conv.weight"),
            ),
            (
                "layers_per_block",
                format!(
                    "decoder.up_blocks.0.resnets.{}.conv1.conv.weight",
                    layers + 1
                ),
            ),
        ] {
            if w.contains(&name) {
                return Err(ModelError::config(
                    &config_path,
                    key,
                    format!(
                        "{levels} levels of {layers} ResNet blocks, but the weights hold `{name}`"
                    ),
                ));
            }
        }
        Ok(Self {
            encoder: Encoder3D::load(&w, &config)?,
            decoder: Decoder3D::load(&w, &config)?,
            config,
        })
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &CogVideoXVaeConfig {
        &self.config
    }

    /// Unscaled latents `z` [B, latent_channels, f, h, w] -> video [B, out_channels, F, H, W] in
    /// about [-1, 1], decoded 2 latent frames at a time (3 in the first chunk when `f` is odd).
    /// With temporal compression 4 an odd `f` gives `F = 4f - 3` frames (13 -> 49), an even `f`
    /// gives `4f`: only an odd chunk keeps its first frame apart.
    pub fn decode(&self, z: &Tensor) -> Tensor {
        chunked(z, DECODE_CHUNK_FRAMES, |z, cache| {
            self.decoder.forward(z, cache)
        })
    }

    /// Whether diffusers' `_decode` would tile a latent of `latent_height` x `latent_width` with
    /// `tiling` enabled: only when it is larger than one tile,
    /// `width > tile_latent_min_width or height > tile_latent_min_height` (strictly).
    pub fn uses_tiles(&self, latent_height: i64, latent_width: i64, tiling: &Tiling) -> bool {
        let (min_h, min_w) = tiling.latent_min(self.config.spatial_compression());
        latent_width > min_w || latent_height > min_h
    }

    /// diffusers' `decode` with `tiling` enabled (`Some`) or not: [`Self::decode_tiled`] when
    /// [`Self::uses_tiles`] says so, else [`Self::decode`]. A `tiling` that could not tile is an
    /// error even when this latent is not tiled.
    pub fn decode_with(&self, z: &Tensor, tiling: Option<&Tiling>) -> Result<Tensor> {
        if let Some(tiling) = tiling {
            // Checked here too, so that a bad tiling fails whatever the latent's size.
            tiling.axes(self.config.spatial_compression())?;
            let (_, _, _, height, width) = z.size5()?;
            if self.uses_tiles(height, width, tiling) {
                return self.decode_tiled(z, tiling);
            }
        }
        Ok(self.decode(z))
    }

    /// diffusers' `tiled_decode`, whatever the latent's size: `z` [B, latent, f, h, w] cut into
    /// tiles of `tile_latent_min` latent px every `int(tile_latent_min * (1 - overlap))`, rows
    /// first; each tile decoded as [`Self::decode`] does (own frame chunks, fresh conv cache);
    /// each tile's first `int(tile_sample_min * overlap)` px blended with the tile above, then
    /// with the tile to the left; each tile cropped to `tile_sample_min - blend` px and the crops
    /// concatenated. The output is `s·h` x `s·w` (s = 2^(levels-1)) only when the crop equals
    /// `s·stride`, as with the default sizes; otherwise it is whatever diffusers makes.
    pub fn decode_tiled(&self, z: &Tensor, tiling: &Tiling) -> Result<Tensor> {
        let (rows_axis, cols_axis) = tiling.axes(self.config.spatial_compression())?;
        let (_, _, _, height, width) = z.size5()?;
        // Per tile [B, out, F, s·tile_h, s·tile_w]; the edge tiles are smaller.
        let mut rows: Vec<Vec<Tensor>> = rows_axis
            .tiles(height)
            .map(|(top, tile_h)| {
                cols_axis
                    .tiles(width)
                    .map(|(left, tile_w)| {
                        self.decode(&z.narrow(3, top, tile_h).narrow(4, left, tile_w))
                    })
                    .collect()
            })
            .collect();
        // diffusers blends in place, so a tile's neighbours below and to the right blend with its
        // already blended pixels: replace each tile by its blend before moving on.
        for i in 0..rows.len() {
            for j in 0..rows[i].len() {
                let mut tile = rows[i][j].shallow_clone();
                if i > 0 {
                    tile = blend(&rows[i - 1][j], &tile, rows_axis.blend, 3);
                }
                if j > 0 {
                    tile = blend(&rows[i][j - 1], &tile, cols_axis.blend, 4);
                }
                rows[i][j] = tile;
            }
        }
        let crop =
            |t: &Tensor, dim: i64, limit: i64| t.narrow(dim, 0, limit.min(t.size()[dim as usize]));
        let stitched: Vec<Tensor> = rows
            .iter()
            .map(|row| {
                let cropped: Vec<Tensor> = row
                    .iter()
                    .map(|t| crop(&crop(t, 3, rows_axis.limit), 4, cols_axis.limit))
                    .collect();
                Tensor::cat(&cropped, 4)
            })
            .collect();
        Ok(Tensor::cat(&stitched, 3))
    }

    /// Video `x` [B, in_channels, F, H, W] in [-1, 1] -> mean of the latent distribution
    /// [B, latent_channels, f, h, w] (unscaled; the first half of the moments), encoded 8 frames
    /// at a time (the remainder `F % 8` in the first chunk).
    pub fn encode(&self, x: &Tensor) -> Tensor {
        let moments = chunked(x, ENCODE_CHUNK_FRAMES, |x, cache| {
            self.encoder.forward(x, cache)
        });
        moments.narrow(1, 0, self.config.latent_channels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(json: &str) -> String {
        let cfg: CogVideoXVaeConfig = serde_json::from_str(json).unwrap();
        cfg.validate(Path::new("vae/config.json"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn config_errors_name_the_key() {
        let class = r#""_class_name": "AutoencoderKLCogVideoX""#;
        for (json, key) in [
            (
                format!(r#"{{{class}, "block_out_channels": [8, 8, 8]}}"#),
                "`block_out_channels`",
            ),
            (
                format!(
                    r#"{{{class}, "down_block_types": ["CogVideoXDownBlock3D"], "block_out_channels": [32]}}"#
                ),
                "`up_block_types`",
            ),
            (
                format!(r#"{{{class}, "temporal_compression_ratio": 3}}"#),
                "`temporal_compression_ratio`",
            ),
            (
                format!(r#"{{{class}, "use_post_quant_conv": true}}"#),
                "`use_post_quant_conv`",
            ),
            (format!(r#"{{{class}, "act_fn": "gelu"}}"#), "`act_fn`"),
            (
                format!(r#"{{{class}, "sample_width": 0}}"#),
                "`sample_width`",
            ),
            (
                format!(r#"{{{class}, "latent_channels": 0}}"#),
                "`latent_channels`",
            ),
        ] {
            let e = validate(&json);
            assert!(
                e.contains("vae/config.json") && e.contains(key),
                "{json}: {e}"
            );
        }
        let e = validate(r#"{"_class_name": "AutoencoderKL"}"#);
        assert!(e.contains("AutoencoderKL") && e.contains(CLASS), "{e}");
    }

    #[test]
    fn default_tiles_are_diffusers() {
        let cfg = CogVideoXVaeConfig::default();
        let tiling = Tiling::defaults(&cfg);
        assert_eq!(
            (tiling.tile_sample_min_height, tiling.tile_sample_min_width),
            (240, 360)
        );
        // tiled_decode's overlap_*, blend_extent_* and row_limit_* for CogVideoX's own config.
        let (rows, cols) = tiling.axes(cfg.spatial_compression()).unwrap();
        let axis = |latent, stride, blend, limit| TileAxis {
            latent,
            stride,
            blend,
            limit,
        };
        assert_eq!(rows, axis(30, 25, 40, 200));
        assert_eq!(cols, axis(45, 36, 72, 288));
        // 60 x 90 latent px (480 x 720 px): starts 0, 25, 50 and 0, 36, 72.
        assert_eq!(
            rows.tiles(60).collect::<Vec<_>>(),
            [(0, 30), (25, 30), (50, 10)]
        );
        assert_eq!(
            cols.tiles(90).collect::<Vec<_>>(),
            [(0, 45), (36, 45), (72, 18)]
        );
    }

    #[test]
    fn bad_tiling_errors_name_the_parameter() {
        let good = Tiling::defaults(&CogVideoXVaeConfig::default());
        for (tiling, key) in [
            (
                Tiling {
                    tile_overlap_factor_width: 1.0,
                    ..good
                },
                "`tile_overlap_factor_width`",
            ),
            (
                Tiling {
                    tile_overlap_factor_height: -0.1,
                    ..good
                },
                "`tile_overlap_factor_height`",
            ),
            (
                Tiling {
                    tile_sample_min_height: 0,
                    ..good
                },
                "`tile_sample_min_height`",
            ),
            // One latent px per tile: int(1 * 4/5) = 0, where diffusers' range() would raise.
            (
                Tiling {
                    tile_sample_min_width: 8,
                    ..good
                },
                "`tile_sample_min_width`",
            ),
        ] {
            let e = tiling.axes(8).unwrap_err().to_string();
            assert!(e.contains(key), "{tiling:?}: {e}");
        }
    }

    #[test]
    fn frame_chunks_follow_diffusers() {
        assert_eq!(frame_chunks(1, 2), [(0, 1)]);
        assert_eq!(frame_chunks(3, 2), [(0, 3)]);
        assert_eq!(frame_chunks(4, 2), [(0, 2), (2, 2)]);
        assert_eq!(frame_chunks(13, 2).len(), 6);
        assert_eq!(frame_chunks(13, 2)[..2], [(0, 3), (3, 2)]);
        assert_eq!(frame_chunks(49, 8)[..2], [(0, 9), (9, 8)]);
    }
}
