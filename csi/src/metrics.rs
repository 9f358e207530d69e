//! Prometheus metrics shared by both plugins (docs/metrics.md lists every
//! metric):
//!
//! - [`Exporter`] and [`serve`]: a small HTTP/1.1 server (hyper) answering
//!   `GET /metrics` in the OpenMetrics text format (prometheus-client) and
//!   `GET /healthz`; a registry of live metrics plus, optionally, a
//!   registry built afresh on each scrape from the plugin's state, so what
//!   is exported is always what the engine holds now;
//! - [`CallMetrics`] and its tower layer [`CallMetricsLayer`]: every CSI
//!   call counted by method and gRPC code, with a latency histogram,
//!   measured at the gRPC layer so no call can be missed;
//! - [`scrape`] and [`parse`]: a client and a strict parser of the text
//!   format, for tests and tools.
//!
//! Metrics carry no secrets: volume ids, method names, codes, counts and
//! durations only. The endpoint has no authentication; bind it where only
//! the scraper can reach it.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tonic::Code;
use tracing::Instrument;

/// `Content-Type` of `/metrics`: OpenMetrics text, which Prometheus asks
/// for and parses.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Connections served at once; more are closed at once (a scraper needs
/// one).
const MAX_CONNECTIONS: usize = 32;

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of serving, scraping or parsing metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The metrics address could not be bound.
    #[error("metrics address {addr}: {source}")]
    Bind {
        /// The address given.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A scrape failed (connection, HTTP or a body that is not UTF-8).
    #[error("scraping {addr}: {msg}")]
    Scrape {
        /// The address scraped.
        addr: SocketAddr,
        /// What failed.
        msg: String,
    },
    /// The text is not valid OpenMetrics.
    #[error("metrics text, line {line}: {msg}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
}

// ------------------------------------------------------------- exporter

/// Builds the per-scrape registry.
type Snapshot = Box<dyn Fn() -> Pin<Box<dyn Future<Output = Registry> + Send>> + Send + Sync>;

/// What `/metrics` answers: a registry of live metrics (counters updated
/// as things happen), and optionally a registry built on each scrape from
/// the plugin's state (collectors over a snapshot).
pub struct Exporter {
    registry: Registry,
    snapshot: Option<Snapshot>,
}

impl Exporter {
    /// An exporter of `registry` alone.
    pub fn new(registry: Registry) -> Exporter {
        Exporter {
            registry,
            snapshot: None,
        }
    }

    /// Adds a registry built by `f` on every scrape; its metric names must
    /// differ from the live registry's.
    pub fn with_snapshot<F, Fut>(mut self, f: F) -> Exporter
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Registry> + Send + 'static,
    {
        self.snapshot = Some(Box::new(move || Box::pin(f())));
        self
    }

    /// The OpenMetrics text of both registries, ending in `# EOF`.
    pub async fn render(&self) -> Result<String, std::fmt::Error> {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::with_capacity(16 << 10);
        encode_registry(&mut out, &self.registry)?;
        if let Some(f) = &self.snapshot {
            encode_registry(&mut out, &f().await)?;
        }
        encode_eof(&mut out)?;
        Ok(out)
    }
}

/// Binds the metrics address (`HOST:PORT`; port 0 picks a free one).
pub async fn bind(addr: &str) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind {
            addr: addr.to_string(),
            source,
        })
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn answer(exporter: &Exporter, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => match exporter.render().await {
            Ok(body) => {
                let mut r = Response::new(Full::new(Bytes::from(body)));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(CONTENT_TYPE),
                );
                r
            }
            Err(e) => {
                tracing::warn!("encoding metrics: {e}");
                text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n")
            }
        },
        "/healthz" => text(StatusCode::OK, "ok\n"),
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics\n"),
    }
}

/// Serves `exporter` on `listener` until `shutdown` completes; connections
/// still open then are dropped (a scrape is short and can be retried).
pub async fn serve<F>(listener: TcpListener, exporter: Arc<Exporter>, shutdown: F)
where
    F: Future<Output = ()>,
{
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (sock, peer) = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: pause instead of spinning.
                    tracing::warn!("accepting a metrics connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many metrics connections; closing");
            continue;
        };
        let exporter = exporter.clone();
        let span = tracing::debug_span!("metrics", %peer);
        conns.spawn(
            async move {
                let _permit = permit;
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let exporter = exporter.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&exporter, &req).await) }
                });
                let r = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
                if let Err(e) = r {
                    tracing::debug!("metrics connection: {e}");
                }
            }
            .instrument(span),
        );
    }
}

