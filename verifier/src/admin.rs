//! The admin HTTP API (Unix socket 0600 or loopback TCP, bearer token) and its client used by
//! the CLI. Where it listens and how the client authenticates the server before sending the
//! token: [`crate::admin_addr`].
//!
//! | method | path | body | does |
//! | --- | --- | --- | --- |
//! | GET | `/metrics` | | Prometheus text (no token: counters only) |
//! | GET | `/v1/whoami?challenge=HEX` | | the server's proof that it holds the token (no token) |
//! | GET | `/v1/nodes` | | enrolled nodes |
//! | POST | `/v1/join-tokens` | `{name, segments?, ttl_secs?}` | one-time join secret |
//! | POST | `/v1/revoke` | `{node}` | revoke (answered after the commit) |
//! | POST | `/v1/ban` | `{node}` | ban key and name (revokes too) |
//! | POST | `/v1/reissue` | `{a, b}` | new generation for one pair |
//! | POST | `/v1/policy/reload` | | re-read the policy file |
//! | GET | `/v1/audit?since=N&limit=L` | | audit records after seq N, one capped page |

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
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Shared;
use crate::admin_addr::{AdminAddr, CHALLENGE_LEN, proof, proof_is_valid};
use crate::authority::{AdminError, NodeRef};
use crate::store::StoreError;

/// Rounds of a revoke (or ban) at a shared store, each of up to
/// [`crate::authority::REVOKE_ATTEMPTS`] attempts under the authority lock, while other
/// replicas keep taking the next revocation-list version first; between rounds the lock is
/// released for a random pause of [`REVOKE_BACKOFF_MS`], so that the replicas' attempts
/// spread out. Past the last round the answer is 503: nothing was revoked.
pub const REVOKE_ROUNDS: u32 = 4;

/// The pause between two revoke rounds, ms, drawn uniformly.
pub const REVOKE_BACKOFF_MS: std::ops::Range<u64> = 10..150;

/// Runs `op` (a revoke or a ban) for up to [`REVOKE_ROUNDS`] rounds while it loses the race
/// for the next revocation-list version.
async fn revoke_rounds<T: Send + 'static>(
    shared: &Arc<Shared>,
    op: impl Fn(&Shared) -> Result<T, AdminError> + Send + Sync + 'static,
) -> Result<T, AdminError> {
    let op = Arc::new(op);
    let mut round = 1;
    loop {
        let f = op.clone();
        match shared.unqueued(move |s| f(s)).await {
            Err(AdminError::Store(StoreError::StaleVersion { .. })) if round < REVOKE_ROUNDS => {
                round += 1;
                let pause = rand::random_range(REVOKE_BACKOFF_MS);
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
            }
            other => return other,
        }
    }
}

/// How long the CLI waits for the admin API (connect, proof and answer).
pub const CLIENT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

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
            // Nothing was done and another attempt (here later, or at another replica) may
            // succeed: the replica is fenced, the database did not answer in time, or other
            // replicas kept taking the next revocation-list version.
            AdminError::Store(
                StoreError::Fenced(_) | StoreError::Timeout(_) | StoreError::StaleVersion { .. },
            ) => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::Store(_) | AdminError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let text = match &e {
            AdminError::Store(StoreError::StaleVersion { .. }) => format!(
                "other replicas took the next revocation-list version first in each of \
                 {REVOKE_ROUNDS} rounds; nothing was revoked, retry ({e})"
            ),
            _ => e.to_string(),
        };
        Self(status, text)
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

/// The router; `/v1` requires `Authorization: Bearer <admin token>`, except `/v1/whoami`,
/// which proves to the client that this server holds the token for `addr`, where it listens.
pub fn router(shared: Arc<Shared>, addr: AdminAddr) -> Router {
    let whoami_route = Router::new()
        .route("/v1/whoami", get(whoami))
        .with_state((shared.clone(), Arc::new(addr)));
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
        .merge(whoami_route)
}

#[derive(Deserialize)]
struct WhoamiQuery {
    challenge: String,
}

async fn whoami(
    State((shared, addr)): State<(Arc<Shared>, Arc<AdminAddr>)>,
    Query(q): Query<WhoamiQuery>,
) -> Result<Json<Value>, ApiError> {
    let challenge = hex::decode(&q.challenge)
        .ok()
        .filter(|c| c.len() == CHALLENGE_LEN)
        .ok_or_else(|| bad(format!("challenge must be {CHALLENGE_LEN} bytes in hex")))?;
    let p = proof(&shared.admin_token, &addr, &challenge);
    Ok(Json(json!({"proof": hex::encode(p)})))
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
        shared.metrics.refused("admin_unauthorized");
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
    Json(json!(shared.unqueued(|s| s.authority().nodes_view()).await))
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
    let ttl = req.ttl_secs.unwrap_or(DEFAULT_JOIN_TTL);
    let token_name = name.clone();
    let (secret, expires) = shared
        .unqueued(move |s| {
            s.authority()
                .create_join_token(&token_name, req.segments, ttl, now)
        })
        .await?;
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
    let outcome = revoke_rounds(&shared, move |s| s.authority().revoke(&target, s.now())).await?;
    Ok(Json(json!(outcome)))
}

async fn ban(
    State(shared): State<Arc<Shared>>,
    Json(req): Json<NodeReq>,
) -> Result<Json<Value>, ApiError> {
    let target = node_ref(&req.node)?;
    revoke_rounds(&shared, move |s| s.authority().ban(&target, s.now())).await?;
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
    let outcome = shared
        .unqueued(move |s| s.authority().reissue(&a, &b, now))
        .await?;
    Ok(Json(json!(outcome)))
}

