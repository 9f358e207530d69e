//! One tracing span per CSI call, carrying the method and the volume id,
//! so every log line of a call says which call and volume it belongs to.

use std::future::Future;

use tracing::Instrument;

/// The span of one call.
pub fn call_span(method: &'static str, volume_id: &str) -> tracing::Span {
    tracing::info_span!("csi", method, volume = volume_id)
}

/// Runs `fut` in the span of `method` on `volume_id`, logging its outcome
/// (errors at warn with their gRPC code).
pub async fn traced<T, F>(
    method: &'static str,
    volume_id: &str,
    fut: F,
) -> Result<T, crate::CsiError>
where
    F: Future<Output = Result<T, crate::CsiError>>,
{
    let span = call_span(method, volume_id);
    async move {
        let r = fut.await;
        match &r {
            Ok(_) => tracing::debug!("ok"),
            Err(e) => tracing::warn!(code = ?e.code(), "{e}"),
        }
        r
    }
    .instrument(span)
    .await
}
