//! The servers the feed dials in turn: those of `nats_url`, then those the cluster advertises (the
//! `connect_urls` of a server's `INFO`, as NATS clients use them), so that a gateway given one seed
//! URL still reaches the other nodes while that one is down.

/// Configured and advertised servers, each as a URL the feed can dial.
#[derive(Debug, Default)]
pub(super) struct Servers {
    configured: Vec<String>,
    advertised: Vec<String>,
}

impl Servers {
    pub(super) fn new(nats_url: &str) -> Servers {
        let configured = nats_url.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        Servers { configured, advertised: Vec::new() }
    }

    /// The server of `turn`, round robin over every known one; `None` when none is configured.
    pub(super) fn pick(&self, turn: usize) -> Option<&str> {
        let count = self.configured.len() + self.advertised.len();
        if self.configured.is_empty() {
            return None;
        }
        let index = turn % count;
        Some(self.configured.get(index).unwrap_or_else(|| &self.advertised[index - self.configured.len()]))
    }

    /// Takes a server's `INFO`: its `connect_urls` (`host:port` of every node clients may use)
    /// replace those advertised before, except the configured ones. An advertised server is dialed
    /// like the first configured URL: its scheme and its `user:password@`, if it has them; over TLS
    /// none is.
    pub(super) fn learn(&mut self, info: &serde_json::Value) {
        let Some(urls) = info["connect_urls"].as_array() else { return };
        let (scheme, credentials) = self.configured.first().map(|url| template(url)).unwrap_or_default();
        if scheme == "tls://" || info["tls_required"].as_bool() == Some(true) {
            // Advertised as addresses, which a certificate names rarely: TLS dials the URLs given.
            return;
        }
        let configured: Vec<&str> = self.configured.iter().map(|url| host_port(url)).collect();
        let mut advertised: Vec<String> = urls
            .iter()
            .filter_map(|url| url.as_str())
            .filter(|url| !url.is_empty() && !configured.contains(url))
            .map(|url| format!("{scheme}{credentials}{url}"))
            .collect();
        advertised.dedup();
        self.advertised = advertised;
    }
}

/// `scheme://` and `user:password@` of a URL (each empty when absent).
fn template(url: &str) -> (String, String) {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let credentials = rest.rsplit_once('@').map(|(userinfo, _)| format!("{userinfo}@")).unwrap_or_default();
    (scheme, credentials)
}

/// A URL's `host:port`, as `connect_urls` writes it (4222 when the URL names no port).
fn host_port(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    rest.trim_end_matches('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_servers_follow_the_configured_ones_in_turn() {
        let mut servers = Servers::new("nats://u:p@10.0.0.1:4222");
        assert_eq!(
            (servers.pick(0), servers.pick(1)),
            (Some("nats://u:p@10.0.0.1:4222"), Some("nats://u:p@10.0.0.1:4222"))
        );
        servers.learn(&serde_json::json!({"connect_urls": ["10.0.0.1:4222", "10.0.0.2:4222", "10.0.0.3:4222"]}));
        let picked: Vec<_> = (0..4).map(|turn| servers.pick(turn).unwrap()).collect();
        assert_eq!(
            picked,
            [
                "nats://u:p@10.0.0.1:4222",
                "nats://u:p@10.0.0.2:4222",
                "nats://u:p@10.0.0.3:4222",
                "nats://u:p@10.0.0.1:4222"
            ]
        );
        // A later INFO replaces what was advertised; one without `connect_urls` changes nothing.
        servers.learn(&serde_json::json!({"connect_urls": ["10.0.0.4:4222"]}));
        servers.learn(&serde_json::json!({"max_payload": 1}));
        assert_eq!(servers.pick(1), Some("nats://u:p@10.0.0.4:4222"));
    }

    #[test]
    fn over_tls_only_the_configured_servers_are_dialed() {
        let advertised = serde_json::json!({"connect_urls": ["10.0.0.2:4222"]});
        let mut servers = Servers::new("tls://n1.example:4222");
        servers.learn(&advertised);
        assert_eq!(servers.pick(1), Some("tls://n1.example:4222"));
        let mut servers = Servers::new("n1.example:4222");
        servers.learn(&serde_json::json!({"connect_urls": ["10.0.0.2:4222"], "tls_required": true}));
        assert_eq!(servers.pick(1), Some("n1.example:4222"));
    }

    #[test]
    fn no_configured_server_is_none_to_dial() {
        let mut servers = Servers::new(" , ");
        servers.learn(&serde_json::json!({"connect_urls": ["10.0.0.2:4222"]}));
        assert_eq!(servers.pick(0), None);
    }
}
