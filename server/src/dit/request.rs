//! The validated domain request: what the API layer produces from the wire request and the
//! engine and pipelines consume. Nothing below `api/` sees the generated proto types.

/// What a pipeline needs to prepare one generation; every default is already resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    pub prompt: String,
    /// Used only under true classifier-free guidance (`true_cfg_scale > 1`).
    pub negative_prompt: Option<String>,
    /// Pixels; the pipeline rounds them as diffusers does.
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Guidance scale: distilled guidance for guidance-embedding models (FLUX.1-dev).
    pub guidance: f32,
    pub true_cfg_scale: f32,
    pub seed: u64,
    /// Text-encoder tokens (padded / truncated to exactly this many).
    pub max_sequence_length: usize,
    /// Frames of a video; `None` for an image.
    pub num_frames: Option<usize>,
    /// CogVideoX's dynamic classifier-free guidance (`use_dynamic_cfg`): the scale follows a
    /// cosine schedule over the timesteps.
    pub dynamic_cfg: bool,
}

/// How an image is encoded for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFormat {
    #[default]
    Png,
    Jpeg,
}

/// How a video is encoded for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VideoFormat {
    /// H.264 in MP4: small, plays in every browser; 16×16 to 3840×2160, 1 to 120 fps.
    #[default]
    Mp4,
    /// Looping animated GIF: any size, 1 to 50 fps, 256 colours a frame, large files.
    Gif,
}

impl VideoFormat {
    /// The highest frame rate the format carries.
    pub const fn max_fps(self) -> u32 {
        match self {
            Self::Mp4 => 120,
            // GIF delays are whole centiseconds, and browsers slow anything under 2 cs down.
            Self::Gif => 50,
        }
    }
}

/// How a video model's output goes to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VideoPlan {
    pub fps: u32,
    pub format: VideoFormat,
    /// Every frame as an image too.
    pub return_frames: bool,
}

/// What a step preview shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreviewKind {
    /// The predicted clean latents projected linearly to RGB, at latent resolution.
    LatentRgb,
    /// The predicted clean latents through the VAE decoder.
    FullDecode,
}

/// Which steps carry a preview, and how it is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PreviewPlan {
    /// `None`: no previews.
    pub kind: Option<PreviewKind>,
    /// A preview every this many steps (0 counts as 1), and always at the last step.
    pub every_n_steps: u32,
    pub format: ImageFormat,
    /// Longest edge of the encoded preview in pixels (0: as rendered).
    pub max_edge: u32,
}

impl PreviewPlan {
    /// The preview due after step `index` of `total`, if any.
    pub fn due(&self, index: usize, total: usize) -> Option<PreviewKind> {
        let every = self.every_n_steps.max(1) as usize;
        self.kind
            .filter(|_| index.is_multiple_of(every) || index + 1 == total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_every_n_steps_and_at_the_last() {
        let plan = PreviewPlan {
            kind: Some(PreviewKind::LatentRgb),
            every_n_steps: 3,
            ..Default::default()
        };
        let due: Vec<bool> = (0..8).map(|i| plan.due(i, 8).is_some()).collect();
        assert_eq!(due, [true, false, false, true, false, false, true, true]);
        assert_eq!(PreviewPlan::default().due(0, 1), None);
    }
}
