//! Media repository, end to end against the real binary: matrix-sdk's media API (authenticated
//! `/_matrix/client/v1/media/*`) plus raw HTTP for the legacy paths, headers, limits and errors.

use crate::common;

use std::io::Cursor;
use std::time::Duration;

use common::{enc, Api, Node};
use image::{DynamicImage, ImageFormat, ImageReader};
use matrix_sdk::{
    media::{MediaFormat, MediaRequestParameters, MediaThumbnailSettings},
    ruma::{api::client::media::get_content_thumbnail::v3::Method, events::room::MediaSource, OwnedMxcUri, UInt},
    Client,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The default `limits.max_upload_bytes`.
const MAX_UPLOAD: usize = 50 * 1024 * 1024;

/// Deterministic pseudo-random bytes (xorshift), so content is not trivially compressible.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), format).expect("encode test image");
    out
}

/// A `w`×`h` PNG gradient with alpha.
fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbaImage::from_fn(w, h, |x, y| image::Rgba([(x % 251) as u8, (y % 241) as u8, 90, 200]));
    encode(DynamicImage::ImageRgba8(img), ImageFormat::Png)
}

/// A `w`×`h` JPEG gradient.
fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x % 256) as u8, 30, (y % 256) as u8]));
    encode(DynamicImage::ImageRgb8(img), ImageFormat::Jpeg)
}

/// Width, height and format of an encoded image (panics if it does not decode).
fn decode(bytes: &[u8]) -> (u32, u32, ImageFormat) {
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().expect("guess format");
    let format = reader.format().expect("thumbnail has a known image format");
    let img = reader.decode().expect("thumbnail decodes");
    (img.width(), img.height(), format)
}

async fn upload(client: &Client, mime: &mime::Mime, data: Vec<u8>) -> OwnedMxcUri {
    client.media().upload(mime, data, None).await.expect("upload").content_uri
}

/// `(server_name, media_id)` of an `mxc://` URI.
fn parts(uri: &OwnedMxcUri) -> (String, String) {
    let (server, id) = uri.parts().expect("valid mxc uri");
    (server.to_string(), id.to_owned())
}

async fn download(client: &Client, uri: &OwnedMxcUri) -> Vec<u8> {
    let request = MediaRequestParameters { source: MediaSource::Plain(uri.clone()), format: MediaFormat::File };
    client.media().get_media_content(&request, false).await.expect("download")
}

async fn thumbnail(client: &Client, uri: &OwnedMxcUri, method: Method, w: u32, h: u32) -> Vec<u8> {
    let settings = MediaThumbnailSettings::with_method(method, UInt::from(w), UInt::from(h));
    let request =
        MediaRequestParameters { source: MediaSource::Plain(uri.clone()), format: MediaFormat::Thumbnail(settings) };
    client.media().get_media_content(&request, false).await.expect("thumbnail")
}

