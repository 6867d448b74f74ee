//! Helpers of the packaging tests (`tests/tests/packaging*.rs`): the offline tools they need
//! (Helm v4 through PyPI's `helm-python-sdk` in a venv, Debian's `promtool` and `lua5.1`,
//! `kubectl kustomize`), installed on first use, and parsing of rendered manifests.
//!
//! Every helper fails with a message that says what was run and how to fix it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use crate::{Error, Result};

/// Release name and namespace of the default render (`manifests/default/`).
pub const RELEASE: &str = "finetune-operator";
/// Namespace of the default render.
pub const NAMESPACE: &str = "finetune-system";
/// `helm-python-sdk` version the venv installs.
pub const HELM_SDK: &str = "helm-python-sdk==0.2.2";

/// `${FINETUNE_CACHE_DIR:-~/.cache/finetune-operator}`.
pub fn cache_root() -> PathBuf {
    std::env::var_os("FINETUNE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home =
                std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
            home.join(".cache/finetune-operator")
        })
}

/// Repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The chart directory.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/finetune-operator")
}

fn run_output(what: &str, cmd: &mut Command) -> Result<std::process::Output> {
    cmd.output()
        .map_err(|e| Error::io(format!("{what}: could not start"), e))
}

/// Runs a command and returns its stdout; a non-zero exit is an error carrying stderr.
pub fn run_ok(what: &str, cmd: &mut Command) -> Result<String> {
    let out = run_output(what, cmd)?;
    if !out.status.success() {
        return Err(Error::ControlPlane(format!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn on_path(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

static APT: Mutex<()> = Mutex::new(());

/// Makes sure `program` exists, installing the Debian `package` with apt-get when it is missing
/// (as root, or through sudo).
pub fn ensure_apt_tool(program: &str, package: &str) -> Result<()> {
    let _guard = APT.lock().unwrap_or_else(|e| e.into_inner());
    if on_path(program) {
        return Ok(());
    }
    let sudo = if nix::unistd::Uid::effective().is_root() {
        vec![]
    } else {
        vec!["sudo", "-n"]
    };
    let apt = |args: &[&str]| {
        let mut cmd = Command::new(sudo.first().copied().unwrap_or("apt-get"));
        if !sudo.is_empty() {
            cmd.args(&sudo[1..]).arg("apt-get");
        }
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    if run_ok(
        &format!("apt-get install -y {package}"),
        &mut apt(&["install", "-y", "--no-install-recommends", package]),
    )
    .is_err()
    {
        run_ok("apt-get update", &mut apt(&["update"]))?;
        run_ok(
            &format!("apt-get install -y {package}"),
            &mut apt(&["install", "-y", "--no-install-recommends", package]),
        )?;
    }
    if !on_path(program) {
        return Err(Error::NotFound(format!(
            "{program} is still missing after `apt-get install {package}`"
        )));
    }
    Ok(())
}

/// `~/.cache/finetune-operator/venv-helm/bin/python` with `helm-python-sdk` installed, created on
/// first use (`python3 -m venv` + `pip install helm-python-sdk`).
pub fn helm_python() -> Result<PathBuf> {
    static VENV: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    VENV.get_or_init(|| make_venv().map_err(|e| e.to_string()))
        .clone()
        .map_err(Error::ControlPlane)
}

fn make_venv() -> Result<PathBuf> {
    let dir = cache_root().join("venv-helm");
    let python = dir.join("bin/python");
    let probe = |python: &Path| {
        Command::new(python)
            .args(["-c", "import helm_python"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if python.is_file() && probe(&python) {
        return Ok(python);
    }
    if !python.is_file() {
        if !on_path("python3") {
            ensure_apt_tool("python3", "python3")?;
        }
        let made = run_ok(
            "python3 -m venv",
            Command::new("python3").args(["-m", "venv"]).arg(&dir),
        );
        if made.is_err() {
            ensure_apt_tool("python3", "python3-venv")?;
            run_ok(
                "python3 -m venv",
                Command::new("python3").args(["-m", "venv"]).arg(&dir),
            )?;
        }
    }
    run_ok(
        &format!("pip install {HELM_SDK} (into {})", dir.display()),
        Command::new(&python).args(["-m", "pip", "install", "-q", HELM_SDK]),
    )?;
    if !probe(&python) {
        return Err(Error::NotFound(format!(
            "{} cannot import helm_python after pip install",
            python.display()
        )));
    }
    Ok(python)
}

fn helm_cmd(args: &[&str], values: Option<&serde_json::Value>) -> Result<Command> {
    let python = helm_python()?;
    let mut cmd = Command::new(python);
    cmd.arg(repo_root().join("charts/hack/helm.py")).args(args);
    if let Some(v) = values {
        let file = std::env::temp_dir().join(format!(
            "finetune-values-{}-{}.json",
            std::process::id(),
            VALUES_SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        std::fs::write(&file, v.to_string()).map_err(|e| Error::io("write values", e))?;
        cmd.arg("--values").arg(file);
    }
    Ok(cmd)
}

static VALUES_SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Renders the chart (templates only, or with its `crds/` first) with `values` merged over
/// the defaults. A template failure is an error with Helm's message.
pub fn helm_render(
    values: Option<&serde_json::Value>,
    name: &str,
    namespace: &str,
    crds: bool,
) -> Result<String> {
    let chart = chart_dir().display().to_string();
    let mut args = vec![
        "render",
        chart.as_str(),
        "--name",
        name,
        "--namespace",
        namespace,
    ];
    if crds {
        args.push("--crds");
    }
    let mut cmd = helm_cmd(&args, values)?;
    run_ok(&format!("helm render with values {values:?}"), &mut cmd)
}

/// Lints the chart (`helm lint --strict`) with `values`; returns the report
/// (`{"messages": [{"severity", "path", "error"}], "errors": [..]}`).
pub fn helm_lint(values: Option<&serde_json::Value>) -> Result<serde_json::Value> {
    let chart = chart_dir().display().to_string();
    let mut cmd = helm_cmd(&["lint", chart.as_str(), "--strict"], values)?;
    let out = run_ok("helm lint", &mut cmd)?;
    serde_json::from_str(&out).map_err(|e| Error::ControlPlane(format!("helm lint output: {e}")))
}

/// Validates `values` against `values.schema.json`; `Err` carries Helm's message.
pub fn helm_validate(values: &serde_json::Value) -> Result<()> {
    let chart = chart_dir().display().to_string();
    let mut cmd = helm_cmd(&["validate", chart.as_str()], Some(values))?;
    run_ok("helm schema validation", &mut cmd).map(|_| ())
}

/// `kubectl kustomize DIR`.
pub fn kustomize(dir: &Path) -> Result<String> {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    run_ok(
        &format!("kubectl kustomize {}", dir.display()),
        Command::new(kubectl).arg("kustomize").arg(dir),
    )
}

/// Parses a multi-document YAML stream; empty documents are skipped.
pub fn parse_docs(yaml: &str) -> Result<Vec<serde_yaml::Value>> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut flush = |text: &mut String| -> Result<()> {
        let v: serde_yaml::Value = serde_yaml::from_str(text)
            .map_err(|e| Error::ControlPlane(format!("invalid YAML: {e}\n{text}")))?;
        if !v.is_null() {
            docs.push(v);
        }
        text.clear();
        Ok(())
    };
    // Document separators are `---` at column 0 (block scalars are always indented).
    for line in yaml.lines() {
        if line == "---" || line.starts_with("--- ") {
            flush(&mut current)?;
            current.push_str(line.trim_start_matches("---"));
        } else {
            current.push_str(line);
        }
        current.push('\n');
    }
    flush(&mut current)?;
    Ok(docs)
}

/// `Kind/namespace/name` of an object.
pub fn object_key(doc: &serde_yaml::Value) -> String {
    let s = |v: &serde_yaml::Value| v.as_str().unwrap_or("").to_string();
    format!(
        "{}/{}/{}",
        s(&doc["kind"]),
        s(&doc["metadata"]["namespace"]),
        s(&doc["metadata"]["name"])
    )
}

/// The objects of `docs` with the given kind.
pub fn of_kind<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> Vec<&'a serde_yaml::Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

/// A Lua table literal of a YAML value (for feeding objects to Lua health checks).
pub fn lua_literal(v: &serde_yaml::Value) -> String {
    use serde_yaml::Value;
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!(
            "\"{}\"",
            s.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n")
        ),
        Value::Sequence(items) => format!(
            "{{{}}}",
            items.iter().map(lua_literal).collect::<Vec<_>>().join(", ")
        ),
        Value::Mapping(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("[{}] = {}", lua_literal(k), lua_literal(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Tagged(t) => lua_literal(&t.value),
    }
}

/// Runs the chart's Argo CD health check (`argocd/health.lua`) on `obj` with Lua 5.1 (installed
/// on first use); returns `(status, message)`.
pub fn argocd_health(obj: &serde_yaml::Value) -> Result<(String, String)> {
    ensure_apt_tool("lua5.1", "lua5.1")?;
    let script = chart_dir().join("argocd/health.lua");
    let driver = format!(
        "obj = {}\nlocal hs = dofile(\"{}\")\nio.write(hs.status, \"\\t\", hs.message or \"\")\n",
        lua_literal(obj),
        script.display()
    );
    let out = run_ok(
        "lua5.1 argocd/health.lua",
        Command::new("lua5.1").arg("-e").arg(&driver),
    )?;
    let (status, message) = out
        .split_once('\t')
        .ok_or_else(|| Error::ControlPlane(format!("health.lua printed {out:?}")))?;
    Ok((status.to_string(), message.to_string()))
}

/// `checkov` from PyPI in `~/.cache/finetune-operator/venv-checkov`, installed on first use.
pub fn checkov() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = cache_root().join("venv-checkov");
        let bin = dir.join("bin/checkov");
        if bin.is_file() {
            return Ok(bin);
        }
        run_ok(
            "python3 -m venv (checkov)",
            Command::new("python3").args(["-m", "venv"]).arg(&dir),
        )
        .and_then(|_| {
            run_ok(
                "pip install checkov",
                Command::new(dir.join("bin/python"))
                    .args(["-m", "pip", "install", "-q", "checkov"]),
            )
        })
        .map(|_| bin)
        .map_err(|e| e.to_string())
    })
    .clone()
    .map_err(Error::ControlPlane)
}
