//! One running generation on the engine thread: its [`Denoise`] (pipeline state and the session's
//! cache strategy), the events waiting for its client, and its timings.
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::events::{self, CacheActivity, Event};
use super::model::LoadedModel;
use super::run::{guarded, CacheChange, Denoise, StepReport};
use super::Job;
use crate::dit::pipeline::Frames;
use crate::error::{ServiceError, ServiceResult};
use crate::media::{encode_image, encode_video, frames_strip, EncodedImage};

type Outgoing = Result<Event, ServiceError>;

pub(super) struct Running {
    job: Job,
    pub(super) model_index: usize,
    denoise: Denoise,
    outbox: VecDeque<Outgoing>,
    /// Set once the last event (Completed or an error) is queued.
    done: bool,
    denoise_started: Instant,
}

pub(super) struct TurnOutcome {
    pub progressed: bool,
    /// The generation is over (completed, failed, cancelled, or its client left): drop it.
    pub finished: bool,
}

impl Running {
    /// Encodes the prompt and draws the noise. On failure the error goes to the client and
    /// nothing is kept.
    pub(super) fn start(job: Job, model_index: usize, model: &LoadedModel) -> Option<Self> {
        let _span = job.span.clone().entered();
        let session = job.guard.session();
        let denoise = match Denoise::start(model.pipeline.as_ref(), &job.request, session.cache()) {
            Ok(d) => d,
            Err(e) => {
                let _ = job.events.try_send(Err(e));
                return None;
            }
        };
        let started = events::Started {
            generation_id: job.generation_id.clone(),
            session_id: session.id.clone(),
            model: model.info.name.clone(),
            request: job.request.clone(),
            video: job.video,
            cache: denoise.config().clone(),
            device: model.info.device.clone(),
            dtype: model.info.dtype.clone(),
            setup_ms: ms(job.received.elapsed()),
        };
        tracing::info!(generation_id = %job.generation_id, steps = job.request.steps, "generation started");
        Some(Self {
            job,
            model_index,
            denoise,
            outbox: VecDeque::from([Ok(Event::Started(Box::new(started)))]),
            done: false,
            denoise_started: Instant::now(),
        })
    }

    /// Gives this generation its turn: deliver queued events, then run one step if the client
    /// has caught up.
    pub(super) fn turn(&mut self, model: &LoadedModel) -> TurnOutcome {
        if self.job.events.is_closed() {
            // The client dropped the stream: cancel, dropping the cached state with `self`.
            tracing::info!(generation_id = %self.job.generation_id, "client went away; generation cancelled");
            return TurnOutcome {
                progressed: true,
                finished: true,
            };
        }
        let flushed = self.flush();
        if !self.outbox.is_empty() {
            return TurnOutcome {
                progressed: flushed,
                finished: false,
            };
        }
        if self.done {
            return TurnOutcome {
                progressed: flushed,
                finished: true,
            };
        }
        if self.job.guard.session().is_cancelled() {
            self.outbox.push_back(Err(ServiceError::Cancelled));
            self.done = true;
        } else if let Err(e) = self.step(model) {
            self.outbox.push_back(Err(e));
            self.done = true;
        }
        self.flush();
        TurnOutcome {
            progressed: true,
            finished: self.done && self.outbox.is_empty(),
        }
    }

