//! The configuration a C caller gives `nasp_mesh_new` (JSON or YAML), and
//! its mapping onto [`nasp::MeshBuilder`], one field to one builder call
//! (`docs/ffi-design.md`, section 3.4). Unknown fields are rejected, naming
//! them, so a typo is an error rather than a silently ignored setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use nasp::MeshBuilder;
use nasp::access_log::AccessLogConfig;
use nasp::transport::InboundMode;
use nasp::xds::WorkloadSettings;
use serde::Deserialize;

/// The whole configuration. Every field is optional; `control_plane` is
/// required by `nasp_mesh_new` (not by `nasp_mesh_new_from_env`, where
/// the environment names it).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where xDS and the CA are.
    pub control_plane: Option<ControlPlane>,
    /// Who this workload is.
    pub workload: Option<Workload>,
    /// The mesh trust domain (default `cluster.local`).
    pub trust_domain: Option<String>,
    /// `wasmtime`, `wasmi` or `wasm3` (compiled-in ones only); default
    /// wasmtime when compiled in, else the first one that is.
    pub runtime: Option<String>,
    /// Istio's metadata exchange and stats filters (default on).
    pub default_filters: Option<bool>,
    /// `strict`, `permissive` or `disable` for every listener (default:
    /// what xDS says per port).
    pub inbound_mode: Option<String>,
    /// How long `nasp_mesh_new` waits for a certificate and a first xDS
    /// snapshot (default 30000).
    pub ready_timeout_ms: Option<u64>,
    /// The timeout of a call given `timeout_ms == 0` (default 30000).
    pub call_timeout_ms: Option<u64>,
    /// How long a shutdown lets requests in flight finish (default 5000).
    pub drain_timeout_ms: Option<u64>,
    /// The mesh runtime's worker threads, and its filter workers
    /// (default 2: a library should not take every core of its host).
    pub worker_threads: Option<usize>,
    /// `off` (the default for `nasp_mesh_new`) or an `IP:PORT` to serve
    /// Prometheus metrics on.
    pub prometheus: Option<String>,
    /// `off` (default), `stdout` or a file path.
    pub access_log: Option<String>,
    /// `text` (Envoy's default format) or `json`.
    pub access_log_format: Option<String>,
}

/// The control plane: istiod or `nasp controlplane`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlane {
    /// `host:port` of xDS and the CA (istiod: `istiod.istio-system.svc:15012`).
    pub address: String,
    /// The root certificate (PEM text)…
    pub root_cert_pem: Option<String>,
    /// …or a file holding it (read once, when the mesh is created).
    pub root_cert_file: Option<PathBuf>,
    /// A file with the bearer token shown to the CA (re-read on renewal).
    pub token_file: Option<PathBuf>,
}

/// The workload, as Istio's agent variables describe it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Kubernetes namespace.
    pub namespace: Option<String>,
    /// Service account (the identity's last part).
    pub service_account: Option<String>,
    /// Workload name (`canonical` name in telemetry).
    pub name: Option<String>,
    /// Pod (instance) name.
    pub pod_name: Option<String>,
    /// Labels (`app`, `version`…).
    pub labels: Option<BTreeMap<String, String>>,
    /// This instance's IPs.
    pub instance_ips: Option<Vec<String>>,
    /// The cluster id.
    pub cluster_id: Option<String>,
}

/// A configuration turned into a builder plus what the boundary keeps.
#[derive(Debug)]
pub struct Settings {
    /// The builder, ready for `build()`.
    pub builder: MeshBuilder,
    /// The default call timeout.
    pub call_timeout: Duration,
    /// The drain timeout (bounds `nasp_mesh_free`'s shutdown).
    pub drain: Duration,
    /// Worker threads of the mesh's runtime.
    pub worker_threads: usize,
}

/// A rejected configuration: what and where.
pub type ConfigError = String;

