//! The generation request builder and its preview options.

use std::fmt;

use denoised_proto::v1;

use crate::error::{Error, Result};

/// Encoding of a final image or a preview.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ImageFormat {
    /// Lossless PNG (the server's default for final images).
    #[default]
    Png,
    /// JPEG.
    Jpeg,
}

impl ImageFormat {
    /// The usual file extension (`png`, `jpg`).
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpg",
        }
    }

    /// Guesses the format from a file extension (`png`, `jpg`, `jpeg`; case-insensitive).
    pub fn from_extension(extension: &str) -> Option<Self> {
        match extension.to_ascii_lowercase().as_str() {
            "png" => Some(ImageFormat::Png),
            "jpg" | "jpeg" => Some(ImageFormat::Jpeg),
            _ => None,
        }
    }

    /// The proto enum value.
    pub fn into_proto(self) -> v1::ImageFormat {
        match self {
            ImageFormat::Png => v1::ImageFormat::Png,
            ImageFormat::Jpeg => v1::ImageFormat::Jpeg,
        }
    }

    /// Converts a proto enum value; `None` for unspecified or unknown values.
    pub fn from_proto(value: i32) -> Option<Self> {
        match v1::ImageFormat::try_from(value).ok()? {
            v1::ImageFormat::Png => Some(ImageFormat::Png),
            v1::ImageFormat::Jpeg => Some(ImageFormat::Jpeg),
            v1::ImageFormat::Unspecified => None,
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpeg",
        })
    }
}

/// Container of a video returned by a video model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum VideoFormat {
    /// MP4 with H.264 (the server's default).
    #[default]
    Mp4,
    /// Looping animated GIF.
    Gif,
}

impl VideoFormat {
    /// The usual file extension (`mp4`, `gif`).
    pub fn extension(self) -> &'static str {
        match self {
            VideoFormat::Mp4 => "mp4",
            VideoFormat::Gif => "gif",
        }
    }

    /// Guesses the format from a file extension (`mp4`, `gif`; case-insensitive).
    pub fn from_extension(extension: &str) -> Option<Self> {
        match extension.to_ascii_lowercase().as_str() {
            "mp4" => Some(VideoFormat::Mp4),
            "gif" => Some(VideoFormat::Gif),
            _ => None,
        }
    }

    /// The proto enum value.
    pub fn into_proto(self) -> v1::VideoFormat {
        match self {
            VideoFormat::Mp4 => v1::VideoFormat::Mp4,
            VideoFormat::Gif => v1::VideoFormat::Gif,
        }
    }

    /// Converts a proto enum value; `None` for unspecified or unknown values.
    pub fn from_proto(value: i32) -> Option<Self> {
        match v1::VideoFormat::try_from(value).ok()? {
            v1::VideoFormat::Mp4 => Some(VideoFormat::Mp4),
            v1::VideoFormat::Gif => Some(VideoFormat::Gif),
            v1::VideoFormat::Unspecified => None,
        }
    }
}

impl fmt::Display for VideoFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.extension())
    }
}

/// How intermediate previews are rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PreviewMode {
    /// No previews.
    None,
    /// Cheap linear latent-to-RGB projection, at latent resolution.
    LatentRgb,
    /// Full VAE decode of the predicted clean latents (costly).
    FullDecode,
}

/// Preview options of a generation: `Preview::latent_rgb().every(4).jpeg().max_edge(256)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preview {
    mode: PreviewMode,
    every_n_steps: u32,
    format: Option<ImageFormat>,
    max_edge: u32,
}

impl Preview {
    fn with_mode(mode: PreviewMode) -> Self {
        Preview {
            mode,
            every_n_steps: 0,
            format: None,
            max_edge: 0,
        }
    }

    /// Explicitly no previews.
    pub fn none() -> Self {
        Self::with_mode(PreviewMode::None)
    }

    /// Latent-to-RGB previews (cheap).
    pub fn latent_rgb() -> Self {
        Self::with_mode(PreviewMode::LatentRgb)
    }

    /// VAE-decoded previews (costly).
    pub fn full_decode() -> Self {
        Self::with_mode(PreviewMode::FullDecode)
    }

    /// A preview every `n` steps (0 or 1: every step); the last step always gets one.
    pub fn every(mut self, n: u32) -> Self {
        self.every_n_steps = n;
        self
    }

