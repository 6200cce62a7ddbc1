//! Thumbnails of PNG, JPEG, GIF (first frame) and WebP images, with the `image` crate.
//!
//! Requested sizes are quantised so that each content has few distinct thumbnails:
//! - `scale` fits the image into the smallest of the spec's suggested boxes (32×32, 96×96,
//!   320×240, 640×480, 800×600) that holds the requested box, or the largest; it keeps the
//!   image's aspect ratio.
//! - `crop` keeps the *requested* aspect ratio (as the spec says) and scales the requested box
//!   up until its long side is one of 32, 96, 320, 640 or 800 (or down to 800), then fills it
//!   and crops the overflow centred.
//!
//! Either way the result is at least the requested size where the image is large enough, and
//! images are never enlarged. Thumbnails are never animated (the spec allows a static one
//! when `animated=true`). JPEG sources give JPEG thumbnails, all others PNG (keeps alpha).
//! EXIF orientation is applied, so phone photos come out upright.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

/// Thumbnails cached per content at most; further sizes are made on each request.
pub const CACHED_PER_CONTENT_MAX: usize = 12;

/// Long sides the requested size is rounded up to (the spec's suggested sizes).
const STEPS: [u32; 5] = [32, 96, 320, 640, 800];
/// The spec's suggested boxes for `scale`.
const SCALE_BOXES: [(u32, u32); 5] = [(32, 32), (96, 96), (320, 240), (640, 480), (800, 600)];

/// `method` of a thumbnail request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Fit inside the box, keeping the image's aspect ratio.
    Scale,
    /// Fill the box, cropping what overflows.
    Crop,
}

/// A thumbnail request, as the client sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Requested width (≥ 1).
    pub width: u32,
    /// Requested height (≥ 1).
    pub height: u32,
    /// Requested method.
    pub method: Method,
}

/// The box a request is served with after quantising (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// Box width.
    pub width: u32,
    /// Box height.
    pub height: u32,
    /// Method.
    pub method: Method,
}

/// Encoding of a thumbnail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// `image/png`.
    Png,
    /// `image/jpeg`.
    Jpeg,
}

impl Output {
    /// The MIME type.
    pub fn content_type(self) -> &'static str {
        match self {
            Output::Png => "image/png",
            Output::Jpeg => "image/jpeg",
        }
    }
    fn ext(self) -> &'static str {
        match self {
            Output::Png => "png",
            Output::Jpeg => "jpg",
        }
    }
}

/// Why no thumbnail could be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The content is not an image of a type we thumbnail.
    #[error("cannot generate thumbnails for this content type")]
    NotAnImage,
    /// The image is too large to decode within the limits.
    #[error("the image is too large to thumbnail")]
    TooLarge,
    /// The content is missing from the media store.
    #[error("the media content is missing")]
    Missing,
    /// The thumbnailer is shutting down.
    #[error("thumbnailing is unavailable")]
    Busy,
    /// Decoding or encoding failed (corrupt image, ...).
    #[error("failed to generate thumbnail: {0}")]
    Failed(String),
    /// The media store failed.
    #[error("media store: {0}")]
    Store(std::io::Error),
}

impl Request {
    /// The quantised box this request is served with.
    pub fn target(self) -> Target {
        let (w, h) = (self.width.max(1), self.height.max(1));
        match self.method {
            Method::Scale => {
                let (bw, bh) = SCALE_BOXES.into_iter().find(|&(bw, bh)| bw >= w && bh >= h).unwrap_or(SCALE_BOXES[4]);
                Target { width: bw, height: bh, method: Method::Scale }
            }
            Method::Crop => {
                let long = w.max(h);
                let step = STEPS.into_iter().find(|&s| s >= long).unwrap_or(STEPS[4]);
                let scale = |v: u32| ((u64::from(v) * u64::from(step) + u64::from(long) / 2) / u64::from(long)).max(1);
                Target { width: scale(w) as u32, height: scale(h) as u32, method: Method::Crop }
            }
        }
    }
}

