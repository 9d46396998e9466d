//! nginx as a child process (`daemon off; master_process off;`) with a generated
//! configuration that routes like the gateway under test, in a temp prefix of its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    pub prefix: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.prefix);
    }
}

/// The nginx binary, if one is installed.
pub fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

pub struct Upstreams {
    pub main: SocketAddr,
    pub public: SocketAddr,
    pub probe: SocketAddr,
    pub refused: SocketAddr,
    pub hung: SocketAddr,
}

fn config(prefix: &std::path::Path, listen: SocketAddr, u: &Upstreams) -> String {
    let p = prefix.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
error_log {p}/error.log info;
pid {p}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    client_max_body_size 100m;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $http_host;
    proxy_read_timeout 5s;
    proxy_connect_timeout 1s;
    map $http_upgrade $connection_upgrade {{ default upgrade; "" ""; }}
    upstream main {{ server {main}; keepalive 16; }}
    upstream public {{ server {public}; keepalive 16; }}
    upstream probe {{ server {probe}; keepalive 16; }}
    upstream refused {{ server {refused} max_fails=0; }}
    upstream hung {{ server {hung} max_fails=0; }}
    server {{
        listen {listen} default_server;
        server_name _;
        location /anyhost/ {{ proxy_pass http://main; }}
        location / {{ return 404; }}
    }}
    server {{
        listen {listen};
        server_name corpus.test;
        location / {{ proxy_pass http://main; }}
        location /public {{ proxy_pass http://public; }}
    }}
    server {{
        listen {listen};
        server_name pub.test;
        location /public {{ proxy_pass http://public; }}
        location / {{ return 404; }}
    }}
    server {{
        listen {listen};
        server_name methods.test;
        location / {{
            limit_except GET {{ deny all; }}
            proxy_pass http://main;
        }}
    }}
    server {{
        listen {listen};
        server_name upgrade.test;
        location / {{
            proxy_pass http://main;
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
        }}
    }}
    server {{
        listen {listen};
        server_name uhost.test;
        location / {{ proxy_pass http://main; proxy_set_header Host internal.test; }}
    }}
    server {{
        listen {listen};
        server_name stream.test;
        location / {{ proxy_pass http://main; proxy_request_buffering off; }}
    }}
    server {{
        listen {listen};
        server_name orig.test;
        location /public {{ proxy_pass http://public; }}
        location / {{ return 404; }}
    }}
    server {{
        listen {listen};
        server_name refused.test;
        location / {{ proxy_pass http://refused; }}
    }}
    server {{
        listen {listen};
        server_name hung.test;
        location / {{ proxy_pass http://hung; proxy_read_timeout 300ms; }}
    }}
    server {{
        listen {listen};
        server_name empty.test;
        location / {{ return 503; }}
    }}
    server {{
        listen {listen};
        server_name probe.test;
        location / {{ proxy_pass http://probe; }}
    }}
}}
"#,
        main = u.main,
        public = u.public,
        probe = u.probe,
        refused = u.refused,
        hung = u.hung,
    )
}

impl Nginx {
    pub async fn start(bin: &std::path::Path, u: &Upstreams) -> Nginx {
        let prefix =
            std::env::temp_dir().join(format!("dynagate-desync-nginx-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&prefix);
        std::fs::create_dir_all(prefix.join("logs")).unwrap();
        // A free port: bound, read, released (nginx binds it again right after).
        let listen = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let conf = prefix.join("nginx.conf");
        std::fs::write(&conf, config(&prefix, listen, u)).unwrap();
        let child = Command::new(bin)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(prefix.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let mut nginx = Nginx {
            child,
            addr: listen,
            prefix,
        };
        for _ in 0..250 {
            if tokio::net::TcpStream::connect(listen).await.is_ok() {
                return nginx;
            }
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!(
                    "nginx exited ({status}); error.log:\n{}",
                    std::fs::read_to_string(nginx.prefix.join("error.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = nginx.child.kill();
        panic!(
            "nginx did not listen on {listen}; error.log:\n{}",
            std::fs::read_to_string(nginx.prefix.join("error.log")).unwrap_or_default()
        );
    }
}
