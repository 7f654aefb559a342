//! Typed events of a Generate stream.

use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use denoised_proto::v1;
use futures::stream::{BoxStream, Stream, StreamExt};

use crate::cache::{CacheConfig, CacheKind};
use crate::error::{Error, Result};
use crate::image::Image;
use crate::video::Video;

/// One event of a generation: `Started`, one `Step` per denoising step, then `Completed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The generation was admitted and its settings resolved.
    Started(Started),
    /// A denoising step finished.
    Step(StepEvent),
    /// The final image (and video, for video models).
    Completed(Completed),
}

/// The generation was admitted; carries the settings after applying model defaults.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Started {
    /// Id of this generation.
    pub generation_id: String,
    /// Session it runs in (an ephemeral one for `generate_once`).
    pub session_id: String,
    /// The settings actually used.
    pub settings: ResolvedSettings,
    /// Time spent waiting for the engine and encoding the prompt.
    pub setup_time: Duration,
}

/// Generation settings after defaults were applied by the server.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ResolvedSettings {
    /// Model name.
    pub model: String,
    /// Prompt.
    pub prompt: String,
    /// Negative prompt.
    pub negative_prompt: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Denoising steps.
    pub steps: u32,
    /// Guidance scale.
    pub guidance: f32,
    /// True CFG scale.
    pub true_cfg_scale: f32,
    /// The seed used (drawn by the server when the request had none).
    pub seed: u64,
    /// Cache strategy at the start.
    pub cache: CacheConfig,
    /// Device, e.g. `cuda:0`.
    pub device: String,
    /// Dtype, e.g. `bfloat16`.
    pub dtype: String,
    /// Frames generated (video models; 0 for images).
    pub num_frames: u32,
    /// Frame rate of the video (video models; 0 for images).
    pub fps: u32,
    /// Whether dynamic classifier-free guidance runs (video models; false for images).
    pub use_dynamic_cfg: bool,
}

/// What the cache did for one kind of module during one step (summed over CFG passes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModuleCounts {
    /// Modules that ran in full.
    pub computed: u32,
    /// Modules whose cached output was reused.
    pub reused: u32,
    /// Modules whose output was predicted (TaylorSeer).
    pub predicted: u32,
    /// Modules skipped altogether.
    pub skipped: u32,
}

impl ModuleCounts {
    /// All module executions of the step.
    pub fn total(&self) -> u32 {
        self.computed + self.reused + self.predicted + self.skipped
    }

    /// Executions served by the cache (reused, predicted or skipped).
    pub fn cached(&self) -> u32 {
        self.reused + self.predicted + self.skipped
    }

    fn from_proto(counts: Option<v1::ModuleCounts>) -> Self {
        let c = counts.unwrap_or_default();
        ModuleCounts {
            computed: c.computed,
            reused: c.reused,
            predicted: c.predicted,
            skipped: c.skipped,
        }
    }

    /// Appends ", 3 reused, 2 predicted" for the non-zero cache counts.
    fn fmt_cached(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, what) in [
            (self.reused, "reused"),
            (self.predicted, "predicted"),
            (self.skipped, "skipped"),
        ] {
            if n > 0 {
                write!(f, ", {n} {what}")?;
            }
        }
        Ok(())
    }
}

/// What happened to one module call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleDecision {
    /// Not asked: its block or forward did not run.
    NotRun,
    /// Ran in full.
    Computed,
    /// A cached output used verbatim.
    Reused,
    /// Extrapolated or rebuilt from cached outputs.
    Predicted,
    /// Not run; its input flowed on.
    Skipped,
}

impl ModuleDecision {
    fn from_proto(code: i32) -> Self {
        match v1::ModuleDecision::try_from(code) {
            Ok(v1::ModuleDecision::Computed) => Self::Computed,
            Ok(v1::ModuleDecision::Reused) => Self::Reused,
            Ok(v1::ModuleDecision::Predicted) => Self::Predicted,
            Ok(v1::ModuleDecision::Skipped) => Self::Skipped,
            _ => Self::NotRun,
        }
    }

    /// One letter: C computed, R reused, P predicted, S skipped, `.` not run.
    pub fn letter(self) -> char {
        match self {
            Self::NotRun => '.',
            Self::Computed => 'C',
            Self::Reused => 'R',
            Self::Predicted => 'P',
            Self::Skipped => 'S',
        }
    }
}

/// Which samples a transformer call ran for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardRows {
    /// The conditional CFG branch (or the only one without CFG).
    Cond,
    /// The unconditional CFG branch.
    Uncond,
    /// Both CFG halves in one batch.
    Both,
}

