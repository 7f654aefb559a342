//! FLUX's latent layout: the transformer sees 2×2 patches of the VAE latent as tokens.

use tch::Tensor;

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
