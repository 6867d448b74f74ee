//! Input paths resolved beneath their mount root: no `..`, no NUL, and no symlink that leads out
//! of the volume (a dataset volume holding `data.csv -> /etc/passwd` must not make the trainer read,
//! and then quote in its report, a file of the container).

use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};

/// Where the operator mounts every volume of the trainer pod (`operator::build::volumes::MOUNT_ROOT`):
/// each directory directly beneath it is one volume.
pub const DEFAULT_MOUNT_ROOT: &str = "/var/lib/finetune";
/// Environment variable overriding [`DEFAULT_MOUNT_ROOT`] (tests, local runs).
pub const MOUNT_ROOT_ENV: &str = "FINETUNE_MOUNT_ROOT";

fn refused(path: &Path, reason: impl Into<String>) -> Error {
    Error::PathRefused {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Resolves `path` (beneath `root`, or relative to it) following symlinks, and refuses it unless
/// every step stays beneath `root`. Returns the canonical path.
pub fn resolve_beneath(root: &Path, path: &Path) -> Result<PathBuf> {
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(refused(path, "contains a NUL byte"));
    }
    let rel = if path.is_absolute() {
        path.strip_prefix(root)
            .map_err(|_| refused(path, format!("not beneath {}", root.display())))?
    } else {
        path
    };
    for c in rel.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(refused(path, "contains '..'")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refused(path, format!("not beneath {}", root.display())));
            }
        }
    }
    let croot = root.canonicalize().map_err(|e| Error::io(root, e))?;
    // Walk the components so that the message names the symlink that leaves the volume.
    let mut cur = croot.clone();
    for c in rel.components() {
        let Component::Normal(name) = c else { continue };
        cur.push(name);
        let meta = std::fs::symlink_metadata(&cur).map_err(|e| Error::io(&cur, e))?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&cur).map_err(|e| Error::io(&cur, e))?;
            let resolved = cur.canonicalize().map_err(|e| Error::io(&cur, e))?;
            if !resolved.starts_with(&croot) {
                return Err(refused(
                    path,
                    format!(
                        "{} is a symlink to {} ({}), outside its volume {}",
                        cur.display(),
                        target.display(),
                        resolved.display(),
                        root.display()
                    ),
                ));
            }
            cur = resolved;
        }
    }
    let resolved = cur.canonicalize().map_err(|e| Error::io(&cur, e))?;
    if !resolved.starts_with(&croot) {
        return Err(refused(
            path,
            format!(
                "resolves to {}, outside its volume {}",
                resolved.display(),
                root.display()
            ),
        ));
    }
    Ok(resolved)
}

/// The mount root in effect: `$FINETUNE_MOUNT_ROOT` or [`DEFAULT_MOUNT_ROOT`].
pub fn mount_root() -> PathBuf {
    std::env::var_os(MOUNT_ROOT_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_MOUNT_ROOT), PathBuf::from)
}

/// Confines an input path: one beneath `mount_root` must resolve inside its volume (the first
/// directory beneath `mount_root`); `..` and NUL are refused there. Paths elsewhere (the image's
/// own tiny model, local runs) are returned as they are.
pub fn confine_input(path: &Path, mount_root: &Path) -> Result<PathBuf> {
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(refused(path, "contains a NUL byte"));
    }
    let Ok(rest) = path.strip_prefix(mount_root) else {
        return Ok(path.to_path_buf());
    };
    let mut comps = rest.components();
    let volume = match comps.next() {
        Some(Component::Normal(v)) => mount_root.join(v),
        _ => return Err(refused(path, "names no volume beneath the mount root")),
    };
    // A volume is a mount point, never a symlink (which would move the whole volume elsewhere).
    if std::fs::symlink_metadata(&volume).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(refused(
            path,
            format!(
                "the volume {} is a symlink, outside its volume root",
                volume.display()
            ),
        ));
    }
    resolve_beneath(&volume, comps.as_path())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_out_of_the_volume_are_refused() {
        let base = std::env::temp_dir().join(format!("paths-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let vol = base.join("dataset");
        std::fs::create_dir_all(vol.join("sub")).unwrap();
        std::fs::create_dir_all(base.join("other")).unwrap();
        std::fs::write(vol.join("sub/real.csv"), "a,b\n").unwrap();
        std::fs::write(base.join("other/secret"), "s\n").unwrap();
        symlink("sub/real.csv", vol.join("inside.csv")).unwrap();
        symlink("/etc/passwd", vol.join("passwd.csv")).unwrap();
        symlink("../other/secret", vol.join("up.csv")).unwrap();
        symlink("/etc", vol.join("etc")).unwrap();
        let ok = confine_input(&vol.join("inside.csv"), &base).unwrap();
        assert!(ok.ends_with("dataset/sub/real.csv"), "{}", ok.display());
        for (p, why) in [
            (vol.join("passwd.csv"), "symlink to /etc/passwd"),
            (vol.join("up.csv"), "symlink to ../other/secret"),
            (vol.join("etc/passwd"), "symlink to /etc"),
            (vol.join("sub/../../other/secret"), "contains '..'"),
        ] {
            let e = confine_input(&p, &base).unwrap_err().to_string();
            assert!(
                e.contains(why) && e.contains("refused"),
                "{}: {e}",
                p.display()
            );
        }
        // Outside the mount root: untouched.
        assert_eq!(
            confine_input(Path::new("/opt/x"), &base).unwrap(),
            PathBuf::from("/opt/x")
        );
        let _ = std::fs::remove_dir_all(&base);
    }
}
