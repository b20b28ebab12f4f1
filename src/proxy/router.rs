//! Host -> app. Exact names first, then the longest matching `*.` wildcard.

use std::collections::HashMap;

/// Routes a request's host to an app name.
#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<String, String>,
    /// (suffix including the leading dot, app), longest suffix first.
    wildcards: Vec<(String, String)>,
}

impl Router {
    /// A router for `(app, host patterns)`; patterns were validated with the
    /// config.
    pub fn new<'a>(apps: impl IntoIterator<Item = (&'a str, &'a [String])>) -> Router {
        let mut r = Router::default();
        for (app, hosts) in apps {
            for host in hosts {
                match host.strip_prefix('*') {
                    Some(suffix) => r.wildcards.push((suffix.to_owned(), app.to_owned())),
                    None => {
                        r.exact.insert(host.clone(), app.to_owned());
                    }
                }
            }
        }
        r.wildcards.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        r
    }

    /// The app for a host name as the request's authority has it
    /// (lowercase, no port, no trailing dot).
    pub fn route(&self, host: &str) -> Option<&str> {
        if let Some(app) = self.exact.get(host) {
            return Some(app);
        }
        self.wildcards
            .iter()
            .find(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
            .map(|(_, app)| app.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_beats_wildcard_and_longest_wildcard_wins() {
        let a = ["a.example.com".to_string()];
        let b = ["*.example.com".to_string()];
        let c = ["*.deep.example.com".to_string()];
        let r = Router::new([("a", &a[..]), ("b", &b[..]), ("c", &c[..])]);
        assert_eq!(r.route("a.example.com"), Some("a"));
        assert_eq!(r.route("x.example.com"), Some("b"));
        assert_eq!(r.route("x.deep.example.com"), Some("c"));
        assert_eq!(
            r.route("example.com"),
            None,
            "a wildcard needs a label before it"
        );
        assert_eq!(r.route("other.org"), None);
    }
}
