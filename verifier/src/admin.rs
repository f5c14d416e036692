//! The admin HTTP API (loopback, bearer token) and its client used by the CLI.
//!
//! | method | path | body | does |
//! | --- | --- | --- | --- |
//! | GET | `/metrics` | | Prometheus text (no token: counters only) |
//! | GET | `/v1/nodes` | | enrolled nodes |
//! | POST | `/v1/join-tokens` | `{name, segments?, ttl_secs?}` | one-time join secret |
//! | POST | `/v1/revoke` | `{node}` | revoke (answered after the commit) |
//! | POST | `/v1/ban` | `{node}` | ban key and name (revokes too) |
//! | POST | `/v1/reissue` | `{a, b}` | new generation for one pair |
//! | POST | `/v1/policy/reload` | | re-read the policy file |
//! | GET | `/v1/audit?since=N` | | audit records after seq N |

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hopmesh_protocol::ids::NodeName;
use hopmesh_protocol::secret::ct_eq;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Shared;
use crate::authority::{AdminError, NodeRef};

/// Default join-secret lifetime: one hour.
pub const DEFAULT_JOIN_TTL: u64 = 3600;

/// An error answer: status and message, mapped from [`AdminError`] in one place.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        let status = match &e {
            AdminError::UnknownNode(_) => StatusCode::NOT_FOUND,
            AdminError::AlreadyRevoked(_) => StatusCode::CONFLICT,
            AdminError::BadRequest(_) | AdminError::Policy(_) | AdminError::ReissueLimit => {
                StatusCode::BAD_REQUEST
            }
            AdminError::Store(_) | AdminError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn node_ref(s: &str) -> Result<NodeRef, ApiError> {
    s.parse().map_err(bad)
}

/// The router; `/v1` requires `Authorization: Bearer <admin token>`.
pub fn router(shared: Arc<Shared>) -> Router {
    let v1 = Router::new()
        .route("/v1/nodes", get(nodes))
        .route("/v1/join-tokens", post(join_token))
        .route("/v1/revoke", post(revoke))
        .route("/v1/ban", post(ban))
        .route("/v1/reissue", post(reissue))
        .route("/v1/policy/reload", post(reload))
        .route("/v1/audit", get(audit))
        .route_layer(middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ));
    Router::new()
        .route("/metrics", get(metrics))
        .merge(v1)
        .with_state(shared)
}

async fn require_token(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if given.len() == shared.admin_token.len()
        && ct_eq(given.as_bytes(), shared.admin_token.as_bytes())
    {
        next.run(req).await
    } else {
        shared.authority().metrics().refused("admin_unauthorized");
        ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token".into(),
        )
        .into_response()
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> String {
    shared.metrics.render()
}

async fn nodes(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(json!(shared.authority().nodes_view()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinTokenReq {
    name: String,
    segments: Option<Vec<String>>,
    ttl_secs: Option<u64>,
}

async fn join_token(
    State(shared): State<Arc<Shared>>,
    Json(req): Json<JoinTokenReq>,
) -> Result<Json<Value>, ApiError> {
    let name = NodeName::new(&req.name).map_err(|e| bad(e.to_string()))?;
    let now = shared.now();
    let (secret, expires) = shared.authority().create_join_token(
        &name,
        req.segments,
        req.ttl_secs.unwrap_or(DEFAULT_JOIN_TTL),
        now,
    )?;
    Ok(Json(
        json!({"name": name.as_str(), "secret": hex::encode(secret.expose()), "expires_at": expires.as_secs()}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeReq {
    node: String,
}

async fn revoke(
    State(shared): State<Arc<Shared>>,
    Json(req): Json<NodeReq>,
) -> Result<Json<Value>, ApiError> {
    let target = node_ref(&req.node)?;
    let now = shared.now();
    let outcome = shared.authority().revoke(&target, now)?;
    Ok(Json(json!(outcome)))
}

async fn ban(
    State(shared): State<Arc<Shared>>,
    Json(req): Json<NodeReq>,
) -> Result<Json<Value>, ApiError> {
    let target = node_ref(&req.node)?;
    let now = shared.now();
    shared.authority().ban(&target, now)?;
    Ok(Json(json!({"banned": req.node})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairReq {
    a: String,
    b: String,
}

async fn reissue(
    State(shared): State<Arc<Shared>>,
    Json(req): Json<PairReq>,
) -> Result<Json<Value>, ApiError> {
    let (a, b) = (node_ref(&req.a)?, node_ref(&req.b)?);
    let now = shared.now();
    let outcome = shared.authority().reissue(&a, &b, now)?;
    Ok(Json(json!(outcome)))
}

async fn reload(State(shared): State<Arc<Shared>>) -> Result<Json<Value>, ApiError> {
    let changed = shared.reload_policy().map_err(|e| bad(e.to_string()))?;
    Ok(Json(json!({"changed": changed})))
}

#[derive(Deserialize)]
struct AuditQuery {
    since: Option<u64>,
}

async fn audit(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let path = shared.authority().audit_path().to_owned();
    let records = hopmesh_transport::audit::read_since(&path, q.since.unwrap_or(0))
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(Value::Array(records)))
}

/// A client of the admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    token: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    /// A client for the API at `addr` (`host:port`) with `token`.
    pub fn new(addr: &str, token: &str) -> Self {
        Self {
            base: format!("http://{addr}"),
            token: token.to_owned(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Sends a request; returns the JSON body, or an error with the server's message.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| e.to_string())?;
        let resp =
            self.client.request(req).await.map_err(|e| {
                format!("cannot reach the verifier admin API at {}: {e}", self.base)
            })?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        let value: Value = if path == "/metrics" {
            Value::String(text.clone())
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status.is_success() {
            Ok(value)
        } else {
            let msg = value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| value.to_string());
            Err(format!("{status}: {msg}"))
        }
    }
}
