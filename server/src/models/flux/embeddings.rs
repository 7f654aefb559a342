//! FLUX conditioning embeddings: the timestep / guidance / pooled text MLPs summed into `temb`,
//! and the 3-axis rotary position embedding.
//!
//! Every op mirrors diffusers (`models/embeddings.py`) one for one, including the dtypes it computes
//! in, so that fp32 CPU runs agree to the last few ulps.
use tch::{Device, Kind, Tensor};

use crate::models::nn::{timestep_projection, Rope, TimestepEmbedding};
use crate::models::weights::Weights;
use crate::models::Result;

/// Channels of the sinusoidal timestep projection (`Timesteps(num_channels=256)`).
pub const TIMESTEP_PROJ_DIM: i64 = 256;

/// RoPE base frequency of `FluxPosEmbed`.
const ROPE_THETA: f64 = 10000.0;

/// diffusers `CombinedTimestepTextProjEmbeddings` (schnell) and
/// `CombinedTimestepGuidanceTextProjEmbeddings` (dev, with `guidance_embedder`): the `temb` vector
/// every block is modulated with. Weights under `time_text_embed.`.
#[derive(Debug)]
pub struct TimeTextEmbedding {
    timestep_embedder: TimestepEmbedding,
    guidance_embedder: Option<TimestepEmbedding>,
    /// `PixArtAlphaTextProjection(act_fn="silu")`: same shape as a timestep MLP.
    text_embedder: TimestepEmbedding,
}

impl TimeTextEmbedding {
    /// `dim`: model width; `pooled_dim`: width of the pooled CLIP embedding.
    pub fn load(
        w: &Weights,
        prefix: &str,
        dim: i64,
        pooled_dim: i64,
        guidance: bool,
    ) -> Result<Self> {
        let guidance_embedder = if guidance {
            Some(TimestepEmbedding::load(
                w,
                &format!("{prefix}.guidance_embedder"),
                TIMESTEP_PROJ_DIM,
                dim,
            )?)
        } else {
            None
        };
        Ok(Self {
            timestep_embedder: TimestepEmbedding::load(
                w,
                &format!("{prefix}.timestep_embedder"),
                TIMESTEP_PROJ_DIM,
                dim,
            )?,
            guidance_embedder,
            text_embedder: TimestepEmbedding::load(
                w,
                &format!("{prefix}.text_embedder"),
                pooled_dim,
                dim,
            )?,
        })
    }

    /// `timestep`, `guidance`: `[B]` on the 0..1000 scale; `pooled`: `[B, pooled_dim]` -> `[B, D]`.
    /// Panics when the model has a guidance embedder and no guidance is given (or the reverse).
    pub fn forward(&self, timestep: &Tensor, guidance: Option<&Tensor>, pooled: &Tensor) -> Tensor {
        let dtype = pooled.kind();
        let t_emb = self
            .timestep_embedder
            .forward(&timestep_projection(timestep, TIMESTEP_PROJ_DIM).to_kind(dtype));
        let t_emb = match (&self.guidance_embedder, guidance) {
            (Some(embedder), Some(g)) => {
                t_emb + embedder.forward(&timestep_projection(g, TIMESTEP_PROJ_DIM).to_kind(dtype))
            }
            (None, None) => t_emb,
            (Some(_), None) => {
                panic!("this FLUX transformer embeds guidance: a guidance tensor is required")
            }
            (None, Some(_)) => {
                panic!("this FLUX transformer has no guidance embedder: pass no guidance")
            }
        };
        t_emb + self.text_embedder.forward(pooled)
    }
}

/// diffusers `FluxPosEmbed(theta=10000, axes_dim)` on `ids [S, 3]`: per axis, frequencies in f64
/// (f32 on MPS, which has no f64), each repeated twice (interleaved), axes concatenated.
pub fn rope(ids: &Tensor, axes_dims: &[i64]) -> Rope {
    let device = ids.device();
    let freqs_kind = if device == Device::Mps {
        Kind::Float
    } else {
        Kind::Double
    };
    let pos = ids.to_kind(Kind::Float);
    let mut cos = Vec::with_capacity(axes_dims.len());
    let mut sin = Vec::with_capacity(axes_dims.len());
    for (i, &dim) in axes_dims.iter().enumerate() {
        // freqs = 1 / theta^(arange(0, dim, 2) / dim)   [dim/2]
        let exponents = Tensor::arange_start_step(0, dim, 2, (freqs_kind, device)) / (dim as f64);
        let freqs = Tensor::pow_scalar(ROPE_THETA, &exponents).reciprocal();
        let angles = pos.select(1, i as i64).outer(&freqs); // [S, dim/2]
        let n = angles.size()[1] * 2;
        cos.push(
            angles
                .cos()
                .repeat_interleave_self_int(2, 1, n)
                .to_kind(Kind::Float),
        );
        sin.push(
            angles
                .sin()
                .repeat_interleave_self_int(2, 1, n)
                .to_kind(Kind::Float),
        );
    }
    Rope {
        cos: Tensor::cat(&cos, -1),
        sin: Tensor::cat(&sin, -1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::nn::apply_rotary_emb;

    #[test]
    fn rope_rotates_pairs_by_position() {
        // One token at row 1 (axis 1), head dim 2+2+2: axis 0 and 2 angles are 0.
        let ids = Tensor::from_slice(&[0f32, 1.0, 0.0]).view([1, 3]);
        let r = rope(&ids, &[2, 2, 2]);
        assert_eq!(r.cos.size(), [1, 6]);
        let x = Tensor::from_slice(&[1f32, 0.0, 1.0, 0.0, 1.0, 0.0]).view([1, 1, 1, 6]);
        let y: Vec<f32> = Vec::try_from(apply_rotary_emb(&x, &r).flatten(0, -1)).unwrap();
        let (c, s) = (1f32.cos(), 1f32.sin());
        let expected = [1.0, 0.0, c, s, 1.0, 0.0];
        for (a, b) in y.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }
}