    /// Encode previews as JPEG.
    pub fn jpeg(mut self) -> Self {
        self.format = Some(ImageFormat::Jpeg);
        self
    }

    /// Encode previews as PNG.
    pub fn png(mut self) -> Self {
        self.format = Some(ImageFormat::Png);
        self
    }

    /// Scale previews so that their longest edge is at most `pixels` (0: natural size).
    pub fn max_edge(mut self, pixels: u32) -> Self {
        self.max_edge = pixels;
        self
    }

    /// The proto message.
    pub fn into_proto(self) -> v1::PreviewOptions {
        v1::PreviewOptions {
            mode: match self.mode {
                PreviewMode::None => v1::PreviewMode::None,
                PreviewMode::LatentRgb => v1::PreviewMode::LatentRgb,
                PreviewMode::FullDecode => v1::PreviewMode::FullDecode,
            }
            .into(),
            every_n_steps: self.every_n_steps,
            format: self
                .format
                .map_or(v1::ImageFormat::Unspecified, ImageFormat::into_proto)
                .into(),
            max_edge: self.max_edge,
        }
    }
}

/// What to generate. Everything but the prompt defaults to the model's (server-side) default.
///
/// ```
/// use denoised_client::{GenerateRequest, Preview, VideoFormat};
/// let request = GenerateRequest::new("a lighthouse at dusk, oil painting")
///     .size(768, 512)
///     .steps(28)
///     .guidance(3.5)
///     .seed(42)
///     .preview(Preview::latent_rgb().every(4).jpeg().max_edge(256));
///
/// // Video models (CogVideoX) take the frame count, frame rate and container too.
/// let clip = GenerateRequest::new("waves at night")
///     .num_frames(49)
///     .fps(8)
///     .video_format(VideoFormat::Gif)
///     .return_frames(true);
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerateRequest {
    prompt: String,
    negative_prompt: String,
    class_label: Option<u32>,
    width: u32,
    height: u32,
    steps: u32,
    guidance: Option<f32>,
    true_cfg_scale: Option<f32>,
    seed: Option<u64>,
    preview: Option<Preview>,
    output_format: Option<ImageFormat>,
    num_frames: u32,
    fps: u32,
    use_dynamic_cfg: Option<bool>,
    video_format: Option<VideoFormat>,
    return_frames: bool,
    record_module_decisions: bool,
}

impl GenerateRequest {
    /// A request for `prompt` (may be empty for class-conditional models).
    pub fn new(prompt: impl Into<String>) -> Self {
        GenerateRequest {
            prompt: prompt.into(),
            ..Default::default()
        }
    }

    /// Negative prompt for true classifier-free guidance (used when `true_cfg_scale > 1`).
    pub fn negative_prompt(mut self, negative_prompt: impl Into<String>) -> Self {
        self.negative_prompt = negative_prompt.into();
        self
    }

    /// Class label for class-conditional models.
    pub fn class_label(mut self, label: u32) -> Self {
        self.class_label = Some(label);
        self
    }

    /// Image size in pixels; rounded down to the model's size multiple by the server.
    pub fn size(self, width: u32, height: u32) -> Self {
        self.width(width).height(height)
    }

    /// Image width in pixels (0: model default).
    pub fn width(mut self, width: u32) -> Self {
        self.width = width;
        self
    }

    /// Image height in pixels (0: model default).
    pub fn height(mut self, height: u32) -> Self {
        self.height = height;
        self
    }

    /// Number of denoising steps (0: model default).
    pub fn steps(mut self, steps: u32) -> Self {
        self.steps = steps;
        self
    }

    /// Embedded guidance scale (FLUX.1-dev style), or the classifier-free guidance scale of
    /// models that batch CFG (CogVideoX, default 6).
    pub fn guidance(mut self, guidance: f32) -> Self {
        self.guidance = Some(guidance);
        self
    }

    /// True CFG scale; above 1 with a negative prompt, each step runs two transformer passes.
    pub fn true_cfg_scale(mut self, scale: f32) -> Self {
        self.true_cfg_scale = Some(scale);
        self
    }

    /// Noise seed; the initial noise matches `torch.Generator("cpu").manual_seed(seed)`.
    /// Unset: random (the seed used is reported in [`Started`](crate::Started)).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Intermediate previews attached to step events.
    pub fn preview(mut self, preview: Preview) -> Self {
        self.preview = Some(preview);
        self
    }

