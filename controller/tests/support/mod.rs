//! An in-process test double of the Kubernetes API server: HTTP/1.1
//! (hyper 1), real JSON, enough of the REST API for kube-rs to manage
//! `r3mapvolumes` (cluster-scoped, with a `/status` subresource),
//! `coordination.k8s.io/v1` Leases and Events (core/v1 and
//! events.k8s.io/v1).
//!
//! What it keeps of the real server's semantics, because the code under
//! test depends on them:
//! - every write bumps a global resourceVersion; a PUT or DELETE
//!   precondition with a stale one gets 409 Conflict;
//! - a POST of an existing name gets 409 AlreadyExists, a missing object
//!   404 NotFound;
//! - with a status subresource, writes to the object ignore `status` and
//!   writes to `/status` change nothing else; `metadata.generation` moves
//!   only when the spec does;
//! - PATCH: JSON merge patch (server-side apply and strategic merge are
//!   approximated by a merge patch, enough for flat objects).
//!
//! Faults: fail the next N writes of a resource with any code
//! ([`ApiServer::fail_writes`]), or let a simulated other writer change an
//! object just before each of the next N writes
//! ([`ApiServer::interfere`]), so that the write under test meets a real
//! stale resourceVersion.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// A hook run on a stored object before a write reaches it.
pub type Hook = Box<dyn FnMut(&mut Value) + Send>;

struct Resource {
    kind: &'static str,
    namespaced: bool,
    status_subresource: bool,
}

fn resource(plural: &str) -> Option<Resource> {
    Some(match plural {
        "r3mapvolumes" => Resource {
            kind: "R3mapVolume",
            namespaced: false,
            status_subresource: true,
        },
        "leases" => Resource {
            kind: "Lease",
            namespaced: true,
            status_subresource: false,
        },
        "events" => Resource {
            kind: "Event",
            namespaced: true,
            status_subresource: false,
        },
        _ => return None,
    })
}

struct Interference {
    remaining: u32,
    /// The hook runs before every `every`-th write (the first included).
    every: u32,
    seen: u32,
    hook: Hook,
}

#[derive(Default)]
struct Store {
    /// (group/version, plural, namespace, name) -> object.
    objects: BTreeMap<(String, String, String, String), Value>,
    rv: u64,
    uid: u64,
    /// plural -> (writes to let pass first, writes left to fail, code).
    faults: BTreeMap<String, (u32, u32, u16)>,
    interference: BTreeMap<String, Interference>,
    log: Vec<(String, String)>,
}

/// The server; stops when dropped.
pub struct ApiServer {
    /// Where it listens.
    pub addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("made an object above");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn rv_of(v: &Value) -> Option<String> {
    v.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// The object without metadata and status: what `generation` tracks.
fn content(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("metadata");
        o.remove("status");
        o.remove("apiVersion");
        o.remove("kind");
    }
    v
}

struct Parsed {
    gv: String,
    plural: String,
    ns: String,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Parsed> {
    let seg: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match seg.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (ns.to_string(), rest),
        _ => (String::new(), rest),
    };
    let (plural, rest) = rest.split_first()?;
    Some(Parsed {
        gv,
        plural: plural.to_string(),
        ns,
        name: rest.first().map(|s| s.to_string()),
        sub: rest.get(1).map(|s| s.to_string()),
    })
}

impl Store {
    fn next_rv(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }

    fn handle(&mut self, method: &Method, path: &str, body: &[u8]) -> (u16, Value) {
        self.log.push((method.to_string(), path.to_string()));
        let Some(p) = parse_path(path) else {
            return status(404, "NotFound", &format!("no route {path}"));
        };
        let Some(res) = resource(&p.plural) else {
            return status(404, "NotFound", &format!("no resource {}", p.plural));
        };
        if res.namespaced && p.ns.is_empty() && p.name.is_some() {
            return status(400, "BadRequest", "namespace required");
        }
        let write = *method != Method::GET;
        if write {
            if let Some((skip, n, code)) = self.faults.get_mut(&p.plural) {
                if *skip > 0 {
                    *skip -= 1;
                } else if *n > 0 {
                    *n -= 1;
                    let code = *code;
                    let reason = if code == 409 {
                        "Conflict"
                    } else {
                        "InternalError"
                    };
                    return status(code, reason, "injected fault");
                }
            }
            if let Some(name) = &p.name {
                let key = (p.gv.clone(), p.plural.clone(), p.ns.clone(), name.clone());
                if self.objects.contains_key(&key) {
                    let mut fired = false;
                    if let Some(i) = self.interference.get_mut(&p.plural) {
                        if i.remaining > 0 {
                            i.remaining -= 1;
                            let due = i.seen % i.every.max(1) == 0;
                            i.seen += 1;
                            if let Some(o) = self.objects.get_mut(&key).filter(|_| due) {
                                (i.hook)(o);
                                fired = true;
                            }
                        }
                    }
                    if fired {
                        let rv = self.next_rv();
                        if let Some(o) = self.objects.get_mut(&key) {
                            o["metadata"]["resourceVersion"] = json!(rv);
                        }
                    }
                }
            }
        }
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => return status(400, "BadRequest", &format!("body: {e}")),
            }
        };
        let key = |name: &str| {
            (
                p.gv.clone(),
                p.plural.clone(),
                p.ns.clone(),
                name.to_string(),
            )
        };
        match (method.clone(), p.name.as_deref(), p.sub.as_deref()) {
            (Method::GET, None, None) => {
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|((gv, pl, ns, _), _)| {
                        *gv == p.gv && *pl == p.plural && (p.ns.is_empty() || *ns == p.ns)
                    })
                    .map(|(_, v)| v.clone())
                    .collect();
                (
                    200,
                    json!({"apiVersion": p.gv, "kind": format!("{}List", res.kind),
                           "metadata": {"resourceVersion": self.rv.to_string()}, "items": items}),
                )
            }
            (Method::GET, Some(n), sub) if sub.is_none() || sub == Some("status") => {
                match self.objects.get(&key(n)) {
                    Some(o) => (200, o.clone()),
                    None => status(404, "NotFound", &format!("{} {n} not found", p.plural)),
                }
            }
            (Method::POST, None, None) => {
                let mut o = body;
                let name = match o.pointer("/metadata/name").and_then(Value::as_str) {
                    Some(n) => n.to_string(),
                    None => match o.pointer("/metadata/generateName").and_then(Value::as_str) {
                        Some(g) => format!("{g}{:05}", self.uid + 1),
                        None => return status(422, "Invalid", "metadata.name required"),
                    },
                };
                if self.objects.contains_key(&key(&name)) {
                    return status(
                        409,
                        "AlreadyExists",
                        &format!("{} {name} already exists", p.plural),
                    );
                }
                if res.status_subresource {
                    if let Some(m) = o.as_object_mut() {
                        m.remove("status");
                    }
                }
                self.uid += 1;
                let rv = self.next_rv();
                let meta = &mut o["metadata"];
                meta["name"] = json!(name);
                meta["resourceVersion"] = json!(rv);
                meta["uid"] = json!(format!("uid-{}", self.uid));
                meta["generation"] = json!(1);
                meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                if res.namespaced {
                    meta["namespace"] = json!(p.ns);
                }
                self.objects.insert(key(&name), o.clone());
                (201, o)
            }
            (Method::PUT, Some(n), sub) => {
                let Some(old) = self.objects.get(&key(n)).cloned() else {
                    return status(404, "NotFound", &format!("{} {n} not found", p.plural));
                };
                if let Some(rv) = rv_of(&body) {
                    if Some(&rv) != rv_of(&old).as_ref() {
                        return status(
                            409,
                            "Conflict",
                            &format!(
                                "Operation cannot be fulfilled on {} \"{n}\": the object has been modified",
                                p.plural
                            ),
                        );
                    }
                }
                let new = match sub {
                    Some("status") if res.status_subresource => {
                        let mut o = old.clone();
                        o["status"] = body.get("status").cloned().unwrap_or(Value::Null);
                        o
                    }
                    None => {
                        let mut o = body;
                        if res.status_subresource {
                            match old.get("status") {
                                Some(s) => o["status"] = s.clone(),
                                None => {
                                    if let Some(m) = o.as_object_mut() {
                                        m.remove("status");
                                    }
                                }
                            }
                        }
                        o["metadata"] = old["metadata"].clone();
                        if let Some(l) = body_labels(&o) {
                            o["metadata"]["labels"] = l;
                        }
                        let gen = old["metadata"]["generation"].as_i64().unwrap_or(1);
                        if content(&o) != content(&old) {
                            o["metadata"]["generation"] = json!(gen + 1);
                        }
                        o
                    }
                    _ => return status(404, "NotFound", "no such subresource"),
                };
                self.store(key(n), new)
            }
            (Method::PATCH, Some(n), sub) => {
                let Some(old) = self.objects.get(&key(n)).cloned() else {
                    return status(404, "NotFound", &format!("{} {n} not found", p.plural));
                };
                if let Some(rv) = rv_of(&body) {
                    if Some(&rv) != rv_of(&old).as_ref() {
                        return status(409, "Conflict", "the object has been modified");
                    }
                }
                let mut o = old.clone();
                let mut patch = body;
                if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.remove("resourceVersion");
                }
                match sub {
                    Some("status") if res.status_subresource => {
                        if let Some(s) = patch.get("status") {
                            merge(&mut o["status"], s);
                        }
                    }
                    None => {
                        if res.status_subresource {
                            if let Some(m) = patch.as_object_mut() {
                                m.remove("status");
                            }
                        }
                        merge(&mut o, &patch);
                        if content(&o) != content(&old) {
                            let gen = old["metadata"]["generation"].as_i64().unwrap_or(1);
                            o["metadata"]["generation"] = json!(gen + 1);
                        }
                    }
                    _ => return status(404, "NotFound", "no such subresource"),
                }
                self.store(key(n), o)
            }
            (Method::DELETE, Some(n), None) => {
                let Some(old) = self.objects.get(&key(n)).cloned() else {
                    return status(404, "NotFound", &format!("{} {n} not found", p.plural));
                };
                if let Some(rv) = body
                    .pointer("/preconditions/resourceVersion")
                    .and_then(Value::as_str)
                {
                    if Some(rv.to_string()) != rv_of(&old) {
                        return status(409, "Conflict", "precondition failed: resourceVersion");
                    }
                }
                if let Some(uid) = body.pointer("/preconditions/uid").and_then(Value::as_str) {
                    if Some(uid) != old.pointer("/metadata/uid").and_then(Value::as_str) {
                        return status(409, "Conflict", "precondition failed: uid");
                    }
                }
                self.objects.remove(&key(n));
                (200, old)
            }
            _ => status(405, "MethodNotAllowed", &format!("{method} {path}")),
        }
    }

    fn store(&mut self, key: (String, String, String, String), mut o: Value) -> (u16, Value) {
        let rv = self.next_rv();
        o["metadata"]["resourceVersion"] = json!(rv);
        self.objects.insert(key, o.clone());
        (200, o)
    }
}