impl Target {
    /// The media-store name of this thumbnail of content `sha256` in `format`.
    pub fn blob_name(&self, sha256: &str, format: Output) -> String {
        let m = match self.method {
            Method::Scale => "scale",
            Method::Crop => "crop",
        };
        format!("{sha256}.{}x{}-{m}.{}", self.width, self.height, format.ext())
    }
}

/// Whether an upload declared as `content_type` may be an image we thumbnail (`None`, an
/// octet stream or one of our image types; the bytes are checked when decoding).
pub fn declared_type_is_thumbnailable(content_type: Option<&str>) -> bool {
    let Some(ct) = content_type else { return true };
    let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    matches!(
        essence.as_str(),
        "image/png"
            | "image/jpeg"
            | "image/jpg"
            | "image/pjpeg"
            | "image/gif"
            | "image/webp"
            | "application/octet-stream"
    )
}

/// Makes the thumbnail `target` of image `source`, decoding at most `max_pixels` pixels.
/// CPU-heavy: run it on a blocking thread.
pub fn generate(source: &[u8], target: Target, max_pixels: u64) -> Result<(Vec<u8>, Output), Error> {
    let reader =
        ImageReader::new(Cursor::new(source)).with_guessed_format().map_err(|e| Error::Failed(e.to_string()))?;
    let format = reader.format().ok_or(Error::NotAnImage)?;
    let output = match format {
        ImageFormat::Jpeg => Output::Jpeg,
        ImageFormat::Png | ImageFormat::Gif | ImageFormat::WebP => Output::Png,
        _ => return Err(Error::NotAnImage),
    };
    let mut reader = reader;
    let mut limits = image::Limits::default();
    let side = u32::try_from(max_pixels).unwrap_or(u32::MAX);
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    // RGBA8 of the largest allowed image, plus room for the decoder's own buffers.
    limits.max_alloc = Some(max_pixels.saturating_mul(4).saturating_add(16 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    let (w, h) = decoder.dimensions();
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err(Error::TooLarge);
    }
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    img.apply_orientation(orientation);

    let thumb = resize(&img, target);
    let mut out = Vec::new();
    match output {
        Output::Jpeg => {
            let rgb = thumb.to_rgb8();
            let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80);
            rgb.write_with_encoder(encoder).map_err(|e| Error::Failed(e.to_string()))?;
        }
        Output::Png => {
            let encoder = image::codecs::png::PngEncoder::new(&mut out);
            thumb.write_with_encoder(encoder).map_err(|e| Error::Failed(e.to_string()))?;
        }
    }
    Ok((out, output))
}

fn decode_error(e: image::ImageError) -> Error {
    match e {
        image::ImageError::Limits(_) => Error::TooLarge,
        image::ImageError::Unsupported(_) => Error::NotAnImage,
        other => Error::Failed(other.to_string()),
    }
}

