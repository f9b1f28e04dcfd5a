//! axum integration: take the [`Mesh`] handle as an argument of an axum HTTP handler.
//!
//! [`MeshService`](crate::MeshService) puts the handle in the extensions of every request it
//! passes to the inner service, so a route behind the layer can push to mesh clients:
//!
//! ```
//! use axum::{routing::post, Router};
//! use tower_mesh::Mesh;
//!
//! async fn announce(mesh: Mesh, body: String) -> &'static str {
//!     match mesh.broadcast("announcement", &body).await {
//!         Ok(()) => "sent",
//!         Err(_) => "mesh unavailable",
//!     }
//! }
//!
//! let (mesh_layer, _mesh) = Mesh::builder().build();
//! let app: Router = Router::new().route("/announce", post(announce)).layer(mesh_layer);
//! ```

use axum::extract::FromRequestParts;
use http::request::Parts;
use http::StatusCode;

use crate::mesh::Mesh;

impl<S: Send + Sync> FromRequestParts<S> for Mesh {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Mesh>().cloned().ok_or((
            StatusCode::INTERNAL_SERVER_ERROR,
            "the Mesh extractor needs the route to be behind a MeshLayer",
        ))
    }
}