/// A raw GET, returning status, headers and body bytes.
async fn raw_get(api: &Api, path: &str, token: Option<&str>) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = api.http.get(format!("{}{}", api.base_url, path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.bytes().await.expect("body").to_vec();
    (status, headers, body)
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// The Matrix error of a raw response body.
fn errcode(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["errcode"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Raw upload with `Content-Type` `ct` and an optional `?filename=`.
async fn raw_upload(api: &Api, token: &str, ct: &str, filename: Option<&str>, data: Vec<u8>) -> (u16, Value) {
    let mut url = format!("{}/_matrix/media/v3/upload", api.base_url);
    if let Some(f) = filename {
        url.push_str(&format!("?filename={}", enc(f)));
    }
    let res = api
        .http
        .post(url)
        .bearer_auth(token)
        .header("Content-Type", ct)
        .body(data)
        .send()
        .await
        .expect("upload request");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn upload_download_roundtrip_is_byte_exact_with_spec_headers() {
    let node = Node::start().await;
    let alice = common::register(&node, "alice", "pw-alice-1").await;
    let api = Api::new(&node);
    let token = common::token(&alice);

    // 3 MiB: well over the 1 MiB JSON body limit, which must not apply to media.
    let data = noise(3 * 1024 * 1024 + 17, 1);
    let uri = upload(&alice, &mime::APPLICATION_OCTET_STREAM, data.clone()).await;
    let (server, id) = parts(&uri);
    assert_eq!(server, common::hex_server_name(alice.user_id().expect("user id").as_str()));
    assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'), "media id {id}");
    assert!(download(&alice, &uri).await == data, "matrix-sdk download differs from the upload");

    // Raw authenticated download: headers per spec; non-safe types are attachments.
    let path = format!("/_matrix/client/v1/media/download/{server}/{id}");
    let (status, h, body) = raw_get(&api, &path, Some(&token)).await;
    assert_eq!(status, 200);
    assert!(body == data);
    assert_eq!(header(&h, "content-type"), "application/octet-stream");
    assert_eq!(header(&h, "content-length"), data.len().to_string());
    assert!(header(&h, "content-disposition").starts_with("attachment"), "{h:?}");
    assert_eq!(header(&h, "cross-origin-resource-policy"), "cross-origin");
    assert_eq!(header(&h, "access-control-allow-origin"), "*");
    assert!(header(&h, "content-security-policy").contains("sandbox"));

    // A safe type with a file name is inline, named; the /{fileName} form overrides the name.
    let (status, res) = raw_upload(&api, &token, "text/plain", Some("notes été.txt"), b"hello".to_vec()).await;
    assert_eq!(status, 200, "{res}");
    let uri: OwnedMxcUri = res["content_uri"].as_str().expect("content_uri").into();
    let (server, id) = parts(&uri);
    let (status, h, body) =
        raw_get(&api, &format!("/_matrix/client/v1/media/download/{server}/{id}"), Some(&token)).await;
    assert_eq!((status, body.as_slice()), (200, &b"hello"[..]));
    assert_eq!(header(&h, "content-type"), "text/plain");
    let cd = header(&h, "content-disposition");
    assert!(cd.starts_with("inline") && cd.contains("notes") && cd.contains("%C3%A9"), "{cd}");
    let (status, h, _) =
        raw_get(&api, &format!("/_matrix/client/v1/media/download/{server}/{id}/other.txt"), Some(&token)).await;
    assert_eq!(status, 200);
    assert!(header(&h, "content-disposition").contains("other.txt"), "{h:?}");

    // HTML is never inline.
    let (_, res) = raw_upload(&api, &token, "text/html", None, b"<script>alert(1)</script>".to_vec()).await;
    let uri: OwnedMxcUri = res["content_uri"].as_str().expect("content_uri").into();
    let (server, id) = parts(&uri);
    let (_, h, _) = raw_get(&api, &format!("/_matrix/client/v1/media/download/{server}/{id}"), Some(&token)).await;
    assert!(header(&h, "content-disposition").starts_with("attachment"), "{h:?}");

    // Another user can read it too (media is not access-controlled per room).
    let bob = common::register(&node, "bob", "pw-bob-1").await;
    let (server, id) = parts(&upload(&alice, &mime::IMAGE_PNG, png(3, 3)).await);
    let (status, _, body) =
        raw_get(&api, &format!("/_matrix/client/v1/media/download/{server}/{id}"), Some(&common::token(&bob))).await;
    assert_eq!((status, body), (200, png(3, 3)));
}

#[tokio::test]
async fn thumbnails_of_png_and_jpeg_have_bounded_sizes() {
    let node = Node::start().await;
    let alice = common::register(&node, "alice", "pw-alice-1").await;
    let api = Api::new(&node);
    let token = common::token(&alice);

    let png_uri = upload(&alice, &mime::IMAGE_PNG, png(1200, 900)).await;
    let jpeg_uri = upload(&alice, &mime::IMAGE_JPEG, jpeg(1000, 600)).await;

    // crop: exactly the requested box (it is one of the spec's sizes).
    assert_eq!(decode(&thumbnail(&alice, &png_uri, Method::Crop, 96, 96).await), (96, 96, ImageFormat::Png));
    assert_eq!(decode(&thumbnail(&alice, &jpeg_uri, Method::Crop, 32, 32).await), (32, 32, ImageFormat::Jpeg));
    // crop keeps the requested aspect ratio and is at least as large as asked.
    let (w, h, _) = decode(&thumbnail(&alice, &png_uri, Method::Crop, 64, 48).await);
    assert!(w >= 64 && h >= 48 && w * 48 == h * 64 && w <= 800, "{w}x{h}");
    // scale: the image's aspect ratio, within the box, at least the asked size on one side.
    let (w, h, f) = decode(&thumbnail(&alice, &png_uri, Method::Scale, 320, 240).await);
    assert_eq!((w, h, f), (320, 240, ImageFormat::Png));
    let (w, h, f) = decode(&thumbnail(&alice, &jpeg_uri, Method::Scale, 640, 480).await);
    assert_eq!((w, h, f), (640, 384, ImageFormat::Jpeg));
    // Huge requests are bounded; tiny images are not enlarged.
    let (w, h, _) = decode(&thumbnail(&alice, &png_uri, Method::Scale, 10_000, 10_000).await);
    assert!(w <= 800 && h <= 600 && w >= 320, "{w}x{h}");
    let tiny = upload(&alice, &mime::IMAGE_PNG, png(20, 10)).await;
    assert_eq!(decode(&thumbnail(&alice, &tiny, Method::Scale, 320, 240).await), (20, 10, ImageFormat::Png));

    // A GIF gives a PNG of its first frame.
    let gif = encode(
        DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(200, 100, image::Rgba([9, 9, 9, 255]))),
        ImageFormat::Gif,
    );
    let gif_uri = upload(&alice, &"image/gif".parse().expect("mime"), gif).await;
    assert_eq!(decode(&thumbnail(&alice, &gif_uri, Method::Scale, 96, 96).await), (96, 48, ImageFormat::Png));

    // Raw: headers, and the cached answer is the same as the first.
    let (server, id) = parts(&png_uri);
    let path = format!("/_matrix/client/v1/media/thumbnail/{server}/{id}?width=96&height=96&method=crop&animated=true");
    let (status, h, first) = raw_get(&api, &path, Some(&token)).await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "content-type"), "image/png");
    assert!(header(&h, "content-disposition").starts_with("inline"));
    assert_eq!(header(&h, "cross-origin-resource-policy"), "cross-origin");
    let (_, _, again) = raw_get(&api, &path, Some(&token)).await;
    assert!(first == again);
    assert_eq!(decode(&first), (96, 96, ImageFormat::Png));

    // Not an image → 400 M_UNKNOWN (as Synapse); bad parameters → 400.
    let (status, res) = raw_upload(&api, &token, "text/plain", None, b"just text".to_vec()).await;
    assert_eq!(status, 200);
    let (server, id) = parts(&res["content_uri"].as_str().expect("content_uri").into());
    let path = format!("/_matrix/client/v1/media/thumbnail/{server}/{id}?width=32&height=32");
    let (status, _, body) = raw_get(&api, &path, Some(&token)).await;
    assert_eq!((status, errcode(&body).as_str()), (400, "M_UNKNOWN"));
    let (server, id) = parts(&png_uri);
    for (query, code) in [
        ("height=32", "M_MISSING_PARAM"),
        ("width=-3&height=32", "M_INVALID_PARAM"),
        ("width=32&height=32&method=blur", "M_INVALID_PARAM"),
    ] {
        let path = format!("/_matrix/client/v1/media/thumbnail/{server}/{id}?{query}");
        let (status, _, body) = raw_get(&api, &path, Some(&token)).await;
        assert_eq!((status, errcode(&body).as_str()), (400, code), "{query}");
    }
    // A corrupt image → 400 M_UNKNOWN, not a 500.
    let mut broken = png(50, 50);
    broken.truncate(60);
    let (_, res) = raw_upload(&api, &token, "image/png", None, broken).await;
    let (server, id) = parts(&res["content_uri"].as_str().expect("content_uri").into());
    let path = format!("/_matrix/client/v1/media/thumbnail/{server}/{id}?width=32&height=32");
    let (status, _, body) = raw_get(&api, &path, Some(&token)).await;
    assert_eq!((status, errcode(&body).as_str()), (400, "M_UNKNOWN"));
}

#[tokio::test]
async fn legacy_unauthenticated_paths_work() {
    let node = Node::start().await;
    let alice = common::register(&node, "alice", "pw-alice-1").await;
    let api = Api::new(&node);
    let token = common::token(&alice);
    let data = png(400, 300);
    let (status, res) = raw_upload(&api, &token, "image/png", Some("pic.png"), data.clone()).await;
    assert_eq!(status, 200, "{res}");
    let (server, id) = parts(&res["content_uri"].as_str().expect("content_uri").into());

    for v in ["v3", "r0"] {
        let (status, h, body) = raw_get(&api, &format!("/_matrix/media/{v}/download/{server}/{id}"), None).await;
        assert_eq!(status, 200, "{v}");
        assert!(body == data, "{v}");
        assert_eq!(header(&h, "content-type"), "image/png");
        assert!(header(&h, "content-disposition").contains("pic.png"));
        let path = format!("/_matrix/media/{v}/download/{server}/{id}/renamed.png");
        let (status, h, body) = raw_get(&api, &path, None).await;
        assert!(status == 200 && body == data, "{v}");
        assert!(header(&h, "content-disposition").contains("renamed.png"));
        let path = format!("/_matrix/media/{v}/thumbnail/{server}/{id}?width=32&height=32&method=crop");
        let (status, _, body) = raw_get(&api, &path, None).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(decode(&body), (32, 32, ImageFormat::Png));
    }
    // Legacy upload path with r0, and legacy config (authenticated).
    let res = api.http.post(format!("{}/_matrix/media/r0/upload", api.base_url)).bearer_auth(&token).body("x").send();
    assert_eq!(res.await.expect("r0 upload").status().as_u16(), 200);
    for path in ["/_matrix/media/v3/config", "/_matrix/media/r0/config", "/_matrix/client/v1/media/config"] {
        let res = Api::with_token(&node, &token).get(path).await.ok();
        assert_eq!(res["m.upload.size"], MAX_UPLOAD as u64, "{path}");
    }
}

#[tokio::test]
async fn v1_media_requires_auth_and_unknown_media_is_404() {
    let node = Node::start().await;
    let alice = common::register(&node, "alice", "pw-alice-1").await;
    let api = Api::new(&node);
    let token = common::token(&alice);
    let uri = upload(&alice, &mime::IMAGE_PNG, png(10, 10)).await;
    let (server, id) = parts(&uri);

    let authed = [
        format!("/_matrix/client/v1/media/download/{server}/{id}"),
        format!("/_matrix/client/v1/media/download/{server}/{id}/a.png"),
        format!("/_matrix/client/v1/media/thumbnail/{server}/{id}?width=32&height=32"),
        "/_matrix/client/v1/media/config".to_owned(),
        "/_matrix/client/v1/media/preview_url?url=https%3A%2F%2Fexample.org".to_owned(),
    ];
    for path in &authed {
        let (status, _, body) = raw_get(&api, path, None).await;
        assert_eq!((status, errcode(&body).as_str()), (401, "M_MISSING_TOKEN"), "{path}");
        let (status, _, body) = raw_get(&api, path, Some("not-a-token")).await;
        assert_eq!((status, errcode(&body).as_str()), (401, "M_UNKNOWN_TOKEN"), "{path}");
        let (status, _, _) = raw_get(&api, path, Some(&token)).await;
        assert_eq!(status, 200, "{path}");
    }
    // Access token in the query string also works (older clients do that for media).
    let (status, _, _) = raw_get(&api, &format!("{}?access_token={token}", authed[0]), None).await;
    assert_eq!(status, 200);
    let res = api.http.post(format!("{}/_matrix/media/v3/upload", api.base_url)).body("x").send().await.expect("post");
    assert_eq!(res.status().as_u16(), 401);

    // Unknown ids, ids of other servers, malformed ids: 404 M_NOT_FOUND on every path.
    let other = "a".repeat(64);
    for (srv, mid) in [(server.as_str(), "doesNotExist"), (other.as_str(), id.as_str()), (server.as_str(), "bad.id")] {
        for path in [
            format!("/_matrix/client/v1/media/download/{srv}/{mid}"),
            format!("/_matrix/client/v1/media/thumbnail/{srv}/{mid}?width=32&height=32"),
            format!("/_matrix/media/v3/download/{srv}/{mid}"),
            format!("/_matrix/media/v3/thumbnail/{srv}/{mid}?width=32&height=32"),
        ] {
            let (status, _, body) = raw_get(&api, &path, Some(&token)).await;
            assert_eq!((status, errcode(&body).as_str()), (404, "M_NOT_FOUND"), "{path}");
        }
    }

    // URL previews: no internet, so an honest empty preview.
    let res =
        Api::with_token(&node, &token).get("/_matrix/client/v1/media/preview_url?url=https%3A%2F%2Fexample.org").await;
    assert_eq!(res.ok(), serde_json::json!({}));
}

/// How [`socket_upload`] sends its body.
#[derive(Clone, Copy, PartialEq)]
enum Framing {
    /// `Transfer-Encoding: chunked`: no length up front, the server must count as it streams.
    Chunked,
    /// Only the headers, with `Content-Length: total`; the body is never sent.
    LengthOnly,
}

/// Sends `POST /_matrix/media/v3/upload` of `total` bytes over a raw socket (so the test sees
/// the answer even when the server refuses before reading the body); returns the response's
/// status and body.
async fn socket_upload(node: &Node, token: &str, total: usize, framing: Framing) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", node.port)).await.expect("connect");
    let framing_header = match framing {
        Framing::Chunked => "Transfer-Encoding: chunked".to_owned(),
        Framing::LengthOnly => format!("Content-Length: {total}"),
    };
    let head = format!(
        "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/octet-stream\r\n{framing_header}\r\n\r\n"
    );
    let (mut rd, mut wr) = stream.split();
    let write = async {
        wr.write_all(head.as_bytes()).await?;
        if framing == Framing::LengthOnly {
            return Ok(());
        }
        let chunk = vec![7u8; 1 << 20];
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min(total - sent);
            wr.write_all(format!("{n:x}\r\n").as_bytes()).await?;
            wr.write_all(&chunk[..n]).await?;
            wr.write_all(b"\r\n").await?;
            sent += n;
        }
        wr.write_all(b"0\r\n\r\n").await?;
        Ok::<_, std::io::Error>(())
    };
    let read = async {
        let mut buf = Vec::new();
        // The server may answer (and close) before the whole body is sent.
        let _ = tokio::time::timeout(Duration::from_secs(60), async {
            let mut tmp = [0u8; 4096];
            loop {
                match rd.read(&mut tmp).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
                let text = String::from_utf8_lossy(&buf);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                        })
                        .and_then(|v| v.parse::<usize>().ok());
                    if len.is_some_and(|len| body.len() >= len) {
                        break;
                    }
                }
            }
        })
        .await;
        buf
    };
    let (_, buf) = tokio::join!(write, read);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn uploads_over_the_limit_are_413_too_large() {
    let node = Node::start().await;
    let alice = common::register(&node, "alice", "pw-alice-1").await;
    let api = Api::new(&node);
    let token = common::token(&alice);

    // Declared too large (Content-Length): refused without waiting for the body.
    let (status, res) = socket_upload(&node, &token, MAX_UPLOAD + 1, Framing::LengthOnly).await;
    assert_eq!((status, res["errcode"].as_str()), (413, Some("M_TOO_LARGE")), "{res}");
    // Streamed without a length: refused once the count passes the limit.
    let (status, res) = socket_upload(&node, &token, MAX_UPLOAD + 1, Framing::Chunked).await;
    assert_eq!((status, res["errcode"].as_str()), (413, Some("M_TOO_LARGE")), "{res}");
    // Exactly the limit is fine, streamed too.
    let (status, res) = socket_upload(&node, &token, MAX_UPLOAD, Framing::Chunked).await;
    assert_eq!(status, 200, "{res}");
    // And with a Content-Length (reqwest), byte-exact.
    let data = noise(MAX_UPLOAD, 3);
    let (status, res) = raw_upload(&api, &token, "application/octet-stream", None, data.clone()).await;
    assert_eq!(status, 200, "{res}");
    let (server, id) = parts(&res["content_uri"].as_str().expect("content_uri").into());
    let (status, _, body) =
        raw_get(&api, &format!("/_matrix/client/v1/media/download/{server}/{id}"), Some(&token)).await;
    assert!(status == 200 && body == data, "status {status}");
    // No partial uploads are left behind.
    let tmp = std::fs::read_dir(node.data_dir.join("media").join("tmp")).expect("media tmp dir");
    assert_eq!(tmp.count(), 0);
}