// ----------------------------------------------------------- CSI calls

/// Every RPC of the CSI spec (proto/csi.proto): the values the `method`
/// label takes, besides `unknown` for any other path, so a client cannot
/// grow the label set.
pub const CSI_METHODS: &[&str] = &[
    "GetPluginInfo",
    "GetPluginCapabilities",
    "Probe",
    "CreateVolume",
    "DeleteVolume",
    "ControllerPublishVolume",
    "ControllerUnpublishVolume",
    "ValidateVolumeCapabilities",
    "ListVolumes",
    "ControllerListVolumeHealth",
    "ControllerGetVolumeHealth",
    "GetCapacity",
    "ControllerGetCapabilities",
    "CreateSnapshot",
    "DeleteSnapshot",
    "ListSnapshots",
    "GetSnapshot",
    "ControllerExpandVolume",
    "ControllerGetVolume",
    "ControllerModifyVolume",
    "GroupControllerGetCapabilities",
    "CreateVolumeGroupSnapshot",
    "DeleteVolumeGroupSnapshot",
    "GetVolumeGroupSnapshot",
    "GetMetadataAllocated",
    "GetMetadataDelta",
    "NodeStageVolume",
    "NodeUnstageVolume",
    "NodePublishVolume",
    "NodeUnpublishVolume",
    "NodeGetVolumeStats",
    "NodeGetVolumeHealth",
    "NodeGetStorageHealth",
    "NodeExpandVolume",
    "NodeGetCapabilities",
    "NodeGetInfo",
];

/// The `method` label of a gRPC path `/csi.v1.Service/Method`.
pub fn method_of(path: &str) -> &'static str {
    path.strip_prefix("/csi.v1.")
        .and_then(|p| p.split_once('/'))
        .and_then(|(_, m)| CSI_METHODS.iter().find(|&&k| k == m).copied())
        .unwrap_or("unknown")
}

/// The name gRPC gives `code` (Go's `codes.Code.String()`, which the
/// Kubernetes CSI sidecars' metrics use too).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    code: &'static str,
}

fn call_histogram() -> Histogram {
    // 0.5 ms .. 131 s: a Probe takes well under a millisecond, an unstage
    // may push and flush for up to two minutes.
    Histogram::new(exponential_buckets(0.0005, 2.0, 19))
}

/// CSI calls by method and gRPC code: a counter and a latency histogram.
#[derive(Clone, Debug)]
pub struct CallMetrics {
    calls: Family<CallLabels, Counter>,
    duration: Family<CallLabels, Histogram, fn() -> Histogram>,
}

impl Default for CallMetrics {
    fn default() -> Self {
        CallMetrics {
            calls: Family::default(),
            duration: Family::new_with_constructor(call_histogram),
        }
    }
}

impl CallMetrics {
    /// Adds `r3map_csi_calls_total` and `r3map_csi_call_duration_seconds`
    /// to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "r3map_csi_calls",
            "CSI calls answered, by method and gRPC code",
            self.calls.clone(),
        );
        registry.register_with_unit(
            "r3map_csi_call_duration",
            "Time from a CSI call's arrival to its answer, by method and gRPC code",
            Unit::Seconds,
            self.duration.clone(),
        );
    }

    /// Records one answered call.
    pub fn observe(&self, method: &'static str, code: Code, elapsed: Duration) {
        let l = CallLabels {
            method,
            code: code_name(code),
        };
        self.calls.get_or_create(&l).inc();
        self.duration
            .get_or_create(&l)
            .observe(elapsed.as_secs_f64());
    }

    /// A tower layer recording every call of the gRPC server it wraps.
    pub fn layer(&self) -> CallMetricsLayer {
        CallMetricsLayer {
            metrics: self.clone(),
        }
    }

    /// `service` recording its calls: for `Server::builder().add_service`,
    /// which keeps the router's type (a server-wide layer changes it).
    pub fn wrap<S>(&self, service: S) -> CallMetricsService<S> {
        tower::Layer::layer(&self.layer(), service)
    }
}

