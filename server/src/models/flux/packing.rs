//! FLUX's latent layout: the transformer sees 2×2 patches of the VAE latent as tokens.
use tch::Tensor;

use crate::dit::layout::LatentLayout;

/// diffusers `_pack_latents`: `[B, C, h, w]` -> `[B, (h/2)·(w/2), 4·C]` (2×2 patches).
pub fn pack(latents: &Tensor) -> Tensor {
    let (b, c, h, w) = latents.size4().expect("latents are [B, C, h, w]");
    latents
        .view([b, c, h / 2, 2, w / 2, 2])
        .permute([0, 2, 4, 1, 3, 5])
        .reshape([b, (h / 2) * (w / 2), c * 4])
}

/// diffusers `_unpack_latents`: `[B, (h/2)·(w/2), 4·C]` -> `[B, C, h, w]`.
pub fn unpack(packed: &Tensor, h: i64, w: i64) -> Tensor {
    let (b, _, channels) = packed.size3().expect("packed latents are [B, L, 4C]");
    packed
        .view([b, h / 2, w / 2, channels / 4, 2, 2])
        .permute([0, 3, 1, 4, 2, 5])
        .reshape([b, channels / 4, h, w])
}

/// FLUX's [`LatentLayout`]: packed 2×2-patch tokens of an `h × w` latent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FluxLayout {
    /// Latent grid height and width (before packing).
    pub h: i64,
    pub w: i64,
}

impl LatentLayout for FluxLayout {
    fn to_grid(&self, tokens: &Tensor) -> Tensor {
        unpack(tokens, self.h, self.w)
    }

    fn to_tokens(&self, grid: &Tensor) -> Tensor {
        pack(grid)
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;

    #[test]
    fn pack_and_unpack_are_inverse() {
        let x = Tensor::arange(2 * 4 * 6, (Kind::Float, Device::Cpu)).view([1, 2, 4, 6]);
        let layout = FluxLayout { h: 4, w: 6 };
        let packed = layout.to_tokens(&x);
        assert_eq!(packed.size(), [1, 6, 8]);
        // The first token is the top-left 2×2 patch, channel-major.
        let first: Vec<f32> = Vec::try_from(packed.get(0).get(0)).unwrap();
        assert_eq!(first, [0.0, 1.0, 6.0, 7.0, 24.0, 25.0, 30.0, 31.0]);
        assert!(layout.to_grid(&packed).equal(&x));
    }
}