/// One transformer call's per-module decisions
/// ([`record_module_decisions`](crate::GenerateRequest::record_module_decisions)).
///
/// Displays as `cond C blocks CCRRRR attn CC.... out C`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardDecisions {
    /// Which samples the call ran for.
    pub rows: ForwardRows,
    /// The whole forward.
    pub forward: ModuleDecision,
    /// One per block in execution order (FLUX: dual-stream then single-stream blocks).
    pub blocks: Vec<ModuleDecision>,
    /// Each block's attention module ([`ModuleDecision::NotRun`] when the block did not run).
    pub attention: Vec<ModuleDecision>,
    /// The final norm and projection.
    pub output_projection: ModuleDecision,
}

impl From<v1::ForwardDecisions> for ForwardDecisions {
    fn from(f: v1::ForwardDecisions) -> Self {
        let decisions = |codes: Vec<i32>| codes.into_iter().map(ModuleDecision::from_proto);
        ForwardDecisions {
            rows: match v1::ForwardRows::try_from(f.rows) {
                Ok(v1::ForwardRows::Uncond) => ForwardRows::Uncond,
                Ok(v1::ForwardRows::Both) => ForwardRows::Both,
                _ => ForwardRows::Cond,
            },
            forward: ModuleDecision::from_proto(f.forward),
            blocks: decisions(f.blocks).collect(),
            attention: decisions(f.attention).collect(),
            output_projection: ModuleDecision::from_proto(f.output_projection),
        }
    }
}

impl fmt::Display for ForwardDecisions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let letters = |d: &[ModuleDecision]| d.iter().map(|d| d.letter()).collect::<String>();
        let rows = match self.rows {
            ForwardRows::Cond => "cond",
            ForwardRows::Uncond => "uncond",
            ForwardRows::Both => "cfg",
        };
        write!(f, "{rows} {}", self.forward.letter())?;
        if !self.blocks.is_empty() {
            write!(
                f,
                " blocks {} attn {} out {}",
                letters(&self.blocks),
                letters(&self.attention),
                self.output_projection.letter()
            )?;
        }
        Ok(())
    }
}

/// What the step cache did during one step.
///
/// Displays as a one-line summary such as `taylorseer: computed 3/19 blocks, 16 predicted`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheActivity {
    /// The strategy that ran this step.
    pub strategy: CacheKind,
    /// Transformer blocks (dual and single-stream).
    pub blocks: ModuleCounts,
    /// Attention modules.
    pub attention: ModuleCounts,
    /// True when every block ran in full.
    pub full_compute: bool,
    /// The strategy's own step counter (restarts at 0 after a switch or reset).
    pub strategy_step: u32,
    /// Bytes held by cached tensors after this step.
    pub cache_state_bytes: u64,
    /// First step after `set_cache` took effect.
    pub strategy_switched: bool,
    /// First step after `reset_cache` took effect.
    pub cache_reset: bool,
    /// Per-module decisions, one entry per transformer call, when the request asked for them
    /// ([`record_module_decisions`](crate::GenerateRequest::record_module_decisions)).
    pub modules: Option<Vec<ForwardDecisions>>,
}

impl From<v1::CacheActivity> for CacheActivity {
    fn from(a: v1::CacheActivity) -> Self {
        CacheActivity {
            strategy: CacheKind::from_proto(a.strategy),
            blocks: ModuleCounts::from_proto(a.blocks),
            attention: ModuleCounts::from_proto(a.attention),
            full_compute: a.full_compute,
            strategy_step: a.strategy_step,
            cache_state_bytes: a.cache_state_bytes,
            strategy_switched: a.strategy_switched,
            cache_reset: a.cache_reset,
            modules: a
                .modules
                .map(|m| m.forwards.into_iter().map(Into::into).collect()),
        }
    }
}

impl fmt::Display for CacheActivity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: computed {}/{} blocks",
            self.strategy,
            self.blocks.computed,
            self.blocks.total()
        )?;
        self.blocks.fmt_cached(f)?;
        // Attention-level strategies (PAB, FasterCache) run every block but reuse attention.
        if self.attention.cached() > 0 {
            write!(
                f,
                "; attention {}/{}",
                self.attention.computed,
                self.attention.total()
            )?;
            self.attention.fmt_cached(f)?;
        }
        if self.strategy_switched {
            f.write_str(" [switched]")?;
        }
        if self.cache_reset {
            f.write_str(" [reset]")?;
        }
        Ok(())
    }
}