    fn flush(&mut self) -> bool {
        let mut sent = false;
        while let Some(ev) = self.outbox.pop_front() {
            match self.job.events.try_send(ev) {
                Ok(()) => sent = true,
                Err(tokio::sync::mpsc::error::TrySendError::Full(ev)) => {
                    self.outbox.push_front(ev);
                    break;
                }
                // Receiver gone: the next turn sees it closed.
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
        sent
    }

    /// Applies the switch / reset requested since the last step (a switch wins over a reset).
    fn apply_pending(&mut self) -> ServiceResult<()> {
        let pending = self.job.guard.session().take_pending();
        if let Some(config) = pending.switch_to {
            self.denoise.change_cache(CacheChange::Switch(config))
        } else if pending.reset {
            self.denoise.change_cache(CacheChange::Reset)
        } else {
            Ok(())
        }
    }

    fn step(&mut self, model: &LoadedModel) -> ServiceResult<()> {
        self.apply_pending()?;
        let pipeline = model.pipeline.as_ref();
        let index = self.denoise.progress(pipeline).step_index;
        let strategy = self.denoise.config().kind().name();
        let span = tracing::info_span!(parent: &self.job.span, "step", index, strategy);
        let _entered = span.enter();
        let report = self.denoise.step(pipeline)?;
        self.job.guard.session().set_cache_bytes(report.state_bytes);
        let preview = self.preview(model, &report)?;
        let step = step_event(&report, self.denoise.strategy().kind(), preview);
        tracing::debug!(
            step_ms = step.step_ms,
            full = step.cache.full_compute,
            "step done"
        );
        self.outbox.push_back(Ok(Event::Step(step)));

        if self.denoise.progress(pipeline).is_done() {
            let completed = self.complete(model)?;
            self.outbox.push_back(Ok(Event::Completed(completed)));
            self.done = true;
        }
        Ok(())
    }

    fn preview(
        &self,
        model: &LoadedModel,
        report: &StepReport,
    ) -> ServiceResult<Option<EncodedImage>> {
        let plan = &self.job.preview;
        let Some(kind) = plan.due(report.output.index, report.output.total) else {
            return Ok(None);
        };
        let frames = guarded("preview", || {
            model.pipeline.preview(self.denoise.generation(), kind)
        })?;
        // A video's preview: evenly sampled frames side by side.
        let frames = if frames.frames.len() > 1 {
            frames_strip(&frames, PREVIEW_STRIP_FRAMES)?
        } else {
            frames
        };
        encode_image(frames, plan.format, plan.max_edge).map(Some)
    }

    fn complete(&self, model: &LoadedModel) -> ServiceResult<events::Completed> {
        let denoise = self.denoise_started.elapsed();
        let decode_started = Instant::now();
        let frames = guarded("VAE decode", || {
            model.pipeline.decode(self.denoise.generation())
        })?;
        let decode = decode_started.elapsed();
        let format = self.job.output_format;
        let (video, images) = match self.job.video {
            None => (None, Vec::new()),
            Some(plan) => {
                let video = encode_video(&frames, plan.fps, plan.format)?;
                let images = if plan.return_frames {
                    (0..frames.frames.len())
                        .map(|i| encode_image(frame(&frames, i), format, 0))
                        .collect::<ServiceResult<_>>()?
                } else {
                    Vec::new()
                };
                (Some(video), images)
            }
        };
        let image = encode_image(frame(&frames, 0), format, 0)?;
        let t = self.denoise.totals();
        let total: Duration = self.job.received.elapsed();
        tracing::info!(generation_id = %self.job.generation_id, total_ms = total.as_millis() as u64,
            full_compute_steps = t.full_compute_steps, "generation completed");
        Ok(events::Completed {
            generation_id: self.job.generation_id.clone(),
            image,
            video,
            frames: images,
            total_ms: ms(total),
            denoise_ms: ms(denoise),
            decode_ms: ms(decode),
            steps: self.denoise.progress(model.pipeline.as_ref()).num_steps as u32,
            full_compute_steps: t.full_compute_steps,
            cache_hit_ratio: t.cache_hit_ratio(),
            estimated_flops_saved: t.flops_saved,
            estimated_flops_total: t.flops_total,
            calibrated_mag_ratios: self
                .denoise
                .strategy()
                .calibrated_mag_ratios()
                .unwrap_or_default(),
        })
    }
}

/// Frames in a video step preview.
const PREVIEW_STRIP_FRAMES: usize = 8;

/// Frame `i` alone.
fn frame(frames: &Frames, i: usize) -> Frames {
    Frames {
        width: frames.width,
        height: frames.height,
        frames: vec![frames.frames[i].clone()],
    }
}

/// The Step event of a step report.
fn step_event(
    report: &StepReport,
    strategy: crate::cache::CacheKind,
    preview: Option<EncodedImage>,
) -> events::Step {
    let out = &report.output;
    events::Step {
        index: out.index as u32,
        total: out.total as u32,
        timestep: out.timestep as f32,
        sigma: out.sigma as f32,
        cache: CacheActivity {
            strategy,
            blocks: report.stats.blocks,
            attention: report.stats.attention,
            full_compute: report.stats.full_compute(),
            strategy_step: report.strategy_step,
            cache_state_bytes: report.state_bytes,
            strategy_switched: report.switched,
            cache_reset: report.reset,
        },
        step_ms: ms(report.elapsed),
        preview,
    }
}

fn ms(d: Duration) -> f32 {
    d.as_secs_f32() * 1000.0
}