impl Config {
    /// Parses JSON (text starting with `{`, so JSON errors read as JSON
    /// errors) or YAML; empty text is the empty configuration.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let t = text.trim_start();
        if t.is_empty() {
            Ok(Self::default())
        } else if t.starts_with('{') {
            serde_json::from_str(t).map_err(|e| format!("config (JSON): {e}"))
        } else {
            serde_saphyr::from_str(t).map_err(|e| format!("config (YAML): {e}"))
        }
    }

    /// The builder for `nasp_mesh_new`: `control_plane` is required, and
    /// Prometheus is off unless asked.
    pub fn into_settings(self) -> Result<Settings, ConfigError> {
        let cp = self.control_plane.as_ref().ok_or(
            "config: control_plane is missing (address and root_cert_pem or root_cert_file)",
        )?;
        let root = match (&cp.root_cert_pem, &cp.root_cert_file) {
            (Some(pem), None) => pem.clone().into_bytes(),
            (None, Some(f)) => std::fs::read(f).map_err(|e| {
                format!("config: control_plane.root_cert_file {}: {e}", f.display())
            })?,
            _ => {
                return Err(
                    "config: control_plane needs exactly one of root_cert_pem and root_cert_file"
                        .into(),
                );
            }
        };
        let builder = MeshBuilder::default().control_plane(cp.address.clone(), root);
        self.apply(builder, WorkloadSettings::default())
    }

    /// The builder for `nasp_mesh_new_from_env`: the environment, then
    /// these fields on top.
    pub fn into_env_settings(self) -> Result<Settings, ConfigError> {
        let mut builder = MeshBuilder::from_env().map_err(|e| format!("environment: {e}"))?;
        if let Some(cp) = &self.control_plane {
            let root = match (&cp.root_cert_pem, &cp.root_cert_file) {
                (Some(pem), None) => pem.clone().into_bytes(),
                (None, Some(f)) => std::fs::read(f).map_err(|e| {
                    format!("config: control_plane.root_cert_file {}: {e}", f.display())
                })?,
                _ => {
                    return Err(
                        "config: control_plane needs exactly one of root_cert_pem and \
                         root_cert_file"
                            .into(),
                    );
                }
            };
            builder = builder.control_plane(cp.address.clone(), root);
        }
        self.apply(builder, WorkloadSettings::from_env())
    }

    fn apply(self, mut b: MeshBuilder, mut w: WorkloadSettings) -> Result<Settings, ConfigError> {
        if let Some(t) = self.control_plane.and_then(|c| c.token_file) {
            b = b.token_file(t);
        }
        if let Some(o) = self.workload {
            let set = |f: &mut String, v: Option<String>| {
                if let Some(v) = v {
                    *f = v;
                }
            };
            set(&mut w.namespace, o.namespace);
            set(&mut w.service_account, o.service_account);
            set(&mut w.workload_name, o.name);
            set(&mut w.pod_name, o.pod_name);
            set(&mut w.cluster_id, o.cluster_id);
            if let Some(l) = o.labels {
                w.labels = l;
            }
            if let Some(ips) = o.instance_ips {
                w.instance_ips = ips;
            }
        }
        b = b.workload(w);
        if let Some(td) = self.trust_domain {
            b = b.trust_domain(td);
        }
        let runtime = match self.runtime {
            Some(r) => {
                let known = nasp::wasm::Runtime::from_name(&r).ok_or_else(|| {
                    format!("config: runtime {r:?} is not wasmtime, wasmi or wasm3")
                })?;
                if !known.is_compiled_in() {
                    return Err(format!(
                        "config: runtime {r:?} is not compiled into this library"
                    ));
                }
                Some(known)
            }
            None if nasp::wasm::Runtime::Wasmtime.is_compiled_in() => None,
            None => nasp::wasm::Runtime::available().first().copied(),
        };
        if let Some(r) = runtime {
            b = b.runtime(r.name());
        }
        if let Some(on) = self.default_filters {
            b = b.default_filters(on);
        }
        if let Some(m) = self.inbound_mode {
            b = b.inbound_mode(match m.as_str() {
                "strict" => InboundMode::Strict,
                "permissive" => InboundMode::Permissive,
                "disable" => InboundMode::Disable,
                other => {
                    return Err(format!(
                        "config: inbound_mode {other:?} is not strict, permissive or disable"
                    ));
                }
            });
        }
        let ms = Duration::from_millis;
        if let Some(t) = self.ready_timeout_ms {
            b = b.ready_timeout(ms(t));
        }
        let drain = ms(self.drain_timeout_ms.unwrap_or(5000));
        b = b.drain_timeout(drain);
        let workers = self.worker_threads.unwrap_or(2);
        if workers == 0 {
            return Err("config: worker_threads must be at least 1".into());
        }
        b = b.filter_workers(workers);
        match self.prometheus.as_deref().map(str::trim) {
            None => {}
            Some("off") => b = b.prometheus(None),
            Some(a) => {
                let addr: SocketAddr = a
                    .parse()
                    .map_err(|e| format!("config: prometheus {a:?} is not off or IP:PORT: {e}"))?;
                b = b.prometheus(Some(addr));
            }
        }
        if self.access_log.is_some() || self.access_log_format.is_some() {
            let log = AccessLogConfig::from_vars(
                self.access_log.as_deref(),
                self.access_log_format.as_deref(),
            )
            .map_err(|e| format!("config: access_log: {e}"))?;
            b = b.access_log(log);
        }
        Ok(Settings {
            builder: b,
            call_timeout: ms(self.call_timeout_ms.unwrap_or(30_000)),
            drain,
            worker_threads: workers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_field_is_named() {
        let e = Config::parse("control_plane: { address: a:1 }\nruntme: wasmi\n").unwrap_err();
        assert!(e.contains("runtme"), "{e}");
        let e = Config::parse(r#"{"control_plane": {"adress": "a:1"}}"#).unwrap_err();
        assert!(e.contains("JSON") && e.contains("adress"), "{e}");
    }

    #[test]
    fn json_and_yaml_give_the_same_settings() {
        let y = Config::parse(
            "control_plane: { address: 127.0.0.1:15012, root_cert_pem: x }\nworker_threads: 3\n",
        )
        .unwrap();
        let j = Config::parse(
            r#"{"control_plane": {"address": "127.0.0.1:15012", "root_cert_pem": "x"}, "worker_threads": 3}"#,
        )
        .unwrap();
        assert_eq!(y.worker_threads, Some(3));
        assert_eq!(j.worker_threads, Some(3));
        assert_eq!(y.into_settings().unwrap().worker_threads, 3);
    }

    #[test]
    fn bad_values_name_the_field() {
        let base = "control_plane: { address: a:1, root_cert_pem: x }\n";
        for (extra, field) in [
            ("inbound_mode: loose\n", "inbound_mode"),
            ("runtime: v8\n", "runtime"),
            ("prometheus: 15090\n", "prometheus"),
            ("worker_threads: 0\n", "worker_threads"),
        ] {
            let e = Config::parse(&format!("{base}{extra}"))
                .unwrap()
                .into_settings()
                .unwrap_err();
            assert!(e.contains(field), "{extra}: {e}");
        }
        let e = Config::parse("trust_domain: x\n")
            .unwrap()
            .into_settings()
            .unwrap_err();
        assert!(e.contains("control_plane"), "{e}");
        let e = Config::parse("control_plane: { address: a:1 }\n")
            .unwrap()
            .into_settings()
            .unwrap_err();
        assert!(e.contains("root_cert"), "{e}");
    }
}
