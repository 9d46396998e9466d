//! The admin API. (Being written.)

use dynagate_proxy::Controller;
use std::future::Future;
use std::sync::Arc;

/// Serves the admin API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    controller: Arc<Controller>,
    token: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let _ = (listener, controller, token);
    shutdown.await;
}
