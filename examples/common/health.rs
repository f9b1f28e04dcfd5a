//! `GET /health` for the examples: `200 ok` while the mesh's backend answers and knows
//! this instance, else `503` with the reason (Redis unreachable, or the instance's
//! registration lost while it registers again), so that a load balancer stops sending
//! new clients to an instance that cannot serve them.

use axum::http::StatusCode;
use tower_mesh::Mesh;

/// The handler; the route must be behind the `MeshLayer` (which hands it the `Mesh`).
pub(crate) async fn health(mesh: Mesh) -> (StatusCode, String) {
    match mesh.health().await.problem {
        None => (StatusCode::OK, "ok".to_owned()),
        Some(problem) => (StatusCode::SERVICE_UNAVAILABLE, problem),
    }
}