#[tokio::test]
async fn media_survives_restart_and_crash() {
    let mut node = Node::start().await;
    let alice = common::register(&node, "alice", "pw-alice-1").await;
    let api = Api::new(&node);
    let token = common::token(&alice);
    let data = noise(200_000, 7);
    let uri = upload(&alice, &mime::APPLICATION_OCTET_STREAM, data.clone()).await;
    let (server, id) = parts(&uri);
    let thumb_src = upload(&alice, &mime::IMAGE_PNG, png(500, 500)).await;
    let (_, thumb_id) = parts(&thumb_src);

    node.restart().await;
    let (status, _, body) =
        raw_get(&api, &format!("/_matrix/client/v1/media/download/{server}/{id}"), Some(&token)).await;
    assert!(status == 200 && body == data, "status {status}");

    // A 200 means durable: SIGKILL right after the upload answer, then read it back.
    let data2 = noise(100_000, 9);
    let (status, res) = raw_upload(&api, &token, "application/pdf", Some("doc.pdf"), data2.clone()).await;
    assert_eq!(status, 200);
    node.kill();
    node.restart().await;
    let (server2, id2) = parts(&res["content_uri"].as_str().expect("content_uri").into());
    let (status, h, body) =
        raw_get(&api, &format!("/_matrix/client/v1/media/download/{server2}/{id2}"), Some(&token)).await;
    assert!(status == 200 && body == data2, "status {status}");
    assert_eq!(header(&h, "content-type"), "application/pdf");
    assert!(
        header(&h, "content-disposition").starts_with("attachment")
            && header(&h, "content-disposition").contains("doc.pdf")
    );
    let path = format!("/_matrix/client/v1/media/thumbnail/{server}/{thumb_id}?width=96&height=96&method=crop");
    let (status, _, body) = raw_get(&api, &path, Some(&token)).await;
    assert_eq!(status, 200);
    assert_eq!(decode(&body), (96, 96, ImageFormat::Png));
}