    /// Encoding of the final image (default PNG); for video models, of the first frame and of
    /// the frames returned with [`return_frames`](Self::return_frames).
    pub fn output_format(mut self, format: ImageFormat) -> Self {
        self.output_format = Some(format);
        self
    }

    /// Video models: frames to generate (0: model default). The server accepts
    /// `1 + k * num_frames_step` frames ([`VideoLimits`](crate::VideoLimits)); image models
    /// refuse more than one.
    pub fn num_frames(mut self, frames: u32) -> Self {
        self.num_frames = frames;
        self
    }

    /// Video models: frame rate of the returned video (0: model default).
    pub fn fps(mut self, fps: u32) -> Self {
        self.fps = fps;
        self
    }

    /// CogVideoX's dynamic classifier-free guidance (server default: off).
    pub fn use_dynamic_cfg(mut self, enabled: bool) -> Self {
        self.use_dynamic_cfg = Some(enabled);
        self
    }

    /// Video models: container of the returned video (default MP4).
    pub fn video_format(mut self, format: VideoFormat) -> Self {
        self.video_format = Some(format);
        self
    }

    /// Video models: also return every frame as an image, encoded as
    /// [`output_format`](Self::output_format).
    pub fn return_frames(mut self, enabled: bool) -> Self {
        self.return_frames = enabled;
        self
    }

    /// Step events carry which blocks and attention modules ran, were reused, predicted or
    /// skipped ([`CacheActivity::modules`](crate::CacheActivity::modules)); default off.
    pub fn record_module_decisions(mut self, enabled: bool) -> Self {
        self.record_module_decisions = enabled;
        self
    }

    /// Rejects values that no server would accept, before a round trip.
    ///
    /// The video fields are left to the server: which frame counts and rates are valid depends
    /// on the model and the server's limits.
    pub fn validate(&self) -> Result<()> {
        let finite = |name: &str, v: Option<f32>| match v {
            Some(v) if !v.is_finite() => Err(Error::invalid(format!("`{name}` must be finite"))),
            _ => Ok(()),
        };
        finite("guidance", self.guidance)?;
        finite("true_cfg_scale", self.true_cfg_scale)?;
        if self.true_cfg_scale.is_some_and(|s| s < 0.0) {
            return Err(Error::invalid("`true_cfg_scale` must not be negative"));
        }
        Ok(())
    }

    /// The proto message, without session, model or cache (the client fills those in).
    pub fn into_proto(self) -> v1::GenerateRequest {
        v1::GenerateRequest {
            session_id: String::new(),
            model: String::new(),
            cache: None,
            prompt: self.prompt,
            negative_prompt: self.negative_prompt,
            class_label: self.class_label,
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance: self.guidance,
            true_cfg_scale: self.true_cfg_scale,
            seed: self.seed,
            preview: self.preview.map(Preview::into_proto),
            output_format: self
                .output_format
                .map_or(v1::ImageFormat::Unspecified, ImageFormat::into_proto)
                .into(),
            num_frames: self.num_frames,
            fps: self.fps,
            use_dynamic_cfg: self.use_dynamic_cfg,
            video_format: self
                .video_format
                .map_or(v1::VideoFormat::Unspecified, VideoFormat::into_proto)
                .into(),
            return_frames: self.return_frames,
            record_module_decisions: self.record_module_decisions,
        }
    }
}

