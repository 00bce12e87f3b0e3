//! Where things live under `ROOT`, the two small TOML files the service reads, and the layout of
//! one release directory (what the package builder zips).

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::Error;

/// The release's package name, as written to `release.toml`.
pub const PACKAGE_NAME: &str = "demo-service";
/// The service binary's name inside a release (`bin/demo-service`).
pub const BINARY_NAME: &str = "demo-service";

/// Paths under a root directory.
#[derive(Debug, Clone)]
pub struct Paths {
    root: PathBuf,
}

impl Paths {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Paths { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.run_dir().join("demo-service.pid")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir().join("demo-service.sock")
    }
    pub fn log_dir(&self) -> PathBuf {
        self.root.join("log")
    }
    pub fn log_file(&self) -> PathBuf {
        self.log_dir().join("demo-service.log")
    }
    pub fn config_file(&self) -> PathBuf {
        self.root.join("demo-service.toml")
    }
    /// `ROOT/releases/V`. `version` must have been validated ([`crate::parse_version`]) so it
    /// cannot escape `releases/`.
    pub fn release_dir(&self, version: &str) -> PathBuf {
        self.root.join("releases").join(version)
    }
    pub fn release_binary(&self, version: &str) -> PathBuf {
        self.release_dir(version).join("bin").join(BINARY_NAME)
    }
    pub fn release_manifest(&self, version: &str) -> PathBuf {
        self.release_dir(version).join("release.toml")
    }

    /// The pid recorded in the pid file, if there is a readable one.
    pub fn read_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.pid_file()).ok()?;
        text.trim().parse().ok().filter(|p| *p > 0)
    }
}

/// `ROOT/demo-service.toml`.
#[derive(Debug, Deserialize)]
struct ServiceConfig {
    listen: Option<String>,
}

/// The address a freshly started service listens on, from `ROOT/demo-service.toml`.
pub fn configured_listen(paths: &Paths) -> Result<SocketAddr, Error> {
    let path = paths.config_file();
    let hint = "it must say listen = \"127.0.0.1:PORT\" (where the demo service listens)";
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Config {
                path,
                message: format!("not found; {hint}"),
            });
        }
        Err(e) => {
            return Err(Error::Config {
                path,
                message: format!("cannot read: {e}"),
            });
        }
    };
    let config: ServiceConfig = toml::from_str(&text).map_err(|e| Error::Config {
        path: path.clone(),
        message: format!("invalid TOML ({}); {hint}", e.message()),
    })?;
    let listen = config.listen.ok_or_else(|| Error::Config {
        path: path.clone(),
        message: format!("no `listen` key; {hint}"),
    })?;
    listen.parse().map_err(|_| Error::Config {
        path,
        message: format!("listen = {listen:?} is not a HOST:PORT socket address"),
    })
}

/// `ROOT/releases/V/release.toml`: what the service reads of it.
#[derive(Debug, Deserialize)]
struct Manifest {
    #[serde(default)]
    broken: bool,
    #[serde(default)]
    error_percent: u32,
}

/// The faults a release was built with, on purpose (`orchestrator demo package --broken`,
/// `--error-percent N`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReleaseFaults {
    /// `/health` answers 503.
    pub broken: bool,
    /// `/` answers 500 for this share of its requests (0-100; every 10th for 10), while
    /// `/health` stays 200: only metrics show it.
    pub error_percent: u32,
}

/// Whether release V was built broken (see [`release_faults`]).
pub fn release_is_broken(paths: &Paths, version: &str) -> Result<bool, Error> {
    Ok(release_faults(paths, version)?.broken)
}

/// The faults release V was built with. A release without a manifest (a binary run outside a
/// release directory, as in tests) has none; an unreadable manifest (or an error percentage
/// above 100) is an error, so a typo does not silently produce a healthy service.
pub fn release_faults(paths: &Paths, version: &str) -> Result<ReleaseFaults, Error> {
    let path = paths.release_manifest(version);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let m: Manifest = toml::from_str(&text).map_err(|e| Error::Config {
                path: path.clone(),
                message: format!("invalid release manifest: {}", e.message()),
            })?;
            if m.error_percent > 100 {
                return Err(Error::Config {
                    path,
                    message: format!(
                        "error_percent = {} is not a percentage (0 to 100)",
                        m.error_percent
                    ),
                });
            }
            Ok(ReleaseFaults {
                broken: m.broken,
                error_percent: m.error_percent,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ReleaseFaults::default()),
        Err(e) => Err(Error::io(format!("reading {}", path.display()))(e)),
    }
}