#[tokio::test]
async fn async_upload_create_then_put() {
    let node = Node::start().await;
    let alice = common::register(&node, "alice", "pw-alice-1").await;
    let bob = common::register(&node, "bob", "pw-bob-1").await;
    let api = Api::new(&node);
    let token = common::token(&alice);

    let pre = alice.media().create_content_uri().await.expect("create");
    let uri = pre.uri.clone();
    let (server, id) = parts(&uri);
    // Not uploaded yet: a short wait ends in 504 M_NOT_YET_UPLOADED.
    let path = format!("/_matrix/client/v1/media/download/{server}/{id}?timeout_ms=100");
    let (status, _, body) = raw_get(&api, &path, Some(&token)).await;
    assert_eq!((status, errcode(&body).as_str()), (504, "M_NOT_YET_UPLOADED"));

    // A download that waits gets the content as soon as it is uploaded.
    let waiting = {
        let api = api.clone();
        let token = token.clone();
        let path = format!("/_matrix/client/v1/media/download/{server}/{id}?timeout_ms=30000");
        tokio::spawn(async move { raw_get(&api, &path, Some(&token)).await })
    };
    // Bob may not upload to Alice's URI.
    let put = format!("{}/_matrix/media/v3/upload/{server}/{id}", api.base_url);
    let res = api.http.put(&put).bearer_auth(common::token(&bob)).body("evil").send().await.expect("put");
    assert_eq!(res.status().as_u16(), 403);
    alice.media().upload_preallocated(pre, &mime::TEXT_PLAIN, b"later".to_vec()).await.expect("upload_preallocated");
    let (status, _, body) = waiting.await.expect("join");
    assert_eq!((status, body.as_slice()), (200, &b"later"[..]));
    assert!(download(&alice, &uri).await == b"later");

    // Uploading twice: 409 M_CANNOT_OVERWRITE_MEDIA.
    let res = api.http.put(&put).bearer_auth(&token).body("again").send().await.expect("put");
    assert_eq!(res.status().as_u16(), 409);
    assert_eq!(errcode(&res.bytes().await.expect("body")), "M_CANNOT_OVERWRITE_MEDIA");
    // Unknown id: 404.
    let res =
        api.http.put(format!("{}/_matrix/media/v3/upload/{server}/nope", api.base_url)).bearer_auth(&token).body("x");
    assert_eq!(res.send().await.expect("put").status().as_u16(), 404);

    // Reservations are bounded per user (default 10 open at once; the completed one is not).
    for _ in 0..10 {
        alice.media().create_content_uri().await.expect("create within the limit");
    }
    let res = Api::with_token(&node, &token).post("/_matrix/media/v1/create", &serde_json::json!({})).await;
    res.expect_err(429, "M_LIMIT_EXCEEDED");
}

