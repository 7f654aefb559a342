//! CogVideoX positions and patches: the 2b's 3D sin-cos table added to the tokens, the 5b's 3D
//! rotary tables for the video tokens (as `CogVideoXPipeline` prepares them), and the patch
//! embedding (`CogVideoXPatchEmbed`). Every op follows diffusers' `models/embeddings.py` in order
//! and dtype.
use tch::{Device, Kind, Tensor};

use super::config::CogVideoXTransformerConfig;
use crate::models::nn::{Linear, Rope};
use crate::models::weights::Weights;
use crate::models::Result;

/// Base frequency of both tables.
const THETA: f64 = 10000.0;

/// `get_1d_sincos_pos_embed_from_grid(dim, pos)`: `[M]` f32 positions -> `[M, dim]` f64
/// `[sin | cos]` (the frequencies are f64, so the product is too).
fn sincos_1d(dim: i64, pos: &Tensor) -> Tensor {
    let omega = Tensor::arange(dim / 2, (Kind::Double, pos.device())) / (dim as f64 / 2.0);
    let omega = Tensor::pow_scalar(THETA, &omega).reciprocal();
    let out = pos.reshape([-1]).to_kind(Kind::Double).outer(&omega); // [M, dim/2]
    Tensor::cat(&[out.sin(), out.cos()], 1)
}

/// `get_3d_sincos_pos_embed(dim, (w, h), t, spatial_scale, temporal_scale)` flattened over
/// `(t, h, w)`: `[t·h·w, dim]` f64, a quarter time then three quarters space (columns, rows).
fn sincos_3d(
    dim: i64,
    (t, h, w): (i64, i64, i64),
    spatial: f64,
    temporal: f64,
    device: Device,
) -> Tensor {
    let (dim_space, dim_time) = (3 * dim / 4, dim / 4);
    let f32_ = (Kind::Float, device);
    let grid_h = Tensor::arange(h, f32_) / spatial;
    let grid_w = Tensor::arange(w, f32_) / spatial;
    // meshgrid(grid_w, grid_h, indexing="xy"): columns first, each [h, w].
    let cols = grid_w.view([1, w]).expand([h, w], false);
    let rows = grid_h.view([h, 1]).expand([h, w], false);
    let space = Tensor::cat(
        &[
            sincos_1d(dim_space / 2, &cols),
            sincos_1d(dim_space / 2, &rows),
        ],
        1,
    ); // [h·w, 3·dim/4]
    let time = sincos_1d(dim_time, &(Tensor::arange(t, f32_) / temporal)); // [t, dim/4]
    let hw = h * w;
    Tensor::cat(
        &[
            time.unsqueeze(1).expand([t, hw, dim_time], false),
            space.unsqueeze(0).expand([t, hw, dim_space], false),
        ],
        -1,
    )
    .reshape([t * hw, dim])
}

/// `CogVideoXPatchEmbed._get_positional_embeddings` for a latent of `frames × height × width`:
/// `[1, max_text_seq_length + N, D]`, zeros over the text positions, in `kind`.
pub fn sincos_table(
    c: &CogVideoXTransformerConfig,
    (frames, height, width): (i64, i64, i64),
    device: Device,
    kind: Kind,
) -> Tensor {
    let p = c.patch_size;
    let dim = c.inner_dim();
    let video = sincos_3d(
        dim,
        (frames, height / p, width / p),
        c.spatial_interpolation_scale,
        c.temporal_interpolation_scale,
        device,
    );
    let text = Tensor::zeros([c.max_text_seq_length, dim], (Kind::Double, device));
    Tensor::cat(&[text, video], 0).unsqueeze(0).to_kind(kind)
}

/// `get_1d_rotary_pos_embed(dim, pos, use_real=True)` (f32 frequencies): `[M]` positions ->
/// `(cos, sin)`, each `[M, dim]` with every angle repeated for its pair.
fn rotary_1d(dim: i64, pos: &Tensor) -> (Tensor, Tensor) {
    let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Float, pos.device())) / dim as f64;
    let freqs = Tensor::pow_scalar(THETA, &exponents).reciprocal();
    let angles = pos.outer(&freqs); // [M, dim/2]
    let n = dim;
    (
        angles.cos().repeat_interleave_self_int(2, 1, n),
        angles.sin().repeat_interleave_self_int(2, 1, n),
    )
}