/// Labels sent in a PUT body (kept; everything else of metadata is the
/// server's).
fn body_labels(o: &Value) -> Option<Value> {
    o.pointer("/metadata/labels").cloned()
}

impl ApiServer {
    /// Starts a server on an ephemeral loopback port.
    pub async fn start() -> ApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let store = Arc::new(Mutex::new(Store::default()));
        let st = store.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let st = st.clone();
                        async move {
                            let method = req.method().clone();
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await?.to_bytes();
                            let (code, v) = st.lock().unwrap().handle(&method, &path, &body);
                            let mut resp = Response::new(Full::new(Bytes::from(
                                serde_json::to_vec(&v).unwrap(),
                            )));
                            *resp.status_mut() = StatusCode::from_u16(code).unwrap();
                            resp.headers_mut().insert(
                                hyper::header::CONTENT_TYPE,
                                "application/json".parse().unwrap(),
                            );
                            Ok::<_, hyper::Error>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
        ApiServer { addr, store, task }
    }

    /// A kube client of this server.
    pub fn client(&self) -> kube::Client {
        let url: hyper::Uri = format!("http://{}", self.addr).parse().unwrap();
        kube::Client::try_from(kube::Config::new(url)).unwrap()
    }

    /// Fails the next `n` writes (POST, PUT, PATCH, DELETE) of `plural`
    /// with `code`.
    pub fn fail_writes(&self, plural: &str, n: u32, code: u16) {
        self.fail_writes_after(plural, 0, n, code);
    }

    /// Lets `skip` writes of `plural` pass, then fails `n` with `code`.
    pub fn fail_writes_after(&self, plural: &str, skip: u32, n: u32, code: u16) {
        self.store
            .lock()
            .unwrap()
            .faults
            .insert(plural.to_string(), (skip, n, code));
    }

    /// Before each of the next `n` writes to an existing object of
    /// `plural`, changes it with `hook` and bumps its resourceVersion, as
    /// another writer that got there first would.
    pub fn interfere(&self, plural: &str, n: u32, hook: Hook) {
        self.interfere_every(plural, 1, n, hook);
    }

    /// Of the next `n` writes to an existing object of `plural`, the
    /// first and every `every`-th after it meet a change by `hook` (and a
    /// bumped resourceVersion). With `every` 2, each logical update (a
    /// write, refused, then its retry) meets exactly one real 409, however
    /// many updates there are.
    pub fn interfere_every(&self, plural: &str, every: u32, n: u32, hook: Hook) {
        self.store.lock().unwrap().interference.insert(
            plural.to_string(),
            Interference {
                remaining: n,
                every,
                seen: 0,
                hook,
            },
        );
    }

    /// Every object of `plural`.
    pub fn objects(&self, plural: &str) -> Vec<Value> {
        self.store
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|((_, p, _, _), _)| p == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Every request so far, as (method, path).
    pub fn requests(&self) -> Vec<(String, String)> {
        self.store.lock().unwrap().log.clone()
    }
}