/// One denoising step finished.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StepEvent {
    /// 0-based step index.
    pub index: u32,
    /// Number of steps of the generation.
    pub total: u32,
    /// Scheduler timestep (0..1000 scale).
    pub timestep: f32,
    /// Noise level of this step.
    pub sigma: f32,
    /// What the cache did.
    pub cache: CacheActivity,
    /// Wall time of the step on the server.
    pub step_time: Duration,
    /// A preview, when requested and due at this step. For video models, one image of evenly
    /// sampled frames side by side.
    pub preview: Option<Image>,
}

/// The generation finished.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Completed {
    /// Id of this generation.
    pub generation_id: String,
    /// The final image; for video models, the first frame.
    pub image: Image,
    /// Server time from admission to the encoded image.
    pub total_time: Duration,
    /// Time spent in the denoising loop.
    pub denoise_time: Duration,
    /// Time spent in the VAE decode.
    pub decode_time: Duration,
    /// Number of steps run.
    pub steps: u32,
    /// Steps in which every block ran in full.
    pub full_compute_steps: u32,
    /// Cost-weighted fraction of module executions the cache did not run
    /// (`estimated_flops_saved / estimated_flops_total`).
    pub cache_hit_ratio: f32,
    /// Transformer FLOPs not spent thanks to the cache (estimate).
    pub estimated_flops_saved: f64,
    /// Transformer FLOPs a run without cache would have spent (estimate).
    pub estimated_flops_total: f64,
    /// MagCache ratios recorded in calibration mode (empty otherwise).
    pub calibrated_mag_ratios: Vec<f32>,
    /// The video, for video models.
    pub video: Option<Video>,
    /// Every frame, for video models when the request asked for
    /// [`return_frames`](crate::GenerateRequest::return_frames) (empty otherwise).
    pub frames: Vec<Image>,
}

impl Completed {
    /// Fraction of the transformer FLOPs saved by the cache (0 when the total is unknown).
    pub fn flops_saved_fraction(&self) -> f64 {
        if self.estimated_flops_total > 0.0 {
            self.estimated_flops_saved / self.estimated_flops_total
        } else {
            0.0
        }
    }

    /// Writes [`frames`](Self::frames) to `dir` (created if missing) as `frame_0000.png`,
    /// `frame_0001.png`, … (the extension follows each frame's format); returns the paths.
    pub fn save_frames(&self, dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)?;
        self.frames
            .iter()
            .enumerate()
            .map(|(i, frame)| {
                let path = dir.join(format!("frame_{i:04}.{}", frame.format.extension()));
                frame.save(&path)?;
                Ok(path)
            })
            .collect()
    }
}

/// Server durations come as float milliseconds; garbage (negative, NaN) reads as zero.
fn millis(ms: f32) -> Duration {
    Duration::try_from_secs_f64(f64::from(ms) / 1000.0).unwrap_or_default()
}

impl TryFrom<v1::GenerateEvent> for Event {
    type Error = Error;

    fn try_from(event: v1::GenerateEvent) -> Result<Self> {
        use v1::generate_event::Event as E;
        Ok(match event.event {
            None => return Err(Error::protocol("GenerateEvent without an event")),
            Some(E::Started(s)) => {
                let settings = s
                    .settings
                    .ok_or_else(|| Error::protocol("Started event without settings"))?;
                Event::Started(Started {
                    generation_id: s.generation_id,
                    session_id: s.session_id,
                    settings: ResolvedSettings {
                        model: settings.model,
                        prompt: settings.prompt,
                        negative_prompt: settings.negative_prompt,
                        width: settings.width,
                        height: settings.height,
                        steps: settings.steps,
                        guidance: settings.guidance,
                        true_cfg_scale: settings.true_cfg_scale,
                        seed: settings.seed,
                        cache: settings.cache.map(CacheConfig::from).unwrap_or_default(),
                        device: settings.device,
                        dtype: settings.dtype,
                        num_frames: settings.num_frames,
                        fps: settings.fps,
                        use_dynamic_cfg: settings.use_dynamic_cfg,
                    },
                    setup_time: millis(s.setup_ms),
                })
            }
            Some(E::Step(s)) => Event::Step(StepEvent {
                index: s.index,
                total: s.total,
                timestep: s.timestep,
                sigma: s.sigma,
                cache: s
                    .cache
                    .ok_or_else(|| {
                        Error::protocol(format!("Step {} without cache activity", s.index))
                    })?
                    .into(),
                step_time: millis(s.step_ms),
                preview: s.preview.map(Image::from_proto).transpose()?,
            }),
            Some(E::Completed(c)) => Event::Completed(Completed {
                image: Image::from_proto(
                    c.image
                        .ok_or_else(|| Error::protocol("Completed event without an image"))?,
                )?,
                generation_id: c.generation_id,
                total_time: millis(c.total_ms),
                denoise_time: millis(c.denoise_ms),
                decode_time: millis(c.decode_ms),
                steps: c.steps,
                full_compute_steps: c.full_compute_steps,
                cache_hit_ratio: c.cache_hit_ratio,
                estimated_flops_saved: c.estimated_flops_saved,
                estimated_flops_total: c.estimated_flops_total,
                calibrated_mag_ratios: c.calibrated_mag_ratios,
                video: c.video.map(Video::from_proto).transpose()?,
                frames: c
                    .frames
                    .into_iter()
                    .map(Image::from_proto)
                    .collect::<Result<_>>()?,
            }),
        })
    }
}

