//! Prometheus for the observability tests: the `prometheus` and `promtool` binaries of Debian's
//! `prometheus` package, a Prometheus server on a reserved loopback address, a tiny HTTP/1.0 GET
//! client (std only: scraping `/metrics` and calling the HTTP API), and the text-format and
//! PromQL helpers that check dashboards and alert rules against what the daemons export.
//!
//! A missing binary is a test failure naming the package, never a skip.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;

use crate::{Loopback, Output, Scratch};

/// Port of the test Prometheus on its own reserved loopback address.
pub const PROMETHEUS_PORT: u16 = 9090;
/// How long Prometheus may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout of one HTTP request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// `name` from `$PATH`, or an error saying which Debian package provides it.
pub fn tool(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            anyhow!(
                "`{name}` not found in PATH: install Debian's `prometheus` package \
                 (`apt-get install prometheus`, or run scripts/install-deps.sh)"
            )
        })
}

/// Runs `promtool ARGS` with `stdin` as its standard input (empty when `None`).
pub fn promtool(args: &[&str], stdin: Option<&str>) -> Result<Output> {
    let bin = tool("promtool")?;
    match stdin {
        None => crate::run(Command::new(&bin).args(args), Duration::from_secs(120)),
        Some(text) => {
            // crate::run gives the child /dev/null; promtool reads a file as well through
            // /dev/stdin, so hand it a temporary file.
            let scratch = Scratch::new()?;
            let input = scratch.path().join("stdin");
            fs::write(&input, text)?;
            let out = crate::run(
                Command::new("sh")
                    .arg("-c")
                    .arg("exec \"$0\" \"$@\" < \"$STDIN_FILE\"")
                    .arg(&bin)
                    .args(args)
                    .env("STDIN_FILE", &input),
                Duration::from_secs(120),
            )?;
            Ok(out)
        }
    }
}

/// An HTTP response: status code and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// `GET url` over HTTP/1.0 (`http://host:port/path?query`; the query must already be encoded).
pub fn http_get(url: &str) -> Result<Response> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("only http:// URLs: {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = authority
        .to_socket_addrs()
        .with_context(|| format!("resolving {authority}"))?
        .next()
        .ok_or_else(|| anyhow!("{authority} resolves to nothing"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, HTTP_TIMEOUT).with_context(|| format!("connecting to {authority}"))?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the response of {url}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response from {url}: {text:.200}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("no status in the response of {url}: {head:.200}"))?;
    Ok(Response {
        status,
        body: body.to_string(),
    })
}

/// `GET url`, failing unless the status is 200; returns the body.
pub fn http_get_ok(url: &str) -> Result<String> {
    let resp = http_get(url)?;
    ensure!(
        resp.status == 200,
        "GET {url}: HTTP {}: {:.500}",
        resp.status,
        resp.body
    );
    Ok(resp.body)
}

/// Percent-encodes a URL query value (RFC 3986 unreserved characters stay).
pub fn url_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The metric family names in a Prometheus text exposition: every sample's name with a
/// histogram/summary suffix (`_bucket`, `_sum`, `_count`) removed, plus every `# TYPE` name.
pub fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let line = line.trim();
        let name = if let Some(rest) = line.strip_prefix("# TYPE ") {
            rest.split_whitespace().next()
        } else if line.starts_with('#') || line.is_empty() {
            None
        } else {
            line.split(['{', ' ']).next()
        };
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            names.insert(family(name).to_string());
        }
    }
    names
}

/// `name` without a `_bucket`, `_sum` or `_count` suffix.
pub fn family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name)
}

/// Every `raftsan_…` metric family an expression names (suffixes removed as in [`family`]).
pub fn referenced_names(expr: &str) -> BTreeSet<String> {
    let bytes = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while let Some(found) = expr[i..].find("raftsan_") {
        let start = i + found;
        let word_char = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
        let mut end = start;
        while end < bytes.len() && word_char(bytes[end]) {
            end += 1;
        }
        // Inside a longer identifier or a string (a label value such as job="raftsan_x")?
        let inside_word = start > 0 && word_char(bytes[start - 1]);
        let in_string = start > 0 && bytes[start - 1] == b'"';
        if !inside_word && !in_string {
            names.insert(family(&expr[start..end]).to_string());
        }
        i = end;
    }
    names
}

/// A running Prometheus server on a reserved loopback address. Dropping it kills it.
pub struct Prometheus {
    child: Option<Child>,
    address: Loopback,
    scratch: Scratch,
    log: PathBuf,
}