#[tokio::test]
async fn cors_preflight_and_headers_everywhere() {
    let node = Node::start().await;
    let api = Api::new(&node);
    for path in [
        "/_matrix/client/v1/media/download/x/y",
        "/_matrix/media/v3/upload",
        "/_matrix/client/v3/sync",
        "/no/such/path",
        "/_matrix/client/v3/rooms/!r/send/m.room.message/1",
    ] {
        let res = api
            .http
            .request(reqwest::Method::OPTIONS, format!("{}{}", api.base_url, path))
            .header("Origin", "https://app.element.io")
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "authorization,content-type")
            .send()
            .await
            .expect("OPTIONS");
        assert!(res.status().is_success(), "{path}: {}", res.status());
        let h = res.headers();
        assert_eq!(header(h, "access-control-allow-origin"), "*", "{path}");
        let methods = header(h, "access-control-allow-methods");
        for m in ["GET", "POST", "PUT", "DELETE", "OPTIONS"] {
            assert!(methods.contains(m), "{path}: {methods}");
        }
        let allowed = header(h, "access-control-allow-headers").to_ascii_lowercase();
        for name in ["authorization", "content-type", "x-requested-with"] {
            assert!(allowed.contains(name), "{path}: {allowed}");
        }
    }
    // Ordinary responses, errors included, carry the headers too.
    for path in ["/_matrix/client/versions", "/no/such/path", "/_matrix/client/v3/account/whoami"] {
        let (_, h, _) = raw_get(&api, path, None).await;
        assert_eq!(header(&h, "access-control-allow-origin"), "*", "{path}");
        assert!(header(&h, "access-control-allow-headers").to_ascii_lowercase().contains("authorization"));
    }
}

#[tokio::test]
async fn client_startup_endpoints_answer() {
    let node = Node::start().await;
    let alice = common::register(&node, "alice", "pw-alice-1").await;
    let api = Api::as_client(&node, &alice);
    assert_eq!(api.get("/_matrix/client/v3/thirdparty/protocols").await.ok(), serde_json::json!({}));
    assert_eq!(api.get("/_matrix/client/v3/voip/turnServer").await.ok(), serde_json::json!({}));
    let rtc = api.get("/_matrix/client/unstable/org.matrix.msc4143/rtc/transports").await.ok();
    assert_eq!(rtc, serde_json::json!({"rtc_transports": []}));
    Api::new(&node).get("/_matrix/client/v1/rtc/transports").await.expect_err(401, "M_MISSING_TOKEN");
    let wk = Api::new(&node).get("/.well-known/matrix/client").await.ok();
    assert_eq!(wk["m.homeserver"]["base_url"], node.base_url);
    Api::new(&node).get("/_matrix/client/v3/voip/turnServer").await.expect_err(401, "M_MISSING_TOKEN");
}