/// The CogVideoX pipeline's `get_resize_crop_region_for_grid((h, w), base_w, base_h)`: the
/// top-left and bottom-right of the base grid an `h × w` grid is resized into (Python's
/// half-to-even `round`).
fn crop_region(h: i64, w: i64, base_w: i64, base_h: i64) -> ((i64, i64), (i64, i64)) {
    let (th, tw) = (base_h as f64, base_w as f64);
    let round = |x: f64| x.round_ties_even() as i64;
    let (resize_h, resize_w) = if h as f64 / w as f64 > th / tw {
        (base_h, round(th / h as f64 * w as f64))
    } else {
        (round(tw / w as f64 * h as f64), base_w)
    };
    let top = round((th - resize_h as f64) / 2.0);
    let left = round((tw - resize_w as f64) / 2.0);
    ((top, left), (top + resize_h, left + resize_w))
}

/// `CogVideoXPipeline._prepare_rotary_positional_embeddings` for a latent of
/// `frames × height × width`: tables `[N, head_dim]` for the video tokens in their patch order.
/// CogVideoX 1.0 places the grid in the base grid by its crop region (`linspace`); 1.5 slices
/// integer positions (`slice`) over the temporally patched frames.
pub fn rotary_tables(
    c: &CogVideoXTransformerConfig,
    (frames, height, width): (i64, i64, i64),
    device: Device,
) -> Rope {
    let p = c.patch_size;
    let (gh, gw) = (height / p, width / p);
    let (base_h, base_w) = (c.sample_height / p, c.sample_width / p);
    let f32_ = (Kind::Float, device);
    let (t, grid_t, grid_h, grid_w) = match c.patch_size_t {
        None => {
            let ((top, left), (bottom, right)) = crop_region(gh, gw, base_w, base_h);
            let span = |start: i64, stop: i64, n: i64| {
                let end = (stop * (n - 1)) as f64 / n as f64;
                Tensor::linspace(start as f64, end, n, f32_)
            };
            (
                frames,
                span(0, frames, frames),
                span(top, bottom, gh),
                span(left, right, gw),
            )
        }
        Some(pt) => {
            let t = (frames + pt - 1) / pt;
            let slice = |n: i64| Tensor::arange(n, f32_);
            (
                t,
                slice(t),
                slice(base_h).narrow(0, 0, gh),
                slice(base_w).narrow(0, 0, gw),
            )
        }
    };
    let d = c.attention_head_dim;
    let (dim_t, dim_hw) = (d / 4, d / 8 * 3);
    let axes = [
        (rotary_1d(dim_t, &grid_t), [t, 1, 1]),
        (rotary_1d(dim_hw, &grid_h), [1, gh, 1]),
        (rotary_1d(dim_hw, &grid_w), [1, 1, gw]),
    ];
    // Each axis broadcast over the (t, h, w) grid, concatenated per token.
    let combine = |part: usize| {
        let tables: Vec<Tensor> = axes
            .iter()
            .map(|(tables, shape)| {
                let table = if part == 0 { &tables.0 } else { &tables.1 };
                let dim = table.size()[1];
                table
                    .view([shape[0], shape[1], shape[2], dim])
                    .expand([t, gh, gw, dim], false)
            })
            .collect();
        Tensor::cat(&tables, -1).reshape([t * gh * gw, d])
    };
    Rope {
        cos: combine(0),
        sin: combine(1),
    }
}

/// `CogVideoXPatchEmbed` without its positions: text through `text_proj`, video latents
/// `[B, F, C, H, W]` into patch tokens, concatenated `[text; video]`.
#[derive(Debug)]
pub struct PatchEmbed {
    text_proj: Linear,
    proj: VideoPatches,
    patch: i64,
    patch_t: Option<i64>,
}