impl Prometheus {
    /// Starts `prometheus` with `config` (YAML text) written as `prometheus.yml` next to `files`
    /// (name, content: rule files the config refers to by relative name), storage in a temporary
    /// directory, listening on `<reserved loopback>:9090`. Waits until `/-/ready` answers.
    pub fn start(config: &str, files: &[(&str, &str)]) -> Result<Prometheus> {
        let bin = tool("prometheus")?;
        let scratch = Scratch::new()?;
        for (name, content) in files {
            fs::write(scratch.path().join(name), content)?;
        }
        let config_path = scratch.path().join("prometheus.yml");
        fs::write(&config_path, config)?;
        let address = Loopback::reserve()?;
        let log = scratch.path().join("prometheus.log");
        let log_file = File::create(&log)?;
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", scratch.path().join("data").display()))
            .arg(format!("--web.listen-address={}:{PROMETHEUS_PORT}", address.ip()))
            .arg("--log.level=warn")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut prometheus = Prometheus {
            child: Some(child),
            address,
            scratch,
            log,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(resp) = http_get(&format!("{}/-/ready", prometheus.url()))
                && resp.status == 200
            {
                break;
            }
            if let Some(status) = prometheus.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("prometheus exited at start ({status}):\n{}", prometheus.log_text());
            }
            ensure!(
                Instant::now() < deadline,
                "prometheus not ready within {READY_TIMEOUT:?}:\n{}",
                prometheus.log_text()
            );
            thread::sleep(Duration::from_millis(200));
        }
        Ok(prometheus)
    }

    /// `http://ADDR:9090`.
    pub fn url(&self) -> String {
        format!("http://{}:{PROMETHEUS_PORT}", self.address.ip())
    }

    pub fn dir(&self) -> &Path {
        self.scratch.path()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /api/v1/<path>`: the `data` member of a `"status": "success"` answer, else an error
    /// with Prometheus's `errorType` and `error`.
    pub fn api(&self, path_and_query: &str) -> Result<Value> {
        let url = format!("{}/api/v1/{path_and_query}", self.url());
        let resp = http_get(&url)?;
        let v: Value = serde_json::from_str(&resp.body).with_context(|| {
            format!(
                "GET {url}: HTTP {} with a body that is not JSON: {:.300}",
                resp.status, resp.body
            )
        })?;
        ensure!(
            v["status"] == "success",
            "{}: {}",
            v["errorType"].as_str().unwrap_or("error"),
            v["error"].as_str().unwrap_or("(no message)")
        );
        Ok(v["data"].clone())
    }

    /// An instant query: the result array (a vector's series; a scalar as one element).
    pub fn query(&self, expr: &str) -> Result<Vec<Value>> {
        let data = self.api(&format!("query?query={}", url_encode(expr)))?;
        Ok(match &data["result"] {
            Value::Array(series) if data["resultType"] == "vector" || data["resultType"] == "matrix" => series.clone(),
            Value::Array(scalar) if !scalar.is_empty() => vec![data["result"].clone()],
            _ => Vec::new(),
        })
    }

    /// The values of an instant query's series, summed (0 when there is none).
    pub fn query_sum(&self, expr: &str) -> Result<f64> {
        Ok(self
            .query(expr)?
            .iter()
            .filter_map(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()))
            .fold(0.0, |sum, v| sum + v))
    }

    /// The active alerts (`/api/v1/alerts`).
    pub fn alerts(&self) -> Result<Vec<Value>> {
        let data = self.api("alerts")?;
        Ok(data["alerts"].as_array().cloned().unwrap_or_default())
    }

    /// The scrape targets and their health (`/api/v1/targets`): (job, instance, health, last error).
    pub fn targets(&self) -> Result<Vec<(String, String, String, String)>> {
        let data = self.api("targets?state=active")?;
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        Ok(data["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    text(&t["labels"]["job"]),
                    text(&t["labels"]["instance"]),
                    text(&t["health"]),
                    text(&t["lastError"]),
                )
            })
            .collect())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            crate::kill_group(child.id(), libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_drop_histogram_suffixes() {
        let text = "# HELP raftsan_up up\n# TYPE raftsan_up gauge\nraftsan_up 1\n\
                    raftsan_x_seconds_bucket{le=\"0.1\"} 3\nraftsan_x_seconds_sum 0.2\n\
                    raftsan_x_seconds_count 3\nraftsan_y_total{op=\"read\"} 4\n";
        let names: Vec<_> = exported_names(text).into_iter().collect();
        assert_eq!(names, ["raftsan_up", "raftsan_x_seconds", "raftsan_y_total"]);
    }

    #[test]
    fn referenced_names_skip_label_values_and_longer_words() {
        let expr = "histogram_quantile(0.99, sum by (le) (rate(raftsan_a_seconds_bucket{job=\"raftsan_b\"}[5m]))) \
                    / xraftsan_c + raftsan_d_total";
        let names: Vec<_> = referenced_names(expr).into_iter().collect();
        assert_eq!(names, ["raftsan_a_seconds", "raftsan_d_total"]);
    }

    #[test]
    fn url_encoding_keeps_unreserved_characters() {
        assert_eq!(
            url_encode("up{job=\"a b\"} == 0"),
            "up%7Bjob%3D%22a%20b%22%7D%20%3D%3D%200"
        );
        assert_eq!(url_encode("a-b_c.d~"), "a-b_c.d~");
    }
}