/// The events of one generation, as a [`Stream`] of `Result<Event>`.
///
/// The stream yields an error and ends when the server fails the call, sends a malformed event,
/// or ends the stream before `Completed` ([`Error::IncompleteStream`]). Dropping it cancels the
/// call. To stop the generation while keeping the stream, call
/// [`Session::cancel`](crate::Session::cancel) from another task.
pub struct GenerationStream {
    inner: BoxStream<'static, Result<v1::GenerateEvent, tonic::Status>>,
    steps_seen: u32,
    completed: bool,
    finished: bool,
}

impl fmt::Debug for GenerationStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerationStream")
            .field("steps_seen", &self.steps_seen)
            .field("completed", &self.completed)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl GenerationStream {
    pub(crate) fn new(
        inner: impl Stream<Item = Result<v1::GenerateEvent, tonic::Status>> + Send + 'static,
    ) -> Self {
        GenerationStream {
            inner: inner.boxed(),
            steps_seen: 0,
            completed: false,
            finished: false,
        }
    }

    /// Drains the stream and returns its `Completed` event.
    pub async fn collect_final(mut self) -> Result<Completed> {
        while let Some(event) = self.next().await {
            if let Event::Completed(completed) = event? {
                return Ok(completed);
            }
        }
        // Only reachable if the stream already ended before this call.
        Err(Error::IncompleteStream {
            steps_seen: self.steps_seen,
        })
    }
}

impl Stream for GenerationStream {
    type Item = Result<Event>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        let item = match ready!(self.inner.poll_next_unpin(cx)) {
            Some(Ok(event)) => Event::try_from(event),
            Some(Err(status)) => Err(status.into()),
            None => {
                self.finished = true;
                return Poll::Ready((!self.completed).then_some(Err(Error::IncompleteStream {
                    steps_seen: self.steps_seen,
                })));
            }
        };
        match &item {
            Ok(Event::Step(_)) => self.steps_seen += 1,
            Ok(Event::Completed(_)) => self.completed = true,
            Ok(Event::Started(_)) => {}
            Err(_) => self.finished = true,
        }
        Poll::Ready(Some(item))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::image::tests::{encoded, temp_dir};
    use crate::request::{ImageFormat, VideoFormat};
    use v1::generate_event::Event as E;

    pub(crate) fn started(steps: u32) -> v1::GenerateEvent {
        v1::GenerateEvent {
            event: Some(E::Started(v1::Started {
                generation_id: "g1".into(),
                session_id: "s1".into(),
                settings: Some(v1::ResolvedSettings {
                    model: "flux-tiny".into(),
                    steps,
                    seed: 42,
                    width: 8,
                    height: 8,
                    ..Default::default()
                }),
                setup_ms: 12.5,
            })),
        }
    }

    pub(crate) fn step(index: u32, total: u32, computed: u32, predicted: u32) -> v1::GenerateEvent {
        v1::GenerateEvent {
            event: Some(E::Step(v1::Step {
                index,
                total,
                timestep: 1000.0 - index as f32,
                sigma: 1.0,
                cache: Some(v1::CacheActivity {
                    strategy: v1::CacheKind::TaylorSeer as i32,
                    blocks: Some(v1::ModuleCounts {
                        computed,
                        predicted,
                        ..Default::default()
                    }),
                    attention: None,
                    full_compute: predicted == 0,
                    strategy_step: index,
                    cache_state_bytes: 4096,
                    strategy_switched: false,
                    cache_reset: false,
                    modules: None,
                }),
                step_ms: 3.0,
                preview: None,
            })),
        }
    }