async fn reload(State(shared): State<Arc<Shared>>) -> Result<Json<Value>, ApiError> {
    let outcome = shared
        .unqueued(Shared::reload_policy)
        .await
        .map_err(|e| bad(e.to_string()))?;
    Ok(Json(json!(outcome)))
}

#[derive(Deserialize)]
struct AuditQuery {
    since: Option<u64>,
    limit: Option<usize>,
}

/// Response header set to `true` when `/v1/audit` was cut at the page cap and more records
/// follow: ask again with `since` = the last record's seq.
pub const AUDIT_MORE_HEADER: &str = "x-hopmesh-audit-more";

/// `/v1/audit?since=N&limit=L`: at most `min(L, MAX_PAGE_RECORDS)` records (and about
/// `MAX_PAGE_BYTES` of them) after seq N, read by streaming off the async workers; a cut page
/// is counted (`audit_pages_capped`) and flagged with [`AUDIT_MORE_HEADER`].
async fn audit(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<AuditQuery>,
) -> Result<Response, ApiError> {
    use hopmesh_transport::audit::{MAX_PAGE_BYTES, MAX_PAGE_RECORDS, read_page};
    let path = shared
        .unqueued(|s| s.authority().audit_path().to_owned())
        .await;
    let since = q.since.unwrap_or(0);
    let limit = q
        .limit
        .unwrap_or(MAX_PAGE_RECORDS)
        .clamp(1, MAX_PAGE_RECORDS);
    let page = tokio::task::spawn_blocking(move || read_page(&path, since, limit, MAX_PAGE_BYTES))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if page.more {
        shared.metrics.audit_pages_capped.inc();
    }
    let more = if page.more { "true" } else { "false" };
    Ok((
        [(AUDIT_MORE_HEADER, more)],
        Json(Value::Array(page.records)),
    )
        .into_response())
}

/// A client of the admin API: one connection per call; before the token is sent, the server
/// must prove it holds it (see [`crate::admin_addr`]).
#[derive(Debug, Clone)]
pub struct AdminClient {
    addr: Result<AdminAddr, String>,
    token: String,
}

/// Either kind of admin connection.
enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: hyper::Request<Full<Bytes>>,
) -> Result<(hyper::StatusCode, String), String> {
    // Between two requests on one HTTP/1 connection the sender must be ready again (the
    // connection task has to finish the previous exchange), or hyper cancels the request.
    sender.ready().await.map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

impl AdminClient {
    /// A client for the API at `addr` (as written to `admin.addr`: `unix:PATH` or a loopback
    /// `IP:PORT`) with `token`. An address that is neither fails every call.
    pub fn new(addr: &str, token: &str) -> Self {
        Self {
            addr: AdminAddr::parse(addr, std::path::Path::new(""))
                .map_err(|e| format!("bad admin address in admin.addr: {e}")),
            token: token.to_owned(),
        }
    }

    /// Sends a request; returns the JSON body, or an error with the server's message. Nothing
    /// is sent with the token unless the server first proved it holds the token.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let addr = self.addr.clone()?;
        tokio::time::timeout(CLIENT_DEADLINE, self.call_at(&addr, method, path, body))
            .await
            .map_err(|_| {
                format!(
                    "the verifier admin API at {addr} did not answer within {} s",
                    CLIENT_DEADLINE.as_secs()
                )
            })?
    }

    async fn call_at(
        &self,
        addr: &AdminAddr,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let unreachable = |e: std::io::Error| {
            format!("cannot reach the verifier admin API at {addr}: {e} (is the verifier running?)")
        };
        let conn = match addr {
            AdminAddr::Tcp(a) => Conn::Tcp(
                tokio::net::TcpStream::connect(a)
                    .await
                    .map_err(unreachable)?,
            ),
            AdminAddr::Unix(p) => Conn::Unix(
                tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(unreachable)?,
            ),
        };
        let mut sender = match conn {
            Conn::Tcp(s) => handshake(s).await?,
            Conn::Unix(s) => handshake(s).await?,
        };
        // 1. The server proves it holds the token, over the address we dialled.
        let mut challenge = [0u8; CHALLENGE_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut challenge)
            .map_err(|_| "OS random generator failed".to_owned())?;
        let req = hyper::Request::builder()
            .method("GET")
            .uri(format!("/v1/whoami?challenge={}", hex::encode(challenge)))
            .header("host", "hopmesh-verifier")
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let not_proven = || {
            format!(
                "the admin API at {addr} did not prove it holds this verifier's admin token; \
                 the token was not sent (a stale admin.addr from a verifier that stopped, with \
                 another process on its port?)"
            )
        };
        let (status, text) = send(&mut sender, req).await.map_err(|_| not_proven())?;
        let given = serde_json::from_str::<Value>(&text).ok().and_then(|v| {
            v.get("proof")
                .and_then(Value::as_str)
                .and_then(|p| hex::decode(p).ok())
        });
        match given {
            Some(p) if status.is_success() && proof_is_valid(&self.token, addr, &challenge, &p) => {
            }
            _ => return Err(not_proven()),
        }
        // 2. The request, with the token.
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "hopmesh-verifier")
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| e.to_string())?;
        let (status, text) = send(&mut sender, req)
            .await
            .map_err(|e| format!("the verifier admin API at {addr} failed: {e}"))?;
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

async fn handshake<S>(
    stream: S,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("admin API handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}
