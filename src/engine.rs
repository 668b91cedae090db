//! Connection settings for the search engine (Elasticsearch or OpenSearch) that
//! holds the lock index, shared by every `lockctl` command.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use elasticsearch::Elasticsearch;
use elasticsearch::auth::Credentials;
use elasticsearch::cert::{Certificate, CertificateValidation};
use elasticsearch::http::transport::{MultiNodeConnectionPool, SingleNodeConnectionPool, TransportBuilder};
use url::Url;

/// Default lock index prefix; Kibana's own is `.kibana_locks`.
pub const DEFAULT_INDEX_PREFIX: &str = "kube-locks";

/// Why a connection to the search engine could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid --es-url {url:?}: {source}")]
    Url {
        url: String,
        #[source]
        source: url::ParseError,
    },
    #[error("--es-url must be http:// or https://, got {0:?}")]
    Scheme(String),
    #[error("--es-url {0:?} has an empty entry: list the nodes' URLs separated by single commas")]
    EmptyUrl(String),
    #[error("cannot read CA bundle {path}: {source}")]
    CaRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA bundle {path} holds no PEM certificate: {message}")]
    CaParse { path: PathBuf, message: String },
    #[error("--es-username and --es-password go together")]
    HalfBasicAuth,
    #[error("choose basic auth or an API key, not both")]
    TwoCredentials,
    #[error(
        "invalid --index-prefix {0:?}: use 1..100 lowercase letters, digits, '.', '_' or '-', not starting with '-', '_' or '+'"
    )]
    IndexPrefix(String),
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
}

/// How to reach the lock index. Flattened into every command that talks to it.
#[derive(Args, Clone, Debug)]
pub struct EngineArgs {
    /// URL of the Elasticsearch/OpenSearch node holding the lock index, or a
    /// comma-separated list of a cluster's nodes: requests go round-robin, and
    /// a request that fails to reach one node is retried on the next.
    #[arg(
        long = "es-url",
        env = "ELASTICSEARCH_URL",
        default_value = "http://127.0.0.1:9200",
        global = true
    )]
    pub url: String,
    /// Basic-auth user name.
    #[arg(long = "es-username", env = "ELASTICSEARCH_USERNAME", global = true)]
    pub username: Option<String>,
    /// Basic-auth password.
    #[arg(
        long = "es-password",
        env = "ELASTICSEARCH_PASSWORD",
        hide_env_values = true,
        global = true
    )]
    pub password: Option<String>,
    /// API key, base64 of `id:secret` as Elasticsearch prints it.
    #[arg(
        long = "es-api-key",
        env = "ELASTICSEARCH_API_KEY",
        hide_env_values = true,
        global = true
    )]
    pub api_key: Option<String>,
    /// PEM CA bundle that signed the engine's certificate.
    #[arg(long = "es-ca-cert", env = "ELASTICSEARCH_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Prefix of the lock index and its templates (alias `<prefix>` of index `<prefix>-000001`).
    #[arg(long = "index-prefix", env = "LOCK_INDEX_PREFIX", default_value = DEFAULT_INDEX_PREFIX, global = true)]
    pub index_prefix: String,
    /// Timeout of one request to the engine.
    #[arg(long = "es-timeout", env = "ELASTICSEARCH_TIMEOUT", default_value = "10s", value_parser = crate::duration::parse_duration, global = true)]
    pub request_timeout: Duration,
}

impl Default for EngineArgs {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:9200".into(),
            username: None,
            password: None,
            api_key: None,
            ca_cert: None,
            index_prefix: DEFAULT_INDEX_PREFIX.into(),
            request_timeout: Duration::from_secs(10),
        }
    }
}

