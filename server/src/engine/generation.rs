//! One running generation on the engine thread: its [`Denoise`] (pipeline state and the session's
//! cache strategy), the events waiting for its client, and its timings.
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::events::{self, CacheActivity, Event};
use super::model::LoadedModel;
use super::run::{guarded, CacheChange, Denoise, StepReport};
use super::{EngineShared, Job};
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
    /// The engine's count of admitted generations holds a place for this one until
    /// [`Running::release`].
    shared: Arc<EngineShared>,
    holds_slot: bool,
    /// Since when the client's buffer has been full with events still waiting.
    blocked_since: Option<Instant>,
    /// Engine time spent on this generation's steps.
    served: Duration,
}

/// Why a job must end now, queued or running: its session was cancelled, the server is stopping,
/// or the call's deadline passed (`when` says how far it got, for the message).
pub(super) fn ended_early(
    job: &Job,
    shared: &EngineShared,
    when: impl FnOnce() -> String,
) -> Option<ServiceError> {
    if job.guard.session().is_cancelled() {
        Some(ServiceError::Cancelled)
    } else if shared.stopping.load(Ordering::Acquire) {
        Some(ServiceError::ShuttingDown)
    } else if job.deadline.is_some_and(|d| Instant::now() >= d) {
        Some(ServiceError::DeadlineExceeded(format!(
            "the call's deadline passed {}; generation cancelled",
            when()
        )))
    } else {
        None
    }
}

/// Ends a generation that never ran: frees its session and engine slot, then tells the client.
pub(super) fn refuse(mut job: Job, shared: &EngineShared, error: ServiceError) {
    job.guard.release();
    shared.active.fetch_sub(1, Ordering::AcqRel);
    let _ = job.events.try_send(Err(error));
}

impl Running {
    /// Encodes the prompt and draws the noise. On failure the error goes to the client and
    /// nothing is kept.
    pub(super) fn start(
        mut job: Job,
        model_index: usize,
        model: &LoadedModel,
        shared: &Arc<EngineShared>,
    ) -> Option<Self> {
        let _span = job.span.clone().entered();
        let session = job.guard.session();
        let denoise = match Denoise::start(model.pipeline.as_ref(), &job.request, session.cache()) {
            Ok(d) => d.recording_modules(job.record_modules),
            Err(e) => {
                refuse(job, shared, e);
                return None;
            }
        };
        job.guard.mark_started();
        let session = job.guard.session();
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
            shared: shared.clone(),
            holds_slot: true,
            blocked_since: None,
            served: Duration::ZERO,
        })
    }

    /// Frees the session and the engine slot (idempotent): before the last event goes out, so
    /// that a client that saw the end, however it ended, can start its next generation at once.
    fn release(&mut self) {
        self.job.guard.release();
        if std::mem::take(&mut self.holds_slot) {
            self.shared.active.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Delivers queued events and ends the generation if it was interrupted. Returns whether
    /// the generation is over (completed, failed, cancelled, or its client left): drop it then.
    pub(super) fn service(&mut self, model: &LoadedModel) -> bool {
        if self.job.events.is_closed() {
            // The client dropped the stream: cancel, dropping the cached state with `self`.
            tracing::info!(generation_id = %self.job.generation_id, "client went away; generation cancelled");
            return true;
        }
        self.flush();
        if !self.done {
            if let Some(error) = self.interruption(model) {
                // Events not yet handed to the stream are moot now; those already in it arrive
                // before the error.
                self.outbox.clear();
                self.finish(error);
            }
        }
        self.done && self.outbox.is_empty()
    }

    /// Can run its next step: not over, and its client has caught up.
    pub(super) fn ready(&self) -> bool {
        !self.done && self.outbox.is_empty()
    }

    /// Its size for admission, in pixel-steps.
    pub(super) fn cost(&self) -> u64 {
        super::cost(&self.job.request)
    }

    /// Engine time this generation's steps have taken so far (the scheduler's fairness measure).
    pub(super) fn served(&self) -> Duration {
        self.served
    }

    /// Counts as having been served `at_least`: a newcomer starts level with the least-served
    /// running generation, instead of owning the engine until it has caught up with them all.
    pub(super) fn level_with(&mut self, at_least: Duration) {
        self.served = self.served.max(at_least);
    }

    /// Runs one step (a [`ready`](Self::ready) generation) and queues its events.
    pub(super) fn advance(&mut self, model: &LoadedModel) {
        let started = Instant::now();
        match self.step(model) {
            Ok(()) => {
                self.flush();
            }
            Err(e) => self.finish(e),
        }
        self.served += started.elapsed();
    }

    /// Why the generation must end before its next step, if it must: cancelled, the server is
    /// shutting down, the call's deadline passed, or its client stopped reading.
    fn interruption(&self, model: &LoadedModel) -> Option<ServiceError> {
        let steps = || {
            let done = self.denoise.progress(model.pipeline.as_ref()).step_index;
            format!("after {done} steps")
        };
        if let Some(error) = ended_early(&self.job, &self.shared, steps) {
            return Some(error);
        }
        let timeout = self.shared.stalled_stream_timeout;
        if self.blocked_since.is_some_and(|t| t.elapsed() >= timeout) {
            let secs = timeout.as_secs();
            tracing::warn!(generation_id = %self.job.generation_id,
                "client read nothing for {secs} s; generation cancelled");
            return Some(ServiceError::DeadlineExceeded(format!(
                "the client read no event for {secs} s (limits.stalled_stream_timeout_secs); \
                 generation cancelled"
            )));
        }
        None
    }

    /// Queues `error` as the last event, in place of whatever was still to come, and sends it.
    fn finish(&mut self, error: ServiceError) {
        self.outbox.push_back(Err(error));
        self.done = true;
        self.flush();
    }

    /// Sends queued events while the client's buffer has room. The channel has one slot more
    /// than the buffer, which only the last event may take: however far behind the client is,
    /// the way its stream ended can always be queued for it.
    fn flush(&mut self) {
        while let Some(ev) = self.outbox.pop_front() {
            let last = self.done && self.outbox.is_empty();
            if !last && self.job.events.capacity() <= 1 {
                self.outbox.push_front(ev);
                self.blocked_since.get_or_insert_with(Instant::now);
                break;
            }
            if last {
                self.release();
            }
            match self.job.events.try_send(ev) {
                Ok(()) => self.blocked_since = None,
                Err(tokio::sync::mpsc::error::TrySendError::Full(ev)) => {
                    self.outbox.push_front(ev);
                    self.blocked_since.get_or_insert_with(Instant::now);
                    break;
                }
                // Receiver gone: the next turn sees it closed.
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
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

impl Drop for Running {
    /// However the generation ends (also when its client went away), its session and slot are
    /// freed.
    fn drop(&mut self) {
        self.release();
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
            modules: report.stats.record.clone(),
        },
        step_ms: ms(report.elapsed),
        preview,
    }
}

fn ms(d: Duration) -> f32 {
    d.as_secs_f32() * 1000.0
}
