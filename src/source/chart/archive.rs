//! Chart archives: a gzipped tar unpacked with nothing but plain files and directories, every
//! path inside the cache entry, sizes and entry counts bounded.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

const MAX_UNPACKED_BYTES: u64 = 256 * 1024 * 1024;
const MAX_ENTRIES: usize = 20_000;

/// Why an archive is refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ArchiveError {
    #[error("not a readable gzipped tar archive: {0}")]
    Read(#[source] std::io::Error),
    #[error("more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    #[error("unpacks to more than {MAX_UNPACKED_BYTES} bytes")]
    TooLarge,
    #[error("{path} leaves the archive")]
    Escapes { path: String },
    #[error("{path}: {kind} entries are not allowed in a chart")]
    Forbidden { path: String, kind: String },
    #[error("{path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("the chart archive has no top-level directory with a Chart.yaml")]
    NoChart,
    #[error("the chart archive holds more than one chart")]
    SeveralCharts,
}

/// Unpacks a gzipped tar archive into `dest`: plain files and directories only, every path
/// inside `dest`, sizes and entry counts bounded.
pub(super) fn unpack(archive: &[u8], dest: &Path) -> Result<(), ArchiveError> {
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    let mut total: u64 = 0;
    let entries = tar.entries().map_err(ArchiveError::Read)?;
    for (count, entry) in entries.enumerate() {
        if count >= MAX_ENTRIES {
            return Err(ArchiveError::TooManyEntries);
        }
        let mut entry = entry.map_err(ArchiveError::Read)?;
        let path = entry.path().map_err(ArchiveError::Read)?.into_owned();
        let shown = path.display().to_string();
        let relative: PathBuf = path
            .components()
            .map(|c| match c {
                Component::Normal(part) => Ok(part),
                Component::CurDir => Ok(std::ffi::OsStr::new("")),
                _ => Err(ArchiveError::Escapes {
                    path: shown.clone(),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect();
        if relative.as_os_str().is_empty() {
            continue;
        }
        let target = dest.join(&relative);
        let write = |source| ArchiveError::Write {
            path: shown.clone(),
            source,
        };
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&target).map_err(write)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                total = total.saturating_add(entry.size());
                if total > MAX_UNPACKED_BYTES {
                    return Err(ArchiveError::TooLarge);
                }
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(write)?;
                }
                let mut data = Vec::new();
                (&mut entry)
                    .take(MAX_UNPACKED_BYTES)
                    .read_to_end(&mut data)
                    .map_err(write)?;
                std::fs::write(&target, data).map_err(write)?;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => {
                return Err(ArchiveError::Forbidden {
                    path: shown,
                    kind: format!("{other:?}"),
                })
            }
        }
    }
    Ok(())
}

/// The one chart directory (holding `Chart.yaml`) at the top of an unpacked archive.
pub(super) fn chart_dir_in(root: &Path) -> Result<PathBuf, ArchiveError> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(root).map_err(ArchiveError::Read)?;
    for entry in entries.flatten() {
        if entry.path().join("Chart.yaml").is_file() {
            found.push(PathBuf::from(entry.file_name()));
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(ArchiveError::NoChart),
        _ => Err(ArchiveError::SeveralCharts),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn archive(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::default(),
        ));
        for (path, kind, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            // set_path refuses '..'; write the raw name, as a hostile archive would.
            let name = &mut header.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            if *kind == tar::EntryType::Symlink {
                header.set_link_name("/etc").unwrap();
            }
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn archives_unpack_plain_files_inside_the_entry_only() {
        let tmp = tempfile::tempdir().unwrap();
        let good = archive(&[
            ("web/Chart.yaml", tar::EntryType::Regular, b"name: web\n"),
            ("web/templates/cm.yaml", tar::EntryType::Regular, b"x: 1\n"),
        ]);
        unpack(&good, tmp.path()).unwrap();
        assert_eq!(chart_dir_in(tmp.path()).unwrap(), PathBuf::from("web"));
        assert!(tmp.path().join("web/templates/cm.yaml").is_file());

        let escape = archive(&[("../evil", tar::EntryType::Regular, b"x")]);
        let err = unpack(&escape, tempfile::tempdir().unwrap().path()).unwrap_err();
        assert!(matches!(err, ArchiveError::Escapes { .. }), "{err}");
        assert!(err.to_string().contains("leaves the archive"), "{err}");
        let link = archive(&[("web/link", tar::EntryType::Symlink, b"")]);
        let err = unpack(&link, tempfile::tempdir().unwrap().path()).unwrap_err();
        assert!(err.to_string().contains("not allowed"), "{err}");
    }
}