#[derive(Debug)]
enum VideoPatches {
    /// CogVideoX 1.0: `Conv2d(C, D, k = s = p)` per frame; `weight [D, C, p, p]`.
    Conv {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    /// CogVideoX 1.5: a linear map of each `p_t × p × p` patch (channels last).
    Linear(Linear),
}

impl PatchEmbed {
    pub fn load(w: &Weights, prefix: &str, c: &CogVideoXTransformerConfig) -> Result<Self> {
        let (p, dim, ch) = (c.patch_size, c.inner_dim(), c.in_channels);
        let proj = match c.patch_size_t {
            None => VideoPatches::Conv {
                weight: w.get(&format!("{prefix}.proj.weight"), &[dim, ch, p, p])?,
                bias: if c.patch_bias {
                    Some(w.get(&format!("{prefix}.proj.bias"), &[dim])?)
                } else {
                    None
                },
            },
            Some(pt) => VideoPatches::Linear(Linear::load(
                w,
                &format!("{prefix}.proj"),
                ch * p * p * pt,
                dim,
            )?),
        };
        Ok(Self {
            text_proj: Linear::load(w, &format!("{prefix}.text_proj"), c.text_embed_dim, dim)?,
            proj,
            patch: p,
            patch_t: c.patch_size_t,
        })
    }

    /// `text [B, L, text_dim]`, `video [B, F, C, H, W]` -> `[B, L + N, D]`.
    pub fn forward(&self, text: &Tensor, video: &Tensor) -> Tensor {
        let text = self.text_proj.forward(text);
        let (b, f, c, h, w) = video.size5().expect("video latents are [B, F, C, H, W]");
        let p = self.patch;
        let video = match (&self.proj, self.patch_t) {
            (VideoPatches::Conv { weight, bias }, _) => {
                let x = video.reshape([-1, c, h, w]).conv2d(
                    weight,
                    bias.as_ref(),
                    [p, p],
                    [0, 0],
                    [1, 1],
                    1,
                ); // [B·F, D, h/p, w/p]
                let x = x.view([b, f, -1, h / p, w / p]);
                x.flatten(3, -1).transpose(2, 3).flatten(1, 2) // [B, F·(h/p)·(w/p), D]
            }
            (VideoPatches::Linear(linear), Some(pt)) => {
                let x = video
                    .permute([0, 1, 3, 4, 2])
                    .reshape([b, f / pt, pt, h / p, p, w / p, p, c])
                    .permute([0, 1, 3, 5, 7, 2, 4, 6]) // (b, f', h', w', c, pt, p, p)
                    .flatten(4, 7)
                    .flatten(1, 3);
                linear.forward(&x)
            }
            (VideoPatches::Linear(_), None) => unreachable!("a linear patch embedding has p_t"),
        };
        Tensor::cat(&[text, video], 1).contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_regions_match_the_pipeline() {
        // Values of diffusers' get_resize_crop_region_for_grid; the last rounds 0.5 to 0.
        assert_eq!(crop_region(30, 45, 45, 30), ((0, 0), (30, 45)));
        assert_eq!(crop_region(4, 3, 4, 3), ((0, 1), (3, 3)));
        assert_eq!(crop_region(2, 5, 4, 3), ((0, 0), (2, 4)));
    }

    #[test]
    fn sincos_starts_with_time_then_columns_and_rows() {
        let table = sincos_3d(16, (2, 1, 3), 1.0, 1.0, Device::Cpu);
        assert_eq!(table.size(), [6, 16]);
        // Token (t=1, h=0, w=2): time dims sin(1)/cos(1) at the first frequency; column 2.
        let row: Vec<f64> = Vec::try_from(table.get(5)).unwrap();
        assert!((row[0] - 1f64.sin()).abs() < 1e-12 && (row[2] - 1f64.cos()).abs() < 1e-12);
        assert!((row[4] - 2f64.sin()).abs() < 1e-12);
        assert_eq!(row[10], 0.0); // row 0: sin(0)
    }
}
