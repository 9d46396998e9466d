use crate::harness::*;
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

const GIB: u64 = 1 << 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_with_bounded_memory() {
    let dir = TempDir::new("stream");
    let gw = Gateway::start(dir.path()).await;
    let a = Backend::start("a").await;
    gw.put_upstream("u", &[&a]).await;
    gw.put_route("r", &[], "/", "u").await;
    let baseline = gw.peak_rss_kib();

    // Upload: 1 GiB streamed in 64 KiB chunks, never held whole anywhere.
    let chunk = Bytes::from(vec![b'z'; 64 * 1024]);
    let stream = futures_util::stream::unfold(GIB, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            Some((
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(chunk)),
                left - 64 * 1024,
            ))
        }
    });
    let req = http::Request::post(format!("http://{}/upload", gw.proxy))
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap();
    let resp = gw.client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body), GIB.to_string());

    // Download: 1 GiB.
    let req = http::Request::get(format!("http://{}/download?bytes={GIB}", gw.proxy))
        .body(full(""))
        .unwrap();
    let resp = gw.client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            total += d.len() as u64;
        }
    }
    assert_eq!(total, GIB);

    let peak = gw.peak_rss_kib();
    assert!(
        peak < baseline + 64 * 1024,
        "gateway peak RSS grew from {baseline} KiB to {peak} KiB while streaming 2 GiB"
    );
}
