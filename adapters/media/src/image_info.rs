//! What an image upload's bytes show: that they are of the type declared
//! (from their magic bytes), their dimensions, and a thumbnail.

use std::io::Cursor;

use image::{ImageFormat, ImageReader, Limits};
use parley_core::ChatError;

/// The longest edge of a thumbnail, in pixels.
pub const THUMBNAIL_EDGE: u32 = 320;
/// Thumbnails are JPEG at this quality.
pub const THUMBNAIL_MIME: &str = "image/jpeg";
const THUMBNAIL_QUALITY: u8 = 80;
/// The largest image decoded, per edge; larger ones are stored without
/// dimensions or thumbnail rather than decoded into gigabytes.
const MAX_EDGE: u32 = 16_384;

/// A thumbnail made from an image.
#[derive(Debug)]
pub struct Thumbnail {
    pub bytes: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

/// What an image's bytes show.
#[derive(Debug)]
pub struct ImageInfo {
    pub width: u32,
    pub height: u32,
    pub thumbnail: Option<Thumbnail>,
}

/// Checks `bytes` are an image of type `mime` and reads what it can off
/// them. None for a type this server cannot read (HEIC, say): stored as
/// declared, without dimensions or thumbnail. UNSUPPORTED_MEDIA_TYPE when
/// the bytes are not of the type declared.
pub fn analyze(bytes: &[u8], mime: &str) -> Result<Option<ImageInfo>, ChatError> {
    let Some(declared) = ImageFormat::from_mime_type(mime) else {
        return Ok(None);
    };
    let found = image::guess_format(bytes).ok();
    if found != Some(declared) {
        return Err(ChatError::UnsupportedMediaType(format!(
            "the bytes are not {mime}{}",
            found
                .map(|f| format!(" but {}", f.to_mime_type()))
                .unwrap_or_default()
        )));
    }
    if !declared.reading_enabled() {
        return Ok(None);
    }
    let reader = |limits: Limits| {
        let mut r = ImageReader::with_format(Cursor::new(bytes), declared);
        r.limits(limits);
        r
    };
    let bad = |e: image::ImageError| {
        ChatError::UnsupportedMediaType(format!("the bytes are not a readable {mime}: {e}"))
    };
    let (width, height) = reader(Limits::default()).into_dimensions().map_err(bad)?;
    if width > MAX_EDGE || height > MAX_EDGE {
        return Ok(Some(ImageInfo {
            width,
            height,
            thumbnail: None,
        }));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_EDGE);
    limits.max_image_height = Some(MAX_EDGE);
    let image = match reader(limits).decode() {
        Ok(image) => image,
        // Too large to decode here (the decoder's memory cap): kept as it
        // is, with its dimensions and no thumbnail.
        Err(image::ImageError::Limits(_)) => {
            return Ok(Some(ImageInfo {
                width,
                height,
                thumbnail: None,
            }));
        }
        Err(e) => return Err(bad(e)),
    };
    let thumb = image.thumbnail(THUMBNAIL_EDGE, THUMBNAIL_EDGE).into_rgb8();
    let mut out = Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, THUMBNAIL_QUALITY)
        .encode_image(&thumb)
        .map_err(|e| ChatError::UnsupportedMediaType(format!("no thumbnail of {mime}: {e}")))?;
    Ok(Some(ImageInfo {
        width,
        height,
        thumbnail: Some(Thumbnail {
            width: thumb.width(),
            height: thumb.height(),
            bytes: out.into_inner(),
        }),
    }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A `w` × `h` gradient encoded as `format`.
    pub fn picture(w: u32, h: u32, format: ImageFormat) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
        });
        let mut out = Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut out, format)
            .unwrap();
        out.into_inner()
    }

    #[test]
    fn jpeg_and_png_get_dimensions_and_a_thumbnail() {
        for (format, mime) in [
            (ImageFormat::Jpeg, "image/jpeg"),
            (ImageFormat::Png, "image/png"),
        ] {
            let info = analyze(&picture(640, 480, format), mime).unwrap().unwrap();
            assert_eq!((info.width, info.height), (640, 480), "{mime}");
            let t = info.thumbnail.unwrap();
            assert_eq!((t.width, t.height), (320, 240), "{mime}");
            assert_eq!(
                image::guess_format(&t.bytes).unwrap(),
                ImageFormat::Jpeg,
                "{mime}"
            );
        }
    }

    #[test]
    fn bytes_of_another_type_are_refused() {
        let png = picture(8, 8, ImageFormat::Png);
        let e = analyze(&png, "image/jpeg").unwrap_err();
        assert!(
            matches!(&e, ChatError::UnsupportedMediaType(m) if m.contains("image/png")),
            "{e}"
        );
        let e = analyze(b"<html>not a picture</html>", "image/png").unwrap_err();
        assert!(matches!(e, ChatError::UnsupportedMediaType(_)), "{e}");
        let mut cut = png.clone();
        cut.truncate(40);
        assert!(analyze(&cut, "image/png").is_err(), "a truncated image");
        assert!(
            analyze(b"anything", "image/heic").unwrap().is_none(),
            "unknown to this server: kept as declared"
        );
    }
}
