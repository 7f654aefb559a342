//! The `denoised.v1.Denoiser` gRPC service: request validation, sessions, and hand-off of
//! generations to the engine. Handlers never touch tensors; only this module (and the server
//! assembly) knows the wire types, and [`convert`] is where they meet the domain.
pub mod convert;
#[cfg(test)]
mod fuzz;
mod validate;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use denoised_proto::v1 as pb;
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::config::Limits;
use crate::engine::{EngineHandle, Job};
use crate::error::{echo, ServiceError, ServiceResult};
use crate::session::{NewSession, SessionStore};
use convert::cache::cache_config;

pub struct DenoiserService {
    engine: EngineHandle,
    sessions: Arc<SessionStore>,
    limits: Limits,
}

impl DenoiserService {
    pub fn new(engine: EngineHandle, sessions: Arc<SessionStore>, limits: Limits) -> Self {
        Self {
            engine,
            sessions,
            limits,
        }
    }

    fn session_id<'a>(&self, id: &'a str) -> ServiceResult<&'a str> {
        if id.is_empty() {
            Err(ServiceError::invalid("session_id", "required"))
        } else {
            Ok(id)
        }
    }

    fn generate_stream(
        &self,
        req: pb::GenerateRequest,
        deadline: Option<Instant>,
    ) -> ServiceResult<GenerateStream> {
        let received = Instant::now();
        // Either an open session, or an ephemeral one from the inline model + cache.
        let (session, served) = if !req.session_id.is_empty() {
            let session = self.sessions.get(&req.session_id)?;
            if !req.model.is_empty() && req.model != session.model {
                return Err(ServiceError::invalid(
                    "model",
                    format!("session `{}` runs model `{}`", session.id, session.model),
                ));
            }
            if req.cache.is_some() {
                return Err(ServiceError::invalid(
                    "cache",
                    "a session's cache is set with CreateSession or SetCacheStrategy",
                ));
            }
            let served = self.engine.model(&session.model)?;
            (Some(session), served)
        } else {
            if req.model.is_empty() {
                return Err(ServiceError::invalid(
                    "model",
                    "required when session_id is empty",
                ));
            }
            (None, self.engine.model(&req.model)?)
        };
        let resolved = validate::resolve_generate(&req, served, &self.limits)?;
        let model = &served.name;
        let session = match session {
            Some(s) => s,
            None => self.sessions.create(NewSession {
                model: model.clone(),
                cache: cache_config(req.cache.as_ref(), "cache", &self.limits)?,
                idle_timeout: None,
                labels: HashMap::from([("ephemeral".to_owned(), "true".to_owned())]),
                ephemeral: true,
            })?,
        };
        let guard = self.sessions.begin_generation(&session)?;
        let generation_id = uuid::Uuid::new_v4().to_string();
        let span = tracing::info_span!("generation", %generation_id, session_id = %session.id, model = %model);
        // One slot beyond the buffer stays free for the last event (see `Running::flush`).
        let (tx, rx) = tokio::sync::mpsc::channel(self.engine.stream_buffer() + 1);
        self.engine.submit(Job {
            generation_id,
            guard,
            model: model.clone(),
            request: resolved.request,
            preview: resolved.preview,
            record_modules: resolved.record_modules,
            output_format: resolved.output_format,
            video: resolved.video,
            events: tx,
            span,
            received,
            deadline,
        })?;
        Ok(Box::pin(ReceiverStream::new(rx).map(convert::event)))
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;

/// The call's `grpc-timeout` header (gRPC over HTTP/2: an integer of up to 8 digits and a unit,
/// H M S m u n), if present and well formed.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Runs a handler body, logging failures at the level they deserve and mapping them to a status.
fn respond<T>(result: ServiceResult<T>) -> Result<Response<T>, Status> {
    match result {
        Ok(v) => Ok(Response::new(v)),
        Err(e) => {
            match convert::code(&e) {
                tonic::Code::Internal | tonic::Code::Unavailable => {
                    tracing::error!(error = %e, "request failed")
                }
                _ => tracing::info!(error = %e, "request rejected"),
            }
            Err(e.into())
        }
    }
}

#[tonic::async_trait]
impl pb::denoiser_server::Denoiser for DenoiserService {
    #[tracing::instrument(skip_all)]
    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        respond(Ok(pb::ListModelsResponse {
            models: self
                .engine
                .models()
                .iter()
                .map(convert::model_info)
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(model))]
    async fn create_session(
        &self,
        req: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let req = req.into_inner();
        tracing::Span::current().record("model", echo(&req.model));
        respond((|| {
            if req.model.is_empty() {
                return Err(ServiceError::invalid("model", "required"));
            }
            self.engine.model(&req.model)?;
            let cache = cache_config(req.cache.as_ref(), "cache", &self.limits)?;
            let idle_timeout = (req.idle_timeout_seconds > 0)
                .then(|| Duration::from_secs(req.idle_timeout_seconds as u64));
            let session = self.sessions.create(NewSession {
                model: req.model.clone(),
                cache,
                idle_timeout,
                labels: req.labels.clone(),
                ephemeral: false,
            })?;
            tracing::info!(session_id = %session.id, "session created");
            Ok(convert::session(&session))
        })())
    }

    #[tracing::instrument(skip_all, fields(session_id = %echo(&req.get_ref().session_id)))]
    async fn get_session(
        &self,
        req: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let id = &req.get_ref().session_id;
        respond(
            self.session_id(id)
                .and_then(|id| self.sessions.get(id))
                .map(|s| convert::session(&s)),
        )
    }

    #[tracing::instrument(skip_all)]
    async fn list_sessions(
        &self,
        _: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        respond(Ok(pb::ListSessionsResponse {
            sessions: self
                .sessions
                .list()
                .iter()
                .map(|s| convert::session(s))
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(session_id = %echo(&req.get_ref().session_id)))]
    async fn close_session(
        &self,
        req: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        let id = &req.get_ref().session_id;
        respond(
            self.session_id(id)
                .and_then(|id| self.sessions.close(id))
                .map(|freed_cache_bytes| pb::CloseSessionResponse { freed_cache_bytes }),
        )
    }

    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        // A streaming call's deadline bounds the whole generation, not only its first message.
        let deadline = grpc_timeout(req.metadata()).map(|t| Instant::now() + t);
        let req = req.into_inner();
        let span = tracing::info_span!("generate_request", session_id = %echo(&req.session_id),
            model = %echo(&req.model));
        async { respond(self.generate_stream(req, deadline)) }
            .instrument(span)
            .await
    }

    #[tracing::instrument(skip_all, fields(session_id = %echo(&req.get_ref().session_id)))]
    async fn set_cache_strategy(
        &self,
        req: Request<pb::SetCacheStrategyRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let req = req.into_inner();
        respond((|| {
            let session = self.sessions.get(self.session_id(&req.session_id)?)?;
            let config = cache_config(req.cache.as_ref(), "cache", &self.limits)?;
            tracing::info!(
                strategy = config.kind().name(),
                running = session.is_generating(),
                "cache strategy set"
            );
            session.set_cache(config);
            Ok(convert::session(&session))
        })())
    }

    #[tracing::instrument(skip_all, fields(session_id = %echo(&req.get_ref().session_id)))]
    async fn reset_cache(
        &self,
        req: Request<pb::ResetCacheRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let id = &req.get_ref().session_id;
        respond(
            self.session_id(id)
                .and_then(|id| self.sessions.get(id))
                .map(|s| {
                    s.reset_cache();
                    convert::session(&s)
                }),
        )
    }

    #[tracing::instrument(skip_all, fields(session_id = %echo(&req.get_ref().session_id)))]
    async fn cancel_generation(
        &self,
        req: Request<pb::CancelGenerationRequest>,
    ) -> Result<Response<pb::CancelGenerationResponse>, Status> {
        let id = &req.get_ref().session_id;
        respond(
            self.session_id(id)
                .and_then(|id| self.sessions.get(id))
                .map(|s| pb::CancelGenerationResponse {
                    cancelled: s.cancel(),
                }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_protocol_spells_them() {
        let timeout = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in ["S", "5", "5x", "123456789S", "-1S"] {
            assert_eq!(timeout(bad), None, "{bad}");
        }
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }
}