    pub(crate) fn completed() -> v1::GenerateEvent {
        v1::GenerateEvent {
            event: Some(E::Completed(v1::Completed {
                generation_id: "g1".into(),
                image: Some(v1::Image {
                    format: v1::ImageFormat::Png as i32,
                    width: 8,
                    height: 8,
                    data: encoded(ImageFormat::Png, 8, 8),
                }),
                total_ms: 100.0,
                denoise_ms: 80.0,
                decode_ms: 10.0,
                steps: 2,
                full_compute_steps: 1,
                cache_hit_ratio: 0.5,
                estimated_flops_saved: 1.0e9,
                estimated_flops_total: 4.0e9,
                calibrated_mag_ratios: vec![],
                ..Default::default()
            })),
        }
    }

    fn stream(events: Vec<Result<v1::GenerateEvent, tonic::Status>>) -> GenerationStream {
        GenerationStream::new(futures::stream::iter(events))
    }

    #[test]
    fn events_convert() {
        let Event::Started(s) = Event::try_from(started(2)).unwrap() else {
            panic!()
        };
        assert_eq!(s.settings.seed, 42);
        assert_eq!(s.settings.cache, CacheConfig::None);
        assert_eq!(s.setup_time, Duration::from_micros(12_500));

        let Event::Step(s) = Event::try_from(step(1, 2, 1, 2)).unwrap() else {
            panic!()
        };
        assert_eq!(s.cache.strategy, CacheKind::TaylorSeer);
        assert_eq!(s.cache.blocks.total(), 3);
        assert_eq!(s.step_time, Duration::from_millis(3));
        assert_eq!(
            s.cache.to_string(),
            "taylorseer: computed 1/3 blocks, 2 predicted"
        );

        let Event::Completed(c) = Event::try_from(completed()).unwrap() else {
            panic!()
        };
        assert_eq!(c.image.format, ImageFormat::Png);
        assert_eq!(c.flops_saved_fraction(), 0.25);
        assert_eq!(c.video, None);
        assert!(c.frames.is_empty());
    }

    fn frame(format: v1::ImageFormat, data: Vec<u8>) -> v1::Image {
        v1::Image {
            format: format as i32,
            width: 8,
            height: 8,
            data,
        }
    }

    /// A video model's Completed: first frame, a GIF video and three PNG frames.
    fn completed_video() -> v1::GenerateEvent {
        let mut event = completed();
        if let Some(E::Completed(c)) = &mut event.event {
            c.video = Some(v1::Video {
                format: v1::VideoFormat::Gif as i32,
                width: 8,
                height: 8,
                num_frames: 3,
                fps: 8,
                data: b"not really a gif".to_vec(),
            });
            c.frames = (0..3)
                .map(|_| frame(v1::ImageFormat::Png, encoded(ImageFormat::Png, 8, 8)))
                .collect();
        }
        event
    }

