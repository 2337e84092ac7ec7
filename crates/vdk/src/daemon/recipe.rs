//! How a disk's chain is made: the image and the filters over it, kept so that the chain can
//! be opened again (after a live commit, discard or snapshot).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use vdk_filters::cow::Overlay;
use vdk_filters::FilterSpec;
use vdk_formats::Format;

use crate::control::{ApiError, CloudOptions, ErrorKind};

/// What a disk's chain is made of: the image and the filters over it.
#[derive(Debug)]
pub struct Recipe {
    /// The image (canonical), or an object store URL.
    pub image: PathBuf,
    /// Its format, when known; probed otherwise.
    pub format: Option<Format>,
    /// The image is opened read-only (the disk is, or a cow overlay takes its writes).
    pub read_only: bool,
    /// Probe the format of backing files whose parent does not record it.
    pub probe_backing: bool,
    /// The filters, first over the image first.
    pub specs: Vec<FilterSpec>,
    /// For a disk in object storage (`image` is its URL): how to reach it, and where its
    /// cache goes by default.
    pub cloud: Option<(CloudOptions, PathBuf)>,
    /// The object-store disk the chain was last built over (for its cache figures).
    pub object: Weak<vdk_objstore::ObjectDisk>,
    /// Where the image keeps dirty bitmaps (a writable qcow2 image whose filters keep every
    /// offset as it is), from the last build.
    pub bitmap_store: Option<Arc<dyn vdk_core::bitmap::BitmapStore>>,
    /// A LUKS image's passphrase.
    pub key: Option<vdk_formats::luks::Secret>,
}

impl Recipe {
    /// Opens the image and applies the filters.
    pub fn build(&mut self) -> Result<(vdk_filters::Chain, Format), ApiError> {
        let shown = self.image.display();
        let bad_filter = |e: vdk_filters::ChainError| ApiError::invalid(format!("{shown}: {e}"));
        if let Some((opts, cache_root)) = &self.cloud {
            let url = self.image.to_string_lossy();
            let disk = crate::cloud::open(&url, opts, self.read_only, Some(cache_root))
                .map_err(cloud_error)?;
            let disk = Arc::new(disk);
            self.object = Arc::downgrade(&disk);
            let chain = vdk_filters::apply_over(disk, None, &self.specs).map_err(bad_filter)?;
            return Ok((chain, Format::Raw));
        }
        let opts = vdk_formats::OpenOptions {
            format: self.format,
            read_only: self.read_only,
            probe_backing: self.probe_backing,
            key: self.key.clone(),
            // Bitmaps in the image are the disk's only if no filter moves or redirects data.
            keep_bitmaps: !self
                .specs
                .iter()
                .any(|s| matches!(s, FilterSpec::Partition { .. } | FilterSpec::Cow(_))),
            ..Default::default()
        };
        let opened = vdk_formats::open(&self.image, &opts)
            .map_err(|e| ApiError::io(format!("cannot open {shown}"), &e))?;
        let base = vdk_filters::cow::BaseFile {
            path: self.image.clone(),
            format: opened.format,
        };
        self.bitmap_store = opened.bitmaps;
        let chain =
            vdk_filters::apply_over(opened.device, Some(base), &self.specs).map_err(bad_filter)?;
        Ok((chain, opened.format))
    }

    /// Makes `overlay` the cow overlay.
    pub fn set_overlay(&mut self, overlay: &Path) {
        for s in &mut self.specs {
            if let FilterSpec::Cow(o) = s {
                o.overlay = Overlay::Persistent(overlay.to_owned());
            }
        }
    }

    /// The persistent cow overlay, if the disk has one.
    pub fn overlay(&self) -> Option<PathBuf> {
        self.specs.iter().find_map(|s| match s {
            FilterSpec::Cow(o) => match &o.overlay {
                Overlay::Persistent(p) => Some(p.clone()),
                Overlay::Volatile => None,
            },
            _ => None,
        })
    }
}

/// The filters of a request, parsed.
pub fn parse_filters(specs: &[String]) -> Result<Vec<FilterSpec>, ApiError> {
    specs
        .iter()
        .map(|s| FilterSpec::parse(s).map_err(|e| ApiError::invalid(e.to_string())))
        .collect()
}

/// An object-store error as the control API answers it.
pub fn cloud_error(e: anyhow::Error) -> ApiError {
    use vdk_objstore::ObjError as E;
    let kind = match e.downcast_ref::<E>() {
        Some(E::NotFound(_)) => ErrorKind::NotFound,
        Some(E::LeaseHeld { .. }) => ErrorKind::Busy,
        Some(E::BadUrl(_) | E::KeyNeeded | E::KeyNotWanted | E::WrongKey | E::BadKey) => {
            ErrorKind::Invalid
        }
        _ => ErrorKind::Io,
    };
    ApiError::new(kind, format!("{e:#}"))
}