impl From<GenerateRequest> for v1::GenerateRequest {
    fn from(request: GenerateRequest) -> Self {
        request.into_proto()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_leave_everything_to_the_server() {
        let proto = GenerateRequest::new("a cat").into_proto();
        assert_eq!(
            proto,
            v1::GenerateRequest {
                prompt: "a cat".into(),
                ..Default::default()
            }
        );
        assert_eq!(proto.width, 0);
        assert_eq!(proto.steps, 0);
        assert_eq!(proto.seed, None);
        assert_eq!(proto.guidance, None);
        assert_eq!(proto.preview, None);
        assert_eq!(proto.output_format, v1::ImageFormat::Unspecified as i32);
        assert_eq!((proto.num_frames, proto.fps), (0, 0));
        assert_eq!(proto.use_dynamic_cfg, None);
        assert_eq!(proto.video_format, v1::VideoFormat::Unspecified as i32);
        assert!(!proto.return_frames);
    }

    #[test]
    fn builder_sets_video_fields() {
        let request = GenerateRequest::new("waves")
            .num_frames(49)
            .fps(8)
            .use_dynamic_cfg(true)
            .video_format(VideoFormat::Gif)
            .return_frames(true);
        // No client-side opinion on frame counts or rates: they depend on the model.
        request.validate().unwrap();
        let proto = request.into_proto();
        assert_eq!((proto.num_frames, proto.fps), (49, 8));
        assert_eq!(proto.use_dynamic_cfg, Some(true));
        assert_eq!(proto.video_format, v1::VideoFormat::Gif as i32);
        assert!(proto.return_frames);

        // An explicit `false` is sent as such, not as "unset".
        let proto = GenerateRequest::new("waves")
            .use_dynamic_cfg(false)
            .video_format(VideoFormat::Mp4)
            .into_proto();
        assert_eq!(proto.use_dynamic_cfg, Some(false));
        assert_eq!(proto.video_format, v1::VideoFormat::Mp4 as i32);
    }

    #[test]
    fn builder_sets_every_field() {
        let proto = GenerateRequest::new("a cat")
            .negative_prompt("blurry")
            .size(768, 512)
            .steps(20)
            .guidance(3.5)
            .true_cfg_scale(4.0)
            .seed(7)
            .class_label(3)
            .output_format(ImageFormat::Jpeg)
            .preview(Preview::latent_rgb().every(4).jpeg().max_edge(256))
            .into_proto();
        assert_eq!(proto.negative_prompt, "blurry");
        assert_eq!((proto.width, proto.height), (768, 512));
        assert_eq!(proto.steps, 20);
        assert_eq!(proto.guidance, Some(3.5));
        assert_eq!(proto.true_cfg_scale, Some(4.0));
        assert_eq!(proto.seed, Some(7));
        assert_eq!(proto.class_label, Some(3));
        assert_eq!(proto.output_format, v1::ImageFormat::Jpeg as i32);
        assert_eq!(
            proto.preview,
            Some(v1::PreviewOptions {
                mode: v1::PreviewMode::LatentRgb as i32,
                every_n_steps: 4,
                format: v1::ImageFormat::Jpeg as i32,
                max_edge: 256,
            })
        );
    }

    #[test]
    fn preview_modes() {
        assert_eq!(
            Preview::none().into_proto().mode,
            v1::PreviewMode::None as i32
        );
        let full = Preview::full_decode().png().into_proto();
        assert_eq!(full.mode, v1::PreviewMode::FullDecode as i32);
        assert_eq!(full.format, v1::ImageFormat::Png as i32);
        assert_eq!(full.every_n_steps, 0);
    }

    #[test]
    fn validation() {
        assert!(GenerateRequest::new("x").guidance(3.5).validate().is_ok());
        let err = GenerateRequest::new("x")
            .guidance(f32::NAN)
            .validate()
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.to_string().contains("`guidance` must be finite"));
        assert!(GenerateRequest::new("x")
            .true_cfg_scale(-1.0)
            .validate()
            .is_err());
    }

    #[test]
    fn image_format_helpers() {
        assert_eq!(ImageFormat::from_extension("JPEG"), Some(ImageFormat::Jpeg));
        assert_eq!(ImageFormat::from_extension("gif"), None);
        assert_eq!(ImageFormat::from_proto(0), None);
        for f in [ImageFormat::Png, ImageFormat::Jpeg] {
            assert_eq!(ImageFormat::from_proto(f.into_proto() as i32), Some(f));
            assert_eq!(ImageFormat::from_extension(f.extension()), Some(f));
        }
    }

    #[test]
    fn video_format_helpers() {
        assert_eq!(VideoFormat::default(), VideoFormat::Mp4);
        assert_eq!(VideoFormat::from_extension("MP4"), Some(VideoFormat::Mp4));
        assert_eq!(VideoFormat::from_extension("png"), None);
        assert_eq!(VideoFormat::from_proto(0), None);
        assert_eq!(VideoFormat::from_proto(42), None);
        for f in [VideoFormat::Mp4, VideoFormat::Gif] {
            assert_eq!(VideoFormat::from_proto(f.into_proto() as i32), Some(f));
            assert_eq!(VideoFormat::from_extension(f.extension()), Some(f));
            assert_eq!(f.to_string(), f.extension());
        }
    }
}
