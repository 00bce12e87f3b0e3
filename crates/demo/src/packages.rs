//! Demo-service packages: the service binary to put in them, and the zip itself.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use orch_demo_service::layout::ReleaseFaults;
use orch_release::package;
use orch_types::Version;

use crate::DemoError;

/// The demo-service binary to package: a `demo-service` found beside `exe` (or named by
/// `$ORCH_DEMO_SERVICE_BIN`), else a wrapper script in `scratch` that runs `exe demo-service`,
/// so that the demo needs no second binary.
pub fn service_binary(exe: &Path, scratch: &Path) -> Result<PathBuf, DemoError> {
    if let Ok(p) = orch_demo_service::find_service_binary() {
        return Ok(p);
    }
    fs::create_dir_all(scratch).map_err(DemoError::io(format!("create {}", scratch.display())))?;
    let wrapper = scratch.join(".demo-service-wrapper");
    let quoted = exe.display().to_string().replace('\'', "'\\''");
    fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec '{quoted}' demo-service \"$@\"\n"),
    )
    .map_err(DemoError::io(format!("write {}", wrapper.display())))?;
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).map_err(DemoError::io(
        format!("make {} executable", wrapper.display()),
    ))?;
    Ok(wrapper)
}

/// Builds `out/demo-service-V.zip` (and its `.sha256`) around `service_binary`; a `broken`
/// release starts but fails its health check.
pub fn build_package(
    out: &Path,
    v: Version,
    broken: bool,
    service_binary: &Path,
) -> Result<PathBuf, DemoError> {
    let faults = ReleaseFaults {
        broken,
        error_percent: 0,
    };
    build_package_with(out, v, faults, service_binary)
}

/// [`build_package`] of a release with any faults (e.g. one whose `/` fails a share of its
/// requests while its health check passes).
pub fn build_package_with(
    out: &Path,
    v: Version,
    faults: ReleaseFaults,
    service_binary: &Path,
) -> Result<PathBuf, DemoError> {
    let src = out.join(format!(".demo-src-{v}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&src);
    orch_demo_service::layout::write_release_dir_with(&src, &v.to_string(), faults, service_binary)
        .map_err(|source| DemoError::DemoService {
            context: format!("lay out the demo-service {v} release in {}", src.display()),
            source: Box::new(source),
        })?;
    let built = package::build(&src, "demo-service", v, out);
    // The source directory was only the zip's input.
    let _ = fs::remove_dir_all(&src);
    Ok(built
        .map_err(DemoError::release(format!(
            "build the demo-service {v} package in {}",
            out.display()
        )))?
        .0)
}
