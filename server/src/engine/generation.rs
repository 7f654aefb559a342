//! One running generation on the engine thread: its pipeline state, its cache strategy (the
//! session's cached tensors), the events waiting for its client, and its running totals.
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use denoised_proto::v1 as pb;
use tonic::Status;

use super::model::LoadedModel;
use super::Job;
use crate::cache::hooks::StepStats;
use crate::cache::{self, CacheConfig, CacheStrategy};
use crate::error::ServiceError;
use crate::pipeline::flux::{FluxGeneration, FluxPipeline};
use crate::pipeline::preview::encode_image;

type Event = Result<pb::GenerateEvent, Status>;

pub(super) struct Running {
    job: Job,
    pub(super) model_index: usize,
    generation: FluxGeneration,
    strategy: Box<dyn CacheStrategy>,
    strategy_config: CacheConfig,
    /// Steps run by the current strategy since it was created (by a start, switch or reset).
    strategy_step: u32,
    /// Flags for the next Step event after a switch / reset took effect.
    switched: bool,
    reset: bool,
    outbox: VecDeque<Event>,
    /// Set once the last event (Completed or an error) is queued.
    done: bool,
    totals: Totals,
    denoise_started: Instant,
}

#[derive(Default)]
struct Totals {
    full_compute_steps: u32,
    blocks: u32,
    blocks_computed: u32,
    flops_total: f64,
    flops_saved: f64,
}

pub(super) struct TurnOutcome {
    pub progressed: bool,
    /// The generation is over (completed, failed, cancelled, or its client left): drop it.
    pub finished: bool,
}

/// Runs `f`, turning a libtorch panic (shape error, out of memory…) into a status for this
/// generation only.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, Status> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        tracing::error!(%message, "{what} failed");
        if message.contains("out of memory") {
            Status::resource_exhausted(format!("{what}: out of device memory"))
        } else {
            Status::internal(format!("{what} failed: {message}"))
        }
    })
}