impl EngineArgs {
    /// Settings for `url` with everything else at its default.
    pub fn for_url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// Builds a client; fails on malformed settings without contacting the engine.
    pub fn client(&self) -> Result<Elasticsearch, ConfigError> {
        validate_index_prefix(&self.index_prefix)?;
        let mut urls = parse_urls(&self.url)?;
        let builder = if urls.len() == 1 {
            TransportBuilder::new(SingleNodeConnectionPool::new(urls.remove(0)))
        } else {
            // no sniffing: the nodes listed are the ones this client may use
            TransportBuilder::new(MultiNodeConnectionPool::round_robin(urls, None))
        };
        let mut builder = builder.timeout(self.request_timeout).enable_meta_header(false);
        match (&self.username, &self.password, &self.api_key) {
            (Some(_), Some(_), Some(_)) => return Err(ConfigError::TwoCredentials),
            (Some(user), Some(pass), None) => builder = builder.auth(Credentials::Basic(user.clone(), pass.clone())),
            (Some(_), None, _) | (None, Some(_), _) => return Err(ConfigError::HalfBasicAuth),
            (None, None, Some(key)) => builder = builder.auth(Credentials::EncodedApiKey(key.clone())),
            (None, None, None) => {}
        }
        if let Some(path) = &self.ca_cert {
            let pem = std::fs::read(path).map_err(|source| ConfigError::CaRead {
                path: path.clone(),
                source,
            })?;
            let cert = Certificate::from_pem(&pem).map_err(|e| ConfigError::CaParse {
                path: path.clone(),
                message: e.to_string(),
            })?;
            builder = builder.cert_validation(CertificateValidation::Full(cert));
        }
        let transport = builder.build().map_err(|e| ConfigError::Build(e.to_string()))?;
        Ok(Elasticsearch::new(transport))
    }
}

/// `--es-url`: one URL or a comma-separated list, each http:// or https://.
fn parse_urls(list: &str) -> Result<Vec<Url>, ConfigError> {
    list.split(',')
        .map(str::trim)
        .map(|one| {
            if one.is_empty() {
                return Err(ConfigError::EmptyUrl(list.to_string()));
            }
            // "host:9200" parses as a URL with the scheme "host"
            if !one.contains("://") {
                return Err(ConfigError::Scheme(one.to_string()));
            }
            let url = Url::parse(one).map_err(|source| ConfigError::Url {
                url: one.to_string(),
                source,
            })?;
            if url.scheme() != "http" && url.scheme() != "https" {
                return Err(ConfigError::Scheme(one.to_string()));
            }
            Ok(url)
        })
        .collect()
}

/// Index names must be lowercase and cannot start with `-`, `_` or `+`.
pub fn validate_index_prefix(prefix: &str) -> Result<(), ConfigError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 100
        && !prefix.starts_with(['-', '_', '+'])
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::IndexPrefix(prefix.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_prefix_rules() {
        assert!(validate_index_prefix("kube-locks").is_ok());
        assert!(validate_index_prefix(".kibana_locks").is_ok());
        for bad in ["", "Upper", "-x", "_x", "a b", "a*"] {
            assert!(validate_index_prefix(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn half_basic_auth_is_refused() {
        let args = EngineArgs {
            username: Some("u".into()),
            ..EngineArgs::default()
        };
        assert!(matches!(args.client(), Err(ConfigError::HalfBasicAuth)));
    }

    #[test]
    fn a_list_of_node_urls_is_accepted_and_each_is_checked() {
        let urls = parse_urls("http://a:9200, http://b:9200,https://c:9200").unwrap();
        assert_eq!(urls.len(), 3);
        assert_eq!(urls[1].host_str(), Some("b"));
        assert!(EngineArgs::for_url("http://a:9200,http://b:9200").client().is_ok());
        let err = EngineArgs::for_url("http://a:9200,b c").client().unwrap_err();
        assert!(err.to_string().contains("\"b c\""), "{err}");
        let err = EngineArgs::for_url("http://a:9200,ftp://b").client().unwrap_err();
        assert!(matches!(err, ConfigError::Scheme(u) if u == "ftp://b"));
        for list in ["http://a:9200,", ",http://a:9200", "http://a:9200,,http://b:9200"] {
            let err = EngineArgs::for_url(list).client().unwrap_err();
            assert!(matches!(err, ConfigError::EmptyUrl(_)), "{list}: {err}");
        }
        let err = EngineArgs::for_url("http://a:9200,127.0.0.1:9200")
            .client()
            .unwrap_err();
        assert!(err.to_string().contains("http:// or https://"), "{err}");
    }

    #[test]
    fn bad_url_is_named() {
        let err = EngineArgs::for_url("not a url").client().unwrap_err();
        assert!(err.to_string().contains("--es-url"), "{err}");
        let err = EngineArgs::for_url("ftp://x").client().unwrap_err();
        assert!(matches!(err, ConfigError::Scheme(_)));
    }
}