    #[test]
    fn video_events_convert() {
        let mut started = started(2);
        if let Some(E::Started(s)) = &mut started.event {
            let settings = s.settings.as_mut().unwrap();
            (settings.num_frames, settings.fps, settings.use_dynamic_cfg) = (49, 8, true);
        }
        let Event::Started(s) = Event::try_from(started).unwrap() else {
            panic!()
        };
        assert_eq!((s.settings.num_frames, s.settings.fps), (49, 8));
        assert!(s.settings.use_dynamic_cfg);

        let Event::Completed(c) = Event::try_from(completed_video()).unwrap() else {
            panic!()
        };
        let video = c.video.as_ref().unwrap();
        assert_eq!(video.format, VideoFormat::Gif);
        assert_eq!((video.width, video.height), (8, 8));
        assert_eq!((video.num_frames, video.fps), (3, 8));
        assert_eq!(video.bytes, b"not really a gif");
        assert_eq!(c.frames.len(), 3);

        let dir = temp_dir().join("frames");
        let paths = c.save_frames(&dir).unwrap();
        let names: Vec<_> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["frame_0000.png", "frame_0001.png", "frame_0002.png"]
        );
        for (path, frame) in paths.iter().zip(&c.frames) {
            assert_eq!(std::fs::read(path).unwrap(), frame.bytes);
        }
        std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }

    #[test]
    fn malformed_videos_are_protocol_errors() {
        let mut bad_video = completed_video();
        let mut bad_frame = completed_video();
        if let Some(E::Completed(c)) = &mut bad_video.event {
            c.video.as_mut().unwrap().format = 0;
        }
        if let Some(E::Completed(c)) = &mut bad_frame.event {
            c.frames[1] = frame(v1::ImageFormat::Unspecified, b"GIF89a".to_vec());
        }
        for (event, what) in [(bad_video, "video"), (bad_frame, "image")] {
            let err = Event::try_from(event).unwrap_err();
            assert!(matches!(err, Error::Protocol(_)), "{err}");
            assert!(err.to_string().contains(what), "{err}");
        }
    }

    #[test]
    fn malformed_events_are_protocol_errors() {
        let mut no_cache = step(0, 1, 1, 0);
        if let Some(E::Step(s)) = &mut no_cache.event {
            s.cache = None;
        }
        for event in [v1::GenerateEvent { event: None }, no_cache] {
            let err = Event::try_from(event).unwrap_err();
            assert!(matches!(err, Error::Protocol(_)), "{err}");
        }
        assert_eq!(millis(-1.0), Duration::ZERO);
        assert_eq!(millis(f32::NAN), Duration::ZERO);
    }

    #[test]
    fn forward_decisions_convert_and_display_as_letters() {
        use v1::ModuleDecision as D;
        let f: ForwardDecisions = v1::ForwardDecisions {
            rows: v1::ForwardRows::Uncond as i32,
            forward: D::Computed as i32,
            blocks: vec![D::Computed as i32, D::Reused as i32, D::Skipped as i32],
            attention: vec![D::Predicted as i32, D::Unspecified as i32, 99],
            output_projection: D::Computed as i32,
        }
        .into();
        assert_eq!(f.rows, ForwardRows::Uncond);
        assert_eq!(
            f.blocks,
            [
                ModuleDecision::Computed,
                ModuleDecision::Reused,
                ModuleDecision::Skipped
            ]
        );
        // Unknown codes read as "not run".
        assert_eq!(f.attention[2], ModuleDecision::NotRun);
        assert_eq!(f.to_string(), "uncond C blocks CRS attn P.. out C");
        let rebuilt: ForwardDecisions = v1::ForwardDecisions {
            rows: v1::ForwardRows::Uncond as i32,
            forward: D::Predicted as i32,
            ..Default::default()
        }
        .into();
        assert_eq!(rebuilt.to_string(), "uncond P");
    }

    #[test]
    fn activity_display_with_attention_and_flags() {
        let activity = CacheActivity {
            strategy: CacheKind::PyramidAttentionBroadcast,
            blocks: ModuleCounts {
                computed: 5,
                ..Default::default()
            },
            attention: ModuleCounts {
                computed: 2,
                reused: 3,
                ..Default::default()
            },
            full_compute: false,
            strategy_step: 0,
            cache_state_bytes: 0,
            strategy_switched: true,
            cache_reset: true,
            modules: None,
        };
        assert_eq!(
            activity.to_string(),
            "pab: computed 5/5 blocks; attention 2/5, 3 reused [switched] [reset]"
        );
    }

    #[tokio::test]
    async fn collect_final_returns_completed() {
        let s = stream(vec![
            Ok(started(2)),
            Ok(step(0, 2, 3, 0)),
            Ok(step(1, 2, 1, 2)),
            Ok(completed()),
        ]);
        let completed = s.collect_final().await.unwrap();
        assert_eq!(completed.full_compute_steps, 1);
    }

    #[tokio::test]
    async fn stream_without_completed_is_an_error() {
        let mut s = stream(vec![Ok(started(2)), Ok(step(0, 2, 3, 0))]);
        assert!(matches!(s.next().await, Some(Ok(Event::Started(_)))));
        assert!(matches!(s.next().await, Some(Ok(Event::Step(_)))));
        let err = s.next().await.unwrap().unwrap_err();
        assert!(
            matches!(err, Error::IncompleteStream { steps_seen: 1 }),
            "{err}"
        );
        assert!(s.next().await.is_none());

        let s = stream(vec![Ok(started(2))]);
        let err = s.collect_final().await.unwrap_err();
        assert!(matches!(err, Error::IncompleteStream { steps_seen: 0 }));
    }

    #[tokio::test]
    async fn status_ends_the_stream() {
        let mut s = stream(vec![
            Ok(started(2)),
            Err(tonic::Status::cancelled("cancelled by client")),
            Ok(completed()),
        ]);
        s.next().await.unwrap().unwrap();
        let err = s.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Cancelled);
        assert!(s.next().await.is_none());
    }
}