impl Running {
    /// Encodes the prompt and draws the noise. On failure the error goes to the client and
    /// nothing is kept.
    pub(super) fn start(job: Job, model_index: usize, model: &LoadedModel) -> Option<Self> {
        let _span = job.span.clone().entered();
        let strategy_config = job.guard.session().cache();
        let prepared = cache::build_strategy(&strategy_config)
            .map_err(Status::from)
            .and_then(|strategy| {
                let generation =
                    guarded("prompt encoding", || model.pipeline.prepare(&job.params))?
                        .map_err(|e| Status::from(ServiceError::from(e)))?;
                Ok((strategy, generation))
            });
        let (strategy, generation) = match prepared {
            Ok(ok) => ok,
            Err(status) => {
                let _ = job.events.try_send(Err(status));
                return None;
            }
        };
        let session = job.guard.session();
        let p = &job.params;
        let started = pb::Started {
            generation_id: job.generation_id.clone(),
            session_id: session.id.clone(),
            settings: Some(pb::ResolvedSettings {
                model: model.info.name.clone(),
                prompt: p.prompt.clone(),
                negative_prompt: p.negative_prompt.clone().unwrap_or_default(),
                width: p.width as u32,
                height: p.height as u32,
                steps: p.steps as u32,
                guidance: p.guidance,
                true_cfg_scale: p.true_cfg_scale,
                seed: p.seed,
                cache: Some(strategy_config.to_proto()),
                device: model.info.device.clone(),
                dtype: model.info.dtype.clone(),
            }),
            setup_ms: job.received.elapsed().as_secs_f32() * 1000.0,
        };
        tracing::info!(generation_id = %job.generation_id, steps = p.steps, "generation started");
        Some(Self {
            job,
            model_index,
            generation,
            strategy,
            strategy_config,
            strategy_step: 0,
            switched: false,
            reset: false,
            outbox: VecDeque::from([Ok(event(pb::generate_event::Event::Started(started)))]),
            done: false,
            totals: Totals::default(),
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
            self.outbox
                .push_back(Err(Status::cancelled("generation cancelled")));
            self.done = true;
        } else if let Err(status) = self.step(model) {
            self.outbox.push_back(Err(status));
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

    /// Applies switch / reset requests made since the last step: either way the strategy
    /// restarts with empty state and its own step counter at 0.
    fn apply_pending(&mut self) -> Result<(), Status> {
        let pending = self.job.guard.session().take_pending();
        if let Some(config) = pending.switch_to {
            self.strategy = cache::build_strategy(&config)?;
            self.strategy_config = config;
            self.strategy_step = 0;
            self.switched = true;
        } else if pending.reset {
            self.strategy = cache::build_strategy(&self.strategy_config)?;
            self.strategy_step = 0;
            self.reset = true;
        }
        Ok(())
    }

    fn step(&mut self, model: &LoadedModel) -> Result<(), Status> {
        self.apply_pending()?;
        let index = self.generation.step_index();
        let span = tracing::info_span!(parent: &self.job.span, "step", index, strategy = self.strategy_config.kind().as_str_name());
        let _entered = span.enter();
        let started = Instant::now();
        let mut stats = StepStats::default();
        let out = guarded("denoising step", || {
            model
                .pipeline
                .step(&mut self.generation, self.strategy.as_mut(), &mut stats)
        })?;
        let step_time = started.elapsed();
        self.strategy_step += 1;
        let session = self.job.guard.session();
        let state_bytes = self.strategy.state_bytes();
        session.set_cache_bytes(state_bytes);

        let p = &self.job.params;
        let image_tokens = (p.width / model.info.size_multiple as usize)
            * (p.height / model.info.size_multiple as usize);
        let (flops, saved) =
            model
                .pipeline
                .transformer()
                .step_flops(image_tokens, p.max_sequence_length, &stats);
        let t = &mut self.totals;
        t.flops_total += flops;
        t.flops_saved += saved;
        t.blocks += stats.blocks.total();
        t.blocks_computed += stats.blocks.computed;
        if stats.full_compute() {
            t.full_compute_steps += 1;
        }

        let preview = self.preview(model, out.index, out.total)?;
        let step = pb::Step {
            index: out.index as u32,
            total: out.total as u32,
            timestep: out.timestep as f32,
            sigma: out.sigma as f32,
            cache: Some(pb::CacheActivity {
                strategy: self.strategy.kind() as i32,
                blocks: Some(counts(&stats.blocks)),
                attention: Some(counts(&stats.attention)),
                full_compute: stats.full_compute(),
                strategy_step: self.strategy_step,
                cache_state_bytes: state_bytes,
                strategy_switched: std::mem::take(&mut self.switched),
                cache_reset: std::mem::take(&mut self.reset),
            }),
            step_ms: step_time.as_secs_f32() * 1000.0,
            preview,
        };
        tracing::debug!(
            step_ms = step.step_ms,
            full = stats.full_compute(),
            "step done"
        );
        self.outbox
            .push_back(Ok(event(pb::generate_event::Event::Step(step))));

        if self.generation.is_done() {
            let completed = self.complete(model)?;
            self.outbox
                .push_back(Ok(event(pb::generate_event::Event::Completed(completed))));
            self.done = true;
        }
        Ok(())
    }

    fn preview(
        &self,
        model: &LoadedModel,
        index: usize,
        total: usize,
    ) -> Result<Option<pb::Image>, Status> {
        let opts = &self.job.preview;
        let mode = pb::PreviewMode::try_from(opts.mode).unwrap_or(pb::PreviewMode::None);
        let every = opts.every_n_steps.max(1) as usize;
        if matches!(mode, pb::PreviewMode::None | pb::PreviewMode::Unspecified)
            || (!index.is_multiple_of(every) && index + 1 != total)
        {
            return Ok(None);
        }
        let format = pb::ImageFormat::try_from(opts.format).unwrap_or(pb::ImageFormat::Png);
        let (w, h, rgb) = guarded("preview", || {
            let x0 = self.generation.predicted_clean();
            if mode == pb::PreviewMode::FullDecode {
                let image = model.pipeline.decode_unpacked(&x0);
                FluxPipeline::to_rgb8(&image)
            } else {
                model.latent_rgb.project(&x0)
            }
        })?;
        Ok(Some(encode_image(w, h, rgb, format, opts.max_edge)?))
    }

    fn complete(&self, model: &LoadedModel) -> Result<pb::Completed, Status> {
        let denoise = self.denoise_started.elapsed();
        let decode_started = Instant::now();
        let (w, h, rgb) = guarded("VAE decode", || {
            let image = model.pipeline.decode(&self.generation.latents());
            FluxPipeline::to_rgb8(&image)
        })?;
        let image = encode_image(w, h, rgb, self.job.output_format, 0)?;
        let decode = decode_started.elapsed();
        let t = &self.totals;
        let total: Duration = self.job.received.elapsed();
        tracing::info!(generation_id = %self.job.generation_id, total_ms = total.as_millis() as u64,
            full_compute_steps = t.full_compute_steps, "generation completed");
        Ok(pb::Completed {
            generation_id: self.job.generation_id.clone(),
            image: Some(image),
            total_ms: ms(total),
            denoise_ms: ms(denoise),
            decode_ms: ms(decode),
            steps: self.generation.num_steps() as u32,
            full_compute_steps: t.full_compute_steps,
            cache_hit_ratio: if t.blocks == 0 {
                0.0
            } else {
                (t.blocks - t.blocks_computed) as f32 / t.blocks as f32
            },
            estimated_flops_saved: t.flops_saved,
            estimated_flops_total: t.flops_total,
            calibrated_mag_ratios: self.strategy.calibrated_mag_ratios().unwrap_or_default(),
        })
    }
}

fn ms(d: Duration) -> f32 {
    d.as_secs_f32() * 1000.0
}

fn counts(c: &crate::cache::hooks::ModuleCounts) -> pb::ModuleCounts {
    pb::ModuleCounts {
        computed: c.computed,
        reused: c.reused,
        predicted: c.predicted,
        skipped: c.skipped,
    }
}

fn event(e: pb::generate_event::Event) -> pb::GenerateEvent {
    pb::GenerateEvent { event: Some(e) }
}