/// Wraps a gRPC server (`tonic::transport::Server::builder().layer(..)`)
/// so that every call is recorded in [`CallMetrics`].
#[derive(Clone, Debug)]
pub struct CallMetricsLayer {
    metrics: CallMetrics,
}

impl<S> tower::Layer<S> for CallMetricsLayer {
    type Service = CallMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service of [`CallMetricsLayer`].
#[derive(Clone, Debug)]
pub struct CallMetricsService<S> {
    inner: S,
    metrics: CallMetrics,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for CallMetricsService<S> {
    const NAME: &'static str = S::NAME;
}

/// The gRPC code of a response: tonic answers a failed unary call
/// "trailers-only", with `grpc-status` in the headers; a successful one
/// has no `grpc-status` header (OK follows in the trailers).
fn code_of<B>(r: &hyper::Response<B>) -> Code {
    r.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
        .unwrap_or(Code::Ok)
}

impl<S, B, RB> tower::Service<hyper::Request<B>> for CallMetricsService<S>
where
    S: tower::Service<hyper::Request<B>, Response = hyper::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: hyper::Request<B>) -> Self::Future {
        let method = method_of(req.uri().path());
        let t0 = Instant::now();
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let r = fut.await;
            let code = match &r {
                Ok(resp) => code_of(resp),
                Err(_) => Code::Unknown,
            };
            metrics.observe(method, code, t0.elapsed());
            r
        })
    }
}

// ------------------------------------------------------------- scraping

/// One HTTP answer of [`scrape`].
#[derive(Debug, Clone)]
pub struct Scraped {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: String,
}

/// `GET http://addr/path` (HTTP/1.1, one connection).
pub async fn scrape(addr: SocketAddr, path: &str) -> Result<Scraped, MetricsError> {
    let err = |msg: String| MetricsError::Scrape { addr, msg };
    let sock = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| err(format!("connect: {e}")))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(sock))
        .await
        .map_err(|e| err(format!("handshake: {e}")))?;
    let conn = tokio::spawn(conn);
    let req = Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| err(format!("request: {e}")))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| err(format!("GET {path}: {e}")))?;
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| err(format!("body: {e}")))?
        .to_bytes();
    conn.abort();
    let body = String::from_utf8(body.to_vec()).map_err(|e| err(format!("body: {e}")))?;
    Ok(Scraped {
        status,
        content_type,
        body,
    })
}

// -------------------------------------------------------------- parsing

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name (with `_total`, `_bucket`... suffixes).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// One metric family: its descriptor and samples.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricFamily {
    /// The family name (no suffix).
    pub name: String,
    /// `counter`, `gauge`, `histogram`, ...
    pub kind: String,
    /// The HELP text.
    pub help: String,
    /// The UNIT, if declared.
    pub unit: Option<String>,
    /// Its samples, in order.
    pub samples: Vec<Sample>,
}

/// A parsed exposition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    /// The families, in order.
    pub families: Vec<MetricFamily>,
}

impl Exposition {
    /// The family named `name`.
    pub fn family(&self, name: &str) -> Option<&MetricFamily> {
        self.families.iter().find(|f| f.name == name)
    }

    /// Samples named `name` carrying every label of `labels` (others may
    /// be present).
    pub fn samples<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.families
            .iter()
            .flat_map(|f| f.samples.iter())
            .filter(move |s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
    }

    /// The value of the one sample named `name` carrying `labels`; None
    /// when there is none or more than one.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut it = self.samples(name, labels);
        let first = it.next()?;
        match it.next() {
            None => Some(first.value),
            Some(_) => None,
        }
    }
}

const KINDS: &[&str] = &[
    "counter",
    "gauge",
    "histogram",
    "gaugehistogram",
    "summary",
    "info",
    "stateset",
    "unknown",
];

fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "histogram" => &["_bucket", "_count", "_sum", "_created"],
        "gaugehistogram" => &["_bucket", "_gcount", "_gsum"],
        "summary" => &["", "_count", "_sum", "_created"],
        "info" => &["_info"],
        _ => &[""],
    }
}

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Parses `{k="v",...}` at the start of `s`; returns the labels and the
/// rest of the line.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("expected {")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let key = &rest[..eq];
        if !valid_name(key) {
            return Err(format!("bad label name {key:?}"));
        }
        let mut chars = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value without quotes")?
            .char_indices();
        let body = &rest[eq + 2..];
        let mut value = String::new();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    _ => return Err("bad escape in label value".into()),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(key.to_string(), value).is_some() {
            return Err(format!("label {key} twice"));
        }
        rest = &body[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err("expected , or } after a label".into());
        }
    }
}

