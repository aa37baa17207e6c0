//! What every deployment check shares: the repository's paths, the external
//! tools (found in `<repo>/.tools/` or on PATH), running them, and the
//! rendered objects of the chart and the kustomizations.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;

use serde::Deserialize;
use serde_json::Value;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// Finds a tool in `<repo>/.tools/bin` or on PATH, or fails naming the fix.
pub fn tool(name: &str) -> PathBuf {
    let local = repo_root().join(".tools/bin").join(name);
    if local.is_file() {
        return local;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "`{name}` is neither in {} nor on PATH: run `cargo xtask setup` \
         (it runs tests/setup-tools.sh, which installs helm, kubectl, the \
         kubernetes-models validators and promtool)",
        repo_root().join(".tools/bin").display()
    );
}

pub fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs a command to completion and returns its output, whatever its status.
pub fn run_command(command: &mut Command, stdin: Option<&[u8]>) -> Output {
    let what = describe(command);
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start `{what}`: {error}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        let input = input.to_vec();
        // Written from a thread: the child may fill stdout before reading
        // all of stdin.
        let writer = thread::spawn(move || pipe.write_all(&input));
        let output = child
            .wait_with_output()
            .unwrap_or_else(|error| panic!("`{what}` failed to run: {error}"));
        writer
            .join()
            .expect("stdin writer thread")
            .unwrap_or_else(|error| panic!("writing stdin of `{what}`: {error}"));
        return output;
    }
    child
        .wait_with_output()
        .unwrap_or_else(|error| panic!("`{what}` failed to run: {error}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(command: &mut Command) -> String {
    let what = describe(command);
    let output = run_command(command, None);
    assert!(
        output.status.success(),
        "`{what}` failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap_or_else(|_| panic!("`{what}` printed non-UTF-8"))
}

/// A rendered Kubernetes object and where it came from.
#[derive(Clone, Debug)]
pub struct Rendered {
    pub source: String,
    pub object: Value,
}

impl Rendered {
    pub fn kind(&self) -> &str {
        self.object["kind"].as_str().unwrap_or("")
    }
    pub fn name(&self) -> &str {
        self.object["metadata"]["name"].as_str().unwrap_or("")
    }
    pub fn namespace(&self) -> &str {
        self.object["metadata"]["namespace"].as_str().unwrap_or("")
    }
}

/// Parses a multi-document YAML stream into JSON values (empty documents
/// dropped).
pub fn parse_yaml_stream(text: &str, source: &str) -> Vec<Value> {
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value: serde_yaml::Value = serde_yaml::Value::deserialize(document)
            .unwrap_or_else(|error| panic!("{source}: invalid YAML: {error}"));
        if value.is_null() {
            continue;
        }
        let json = serde_json::to_value(&value)
            .unwrap_or_else(|error| panic!("{source}: YAML not representable as JSON: {error}"));
        objects.push(json);
    }
    objects
}

/// The objects of a rendered YAML stream, each tagged with its source.
pub fn rendered_objects(text: &str, source: &str) -> Vec<Rendered> {
    parse_yaml_stream(text, source)
        .into_iter()
        .map(|object| Rendered {
            source: source.to_string(),
            object,
        })
        .collect()
}

pub fn chart_dir() -> PathBuf {
    repo_root().join("daemonset/helm/ergon")
}

/// The chart's variants: the default values and each `ci/*-values.yaml`.
pub fn helm_variants() -> Vec<(String, Option<PathBuf>)> {
    let mut variants = vec![("default".to_string(), None)];
    let mut files: Vec<PathBuf> = fs::read_dir(chart_dir().join("ci"))
        .expect("daemonset/helm/ergon/ci exists")
        .map(|entry| entry.expect("readable ci/ entry").path())
        .filter(|path| path.to_string_lossy().ends_with("-values.yaml"))
        .collect();
    files.sort();
    for file in files {
        let name = file
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches("-values.yaml")
            .to_string();
        variants.push((name, Some(file)));
    }
    variants
}

pub const HELM_RELEASE: &str = "ergon";
pub const HELM_NAMESPACE: &str = "ergon-system";

pub fn helm_template(values: Option<&Path>) -> Vec<Rendered> {
    helm_template_with(HELM_NAMESPACE, values, &[])
}

/// `helm template` of release `ergon` into `namespace`, with a values file
/// and `--set` overrides.
pub fn helm_template_with(namespace: &str, values: Option<&Path>, sets: &[&str]) -> Vec<Rendered> {
    let mut command = Command::new(tool("helm"));
    command
        .arg("template")
        .arg(HELM_RELEASE)
        .arg(chart_dir())
        .args(["--namespace", namespace]);
    if let Some(values) = values {
        command.arg("--values").arg(values);
    }
    for set in sets {
        command.args(["--set", set]);
    }
    let source = format!(
        "helm template -n {namespace} ({}{})",
        values.map_or("default values".to_string(), |v| v.display().to_string()),
        sets.iter()
            .map(|s| format!(", --set {s}"))
            .collect::<String>()
    );
    let text = run_ok(&mut command);
    rendered_objects(&text, &source)
}

/// Every directory under daemonset/, dashboards/ and stack/ that holds a
/// kustomization.yaml.
pub fn kustomizations() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.expect("readable directory entry").path();
            if path.is_dir() {
                walk(&path, found);
            } else if path
                .file_name()
                .is_some_and(|name| name == "kustomization.yaml")
            {
                found.push(path.parent().unwrap().to_path_buf());
            }
        }
    }
    let mut found = Vec::new();
    for top in ["daemonset", "dashboards", "stack"] {
        walk(&repo_root().join(top), &mut found);
    }
    found.sort();
    found
}

pub fn relative(path: &Path) -> String {
    path.strip_prefix(repo_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

pub fn kustomize(dir: &Path) -> Vec<Rendered> {
    let text = run_ok(Command::new(tool("kubectl")).arg("kustomize").arg(dir));
    let source = format!("kubectl kustomize {}", relative(dir));
    rendered_objects(&text, &source)
}

pub fn stack_render() -> Vec<Rendered> {
    kustomize(&repo_root().join("stack/base"))
}

pub fn find<'a>(objects: &'a [Rendered], kind: &str, name: &str) -> &'a Rendered {
    objects
        .iter()
        .find(|o| o.kind() == kind && o.name() == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}