/// The `hooks/activate` script of every release. The store runs it as `activate FROM TO` with the
/// `ORCH_*` variables set; it hands over to the binary of the release being activated, so the
/// *new* release's code decides how to take over (and reads `broken` from its own manifest).
pub const ACTIVATE_HOOK: &str = r#"#!/bin/sh
# Activation hook of the demo service, run by the release store as: activate FROM TO
# (FROM is "none" on a first install). Exit 0 means the service now runs TO.
set -eu
if [ "$#" -ne 2 ]; then
    echo "usage: $0 FROM TO" >&2
    exit 2
fi
exec "$ORCH_RELEASE_DIR/bin/demo-service" activate --root "$ORCH_ROOT_DIR" --from "$1" --to "$2"
"#;

/// Lays out one release directory for the package builder:
///
/// - `dir/release.toml`: `name = "demo-service"`, `version = "V"`, and `broken = true` when
///   `broken` (the service then starts but fails its health check);
/// - `dir/bin/demo-service`: a copy of `service_binary`, mode 0755;
/// - `dir/hooks/activate`: [`ACTIVATE_HOOK`], mode 0755.
///
/// `dir` is created if needed; existing files in it are replaced.
pub fn write_release_dir(
    dir: &Path,
    version: &str,
    broken: bool,
    service_binary: &Path,
) -> Result<(), Error> {
    let faults = ReleaseFaults {
        broken,
        error_percent: 0,
    };
    write_release_dir_with(dir, version, faults, service_binary)
}

/// [`write_release_dir`] with any [`ReleaseFaults`]: `error_percent = N` in the manifest when
/// not 0.
pub fn write_release_dir_with(
    dir: &Path,
    version: &str,
    faults: ReleaseFaults,
    service_binary: &Path,
) -> Result<(), Error> {
    if faults.error_percent > 100 {
        return Err(Error::Config {
            path: dir.join("release.toml"),
            message: format!(
                "error_percent = {} is not a percentage (0 to 100)",
                faults.error_percent
            ),
        });
    }
    let version = crate::parse_version(version)?.to_string();
    let bin_dir = dir.join("bin");
    let hooks_dir = dir.join("hooks");
    for d in [dir, &bin_dir, &hooks_dir] {
        fs::create_dir_all(d).map_err(Error::io(format!("creating {}", d.display())))?;
    }

    let mut manifest = format!("name = \"{PACKAGE_NAME}\"\nversion = \"{version}\"\n");
    if faults.broken {
        manifest.push_str("broken = true\n");
    }
    if faults.error_percent > 0 {
        manifest.push_str(&format!("error_percent = {}\n", faults.error_percent));
    }
    write_file(&dir.join("release.toml"), manifest.as_bytes(), 0o644)?;

    let binary = bin_dir.join(BINARY_NAME);
    // Copy to a temp name and rename, so an existing binary (maybe running) is replaced, not
    // overwritten in place (which fails with ETXTBSY or corrupts the running process).
    let tmp = bin_dir.join(format!(".{BINARY_NAME}.tmp"));
    fs::copy(service_binary, &tmp).map_err(Error::io(format!(
        "copying {} to {}",
        service_binary.display(),
        tmp.display()
    )))?;
    set_mode(&tmp, 0o755)?;
    fs::rename(&tmp, &binary).map_err(Error::io(format!("renaming to {}", binary.display())))?;

    write_file(&hooks_dir.join("activate"), ACTIVATE_HOOK.as_bytes(), 0o755)?;
    Ok(())
}

/// The variable that names the `demo-service` binary for [`find_service_binary`].
pub const SERVICE_BINARY_ENV: &str = "ORCH_DEMO_SERVICE_BIN";

/// Finds a `demo-service` binary to package: `$ORCH_DEMO_SERVICE_BIN` if set, else a
/// `demo-service` next to the running executable (or one directory up, where cargo puts binaries
/// relative to test executables in `deps/`). Meant for `orchestrator demo package`.
pub fn find_service_binary() -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os(SERVICE_BINARY_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::Start(format!(
                "{SERVICE_BINARY_ENV}={} is not a file",
                p.display()
            )))
        };
    }
    let exe = std::env::current_exe().map_err(Error::io("locating the running executable"))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidates = [Some(dir), dir.parent()];
    candidates
        .into_iter()
        .flatten()
        .map(|d| d.join(BINARY_NAME))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Start(format!(
                "no {BINARY_NAME} binary next to {}; build it (cargo build -p orch-demo-service) or set {SERVICE_BINARY_ENV}",
                exe.display()
            ))
        })
}

