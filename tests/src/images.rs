//! The image map: how the simulated node agent turns a container image into a host executable.
//!
//! Semantics mirror a container runtime's: the image's [`ImageSpec::entrypoint`] is the
//! `ENTRYPOINT` and [`ImageSpec::cmd`] the `CMD`. A container's `command` replaces the entrypoint
//! (and drops the default cmd), its `args` replace the cmd. Executables named in `command` are
//! resolved on the host (the host file system plays the image's file system). An image that is
//! not in the map makes the container wait with reason `ErrImagePull`, then `ImagePullBackOff`.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// What one image runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageSpec {
    /// The image's `ENTRYPOINT` (an absolute host path first).
    pub entrypoint: Vec<String>,
    /// The image's `CMD` (default arguments, or the whole command line when `entrypoint` is empty).
    pub cmd: Vec<String>,
    /// The image's `ENV`, overridden by the container's `env`.
    pub env: Vec<(String, String)>,
}

impl ImageSpec {
    /// An image whose entrypoint is `argv` (e.g. `["/path/to/finetune-trainer"]`).
    pub fn entrypoint<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            entrypoint: argv.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// An image with no entrypoint and default command `argv` (like `busybox`'s `sh`).
    pub fn cmd<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            cmd: argv.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Adds an image environment variable.
    pub fn with_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// The argv a container runs: `command` replaces the entrypoint, `args` the cmd.
    pub fn argv(&self, command: &[String], args: &[String]) -> Vec<String> {
        match (command.is_empty(), args.is_empty()) {
            (false, _) => command.iter().chain(args).cloned().collect(),
            (true, false) => self.entrypoint.iter().chain(args).cloned().collect(),
            (true, true) => self.entrypoint.iter().chain(&self.cmd).cloned().collect(),
        }
    }
}

/// Image reference → [`ImageSpec`]. Keys may name a repository without tag (`ghcr.io/x/trainer`),
/// which then matches every tag and digest of it; an exact key (`ghcr.io/x/trainer:0.1.0`) wins.
/// `docker.io/library/` prefixes are ignored, so `busybox` and `docker.io/library/busybox:1.36`
/// match the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMap {
    entries: BTreeMap<String, ImageSpec>,
}

impl Default for ImageMap {
    /// `busybox`, `alpine` and `debian` run the host's `/bin/sh`; `python` runs the host's python3.
    fn default() -> Self {
        let mut map = Self::empty();
        for shell_image in ["busybox", "alpine", "debian"] {
            map.insert(shell_image, ImageSpec::cmd(["/bin/sh"]));
        }
        let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("/usr/bin/python3"));
        map.insert("python", ImageSpec::cmd([python.display().to_string()]));
        map
    }
}

impl ImageMap {
    /// A map with no images at all.
    pub fn empty() -> Self {
        Self {
            entries: BTreeMap::new(),
        }
    }

    /// Adds (or replaces) an image.
    pub fn insert(&mut self, image: impl Into<String>, spec: ImageSpec) {
        self.entries.insert(normalize(&image.into()), spec);
    }

    /// Builder form of [`ImageMap::insert`].
    pub fn with(mut self, image: impl Into<String>, spec: ImageSpec) -> Self {
        self.insert(image, spec);
        self
    }

    /// The spec for `image`, if it is known.
    pub fn resolve(&self, image: &str) -> Option<&ImageSpec> {
        let image = normalize(image);
        self.entries
            .get(&image)
            .or_else(|| self.entries.get(repository(&image)))
    }
}

fn normalize(image: &str) -> String {
    let image = image.trim();
    image
        .strip_prefix("docker.io/library/")
        .or_else(|| image.strip_prefix("docker.io/"))
        .unwrap_or(image)
        .to_string()
}

/// `repo` of `repo:tag`, `repo@digest` or `host:port/repo:tag`.
fn repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].find(':') {
        Some(colon) => &image[..last_slash + colon],
        None => image,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_tags_digests_and_library_prefix() {
        let map = ImageMap::empty()
            .with(
                "ghcr.io/finetune-operator/trainer",
                ImageSpec::entrypoint(["/bin/t"]),
            )
            .with("localhost:5000/x:1", ImageSpec::entrypoint(["/bin/x1"]))
            .with("busybox", ImageSpec::cmd(["/bin/sh"]));
        assert!(
            map.resolve("ghcr.io/finetune-operator/trainer:0.1.0")
                .is_some()
        );
        assert!(
            map.resolve("ghcr.io/finetune-operator/trainer@sha256:abc")
                .is_some()
        );
        assert!(map.resolve("docker.io/library/busybox:1.36").is_some());
        assert!(map.resolve("localhost:5000/x:1").is_some());
        assert!(map.resolve("localhost:5000/x:2").is_none());
        assert!(map.resolve("ghcr.io/other/trainer:0.1.0").is_none());
    }

    #[test]
    fn command_and_args_follow_runtime_rules() {
        let spec = ImageSpec {
            entrypoint: vec!["/e".into()],
            cmd: vec!["c".into()],
            env: vec![],
        };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(spec.argv(&[], &[]), s(&["/e", "c"]));
        assert_eq!(spec.argv(&[], &s(&["a"])), s(&["/e", "a"]));
        assert_eq!(spec.argv(&s(&["/x"]), &[]), s(&["/x"]));
        assert_eq!(spec.argv(&s(&["/x"]), &s(&["a"])), s(&["/x", "a"]));
    }
}