/// `img` scaled (never enlarged) for `target`.
fn resize(img: &DynamicImage, target: Target) -> DynamicImage {
    use image::imageops::FilterType::Triangle;
    let (iw, ih) = (img.width(), img.height());
    match target.method {
        Method::Scale => {
            if iw <= target.width && ih <= target.height {
                img.clone()
            } else {
                img.resize(target.width, target.height, Triangle)
            }
        }
        Method::Crop => {
            // Shrink the box (keeping its aspect ratio) until the image can fill it.
            let (tw, th) = (u64::from(target.width), u64::from(target.height));
            let (mut bw, mut bh) = (tw, th);
            if u64::from(iw) < bw || u64::from(ih) < bh {
                // factor = min(iw / tw, ih / th)
                if u64::from(iw) * th <= u64::from(ih) * tw {
                    bw = u64::from(iw);
                    bh = (th * u64::from(iw) / tw).max(1);
                } else {
                    bh = u64::from(ih);
                    bw = (tw * u64::from(ih) / th).max(1);
                }
            }
            img.resize_to_fill(bw as u32, bh as u32, Triangle)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbaImage::from_fn(w, h, |x, y| image::Rgba([(x % 256) as u8, (y % 256) as u8, 7, 255]));
        let mut out = Vec::new();
        DynamicImage::ImageRgba8(img).write_to(&mut Cursor::new(&mut out), ImageFormat::Png).expect("encode");
        out
    }

    fn dims(bytes: &[u8]) -> (u32, u32, ImageFormat) {
        let r = ImageReader::new(Cursor::new(bytes)).with_guessed_format().expect("guess");
        let f = r.format().expect("format");
        let img = r.decode().expect("decode");
        (img.width(), img.height(), f)
    }

    #[test]
    fn targets_are_quantised() {
        let t = |width, height, method| Request { width, height, method }.target();
        assert_eq!(t(96, 96, Method::Crop), Target { width: 96, height: 96, method: Method::Crop });
        assert_eq!(t(36, 36, Method::Crop), Target { width: 96, height: 96, method: Method::Crop });
        assert_eq!(t(64, 48, Method::Crop), Target { width: 96, height: 72, method: Method::Crop });
        assert_eq!(t(4000, 1000, Method::Crop), Target { width: 800, height: 200, method: Method::Crop });
        assert_eq!(t(100, 100, Method::Scale), Target { width: 320, height: 240, method: Method::Scale });
        assert_eq!(t(5000, 5000, Method::Scale), Target { width: 800, height: 600, method: Method::Scale });
        assert_eq!(t(0, 0, Method::Scale), Target { width: 32, height: 32, method: Method::Scale });
    }

    #[test]
    fn scale_and_crop_sizes() {
        let src = png(1000, 500);
        let target = Request { width: 300, height: 200, method: Method::Scale }.target();
        let (bytes, out) = generate(&src, target, 10_000_000).expect("scale");
        assert_eq!((out, dims(&bytes)), (Output::Png, (320, 160, ImageFormat::Png)));
        let target = Request { width: 64, height: 48, method: Method::Crop }.target();
        let (bytes, _) = generate(&src, target, 10_000_000).expect("crop");
        assert_eq!(dims(&bytes), (96, 72, ImageFormat::Png));
        // Small images are not enlarged; crop keeps the requested aspect ratio.
        let small = png(40, 20);
        let target = Request { width: 800, height: 600, method: Method::Scale }.target();
        assert_eq!(dims(&generate(&small, target, 10_000_000).expect("scale small").0), (40, 20, ImageFormat::Png));
        let target = Request { width: 96, height: 96, method: Method::Crop }.target();
        assert_eq!(dims(&generate(&small, target, 10_000_000).expect("crop small").0), (20, 20, ImageFormat::Png));
    }

    #[test]
    fn jpeg_gives_jpeg_and_limits_hold() {
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(640, 480, image::Rgb([200, 10, 10])));
        let mut jpeg = Vec::new();
        img.write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg).expect("encode jpeg");
        let target = Request { width: 32, height: 32, method: Method::Crop }.target();
        let (bytes, out) = generate(&jpeg, target, 10_000_000).expect("thumb");
        assert_eq!((out, dims(&bytes)), (Output::Jpeg, (32, 32, ImageFormat::Jpeg)));
        assert!(matches!(generate(&jpeg, target, 1000), Err(Error::TooLarge)));
        assert!(matches!(generate(b"just some text, not an image", target, 1000), Err(Error::NotAnImage)));
        assert!(matches!(generate(&jpeg[..100], target, 10_000_000), Err(Error::Failed(_))));
        assert!(declared_type_is_thumbnailable(Some("image/PNG")));
        assert!(!declared_type_is_thumbnailable(Some("text/html")));
    }
}
