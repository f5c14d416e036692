//! The control socket (`DATA_DIR/ctl.sock`, mode 0600): `show` returns the node's exact state
//! as JSON, like `wg show`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

/// What `show` answers: the node's state as JSON.
pub type ShowFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Serves the control socket in `data_dir` until shutdown.
pub async fn serve(
    data_dir: std::path::PathBuf,
    show: ShowFn,
    mut shutdown: watch::Receiver<bool>,
) {
    let path = crate::datadir::NodeDir::new(&data_dir).ctl();
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, path = %path.display(), "control socket unavailable");
            return;
        }
    };
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = shutdown.changed() => return,
        };
        let Ok((stream, _)) = conn else { continue };
        let show = show.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            // One short line is all a request is.
            let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(r, 1024));
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let reply = match line.trim() {
                "show" => show(),
                other => {
                    serde_json::json!({"error": format!("unknown command `{other}`; try `show`")})
                }
            };
            let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
        });
    }
}

/// Sends `command` to the control socket in `data_dir` and returns the JSON reply.
pub async fn request(data_dir: &Path, command: &str) -> std::io::Result<serde_json::Value> {
    let path = crate::datadir::NodeDir::new(data_dir).ctl();
    let mut stream = UnixStream::connect(&path).await?;
    stream.write_all(format!("{command}\n").as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).await?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
