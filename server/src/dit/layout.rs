//! How a family's transformer tokens map to the latent grid (diffusers' `tensor_format`, owned by
//! the family): FasterCache's frequency split and the previews work on the grid and need no
//! family import.
use tch::Tensor;

/// A family's conversion between its transformer's token layout (the forward's input and output)
/// and the latent grid, for one latent size: `[B, C, H, W]` for images, `[B, F, C, H, W]` for
/// videos; the last two grid axes are always `H, W`.
pub trait LatentLayout: std::fmt::Debug + Send + Sync {
    /// Tokens (the forward's output layout) -> grid.
    fn to_grid(&self, tokens: &Tensor) -> Tensor;
    /// Grid -> tokens; the inverse of [`to_grid`](Self::to_grid).
    fn to_tokens(&self, grid: &Tensor) -> Tensor;
}