/// Checks the histograms of `f`: per label set, `le` buckets
/// non-decreasing in `le` order, a `+Inf` bucket equal to `_count`.
fn check_histogram(f: &MetricFamily) -> Result<(), String> {
    type Series = (Vec<(f64, f64)>, Option<f64>);
    let mut by: BTreeMap<BTreeMap<String, String>, Series> = BTreeMap::new();
    for s in &f.samples {
        let mut key = s.labels.clone();
        if s.name.ends_with("_bucket") {
            let le = key.remove("le").ok_or("a _bucket without le")?;
            let le = parse_value(&le).ok_or(format!("bad le {le:?}"))?;
            by.entry(key).or_default().0.push((le, s.value));
        } else if s.name.ends_with("_count") {
            by.entry(key).or_default().1 = Some(s.value);
        }
    }
    for (labels, (buckets, count)) in by {
        let mut prev: Option<(f64, f64)> = None;
        for &(le, n) in &buckets {
            if let Some((ple, pn)) = prev {
                if le <= ple || n < pn {
                    return Err(format!(
                        "{} {labels:?}: bucket le={le} ({n}) after le={ple} ({pn}): not cumulative",
                        f.name
                    ));
                }
            }
            prev = Some((le, n));
        }
        match (prev, count) {
            (Some((le, n)), Some(c)) if le == f64::INFINITY && n == c => {}
            _ => {
                return Err(format!(
                    "{} {labels:?}: the +Inf bucket is not last or differs from _count",
                    f.name
                ))
            }
        }
    }
    Ok(())
}

