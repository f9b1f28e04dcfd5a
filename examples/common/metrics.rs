//! `GET /metrics` for the examples: tower-mesh's `mesh_*` metrics (see the crate docs'
//! "Metrics" section) in Prometheus text, through `metrics-exporter-prometheus` rendered
//! on request (no listener of its own). `METRICS=off` installs no recorder, so every
//! recording is a no-op and `/metrics` answers 404: the overhead of metrics being on is
//! measured against that.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Installs the Prometheus recorder, unless `METRICS=off`; call it before the first
/// client connects (the mesh registers its handles then). Needs a Tokio runtime.
pub(crate) fn install() -> Option<PrometheusHandle> {
    if std::env::var("METRICS").is_ok_and(|value| value == "off") {
        tracing::info!("METRICS=off: no metrics recorder installed");
        return None;
    }
    // Buckets rather than the exporter's default summaries: histograms of several
    // instances can then be added up.
    let seconds = [
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0, 2.5,
    ];
    let recipients = [
        0.0, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
        .and_then(|builder| {
            builder
                .set_buckets_for_metric(Matcher::Full("mesh_fanout_recipients".into()), &recipients)
        })
        .and_then(PrometheusBuilder::install_recorder);
    match handle {
        Ok(handle) => {
            // Histogram samples wait in the recorder until upkeep (or a scrape) folds them
            // into their buckets: without it they would pile up between scrapes.
            let upkeep = handle.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(5));
                loop {
                    every.tick().await;
                    upkeep.run_upkeep();
                }
            });
            Some(handle)
        }
        Err(err) => {
            tracing::warn!(%err, "could not install the metrics recorder");
            None
        }
    }
}

/// The `GET /metrics` handler: Prometheus text, or 404 when no recorder is installed.
pub(crate) async fn render(handle: Option<PrometheusHandle>) -> impl IntoResponse {
    match handle {
        Some(handle) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are off (METRICS=off)").into_response(),
    }
}
