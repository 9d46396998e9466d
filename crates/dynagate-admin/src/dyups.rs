//! The ngx_http_dyups_module interface, for tools written against it: plain text in and
//! out, nginx `server` syntax, `success` on writes. It shares the admin token and goes
//! through the same commands (validated, durable, revisioned) as the JSON API.
//!
//! - `GET /detail`: every upstream, its name then its servers, a blank line between.
//! - `GET /list`: upstream names, one per line. Both answer 204 when there is none.
//! - `GET /upstream/{name}`: the servers of one upstream (404 if unknown).
//! - `POST /upstream/{name}`: `server a:1 weight=2;server b:1;` replaces the servers,
//!   creating the upstream with default settings if missing, keeping its other settings.
//! - `DELETE /upstream/{name}`: 409 while routes use it.

use crate::errors::{text_response, ApiError, Body};
use crate::handlers::{blocking, execute, Call};
use crate::request::read_body;
use crate::router::{parse_query, Endpoint};
use dynagate_model::nginx::{parse_servers, render_servers};
use dynagate_model::Command;
use http::{Method, Response, StatusCode};

pub async fn handle(call: Call<'_>, endpoint: Endpoint) -> Result<Response<Body>, ApiError> {
    let Call {
        controller,
        registry: _,
        method,
        query,
        headers,
        body,
    } = call;
    parse_query(query, &[])?;
    match (endpoint, method) {
        (Endpoint::DyupsDetail, Method::GET) => {
            let config = blocking(controller, |c| Ok(c.config())).await?;
            let mut out = String::new();
            for (name, up) in config.upstreams.iter() {
                out.push_str(name);
                out.push('\n');
                out.push_str(&render_servers(&up.servers));
                out.push('\n');
            }
            Ok(listing(out))
        }
        (Endpoint::DyupsList, Method::GET) => {
            let config = blocking(controller, |c| Ok(c.config())).await?;
            let mut out = String::new();
            for name in config.upstreams.keys() {
                out.push_str(name);
                out.push('\n');
            }
            Ok(listing(out))
        }
        (Endpoint::DyupsUpstream(name), Method::GET) => {
            let lookup = name.clone();
            let up = blocking(controller, move |c| {
                Ok(c.config().upstream(&lookup).cloned())
            })
            .await?;
            let up =
                up.ok_or_else(|| ApiError::not_found(format!("upstream {name:?} does not exist")))?;
            Ok(text_response(StatusCode::OK, render_servers(&up.servers)))
        }
        (Endpoint::DyupsUpstream(name), Method::POST) => {
            let bytes = read_body(headers, body).await?;
            let text = std::str::from_utf8(&bytes)
                .map_err(|_| ApiError::bad_request("body: not UTF-8 text"))?;
            let servers = parse_servers(text)?;
            // One command: the servers are replaced atomically, other settings kept.
            execute(
                controller,
                Command::SetServers {
                    upstream: name,
                    servers,
                },
            )
            .await?;
            Ok(text_response(StatusCode::OK, "success"))
        }
        (Endpoint::DyupsUpstream(name), Method::DELETE) => {
            execute(controller, Command::DeleteUpstream { name }).await?;
            Ok(text_response(StatusCode::OK, "success"))
        }
        (endpoint, method) => Err(ApiError::method_not_allowed(&method, endpoint.allowed())),
    }
}

/// dyups answers 204 with no body when there is no upstream.
fn listing(out: String) -> Response<Body> {
    if out.is_empty() {
        text_response(StatusCode::NO_CONTENT, "")
    } else {
        text_response(StatusCode::OK, out)
    }
}