/// Parses OpenMetrics text strictly: descriptors before samples, every
/// sample in its family (name plus a suffix its type allows), no family
/// twice, label values unescaped, histograms cumulative with `+Inf` equal
/// to `_count`, and `# EOF` last.
pub fn parse(text: &str) -> Result<Exposition, MetricsError> {
    let mut out = Exposition::default();
    let mut eof = false;
    for (n, line) in text.lines().enumerate() {
        let err = |msg: String| MetricsError::Parse { line: n + 1, msg };
        if eof {
            return Err(err("text after # EOF".into()));
        }
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let (kw, rest) = rest
                .split_once(' ')
                .ok_or_else(|| err("bad comment".into()))?;
            let (name, arg) = rest.split_once(' ').unwrap_or((rest, ""));
            if !valid_name(name) {
                return Err(err(format!("bad metric name {name:?}")));
            }
            let same = out.families.last().is_some_and(|f| f.name == name);
            if !same {
                if out.family(name).is_some() {
                    return Err(err(format!("family {name} appears twice")));
                }
                out.families.push(MetricFamily {
                    name: name.to_string(),
                    kind: "unknown".into(),
                    help: String::new(),
                    unit: None,
                    samples: Vec::new(),
                });
            }
            let f = out.families.last_mut().expect("pushed above");
            if !f.samples.is_empty() {
                return Err(err(format!("descriptor of {name} after its samples")));
            }
            match kw {
                "HELP" => f.help = arg.to_string(),
                "TYPE" if KINDS.contains(&arg) => f.kind = arg.to_string(),
                "UNIT" if name.ends_with(&format!("_{arg}")) => f.unit = Some(arg.to_string()),
                _ => return Err(err(format!("bad # {kw} line"))),
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| err("sample without value".into()))?;
        let name = &line[..name_end];
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(err)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut parts = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("expected a space before the value".into()))?
            .split(' ');
        let value = parts
            .next()
            .and_then(parse_value)
            .ok_or_else(|| err("bad value".into()))?;
        if let Some(ts) = parts.next() {
            ts.parse::<f64>()
                .map_err(|_| err(format!("bad timestamp {ts:?}")))?;
        }
        if parts.next().is_some() {
            return Err(err("trailing text after the sample".into()));
        }
        let f = out
            .families
            .last_mut()
            .ok_or_else(|| err(format!("sample {name} before any # TYPE")))?;
        let ok = suffixes(&f.kind)
            .iter()
            .any(|s| name.strip_suffix(s) == Some(f.name.as_str()));
        if !ok {
            return Err(err(format!(
                "sample {name} does not belong to the {} {}",
                f.kind, f.name
            )));
        }
        f.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    if !eof {
        return Err(MetricsError::Parse {
            line: text.lines().count(),
            msg: "no # EOF".into(),
        });
    }
    for f in out.families.iter().filter(|f| f.kind == "histogram") {
        check_histogram(f).map_err(|msg| MetricsError::Parse { line: 0, msg })?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_the_protos() {
        let proto =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proto/csi.proto"))
                .unwrap();
        let mut rpcs: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .map(|l| l.split(['(', ' ']).next().unwrap())
            .collect();
        rpcs.sort();
        let mut ours = CSI_METHODS.to_vec();
        ours.sort();
        assert_eq!(rpcs, ours);
        assert_eq!(method_of("/csi.v1.Node/NodeStageVolume"), "NodeStageVolume");
        assert_eq!(method_of("/csi.v1.Identity/Probe"), "Probe");
        assert_eq!(method_of("/csi.v1.Node/Nope"), "unknown");
        assert_eq!(method_of("/other.v1.Node/Probe"), "unknown");
        assert_eq!(method_of("/"), "unknown");
    }

    #[tokio::test]
    async fn calls_render_and_parse() {
        let calls = CallMetrics::default();
        let mut reg = Registry::default();
        calls.register(&mut reg);
        calls.observe("Probe", Code::Ok, Duration::from_micros(300));
        calls.observe("Probe", Code::Ok, Duration::from_millis(3));
        calls.observe("NodeStageVolume", Code::NotFound, Duration::from_secs(1));
        let text = Exporter::new(reg).render().await.unwrap();
        let e = parse(&text).unwrap();
        assert_eq!(e.family("r3map_csi_calls").unwrap().kind, "counter");
        let h = e.family("r3map_csi_call_duration_seconds").unwrap();
        assert_eq!(
            (h.kind.as_str(), h.unit.as_deref()),
            ("histogram", Some("seconds"))
        );
        let ok = [("method", "Probe"), ("code", "OK")];
        assert_eq!(e.value("r3map_csi_calls_total", &ok), Some(2.0));
        assert_eq!(
            e.value("r3map_csi_call_duration_seconds_count", &ok),
            Some(2.0)
        );
        let mut le = ok.to_vec();
        le.push(("le", "0.0005"));
        assert_eq!(
            e.value("r3map_csi_call_duration_seconds_bucket", &le),
            Some(1.0)
        );
        let nf = [("method", "NodeStageVolume"), ("code", "NotFound")];
        assert_eq!(e.value("r3map_csi_calls_total", &nf), Some(1.0));
    }

    #[test]
    fn parser_refuses_what_prometheus_would() {
        let good = "# HELP a_seconds x\n# TYPE a_seconds histogram\n# UNIT a_seconds seconds\n\
                    a_seconds_sum{v=\"q\\\"\\\\\"} 1.5\na_seconds_count{v=\"q\\\"\\\\\"} 2\n\
                    a_seconds_bucket{v=\"q\\\"\\\\\",le=\"1.0\"} 1\n\
                    a_seconds_bucket{v=\"q\\\"\\\\\",le=\"+Inf\"} 2\n# EOF\n";
        let e = parse(good).unwrap();
        assert_eq!(e.value("a_seconds_count", &[("v", "q\"\\")]), Some(2.0));
        let bad = [
            // no EOF
            "# TYPE a counter\na_total 1\n",
            // sample of another family
            "# TYPE a counter\nb_total 1\n# EOF\n",
            // a counter sample without _total
            "# TYPE a counter\na 1\n# EOF\n",
            // family twice
            "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\n# TYPE a gauge\n# EOF\n",
            // buckets not cumulative
            "# TYPE h histogram\nh_count 2\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n# EOF\n",
            // +Inf differs from _count
            "# TYPE h histogram\nh_count 3\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\n# EOF\n",
            // unterminated label
            "# TYPE a gauge\na{x=\"1} 1\n# EOF\n",
            // bad value
            "# TYPE a gauge\na one\n# EOF\n",
            // text after EOF
            "# TYPE a gauge\na 1\n# EOF\na 2\n",
        ];
        for b in bad {
            assert!(parse(b).is_err(), "accepted:\n{b}");
        }
    }
}