fn set_mode(path: &Path, mode: u32) -> Result<(), Error> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(Error::io(format!("setting mode of {}", path.display())))
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    fs::write(path, contents).map_err(Error::io(format!("writing {}", path.display())))?;
    set_mode(path, mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn release_dir_has_manifest_binary_and_hook_with_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let fake_bin = tmp.path().join("fake");
        fs::write(&fake_bin, b"\x7fELF pretend").unwrap();
        set_mode(&fake_bin, 0o600).unwrap();

        let dir = tmp.path().join("out");
        write_release_dir(&dir, "1.2.3", false, &fake_bin).unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("release.toml")).unwrap(),
            "name = \"demo-service\"\nversion = \"1.2.3\"\n"
        );
        assert_eq!(
            fs::read(dir.join("bin/demo-service")).unwrap(),
            b"\x7fELF pretend"
        );
        assert_eq!(mode(&dir.join("bin/demo-service")), 0o755);
        assert_eq!(mode(&dir.join("hooks/activate")), 0o755);
        let hook = fs::read_to_string(dir.join("hooks/activate")).unwrap();
        assert!(hook.starts_with("#!/bin/sh\n"));
        assert!(hook.contains(
            r#"exec "$ORCH_RELEASE_DIR/bin/demo-service" activate --root "$ORCH_ROOT_DIR" --from "$1" --to "$2""#
        ));
        let paths = Paths::new(tmp.path());
        assert!(
            !release_is_broken(&paths, "9.9.9").unwrap(),
            "no manifest: not broken"
        );

        // Rewriting as broken replaces the manifest.
        write_release_dir(&dir, "1.2.3", true, &fake_bin).unwrap();
        let text = fs::read_to_string(dir.join("release.toml")).unwrap();
        assert!(text.contains("broken = true"), "{text}");
    }

    #[test]
    fn release_dir_refuses_bad_version() {
        let tmp = tempfile::tempdir().unwrap();
        let err = write_release_dir(tmp.path(), "../1.0", false, Path::new("/bin/sh")).unwrap_err();
        assert!(err.to_string().contains("invalid version"), "{err}");
    }

    #[test]
    fn broken_flag_is_read_from_the_release_manifest() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = Paths::new(tmp.path());
        let fake_bin = tmp.path().join("fake");
        fs::write(&fake_bin, b"x").unwrap();
        write_release_dir(&paths.release_dir("1.0.0"), "1.0.0", false, &fake_bin).unwrap();
        write_release_dir(&paths.release_dir("1.0.1"), "1.0.1", true, &fake_bin).unwrap();
        assert!(!release_is_broken(&paths, "1.0.0").unwrap());
        assert!(release_is_broken(&paths, "1.0.1").unwrap());
        fs::write(paths.release_manifest("1.0.0"), "broken = maybe").unwrap();
        assert!(release_is_broken(&paths, "1.0.0").is_err());
    }

    #[test]
    fn an_error_percentage_is_written_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        let bin = dir.path().join("bin-src");
        fs::write(&bin, "#!/bin/sh\n").unwrap();
        let faults = ReleaseFaults {
            broken: false,
            error_percent: 10,
        };
        write_release_dir_with(&paths.release_dir("1.0.1"), "1.0.1", faults, &bin).unwrap();
        assert_eq!(release_faults(&paths, "1.0.1").unwrap(), faults);
        fs::write(paths.release_manifest("1.0.1"), "error_percent = 150\n").unwrap();
        let e = release_faults(&paths, "1.0.1").unwrap_err().to_string();
        assert!(e.contains("error_percent = 150"), "{e}");
    }

    #[test]
    fn configured_listen_errors_name_the_file_and_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = Paths::new(tmp.path());
        let err = configured_listen(&paths).unwrap_err().to_string();
        assert!(
            err.contains("demo-service.toml") && err.contains("not found"),
            "{err}"
        );
        fs::write(paths.config_file(), "port = 1\n").unwrap();
        let err = configured_listen(&paths).unwrap_err().to_string();
        assert!(err.contains("no `listen` key"), "{err}");
        fs::write(paths.config_file(), "listen = \"nope\"\n").unwrap();
        let err = configured_listen(&paths).unwrap_err().to_string();
        assert!(err.contains("not a HOST:PORT"), "{err}");
        fs::write(paths.config_file(), "listen = \"127.0.0.1:8080\"\n").unwrap();
        assert_eq!(
            configured_listen(&paths).unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
    }
}
